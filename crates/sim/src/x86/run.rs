//! The threaded x86 run: one thread per vCPU runs its [`X86Cpu`] against the shared
//! [`ShadowVm`]; the host actors (memory pressure: `unmap_hva_range`, which unmaps
//! through `unmap_gfn_range` inside an MMU-notifier invalidation, and pages back in;
//! aging) run on their own threads ([`HostActors`]); the controller (the calling
//! thread) ticks every [`TICK`]: a sample, one migration step ([`DirtyLogPasses`]: a
//! whole dirty-log round, or switching dirty logging on or off), the actors' next
//! phase, and the checker at quiescent points (vCPUs parked between guest operations,
//! actors paused) every `check_interval_ms` and at the end.
//!
//! # Invariants
//!
//! * When [`Quiesce::park_all`] returns, no vCPU is inside a guest operation (so no
//!   guest is between a PTE store and its INVLPG) and none starts one until resumed.
//! * Atomics and threads come from `revmap_rmap::sync`.

use super::{
    build, merge_cpus, Collected, DirtyLogPasses, X86Report, X86RunError, X86Sample, X86Scenario,
};
use crate::actors::{ActorConfig, HostActors};
use crate::run::{join_vcpus, run_done, sum_counters, ExitGuard, Progress, Quiesce, TICK};
use guest::X86Cpu;
use revmap_rmap::sync::{thread, AtomicU64, Ordering};
use revmap_shadow::vm::ShadowVm;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use super::guest;

/// Guest operations a vCPU thread runs between two looks at the pause flag.
const OPS_PER_BATCH: usize = 16;

/// The shadow MMU checker at a quiescent point: (checks, failures, first failure).
#[derive(Debug, Default)]
pub(crate) struct Checks {
    pub(crate) checks: u64,
    pub(crate) failures: u64,
    pub(crate) first: Option<String>,
}

impl Checks {
    /// Runs the checker once; returns whether it passed.
    pub(crate) fn check(&mut self, vm: &ShadowVm) -> bool {
        self.checks += 1;
        match vm.check() {
            Ok(_) => true,
            Err(v) => {
                self.failures += 1;
                if self.first.is_none() {
                    self.first = Some(format!("shadow MMU invariant {}: {}", v.rule, v.detail));
                }
                false
            }
        }
    }
}

/// Runs `sc` threaded for its duration (or its access count), calling `progress` every
/// tick (`hcalls` carries the guest accesses); a [`ControlFlow::Break`] ends the run
/// early with a whole report marked `interrupted`.
pub fn run_x86(
    sc: &X86Scenario,
    mut progress: impl FnMut(&Progress) -> ControlFlow<()>,
) -> Result<X86Report, X86RunError> {
    let (vm, kernel, cpus) = build(sc, sc.guest.ram_mib)?;
    let nv = cpus.len();
    let quiesce = Quiesce::default();
    let counters: Vec<AtomicU64> = (0..nv).map(|_| AtomicU64::new(0)).collect();
    let actor_cfg = ActorConfig::threaded(sc.seed, &sc.host, sc.host.actor_kinds());
    let mut migration = DirtyLogPasses::new(sc.seed, sc.migration);
    let with_migration = sc.host.migrates();
    let mut checks = Checks::default();
    let duration = Duration::from_secs_f64(sc.duration_secs);
    let by_count = sc.stop_after_accesses;
    let mut interrupted = false;
    let t0 = Instant::now();
    let outcome = thread::scope(|s| -> Result<_, X86RunError> {
        let vm = &vm;
        let quiesce = &quiesce;
        let mut handles = Vec::with_capacity(nv);
        for (cpu, counter) in cpus.into_iter().zip(&counters) {
            handles.push(s.spawn(move || {
                let _guard = ExitGuard(quiesce);
                let mut cpu: X86Cpu = cpu;
                while !quiesce.stopping() {
                    if quiesce.maybe_park(|| {}) {
                        continue;
                    }
                    for _ in 0..OPS_PER_BATCH {
                        cpu.step(vm);
                    }
                    let c = &cpu.counters;
                    // ORDERING: Relaxed: a progress statistic.
                    counter.store(c.accesses + c.kernel_accesses, Ordering::Relaxed);
                }
                cpu
            }));
        }
        let actors = HostActors::spawn(s, vm, &actor_cfg);
        let accesses_now = || sum_counters(&counters);
        let mut timeline = vec![X86Sample::of(vm, 0.0, 0)];
        let mut last_check = Instant::now();
        loop {
            thread::sleep(TICK);
            let el = t0.elapsed();
            let t = el.as_secs_f64();
            let n = accesses_now();
            timeline.push(X86Sample::of(vm, t, n));
            if with_migration {
                migration.step(vm, true);
            }
            actors.end_phase();
            quiesce.check_when_due(&mut last_check, sc.check_interval_ms, nv, &actors, || {
                checks.check(vm);
            });
            let flow = progress(&Progress::threaded(
                t,
                sc.duration_secs,
                (n, by_count),
                actors.ops_so_far() + migration.ops.total(),
                0,
                checks.failures,
            ));
            if flow.is_break() {
                interrupted = true;
                break;
            }
            if run_done(n, by_count, el, duration) {
                break;
            }
        }
        quiesce.stop();
        let (out, err) = join_vcpus(handles, X86RunError::Vcpu);
        let ops = actors.stop()?;
        if let Some(e) = err {
            return Err(e);
        }
        Ok((out, ops, timeline))
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpus, host_ops, mut timeline) = outcome?;
    // The final check, everything stopped.
    checks.check(&vm);
    let (guest, digest) = merge_cpus(&cpus);
    // The final counts: a sample of their own, or the last tick's if it was just now
    // (a sliver of an interval would plot as a spurious drop of the rates).
    let total = guest.accesses + guest.kernel_accesses;
    match timeline.last_mut() {
        Some(last) if elapsed - last.t < TICK.as_secs_f64() / 2.0 => {
            *last = X86Sample::of(&vm, last.t, total);
        }
        _ => timeline.push(X86Sample::of(&vm, elapsed, total)),
    }
    let mut report = X86Report::assemble(
        sc,
        &vm,
        Collected {
            deterministic: false,
            steps: 0,
            elapsed,
            ram_mib: sc.guest.ram_mib,
            kernel,
            guest,
            digest,
            host_ops,
            migration,
            checks,
            timeline,
        },
    );
    report.interrupted = interrupted;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_threaded_run_checks_and_finds_nothing_wrong() {
        let mut sc = X86Scenario {
            stop_after_accesses: 20_000,
            check_interval_ms: 150,
            ..X86Scenario::default()
        };
        sc.guest.ram_mib = 256;
        sc.migration.rounds = 2;
        sc.migration.pause_ticks = 1;
        let r = run_x86(&sc, |_| ControlFlow::Continue(())).unwrap();
        assert_eq!(
            r.verdict.invariant_violations, 0,
            "{:?}",
            r.verdict.first_violation
        );
        assert!(r.accesses >= 20_000, "{}", r.accesses);
        assert!(r.verdict.invariant_checks >= 1);
        assert!(r.shadow.page_faults > 0 && r.guest.forks > 0, "{r:?}");
        assert!(
            r.host_ops.unmap_hva_range > 0 && r.host_ops.age_gfn > 0,
            "{r:?}"
        );
    }
}
