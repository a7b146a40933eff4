//! `revmap run`: a whole virtualised machine's MMU at work. One thread per vCPU runs
//! the guest workload ([`crate::workload`]) through a [`revmap_hpt::VcpuRun`] handle and its own
//! [`VcpuMmu`]; the host actors ([`crate::actors`]: memory pressure, aging) run on
//! their own threads; the controller (the calling thread) ticks every
//! [`TICK`], runs one live-migration dirty-log round per tick, performs the resize
//! schedule (PREPARE polled while the vCPUs run, COMMIT through its own run handle with
//! the vCPUs stopped, as Linux's `stop_machine`), and runs the invariant checker at
//! quiescent points (vCPUs parked, actors paused) periodically, after each resize and
//! at the end. The run ends after `duration_secs`, or after `stop_after_hcalls`
//! hypercalls if set, or when the progress callback says stop (SIGINT).
//!
//! # Invariants
//!
//! * A parked vCPU has paused its run handle (it is out of the gate), so neither a
//!   resize commit nor a memslot update waits for it.
//! * When [`Quiesce::park_all`] returns, every live vCPU thread is parked between
//!   guest operations and starts none until [`Quiesce::resume`].
//! * The controller's run handle uses vCPU id `vcpus` (no worker uses it).
//! * Atomics come from `revmap_rmap::sync`; each ordering is explained where used.

use crate::actors::{ActorConfig, ActorPanicked, HostActors, HostOps, Migration};
use crate::host::HostMmu;
use crate::report::Verdict;
use crate::report::{HcallStats, Percentiles};
use crate::scenario::Scenario;
use crate::workload::GuestCpu;
use revmap_hpt::hcall::{is_long_busy, H_RESIZE_HPT_COMMIT, H_RESIZE_HPT_PREPARE, H_SUCCESS};
use revmap_hpt::mmu::VcpuMmu;
use revmap_hpt::{Flavour, HptError, HypercallPort, VcpuId, VcpuIdError, Vm, VmConfig};
use revmap_rmap::sync::{thread, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use revmap_trace::HcallKind;
use serde::Serialize;
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// Controller tick: progress, one migration round, resize and check scheduling.
pub const TICK: Duration = Duration::from_millis(100);

/// Why a run could not complete.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The VM or a vCPU MMU could not be created.
    #[error("cannot create the VM: {0}")]
    Vm(#[from] HptError),
    /// A vCPU id past the supported count.
    #[error(transparent)]
    VcpuId(#[from] VcpuIdError),
    /// The histograms could not be created.
    #[error("cannot create the statistics: {0}")]
    Stats(#[from] hdrhistogram::CreationError),
    /// A host actor panicked.
    #[error(transparent)]
    Actor(#[from] ActorPanicked),
    /// A vCPU thread panicked.
    #[error("vCPU thread {0} panicked")]
    Vcpu(usize),
}

/// Progress reported to the caller every tick (deterministic mode: every step). The
/// caller's callback returns [`ControlFlow::Break`] to stop the run early (e.g. on
/// SIGINT): the actors are stopped, the checker runs and the report is marked
/// `interrupted`.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Seconds elapsed.
    pub elapsed: f64,
    /// Seconds planned.
    pub duration: f64,
    /// Fraction of the run done (0..=1): by time, by hypercalls when the scenario
    /// stops after a hypercall count, by steps in deterministic mode.
    pub fraction: f64,
    /// Deterministic mode: scheduler steps done (0 otherwise).
    pub steps: u64,
    /// Hypercalls so far.
    pub hcalls: u64,
    /// Host operations so far (actors; migration rounds not included).
    pub host_ops: u64,
    /// Current HPT order.
    pub hpt_order: u32,
    /// Invariant violations so far.
    pub violations: u64,
}

impl Progress {
    /// A threaded run's progress after `elapsed` of `duration` seconds with `count`
    /// operations counted, the run ending after `by_count` of them (0: after the
    /// duration).
    pub(crate) fn threaded(
        elapsed: f64,
        duration: f64,
        (count, by_count): (u64, u64),
        host_ops: u64,
        hpt_order: u32,
        violations: u64,
    ) -> Self {
        let fraction = if by_count > 0 {
            count as f64 / by_count as f64
        } else {
            elapsed / duration
        };
        Self {
            elapsed,
            duration,
            fraction: fraction.min(1.0),
            steps: 0,
            hcalls: count,
            host_ops,
            hpt_order,
            violations,
        }
    }
}

/// One resize of the schedule.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ResizeRecord {
    /// Seconds into the run when it started (deterministic mode: the step).
    pub at_s: f64,
    /// Order before.
    pub from_order: u32,
    /// Order asked for.
    pub target_order: u32,
    /// PREPARE calls (long-busy polls + the final one).
    pub prepare_calls: u64,
    /// PREPARE's final return code.
    pub prepare_ret: i64,
    /// Time from the first PREPARE to its final answer, in ms.
    pub prepare_ms: f64,
    /// COMMIT's return code (absent if PREPARE failed).
    pub commit_ret: Option<i64>,
    /// Time to stop every vCPU, in µs.
    pub quiesce_us: f64,
    /// COMMIT duration with the vCPUs stopped (the guest-visible pause), in µs.
    pub pause_us: f64,
    /// Order after.
    pub order_after: u32,
}

/// Ring lengths of every rmap chain, walked at the end.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RingStats {
    /// Non-empty chains.
    pub chains: u64,
    /// Sum of chain lengths.
    pub members: u64,
    /// Longest chain.
    pub longest: u64,
    /// Chain length -> number of chains.
    pub histogram: BTreeMap<u64, u64>,
    /// Walk errors (a ring the walker rejected; must be 0).
    pub walk_errors: u64,
}

/// Memory of the reverse-mapping structures at the end of the run. Almost all of it
/// is fixed-size tables: the HPT and its revmap are sized by the HPT order (one 16-byte
/// entry each per HPTE slot, used or not) and the rmap array by guest RAM (one 8-byte
/// word per 4 KiB frame). A mapping adds no memory of its own: its rmap ring links
/// live in its revmap entry. `bytes_per_mapping` therefore falls as the table fills.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct MemoryStats {
    /// HPT bytes (16 per HPTE slot).
    pub hpt_bytes: u64,
    /// Revmap bytes (16 per HPTE slot).
    pub revmap_bytes: u64,
    /// Rmap words (8 per 4 KiB guest frame).
    pub rmap_bytes: u64,
    /// HPTE slots in the table (`hpt_bytes / 16`).
    pub hpte_slots: u64,
    /// VALID memslot-backed mappings (rmap chain members).
    pub mappings: u64,
    /// Fraction of the HPTE slots holding such a mapping.
    pub hpt_occupancy: f64,
    /// (hpt + revmap + rmaps) / mappings: the fixed tables shared out over the
    /// mappings present at the end.
    pub bytes_per_mapping: f64,
}

/// Migration (dirty-log) figures. Pages are 4 KiB guest frames (KVM's dirty bitmap has
/// one bit per frame), but the host tracks dirtiness per backing page: one guest store
/// dirties every 4 KiB frame of the host page it lands in
/// (`frames_per_backing_page`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MigrationStats {
    /// Rounds completed.
    pub rounds: u64,
    /// 4 KiB guest frames per host backing page (1, 16 or 4096).
    pub frames_per_backing_page: u64,
    /// Guest RAM in 4 KiB frames (the most a round can harvest).
    pub guest_frames: u64,
    /// Dirty 4 KiB frames harvested in each round.
    pub dirty_pages_per_round: Vec<u64>,
    /// Mean dirty pages per round.
    pub mean_dirty_pages: f64,
    /// Most dirty pages in one round.
    pub max_dirty_pages: u64,
}

/// One throughput sample.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Sample {
    /// Seconds into the run.
    pub t: f64,
    /// Hypercalls per second over the last tick.
    pub hcalls_per_s: f64,
}

/// The outcome of a run (also serialised as `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Scenario name.
    pub scenario: String,
    /// The run was stopped early (SIGINT): every figure covers the part that ran; the
    /// checker still ran at the end.
    pub interrupted: bool,
    /// Seed.
    pub seed: u64,
    /// Deterministic mode.
    pub deterministic: bool,
    /// Seconds run.
    pub elapsed_s: f64,
    /// vCPUs.
    pub vcpus: usize,
    /// Guest RAM bytes.
    pub ram_bytes: u64,
    /// HPT order at start and end.
    pub hpt_order: [u32; 2],
    /// Hypercalls by type.
    pub hcalls: BTreeMap<&'static str, u64>,
    /// Hypercalls per second by type.
    pub hcalls_per_s: BTreeMap<&'static str, f64>,
    /// H_NOT_FOUND results by type.
    pub hcalls_not_found: BTreeMap<&'static str, u64>,
    /// Results other than H_SUCCESS / H_NOT_FOUND by type.
    pub hcalls_other_ret: BTreeMap<&'static str, u64>,
    /// All hypercalls.
    pub hcalls_total: u64,
    /// Host operations.
    pub host_ops: HostOps,
    /// Host operations per second.
    pub host_ops_per_s: f64,
    /// Hypercall latency percentiles (ns): `all` and per type.
    pub latency_ns: BTreeMap<&'static str, Percentiles>,
    /// Rmap ring lengths at the end.
    pub rings: RingStats,
    /// Memory per mapping.
    pub memory: MemoryStats,
    /// Resizes performed.
    pub resize: Vec<ResizeRecord>,
    /// Migration dirty-log rounds.
    pub migration: MigrationStats,
    /// Guest-side counters.
    pub guest: GuestCounters,
    /// Whether the run was clean, and its event digest.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Throughput over time.
    pub timeline: Vec<Sample>,
    /// Latency distribution for plots: (upper bound ns, count) buckets.
    #[serde(skip)]
    pub latency_buckets: Vec<(u64, u64)>,
    /// The same per hypercall type (types that were called).
    #[serde(skip)]
    pub latency_buckets_by_kind: BTreeMap<&'static str, Vec<(u64, u64)>>,
}

/// Guest-side counters.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct GuestCounters {
    /// Accesses completed.
    pub touches: u64,
    /// Hash faults.
    pub hash_faults: u64,
    /// Protection faults.
    pub protection_faults: u64,
    /// MMIO / not-ready / given-up accesses.
    pub other_faults: u64,
    /// Evictions.
    pub evictions: u64,
    /// H_ENTER errors other than H_PTEG_FULL.
    pub enter_errors: u64,
    /// Forks, execs, exits.
    pub forks: u64,
    /// Execs.
    pub execs: u64,
    /// Exits.
    pub exits: u64,
}

impl GuestCounters {
    /// Adds `o`'s counters to these.
    pub fn merge(&mut self, o: &Self) {
        self.touches += o.touches;
        self.hash_faults += o.hash_faults;
        self.protection_faults += o.protection_faults;
        self.other_faults += o.other_faults;
        self.evictions += o.evictions;
        self.enter_errors += o.enter_errors;
        self.forks += o.forks;
        self.execs += o.execs;
        self.exits += o.exits;
    }
}

/// Parks vCPU threads between operations (see module invariants).
#[derive(Debug, Default)]
pub struct Quiesce {
    pause: AtomicBool,
    stop: AtomicBool,
    /// Parked or exited workers.
    parked: AtomicUsize,
}

impl Quiesce {
    /// Whether workers should stop.
    pub fn stopping(&self) -> bool {
        // ORDERING: Acquire pairs with the Release in `stop`; publishes nothing else.
        self.stop.load(Ordering::Acquire)
    }

    /// Ask workers to stop (and let parked ones go).
    pub fn stop(&self) {
        // ORDERING: Release: see `stopping`.
        self.stop.store(true, Ordering::Release);
        self.resume();
    }

    /// Called by a worker between operations: parks while a pause is requested.
    /// Returns whether it parked.
    pub fn maybe_park(&self, before_block: impl FnOnce()) -> bool {
        // ORDERING: SeqCst: the worker half of a Dekker pair with `park_all` (pause
        // store, then parked load) so a parked count includes only workers that saw it.
        if !self.pause.load(Ordering::SeqCst) {
            return false;
        }
        before_block();
        // ORDERING: SeqCst (Dekker pair); also releases the worker's last operation to
        // the controller that reads `parked`.
        self.parked.fetch_add(1, Ordering::SeqCst);
        // ORDERING: SeqCst, as every access to `pause`.
        while self.pause.load(Ordering::SeqCst) && !self.stopping() {
            thread::yield_now();
        }
        // ORDERING: SeqCst: leaves the parked set before the next operation.
        self.parked.fetch_sub(1, Ordering::SeqCst);
        true
    }

    /// A worker exits for good (counted as parked forever).
    pub fn exited(&self) {
        // ORDERING: SeqCst: the controller's `parked` load must see it.
        self.parked.fetch_add(1, Ordering::SeqCst);
    }

    /// Request a pause and wait until all `n` workers are parked (or exited).
    pub fn park_all(&self, n: usize) {
        // ORDERING: SeqCst: the controller half of the Dekker pair.
        self.pause.store(true, Ordering::SeqCst);
        // ORDERING: SeqCst (Dekker pair); seeing n acquires their last operations.
        while self.parked.load(Ordering::SeqCst) < n {
            thread::yield_now();
        }
    }

    /// Let parked workers continue.
    pub fn resume(&self) {
        // ORDERING: SeqCst, as every access to `pause`.
        self.pause.store(false, Ordering::SeqCst);
    }

    /// Parks all `n` workers and pauses the host `actors`, runs `check` at that
    /// quiescent point, then lets actors and workers go on.
    pub(crate) fn quiescent_check(&self, n: usize, actors: &HostActors<'_>, check: impl FnOnce()) {
        self.park_all(n);
        actors.pause();
        check();
        actors.resume();
        self.resume();
    }

    /// The periodic check of a threaded run: a [`Quiesce::quiescent_check`] when
    /// `interval_ms` has passed since `*last`, which then restarts the interval.
    pub(crate) fn check_when_due(
        &self,
        last: &mut Instant,
        interval_ms: u64,
        n: usize,
        actors: &HostActors<'_>,
        check: impl FnOnce(),
    ) {
        if last.elapsed() >= Duration::from_millis(interval_ms) {
            self.quiescent_check(n, actors, check);
            *last = Instant::now();
        }
    }
}

/// The sum of the vCPU threads' operation counters: a progress statistic.
pub(crate) fn sum_counters(counters: &[AtomicU64]) -> u64 {
    counters
        .iter()
        // ORDERING: Relaxed: a progress statistic.
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
}

/// Whether a threaded run is done: after `by_count` counted operations (`count` so
/// far) if that is set, else after `duration` (`elapsed` so far).
pub(crate) fn run_done(
    count: u64,
    by_count: u64,
    elapsed: std::time::Duration,
    duration: std::time::Duration,
) -> bool {
    (by_count > 0 && count >= by_count) || (by_count == 0 && elapsed >= duration)
}

/// Joins a threaded run's vCPU threads in order: what each returned, and the error
/// (`panicked(v)`) of the first that panicked.
pub(crate) fn join_vcpus<T, E>(
    handles: Vec<thread::ScopedJoinHandle<'_, T>>,
    panicked: impl Fn(usize) -> E,
) -> (Vec<T>, Option<E>) {
    let mut out = Vec::with_capacity(handles.len());
    let mut err = None;
    for (v, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(c) => out.push(c),
            Err(_) => err = err.or_else(|| Some(panicked(v))),
        }
    }
    (out, err)
}

/// Marks a worker exited when dropped (also on unwind).
pub(crate) struct ExitGuard<'a>(pub(crate) &'a Quiesce);

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        self.0.exited();
    }
}

/// Creates the VM of a scenario, with resizing (with `ram_mib` overriding the guest's
/// RAM if given).
pub fn make_vm(sc: &Scenario, ram_mib: Option<u64>) -> Result<Vm, HptError> {
    let ram_bytes = ram_mib.map_or(sc.ram_bytes(), |m| m << 20);
    let hpt_order = if ram_mib.is_some() {
        revmap_resize::hpt_shift_for_ramsize(ram_bytes).clamp(18, 36)
    } else {
        sc.hpt_order()
    };
    revmap_resize::new_vm(VmConfig {
        ram_bytes,
        hpt_order,
        flavour: Flavour::Kvm,
        backing_page_shift: sc.guest.backing_page_shift,
    })
}

/// Runs `sc` for its duration (or its hypercall count; see module docs), calling
/// `progress` every tick; a [`ControlFlow::Break`] from it ends the run early, with a
/// whole report marked `interrupted`.
pub fn run(
    sc: &Scenario,
    mut progress: impl FnMut(&Progress) -> ControlFlow<()>,
) -> Result<RunReport, RunError> {
    let vm = make_vm(sc, None)?;
    let nv = sc.guest.vcpus;
    let ram = sc.ram_bytes();
    let mut cpus = Vec::with_capacity(nv);
    for v in 0..nv {
        cpus.push(GuestCpu::new(VcpuId::new(v)?, sc.seed, ram, sc.workload)?);
    }
    let start_order = vm.hpt_order();
    let quiesce = Quiesce::default();
    let counters: Vec<AtomicU64> = (0..nv).map(|_| AtomicU64::new(0)).collect();
    let duration = Duration::from_secs_f64(sc.duration_secs);
    let with_migration = sc.host.migrates();
    let actor_cfg = ActorConfig::threaded(sc.seed, &sc.host, sc.host.actor_kinds());

    let mut ctl = Controller::new(&vm, sc, false);
    let t0 = Instant::now();
    let mut interrupted = false;
    let by_calls = sc.stop_after_hcalls;
    let outcome = thread::scope(
        |s| -> Result<(Vec<GuestCpu>, HostOps, Vec<Sample>), RunError> {
            let vm = &vm;
            let quiesce = &quiesce;
            let mut handles = Vec::with_capacity(nv);
            for (v, mut cpu) in cpus.into_iter().enumerate() {
                let counter = counters.get(v);
                handles.push(s.spawn(move || -> Result<GuestCpu, RunError> {
                    let _guard = ExitGuard(quiesce);
                    let mut mmu = VcpuMmu::new(vm)?;
                    let mut run = vm.vcpu_run(VcpuId::new(v)?);
                    if v == 0 {
                        cpu.boot(vm, &mut run);
                    }
                    let mut n = 0u64;
                    while !quiesce.stopping() {
                        if quiesce.maybe_park(|| run.pause()) {
                            continue;
                        }
                        for _ in 0..64 {
                            cpu.step(vm, &mut mmu, &mut run);
                        }
                        n = n.wrapping_add(1);
                        if n % 4 == 0 {
                            if let Some(c) = counter {
                                // ORDERING: Relaxed: a progress statistic.
                                c.store(cpu.stats.total(), Ordering::Relaxed);
                            }
                        }
                    }
                    run.pause();
                    Ok(cpu)
                }));
            }
            let actors = HostActors::spawn(s, vm, &actor_cfg);
            let mut migration = with_migration.then(|| Migration::new(sc.seed, vm.memslot_views()));
            let mut timeline = Vec::new();
            let mut run_h = vm.vcpu_run(VcpuId::new(nv)?);
            run_h.pause();
            let mut next_resize = 0usize;
            let mut last_check = Instant::now();
            let mut last_calls = 0u64;
            let mut last_t = 0.0f64;
            let hcalls_now = || sum_counters(&counters);
            loop {
                thread::sleep(TICK);
                let el = t0.elapsed();
                let t = el.as_secs_f64();
                let calls = hcalls_now();
                if t > last_t {
                    timeline.push(Sample {
                        t,
                        hcalls_per_s: calls.saturating_sub(last_calls) as f64 / (t - last_t),
                    });
                }
                last_calls = calls;
                last_t = t;
                if let Some(m) = migration.as_mut() {
                    ctl.migration_round(m);
                }
                actors.end_phase();
                let fraction = if by_calls > 0 {
                    calls as f64 / by_calls as f64
                } else {
                    t / sc.duration_secs
                };
                // Every resize now due (several at once if one tick covered them), each
                // followed by a check at that quiescent point.
                while let Some(step) = sc.resize.get(next_resize).filter(|s| fraction >= s.at) {
                    next_resize += 1;
                    ctl.resize(
                        &mut run_h,
                        step.order_delta,
                        t,
                        || quiesce.park_all(nv),
                        || quiesce.resume(),
                    );
                    quiesce.quiescent_check(nv, &actors, || ctl.check());
                }
                quiesce.check_when_due(&mut last_check, sc.check_interval_ms, nv, &actors, || {
                    ctl.check()
                });
                let flow = progress(&Progress {
                    elapsed: t,
                    duration: sc.duration_secs,
                    fraction: fraction.min(1.0),
                    steps: 0,
                    hcalls: calls,
                    host_ops: actors.ops_so_far() + ctl.migration_ops.total(),
                    hpt_order: vm.hpt_order(),
                    violations: ctl.violations,
                });
                if flow.is_break() {
                    interrupted = true;
                    break;
                }
                if run_done(calls, by_calls, el, duration) {
                    break;
                }
            }
            drop(run_h);
            quiesce.stop();
            let mut out = Vec::with_capacity(nv);
            let mut err = None;
            for (v, h) in handles.into_iter().enumerate() {
                match h.join() {
                    Ok(Ok(c)) => out.push(c),
                    Ok(Err(e)) => err = err.or(Some(e)),
                    Err(_) => err = err.or(Some(RunError::Vcpu(v))),
                }
            }
            let ops = actors.stop()?;
            if let Some(e) = err {
                return Err(e);
            }
            Ok((out, ops, timeline))
        },
    );
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpus, mut host_ops, timeline) = outcome?;
    // The final check, everything stopped.
    ctl.check();
    host_ops.merge(&ctl.migration_ops);
    let mut stats = HcallStats::new()?;
    for c in &cpus {
        stats.merge(&c.stats);
    }
    let guest = stats.guest;
    let mut report = build_report(
        sc,
        &vm,
        &mut ctl,
        false,
        elapsed,
        start_order,
        &stats,
        guest,
        host_ops,
        timeline,
    );
    report.interrupted = interrupted;
    Ok(report)
}

/// The controller's state: checks, resizes, migration rounds.
pub(crate) struct Controller<'a> {
    pub(crate) vm: &'a Vm,
    pub(crate) sc: &'a Scenario,
    pub(crate) checks: u64,
    pub(crate) violations: u64,
    pub(crate) first_violation: Option<String>,
    pub(crate) resizes: Vec<ResizeRecord>,
    pub(crate) migration_ops: HostOps,
    pub(crate) rounds: Vec<u64>,
    /// Deterministic mode: wait for the preparation instead of sleeping between polls.
    pub(crate) deterministic: bool,
}

impl<'a> Controller<'a> {
    /// A controller with no checks, resizes or rounds yet.
    pub(crate) fn new(vm: &'a Vm, sc: &'a Scenario, deterministic: bool) -> Self {
        Self {
            vm,
            sc,
            checks: 0,
            violations: 0,
            first_violation: None,
            resizes: Vec::new(),
            migration_ops: HostOps::default(),
            rounds: Vec::new(),
            deterministic,
        }
    }
    /// Runs the checker (callers quiesce first).
    pub(crate) fn check(&mut self) {
        self.checks += 1;
        if let Err(v) = self.vm.check_invariants() {
            self.violations += 1;
            if self.first_violation.is_none() {
                self.first_violation = Some(v.to_string());
            }
        }
    }

    /// One whole dirty-log round.
    pub(crate) fn migration_round(&mut self, m: &mut Migration) {
        let before = self.migration_ops.dirty_pages;
        m.run_round(self.vm, &mut self.migration_ops, &mut |_| {});
        self.rounds
            .push(self.migration_ops.dirty_pages.saturating_sub(before));
    }

    /// One resize: PREPARE polled (the vCPUs keep running), then COMMIT with them
    /// stopped (`stop` / `start`).
    pub(crate) fn resize(
        &mut self,
        port: &mut impl HypercallPort,
        delta: i32,
        at_s: f64,
        stop: impl FnOnce(),
        start: impl FnOnce(),
    ) {
        let from = self.vm.hpt_order();
        // Clamped to PAPR's minimum order, as a guest's hot-remove policy would be.
        let target = u32::try_from(i64::from(from) + i64::from(delta))
            .unwrap_or(from)
            .max(revmap_hpt::hash::MIN_HPT_ORDER);
        let shift = u64::from(target);
        // The resize runs on the vCPU after the workload's (the scenario keeps it in range).
        let vcpu = match VcpuId::new(self.sc.guest.vcpus) {
            Ok(v) => v,
            Err(e) => {
                self.violations += 1;
                if self.first_violation.is_none() {
                    self.first_violation = Some(format!("resize: {e}"));
                }
                return;
            }
        };
        let t = Instant::now();
        let mut calls = 0u64;
        let mut ret;
        loop {
            ret = port.hcall(vcpu, H_RESIZE_HPT_PREPARE, &[0, shift]).ret;
            calls += 1;
            if !is_long_busy(ret) || calls > 10_000 {
                break;
            }
            if self.deterministic {
                if let Some(r) = self.vm.resizer() {
                    r.wait_prepared();
                }
            } else {
                thread::sleep(Duration::from_millis(1));
            }
        }
        let prepare_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut rec = ResizeRecord {
            at_s,
            from_order: from,
            target_order: target,
            prepare_calls: calls,
            prepare_ret: ret,
            prepare_ms,
            commit_ret: None,
            quiesce_us: 0.0,
            pause_us: 0.0,
            order_after: from,
        };
        if ret == H_SUCCESS {
            let q = Instant::now();
            stop();
            rec.quiesce_us = q.elapsed().as_secs_f64() * 1e6;
            let c = Instant::now();
            let r = port.hcall(vcpu, H_RESIZE_HPT_COMMIT, &[0, shift]).ret;
            rec.pause_us = c.elapsed().as_secs_f64() * 1e6;
            start();
            rec.commit_ret = Some(r);
        }
        rec.order_after = self.vm.hpt_order();
        self.resizes.push(rec);
    }
}

/// Walks every rmap chain of every memslot (everything quiescent).
pub fn ring_stats(vm: &Vm) -> RingStats {
    let mut rs = RingStats::default();
    let hpt = vm.hpt();
    let rev = hpt.revmap();
    let slots = vm.memslots();
    for s in slots.iter() {
        for r in s.rmaps() {
            let w = r.load();
            if w.head().is_none() {
                continue;
            }
            match rev.walk_ring(w, |_| {}) {
                Ok(n) => {
                    let n = n as u64;
                    rs.chains += 1;
                    rs.members += n;
                    rs.longest = rs.longest.max(n);
                    *rs.histogram.entry(n).or_insert(0) += 1;
                }
                Err(_) => rs.walk_errors += 1,
            }
        }
    }
    rs
}

/// Memory of the HPT, revmap and rmaps per mapping.
pub fn memory_stats(vm: &Vm, rings: &RingStats) -> MemoryStats {
    let hpt = vm.hpt();
    let npte = hpt.slots().len() as u64;
    let rmap_bytes: u64 = vm
        .memslots()
        .iter()
        .map(|s| s.npages().saturating_mul(8))
        .sum();
    let m = MemoryStats {
        hpt_bytes: npte * 16,
        revmap_bytes: hpt.revmap().len() as u64 * 16,
        rmap_bytes,
        hpte_slots: npte,
        mappings: rings.members,
        hpt_occupancy: if npte == 0 {
            0.0
        } else {
            rings.members as f64 / npte as f64
        },
        bytes_per_mapping: 0.0,
    };
    MemoryStats {
        bytes_per_mapping: if m.mappings == 0 {
            0.0
        } else {
            (m.hpt_bytes + m.revmap_bytes + m.rmap_bytes) as f64 / m.mappings as f64
        },
        ..m
    }
}

/// Assembles a report.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_report(
    sc: &Scenario,
    vm: &Vm,
    ctl: &mut Controller<'_>,
    deterministic: bool,
    elapsed: f64,
    start_order: u32,
    stats: &HcallStats,
    guest: GuestCounters,
    host_ops: HostOps,
    timeline: Vec<Sample>,
) -> RunReport {
    let rounds = std::mem::take(&mut ctl.rounds);
    let resize = std::mem::take(&mut ctl.resizes);
    let checks = (ctl.checks, ctl.violations, ctl.first_violation.take());
    let secs = elapsed.max(1e-9);
    let mut hcalls = BTreeMap::new();
    let mut per_s = BTreeMap::new();
    let mut nf = BTreeMap::new();
    let mut other = BTreeMap::new();
    let mut lat = BTreeMap::new();
    lat.insert("all", Percentiles::of(&stats.latency));
    for (i, k) in HcallKind::ALL.iter().enumerate() {
        let n = stats.counts.get(i).copied().unwrap_or(0);
        if n == 0 {
            continue;
        }
        hcalls.insert(k.name(), n);
        per_s.insert(k.name(), n as f64 / secs);
        nf.insert(k.name(), stats.not_found.get(i).copied().unwrap_or(0));
        other.insert(k.name(), stats.other_ret.get(i).copied().unwrap_or(0));
        if let Some(h) = stats.latency_by_kind.get(i) {
            lat.insert(k.name(), Percentiles::of(h));
        }
    }
    let rings = ring_stats(vm);
    let memory = memory_stats(vm, &rings);
    let n = rounds.len() as u64;
    let sum: u64 = rounds.iter().sum();
    let frames_per_backing_page = 1u64 << sc.guest.backing_page_shift.saturating_sub(12);
    let guest_frames: u64 = vm.memslots().iter().map(|s| s.npages()).sum();
    let migration = MigrationStats {
        rounds: n,
        frames_per_backing_page,
        guest_frames,
        mean_dirty_pages: if n == 0 { 0.0 } else { sum as f64 / n as f64 },
        max_dirty_pages: rounds.iter().copied().max().unwrap_or(0),
        dirty_pages_per_round: rounds,
    };
    let buckets = |h: &hdrhistogram::Histogram<u64>| -> Vec<(u64, u64)> {
        h.iter_log(10, 1.25)
            .map(|v| (v.value_iterated_to(), v.count_since_last_iteration()))
            .collect()
    };
    let latency_buckets = buckets(&stats.latency);
    let mut latency_buckets_by_kind = BTreeMap::new();
    for (i, k) in HcallKind::ALL.iter().enumerate() {
        if let Some(h) = stats.latency_by_kind.get(i).filter(|h| !h.is_empty()) {
            latency_buckets_by_kind.insert(k.name(), buckets(h));
        }
    }
    RunReport {
        scenario: sc.name.clone(),
        interrupted: false,
        seed: sc.seed,
        deterministic,
        elapsed_s: elapsed,
        vcpus: sc.guest.vcpus,
        ram_bytes: vm
            .memslots()
            .iter()
            .map(|s| s.npages().saturating_mul(4096))
            .sum(),
        hpt_order: [start_order, vm.hpt_order()],
        hcalls_total: stats.total(),
        hcalls,
        hcalls_per_s: per_s,
        hcalls_not_found: nf,
        hcalls_other_ret: other,
        host_ops_per_s: host_ops.total() as f64 / secs,
        host_ops,
        latency_ns: lat,
        rings,
        memory,
        resize,
        migration,
        guest,
        verdict: Verdict::new(checks.0, checks.1, checks.2, stats.digest),
        timeline,
        latency_buckets,
        latency_buckets_by_kind,
    }
}
/// Three significant digits of `v` (which is at least 1).
fn sig3(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// A duration in ns with an SI unit, three significant digits: "850 ns", "12.3 µs",
/// "4.56 ms", "1.20 s".
pub fn si_ns(ns: u64) -> String {
    let v = ns as f64;
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{} µs", sig3(v / 1e3))
    } else if ns < 1_000_000_000 {
        format!("{} ms", sig3(v / 1e6))
    } else {
        format!("{} s", sig3(v / 1e9))
    }
}

/// A byte count in KiB/MiB/GiB: exact when a whole number of the unit, else three
/// significant digits.
fn si_bytes(b: u64) -> String {
    let (unit, name) = if b < 1 << 10 {
        return format!("{b} B");
    } else if b < 1 << 20 {
        (1u64 << 10, "KiB")
    } else if b < 1 << 30 {
        (1 << 20, "MiB")
    } else {
        (1 << 30, "GiB")
    };
    if b % unit == 0 {
        format!("{} {name}", b / unit)
    } else {
        format!("{} {name}", sig3(b as f64 / unit as f64))
    }
}

/// Appends an aligned table: the first column left-aligned, the others right-aligned,
/// every column as wide as its widest cell (header included), indented by two.
pub fn write_table(o: &mut String, headers: &[&str], rows: &[Vec<String>]) {
    use std::fmt::Write;
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = cells
            .zip(&width)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        let _ = writeln!(o, "  {}", parts.join("  ").trim_end());
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * n as f64 / of as f64
    }
}

impl RunReport {
    /// The human summary: every figure with its unit and what it counts.
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let secs = self.elapsed_s.max(1e-9);
        let backing = self.migration.frames_per_backing_page.max(1) * 4096;
        let _ = writeln!(
            o,
            "revmap run: scenario {:?}, seed {}, {} vCPU(s), {} MiB guest on {} host pages, \
             HPT order {} -> {}{}",
            self.scenario,
            self.seed,
            self.vcpus,
            self.ram_bytes >> 20,
            si_bytes(backing),
            self.hpt_order[0],
            self.hpt_order[1],
            if self.deterministic {
                " (deterministic)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            o,
            "ran {:.1} s: {} hypercalls ({:.0}/s), {} host operations ({:.0}/s)",
            self.elapsed_s,
            self.hcalls_total,
            self.hcalls_total as f64 / secs,
            self.host_ops.total(),
            self.host_ops_per_s
        );
        if self.interrupted {
            write_interrupted(&mut o);
        }
        let _ = writeln!(
            o,
            "\nhypercalls (the guest's MMU calls into the hypervisor)"
        );
        let rows: Vec<Vec<String>> = self
            .hcalls
            .iter()
            .map(|(k, n)| {
                vec![
                    (*k).to_owned(),
                    n.to_string(),
                    format!("{:.0}", self.hcalls_per_s.get(k).copied().unwrap_or(0.0)),
                    self.hcalls_not_found
                        .get(k)
                        .copied()
                        .unwrap_or(0)
                        .to_string(),
                    self.hcalls_other_ret
                        .get(k)
                        .copied()
                        .unwrap_or(0)
                        .to_string(),
                ]
            })
            .collect();
        write_table(
            &mut o,
            &[
                "type",
                "calls",
                "calls/s",
                "H_NOT_FOUND",
                "other (H_PTEG_FULL...)",
            ],
            &rows,
        );
        let h = &self.host_ops;
        let _ = writeln!(
            o,
            "\nhost operations (host threads: memory pressure, aging, migration)"
        );
        let rate = |n: u64| format!("{:.0}", n as f64 / secs);
        let rows = vec![
            vec![
                "unmap_hva_range".to_owned(),
                h.unmap_hva_range.to_string(),
                rate(h.unmap_hva_range),
                format!("{} HPTEs unmapped", h.hptes_unmapped),
            ],
            vec![
                "host_page_in".to_owned(),
                h.host_page_in.to_string(),
                rate(h.host_page_in),
                String::new(),
            ],
            vec![
                "age_gfn".to_owned(),
                h.age_gfn.to_string(),
                rate(h.age_gfn),
                format!("{} young (referenced since last aged)", h.age_gfn_young),
            ],
            vec![
                "test_age_gfn".to_owned(),
                h.test_age_gfn.to_string(),
                rate(h.test_age_gfn),
                format!("{} young", h.test_age_gfn_young),
            ],
            vec![
                "get_dirty_log".to_owned(),
                h.get_dirty_log.to_string(),
                rate(h.get_dirty_log),
                format!("{} errors", h.errors),
            ],
            vec![
                "clear_dirty_log".to_owned(),
                h.clear_dirty_log.to_string(),
                rate(h.clear_dirty_log),
                String::new(),
            ],
        ];
        write_table(&mut o, &["operation", "calls", "calls/s", "result"], &rows);
        let _ = writeln!(
            o,
            "\nhypercall latency (wall time per call, including lock waits and preemption)"
        );
        let rows: Vec<Vec<String>> = self
            .latency_ns
            .iter()
            .map(|(k, p)| {
                let mut r = vec![(*k).to_owned(), p.count.to_string()];
                r.extend([p.p50, p.p90, p.p99, p.p999, p.max].map(si_ns));
                r
            })
            .collect();
        write_table(
            &mut o,
            &["type", "calls", "p50", "p90", "p99", "p99.9", "max"],
            &rows,
        );
        let r = &self.rings;
        let _ = write!(
            o,
            "\nrmap rings (HPTEs per guest frame, walked at the end): {} frames mapped, \
             {} HPTEs, longest {}; length:frames",
            r.chains, r.members, r.longest
        );
        for (len, n) in r.histogram.iter().take(12) {
            let _ = write!(o, " {len}:{n}");
        }
        if r.histogram.len() > 12 {
            let _ = write!(o, " ...");
        }
        if r.walk_errors > 0 {
            let _ = write!(o, " ({} rings failed to walk)", r.walk_errors);
        }
        let _ = writeln!(o);
        let m = &self.memory;
        let _ = writeln!(
            o,
            "memory: fixed tables {} = HPT {} + revmap {} (16 B per HPTE slot each, {} slots) \
             + rmap array {} (8 B per 4 KiB guest frame)",
            si_bytes(m.hpt_bytes + m.revmap_bytes + m.rmap_bytes),
            si_bytes(m.hpt_bytes),
            si_bytes(m.revmap_bytes),
            m.hpte_slots,
            si_bytes(m.rmap_bytes)
        );
        let _ = writeln!(
            o,
            "        {} mappings at the end fill {:.1}% of the slots; a mapping adds no memory \
             (its ring links live in its revmap entry), so the tables come to {:.0} B per mapping",
            m.mappings,
            m.hpt_occupancy * 100.0,
            m.bytes_per_mapping
        );
        for z in &self.resize {
            let _ = writeln!(
                o,
                "resize at {}: order {} -> {}: PREPARE x{} ({:.1} ms, ret {}), COMMIT {}, \
                 stopping the vCPUs {:.0} µs, guest-visible pause {:.0} µs, order now {}",
                if self.deterministic {
                    format!("step {:.0}", z.at_s)
                } else {
                    format!("{:.1} s", z.at_s)
                },
                z.from_order,
                z.target_order,
                z.prepare_calls,
                z.prepare_ms,
                z.prepare_ret,
                z.commit_ret
                    .map_or("not issued".to_string(), |r| format!("ret {r}")),
                z.quiesce_us,
                z.pause_us,
                z.order_after
            );
        }
        let mg = &self.migration;
        let _ = writeln!(
            o,
            "migration: {} dirty-log rounds; dirty 4 KiB frames per round: mean {:.0}, max {} \
             of {} (one guest store dirties its whole {} host page = {} frames)",
            mg.rounds,
            mg.mean_dirty_pages,
            mg.max_dirty_pages,
            mg.guest_frames,
            si_bytes(backing),
            mg.frames_per_backing_page
        );
        let g = &self.guest;
        let _ = writeln!(
            o,
            "guest: {} accesses; {} hash faults ({:.0} per 100 accesses: the model touches \
             pages at random over whole segments, so most touches are first touches; also \
             after an eviction or a host unmap), {} protection faults (store to a clean \
             page), {} evictions (both HPTE groups full), {} forks, {} execs, {} exits",
            g.touches,
            g.hash_faults,
            pct(g.hash_faults, g.touches),
            g.protection_faults,
            g.evictions,
            g.forks,
            g.execs,
            g.exits
        );
        self.verdict.write_summary(&mut o, "");
        o
    }
}

/// Appends the human summary's note on a run stopped early (SIGINT).
pub(crate) fn write_interrupted(o: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "INTERRUPTED: stopped early (SIGINT); the figures cover the part that ran, \
         and the invariant checker ran after everything stopped"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn si_ns_picks_the_unit() {
        assert_eq!(si_ns(850), "850 ns");
        assert_eq!(si_ns(12_345), "12.3 µs");
        assert_eq!(si_ns(4_560_000), "4.56 ms");
        assert_eq!(si_ns(10_000_000), "10.0 ms");
        assert_eq!(si_ns(1_200_000_000), "1.20 s");
    }

    #[test]
    fn si_bytes_is_exact_for_whole_units() {
        assert_eq!(si_bytes(64 << 10), "64 KiB");
        assert_eq!(si_bytes(16 << 20), "16 MiB");
        assert_eq!(si_bytes(2_621_440 + 1), "2.50 MiB");
        assert_eq!(si_bytes(512), "512 B");
    }

    #[test]
    fn tables_align_every_column() {
        let mut o = String::new();
        write_table(
            &mut o,
            &["type", "calls", "p50"],
            &[
                vec!["H_ENTER".into(), "12345".into(), "1.20 µs".into()],
                vec!["all".into(), "7".into(), "850 ns".into()],
            ],
        );
        let lines: Vec<&str> = o.lines().collect();
        assert_eq!(lines.len(), 3);
        let w: Vec<usize> = lines.iter().map(|l| l.chars().count()).collect();
        assert!(w.iter().all(|&x| x == w[0]), "{o}");
        // Right-aligned numeric columns end in the same place.
        assert!(
            lines[1].ends_with("1.20 µs") && lines[2].ends_with(" 850 ns"),
            "{o}"
        );
    }
}
