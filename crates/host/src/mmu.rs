//! The host-side interface of a guest MMU: [`HostMmu`], what the host (its reclaim,
//! aging and live-migration threads, a VMM) calls on a VM, whatever MMU the VM runs.
//!
//! KVM's generic code (`virt/kvm`) calls the same hooks on every architecture's MMU:
//! the MMU-notifier callbacks (`kvm_mmu_notifier_invalidate_range_start/end`, which end
//! in `kvm_unmap_gfn_range`), the aging callbacks (`kvm_age_gfn`, `kvm_test_age_gfn`)
//! and the dirty-log ioctls (`KVM_GET_DIRTY_LOG`, `KVM_CLEAR_DIRTY_LOG`). The hashed
//! page table's `Vm` (crate `revmap-hpt`) implements this trait; the shadow and nested
//! MMUs implement it too, and the simulator's host actors drive a VM only through it.
//!
//! # Contract
//!
//! * Every method takes `&self` and implementors are `Sync`: host threads and vCPU
//!   threads share one VM. Ranges are half-open, `[start, end)`.
//! * After [`HostMmu::unmap_hva_range`] or [`HostMmu::invalidate_range_start`] returns,
//!   no translation of the range's host pages is usable by a vCPU until the host page
//!   is back and the guest faults it in again; an inserter racing the invalidation
//!   backs off (see [`notifier`](crate::notifier)).
//! * A dirty bitmap is in KVM's `u64` layout: bit `i % 64` of word `i / 64` is frame
//!   `base_gfn + i` of the slot.
//! * Bad arguments (an unknown slot, a range outside it) are errors or no-ops, never
//!   panics.

use crate::{Memslot, MemslotFlags, Memslots};
use alloc::vec::Vec;
use core::fmt;
use revmap_rmap::{Gfn, Hva, SlotId, PAGE_SHIFT};

/// What the host needs to know about one memslot (a snapshot, not kept up to date).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotView {
    /// Slot id.
    pub id: SlotId,
    /// First guest frame.
    pub base_gfn: Gfn,
    /// Number of 4 KiB frames (at least 1).
    pub npages: u64,
    /// Host virtual address of the first frame.
    pub userspace_addr: Hva,
    /// Host backing page shift.
    pub backing_page_shift: u32,
    /// Dirty logging is enabled (`KVM_MEM_LOG_DIRTY_PAGES`).
    pub dirty_logging: bool,
    /// Manual dirty-log protection: `get_dirty_log` does not clear, `clear_dirty_log` does.
    pub manual_protect: bool,
}

impl SlotView {
    /// The view of `slot`.
    pub fn of(slot: &Memslot) -> Self {
        Self {
            id: slot.id(),
            base_gfn: slot.base_gfn(),
            npages: slot.npages(),
            userspace_addr: slot.userspace_addr(),
            backing_page_shift: slot.backing_page_shift(),
            dirty_logging: slot.flags().contains(MemslotFlags::LOG_DIRTY_PAGES),
            manual_protect: slot
                .flags()
                .contains(MemslotFlags::DIRTY_LOG_MANUAL_PROTECT),
        }
    }

    /// The views of the usable slots of `slots` (those not being deleted or moved,
    /// i.e. not INVALID), in gfn order: what [`HostMmu::memslot_views`] returns.
    pub fn all_usable(slots: &Memslots) -> Vec<Self> {
        slots
            .iter()
            .filter(|s| !s.is_invalid())
            .map(Self::of)
            .collect()
    }

    /// One past the last guest frame.
    #[inline]
    pub fn gfn_end(&self) -> Gfn {
        Gfn(self.base_gfn.0.saturating_add(self.npages))
    }

    /// Host virtual address of frame `i` of the slot (`i <= npages`), saturating.
    #[inline]
    pub fn hva_of(&self, i: u64) -> Hva {
        Hva(self
            .userspace_addr
            .0
            .saturating_add(i.saturating_mul(1 << PAGE_SHIFT)))
    }

    /// Number of `u64` words of the slot's dirty bitmap.
    #[inline]
    pub fn bitmap_words(&self) -> u64 {
        self.npages.div_ceil(64)
    }
}

/// The host-side operations of a VM's MMU (KVM's MMU-notifier callbacks, aging and
/// dirty-log ioctls). See the module docs for the contract.
pub trait HostMmu: Sync {
    /// Error of the dirty-log calls.
    type Error: fmt::Display;

    /// Snapshot of the memslots (those not being deleted or moved), in gfn order.
    fn memslot_views(&self) -> Vec<SlotView>;

    /// MMU-notifier `invalidate_range_start` on host range `[start, end)`: count an
    /// invalidation in progress, then unmap every translation of every slot backed by
    /// the range. Must be paired with [`invalidate_range_end`](Self::invalidate_range_end).
    fn invalidate_range_start(&self, start: Hva, end: Hva);

    /// MMU-notifier `invalidate_range_end`: end the invalidation begun by the matching
    /// [`invalidate_range_start`](Self::invalidate_range_start).
    fn invalidate_range_end(&self, start: Hva, end: Hva);

    /// Host reclaim of `[start, end)`: inside an invalidation, take the host pages away
    /// and unmap every translation of them; returns how many translations were unmapped.
    fn unmap_hva_range(&self, start: Hva, end: Hva) -> u64;

    /// The host pages of `[start, end)` become present again.
    fn host_page_in(&self, start: Hva, end: Hva);

    /// `kvm_unmap_gfn_range` for frames `[start, end)` of `slot` (the arch hook only:
    /// callers that take host pages away bracket it with an invalidation). Returns how
    /// many translations were unmapped; 0 for an unknown slot.
    fn unmap_gfn_range(&self, slot: SlotId, start: Gfn, end: Gfn) -> u64;

    /// `kvm_age_gfn`: test and clear "referenced" for `[start, end)` of `slot`.
    fn age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool;

    /// `kvm_test_age_gfn`: test "referenced" for `[start, end)` of `slot` without
    /// clearing it.
    fn test_age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool;

    /// `KVM_GET_DIRTY_LOG`: the slot's dirty bitmap (cleared unless manual protection).
    fn get_dirty_log(&self, slot: SlotId) -> Result<Vec<u64>, Self::Error>;

    /// `KVM_CLEAR_DIRTY_LOG`: clear `bits` starting at frame `first_page` of `slot`.
    fn clear_dirty_log(
        &self,
        slot: SlotId,
        first_page: u64,
        bits: &[u64],
    ) -> Result<(), Self::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_usable_skips_invalid_slots_in_gfn_order() {
        let slot = |id, base| {
            Memslot::new(
                SlotId(id),
                Gfn(base),
                16,
                12,
                MemslotFlags::LOG_DIRTY_PAGES,
                Hva(base << PAGE_SHIFT),
            )
            .unwrap()
        };
        let mut slots = Memslots::new();
        slots.insert(slot(2, 64)).unwrap();
        slots.insert(slot(1, 0)).unwrap();
        let gone = slot(3, 128);
        slots
            .insert(gone.with_flags(gone.flags() | MemslotFlags::INVALID))
            .unwrap();
        let views = SlotView::all_usable(&slots);
        let ids: Vec<_> = views.iter().map(|v| v.id).collect();
        assert_eq!(ids, [SlotId(1), SlotId(2)]);
        assert!(views.iter().all(|v| v.dirty_logging && !v.manual_protect));
        assert_eq!(views[1], SlotView::of(&slot(2, 64)));
    }
}
