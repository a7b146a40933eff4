//! Loom model of the preparation worker's handshake (`revmap_resize::worker`): the
//! hypercall side posts a job (H_RESIZE_HPT_PREPARE), waits until the worker is idle
//! (the replay's `wait_prepared`, the tests' `wait_workers`), then stops and joins the
//! worker (the VM's drop). Whatever the interleaving: the job runs exactly once and its
//! effect is visible once `wait_idle` returns, a job posted over one not yet taken
//! replaces it (the superseded one never runs), and the worker exits on `stop` (the
//! join returns: no leaked thread).
//!
//! The should-fail variant runs the worker loop with `Mailbox::take_with::<false>`
//! (never called by production code), which tests for work and goes to sleep in two
//! critical sections: loom finds the post that lands in between, a lost wake-up: the
//! worker sleeps on a queued job and the poster, which waits for the job's effect with a
//! bounded number of yields, asserts.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=3
//! cargo test -p revmap-resize --release --test loom_worker`.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use revmap_resize::worker::{self, Mailbox};
use revmap_rmap::sync::{thread, Arc};

/// What the worker's owner holds: the mailbox and the jobs' observable effect.
struct Owner {
    jobs: Mailbox<u64>,
    /// Sum of the jobs run (each job adds its value).
    ran: AtomicU64,
    /// The worker loop has returned.
    exited: AtomicBool,
}

#[path = "../../hpt/tests/common/mod.rs"]
mod common;
use common::loom_model;

/// Yields the poster allows the worker (module docs of the model above).
const SPINS: u32 = 16;

fn run_job(o: &Owner, j: u64) {
    // ORDERING: Relaxed: the model's observation; the mailbox mutex (`done`, then
    // `wait_idle`) orders it before the poster's check.
    o.ran.fetch_add(j, Ordering::Relaxed);
}

/// The idle work of the model's worker: only the check that ends real idle work (the
/// resize worker's scrubbing) when a job is posted.
fn idle(o: &Owner) {
    let _ = o.jobs.has_work();
}

/// The worker loop of `worker::spawn`, with the take variant under test.
fn worker_loop<const ATOMIC_WAIT: bool>(o: &Owner) {
    idle(o);
    while let Some(j) = o.jobs.take_with::<ATOMIC_WAIT>() {
        run_job(o, j);
        o.jobs.done();
        idle(o);
    }
    // ORDERING: Relaxed: the model's observation; the join orders it anyway.
    o.exited.store(true, Ordering::Relaxed);
}

/// Yield until `done` holds, at most [`SPINS`] times; false if it never did.
fn spin_until(done: impl Fn() -> bool) -> bool {
    for _ in 0..SPINS {
        if done() {
            return true;
        }
        revmap_rmap::sync::yield_now();
    }
    done()
}

fn handshake_model<const ATOMIC_WAIT: bool>() {
    loom_model(|| {
        let o = Arc::new(Owner {
            jobs: Mailbox::new(),
            ran: AtomicU64::new(0),
            exited: AtomicBool::new(false),
        });
        let w = {
            let o = o.clone();
            thread::spawn(move || worker_loop::<ATOMIC_WAIT>(&o))
        };
        assert!(o.jobs.post(1).is_none(), "nothing was queued");
        // Wait for the job's effect by yielding a bounded number of times rather than
        // blocking: each yield lets the worker run, and loom preempts it at most
        // LOOM_MAX_PREEMPTIONS times, so a worker that can run always has; one asleep
        // on a lost wake-up never does, which is then an assertion in this thread (a
        // deadlock detected in the worker's thread would abort the test process).
        // ORDERING: Relaxed: the model's observation (see `run_job`).
        let ran = spin_until(|| o.ran.load(Ordering::Relaxed) != 0);
        assert!(ran, "the posted job never ran: a lost wake-up");
        o.jobs.wait_idle();
        assert_eq!(
            o.ran.load(Ordering::Relaxed),
            1,
            "the posted job has not run when wait_idle returned"
        );
        assert!(o.jobs.stop().is_none());
        // The same for the stop request (joining a worker asleep on a lost wake-up
        // would deadlock).
        let exited = spin_until(|| o.exited.load(Ordering::Relaxed));
        assert!(exited, "the worker never saw the stop: a lost wake-up");
        w.join().expect("the worker exits on stop");
    });
}

#[test]
fn a_posted_job_runs_once_before_wait_idle_returns_and_the_worker_exits_on_stop() {
    handshake_model::<true>();
}

#[test]
#[should_panic(expected = "a lost wake-up")]
fn testing_and_sleeping_in_two_critical_sections_loses_a_wake_up() {
    handshake_model::<false>();
}

/// Two posts racing the worker, through the production `worker::spawn` (with its
/// start-up handshake): the second replaces the first if the worker has not taken it
/// yet, and then exactly the jobs not handed back run.
#[test]
fn a_superseded_job_never_runs_and_every_other_one_does() {
    loom_model(|| {
        let o = Arc::new(Owner {
            jobs: Mailbox::new(),
            ran: AtomicU64::new(0),
            exited: AtomicBool::new(false),
        });
        let w = worker::spawn(o.clone(), |o: &Owner| &o.jobs, |o, j| run_job(o, j), idle)
            .expect("spawn");
        assert!(o.jobs.post(1).is_none());
        let replaced = o.jobs.post(2);
        o.jobs.wait_idle();
        let expected = match replaced {
            Some(1) => 2,
            None => 3,
            other => panic!("post handed back {other:?}"),
        };
        assert_eq!(o.ran.load(Ordering::Relaxed), expected);
        assert!(o.jobs.stop().is_none());
        w.join().expect("the worker exits on stop");
    });
}
