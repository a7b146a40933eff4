//! [`FreshFrames`]: host memory (a [`HostMemory`]) that hands out a **new** host frame
//! each time a page comes back after the host took it away, so a stale translation of
//! the old frame is visible (the nested trace contract's "new host frame whenever an L1
//! page is re-faulted after `HOST_UNMAP`").
//!
//! Host physical address of `hva` while its host page is in generation `g`:
//! `base_hpa + (g << span_shift) + (hva - start)`, where `2^span_shift` covers the
//! whole range. Each host page has its own generation (bumped by `page_in` of an absent
//! page); [`FreshFrames::hpa_to_hva`] inverts the formula and answers only for the
//! current generation of a present page, so "which host virtual page does this host
//! frame back now" has no answer for a freed frame.
//!
//! Handles are cheap clones over shared state: the memslot owns one (as its
//! `Box<dyn HostMemory>`), the nested VM keeps another for reverse lookups.

use revmap_host::HostMemory;
use revmap_rmap::error::try_boxed_slice;
use revmap_rmap::sync::{Arc, AtomicU64, Ordering};
use revmap_rmap::{Hva, RmapError, PAGE_SHIFT};

/// Presence bit of a per-page word; the low bits are the generation.
const PRESENT: u64 = 1 << 63;

/// Host physical base of every [`FreshFrames`] range (far from any L1 guest address, so
/// an L1 address leaking into a shadow PTE does not look like a host frame).
pub const FRESH_BASE_HPA: u64 = 1 << 44;

/// Largest host physical address a shadow or L0 PTE can hold (RPN bits 12..57).
const HPA_LIMIT: u64 = 1 << 57;

#[derive(Debug)]
struct Inner {
    start: Hva,
    npages: u64,
    page_shift: u32,
    span_shift: u32,
    /// One word per host page: `PRESENT | generation`.
    pages: Box<[AtomicU64]>,
}

/// Host memory with a fresh host frame per page-in (module docs).
#[derive(Debug, Clone)]
pub struct FreshFrames(Arc<Inner>);

impl FreshFrames {
    /// `npages` 4 KiB frames at `start` in host pages of `page_shift`, every page present
    /// in generation 0. The caller checks alignment (as `Memslot::with_memory` does).
    pub fn new(start: Hva, npages: u64, page_shift: u32) -> Result<Self, RmapError> {
        let shift = page_shift.saturating_sub(PAGE_SHIFT).min(63);
        let nhost = npages.div_ceil(1u64 << shift);
        let n = usize::try_from(nhost).map_err(|_| RmapError::Alloc { bytes: usize::MAX })?;
        let pages = try_boxed_slice(n, |_| AtomicU64::new(PRESENT))?;
        let bytes = npages.saturating_mul(1 << PAGE_SHIFT).max(1);
        let span_shift = (64 - (bytes - 1).leading_zeros()).max(page_shift);
        Ok(Self(Arc::new(Inner {
            start,
            npages,
            page_shift,
            span_shift,
            pages,
        })))
    }

    fn page_index(&self, hva: Hva) -> Option<usize> {
        let off = hva.0.checked_sub(self.0.start.0)? >> PAGE_SHIFT;
        if off < self.0.npages {
            Some((off >> (self.0.page_shift - PAGE_SHIFT)) as usize)
        } else {
            None
        }
    }

    fn hpa_of(&self, gen: u64, hva: Hva) -> Option<u64> {
        let off = hva.0 - self.0.start.0;
        let hpa = gen
            .checked_shl(self.0.span_shift)
            .filter(|g| g >> self.0.span_shift == gen)?
            .checked_add(FRESH_BASE_HPA)?
            .checked_add(off)?;
        (hpa < HPA_LIMIT).then_some(hpa)
    }

    /// The host virtual address whose host page is backed **now** by host physical
    /// address `hpa`, or `None` if `hpa` is not a current frame of this memory (a frame
    /// freed by `page_out`, or not from this range).
    pub fn hpa_to_hva(&self, hpa: u64) -> Option<Hva> {
        let rel = hpa.checked_sub(FRESH_BASE_HPA)?;
        let gen = rel >> self.0.span_shift;
        let off = rel & ((1u64 << self.0.span_shift) - 1);
        if off >= self.0.npages << PAGE_SHIFT {
            return None;
        }
        let hva = Hva(self.0.start.0 + off);
        let w = self.0.pages.get(self.page_index(hva)?)?;
        // ORDERING: Acquire pairs with the Release of page_in/page_out.
        (w.load(Ordering::Acquire) == PRESENT | gen).then_some(hva)
    }

    /// Current generation of the host page holding `hva` (how many times it came back).
    pub fn generation(&self, hva: Hva) -> Option<u64> {
        let w = self.0.pages.get(self.page_index(hva)?)?;
        // ORDERING: Acquire, as in `hpa_to_hva`.
        Some(w.load(Ordering::Acquire) & !PRESENT)
    }
}

impl HostMemory for FreshFrames {
    fn hva_range(&self) -> (Hva, Hva) {
        (
            self.0.start,
            Hva(self.0.start.0 + (self.0.npages << PAGE_SHIFT)),
        )
    }

    fn page_shift(&self) -> u32 {
        self.0.page_shift
    }

    fn hva_to_pfn(&self, hva: Hva) -> Option<u64> {
        let w = self.0.pages.get(self.page_index(hva)?)?;
        // ORDERING: Acquire pairs with the Release of page_in/page_out; the caller's
        // invalidate-sequence protocol decides whether the answer is used.
        let v = w.load(Ordering::Acquire);
        if v & PRESENT == 0 {
            return None;
        }
        self.hpa_of(v & !PRESENT, hva).map(|h| h >> PAGE_SHIFT)
    }

    fn page_out(&self, hva: Hva) -> bool {
        let Some(w) = self.page_index(hva).and_then(|i| self.0.pages.get(i)) else {
            return false;
        };
        // ORDERING: Release: the caller's invalidation precedes the page going away.
        w.fetch_and(!PRESENT, Ordering::Release);
        true
    }

    fn page_in(&self, hva: Hva) -> bool {
        let Some(w) = self.page_index(hva).and_then(|i| self.0.pages.get(i)) else {
            return false;
        };
        // ORDERING: AcqRel CAS loop: an absent page comes back in the next generation.
        let mut cur = w.load(Ordering::Acquire);
        loop {
            if cur & PRESENT != 0 {
                return true;
            }
            let next = PRESENT | (cur + 1);
            if self.hpa_of(cur + 1, hva).is_none() {
                return false;
            }
            match w.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(v) => cur = v,
            }
        }
    }
}

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests {
    use super::*;

    #[test]
    fn page_in_after_page_out_is_a_new_frame() {
        let m = FreshFrames::new(Hva(0x7000_0000_0000), 64, 16).unwrap();
        let a = Hva(0x7000_0001_2345);
        let pfn0 = m.hva_to_pfn(a).unwrap();
        assert_eq!(m.hpa_to_hva(pfn0 << 12 | 0x345), Some(a));
        assert!(m.page_out(a));
        assert_eq!(m.hva_to_pfn(a), None);
        assert_eq!(m.hpa_to_hva(pfn0 << 12), None, "freed frame");
        // The neighbouring 64 KiB page is untouched.
        assert!(m.hva_to_pfn(Hva(0x7000_0002_0000)).is_some());
        assert!(m.page_in(a));
        let pfn1 = m.hva_to_pfn(a).unwrap();
        assert_ne!(pfn0, pfn1);
        assert_eq!(m.generation(a), Some(1));
        assert_eq!(m.hpa_to_hva(pfn1 << 12 | 0x345), Some(a));
        assert_eq!(m.hpa_to_hva(pfn0 << 12 | 0x345), None, "old generation");
        assert!(m.page_in(a), "already present: no new generation");
        assert_eq!(m.generation(a), Some(1));
        assert!(!m.page_out(Hva(0x7000_0004_0000)), "outside");
    }

    #[test]
    fn huge_host_pages_go_and_come_back_whole() {
        let m = FreshFrames::new(Hva(0x4000_0000), 1024, 21).unwrap();
        let base = m.hva_to_pfn(Hva(0x4000_0000)).unwrap();
        assert_eq!(m.hva_to_pfn(Hva(0x401f_f000)), Some(base + 511));
        assert!(m.page_out(Hva(0x4010_0000)));
        assert!(m.hva_to_pfn(Hva(0x4000_0000)).is_none());
        assert!(m.page_in(Hva(0x4000_0000)));
        let b1 = m.hva_to_pfn(Hva(0x4000_0000)).unwrap();
        assert_ne!(b1, base);
        assert_eq!(b1 % 512, 0, "2 MiB frames stay 2 MiB aligned");
    }
}
