//! The threaded nested run: one thread per L1 vCPU ([`L1Cpu`]), the host actors on
//! their own threads ([`HostActors`], against the [`NestedVm`] as a
//! [`crate::host::HostMmu`]), and the controller (the calling thread) that ticks every
//! [`TICK`], runs one live-migration dirty-log round of L1 memory per tick, samples the
//! nested rmap, and runs the checker at quiescent points (L1 vCPUs parked through
//! [`Quiesce`], actors paused) periodically and at the end.
//!
//! Invariants: as [`crate::run`]'s (a parked vCPU is between two L1 operations; atomics
//! from `revmap_rmap::sync`, each ordering explained where used).

use super::l1::{L1Cpu, PTCR};
use super::{Checks, NestedRunError, NestedRunReport, NestedSample, NestedScenario, NestedStats};
use crate::actors::{ActorConfig, HostActors, HostOps, Migration};
use crate::host::HostMmu;
use crate::report::Verdict;
use crate::run::{join_vcpus, run_done, sum_counters, Progress, Quiesce, TICK};
use revmap_nested::NestedVm;
use revmap_rmap::sync::{thread, AtomicU64, Ordering};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// L1 operations a vCPU thread runs between two looks at the pause flag.
const BATCH: usize = 32;

/// Marks a worker exited when dropped (also on unwind).
struct Exited<'a>(&'a Quiesce);

impl Drop for Exited<'_> {
    fn drop(&mut self) {
        self.0.exited();
    }
}

/// Creates the VM of `sc` with `ram_mib` MiB of L1 RAM and registers L1's partition
/// table (H_SET_PARTITION_TABLE).
pub(crate) fn boot(sc: &NestedScenario, ram_mib: u64) -> Result<NestedVm, NestedRunError> {
    sc.validate()?;
    let vm = sc.make_vm(ram_mib)?;
    match vm.h_set_partition_table(PTCR) {
        0 => Ok(vm),
        r => Err(NestedRunError::Setup(format!(
            "H_SET_PARTITION_TABLE returned {r}"
        ))),
    }
}

/// Everything a report is built from.
pub(crate) struct Outcome {
    pub(crate) cpus: Vec<L1Cpu>,
    pub(crate) host_ops: HostOps,
    pub(crate) checks: Checks,
    pub(crate) timeline: Vec<NestedSample>,
    pub(crate) host_digest: u64,
}

/// Builds the report (the checker's count plus the guest mismatches are the
/// violations).
pub(crate) fn build_report(
    sc: &NestedScenario,
    vm: &NestedVm,
    deterministic: bool,
    elapsed: f64,
    o: Outcome,
) -> NestedRunReport {
    let mut l1 = super::L1Counters::default();
    let mut digest = o.host_digest;
    for c in &o.cpus {
        l1.merge(&c.counters);
        digest = crate::report::digest_word(digest, c.digest);
    }
    let secs = elapsed.max(1e-9);
    let first_violation = o.checks.first.clone().or_else(|| l1.first_mismatch.clone());
    NestedRunReport {
        mmu: "nested",
        scenario: sc.name.clone(),
        hostile: sc.l1.hostile,
        interrupted: false,
        seed: sc.seed,
        deterministic,
        elapsed_s: elapsed,
        steps: 0,
        vcpus: sc.l1.vcpus,
        l2s: sc.l2s(),
        l1_ram_bytes: vm.config().l1_memory_bytes,
        accesses: l1.accesses,
        accesses_per_s: l1.accesses as f64 / secs,
        host_ops_per_s: o.host_ops.total() as f64 / secs,
        host_ops: o.host_ops,
        nested: NestedStats::of(vm),
        verdict: Verdict::new(
            o.checks.checks,
            o.checks.violations + l1.mismatches,
            first_violation,
            digest,
        ),
        timeline: o.timeline,
        l1,
    }
}

/// Runs `sc` threaded for its duration (or its access count), calling `progress` every
/// tick (`hcalls` = L2 accesses, `hpt_order` = 0); a [`ControlFlow::Break`] ends the
/// run early with a whole report marked `interrupted`.
pub fn run_nested(
    sc: &NestedScenario,
    mut progress: impl FnMut(&Progress) -> ControlFlow<()>,
) -> Result<NestedRunReport, NestedRunError> {
    let vm = boot(sc, sc.l1.ram_mib)?;
    let ram = vm.config().l1_memory_bytes;
    let nv = sc.l1.vcpus;
    let cpus = (0..nv)
        .map(|v| L1Cpu::new(sc, ram, v))
        .collect::<Result<Vec<_>, _>>()
        .map_err(NestedRunError::Setup)?;
    let quiesce = Quiesce::default();
    let counters: Vec<AtomicU64> = (0..nv).map(|_| AtomicU64::new(0)).collect();
    let actor_cfg = ActorConfig::threaded(sc.seed, &sc.host, sc.host.actor_kinds());
    let with_migration = sc.host.migrates();
    let duration = Duration::from_secs_f64(sc.duration_secs);
    let by_accesses = sc.stop_after_accesses;
    let mut checks = Checks::default();
    let mut migration_ops = HostOps::default();
    let mut interrupted = false;
    let t0 = Instant::now();
    let outcome = thread::scope(
        |s| -> Result<(Vec<L1Cpu>, HostOps, Vec<NestedSample>), NestedRunError> {
            let (vm, quiesce) = (&vm, &quiesce);
            let mut handles = Vec::with_capacity(nv);
            for (v, mut cpu) in cpus.into_iter().enumerate() {
                let counter = counters.get(v);
                handles.push(s.spawn(move || {
                    let _exit = Exited(quiesce);
                    while !quiesce.stopping() {
                        if quiesce.maybe_park(|| {}) {
                            continue;
                        }
                        for _ in 0..BATCH {
                            cpu.step(vm);
                        }
                        if let Some(c) = counter {
                            // ORDERING: Relaxed: a progress statistic.
                            c.store(cpu.counters.accesses, Ordering::Relaxed);
                        }
                    }
                    cpu
                }));
            }
            let actors = HostActors::spawn(s, vm, &actor_cfg);
            let mut migration = with_migration.then(|| Migration::new(sc.seed, vm.memslot_views()));
            let mut timeline = Vec::new();
            let mut last_check = Instant::now();
            let (mut last_t, mut last_acc, mut last_faults) = (0.0f64, 0u64, 0u64);
            let accesses_now = || sum_counters(&counters);
            loop {
                thread::sleep(TICK);
                let el = t0.elapsed();
                let t = el.as_secs_f64();
                let acc = accesses_now();
                let c = vm.counters();
                if t > last_t {
                    timeline.push(NestedSample {
                        t,
                        accesses_per_s: acc.saturating_sub(last_acc) as f64 / (t - last_t),
                        faults_per_s: c.nested_faults.saturating_sub(last_faults) as f64
                            / (t - last_t),
                        rmap_entries: vm.rmap_totals().0,
                        rmap_bytes_max: c.rmap_bytes_max,
                        rmap_entries_max_per_gfn: c.rmap_entries_max_per_gfn,
                    });
                }
                (last_t, last_acc, last_faults) = (t, acc, c.nested_faults);
                if let Some(m) = migration.as_mut() {
                    m.run_round(vm, &mut migration_ops, &mut |_| {});
                }
                actors.end_phase();
                quiesce.check_when_due(&mut last_check, sc.check_interval_ms, nv, &actors, || {
                    checks.check(vm)
                });
                let flow = progress(&Progress::threaded(
                    t,
                    sc.duration_secs,
                    (acc, by_accesses),
                    actors.ops_so_far() + migration_ops.total(),
                    0,
                    checks.violations,
                ));
                if flow.is_break() {
                    interrupted = true;
                    break;
                }
                if run_done(acc, by_accesses, el, duration) {
                    break;
                }
            }
            quiesce.stop();
            let (out, err) = join_vcpus(handles, NestedRunError::Vcpu);
            let ops = actors.stop()?;
            match err {
                Some(e) => Err(e),
                None => Ok((out, ops, timeline)),
            }
        },
    );
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpus, mut host_ops, timeline) = outcome?;
    // The final check, everything stopped.
    checks.check(&vm);
    host_ops.merge(&migration_ops);
    let mut report = build_report(
        sc,
        &vm,
        false,
        elapsed,
        Outcome {
            cpus,
            host_ops,
            checks,
            timeline,
            host_digest: 0,
        },
    );
    report.interrupted = interrupted;
    Ok(report)
}
