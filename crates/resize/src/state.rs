//! The PREPARE/COMMIT state machine, the preparation jobs run by the VM's persistent
//! worker ([`crate::worker`]), and the stop-the-world commit (rehash + pivot) of a
//! [`Vm`]. See the parent module for the ownership rules (at most one pending request;
//! who frees it) and the commit invariants.

use super::rehash::rehash_index;
use super::{long_busy_for_ms, ResizeError, ResizeMode, PREPARE_ESTIMATE_MS};
use crate::flavour::ResizeFlavour;
use crate::worker::{self, Mailbox};
use alloc::vec::Vec;
use revmap_host::Memslots;
use revmap_hpt::hash::{HptGeometry, MAX_HPT_ORDER, MAX_PAPR_HPT_ORDER, MIN_HPT_ORDER};
use revmap_hpt::hcall::*;
use revmap_hpt::hpte::{HpteR, HpteV};
use revmap_hpt::resize::track::TrackBitmap;
use revmap_hpt::table::Hpt;
use revmap_hpt::{Flavour, HptResizer, PaprError, Vm, VmConfig};
use revmap_rmap::sync::{lock, thread, wait, Arc, AtomicU64, Condvar, Mutex, Ordering};

use revmap_rmap::{Ptex, PAGE_SHIFT};

/// Counters proving the ownership rules (no leak, no double free): every table a
/// worker allocates is eventually either installed by a commit or freed exactly once.
#[derive(Debug, Default)]
pub struct ResizeStats {
    /// Preparations started (jobs the worker took; a job superseded before the worker
    /// took it never starts).
    pub started: AtomicU64,
    /// Tables successfully allocated by workers.
    pub allocated: AtomicU64,
    /// Prepared tables freed (detached, cancelled, failed commit, or stale worker).
    pub freed: AtomicU64,
    /// Of `freed`: freed by a worker whose request had been detached meanwhile.
    pub freed_by_worker: AtomicU64,
    /// Prepared tables installed by a successful commit.
    pub installed: AtomicU64,
    /// Preparations that have finished (published or freed their result).
    pub finished: AtomicU64,
}

impl ResizeStats {
    fn bump(c: &AtomicU64) {
        // ORDERING: Relaxed: statistics; tests read them after joining/waiting.
        c.fetch_add(1, Ordering::Relaxed);
    }
    fn get(c: &AtomicU64) -> u64 {
        // ORDERING: Relaxed: statistics.
        c.load(Ordering::Relaxed)
    }
    /// Prepared tables currently alive (allocated, neither freed nor installed).
    pub fn live(&self) -> u64 {
        Self::get(&self.allocated) - Self::get(&self.freed) - Self::get(&self.installed)
    }
}

pub use super::hooks::PrecopyHold;
use super::hooks::TestHooks;

/// A prepared table with its accounting: dropping it counts a free.
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) hpt: Option<Hpt>,
    /// The change bitmap a pre-copy commit tracks the *current* table with, sized for
    /// it and allocated with the new table (so the commit allocates nothing for it).
    pub(super) track: Option<TrackBitmap>,
    stats: Arc<Shared>,
}

impl Prepared {
    /// Whether the pre-copy commit can run: it has a change bitmap for a current table
    /// of `npte` entries.
    pub(super) fn tracks(&self, npte: u64) -> bool {
        self.track.as_ref().is_some_and(|t| t.fits(npte))
    }
}

impl Prepared {
    pub(super) fn install(mut self) -> Option<Hpt> {
        ResizeStats::bump(&self.stats.stats.installed);
        self.hpt.take()
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if self.hpt.take().is_some() {
            ResizeStats::bump(&self.stats.stats.freed);
        }
    }
}

/// The pending request (KVM's `kvm->arch.resize_hpt` with its `error` field as state).
#[derive(Debug, Default)]
enum Pending {
    /// Nothing pending.
    #[default]
    Idle,
    /// The worker is allocating (or will) and owns the table (`error == -EBUSY`).
    Allocating {
        /// Requested order.
        order: u32,
        /// Request identity: a worker publishes only if it is still current.
        id: u64,
    },
    /// Prepared (`error == 0`): the table belongs to the pending state.
    Ready {
        /// Order.
        order: u32,
        /// The zeroed, inactive new table.
        table: Prepared,
    },
    /// The allocation failed (`error < 0`).
    Failed {
        /// Order.
        order: u32,
        /// The failure.
        err: ResizeError,
    },
}

impl Pending {
    fn order(&self) -> Option<u32> {
        match self {
            Self::Idle => None,
            Self::Allocating { order, .. }
            | Self::Ready { order, .. }
            | Self::Failed { order, .. } => Some(*order),
        }
    }
}

#[derive(Debug)]
struct Shared {
    pending: Mutex<Pending>,
    changed: Condvar,
    next_id: AtomicU64,
    /// Test hooks (zero-sized without the `test-hooks` feature).
    hooks: TestHooks,
    stats: ResizeStats,
    /// The worker's mailbox (PREPARE posts the job; allocation-free).
    jobs: Mailbox<Job>,
    /// The commit mode (`ResizeMode as u64`).
    mode: AtomicU64,
    /// The last commit's pause (gate closed -> gate reopened), in nanoseconds.
    last_pause_ns: AtomicU64,
}

/// One preparation for the worker: allocate a table of `order` (and a change bitmap
/// for the current table of `old_npte` entries) for request `id`.
#[derive(Debug, Clone, Copy)]
struct Job {
    order: u32,
    id: u64,
    flavour: Flavour,
    old_npte: u64,
}

/// The resize state of one VM (`mmu_setup_lock` and the pending request) and its
/// persistent preparation worker, which exits when the controller is dropped.
pub struct ResizeCtl {
    shared: Arc<Shared>,
    /// The worker, joined on drop.
    worker: Option<thread::JoinHandle<()>>,
    /// QEMU's `spapr_hpt_shift_for_ramsize` of the VM's RAM.
    ram_order: u32,
}

impl core::fmt::Debug for ResizeCtl {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ResizeCtl")
            .field("shared", &self.shared)
            .field("ram_order", &self.ram_order)
            .finish_non_exhaustive()
    }
}

impl ResizeCtl {
    /// The resize controller of a VM of `cfg` (its RAM-derived order is QEMU's
    /// [`hpt_shift_for_ramsize`](crate::hpt_shift_for_ramsize)); see [`new`](Self::new).
    pub fn for_config(cfg: &VmConfig) -> Result<Self, ResizeError> {
        Self::new(crate::hpt_shift_for_ramsize(cfg.ram_bytes))
    }

    /// Resize state for a VM whose RAM-derived order is `ram_order`, with its
    /// preparation worker started (VM set-up, like KVM's workqueue: no hypercall starts
    /// a thread). [`ResizeError::NoMem`] if the worker cannot be started.
    pub fn new(ram_order: u32) -> Result<Self, ResizeError> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::Idle),
            changed: Condvar::new(),
            next_id: AtomicU64::new(1),
            hooks: TestHooks::new(),
            stats: ResizeStats::default(),
            jobs: Mailbox::new(),
            mode: AtomicU64::new(ResizeMode::DEFAULT as u64),
            last_pause_ns: AtomicU64::new(0),
        });
        let worker = worker::spawn(
            Arc::clone(&shared),
            |s: &Shared| &s.jobs,
            prepare_job,
            scrub_while_idle,
        )
        .map_err(|_| ResizeError::NoMem)?;
        Ok(Self {
            shared,
            worker: Some(worker),
            ram_order,
        })
    }

    /// Allocation and ownership counters.
    pub fn stats(&self) -> &ResizeStats {
        &self.shared.stats
    }

    /// How COMMIT runs (see [`ResizeMode`]); takes effect at the next COMMIT.
    pub fn set_mode(&self, mode: ResizeMode) {
        // ORDERING: Relaxed: a configuration value read by the next COMMIT, which
        // takes `mmu_setup_lock` after any caller that needs it ordered.
        self.shared.mode.store(mode as u64, Ordering::Relaxed);
    }

    /// The commit mode in effect.
    pub fn mode(&self) -> ResizeMode {
        // ORDERING: Relaxed: see `set_mode`.
        ResizeMode::from_u64(self.shared.mode.load(Ordering::Relaxed))
    }

    /// The pause of the last successful or failed COMMIT that closed the gate: from
    /// closing the gate (vCPUs stopped) to reopening it, in nanoseconds.
    pub fn last_pause_ns(&self) -> u64 {
        // ORDERING: Relaxed: a measurement, written by the committer before it
        // returns from the hypercall the reader waited for.
        self.shared.last_pause_ns.load(Ordering::Relaxed)
    }

    pub(super) fn record_pause(&self, ns: u64) {
        // ORDERING: Relaxed: see `last_pause_ns`.
        self.shared.last_pause_ns.store(ns, Ordering::Relaxed);
    }

    /// The order the RAM size suggests (H_RESOURCE above it + 1).
    pub fn ram_order(&self) -> u32 {
        self.ram_order
    }

    /// Make the next preparation's allocation fail (H_NO_MEM), for tests.
    #[cfg(feature = "test-hooks")]
    pub fn inject_alloc_failure(&self) {
        self.shared.hooks.inject_alloc_failure();
    }

    /// Hold (true) or release (false) the preparation worker before it allocates, so
    /// tests can act while a preparation is in progress.
    #[cfg(feature = "test-hooks")]
    pub fn hold_preparation(&self, hold: bool) {
        self.shared.hooks.hold_preparation(hold);
    }

    /// Hold every pre-copy COMMIT at `at` (or release with [`PrecopyHold::None`]), so
    /// tests can change the guest while the commit copies: before the re-copy rounds
    /// (the rounds must pick the changes up) or just before the final stop (the stop
    /// must re-apply them).
    #[cfg(feature = "test-hooks")]
    pub fn hold_precopy_commit(&self, at: PrecopyHold) {
        self.shared.hooks.hold_precopy_commit(at);
    }

    /// Block until a pre-copy COMMIT is held by [`hold_precopy_commit`](Self::hold_precopy_commit).
    #[cfg(feature = "test-hooks")]
    pub fn wait_precopy_commit_held(&self) {
        self.shared.hooks.wait_precopy_commit_held();
    }

    /// Whether a pre-copy COMMIT is held now (see
    /// [`hold_precopy_commit`](Self::hold_precopy_commit)).
    #[cfg(feature = "test-hooks")]
    pub fn precopy_commit_held(&self) -> bool {
        self.shared.hooks.precopy_commit_held()
    }

    /// The committer's side of the pre-copy hold hook (a no-op without `test-hooks`).
    #[inline(always)]
    pub(super) fn precopy_hold_point(&self, here: PrecopyHold) {
        self.shared.hooks.precopy_point(here);
    }

    /// Block until no preparation is in progress (the pending request is not
    /// `Allocating`). Used by the replay before a recorded PREPARE success.
    pub fn wait_prepared(&self) {
        let mut p = lock(&self.shared.pending);
        while matches!(*p, Pending::Allocating { .. }) {
            p = wait(&self.shared.changed, p);
        }
    }

    /// Block until the worker is idle: every preparation posted has finished or was
    /// superseded before it started (tests: leak accounting).
    pub fn wait_workers(&self) {
        self.shared.jobs.wait_idle();
    }

    /// Whether the preparation worker thread is still running (it exits only when the
    /// controller is dropped; tests).
    pub fn worker_running(&self) -> bool {
        #[cfg(not(any(loom, shuttle)))]
        return self.worker.as_ref().is_some_and(|w| !w.is_finished());
        // (The model checkers' join handles cannot tell; the worker runs until joined.)
        #[cfg(any(loom, shuttle))]
        return self.worker.is_some();
    }

    /// `resize_hpt_release`: detach the pending request. A `Ready` table is freed here
    /// (by dropping it); an `Allocating` one is only detached: its worker frees it.
    fn release(p: &mut Pending) {
        *p = Pending::Idle;
    }

    /// Post the preparation of a table of `order` to the worker (allocates nothing).
    fn start(&self, p: &mut Pending, order: u32, flavour: Flavour, old_npte: u64) -> i64 {
        // ORDERING: Relaxed: a unique id; published to the worker by the mailbox mutex.
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        *p = Pending::Allocating { order, id };
        let job = Job {
            order,
            id,
            flavour,
            old_npte,
        };
        // A job the worker had not taken yet is superseded: its request was released.
        match self.shared.jobs.post(job) {
            Some(Job { id: back, .. }) if back == id => {
                // Stopped (the controller is being dropped): nothing will run it.
                *p = Pending::Idle;
                H_NO_MEM
            }
            _ => long_busy_for_ms(PREPARE_ESTIMATE_MS),
        }
    }
}

/// A VM going away releases its pending request (`resize_hpt_release` at teardown): a
/// `Ready` table holds the shared state alive (its `Prepared` counts into the shared
/// statistics), so without this the table and the state leak in a cycle.
///
/// Then the worker is stopped and joined: it finishes (and frees) a preparation in
/// progress, and no thread outlives the VM.
impl Drop for ResizeCtl {
    fn drop(&mut self) {
        Self::release(&mut lock(&self.shared.pending));
        let _unrun = self.shared.jobs.stop();
        #[cfg(feature = "test-hooks")]
        self.shared.hooks.hold_preparation(false);
        if let Some(w) = self.worker.take() {
            // A worker that panicked has nothing left to free.
            drop(w.join());
        }
    }
}

/// `resize_hpt_prepare_work`, run by the worker: allocate outside the lock (the table
/// and the change bitmap, both fallibly: a failure is the request's H_NO_MEM), then
/// publish if still current, else free (the worker owns a detached request).
fn prepare_job(shared: &Arc<Shared>, job: Job) {
    let Job {
        order,
        id,
        flavour,
        old_npte,
    } = job;
    ResizeStats::bump(&shared.stats.started);
    shared.hooks.preparation_point();
    let fail = shared.hooks.take_alloc_failure();
    let res = if fail {
        Err(ResizeError::NoMem)
    } else if flavour.resize_table_reads_zero_until_written() {
        Hpt::new_pristine(order).map_err(|_| ResizeError::NoMem)
    } else {
        Hpt::new(order).map_err(|_| ResizeError::NoMem)
    };
    let res = res.and_then(|hpt| {
        let track = TrackBitmap::new(old_npte).map_err(|_| ResizeError::NoMem)?;
        ResizeStats::bump(&shared.stats.allocated);
        Ok(Prepared {
            hpt: Some(hpt),
            track: Some(track),
            stats: shared.clone(),
        })
    });
    let mut p = lock(&shared.pending);
    let current = matches!(*p, Pending::Allocating { id: cur, .. } if cur == id);
    if current {
        *p = match res {
            Ok(table) => Pending::Ready { order, table },
            Err(err) => Pending::Failed { order, err },
        };
    } else if let Ok(t) = res {
        // Detached while we allocated: only the worker may free it (KVM's resize UAF fix).
        ResizeStats::bump(&shared.stats.freed_by_worker);
        drop(t);
    }
    ResizeStats::bump(&shared.stats.finished);
    drop(p);
    shared.changed.notify_all();
}

/// The worker's idle work (at start-up and after each preparation): zero retired tables
/// in the table pool until a job is posted. The next preparation of their order then
/// takes a clean table instead of zeroing one while the guest waits (a table retired by
/// a commit is zeroed here, between resizes, on the worker's time).
fn scrub_while_idle(shared: &Shared) {
    #[cfg(not(any(loom, shuttle)))]
    while !shared.jobs.has_work() && revmap_hpt::pool::global().scrub_one() {}
    #[cfg(any(loom, shuttle))]
    let _ = shared;
}

/// Nanoseconds since `t0`, saturating.
pub(super) fn elapsed_ns(t0: std::time::Instant) -> u64 {
    u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One resize operation on a VM: the VM (its methods through `Deref`) and its
/// controller.
pub(crate) struct Op<'a> {
    pub(crate) vm: &'a Vm,
    pub(crate) ctl: &'a ResizeCtl,
}

impl core::ops::Deref for Op<'_> {
    type Target = Vm;
    fn deref(&self) -> &Vm {
        self.vm
    }
}

impl HptResizer for ResizeCtl {
    fn prepare(&self, vm: &Vm, flags: u64, shift: u64) -> Result<(), PaprError> {
        PaprError::check(Op { vm, ctl: self }.resize_prepare(flags, shift))
    }

    fn commit(&self, vm: &Vm, flags: u64, shift: u64) -> Result<(), PaprError> {
        PaprError::check(Op { vm, ctl: self }.resize_commit(flags, shift))
    }

    fn wait_prepared(&self) {
        ResizeCtl::wait_prepared(self);
    }

    fn as_any(&self) -> &dyn core::any::Any {
        self
    }
}

impl Op<'_> {
    /// Both commit paths, QEMU flavour: link a formerly VALID bolted entry, locked at
    /// `g` in the new table, into its frame's ring and leave it VALID with dword 0 `v`,
    /// or ABSENT if it cannot be chained. This is H_ENTER's protocol
    /// (`kvmppc_do_h_enter`): sample `mmu_invalidate_seq` before translating the guest
    /// frame to the host page, then re-check it with the rmap lock held
    /// (`mmu_invalidate_retry`); an invalidation that ran or is running in between, a
    /// host page that is no longer present, or one that is no longer the page the
    /// entry names, demotes the entry to ABSENT (a later fault re-validates it).
    pub(super) fn rechain_bolted(
        &self,
        new: &Hpt,
        slots: &Memslots,
        mut g: revmap_hpt::table::HpteGuard<'_>,
        v: u64,
    ) {
        let new_rev = new.revmap();
        let p = g.ptex();
        let gr = new_rev.guest_rpte(p.0);
        let seq = self.invalidate_seq().sample();
        let rmap = self.entry_page(v, gr).and_then(|(gfn, actual)| {
            let s = slots.lookup(gfn).filter(|s| !s.is_invalid())?;
            if self.invalidate_seq().in_progress() {
                return None;
            }
            let pfn = s.host_pfn(gfn)?;
            (HpteR(g.r()).page_addr(actual) >> PAGE_SHIFT == pfn).then_some(())?;
            s.rmap(gfn)
        });
        let demoted = (v & !HpteV::VALID) | HpteV::ABSENT;
        match rmap {
            Some(rm) => {
                let rg = rm.lock();
                if self.invalidate_seq().retry(seq) {
                    drop(rg);
                    g.set_v(demoted);
                } else {
                    // Pre-set real R/C only where the rmap records them (else hardware).
                    let rc = rg.word().rc();
                    new_rev.link(rg, p.0);
                    g.set_r(g.r() | (rc & HpteR::RC));
                    g.set_v(v);
                }
            }
            None => g.set_v(demoted),
        }
        drop(g);
    }
}

/// Where a bolted entry goes, decided before anything is changed.
struct Move {
    old: Ptex,
    new: Ptex,
    /// VALID (mapped, chained) in the old table before the commit.
    valid: bool,
}

impl Op<'_> {
    /// H_RESIZE_HPT_PREPARE (QEMU's checks, then `kvm_vm_ioctl_resize_hpt_prepare`). Runs
    /// outside the vCPU gate.
    pub(crate) fn resize_prepare(&self, flags: u64, shift: u64) -> i64 {
        let ctl = self.ctl;
        if flags != 0 {
            return ResizeError::Invalid.papr();
        }
        if shift != 0
            && !(u64::from(MIN_HPT_ORDER)..=u64::from(MAX_PAPR_HPT_ORDER)).contains(&shift)
        {
            return ResizeError::Invalid.papr();
        }
        // In range 0..=46 now.
        let shift = shift as u32;
        if shift > ctl.ram_order + 1 || shift > MAX_HPT_ORDER {
            return ResizeError::Resource.papr();
        }
        let f = self.flavour();
        let mut p = lock(&ctl.shared.pending);
        if p.order() == Some(shift) {
            match &*p {
                Pending::Allocating { .. } => return long_busy_for_ms(PREPARE_ESTIMATE_MS),
                Pending::Ready { .. } => return H_SUCCESS,
                Pending::Failed { err, .. } => {
                    let code = err.papr();
                    if !f.resize_prepare_keeps_failed() {
                        ResizeCtl::release(&mut p);
                    }
                    return code;
                }
                Pending::Idle => {}
            }
        }
        ResizeCtl::release(&mut p);
        if shift == 0 {
            return H_SUCCESS;
        }
        // The current table cannot change meanwhile: COMMIT holds `pending` throughout.
        let old_npte = self.hpt().geometry().npte();
        let r = ctl.start(&mut p, shift, f, old_npte);
        drop(p);
        ctl.shared.changed.notify_all();
        r
    }

    /// H_RESIZE_HPT_COMMIT (`kvm_vm_ioctl_resize_hpt_commit`). Runs outside the vCPU
    /// gate; stops every vCPU for the rehash and pivot.
    pub(crate) fn resize_commit(&self, flags: u64, shift: u64) -> i64 {
        let ctl = self.ctl;
        let f = self.flavour();
        if flags != 0 {
            return ResizeError::Invalid.papr();
        }
        if f.resize_commit_checks_shift()
            && shift != 0
            && !(u64::from(MIN_HPT_ORDER)..=u64::from(MAX_PAPR_HPT_ORDER)).contains(&shift)
        {
            return ResizeError::Invalid.papr();
        }
        let keep = f.resize_commit_keeps_pending_on_refusal();
        let mut p = lock(&ctl.shared.pending);
        let refusal = match &*p {
            Pending::Idle => Some(ResizeError::NoPending),
            _ if p.order().map(u64::from) != Some(shift) => Some(ResizeError::NoPending),
            Pending::Allocating { .. } => Some(ResizeError::Busy),
            Pending::Failed { err, .. } => {
                let e = *err;
                ResizeCtl::release(&mut p);
                return e.papr();
            }
            Pending::Ready { .. } => None,
        };
        if let Some(e) = refusal {
            if !keep {
                ResizeCtl::release(&mut p);
            }
            drop(p);
            ctl.shared.changed.notify_all();
            return e.papr();
        }
        // The request is always consumed from here on (COMMIT always releases it).
        let Pending::Ready { table, .. } = core::mem::take(&mut *p) else {
            return ResizeError::Io.papr();
        };
        let ret = match ctl.mode() {
            ResizeMode::PreCopy if table.tracks(self.hpt().geometry().npte()) => {
                self.commit_precopy(table)
            }
            // (A prepared table always has its bitmap for the current table: nothing but
            // a commit, which consumes the request, changes that table.)
            ResizeMode::PreCopy | ResizeMode::StopTheWorld => self.commit_stop_the_world(table),
        };
        drop(p);
        ctl.shared.changed.notify_all();
        ret
    }

    /// Close the gate, rehash, pivot or fail, reopen (module docs: # Commit).
    fn commit_stop_the_world(&self, table: Prepared) -> i64 {
        let tables = self.tables();
        let t0 = std::time::Instant::now();
        tables.close_and_drain(self.tlb());
        let ret = match self.rehash_into(table) {
            Ok(new) => match tables.pivot(new) {
                Ok(()) => {
                    self.ctl.record_pause(elapsed_ns(t0));
                    // Every TLB entry names an old-table index: flush them all.
                    self.tlb().tlbie();
                    self.bump_mmio_update();
                    H_SUCCESS
                }
                Err(_unused) => {
                    tables.reopen();
                    self.ctl.record_pause(elapsed_ns(t0));
                    ResizeError::NoMem.papr()
                }
            },
            Err(e) => {
                tables.reopen();
                self.ctl.record_pause(elapsed_ns(t0));
                e.papr()
            }
        };
        ret
    }

    /// The rehash (KVM's `resize_hpt_rehash`) from the current table into `table`. On
    /// `Err` the old table is untouched.
    fn rehash_into(&self, table: Prepared) -> Result<Hpt, ResizeError> {
        let f = self.flavour();
        let old = self.hpt();
        // The memslot snapshot of the whole rehash (the gate is closed; memslot writers
        // may publish meanwhile and wait for us to drop it).
        let slots = self.memslots();
        let (og, rev) = (old.geometry(), old.revmap());
        let Some(new) = table.hpt.as_ref() else {
            return Err(ResizeError::Io);
        };
        let ng: HptGeometry = new.geometry();
        if !self.tables().can_pivot() {
            return Err(ResizeError::NoMem);
        }
        // Phase 1: placement. Nothing of the old table changes.
        let mut moves: Vec<Move> = Vec::new();
        for (i, s) in old.slots().iter().enumerate() {
            let v = HpteV(s.load_v());
            if !v.is_used() || !v.is_bolted() {
                continue;
            }
            let p = Ptex(i as u32);
            let Some(sh) = f.page_shifts(v, HpteR(rev.guest_rpte(p.0))) else {
                return Err(ResizeError::Io);
            };
            let n = rehash_index(v, sh.base, og, p, ng);
            let Some(g) = new.lock(n) else {
                return Err(ResizeError::Io);
            };
            if HpteV(g.v()).is_used() {
                // Only bolted entries are placed, so any occupant is bolted.
                return Err(ResizeError::BoltedCollision);
            }
            g.unlock_with(HpteV::VALID); // placeholder, rewritten in phase 2
            moves.try_reserve(1).map_err(|_| ResizeError::NoMem)?;
            moves.push(Move {
                old: p,
                new: n,
                valid: v.is_valid(),
            });
        }
        // Phase 2: transfer. Unmap every VALID entry (R/C harvested), copy bolted ones.
        let absent = f.resize_bolted_arrive_absent();
        for (i, s) in old.slots().iter().enumerate() {
            let v = s.load_v();
            if v & HpteV::VALID == 0 {
                continue;
            }
            let p = Ptex(i as u32);
            let Some(mut g) = old.lock(p) else { continue };
            g.set_v((v & !HpteV::VALID) | HpteV::ABSENT);
            let hw_r = g.r();
            self.remove_revmap_chain(old, &slots, p, v, hw_r);
            g.set_r(hw_r & !HpteR::RC);
            drop(g);
        }
        let new_rev = new.revmap();
        for m in &moves {
            let Some(s) = old.slot(m.old) else { continue };
            let v = s.load_v();
            let r = s.load_r();
            let gr = rev.guest_rpte(m.old.0);
            // A formerly VALID entry is ABSENT in the old table now (phase 2).
            let (nv, nr) = match (m.valid, absent) {
                (false, _) => (v, r),
                // KVM: ABSENT, key cleared (a paged-out entry must never look like MMIO).
                (true, true) => (v, r & !HpteR::KEY),
                (true, false) => ((v & !HpteV::ABSENT) | HpteV::VALID, r),
            };
            let Some(g) = new.lock(m.new) else { continue };
            new_rev.set_guest_rpte(m.new.0, gr);
            g.set_r(nr);
            g.unlock_with(nv);
            new.mark_written(m.new);
        }
        // Phase 3 (QEMU flavour): re-chain the VALID bolted entries in the new table.
        if !absent {
            for m in &moves {
                let Some(g) = new.lock(m.new) else {
                    continue;
                };
                let v = g.v();
                if v & HpteV::VALID == 0 {
                    continue;
                }
                self.rechain_bolted(new, &slots, g, v);
            }
        }
        table.install().ok_or(ResizeError::Io)
    }
}

#[cfg(all(test, not(any(loom, shuttle))))]
mod tests {
    use super::*;

    /// Regression (found by the `ppc_hcalls` fuzz target): a VM dropped with a prepared
    /// but uncommitted resize leaked the prepared table and the resize state.
    #[test]
    fn dropping_the_controller_frees_a_ready_table() {
        let ctl = ResizeCtl::new(20).unwrap();
        let weak = Arc::downgrade(&ctl.shared);
        let table = Prepared {
            hpt: Some(Hpt::new(MIN_HPT_ORDER).unwrap()),
            track: None,
            stats: ctl.shared.clone(),
        };
        *lock(&ctl.shared.pending) = Pending::Ready {
            order: MIN_HPT_ORDER,
            table,
        };
        drop(ctl);
        assert!(weak.upgrade().is_none(), "resize state leaked");
    }

    /// The worker holds the shared state until it exits: once the controller's drop
    /// returns, it has exited (joined) and released it, also when a preparation was
    /// queued and the worker held before allocating it.
    #[test]
    fn dropping_the_controller_stops_and_joins_the_worker() {
        let ctl = ResizeCtl::new(20).unwrap();
        assert!(ctl.worker_running());
        let weak = Arc::downgrade(&ctl.shared);
        assert_eq!(Arc::strong_count(&ctl.shared), 2, "controller and worker");
        drop(ctl);
        assert!(
            weak.upgrade().is_none(),
            "the worker outlived its controller"
        );
    }

    #[cfg(feature = "test-hooks")]
    #[test]
    fn dropping_the_controller_with_a_held_preparation_frees_it() {
        let ctl = ResizeCtl::new(20).unwrap();
        let weak = Arc::downgrade(&ctl.shared);
        ctl.hold_preparation(true);
        {
            let mut p = lock(&ctl.shared.pending);
            assert!(is_long_busy(ctl.start(
                &mut p,
                MIN_HPT_ORDER,
                Flavour::Kvm,
                1 << 14
            )));
        }
        drop(ctl);
        assert!(
            weak.upgrade().is_none(),
            "the worker outlived its controller"
        );
    }
}
