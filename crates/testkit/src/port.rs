//! Hypercall-port plumbing for test fakes and reference models.
//!
//! A fake VM (a scripted responder, a plain model of QEMU's hypercalls, a host fake
//! that answers every call) keeps its state behind cells and answers a hypercall
//! through a shared reference ([`SharedHcalls`]), like the HPT `Vm`: a run of its calls
//! ([`HypercallPort::vcpu_runs`]) is [`SharedRuns`], a shared reference to it.
//! [`shared_hypercall_port!`](crate::shared_hypercall_port) writes the fake's own
//! [`HypercallPort`] impl (the orphan rule keeps a blanket impl out of this crate).

pub use revmap_hpt::{HypercallPort, VcpuId};

/// A test fake that answers hypercalls through a shared reference.
pub trait SharedHcalls {
    /// One hypercall of `vcpu`: r4..r11 in `regs`, rewritten in place; returns r3.
    fn answer(&self, vcpu: VcpuId, opcode: u64, regs: &mut [u64; 8]) -> i64;
}

/// A run of hypercalls on a [`SharedHcalls`] fake: a shared reference to it.
#[derive(Debug)]
pub struct SharedRuns<'a, T: ?Sized>(pub &'a T);

impl<T: SharedHcalls + ?Sized> HypercallPort for SharedRuns<'_, T> {
    type Runs<'b>
        = Self
    where
        Self: 'b;

    fn vcpu_runs(&self) -> Self {
        SharedRuns(self.0)
    }

    fn hcall_regs(&mut self, vcpu: VcpuId, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        self.0.answer(vcpu, opcode, regs)
    }
}

/// Implements [`HypercallPort`] for the [`SharedHcalls`] fake `$fake`: each call is
/// its [`answer`](SharedHcalls::answer), a run of calls is a [`SharedRuns`].
///
/// ```
/// use revmap_testkit::port::{HypercallPort, SharedHcalls, VcpuId};
/// use std::cell::Cell;
///
/// /// Counts its calls and answers H_FUNCTION (-2).
/// #[derive(Default)]
/// struct Counter(Cell<u32>);
///
/// impl SharedHcalls for Counter {
///     fn answer(&self, _vcpu: VcpuId, _opcode: u64, _regs: &mut [u64; 8]) -> i64 {
///         self.0.set(self.0.get() + 1);
///         -2
///     }
/// }
/// revmap_testkit::shared_hypercall_port!(Counter);
///
/// let mut vm = Counter::default();
/// assert_eq!(vm.hcall(VcpuId::ZERO, 0x04, &[]).ret, -2);
/// let mut runs = vm.vcpu_runs();
/// assert_eq!(runs.hcall(VcpuId::ZERO, 0x08, &[]).ret, -2);
/// assert_eq!(runs.vcpu_runs().hcall(VcpuId::ZERO, 0x08, &[]).ret, -2);
/// assert_eq!(vm.0.get(), 3);
/// ```
#[macro_export]
macro_rules! shared_hypercall_port {
    ($fake:ty) => {
        impl $crate::port::HypercallPort for $fake {
            type Runs<'a> = $crate::port::SharedRuns<'a, $fake>;

            fn vcpu_runs(&self) -> Self::Runs<'_> {
                $crate::port::SharedRuns(self)
            }

            fn hcall_regs(
                &mut self,
                vcpu: $crate::port::VcpuId,
                opcode: u64,
                regs: &mut [u64; 8],
            ) -> i64 {
                $crate::port::SharedHcalls::answer(self, vcpu, opcode, regs)
            }
        }
    };
}
