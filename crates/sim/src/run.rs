//! `revmap run`: a whole virtualised machine's MMU at work. One thread per vCPU runs
//! the guest workload ([`crate::workload`]) through a [`revmap_hpt::VcpuRun`] handle and its own
//! [`VcpuMmu`]; the host actors ([`crate::actors`]: memory pressure, aging) run on
//! their own threads; the controller (the calling thread) ticks every
//! [`TICK`], runs one live-migration dirty-log round per tick, performs the resize
//! schedule (PREPARE polled while the vCPUs run, COMMIT through its own run handle with
//! the vCPUs stopped, as Linux's `stop_machine`), and runs the invariant checker at
//! quiescent points (vCPUs parked, actors paused) periodically and at the end.
//!
//! # Invariants
//!
//! * A parked vCPU has paused its run handle (it is out of the gate), so neither a
//!   resize commit nor a memslot update waits for it.
//! * When [`Quiesce::park_all`] returns, every live vCPU thread is parked between
//!   guest operations and starts none until [`Quiesce::resume`].
//! * The controller's run handle uses vCPU id `vcpus` (no worker uses it).
//! * Atomics come from `revmap_rmap::sync`; each ordering is explained where used.

use crate::actors::{ActorConfig, ActorKind, ActorPanicked, HostActors, HostOps, Migration};
use crate::host::HostMmu;
use crate::report::{HcallStats, Percentiles};
use crate::scenario::{HostActor, Scenario};
use crate::workload::GuestCpu;
use revmap_hpt::hcall::{is_long_busy, H_RESIZE_HPT_COMMIT, H_RESIZE_HPT_PREPARE, H_SUCCESS};
use revmap_hpt::mmu::VcpuMmu;
use revmap_hpt::{Flavour, HptError, HypercallPort, VcpuId, VcpuIdError, Vm, VmConfig};
use revmap_rmap::sync::{thread, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use revmap_trace::HcallKind;
use serde::Serialize;
use std::collections::BTreeMap;
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

/// Progress reported to the caller every tick.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Seconds elapsed.
    pub elapsed: f64,
    /// Seconds planned.
    pub duration: f64,
    /// Hypercalls so far.
    pub hcalls: u64,
    /// Host operations so far (actors; migration rounds not included).
    pub host_ops: u64,
    /// Current HPT order.
    pub hpt_order: u32,
    /// Invariant violations so far.
    pub violations: u64,
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

/// Memory of the reverse-mapping structures per mapping.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct MemoryStats {
    /// HPT bytes (16 per HPTE).
    pub hpt_bytes: u64,
    /// Revmap bytes (16 per HPTE).
    pub revmap_bytes: u64,
    /// Rmap words (8 per guest frame).
    pub rmap_bytes: u64,
    /// VALID memslot-backed mappings (rmap chain members).
    pub mappings: u64,
    /// (hpt + revmap + rmaps) / mappings.
    pub bytes_per_mapping: f64,
}

/// Migration (dirty-log) figures.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MigrationStats {
    /// Rounds completed.
    pub rounds: u64,
    /// Dirty pages harvested in each round.
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
    /// Invariant checks run.
    pub invariant_checks: u64,
    /// Invariant violations found (must be 0).
    pub invariant_violations: u64,
    /// The first violation, if any.
    pub first_violation: Option<String>,
    /// Deterministic mode: the step after which the checker failed.
    pub failing_step: Option<u64>,
    /// Event digest (reproducible in deterministic mode).
    pub digest: String,
    /// Throughput over time.
    pub timeline: Vec<Sample>,
    /// Latency distribution for plots: (upper bound ns, count) buckets.
    #[serde(skip)]
    pub latency_buckets: Vec<(u64, u64)>,
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
}

/// Marks a worker exited when dropped (also on unwind).
struct ExitGuard<'a>(&'a Quiesce);

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

/// Runs `sc` for its duration (see module docs), calling `progress` every tick.
pub fn run(sc: &Scenario, mut progress: impl FnMut(&Progress)) -> Result<RunReport, RunError> {
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
    let kinds: Vec<ActorKind> = sc
        .host
        .actors
        .iter()
        .filter(|a| **a != HostActor::Migration)
        .map(|a| a.kind())
        .collect();
    let with_migration = sc.host.actors.contains(&HostActor::Migration);
    let actor_cfg = ActorConfig {
        seed: sc.seed,
        kinds,
        page_in: sc.host.page_in,
        max_outstanding: sc.host.max_outstanding,
        ops_per_phase: std::num::NonZeroU64::new(sc.host.ops_per_tick),
    };

    let mut ctl = Controller {
        vm: &vm,
        sc,
        checks: 0,
        violations: 0,
        first_violation: None,
        resizes: Vec::new(),
        migration_ops: HostOps::default(),
        rounds: Vec::new(),
        deterministic: false,
    };
    let t0 = Instant::now();
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
            let hcalls_now = || -> u64 {
                counters
                    .iter()
                    // ORDERING: Relaxed: a progress statistic.
                    .map(|c| c.load(Ordering::Relaxed))
                    .sum()
            };
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
                if let Some(step) = sc.resize.get(next_resize) {
                    if t >= step.at * sc.duration_secs {
                        next_resize += 1;
                        ctl.resize(
                            &mut run_h,
                            step.order_delta,
                            t,
                            || quiesce.park_all(nv),
                            || quiesce.resume(),
                        );
                    }
                }
                if last_check.elapsed() >= Duration::from_millis(sc.check_interval_ms) {
                    quiesce.park_all(nv);
                    actors.pause();
                    ctl.check();
                    actors.resume();
                    quiesce.resume();
                    last_check = Instant::now();
                }
                progress(&Progress {
                    elapsed: t,
                    duration: sc.duration_secs,
                    hcalls: calls,
                    host_ops: actors.ops_so_far() + ctl.migration_ops.total(),
                    hpt_order: vm.hpt_order(),
                    violations: ctl.violations,
                });
                if el >= duration {
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
    let mut guest = GuestCounters::default();
    for c in &cpus {
        stats.merge(&c.stats);
    }
    guest.touches = stats.touches;
    guest.hash_faults = stats.hash_faults;
    guest.protection_faults = stats.protection_faults;
    guest.other_faults = stats.other_faults;
    guest.evictions = stats.evictions;
    guest.enter_errors = stats.enter_errors;
    guest.forks = stats.forks;
    guest.execs = stats.execs;
    guest.exits = stats.exits;
    let rounds = std::mem::take(&mut ctl.rounds);
    let resizes = std::mem::take(&mut ctl.resizes);
    Ok(build_report(
        sc,
        &vm,
        false,
        elapsed,
        start_order,
        &stats,
        guest,
        host_ops,
        rounds,
        resizes,
        (ctl.checks, ctl.violations, ctl.first_violation.take()),
        timeline,
    ))
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

impl Controller<'_> {
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
        mappings: rings.members,
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
    deterministic: bool,
    elapsed: f64,
    start_order: u32,
    stats: &HcallStats,
    guest: GuestCounters,
    host_ops: HostOps,
    rounds: Vec<u64>,
    resize: Vec<ResizeRecord>,
    checks: (u64, u64, Option<String>),
    timeline: Vec<Sample>,
) -> RunReport {
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
    let migration = MigrationStats {
        rounds: n,
        mean_dirty_pages: if n == 0 { 0.0 } else { sum as f64 / n as f64 },
        max_dirty_pages: rounds.iter().copied().max().unwrap_or(0),
        dirty_pages_per_round: rounds,
    };
    let latency_buckets = stats
        .latency
        .iter_log(100, 1.25)
        .map(|v| (v.value_iterated_to(), v.count_since_last_iteration()))
        .collect();
    RunReport {
        scenario: sc.name.clone(),
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
        invariant_checks: checks.0,
        invariant_violations: checks.1,
        first_violation: checks.2,
        failing_step: None,
        digest: format!("{:016x}", stats.digest),
        timeline,
        latency_buckets,
    }
}

impl RunReport {
    /// The human summary.
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "revmap run: scenario {:?}, seed {}, {} vCPU(s), {} MiB guest, HPT order {} -> {}{}",
            self.scenario,
            self.seed,
            self.vcpus,
            self.ram_bytes >> 20,
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
            self.hcalls_total as f64 / self.elapsed_s.max(1e-9),
            self.host_ops.total(),
            self.host_ops_per_s
        );
        let _ = writeln!(
            o,
            "\nhypercalls          count        /s  not-found  other-ret"
        );
        for (k, n) in &self.hcalls {
            let _ = writeln!(
                o,
                "  {k:<20} {n:>9} {:>9.0} {:>10} {:>10}",
                self.hcalls_per_s.get(k).copied().unwrap_or(0.0),
                self.hcalls_not_found.get(k).copied().unwrap_or(0),
                self.hcalls_other_ret.get(k).copied().unwrap_or(0)
            );
        }
        let h = &self.host_ops;
        let _ = writeln!(o, "\nhost operations");
        for (name, n) in [
            ("unmap_hva_range", h.unmap_hva_range),
            ("  (hptes unmapped)", h.hptes_unmapped),
            ("host_page_in", h.host_page_in),
            ("age_gfn", h.age_gfn),
            ("test_age_gfn", h.test_age_gfn),
            ("get_dirty_log", h.get_dirty_log),
            ("clear_dirty_log", h.clear_dirty_log),
        ] {
            let _ = writeln!(
                o,
                "  {name:<20} {n:>9} {:>9.0}/s",
                n as f64 / self.elapsed_s.max(1e-9)
            );
        }
        let _ = writeln!(
            o,
            "\nlatency (ns)            count      p50      p90      p99    p99.9      max"
        );
        for (k, p) in &self.latency_ns {
            let _ = writeln!(
                o,
                "  {k:<20} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                p.count, p.p50, p.p90, p.p99, p.p999, p.max
            );
        }
        let r = &self.rings;
        let _ = write!(
            o,
            "\nrmap rings: {} chains, {} members, longest {}; length:count",
            r.chains, r.members, r.longest
        );
        for (len, n) in r.histogram.iter().take(12) {
            let _ = write!(o, " {len}:{n}");
        }
        if r.histogram.len() > 12 {
            let _ = write!(o, " ...");
        }
        let _ = writeln!(o);
        let m = &self.memory;
        let _ = writeln!(
            o,
            "memory: HPT {} KiB + revmap {} KiB + rmaps {} KiB for {} mappings = {:.1} bytes/mapping",
            m.hpt_bytes >> 10,
            m.revmap_bytes >> 10,
            m.rmap_bytes >> 10,
            m.mappings,
            m.bytes_per_mapping
        );
        for z in &self.resize {
            let _ = writeln!(
                o,
                "resize at {:.1} {}: order {} -> {}: PREPARE x{} ({:.1} ms, ret {}), COMMIT {}, quiesce {:.0} us, pause {:.0} us, now {}",
                z.at_s,
                if self.deterministic { "(step)" } else { "s" },
                z.from_order,
                z.target_order,
                z.prepare_calls,
                z.prepare_ms,
                z.prepare_ret,
                z.commit_ret.map_or("not issued".to_string(), |r| format!("ret {r}")),
                z.quiesce_us,
                z.pause_us,
                z.order_after
            );
        }
        let mg = &self.migration;
        let _ = writeln!(
            o,
            "migration: {} dirty-log rounds, dirty pages per round mean {:.1}, max {}",
            mg.rounds, mg.mean_dirty_pages, mg.max_dirty_pages
        );
        let g = &self.guest;
        let _ = writeln!(
            o,
            "guest: {} accesses, {} hash faults, {} protection faults, {} evictions, {} forks, {} execs, {} exits",
            g.touches, g.hash_faults, g.protection_faults, g.evictions, g.forks, g.execs, g.exits
        );
        let _ = writeln!(
            o,
            "invariant_checks {}  invariant_violations {}{}",
            self.invariant_checks,
            self.invariant_violations,
            self.first_violation
                .as_ref()
                .map_or(String::new(), |v| format!(" (first: {v})"))
        );
        let _ = writeln!(o, "digest {}", self.digest);
        o
    }
}
