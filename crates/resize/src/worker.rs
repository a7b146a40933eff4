//! The persistent preparation worker of a VM and the one-slot mailbox that feeds it
//! (KVM queues `resize_hpt_prepare_work` on a workqueue served by a kernel thread that
//! exists before any guest asks; this is that thread).
//!
//! [`ResizeCtl`](crate::ResizeCtl) spawns one worker when it is created (at VM set-up,
//! never from a hypercall) and stops and joins it when it is dropped. H_RESIZE_HPT_PREPARE
//! only [`post`](Mailbox::post)s a job, which allocates nothing, so the only allocations a
//! guest can trigger are the worker's own (the new table, fallible: H_NO_MEM).
//!
//! # Protocol and invariants
//!
//! One mutex protects the slot (`job`: posted, not yet taken; `busy`: the worker runs a
//! job; `stop`: exit requested); one condition variable signals every change of it.
//!
//! * The worker tests for a job or a stop request and goes to sleep in **one** critical
//!   section (`wait` releases the mutex atomically), so a post or a stop made after its
//!   test finds it waiting and wakes it: no lost wake-up. The `loom_worker` test checks
//!   every interleaving, and that the non-atomic variant ([`Mailbox::take_with`] with
//!   `false`, never called by production code) loses a wake-up and deadlocks.
//! * At most one job is queued: posting over a job the worker has not taken yet replaces
//!   it (the caller gets the replaced job back; a superseded preparation never runs).
//! * [`stop`](Mailbox::stop) lets the worker finish the job it is running, drops a queued
//!   one (handed back), and makes the worker's next [`take`](Mailbox::take) return `None`.
//! * [`wait_idle`](Mailbox::wait_idle) returns once no job is queued or running; the job's
//!   effects, made before its [`done`](Mailbox::done), are visible to the waiter (the
//!   mutex orders them).

use revmap_rmap::sync::{lock, thread, wait, Arc, Condvar, Mutex};

/// The mailbox's state, under its mutex.
#[derive(Debug)]
struct Slot<J> {
    /// Posted, not yet taken.
    job: Option<J>,
    /// The worker is running a job it took.
    busy: bool,
    /// Exit requested.
    stop: bool,
    /// The worker thread is up (its start-up allocations are done).
    started: bool,
}

/// A one-job mailbox between the hypercall side and one worker thread (module docs).
#[derive(Debug)]
pub struct Mailbox<J> {
    slot: Mutex<Slot<J>>,
    changed: Condvar,
}

impl<J> Default for Mailbox<J> {
    fn default() -> Self {
        Self::new()
    }
}

impl<J> Mailbox<J> {
    /// An empty mailbox.
    pub fn new() -> Self {
        Self {
            slot: Mutex::new(Slot {
                job: None,
                busy: false,
                stop: false,
                started: false,
            }),
            changed: Condvar::new(),
        }
    }

    /// Post `job` for the worker (allocates nothing). Returns the job it replaces, if
    /// the worker had not taken that one yet; after [`stop`](Self::stop) the job is
    /// handed back unrun.
    pub fn post(&self, job: J) -> Option<J> {
        let mut s = lock(&self.slot);
        if s.stop {
            return Some(job);
        }
        let old = s.job.replace(job);
        drop(s);
        self.changed.notify_all();
        old
    }

    /// The worker's side: block until a job is posted (take it and become busy) or a
    /// stop is requested (`None`). Call [`done`](Self::done) after running the job.
    pub fn take(&self) -> Option<J> {
        self.take_with::<true>()
    }

    /// [`take`](Self::take), or with `ATOMIC_WAIT == false` the broken variant that
    /// tests for work in one critical section and goes to sleep in another (a post in
    /// between is a lost wake-up). Only the `loom_worker` model calls the broken one.
    #[doc(hidden)]
    pub fn take_with<const ATOMIC_WAIT: bool>(&self) -> Option<J> {
        let mut s = lock(&self.slot);
        loop {
            if s.stop {
                return None;
            }
            if let Some(job) = s.job.take() {
                s.busy = true;
                drop(s);
                // Waiters of `wait_idle` see "taken" (still busy): nothing to tell them.
                return Some(job);
            }
            if !ATOMIC_WAIT {
                drop(s);
                s = lock(&self.slot);
            }
            s = wait(&self.changed, s);
        }
    }

    /// Whether a job is waiting to be taken or a stop was requested: a worker doing
    /// optional work between jobs (scrubbing retired tables) stops when this is true.
    pub fn has_work(&self) -> bool {
        let s = lock(&self.slot);
        s.job.is_some() || s.stop
    }

    /// The worker's side: the job it took is finished (its effects are published).
    pub fn done(&self) {
        lock(&self.slot).busy = false;
        self.changed.notify_all();
    }

    /// Ask the worker to exit once its current job (if any) is done; returns a queued
    /// job, which will not run.
    pub fn stop(&self) -> Option<J> {
        let mut s = lock(&self.slot);
        s.stop = true;
        let queued = s.job.take();
        drop(s);
        self.changed.notify_all();
        queued
    }

    /// Block until no job is queued or running (or the worker was stopped with nothing
    /// running).
    pub fn wait_idle(&self) {
        let mut s = lock(&self.slot);
        while s.busy || (s.job.is_some() && !s.stop) {
            s = wait(&self.changed, s);
        }
    }
}

/// Spawn the worker thread serving the mailbox `mailbox(&owner)`: it runs `run` on every
/// job it takes until a stop is requested, and `idle` whenever it is about to wait for
/// one (after starting and after each job: optional work, which should return once
/// [`Mailbox::has_work`] is true). Returns once the thread is up, so that everything
/// its start-up allocates is allocated by the caller's set-up, not at some later point
/// (a hypercall's). `Err` if the thread cannot be started (nothing runs).
pub fn spawn<S, J>(
    owner: Arc<S>,
    mailbox: fn(&S) -> &Mailbox<J>,
    mut run: impl FnMut(&Arc<S>, J) + Send + 'static,
    idle: fn(&S),
) -> std::io::Result<thread::JoinHandle<()>>
where
    S: Send + Sync + 'static,
    J: Send + 'static,
{
    // The thread's name, allocated fallibly (the spawn itself has no fallible form).
    const NAME: &str = "hpt-resize-prepare";
    let mut name = String::new();
    name.try_reserve_exact(NAME.len())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
    name.push_str(NAME);
    let waiter = Arc::clone(&owner);
    let handle = thread::Builder::new().name(name).spawn(move || {
        let mb = mailbox(&owner);
        lock(&mb.slot).started = true;
        mb.changed.notify_all();
        idle(&owner);
        while let Some(job) = mb.take() {
            run(&owner, job);
            mb.done();
            idle(&owner);
        }
    })?;
    let mb = mailbox(&waiter);
    let mut s = lock(&mb.slot);
    while !s.started {
        s = wait(&mb.changed, s);
    }
    drop(s);
    Ok(handle)
}
