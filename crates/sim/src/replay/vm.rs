//! The replay engine's view of a VM: the library's [`HypercallPort`] for the
//! hypercalls and [`ReplayTarget`] for what the replay judges.
//!
//! Invariants: the engine touches a VM only through these traits, so it can be tested
//! with a fake; implementations must be bit-exact for the flavour they model and report
//! their flavour's documented differences through [`ReplayTarget::result_masks`].
//! [`revmap_hpt::Vm`] implements it with exactly [`revmap_hpt::result_masks`].

use core::fmt;

use revmap_hpt::{Flavour, HptError, Ptex, Vm, VmConfig};
pub use revmap_hpt::{HcallResult, HypercallPort, ResultMask};

/// The VM a trace file is replayed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// Guest RAM bytes: one region at gpa 0.
    pub ram_bytes: u64,
    /// HPT order (log2 of its size in bytes).
    pub hpt_order: u32,
}

/// What the replay engine needs from an MMU besides taking hypercalls: the checker,
/// the documented result differences, hardware R/C updates and resize waits. The
/// hypercalls themselves go through the library's one hypercall trait,
/// [`HypercallPort`] (a run of them through [`HypercallPort::vcpu_runs`]).
pub trait ReplayTarget: HypercallPort {
    /// A checker failure.
    type Violation: fmt::Display;

    /// Block until no HPT resize preparation is in progress (the replayer calls it
    /// before a PREPARE whose recorded result is H_SUCCESS). Default: nothing to wait for.
    fn wait_resize_prepared(&self) {}

    /// The current HPT order, checked against `HPT_SHIFT` records (`None`: unknown).
    fn hpt_order(&self) -> Option<u32> {
        None
    }

    /// The MMU sets `bits` (R and/or C of dword 1) in HPTE `ptex` (a `HW_SET_R` /
    /// `HW_SET_C` record); returns dword 1 as the guest now sees it, or `None` if the
    /// entry is not guest-valid (or `ptex` is outside the table). Default: hardware
    /// updates are not modelled.
    fn hw_set_rc(&self, ptex: Ptex, bits: u64) -> Option<u64> {
        let _ = (ptex, bits);
        None
    }

    /// Runs the whole-VM invariant checker.
    fn check_invariants(&self) -> Result<(), Self::Violation>;

    /// Bits of output `out_index` (0 = r4) of `opcode` to ignore when comparing with a
    /// recorded QEMU result (empty for a bit-exact flavour).
    fn result_masks(&self, opcode: u64, out_index: usize) -> &'static [ResultMask];
}

/// Host backing page shift used for replay RAM: 16 MiB pages back every page size the
/// traces use (4K, 64K, 16M).
pub const REPLAY_BACKING_PAGE_SHIFT: u32 = 24;

impl VmSpec {
    /// The [`VmConfig`] of a replay VM of `flavour`.
    pub fn vm_config(self, flavour: Flavour) -> VmConfig {
        VmConfig {
            ram_bytes: self.ram_bytes,
            hpt_order: self.hpt_order,
            flavour,
            backing_page_shift: REPLAY_BACKING_PAGE_SHIFT,
        }
    }
}

/// Creates the [`Vm`] for `spec`, with resizing (the factory the replay functions
/// take).
pub fn new_vm(flavour: Flavour, spec: VmSpec) -> Result<Vm, HptError> {
    revmap_resize::new_vm(spec.vm_config(flavour))
}

impl ReplayTarget for Vm {
    type Violation = revmap_hpt::Violation;

    fn check_invariants(&self) -> Result<(), Self::Violation> {
        Vm::check_invariants(self).map(|_report| ())
    }

    fn wait_resize_prepared(&self) {
        if let Some(r) = self.resizer() {
            r.wait_prepared();
        }
    }

    fn hw_set_rc(&self, ptex: Ptex, bits: u64) -> Option<u64> {
        Vm::hw_set_rc(self, ptex, bits)
    }

    fn hpt_order(&self) -> Option<u32> {
        Some(Vm::hpt_order(self))
    }

    #[inline]
    fn result_masks(&self, opcode: u64, out_index: usize) -> &'static [ResultMask] {
        revmap_hpt::result_masks(self.flavour(), opcode, out_index)
    }
}
