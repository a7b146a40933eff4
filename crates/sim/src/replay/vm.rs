//! The replay engine's view of a VM: the [`Hypervisor`] trait.
//!
//! Invariants: the engine touches a VM only through this trait, so it can be tested
//! with a fake; implementations must be bit-exact for the flavour they model and report
//! their flavour's documented differences through [`Hypervisor::result_masks`].
//! [`revmap_hpt::Vm`] implements it with exactly [`revmap_hpt::result_masks`].

use core::fmt;

use revmap_hpt::{Flavour, HptError, Vm, VmConfig};
pub use revmap_hpt::{HcallResult, ResultMask};

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

    /// One PAPR hypercall with r4..r11 in `regs`, rewritten in place (the hot path of
    /// pre-parsed replay); returns r3. The default goes through [`hcall`](Self::hcall).
    #[inline]
    fn hcall_regs(&self, vcpu: usize, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        let r = self.hcall(vcpu, opcode, regs);
        *regs = r.out;
        r.ret
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

/// Creates the [`Vm`] for `spec` (the factory the replay functions take).
pub fn new_vm(flavour: Flavour, spec: VmSpec) -> Result<Vm, HptError> {
    Vm::new(spec.vm_config(flavour))
}

impl Hypervisor for Vm {
    type Violation = revmap_hpt::Violation;

    #[inline(always)]
    fn hcall(&self, vcpu: usize, opcode: u64, args: &[u64]) -> HcallResult {
        Vm::hcall(self, vcpu, opcode, args)
    }

    #[inline(always)]
    fn hcall_regs(&self, vcpu: usize, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        Vm::hcall_regs(self, vcpu, opcode, regs)
    }

    fn check_invariants(&self) -> Result<(), Self::Violation> {
        Vm::check_invariants(self).map(|_report| ())
    }

    #[inline]
    fn result_masks(&self, opcode: u64, out_index: usize) -> &'static [ResultMask] {
        revmap_hpt::result_masks(self.flavour(), opcode, out_index)
    }
}
