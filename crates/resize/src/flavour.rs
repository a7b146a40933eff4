//! The guest-visible KVM/QEMU differences of HPT resizing, one method each of
//! [`ResizeFlavour`], in the style of `revmap_hpt::flavour` (which holds every
//! non-resize difference).
//!
//! Invariant: resize code never branches on `Flavour` directly; it calls these.

use revmap_hpt::Flavour;

/// The resize differences of a [`Flavour`].
pub trait ResizeFlavour {
    /// COMMIT answering H_BUSY or H_CLOSED: QEMU leaves the pending prepare in place,
    /// KVM releases (cancels) it (`kvm_vm_ioctl_resize_hpt_commit` always releases).
    fn resize_commit_keeps_pending_on_refusal(self) -> bool;
    /// PREPARE with the same shift after the allocation failed: QEMU keeps the failed
    /// request and keeps answering H_NO_MEM; KVM answers once and forgets it.
    fn resize_prepare_keeps_failed(self) -> bool;
    /// The table a PREPARE allocates: QEMU's is all-zero (never-written slots read back
    /// as 0, not 0x40, until written); KVM hides the 0x40 bit anyway.
    fn resize_table_reads_zero_until_written(self) -> bool;
    /// Bolted entries after a successful commit: KVM copies them ABSENT (off every
    /// chain; the fault path revalidates them on first access); QEMU copies them
    /// verbatim, so they stay VALID (and are re-chained in the new table).
    fn resize_bolted_arrive_absent(self) -> bool;
    /// COMMIT's argument check: KVM's ioctl rejects a nonzero shift outside 18..=46
    /// with H_PARAMETER; QEMU's TCG commit only compares it with the pending one
    /// (H_CLOSED).
    fn resize_commit_checks_shift(self) -> bool;
}

impl ResizeFlavour for Flavour {
    /// COMMIT answering H_BUSY or H_CLOSED: QEMU leaves the pending prepare in place,
    /// KVM releases (cancels) it (`kvm_vm_ioctl_resize_hpt_commit` always releases).
    #[inline]
    fn resize_commit_keeps_pending_on_refusal(self) -> bool {
        matches!(self, Self::Qemu)
    }

    /// PREPARE with the same shift after the allocation failed: QEMU keeps the failed
    /// request and keeps answering H_NO_MEM; KVM answers once and forgets it.
    #[inline]
    fn resize_prepare_keeps_failed(self) -> bool {
        matches!(self, Self::Qemu)
    }

    /// The table a PREPARE allocates: QEMU's is all-zero (never-written slots read back
    /// as 0, not 0x40, until written); KVM hides the 0x40 bit anyway.
    #[inline]
    fn resize_table_reads_zero_until_written(self) -> bool {
        matches!(self, Self::Qemu)
    }

    /// Bolted entries after a successful commit: KVM copies them ABSENT (off every
    /// chain; the fault path revalidates them on first access); QEMU
    /// copies them verbatim, so they stay VALID (and are re-chained in the new table).
    #[inline]
    fn resize_bolted_arrive_absent(self) -> bool {
        matches!(self, Self::Kvm)
    }

    /// COMMIT's argument check: KVM's ioctl rejects a nonzero shift outside 18..=46
    /// with H_PARAMETER; QEMU's TCG commit only compares it with the pending one
    /// (H_CLOSED).
    #[inline]
    fn resize_commit_checks_shift(self) -> bool {
        matches!(self, Self::Kvm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_difference() {
        assert!(Flavour::Qemu.resize_commit_keeps_pending_on_refusal());
        assert!(!Flavour::Kvm.resize_commit_keeps_pending_on_refusal());
        assert!(Flavour::Qemu.resize_prepare_keeps_failed());
        assert!(!Flavour::Kvm.resize_prepare_keeps_failed());
        assert!(Flavour::Qemu.resize_table_reads_zero_until_written());
        assert!(!Flavour::Kvm.resize_table_reads_zero_until_written());
        assert!(Flavour::Kvm.resize_bolted_arrive_absent());
        assert!(!Flavour::Qemu.resize_bolted_arrive_absent());
        assert!(Flavour::Kvm.resize_commit_checks_shift());
        assert!(!Flavour::Qemu.resize_commit_checks_shift());
    }
}
