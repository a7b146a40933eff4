//! The hypercall port: the one interface through which a VMM, a trace replayer or a
//! simulated guest sends hypercalls to a guest MMU, whatever the MMU (the PAPR hashed
//! page table today; the x86 shadow MMU and the nested-guest MMU plug into the same
//! trait).
//!
//! A port is used with the hardware hypercall ABI (PAPR's `sc 1`): the opcode in r3,
//! the arguments in r4..r11, the return code back in r3 and the outputs written over
//! r4..r11 ([`HypercallPort::hcall_regs`]). Registers a call does not write keep their
//! input values, as on real hardware.
//!
//! Two kinds of values implement it:
//!
//! * the VM itself (a shared reference to it): each call enters and leaves the guest on
//!   its own (KVM's `kvmppc_pseries_do_hcall` reached through a fresh `KVM_RUN`);
//! * a vCPU run handle ([`HypercallPort::Runs`], from [`HypercallPort::vcpu_runs`]):
//!   the calling thread's vCPUs enter the guest once and stay in it for a run of calls
//!   (KVM's vCPU loop), leaving it on [`pause`](HypercallPort::pause) or drop.
//!
//! Code that drives an MMU (the replay engine, the simulator's workload model) is
//! generic over this trait only, so a new MMU adds no branch to it.
//!
//! # Example
//!
//! A port that answers every call with H_FUNCTION (-2), driven through the trait:
//!
//! ```
//! use revmap_host::port::{HcallResult, HypercallPort};
//! use revmap_rmap::VcpuId;
//!
//! struct NoHcalls;
//! impl HypercallPort for NoHcalls {
//!     type Runs<'a> = NoHcalls;
//!     fn vcpu_runs(&self) -> NoHcalls {
//!         NoHcalls
//!     }
//!     fn hcall_regs(&mut self, _vcpu: VcpuId, _opcode: u64, _regs: &mut [u64; 8]) -> i64 {
//!         -2
//!     }
//! }
//!
//! let mut runs = NoHcalls.vcpu_runs();
//! let r = runs.hcall(VcpuId::ZERO, 0x08, &[0, 0, 1, 2]);
//! assert_eq!(r, HcallResult { ret: -2, out: [0, 0, 1, 2, 0, 0, 0, 0] });
//! ```

use revmap_rmap::VcpuId;

/// Result of one hypercall: r3 and the output registers r4..r11.
///
/// Registers a call does not write keep their input values (as on real hardware), so a
/// failed call returns its inputs in `out`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HcallResult {
    /// Return code (r3).
    pub ret: i64,
    /// r4..r11.
    pub out: [u64; 8],
}

impl HcallResult {
    /// Make a call whose arguments are a slice: `args` go into r4.. (missing ones read
    /// as 0, extra ones ignored), `call` runs on the register block and returns r3.
    #[inline]
    pub fn with_args(args: &[u64], call: impl FnOnce(&mut [u64; 8]) -> i64) -> Self {
        let mut out = [0u64; 8];
        let n = args.len().min(out.len());
        out[..n].copy_from_slice(&args[..n]);
        let ret = call(&mut out);
        HcallResult { ret, out }
    }
}

/// Something that takes hypercalls (module docs): a VM, or its vCPUs in the guest.
pub trait HypercallPort {
    /// The port of a run of hypercalls by the calling thread's vCPUs (entered lazily,
    /// left by [`pause`](Self::pause) or drop).
    type Runs<'a>: HypercallPort
    where
        Self: 'a;

    /// Start a run of hypercalls on the calling thread (KVM's vCPU run).
    fn vcpu_runs(&self) -> Self::Runs<'_>;

    /// One hypercall of `vcpu` with r4..r11 in `regs`, rewritten in place; returns r3.
    /// This is the hot path: implementations must not copy the register block.
    fn hcall_regs(&mut self, vcpu: VcpuId, opcode: u64, regs: &mut [u64; 8]) -> i64;

    /// One hypercall with its arguments as a slice (r4.., missing ones read as 0,
    /// extra ones ignored).
    #[inline]
    fn hcall(&mut self, vcpu: VcpuId, opcode: u64, args: &[u64]) -> HcallResult {
        HcallResult::with_args(args, |regs| self.hcall_regs(vcpu, opcode, regs))
    }

    /// Leave the guest until the next hypercall (before the thread blocks on anything
    /// the hypervisor may wait for). Default: nothing to leave.
    #[inline]
    fn pause(&mut self) {}
}

impl<P: HypercallPort + ?Sized> HypercallPort for &mut P {
    type Runs<'a>
        = P::Runs<'a>
    where
        Self: 'a;

    #[inline]
    fn vcpu_runs(&self) -> Self::Runs<'_> {
        (**self).vcpu_runs()
    }

    #[inline(always)]
    fn hcall_regs(&mut self, vcpu: VcpuId, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        (**self).hcall_regs(vcpu, opcode, regs)
    }

    #[inline]
    fn pause(&mut self) {
        (**self).pause();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Echoes the opcode into r4 and counts calls and pauses.
    #[derive(Default)]
    struct Echo {
        calls: u32,
        pauses: u32,
    }

    impl HypercallPort for Echo {
        type Runs<'a> = Echo;
        fn vcpu_runs(&self) -> Echo {
            Echo::default()
        }
        fn hcall_regs(&mut self, vcpu: VcpuId, opcode: u64, regs: &mut [u64; 8]) -> i64 {
            self.calls += 1;
            regs[0] = opcode;
            regs[7] = vcpu.index() as u64;
            0
        }
        fn pause(&mut self) {
            self.pauses += 1;
        }
    }

    #[test]
    fn slice_call_pads_and_truncates_arguments() {
        let mut e = Echo::default();
        let v = VcpuId::new(3).unwrap();
        let r = e.hcall(v, 0x18, &[9, 8]);
        assert_eq!(r.out, [0x18, 8, 0, 0, 0, 0, 0, 3]);
        let r = e.hcall(v, 0x04, &[1; 12]);
        assert_eq!(r.out, [0x04, 1, 1, 1, 1, 1, 1, 3]);
        assert_eq!(e.calls, 2);
    }

    #[test]
    fn mutable_reference_forwards() {
        let mut e = Echo::default();
        {
            let mut r = &mut e;
            HypercallPort::hcall(&mut r, VcpuId::ZERO, 1, &[]);
            HypercallPort::pause(&mut r);
        }
        assert_eq!((e.calls, e.pauses), (1, 1));
    }
}
