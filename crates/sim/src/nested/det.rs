//! Deterministic nested simulation (`revmap run --mmu nested --deterministic`): the L1
//! vCPUs, memory pressure, aging and the migration loop on one thread, interleaved by a
//! seeded scheduler at L1-operation and host-operation granularity, with the nested
//! MMU's checker after every step.
//!
//! # Invariants
//!
//! * The schedule is a pure function of the seed (the scheduler's ChaCha8 stream picks
//!   the next agent; each L1 vCPU and actor draws from its own stream), so the event
//!   digest (every L2 result, every host operation and its result) is the same for the
//!   same seed and scenario.
//! * The checker runs after every step; the first violation (checker or guest
//!   mismatch) stops the run and is reported with its step, so a failing seed
//!   reproduces exactly; [`minimise_nested`] shrinks a failing scenario.

use super::l1::L1Cpu;
use super::run::{boot, build_report, Outcome};
use super::{Checks, NestedRunError, NestedRunReport, NestedSample, NestedScenario};
use crate::actors::{Actor, HostOps, Migration};
use crate::det::{fewer_actors_or_vcpus, shrink, DeterministicRun, VCPU_WEIGHT};
use crate::host::HostMmu;
use crate::report::digest_word;
use crate::run::Progress;
use crate::soak::{soak_scenario, DetSoak};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::ops::ControlFlow;
use std::time::Instant;

/// Runs `sc` deterministically ([`DeterministicRun::run_deterministic`]) with
/// `sc.deterministic.ram_mib` MiB of L1 RAM, calling `progress` after every step; a
/// [`ControlFlow::Break`] ends the run early (marked `interrupted`).
pub fn run_nested_deterministic_with(
    sc: &NestedScenario,
    mut progress: impl FnMut(&Progress) -> ControlFlow<()>,
) -> Result<NestedRunReport, NestedRunError> {
    let vm = boot(sc, sc.deterministic.ram_mib)?;
    let ram = vm.config().l1_memory_bytes;
    let nv = sc.l1.vcpus;
    let steps = sc.deterministic.steps;
    let t0 = Instant::now();
    let mut cpus = (0..nv)
        .map(|v| L1Cpu::new(sc, ram, v))
        .collect::<Result<Vec<_>, _>>()
        .map_err(NestedRunError::Setup)?;
    let slots = vm.memslot_views();
    let mut actors = Actor::stepped(sc.seed, &sc.host, &slots);
    let mut migration = Migration::stepped(sc.seed, &sc.host, slots);
    let mut sched = ChaCha8Rng::seed_from_u64(sc.seed);
    sched.set_stream(0x4e57);
    let n_host = actors.len() + usize::from(migration.is_some());
    let total_w = nv as u32 * VCPU_WEIGHT + n_host as u32;
    let mut host_ops = HostOps::default();
    let mut host_digest = 0u64;
    let mut checks = Checks::default();
    let mut timeline = Vec::new();
    let sample_every = (steps / 100).max(1);
    let (mut last_acc, mut last_faults) = (0u64, 0u64);
    let mut failing_step = None;
    let mut interrupted = false;
    let mut done = 0;
    for step in 0..steps {
        let x = sched.gen_range(0..total_w.max(1));
        if x < nv as u32 * VCPU_WEIGHT {
            if let Some(c) = cpus.get_mut((x / VCPU_WEIGHT) as usize) {
                c.step(&vm);
            }
        } else {
            let h = (x - nv as u32 * VCPU_WEIGHT) as usize;
            let before = host_ops;
            let op = match actors.get_mut(h) {
                Some(a) => a.step(&vm, &mut host_ops),
                None => migration
                    .as_mut()
                    .and_then(|m| m.step(&vm, &mut host_ops, &mut |_| {})),
            };
            if let Some(op) = op {
                for b in format!("{op:?}").bytes() {
                    host_digest = digest_word(host_digest, u64::from(b));
                }
                host_digest =
                    digest_word(host_digest, host_ops.hptes_unmapped - before.hptes_unmapped);
                host_digest = digest_word(host_digest, host_ops.dirty_pages - before.dirty_pages);
                host_digest =
                    digest_word(host_digest, host_ops.age_gfn_young - before.age_gfn_young);
            }
        }
        done = step + 1;
        checks.check(&vm);
        let mismatches: u64 = cpus.iter().map(|c| c.counters.mismatches).sum();
        if checks.violations + mismatches != 0 {
            let first = checks
                .first
                .clone()
                .or_else(|| cpus.iter().find_map(|c| c.counters.first_mismatch.clone()));
            checks.first = first.map(|v| format!("step {step}: {v}"));
            failing_step = Some(step);
            break;
        }
        let accesses: u64 = cpus.iter().map(|c| c.counters.accesses).sum();
        if done % sample_every == 0 || done == steps {
            let c = vm.counters();
            let per = sample_every as f64;
            timeline.push(NestedSample {
                t: done as f64,
                accesses_per_s: accesses.saturating_sub(last_acc) as f64 / per,
                faults_per_s: c.nested_faults.saturating_sub(last_faults) as f64 / per,
                rmap_entries: vm.rmap_totals().0,
                rmap_bytes_max: c.rmap_bytes_max,
                rmap_entries_max_per_gfn: c.rmap_entries_max_per_gfn,
            });
            (last_acc, last_faults) = (accesses, c.nested_faults);
        }
        let flow = progress(&Progress {
            elapsed: t0.elapsed().as_secs_f64(),
            duration: 0.0,
            fraction: done as f64 / steps.max(1) as f64,
            steps: done,
            hcalls: accesses,
            host_ops: host_ops.total(),
            hpt_order: 0,
            violations: checks.violations,
        });
        if flow.is_break() {
            interrupted = true;
            break;
        }
    }
    let mut report = build_report(
        sc,
        &vm,
        true,
        t0.elapsed().as_secs_f64(),
        Outcome {
            cpus,
            host_ops,
            checks,
            timeline,
            host_digest,
        },
    );
    report.steps = done;
    report.verdict.failing_step = failing_step;
    report.interrupted = interrupted;
    Ok(report)
}

/// Shrinks a failing deterministic nested scenario (with the shrink loop of
/// [`crate::det::minimise`]): cuts it just after the failing step, then keeps dropping a
/// host actor, an L1 vCPU or an L2 per vCPU while the run still fails. Returns `None` if `sc` does not fail.
pub fn minimise_nested(
    sc: &NestedScenario,
) -> Result<Option<(NestedScenario, NestedRunReport)>, NestedRunError> {
    shrink(
        sc,
        |s| s.run_deterministic().map(|r| (r.verdict.failing_step, r)),
        |s, steps| s.deterministic.steps = steps,
        |best| {
            let mut candidates =
                fewer_actors_or_vcpus(best, |s| (&mut s.host.actors, &mut s.l1.vcpus));
            if best.l1.l2s_per_vcpu > 1 {
                let mut c = best.clone();
                c.l1.l2s_per_vcpu -= 1;
                candidates.push(c);
            }
            candidates.retain(|c| c.validate().is_ok());
            candidates
        },
    )
}

/// The nested simulator as `revmap soak` drives it: each seed a deterministic run of a
/// base scenario.
pub type NestedSoak = DetSoak<NestedScenario>;

soak_scenario!(
    NestedScenario,
    "nested",
    "--mmu nested --deterministic",
    NestedRunReport,
    NestedRunError,
    run_nested_deterministic_with,
    minimise_nested
);
