//! Host memory: what backs a memslot's host virtual range ([`HostMemory`]), and the
//! simulated host ([`SimHostMemory`]).
//!
//! A memslot maps guest frames onto a host virtual range (`userspace_addr`); the MMU
//! needs, for a guest frame, the host page frame behind it and whether the host page is
//! present (KVM's `__gfn_to_pfn_memslot` / `hva_to_pfn`). [`HostMemory`] is that
//! question, asked by host virtual address, so the MMUs of this workspace can sit on
//! any host: the simulated one here, or a VMM's real mappings.
//!
//! # Contract
//!
//! * One `HostMemory` backs one memslot; it covers `[hva_range().0, hva_range().1)`, a
//!   range aligned to and made of whole host pages of [`HostMemory::page_shift`].
//! * [`HostMemory::hva_to_pfn`] answers "not present" for a page taken away by
//!   [`HostMemory::page_out`] until [`HostMemory::page_in`] brings it back. The answer
//!   may be stale by the time the caller uses it: callers sample KVM's
//!   `mmu_invalidate_seq` before asking and re-check it under the rmap lock, and whoever
//!   pages memory out brackets it with an MMU-notifier invalidation (`HostMmu`).
//! * Every method takes `&self`: vCPU threads and host threads call them concurrently.
//!
//! # The simulated host
//!
//! [`SimHostMemory`] keeps one presence bit per host page (all present at creation) and
//! maps host virtual to host physical by identity: the host frame of `hva` is
//! `hva >> 12`. A real HPTE therefore never carries the guest's RPN, and a leak of the
//! real word into the guest's view is visible in tests.

use alloc::boxed::Box;
use core::fmt;
use revmap_rmap::error::try_boxed_slice;
use revmap_rmap::sync::{AtomicU64, Ordering};
use revmap_rmap::{Hva, RmapError, PAGE_SHIFT};

/// The host memory behind one memslot's host virtual range.
///
/// Implement it to put the MMUs of this workspace on real memory; the simulator uses
/// [`SimHostMemory`]. See the module docs for the contract.
pub trait HostMemory: Send + Sync + fmt::Debug {
    /// The host virtual range `[start, end)` this memory covers.
    fn hva_range(&self) -> (Hva, Hva);

    /// Shift of the host page size backing the range (12 for 4 KiB, 24 for 16 MiB, ...).
    fn page_shift(&self) -> u32;

    /// `hva_to_pfn`: the host physical frame (in 4 KiB units) holding `hva`, or `None`
    /// if `hva` is outside the range or its host page is not present.
    fn hva_to_pfn(&self, hva: Hva) -> Option<u64>;

    /// Whether the host page holding `hva` is present.
    #[inline]
    fn is_present(&self, hva: Hva) -> bool {
        self.hva_to_pfn(hva).is_some()
    }

    /// The host takes the page holding `hva` away (reclaim, swap-out). Returns false if
    /// `hva` is outside the range or this memory cannot page out. The caller brackets
    /// it with an MMU-notifier invalidation.
    fn page_out(&self, hva: Hva) -> bool;

    /// The host page holding `hva` becomes present again (the host faulted it in).
    /// Returns false if `hva` is outside the range.
    fn page_in(&self, hva: Hva) -> bool;
}

/// The simulated host memory of one slot: a presence bit per host page, host physical
/// = host virtual (see the module docs).
#[derive(Debug)]
pub struct SimHostMemory {
    start: Hva,
    npages: u64,
    page_shift: u32,
    /// One bit per host page: set = present.
    present: Box<[AtomicU64]>,
}

impl SimHostMemory {
    /// Host memory of `npages` 4 KiB frames at `start`, in host pages of `page_shift`,
    /// every page present. The caller checks alignment and overflow (as
    /// [`Memslot::new`](crate::Memslot::new) does); allocation is fallible.
    pub fn new(start: Hva, npages: u64, page_shift: u32) -> Result<Self, RmapError> {
        let frames_per_page = 1u64 << page_shift.saturating_sub(PAGE_SHIFT).min(63);
        let nhost = npages.div_ceil(frames_per_page);
        let words = usize::try_from(nhost.div_ceil(64))
            .map_err(|_| RmapError::Alloc { bytes: usize::MAX })?;
        let present = try_boxed_slice(words, |w| {
            let first = w as u64 * 64;
            let left = nhost.saturating_sub(first).min(64);
            AtomicU64::new(if left == 64 { !0 } else { (1u64 << left) - 1 })
        })?;
        Ok(Self {
            start,
            npages,
            page_shift,
            present,
        })
    }

    /// Index of the host page holding `hva`, if inside the range.
    #[inline(always)]
    fn page_index(&self, hva: Hva) -> Option<usize> {
        let off = hva.0.checked_sub(self.start.0)? >> PAGE_SHIFT;
        if off < self.npages {
            // Fits usize: the bitmap of this many pages was allocated.
            Some((off >> (self.page_shift - PAGE_SHIFT)) as usize)
        } else {
            None
        }
    }

    fn set(&self, hva: Hva, present: bool) -> bool {
        let Some(b) = self.page_index(hva) else {
            return false;
        };
        let Some(word) = self.present.get(b / 64) else {
            return false;
        };
        let bit = 1u64 << (b % 64);
        // ORDERING: Release so a reader that sees the bit also sees what preceded it.
        if present {
            word.fetch_or(bit, Ordering::Release);
        } else {
            word.fetch_and(!bit, Ordering::Release);
        }
        true
    }
}

impl HostMemory for SimHostMemory {
    #[inline]
    fn hva_range(&self) -> (Hva, Hva) {
        (self.start, Hva(self.start.0 + (self.npages << PAGE_SHIFT)))
    }

    #[inline]
    fn page_shift(&self) -> u32 {
        self.page_shift
    }

    #[inline(always)]
    fn hva_to_pfn(&self, hva: Hva) -> Option<u64> {
        let b = self.page_index(hva)?;
        let word = self.present.get(b / 64)?;
        // ORDERING: Acquire pairs with the Release in `set`; the caller's
        // mmu_invalidate_seq sample/retry protocol decides whether the answer is used.
        if word.load(Ordering::Acquire) & (1 << (b % 64)) == 0 {
            return None;
        }
        Some(hva.0 >> PAGE_SHIFT)
    }

    fn page_out(&self, hva: Hva) -> bool {
        self.set(hva, false)
    }

    fn page_in(&self, hva: Hva) -> bool {
        self.set(hva, true)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn identity_frames_and_per_page_presence() {
        let m = SimHostMemory::new(Hva(0x100_0000), 0x2000, 24).unwrap();
        assert_eq!(m.hva_range(), (Hva(0x100_0000), Hva(0x300_0000)));
        assert_eq!(m.hva_to_pfn(Hva(0x100_5fff)), Some(0x1005));
        assert_eq!(m.hva_to_pfn(Hva(0x300_0000)), None, "past the end");
        assert_eq!(m.hva_to_pfn(Hva(0xff_ffff)), None, "before the start");
        assert!(m.page_out(Hva(0x1ff_0000)));
        assert!(!m.is_present(Hva(0x100_0000)), "the whole 16M page goes");
        assert!(m.is_present(Hva(0x200_0000)));
        assert!(m.page_in(Hva(0x100_0000)));
        assert!(m.is_present(Hva(0x1ff_ffff)));
        assert!(!m.page_out(Hva(0x300_0000)));
    }

    #[test]
    fn partial_last_word_starts_present_only_inside() {
        // 70 host pages: the second bitmap word has 6 bits.
        let m = SimHostMemory::new(Hva(0), 70, 12).unwrap();
        assert!(m.is_present(Hva(69 << 12)));
        assert!(!m.is_present(Hva(70 << 12)));
        assert_eq!(m.present[1].load(Ordering::Relaxed), 0x3f);
    }
}
