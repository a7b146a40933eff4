//! Replay under host interference: a trace is replayed in its recorded order on one
//! vCPU thread while the host actors ([`crate::actors`]) run on other threads against
//! the same VM.
//!
//! # Invariants
//!
//! * The guest must not see the host: every result is judged exactly as in a plain
//!   replay (same masks), so any effect of an unmap, aging pass or dirty-log harvest on
//!   a guest-visible value is a mismatch.
//! * Quiescent checks: every `check_every` calls (and at the end) the actors are paused
//!   between operations, the whole-VM checker runs, and the actors resume.
//! * Interleaving is guaranteed, not hoped for: the replay is cut into phases of
//!   `phase_calls` calls, each actor performs exactly `ops_per_phase` operations per
//!   phase, and the replay does not start the next phase before they are done. The
//!   number of host operations is therefore about `phases * actors * ops_per_phase`.

use crate::actors::{ActorConfig, ActorPanicked, HostActors, HostOps};
use crate::host::HostMmu;
use crate::replay::{
    replay_preparsed, FileReport, HypercallPort, PreparsedTrace, ReplayError, ReplayOptions,
    ReplayTarget, ResultMask, VmSpec,
};
use core::cell::Cell;
use core::fmt;
use revmap_hpt::{Ptex, VcpuId};
use revmap_rmap::sync::thread;
use std::num::NonZeroU64;
use std::path::Path;

/// Default replay phase length (calls).
pub const DEFAULT_PHASE_CALLS: u64 = 256;
/// Default operations per actor per phase.
pub const DEFAULT_OPS_PER_PHASE: u64 = 4;
/// Default checker interval under interference (calls).
pub const DEFAULT_CHECK_EVERY: u64 = 4096;

/// Options of a replay under host interference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterferenceOptions {
    /// The actors (seed, which ones, operations per phase).
    pub actors: ActorConfig,
    /// Calls per phase.
    pub phase_calls: NonZeroU64,
    /// Run the checker (actors paused) every this many calls and at the end.
    pub check_every: NonZeroU64,
}

impl InterferenceOptions {
    /// All three actors seeded with `seed`, with the default phase length, operations
    /// per phase and checker interval.
    pub fn new(seed: u64) -> Self {
        Self {
            actors: ActorConfig {
                ops_per_phase: NonZeroU64::new(DEFAULT_OPS_PER_PHASE),
                ..ActorConfig::all(seed)
            },
            phase_calls: NonZeroU64::new(DEFAULT_PHASE_CALLS).unwrap_or(NonZeroU64::MIN),
            check_every: NonZeroU64::new(DEFAULT_CHECK_EVERY).unwrap_or(NonZeroU64::MIN),
        }
    }
}

/// The outcome of a replay under interference.
#[derive(Clone, Debug, PartialEq)]
pub struct InterferenceReport {
    /// The replay's own report (matches, mismatches, checks, violations).
    pub replay: FileReport,
    /// Host operations performed while the trace replayed.
    pub host_ops: HostOps,
    /// Phases completed.
    pub phases: u64,
    /// The actors' seed.
    pub seed: u64,
}

impl InterferenceReport {
    /// The replay passed (see [`FileReport::passed`]).
    pub fn passed(&self) -> bool {
        self.replay.passed()
    }
}

/// Why a replay under interference could not complete.
#[derive(Debug, thiserror::Error)]
pub enum InterferenceError {
    /// The trace could not be read, or the VM not created.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// A host actor panicked.
    #[error(transparent)]
    Actor(#[from] ActorPanicked),
}

/// The VM as the replay sees it: every call goes to the VM on its own (in and out of
/// the guest, so no host operation ever waits for the replay thread); phase ends wait
/// for the actors; checks run with the actors paused.
struct Interfered<'a, 's, H> {
    vm: &'a H,
    actors: &'a HostActors<'s>,
    phase_calls: u64,
    calls: Cell<u64>,
    phases: Cell<u64>,
}

impl<H> Interfered<'_, '_, H> {
    /// Counts one call and ends the phase after every `phase_calls` calls.
    #[inline]
    fn count_call(&self) {
        let n = self.calls.get() + 1;
        self.calls.set(n);
        if n % self.phase_calls == 0 {
            self.phases.set(self.actors.end_phase());
        }
    }
}

/// The replay's port on an [`Interfered`] VM: the VM's own runs, left after each call.
struct InterferedRuns<'w, 'a, 's, H: HypercallPort + 'a> {
    w: &'w Interfered<'a, 's, H>,
    inner: H::Runs<'a>,
}

impl<'w, 'a, 's, H: HypercallPort + 'a> HypercallPort for InterferedRuns<'w, 'a, 's, H> {
    type Runs<'b>
        = InterferedRuns<'w, 'a, 's, H>
    where
        Self: 'b;

    fn vcpu_runs(&self) -> Self::Runs<'_> {
        self.w.vcpu_runs()
    }

    #[inline]
    fn hcall_regs(&mut self, vcpu: VcpuId, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        let r = self.inner.hcall_regs(vcpu, opcode, regs);
        // Out of the guest before the actors run their phase.
        self.inner.pause();
        self.w.count_call();
        r
    }
}

impl<'a, 's, H: HypercallPort + 'a> HypercallPort for Interfered<'a, 's, H> {
    type Runs<'w>
        = InterferedRuns<'w, 'a, 's, H>
    where
        Self: 'w;

    fn vcpu_runs(&self) -> Self::Runs<'_> {
        InterferedRuns {
            w: self,
            inner: self.vm.vcpu_runs(),
        }
    }

    fn hcall_regs(&mut self, vcpu: VcpuId, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        self.vcpu_runs().hcall_regs(vcpu, opcode, regs)
    }
}

impl<H: ReplayTarget> ReplayTarget for Interfered<'_, '_, H> {
    type Violation = H::Violation;

    fn wait_resize_prepared(&self) {
        self.vm.wait_resize_prepared();
    }

    fn hpt_order(&self) -> Option<u32> {
        self.vm.hpt_order()
    }

    fn hw_set_rc(&self, ptex: Ptex, bits: u64) -> Option<u64> {
        self.vm.hw_set_rc(ptex, bits)
    }

    fn check_invariants(&self) -> Result<(), Self::Violation> {
        self.actors.pause();
        let r = self.vm.check_invariants();
        self.actors.resume();
        r
    }

    fn result_masks(&self, opcode: u64, out_index: usize) -> &'static [ResultMask] {
        self.vm.result_masks(opcode, out_index)
    }
}

/// Replays `trace` onto `vm` (fresh, created for [`PreparsedTrace::vm_spec`]) while the
/// configured actors run against it.
pub fn replay_with_interference<H>(
    trace: &PreparsedTrace,
    vm: &H,
    opts: &InterferenceOptions,
) -> Result<InterferenceReport, ActorPanicked>
where
    H: ReplayTarget + HostMmu,
{
    thread::scope(|s| {
        let actors = HostActors::spawn(s, vm, &opts.actors);
        let w = Interfered {
            vm,
            actors: &actors,
            phase_calls: opts.phase_calls.get(),
            calls: Cell::new(0),
            phases: Cell::new(0),
        };
        let ropts = ReplayOptions {
            check_every: Some(opts.check_every),
        };
        let replay = replay_preparsed(trace, &w, &ropts);
        let phases = w.phases.get();
        let host_ops = actors.stop()?;
        Ok(InterferenceReport {
            replay,
            host_ops,
            phases,
            seed: opts.actors.seed,
        })
    })
}

/// Parses `path` whole, creates its VM with `make_vm`, and replays it under
/// interference (see [`replay_with_interference`]).
pub fn replay_file_with_interference<H, E>(
    path: impl AsRef<Path>,
    opts: &InterferenceOptions,
    make_vm: impl FnOnce(VmSpec) -> Result<H, E>,
) -> Result<InterferenceReport, InterferenceError>
where
    H: ReplayTarget + HostMmu,
    E: fmt::Display,
{
    let trace = PreparsedTrace::open(path)?;
    let vm = trace.make_vm(make_vm)?;
    Ok(replay_with_interference(&trace, &vm, opts)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{ram_slot, FakeHost};
    use revmap_trace::TraceReader;
    use std::io::Cursor;

    fn trace(calls: usize) -> PreparsedTrace {
        let mut text = String::from("HPT_ALLOC shift=18\n");
        for i in 0..calls {
            text.push_str(&format!(
                "H_PROTECT cpu=0 flags=0x0 ptex={:#x} avpn=0x0 -> ret=0\n",
                i % 64
            ));
        }
        let mut r = TraceReader::new(Cursor::new(text.into_bytes()), "fake.txt");
        PreparsedTrace::from_reader(&mut r).unwrap()
    }

    #[test]
    fn actors_interleave_in_phases_and_are_paused_for_checks() {
        let host = FakeHost::new(vec![ram_slot(1 << 15, false)]);
        let mut opts = InterferenceOptions::new(4);
        opts.phase_calls = NonZeroU64::new(50).unwrap();
        opts.check_every = NonZeroU64::new(100).unwrap();
        let rep = replay_with_interference(&trace(5000), &host, &opts).unwrap();
        assert_eq!(rep.replay.calls, 5000);
        assert_eq!(rep.replay.matched, 5000);
        assert_eq!(rep.phases, 100);
        assert_eq!(rep.replay.checks, 51);
        assert_eq!(
            rep.replay.invariant_violations, 0,
            "{:?}",
            rep.replay.first_violation
        );
        assert!(rep.passed());
        // 100 phases x 3 actors x 4 ops, plus at most one partial phase.
        assert!(
            (1200..=1212).contains(&rep.host_ops.total()),
            "{:?}",
            rep.host_ops
        );
        assert!(rep.host_ops.unmap_hva_range > 0 && rep.host_ops.age_gfn > 0);
        assert!(rep.host_ops.dirty_log_rounds > 300);
        assert!(host.violations().is_empty(), "{:?}", host.violations());
        assert_eq!(rep.seed, 4);
    }

    #[test]
    fn the_fake_checker_does_catch_unpaused_actors() {
        // Sanity check of the test above: without pausing, a check sees operations.
        let host = FakeHost::new(vec![ram_slot(1 << 15, false)]);
        let caught = thread::scope(|s| {
            let actors = HostActors::spawn(s, &host, &ActorConfig::all(1));
            let mut caught = false;
            for _ in 0..2000 {
                if host.check_invariants().is_err() {
                    caught = true;
                    break;
                }
            }
            actors.stop().unwrap();
            caught
        });
        assert!(caught);
    }
}
