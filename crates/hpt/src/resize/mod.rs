//! What the HPT crate provides for live resizing, which itself lives in the
//! `revmap-resize` crate (H_RESIZE_HPT_PREPARE / H_RESIZE_HPT_COMMIT):
//!
//! * [`cell`]: how a [`Vm`] holds a swappable table, with the vCPU gate a commit
//!   closes to pivot (read on every hypercall, so it stays here);
//! * [`track`]: per-HPTE change tracking of the current table (a pre-copy commit
//!   switches it on; the hypercall and fault paths mark what they change);
//! * [`HptResizer`]: the extension point a [`Vm`] calls for the two resize
//!   hypercalls. A VM created by [`Vm::new`] has none and answers both calls with
//!   H_FUNCTION, as a hypervisor without the feature does (QEMU registers the pair,
//!   advertised to the guest as "hcall-hpt-resize", only when resizing is enabled, and
//!   answers H_FUNCTION for an unregistered hypercall); [`Vm::with_resizer`] installs
//!   one.
//!
//! The resizer is called only on the two resize opcodes (cold): the hypercall hot path
//! pays one relaxed load of the tracking flag and nothing else.

pub mod cell;
#[cfg(feature = "std")]
pub mod track;

use crate::error::PaprError;
use crate::vm::Vm;
use core::any::Any;
use core::fmt::Debug;

/// The two resize hypercalls of a [`Vm`] (KVM's `kvm_vm_ioctl_resize_hpt_prepare` and
/// `kvm_vm_ioctl_resize_hpt_commit`), installed with [`Vm::with_resizer`].
///
/// Both run with the calling vCPU out of the vCPU gate, like KVM's ioctls: a commit may
/// close the gate ([`cell::TableCell::close_and_drain`]) and pivot the table.
pub trait HptResizer: Send + Sync + Debug + Any {
    /// H_RESIZE_HPT_PREPARE with the guest's `flags` and `shift` registers.
    fn prepare(&self, vm: &Vm, flags: u64, shift: u64) -> Result<(), PaprError>;

    /// H_RESIZE_HPT_COMMIT with the guest's `flags` and `shift` registers.
    fn commit(&self, vm: &Vm, flags: u64, shift: u64) -> Result<(), PaprError>;

    /// Block until no preparation is in progress (a replay waits here before a PREPARE
    /// that the recording saw succeed). The default does not wait.
    fn wait_prepared(&self) {}

    /// The resizer as [`Any`], so that its crate can give back its concrete type.
    fn as_any(&self) -> &dyn Any;
}
