//! The replay engine's view of a VM: the [`Hypervisor`] trait.
//!
//! Invariants: the engine touches a VM only through this trait, so it can be tested
//! with a fake; implementations must be bit-exact for the flavour they model and report
//! their flavour's documented differences through [`Hypervisor::result_masks`].

use core::fmt;

/// The result of one hypercall: return code (r3) and output registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HcallResult {
    /// PAPR return code (r3), sign-extended.
    pub ret: i64,
    /// `out[0]` = r4, `out[1]` = r5, ...
    pub out: [u64; 8],
}

/// Bits of one output register to ignore when comparing, with the difference's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResultMask {
    /// Name of the documented difference.
    pub name: &'static str,
    /// Bits to ignore.
    pub mask: u64,
}

/// The VM a trace file is replayed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// Guest RAM bytes: one region at gpa 0.
    pub ram_bytes: u64,
    /// HPT order (log2 of its size in bytes).
    pub hpt_order: u32,
}

/// What the replay engine needs from a VM.
pub trait Hypervisor {
    /// A checker failure.
    type Violation: fmt::Display;

    /// One PAPR hypercall from `vcpu`; `args` = r4 ...
    fn hcall(&self, vcpu: usize, opcode: u64, args: &[u64]) -> HcallResult;

    /// Runs the whole-VM invariant checker.
    fn check_invariants(&self) -> Result<(), Self::Violation>;

    /// Bits of output `out_index` (0 = r4) of `opcode` to ignore when comparing with a
    /// recorded QEMU result (empty for a bit-exact flavour).
    fn result_masks(&self, opcode: u64, out_index: usize) -> &'static [ResultMask];
}
