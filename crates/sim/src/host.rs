//! The host's view of a VM, as the host actors use it: the [`HostMmu`] trait.
//!
//! Invariants:
//! * Actors touch a VM only through this trait, so they can be tested against a fake;
//!   [`revmap_hpt::Vm`] implements it by forwarding to its MMU-notifier, aging and
//!   dirty-log methods (the host-side contract of issue 4).
//! * Every method takes `&self` and implementors are `Sync`: actor threads and vCPU
//!   threads share one VM. Ranges are half-open, `[start, end)`.
//! * A dirty bitmap is in KVM's `u64` layout: bit `i % 64` of word `i / 64` is frame
//!   `base_gfn + i` of the slot.

use core::fmt;
use revmap_hpt::MemslotFlags;
use revmap_rmap::{Gfn, Hva, SlotId, PAGE_SHIFT};

/// What an actor needs to know about one memslot (a snapshot taken when it starts).
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

/// The host-side operations of a VM used by the host actors (KVM's MMU-notifier
/// callbacks, aging and dirty-log ioctls).
pub trait HostMmu: Sync {
    /// Error of the dirty-log calls.
    type Error: fmt::Display;

    /// Snapshot of the memslots.
    fn memslot_views(&self) -> Vec<SlotView>;

    /// Host reclaim of `[start, end)`: unmap every HPTE mapping it; returns how many.
    fn unmap_hva_range(&self, start: Hva, end: Hva) -> u64;

    /// The host pages of `[start, end)` become present again.
    fn host_page_in(&self, start: Hva, end: Hva);

    /// Test and clear "referenced" for `[start, end)` of `slot`.
    fn age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool;

    /// Test "referenced" for `[start, end)` of `slot` without clearing it.
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

/// The real VM: forwards to the host-side methods of [`revmap_hpt::Vm`].
impl HostMmu for revmap_hpt::Vm {
    type Error = revmap_hpt::HostError;

    fn memslot_views(&self) -> Vec<SlotView> {
        self.memslot_ids()
            .into_iter()
            .filter_map(|id| self.memslot_info(id))
            .map(|s| SlotView {
                id: s.id,
                base_gfn: s.base_gfn,
                npages: s.npages,
                userspace_addr: s.userspace_addr,
                backing_page_shift: s.backing_page_shift,
                dirty_logging: s.flags.contains(MemslotFlags::LOG_DIRTY_PAGES),
                manual_protect: s.flags.contains(MemslotFlags::DIRTY_LOG_MANUAL_PROTECT),
            })
            .collect()
    }

    fn unmap_hva_range(&self, start: Hva, end: Hva) -> u64 {
        revmap_hpt::Vm::unmap_hva_range(self, start, end)
    }

    fn host_page_in(&self, start: Hva, end: Hva) {
        revmap_hpt::Vm::host_page_in(self, start, end)
    }

    fn age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool {
        revmap_hpt::Vm::age_gfn(self, slot, start, end)
    }

    fn test_age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool {
        revmap_hpt::Vm::test_age_gfn(self, slot, start, end)
    }

    fn get_dirty_log(&self, slot: SlotId) -> Result<Vec<u64>, Self::Error> {
        revmap_hpt::Vm::get_dirty_log(self, slot)
    }

    fn clear_dirty_log(
        &self,
        slot: SlotId,
        first_page: u64,
        bits: &[u64],
    ) -> Result<(), Self::Error> {
        revmap_hpt::Vm::clear_dirty_log(self, slot, first_page, bits)
    }
}
