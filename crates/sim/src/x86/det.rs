//! Deterministic x86 simulation (`revmap run --mmu x86 --deterministic`): every vCPU's
//! guest, memory pressure, aging and the migration actor on one thread, interleaved by
//! a seeded scheduler (a vCPU step is one guest operation; a host step one host
//! operation), with the shadow MMU checker after every step.
//!
//! # Invariants
//!
//! * The schedule is a pure function of the seed (the scheduler's ChaCha8 stream picks
//!   the agent; every agent draws from its own stream), so the event digest (every
//!   guest operation and access outcome, every host operation and its result) is the
//!   same for the same seed and scenario.
//! * After every step the checker runs and the guest's mismatch count is read; the
//!   first failure stops the run and is reported with its step.
//! * [`minimise`] shrinks a failing scenario (fewer steps, host actors, vCPUs) while it
//!   still fails; [`X86Soak`] runs many seeds for `revmap soak`.

use super::run::Checks;
use super::{
    build, merge_cpus, Collected, DirtyLogPasses, X86Report, X86RunError, X86Sample, X86Scenario,
};
use crate::actors::{Actor, HostOps};
use crate::det::{digest_str, fewer_actors_or_vcpus, shrink, DeterministicRun, VCPU_WEIGHT};
use crate::report::digest_word;
use crate::run::Progress;
use crate::soak::{soak_scenario, DetSoak};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use revmap_shadow::vm::ShadowVm;
use std::ops::ControlFlow;
use std::time::Instant;

use super::guest;

/// Runs `sc` deterministically ([`DeterministicRun::run_deterministic`]), calling `progress` after every step (`hcalls` carries
/// the guest accesses); a [`ControlFlow::Break`] ends the run early (the report is
/// marked `interrupted`). The callback sees only counts, so it cannot change the
/// schedule or the digest.
pub fn run_x86_deterministic_with(
    sc: &X86Scenario,
    mut progress: impl FnMut(&Progress) -> ControlFlow<()>,
) -> Result<X86Report, X86RunError> {
    let ram_mib = sc.deterministic.ram_mib;
    let (vm, kernel, mut cpus) = build(sc, ram_mib)?;
    let nv = cpus.len();
    let steps = sc.deterministic.steps;
    let t0 = Instant::now();
    let mut actors = Actor::stepped(sc.seed, &sc.host, &vm_slots(&vm));
    let with_migration = sc.host.migrates();
    let mut migration = DirtyLogPasses::new(sc.seed, sc.migration);
    let mut host_ops = HostOps::default();
    let mut host_digest = 0u64;
    let mut checks = Checks::default();
    let mut sched = ChaCha8Rng::seed_from_u64(sc.seed);
    sched.set_stream(0x86_5ced);
    let n_host = actors.len() + usize::from(with_migration);
    let total_w = nv as u32 * VCPU_WEIGHT + n_host as u32;
    let sample_every = (steps / 100).max(1);
    let mut timeline = vec![X86Sample::of(&vm, 0.0, 0)];
    let mut failing_step = None;
    let mut interrupted = false;
    let mut done = 0;
    let accesses = |cpus: &[guest::X86Cpu]| -> u64 {
        cpus.iter()
            .map(|c| c.counters.accesses + c.counters.kernel_accesses)
            .sum()
    };
    for step in 0..steps {
        let mut x = sched.gen_range(0..total_w.max(1));
        if x < nv as u32 * VCPU_WEIGHT {
            if let Some(cpu) = cpus.get_mut((x / VCPU_WEIGHT) as usize) {
                cpu.step(&vm);
            }
        } else {
            x -= nv as u32 * VCPU_WEIGHT;
            if let Some(a) = actors.get_mut(x as usize) {
                let before = host_ops.hptes_unmapped;
                if let Some(op) = a.step(&vm, &mut host_ops) {
                    host_digest = digest_str(host_digest, &format!("{op:?}"));
                    host_digest = digest_word(host_digest, host_ops.hptes_unmapped - before);
                }
            } else if with_migration {
                host_digest = digest_word(host_digest, migration.step(&vm, false));
            }
        }
        done = step + 1;
        let mismatches: u64 = cpus.iter().map(|c| c.counters.mismatches).sum();
        if !checks.check(&vm) || mismatches > 0 || migration.errors > 0 {
            failing_step = Some(step);
            break;
        }
        if done % sample_every == 0 {
            timeline.push(X86Sample::of(&vm, done as f64, accesses(&cpus)));
        }
        let flow = progress(&Progress {
            elapsed: t0.elapsed().as_secs_f64(),
            duration: 0.0,
            fraction: done as f64 / steps.max(1) as f64,
            steps: done,
            hcalls: accesses(&cpus),
            host_ops: host_ops.total() + migration.ops.total(),
            hpt_order: 0,
            violations: checks.failures,
        });
        if flow.is_break() {
            interrupted = true;
            break;
        }
    }
    let (mut guest, digest) = merge_cpus(&cpus);
    let digest = digest_word(digest, host_digest);
    if timeline.last().is_some_and(|s| s.t < done as f64) {
        timeline.push(X86Sample::of(&vm, done as f64, accesses(&cpus)));
    }
    checks.first = checks.first.map(|v| match failing_step {
        Some(s) => format!("step {s}: {v}"),
        None => v,
    });
    if let (Some(s), None) = (failing_step, &checks.first) {
        if let Some(m) = guest.first_mismatch.as_mut() {
            *m = format!("step {s}: {m}");
        }
    }
    let mut report = X86Report::assemble(
        sc,
        &vm,
        Collected {
            deterministic: true,
            steps: done,
            elapsed: t0.elapsed().as_secs_f64(),
            ram_mib,
            kernel,
            guest,
            digest,
            host_ops,
            migration,
            checks,
            timeline,
        },
    );
    report.verdict.failing_step = failing_step;
    report.interrupted = interrupted;
    Ok(report)
}

fn vm_slots(vm: &ShadowVm) -> Vec<crate::host::SlotView> {
    use crate::host::HostMmu;
    vm.memslot_views()
}

/// Shrinks a failing deterministic scenario: cuts the run just after the failing step,
/// then repeatedly tries dropping a host actor or a vCPU, keeping any change after
/// which the run still fails. Returns `None` if `sc` does not fail.
pub fn minimise(sc: &X86Scenario) -> Result<Option<(X86Scenario, X86Report)>, X86RunError> {
    shrink(
        sc,
        |s| s.run_deterministic().map(|r| (r.verdict.failing_step, r)),
        |s, steps| s.deterministic.steps = steps,
        |best| fewer_actors_or_vcpus(best, |s| (&mut s.host.actors, &mut s.guest.vcpus)),
    )
}

/// The x86 simulator as `revmap soak` drives it: each seed a deterministic run of a
/// base scenario.
pub type X86Soak = DetSoak<X86Scenario>;

soak_scenario!(
    X86Scenario,
    "x86",
    "--mmu x86 --deterministic",
    X86Report,
    X86RunError,
    run_x86_deterministic_with,
    minimise
);

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64, steps: u64) -> X86Scenario {
        let mut sc = X86Scenario {
            seed,
            ..X86Scenario::default()
        };
        sc.deterministic.steps = steps;
        sc.deterministic.ram_mib = 128;
        sc.migration.pause_ticks = 20;
        sc
    }

    #[test]
    fn several_seeds_run_clean_with_a_check_after_every_step() {
        for seed in 1..=4 {
            let r = small(seed, 1500).run_deterministic().unwrap();
            assert_eq!(
                r.verdict.invariant_violations, 0,
                "seed {seed}: {:?}",
                r.verdict.first_violation
            );
            assert_eq!(r.verdict.invariant_checks, 1500);
            assert_eq!(r.verdict.failing_step, None);
            assert!(
                r.guest.forks + r.guest.execs > 0,
                "seed {seed}: {:?}",
                r.guest
            );
            assert!(r.shadow.page_faults > 0 && r.shadow.write_protected_gfns > 0);
            assert!(r.host_ops.get_dirty_log > 0 && r.host_ops.age_gfn > 0);
        }
    }

    #[test]
    fn soak_runs_every_seed_with_a_check_every_step() {
        crate::soak::assert_soaks_clean(&X86Soak::new(small(1, 0)));
    }

    #[test]
    fn the_same_seed_gives_the_same_digest_and_another_seed_another() {
        let a = small(7, 600).run_deterministic().unwrap();
        let b = small(7, 600).run_deterministic().unwrap();
        let c = small(8, 600).run_deterministic().unwrap();
        assert_eq!(a.verdict.digest, b.verdict.digest);
        assert_eq!(a.shadow, b.shadow);
        assert_ne!(a.verdict.digest, c.verdict.digest);
    }

    #[test]
    fn the_direct_map_gets_huge_sptes_with_huge_host_pages() {
        let mut sc = small(3, 1500);
        sc.deterministic.ram_mib = 1088;
        sc.host.actors.clear();
        let r = sc.run_deterministic().unwrap();
        assert_eq!(
            r.verdict.invariant_violations, 0,
            "{:?}",
            r.verdict.first_violation
        );
        assert_eq!((r.direct_map.pages_1g, r.direct_map.pages_2m), (1, 32));
        assert!(r.shadow.huge_sptes > 0, "{:?}", r.shadow);
        assert_eq!(minimise(&sc).unwrap().map(|m| m.0), None, "a clean run");
    }
}
