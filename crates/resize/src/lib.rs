//! Live resizing of a PAPR hashed page table: H_RESIZE_HPT_PREPARE /
//! H_RESIZE_HPT_COMMIT (KVM's `kvm_vm_ioctl_resize_hpt_prepare` and
//! `kvm_vm_ioctl_resize_hpt_commit`, QEMU's `h_resize_hpt_prepare/commit`), the rehash, the stop-the-world and the pre-copy
//! commits, in the KVM and QEMU flavours.
//!
//! A [`Vm`] of `revmap-hpt` answers the two hypercalls with H_FUNCTION unless a
//! resizer is installed: [`new_vm`] creates a VM with a [`ResizeCtl`] installed (or
//! install one with [`Vm::with_resizer`] and [`ResizeCtl::for_config`]);
//! [`ResizeVmExt::resize_ctl`] gives the controller back (statistics, the commit mode,
//! waiting for a preparation). What the resize protocol needs of the VM (the table
//! cell and its vCPU gate, HPTE change tracking, the rmap and memslot walkers) is
//! public API of `revmap-hpt`.
//!
//! # Example
//!
//! ```
//! use revmap_hpt::{Flavour, PaprError, VmConfig};
//! use revmap_resize::{new_vm, ResizeVmExt};
//!
//! let cfg = VmConfig { ram_bytes: 256 << 20, hpt_order: 18, flavour: Flavour::Kvm, backing_page_shift: 24 };
//! let vm = new_vm(cfg)?;
//! // PREPARE starts allocating in the background (a long-busy answer) ...
//! let first = vm.h_resize_hpt_prepare(19);
//! assert!(first.is_ok() || first.is_err_and(PaprError::is_long_busy));
//! vm.resize_ctl().expect("installed by new_vm").wait_prepared();
//! // ... then reports the table ready, and COMMIT pivots to it.
//! vm.h_resize_hpt_prepare(19)?;
//! vm.h_resize_hpt_commit(19)?;
//! assert_eq!(vm.hpt_order(), 19);
//! // A VM without a resizer answers as a hypervisor without the feature.
//! let plain = revmap_hpt::Vm::new(cfg)?;
//! assert_eq!(plain.h_resize_hpt_prepare(19), Err(PaprError::Function));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The pending request
//!
//! At most one request is pending, in `state::Pending` under `mmu_setup_lock` (a mutex):
//! * `Allocating { id }`: the VM's preparation worker (one persistent thread per VM,
//!   started with the [`ResizeCtl`], joined when it is dropped: [`worker`]) is allocating
//!   the new table, or will once it takes the job PREPARE posted, and **owns it**.
//!   Cancelling (PREPARE with another shift or 0, or a KVM commit refusal) only
//!   *detaches* the request (replaces the state); the worker, on finishing, finds a
//!   different `id` and frees its table itself. This is KVM's `error == -EBUSY`.
//! * `Ready` / `Failed`: the table (or the error) belongs to the pending state; whoever
//!   detaches it frees it, under the lock.
//!
//! Rust ownership makes a double free impossible; [`ResizeStats`] counts allocations
//! and frees so tests can prove there is no leak.
//!
//! # Commit
//!
//! Under `mmu_setup_lock`: close the gate and drain (mmu_ready = 0), rehash into the
//! prepared table, pivot or fail, reopen the gate (mmu_ready = 1) whatever the result.
//! The rehash has two phases: *placement* computes every bolted entry's new index and
//! detects bolted/bolted collisions without touching the old table, so a failed commit
//! (H_PTEG_FULL) leaves the old table exactly as it was (stricter than KVM, whose failed
//! rehash leaves the entries it already processed ABSENT); *transfer* then unmaps every
//! VALID old entry (unlink from its ring, harvest R/C into guest_rpte, the rmap word and
//! the dirty bitmap: nothing is lost) and writes the bolted ones into the new table.
//!
//! # Pre-copy commit (beyond KVM)
//!
//! [`ResizeMode::PreCopy`] (the default, per VM via [`ResizeCtl::set_mode`]) drains
//! the old table's rings and copies the bolted entries while vCPUs run, tracking the
//! guest's changes (hooks in `Vm::dispatch` and the fault path), and stops the vCPUs
//! only to switch tracking on and to re-apply what changed: see `precopy`. Both modes
//! give the guest identical results (`tests/resize_modes.rs`).
//!
//! # Return codes
//!
//! [`ResizeError`] is the kernel-side result and [`ResizeError::papr`] the one
//! error-to-PAPR table (QEMU's `resize_hpt_convert_rc`).
//!
//! Policies (documented choices): orders 37..=46 are legal in PAPR but cannot be
//! indexed by 32-bit revmap links: PREPARE answers H_RESOURCE. The QEMU front-end rule
//! "shift > RAM-derived order + 1 -> H_RESOURCE" applies in both flavours (QEMU applies
//! it in front of KVM too). A COMMIT after a failed allocation answers H_NO_MEM in both
//! flavours (QEMU does not check it and would rehash into a missing table).

#![deny(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod flavour;
mod hooks;
mod precopy;
pub mod rehash;
mod state;
pub mod worker;

pub use flavour::ResizeFlavour;
pub use state::{PrecopyHold, ResizeCtl, ResizeStats};

use revmap_hpt::hcall::*;
use revmap_hpt::{HptError, Vm, VmConfig};

/// A VM of `cfg` with resizing: [`Vm::new`] with a [`ResizeCtl`] for its RAM size
/// installed.
pub fn new_vm(cfg: VmConfig) -> Result<Vm, HptError> {
    // The controller starts the VM's preparation worker; failing to start it is the
    // set-up's out-of-resources error (a thread's start-up size is not known here).
    let ctl = ResizeCtl::for_config(&cfg)
        .map_err(|_| HptError::Alloc(revmap_rmap::error::RmapError::Alloc { bytes: 0 }))?;
    let ctl = revmap_rmap::error::try_box(ctl)?;
    Ok(Vm::new(cfg)?.with_resizer(ctl))
}

/// The resize controller of a [`Vm`], if a [`ResizeCtl`] is its resizer.
pub trait ResizeVmExt {
    /// The installed [`ResizeCtl`] (`None`: no resizer, or another implementation).
    fn resize_ctl(&self) -> Option<&ResizeCtl>;
}

impl ResizeVmExt for Vm {
    fn resize_ctl(&self) -> Option<&ResizeCtl> {
        self.resizer()?.as_any().downcast_ref::<ResizeCtl>()
    }
}

/// How H_RESIZE_HPT_COMMIT runs (per VM, [`ResizeCtl::set_mode`]).
///
/// The default is [`PreCopy`](Self::PreCopy): both modes give the guest the same
/// results (tested, and the resize trace replays bit-exact in both), and pre-copy keeps
/// the vCPUs stopped for a fraction of the time; the extra total work it does (one
/// more pass over the old table while vCPUs run) is paid by the committing vCPU, which
/// is blocked in COMMIT anyway. Stop-the-world stays for comparison
/// (`revmap bench resize`) and as KVM's reference behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeMode {
    /// KVM: close the gate, rehash the whole old table, pivot, reopen.
    StopTheWorld = 0,
    /// Drain the old table's rings and copy the bolted entries while vCPUs run; with
    /// the gate closed only re-apply what changed since, pivot and reopen
    /// (`precopy` module docs).
    PreCopy = 1,
}

impl ResizeMode {
    /// The mode a new VM starts in.
    pub const DEFAULT: Self = Self::PreCopy;

    /// Decode the stored discriminant (anything else reads as the default).
    pub const fn from_u64(x: u64) -> Self {
        match x {
            0 => Self::StopTheWorld,
            1 => Self::PreCopy,
            _ => Self::DEFAULT,
        }
    }
}

impl Default for ResizeMode {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Kernel-side result of a resize operation (KVM's errno values), mapped to PAPR in
/// one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResizeError {
    /// -EPERM: resizing disabled.
    #[error("resize not permitted")]
    NotPermitted,
    /// -EINVAL: bad flags or shift.
    #[error("bad resize argument")]
    Invalid,
    /// -ENXIO: no pending request, or of another order.
    #[error("no matching pending resize")]
    NoPending,
    /// -ENOSPC: two bolted entries collide in the new table.
    #[error("bolted collision in the new table")]
    BoltedCollision,
    /// -EBUSY: the new table is still being allocated.
    #[error("resize still preparing")]
    Busy,
    /// -ENOMEM: the new table could not be allocated.
    #[error("out of memory for the new table")]
    NoMem,
    /// -EIO: an entry could not be rehashed (undecodable page size).
    #[error("rehash failed")]
    Io,
    /// Over a limit of this implementation (orders above 36, or the RAM-derived order
    /// + 1): PAPR's H_RESOURCE.
    #[error("order exceeds a resource limit")]
    Resource,
}

impl ResizeError {
    /// The PAPR return code (QEMU's `resize_hpt_convert_rc`).
    pub const fn papr(self) -> i64 {
        match self {
            Self::NotPermitted => H_AUTHORITY,
            Self::Invalid => H_PARAMETER,
            Self::NoPending => H_CLOSED,
            Self::BoltedCollision => H_PTEG_FULL,
            Self::Busy => H_BUSY,
            Self::NoMem => H_NO_MEM,
            Self::Io => H_HARDWARE,
            Self::Resource => H_RESOURCE,
        }
    }
}

/// A positive kernel estimate in milliseconds as a PAPR long-busy code.
pub const fn long_busy_for_ms(ms: u64) -> i64 {
    match ms {
        0 => H_SUCCESS,
        1..=9 => H_LONG_BUSY_ORDER_1_MSEC,
        10..=99 => H_LONG_BUSY_ORDER_10_MSEC,
        100..=999 => H_LONG_BUSY_ORDER_100_MSEC,
        1000..=9999 => H_LONG_BUSY_ORDER_1_SEC,
        10000..=99999 => H_LONG_BUSY_ORDER_10_SEC,
        _ => H_LONG_BUSY_ORDER_100_SEC,
    }
}

/// The estimate PREPARE gives while allocating (KVM and QEMU both say 100 ms).
pub const PREPARE_ESTIMATE_MS: u64 = 100;

/// QEMU's `spapr_hpt_shift_for_ramsize`: log2(pow2ceil(ram)) - 7, clamped to 18..=46.
pub const fn hpt_shift_for_ramsize(ram_bytes: u64) -> u32 {
    let log = if ram_bytes <= 1 {
        0
    } else {
        64 - (ram_bytes - 1).leading_zeros()
    };
    let s = log.saturating_sub(7);
    if s < revmap_hpt::hash::MIN_HPT_ORDER {
        revmap_hpt::hash::MIN_HPT_ORDER
    } else if s > revmap_hpt::hash::MAX_PAPR_HPT_ORDER {
        revmap_hpt::hash::MAX_PAPR_HPT_ORDER
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_table_matches_the_papr_resize_return_codes() {
        assert_eq!(ResizeError::NotPermitted.papr(), -10);
        assert_eq!(ResizeError::Invalid.papr(), -4);
        assert_eq!(ResizeError::NoPending.papr(), 2);
        assert_eq!(ResizeError::BoltedCollision.papr(), -6);
        assert_eq!(ResizeError::Busy.papr(), 1);
        assert_eq!(ResizeError::NoMem.papr(), -9);
        assert_eq!(ResizeError::Io.papr(), -1);
        assert_eq!(ResizeError::Resource.papr(), -16);
        let codes = [
            (0, 0),
            (1, 9900),
            (9, 9900),
            (10, 9901),
            (100, 9902),
            (999, 9902),
            (1000, 9903),
            (10000, 9904),
            (100000, 9905),
            (u64::MAX, 9905),
        ];
        for (ms, c) in codes {
            assert_eq!(long_busy_for_ms(ms), c, "{ms}");
        }
    }

    #[test]
    fn ram_order_examples_from_qemus_default_hpt_size() {
        let g = 1u64 << 30;
        assert_eq!(hpt_shift_for_ramsize(32 << 20), 18);
        assert_eq!(hpt_shift_for_ramsize(256 << 20), 21);
        assert_eq!(hpt_shift_for_ramsize(g), 23);
        assert_eq!(hpt_shift_for_ramsize(3 * g), 25);
        assert_eq!(hpt_shift_for_ramsize(4 * g), 25);
        assert_eq!(hpt_shift_for_ramsize(16 * g), 27);
        assert_eq!(hpt_shift_for_ramsize(0), 18);
        assert_eq!(hpt_shift_for_ramsize(u64::MAX), 46);
    }
}
