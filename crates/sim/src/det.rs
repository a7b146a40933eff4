//! Deterministic simulation (`revmap run --deterministic`): every actor -- the guest
//! vCPUs, memory pressure, aging, the migration loop and the resize controller -- on
//! one thread, interleaved by a seeded scheduler at guest-operation (a few hypercalls)
//! and host-operation granularity, with the whole-VM invariant checker after every
//! step.
//!
//! # Invariants
//!
//! * The schedule is a pure function of the seed: the scheduler's ChaCha8 stream picks
//!   the next actor; every actor draws from its own seeded stream; a resize PREPARE is
//!   polled by waiting for the preparation (never by time). Hence the event digest
//!   (every hypercall with its arguments and results, every host operation with its
//!   result) is the same for the same seed and scenario ([`DeterministicRun`]).
//! * The checker runs after every step; the first violation stops the run and is
//!   reported with its step number, so a failing seed reproduces exactly.
//! * [`minimise`] shrinks a failing scenario (fewer steps, actors, vCPUs, no resize)
//!   while it still fails.
//! * All vCPUs share one [`revmap_hpt::VcpuRuns`]; the resize calls pause it (out of
//!   the gate) so a COMMIT never waits for this thread.

use crate::actors::{Actor, HostOp, HostOps, Migration, MigrationEvent};
use crate::host::HostMmu;
use crate::report::{digest_word, HcallStats};
use crate::run::{build_report, make_vm, Controller, Progress, RunError, RunReport};
use crate::scenario::{HostActor, Scenario};
use crate::workload::GuestCpu;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use revmap_hpt::mmu::VcpuMmu;
use revmap_hpt::VcpuId;
use std::ops::ControlFlow;
use std::time::Instant;

/// Scheduler weight of one vCPU (host actors weigh 1 each).
pub const VCPU_WEIGHT: u32 = 4;

pub(crate) fn digest_str(mut d: u64, s: &str) -> u64 {
    for b in s.bytes() {
        d = digest_word(d, u64::from(b));
    }
    d
}

/// A scenario of one of the deterministic simulators (HPT: [`Scenario`], x86:
/// [`crate::x86::X86Scenario`], nested: [`crate::nested::NestedScenario`]): its run
/// for `deterministic.steps` steps on `deterministic.ram_mib` MiB of guest RAM
/// (module docs).
pub trait DeterministicRun {
    /// What the run reports.
    type Report;
    /// Why the run could not be set up.
    type Error;

    /// Runs deterministically, calling `progress` after every step; a
    /// [`ControlFlow::Break`] from it ends the run early (the report is marked
    /// `interrupted`). The callback sees only counts, so it cannot change the schedule
    /// or the digest.
    fn run_deterministic_with(
        &self,
        progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<Self::Report, Self::Error>;

    /// Runs deterministically to the end.
    fn run_deterministic(&self) -> Result<Self::Report, Self::Error> {
        self.run_deterministic_with(&mut |_| ControlFlow::Continue(()))
    }
}

/// Runs `sc` deterministically ([`DeterministicRun::run_deterministic`]), calling `progress` after every step; a
/// [`ControlFlow::Break`] from it ends the run early (the report is marked
/// `interrupted`; the checker has run after every step done). The callback sees
/// only counts, so it cannot change the schedule or the digest.
pub fn run_deterministic_with(
    sc: &Scenario,
    mut progress: impl FnMut(&Progress) -> ControlFlow<()>,
) -> Result<RunReport, RunError> {
    let vm = make_vm(sc, Some(sc.deterministic.ram_mib))?;
    let ram = sc.deterministic.ram_mib << 20;
    let nv = sc.guest.vcpus;
    let start_order = vm.hpt_order();
    let steps = sc.deterministic.steps;
    let t0 = Instant::now();
    let mut cpus = Vec::with_capacity(nv);
    let mut mmus = Vec::with_capacity(nv);
    for v in 0..nv {
        cpus.push(GuestCpu::new(VcpuId::new(v)?, sc.seed, ram, sc.workload)?);
        mmus.push(VcpuMmu::new(&vm)?);
    }
    let slots = vm.memslot_views();
    let mut actors = Actor::stepped(sc.seed, &sc.host, &slots);
    let mut migration = Migration::stepped(sc.seed, &sc.host, slots);
    let mut ctl = Controller::new(&vm, sc, true);
    let mut host_ops = HostOps::default();
    let mut host_digest = 0u64;
    let mut sched = ChaCha8Rng::seed_from_u64(sc.seed);
    sched.set_stream(0x5ced);
    let mut runs = vm.vcpu_runs();
    if let Some(c0) = cpus.first_mut() {
        c0.boot(&vm, &mut runs);
    }
    let n_agents = nv + actors.len() + usize::from(migration.is_some());
    let total_w = nv as u32 * VCPU_WEIGHT + (n_agents - nv) as u32;
    let mut next_resize = 0usize;
    let mut failing_step = None;
    let mut interrupted = false;
    for step in 0..steps {
        if let Some(r) = sc.resize.get(next_resize) {
            if step as f64 >= r.at * steps as f64 {
                next_resize += 1;
                ctl.resize(&mut runs, r.order_delta, step as f64, || {}, || {});
            }
        }
        let mut x = sched.gen_range(0..total_w.max(1));
        let agent = if x < nv as u32 * VCPU_WEIGHT {
            (x / VCPU_WEIGHT) as usize
        } else {
            x -= nv as u32 * VCPU_WEIGHT;
            nv + x as usize
        };
        if agent < nv {
            if let (Some(cpu), Some(mmu)) = (cpus.get_mut(agent), mmus.get_mut(agent)) {
                cpu.step(&vm, mmu, &mut runs);
            }
        } else if let Some(a) = actors.get_mut(agent - nv) {
            // Host operations run outside the guest (as host threads would).
            runs.pause();
            let before = host_ops.hptes_unmapped;
            if let Some(op) = a.step(&vm, &mut host_ops) {
                host_digest = digest_str(host_digest, &format!("{op:?}"));
                host_digest = digest_word(host_digest, host_ops.hptes_unmapped - before);
            }
        } else if let Some(m) = migration.as_mut() {
            runs.pause();
            let mut observe = |e: MigrationEvent<'_>| match e {
                MigrationEvent::RoundStart { .. } => ctl.rounds.push(0),
                MigrationEvent::Log { bitmap, .. } => {
                    let n: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
                    if let Some(last) = ctl.rounds.last_mut() {
                        *last += n;
                    }
                }
            };
            if let Some(op) = m.step(&vm, &mut host_ops, &mut observe) {
                let tag = match op {
                    HostOp::GetDirtyLog { slot, round } => (slot.0 as u64) << 32 | round,
                    HostOp::ClearDirtyLog { first_page, .. } => first_page,
                    _ => 0,
                };
                host_digest = digest_word(host_digest, tag);
                host_digest = digest_word(host_digest, host_ops.dirty_pages);
            }
        }
        runs.pause();
        ctl.check();
        if ctl.violations != 0 {
            if let Some(v) = ctl.first_violation.as_mut() {
                *v = format!("step {step}: {v}");
            }
            failing_step = Some(step);
            break;
        }
        let flow = progress(&Progress {
            elapsed: t0.elapsed().as_secs_f64(),
            duration: 0.0,
            fraction: (step + 1) as f64 / steps.max(1) as f64,
            steps: step + 1,
            hcalls: cpus.iter().map(|c| c.stats.total()).sum(),
            host_ops: host_ops.total(),
            hpt_order: vm.hpt_order(),
            violations: ctl.violations,
        });
        if flow.is_break() {
            interrupted = true;
            break;
        }
    }
    drop(runs);
    let mut stats = HcallStats::new()?;
    for c in &cpus {
        stats.merge(&c.stats);
    }
    stats.digest = digest_word(stats.digest, host_digest);
    let guest = stats.guest;
    drop(mmus);
    let mut report = build_report(
        sc,
        &vm,
        &mut ctl,
        true,
        t0.elapsed().as_secs_f64(),
        start_order,
        &stats,
        guest,
        host_ops,
        Vec::new(),
    );
    report.verdict.failing_step = failing_step;
    report.interrupted = interrupted;
    Ok(report)
}

/// Shrinks a failing deterministic scenario: cuts the run just after the failing step,
/// then repeatedly tries dropping the resize schedule, a host actor or a vCPU, keeping
/// any change after which the run still fails. Returns `None` if `sc` does not fail.
/// (A smaller scenario changes the schedule, so the failure it keeps may be found at a
/// different step; every candidate is re-run in full.)
pub fn minimise(sc: &Scenario) -> Result<Option<(Scenario, RunReport)>, RunError> {
    shrink(
        sc,
        |s| s.run_deterministic().map(|r| (r.verdict.failing_step, r)),
        |s, steps| s.deterministic.steps = steps,
        |best| {
            let mut candidates = Vec::new();
            if !best.resize.is_empty() {
                let mut c = best.clone();
                c.resize.clear();
                candidates.push(c);
            }
            candidates.extend(fewer_actors_or_vcpus(best, |s| {
                (&mut s.host.actors, &mut s.guest.vcpus)
            }));
            candidates
        },
    )
}

/// The shrinking loop of [`minimise`] for any kind of scenario (HPT, x86, nested):
/// `run` gives a scenario's failing step (if it fails) and its report, `cut` limits a
/// scenario to a number of steps, `smaller` lists the candidates one change smaller.
/// Cuts `sc` just after its failing step (keeping the uncut scenario if the cut one no
/// longer fails), then keeps the first candidate that still fails, cut just after its
/// failing step, until none does. Returns the smallest failing scenario found with its
/// report, or `None` if `sc` does not fail.
pub(crate) fn shrink<S: Clone, R, E>(
    sc: &S,
    run: impl Fn(&S) -> Result<(Option<u64>, R), E>,
    cut: impl Fn(&mut S, u64),
    smaller: impl Fn(&S) -> Vec<S>,
) -> Result<Option<(S, R)>, E> {
    let (failing, r) = run(sc)?;
    let Some(step) = failing else {
        return Ok(None);
    };
    let mut best = sc.clone();
    cut(&mut best, step + 1);
    let (failing, mut best_report) = run(&best)?;
    if failing.is_none() {
        return Ok(Some((sc.clone(), r)));
    }
    loop {
        let mut improved = false;
        for mut c in smaller(&best) {
            let (failing, rep) = run(&c)?;
            if let Some(s) = failing {
                cut(&mut c, s + 1);
                best = c;
                best_report = rep;
                improved = true;
                break;
            }
        }
        if !improved {
            return Ok(Some((best, best_report)));
        }
    }
}

/// The candidates of a shrinking step common to every simulator: `s` with one host
/// actor fewer (each in turn), and with one vCPU fewer (if it has more than one);
/// `parts` gives a scenario's actor list and vCPU count.
pub(crate) fn fewer_actors_or_vcpus<S: Clone>(
    s: &S,
    parts: fn(&mut S) -> (&mut Vec<HostActor>, &mut usize),
) -> Vec<S> {
    let mut s = s.clone();
    let (actors, vcpus) = parts(&mut s);
    let (n, nv) = (actors.len(), *vcpus);
    let mut out = Vec::new();
    for i in 0..n {
        let mut c = s.clone();
        parts(&mut c).0.remove(i);
        out.push(c);
    }
    if nv > 1 {
        let mut c = s.clone();
        *parts(&mut c).1 -= 1;
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Sc {
        actors: Vec<HostActor>,
        vcpus: usize,
        steps: u64,
    }

    #[test]
    fn shrinking_keeps_only_what_the_failure_needs() {
        let start = Sc {
            actors: vec![
                HostActor::MemoryPressure,
                HostActor::Aging,
                HostActor::Migration,
            ],
            vcpus: 3,
            steps: 100,
        };
        // Fails at step 7 while aging runs beside at least two vCPUs.
        let run = |s: &Sc| {
            Ok::<_, ()>((s.actors.contains(&HostActor::Aging) && s.vcpus >= 2).then_some(7u64))
        };
        let (best, rep) = shrink(
            &start,
            |s| run(s).map(|f| (f, f)),
            |s, n| s.steps = n,
            |s| fewer_actors_or_vcpus(s, |s| (&mut s.actors, &mut s.vcpus)),
        )
        .unwrap()
        .unwrap();
        let want = Sc {
            actors: vec![HostActor::Aging],
            vcpus: 2,
            steps: 8,
        };
        assert_eq!((best, rep), (want, Some(7)));
    }
}
