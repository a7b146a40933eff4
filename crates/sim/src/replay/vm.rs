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

    /// Run `body` with the port this thread's vCPUs issue their hypercalls through
    /// (KVM's vCPU runs: [`revmap_hpt::VcpuRuns`] for [`Vm`], entered once and
    /// pinned for the whole body). The default sends each call through
    /// [`hcall_regs`](Self::hcall_regs) ([`PerCall`]).
    fn with_vcpu_runs<B: RunBody<Self>>(&self, body: B) -> B::Output
    where
        Self: Sized,
    {
        body.run(self, &mut PerCall(self))
    }

    /// Block until no HPT resize preparation is in progress (the replayer calls it
    /// before a PREPARE whose recorded result is H_SUCCESS). Default: nothing to wait for.
    fn wait_resize_prepared(&self) {}

    /// The current HPT order, checked against `HPT_SHIFT` records (`None`: unknown).
    fn hpt_order(&self) -> Option<u32> {
        None
    }

    /// The MMU sets `bits` (R and/or C of dword 1) in HPTE `ptex` (a `HW_SET_R` /
    /// `HW_SET_C` record); returns dword 1 as the guest now sees it, or `None` if the
    /// entry is not guest-valid. Default: hardware updates are not modelled.
    fn hw_set_rc(&self, ptex: u64, bits: u64) -> Option<u64> {
        let _ = (ptex, bits);
        None
    }

    /// Runs the whole-VM invariant checker.
    fn check_invariants(&self) -> Result<(), Self::Violation>;

    /// Bits of output `out_index` (0 = r4) of `opcode` to ignore when comparing with a
    /// recorded QEMU result (empty for a bit-exact flavour).
    fn result_masks(&self, opcode: u64, out_index: usize) -> &'static [ResultMask];
}

/// Where a replay thread sends its vCPUs' hypercalls (see
/// [`Hypervisor::with_vcpu_runs`]).
pub trait HcallPort {
    /// One hypercall of vCPU `vcpu` with r4..r11 in `regs`, rewritten in place;
    /// returns r3.
    fn hcall_regs(&mut self, vcpu: usize, opcode: u64, regs: &mut [u64; 8]) -> i64;
}

/// A replay loop, generic over the port its hypercalls go through.
pub trait RunBody<H: ?Sized> {
    /// What the loop returns.
    type Output;
    /// Run the loop on `vm`, issuing hypercalls through `port`.
    fn run<P: HcallPort>(self, vm: &H, port: &mut P) -> Self::Output;
}

/// The default port: every hypercall enters and leaves the VM on its own.
#[derive(Debug)]
pub struct PerCall<'a, H: ?Sized>(pub &'a H);

impl<H: Hypervisor + ?Sized> HcallPort for PerCall<'_, H> {
    #[inline(always)]
    fn hcall_regs(&mut self, vcpu: usize, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        self.0.hcall_regs(vcpu, opcode, regs)
    }
}

impl HcallPort for revmap_hpt::VcpuRuns<'_> {
    #[inline(always)]
    fn hcall_regs(&mut self, vcpu: usize, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        revmap_hpt::VcpuRuns::hcall_regs(self, vcpu, opcode, regs)
    }
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

    #[inline]
    fn with_vcpu_runs<B: RunBody<Self>>(&self, body: B) -> B::Output {
        body.run(self, &mut self.vcpu_runs())
    }

    fn check_invariants(&self) -> Result<(), Self::Violation> {
        Vm::check_invariants(self).map(|_report| ())
    }

    fn wait_resize_prepared(&self) {
        self.resize_ctl().wait_prepared();
    }

    fn hw_set_rc(&self, ptex: u64, bits: u64) -> Option<u64> {
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
