//! The generic host layer of a hypervisor MMU model (the role of KVM's `virt/kvm`):
//! what every guest MMU (the hashed page table, the x86 shadow MMU, the nested MMU)
//! plugs into.
//!
//! * [`Memslot`] / [`Memslots`]: guest memory slots with their per-frame rmap words and
//!   dirty bitmaps in KVM's layout; [`slots`]: the published slot-set snapshot (SRCU).
//! * [`memory`]: the [`HostMemory`] trait (guest frame -> host page, presence,
//!   page-in/out) and the simulated host, [`SimHostMemory`].
//! * [`notifier`]: the MMU-notifier invalidation sequence ([`InvalidateSeq`]).
//! * [`mmu`]: the host-side interface every MMU implements, [`HostMmu`] (notifier
//!   callbacks, aging, dirty log).
//! * [`pool`]: the bounded pool that keeps freed slots' rmap arrays mapped for reuse.
//!
//! ```
//! use revmap_host::{HostMemory, Memslot, MemslotFlags, SlotView};
//! use revmap_rmap::{Gfn, Hva, SlotId};
//!
//! // 1 MiB of guest frames from gfn 0x100, backed by 64 KiB host pages at 0x7f00_0000_0000.
//! let slot = Memslot::new(
//!     SlotId(0),
//!     Gfn(0x100),
//!     256,
//!     16,
//!     MemslotFlags::LOG_DIRTY_PAGES,
//!     Hva(0x7f00_0000_0000),
//! )?;
//! assert_eq!(slot.gfn_to_hva(Gfn(0x101)), Some(Hva(0x7f00_0000_1000)));
//! // The simulated host maps host virtual = host physical.
//! assert_eq!(slot.host_pfn(Gfn(0x101)), Some(0x7f00_0000_1));
//! // Host reclaim takes the whole 64 KiB host page away.
//! assert!(slot.memory().page_out(Hva(0x7f00_0000_0000)));
//! assert!(!slot.is_host_present(Gfn(0x10f)) && slot.is_host_present(Gfn(0x110)));
//! // A 16-frame write dirties 16 bits of the KVM-layout bitmap; harvesting clears them.
//! assert_eq!(slot.mark_dirty(Gfn(0x100), 16), 16);
//! assert_eq!(slot.take_dirty_word(0), 0xffff);
//! assert_eq!(SlotView::of(&slot).bitmap_words(), 4);
//! # Ok::<(), revmap_host::MemslotError>(())
//! ```
//!
//! # Memslots (KVM's `struct kvm_memory_slot`, lean version)
//!
//! A [`Memslot`] maps a contiguous run of guest frames `[base_gfn, base_gfn + npages)`
//! onto host virtual memory at `userspace_addr`, and carries the per-frame metadata the
//! hashed-page-table MMU needs:
//!
//! * one rmap word ([`Rmap`]) per 4 KiB frame (`memslot->arch.rmap[]`), heading the ring
//!   of HPTEs that map that frame;
//! * a dirty bitmap in KVM's `u64` layout: bit `i % 64` of word `i / 64` is frame
//!   `base_gfn + i` (`memslot->dirty_bitmap`, first half only);
//! * the host memory behind its host virtual range, a [`HostMemory`] (guest frame ->
//!   host page, presence, page-in/out): [`SimHostMemory`], the simulated host, by
//!   default, or any implementation given to [`Memslot::with_memory`].
//!
//! A [`Memslot`] is a small *descriptor* (id, gfn range, flags) over shared per-slot
//! data (the rmap words, dirty bitmap and host memory, behind an `Arc`): moving a
//! slot or changing its flags makes a new descriptor over the same data, as KVM inherits
//! `memslot->arch.rmap` on MOVE and FLAGS_ONLY.
//!
//! [`Memslots`] is the small set of slots of one VM with gfn -> slot lookup by linear
//! scan over a sorted array (VMs have a handful of slots). It is an immutable snapshot:
//! [`slots::SlotSet`] publishes new snapshots while readers (hypercalls, vCPU faults,
//! host walkers) keep using the one they loaded, and waits for them (KVM's SRCU).
//!
//! # Invariants
//!
//! * `npages >= 1`, the gfn range and the hva range do not overflow, `userspace_addr`
//!   and `base_gfn` are aligned to the backing page size, and `npages` is bounded by
//!   [`MEMSLOT_MAX_NPAGES`] (KVM's check in `kvm_alloc_memslot_metadata` that an rmap array is never larger than RAM).
//! * `rmap.len() == npages`, `dirty_bitmap.len() == ceil(npages / 64)`, and bits of the
//!   last dirty word beyond `npages` are never set.
//! * Slots of one [`Memslots`] are sorted by `base_gfn` and never overlap.
//!
//! * A descriptor's flags never contain [`MemslotFlags::INVALID`] unless it was published
//!   by the lifecycle code's INVALID step (delete/move), and a slot with logging off has
//!   an all-zero dirty bitmap once the flag change has been published.
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

#[cfg(any(feature = "std", loom))]
pub mod lifecycle;
pub mod memory;
pub mod mmu;
pub mod notifier;
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
pub mod pool;
pub mod port;
#[cfg(any(feature = "std", loom))]
pub mod slots;

pub use memory::{HostMemory, SimHostMemory};
pub use mmu::{HostMmu, SlotView};
pub use notifier::InvalidateSeq;

use alloc::boxed::Box;
use alloc::vec::Vec;
use revmap_rmap::error::try_boxed_slice;
use revmap_rmap::sync::{Arc, AtomicU64, Ordering};
use revmap_rmap::{Gfn, Hva, Rmap, RmapError, SlotId, PAGE_SHIFT};

/// Largest number of 4 KiB frames one slot may hold (2^30 frames = 4 TiB of guest
/// memory, 8 GiB of rmap words). Larger requests fail with [`MemslotError::TooLarge`]
/// before anything is allocated.
pub const MEMSLOT_MAX_NPAGES: u64 = 1 << 30;

/// Smallest and largest supported host backing page shifts.
pub const BACKING_SHIFTS: core::ops::RangeInclusive<u32> = PAGE_SHIFT..=34;

bitflags::bitflags! {
    /// Memslot flags (KVM's `KVM_MEM_*` plus the internal INVALID state).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MemslotFlags: u32 {
        /// `KVM_MEM_LOG_DIRTY_PAGES`: C bits harvested from HPTEs are recorded in the
        /// dirty bitmap.
        const LOG_DIRTY_PAGES = 1 << 0;
        /// `KVM_MEM_READONLY`: the host mapping is read-only; real HPTEs are made
        /// read-only.
        const READONLY = 1 << 1;
        /// `KVM_DIRTY_LOG_MANUAL_PROTECT` (a VM capability in KVM, a per-slot flag here):
        /// `KVM_GET_DIRTY_LOG` returns the bitmap without clearing it;
        /// `KVM_CLEAR_DIRTY_LOG` clears it.
        const DIRTY_LOG_MANUAL_PROTECT = 1 << 2;
        /// `KVM_MEMSLOT_INVALID`: the slot is being deleted or moved; lookups still find
        /// it but H_ENTER and the fault path treat its frames as emulated MMIO.
        const INVALID = 1 << 16;
    }
}

impl MemslotFlags {
    /// Flags userspace may set (everything but the internal INVALID state).
    pub const USER_MASK: Self = Self::LOG_DIRTY_PAGES
        .union(Self::READONLY)
        .union(Self::DIRTY_LOG_MANUAL_PROTECT);
}

/// Why a memslot could not be created or inserted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MemslotError {
    /// A slot of zero frames.
    #[error("memslot of zero pages")]
    Empty,
    /// More frames than [`MEMSLOT_MAX_NPAGES`].
    #[error("memslot of {npages} pages exceeds the limit of {MEMSLOT_MAX_NPAGES}")]
    TooLarge {
        /// Requested frames.
        npages: u64,
    },
    /// The gfn or hva range wraps around.
    #[error("memslot range overflows the address space")]
    Overflow,
    /// Unsupported backing page shift.
    #[error("backing page shift {shift} not in 12..=34")]
    BadBackingShift {
        /// The shift.
        shift: u32,
    },
    /// `base_gfn` or `userspace_addr` not aligned to the backing page size.
    #[error("memslot base gfn {base_gfn} / hva {hva} not aligned to the {shift}-bit backing page")]
    Misaligned {
        /// Base frame.
        base_gfn: Gfn,
        /// Host address.
        hva: Hva,
        /// Backing page shift.
        shift: u32,
    },
    /// The new slot overlaps an existing one (or reuses its id).
    #[error("memslot {id:?} overlaps or duplicates an existing slot")]
    Overlap {
        /// The rejected slot's id.
        id: SlotId,
    },
    /// No memslot with this id (or it is being deleted or moved).
    #[error("no memslot {id:?}")]
    NoSuchSlot {
        /// The id.
        id: SlotId,
    },
    /// Flags userspace may not set (INVALID, unknown bits) or change (READONLY after
    /// creation, as KVM's `-EINVAL`).
    #[error("memslot flags {flags:?} not allowed here")]
    BadFlags {
        /// The flags asked for.
        flags: MemslotFlags,
    },
    /// The host memory given for the slot covers fewer frames than the slot.
    #[error("host memory of {covered} pages cannot back a memslot of {npages} pages")]
    BackingTooSmall {
        /// Frames of the slot.
        npages: u64,
        /// Frames the host memory covers.
        covered: u64,
    },
    /// Metadata allocation failed.
    #[error(transparent)]
    Alloc(#[from] RmapError),
}

/// A memslot invariant found broken by [`Memslot::check`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SlotCheckError {
    /// The rmap array does not hold one word per frame.
    #[error("memslot {id:?}: rmap array of {len} words differs from npages")]
    RmapLength {
        /// The slot.
        id: SlotId,
        /// Words found.
        len: usize,
    },
    /// The dirty bitmap does not hold `ceil(npages / 64)` words.
    #[error("memslot {id:?}: dirty bitmap of {len} words differs from ceil(npages/64)")]
    BitmapLength {
        /// The slot.
        id: SlotId,
        /// Words found.
        len: usize,
    },
    /// Dirty bits are recorded although dirty logging is off.
    #[error("memslot {id:?}: dirty bits recorded while dirty logging is off")]
    DirtyWhileNotLogging {
        /// The slot.
        id: SlotId,
    },
    /// A bit of the last dirty word beyond the end of the slot is set.
    #[error("memslot {id:?}: dirty bit set beyond the end of the slot")]
    BitmapTail {
        /// The slot.
        id: SlotId,
    },
}

/// One guest memory slot: a descriptor (id, gfn range, flags) over its shared rmap
/// words, dirty bitmap and host backing model. Cloning is cheap and shares the data.
#[derive(Debug, Clone)]
pub struct Memslot {
    id: SlotId,
    base_gfn: Gfn,
    npages: u64,
    flags: MemslotFlags,
    /// [`max_page_shift`](Self::max_page_shift), computed when the descriptor is made
    /// (it depends on `base_gfn`, `npages` and the backing page only): H_ENTER checks
    /// every entry against it.
    max_page_shift: u32,
    data: Arc<SlotData>,
}

/// The per-slot arrays, shared by every descriptor of one slot (KVM keeps
/// `memslot->arch.rmap` across MOVE and FLAGS_ONLY).
#[derive(Debug)]
struct SlotData {
    /// `memory.page_shift()`, cached for the hot path.
    backing_page_shift: u32,
    /// `memory.hva_range().0`, cached for the hot path.
    userspace_addr: Hva,
    rmap: Box<[Rmap]>,
    dirty_bitmap: Box<[AtomicU64]>,
    /// The host memory behind `[userspace_addr, userspace_addr + npages * 4K)`.
    memory: Box<dyn HostMemory>,
}

/// A freed slot's rmap words go to the rmap pool (kept if its capacity allows).
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
impl Drop for SlotData {
    fn drop(&mut self) {
        pool::global().give(core::mem::take(&mut self.rmap));
    }
}

impl Memslot {
    /// Create a slot over simulated host memory ([`SimHostMemory`]) at
    /// `userspace_addr` in host pages of `backing_page_shift`; every host page starts
    /// present, the dirty bitmap clear.
    ///
    /// Allocation is fallible: a slot too large for memory is [`MemslotError::Alloc`],
    /// never an abort.
    pub fn new(
        id: SlotId,
        base_gfn: Gfn,
        npages: u64,
        backing_page_shift: u32,
        flags: MemslotFlags,
        userspace_addr: Hva,
    ) -> Result<Self, MemslotError> {
        // Refuse a bad request before allocating its host memory model.
        Self::validate(base_gfn, npages, backing_page_shift, userspace_addr)?;
        let memory = SimHostMemory::new(userspace_addr, npages, backing_page_shift)?;
        let memory = revmap_rmap::error::try_box(memory)?;
        Self::with_memory(id, base_gfn, npages, flags, memory)
    }

    /// Create a slot of `npages` frames from `base_gfn` over `memory`: the slot's host
    /// virtual range starts at `memory.hva_range().0` and its backing page shift is
    /// `memory.page_shift()`. Fails like [`new`](Self::new), or with
    /// [`MemslotError::BackingTooSmall`] if `memory` covers fewer than `npages` frames.
    pub fn with_memory(
        id: SlotId,
        base_gfn: Gfn,
        npages: u64,
        flags: MemslotFlags,
        memory: Box<dyn HostMemory>,
    ) -> Result<Self, MemslotError> {
        let (start, end) = memory.hva_range();
        let shift = memory.page_shift();
        Self::validate(base_gfn, npages, shift, start)?;
        let covered = end.0.saturating_sub(start.0) >> PAGE_SHIFT;
        if covered < npages {
            return Err(MemslotError::BackingTooSmall { npages, covered });
        }
        let n = usize::try_from(npages).map_err(|_| MemslotError::TooLarge { npages })?;
        #[cfg(all(feature = "std", not(any(loom, shuttle))))]
        let rmap = match pool::global().take_rmaps(n) {
            Some(words) => words,
            None => Rmap::new_array(n)?,
        };
        #[cfg(not(all(feature = "std", not(any(loom, shuttle)))))]
        let rmap = Rmap::new_array(n)?;
        let dirty_bitmap = try_boxed_slice(n.div_ceil(64), |_| AtomicU64::new(0))?;
        Ok(Self {
            id,
            base_gfn,
            npages,
            flags,
            max_page_shift: Self::max_page_shift_of(base_gfn, npages, shift),
            data: Arc::new(SlotData {
                backing_page_shift: shift,
                userspace_addr: start,
                rmap,
                dirty_bitmap,
                memory,
            }),
        })
    }

    /// The size, range and alignment checks of a new slot.
    fn validate(
        base_gfn: Gfn,
        npages: u64,
        backing_page_shift: u32,
        userspace_addr: Hva,
    ) -> Result<(), MemslotError> {
        if npages == 0 {
            return Err(MemslotError::Empty);
        }
        if npages > MEMSLOT_MAX_NPAGES {
            return Err(MemslotError::TooLarge { npages });
        }
        if !BACKING_SHIFTS.contains(&backing_page_shift) {
            return Err(MemslotError::BadBackingShift {
                shift: backing_page_shift,
            });
        }
        base_gfn
            .0
            .checked_add(npages)
            .ok_or(MemslotError::Overflow)?;
        npages
            .checked_shl(PAGE_SHIFT)
            .and_then(|b| userspace_addr.0.checked_add(b))
            .ok_or(MemslotError::Overflow)?;
        let frames_per_backing = 1u64 << (backing_page_shift - PAGE_SHIFT);
        let backing_mask = (1u64 << backing_page_shift) - 1;
        if base_gfn.0 & (frames_per_backing - 1) != 0 || userspace_addr.0 & backing_mask != 0 {
            return Err(MemslotError::Misaligned {
                base_gfn,
                hva: userspace_addr,
                shift: backing_page_shift,
            });
        }
        Ok(())
    }

    /// The same slot (same rmap words, bitmap and backing) at another base frame
    /// (KVM_MR_MOVE). Fails if the range overflows or the new base is not aligned to the
    /// backing page.
    pub fn with_base(&self, base_gfn: Gfn) -> Result<Self, MemslotError> {
        base_gfn
            .0
            .checked_add(self.npages)
            .ok_or(MemslotError::Overflow)?;
        let frames_per_backing = 1u64 << (self.data.backing_page_shift - PAGE_SHIFT);
        if base_gfn.0 & (frames_per_backing - 1) != 0 {
            return Err(MemslotError::Misaligned {
                base_gfn,
                hva: self.data.userspace_addr,
                shift: self.data.backing_page_shift,
            });
        }
        Ok(Self {
            base_gfn,
            max_page_shift: Self::max_page_shift_of(
                base_gfn,
                self.npages,
                self.data.backing_page_shift,
            ),
            ..self.clone()
        })
    }

    /// The same slot with other flags (KVM_MR_FLAGS_ONLY, or the INVALID step).
    pub fn with_flags(&self, flags: MemslotFlags) -> Self {
        Self {
            flags,
            ..self.clone()
        }
    }

    /// True if both descriptors describe the same slot data.
    #[inline]
    pub fn same_data(&self, other: &Memslot) -> bool {
        Arc::ptr_eq(&self.data, &other.data)
    }

    /// Slot id.
    #[inline]
    pub fn id(&self) -> SlotId {
        self.id
    }
    /// First guest frame.
    #[inline]
    pub fn base_gfn(&self) -> Gfn {
        self.base_gfn
    }
    /// Number of 4 KiB frames.
    #[inline]
    pub fn npages(&self) -> u64 {
        self.npages
    }
    /// Host backing page shift.
    #[inline]
    pub fn backing_page_shift(&self) -> u32 {
        self.data.backing_page_shift
    }
    /// True if the slot is in the INVALID step of a delete or move.
    #[inline]
    pub fn is_invalid(&self) -> bool {
        self.flags.contains(MemslotFlags::INVALID)
    }
    /// Largest page shift an HPTE may map from this slot: bounded by the backing page
    /// and by `slot_is_aligned` (base and size multiples of the page).
    #[inline(always)]
    pub fn max_page_shift(&self) -> u32 {
        self.max_page_shift
    }

    /// [`max_page_shift`](Self::max_page_shift) of a slot of `npages` (not 0) frames at
    /// `base_gfn` over host pages of `backing_page_shift`.
    fn max_page_shift_of(base_gfn: Gfn, npages: u64, backing_page_shift: u32) -> u32 {
        let align = (base_gfn.0 | npages).trailing_zeros() + PAGE_SHIFT;
        align.min(backing_page_shift)
    }
    /// End (exclusive) of the slot's frames.
    #[inline]
    pub fn end_gfn(&self) -> Gfn {
        Gfn(self.base_gfn.0 + self.npages)
    }
    /// End (exclusive) of the slot's host virtual range.
    #[inline]
    pub fn hva_end(&self) -> Hva {
        Hva(self.data.userspace_addr.0 + (self.npages << PAGE_SHIFT))
    }
    /// The frames `[lo, hi)` of this slot backed by host addresses in `[start, end)`, or
    /// `None` if the ranges do not meet. Partial 4 KiB pages count.
    pub fn hva_range_to_gfns(&self, start: Hva, end: Hva) -> Option<(Gfn, Gfn)> {
        let ua = self.data.userspace_addr.0;
        let a = start.0.max(ua);
        let b = end.0.min(self.hva_end().0);
        if a >= b {
            return None;
        }
        let lo = (a - ua) >> PAGE_SHIFT;
        let hi = (b - ua).div_ceil(1 << PAGE_SHIFT);
        Some((Gfn(self.base_gfn.0 + lo), Gfn(self.base_gfn.0 + hi)))
    }
    /// Flags.
    #[inline]
    pub fn flags(&self) -> MemslotFlags {
        self.flags
    }
    /// Host virtual address of the first frame.
    #[inline]
    pub fn userspace_addr(&self) -> Hva {
        self.data.userspace_addr
    }

    /// Offset of `gfn` in the slot, if it lies inside.
    #[inline(always)]
    pub fn index_of(&self, gfn: Gfn) -> Option<usize> {
        let off = gfn.0.wrapping_sub(self.base_gfn.0);
        if off < self.npages {
            // npages fits usize (checked at creation).
            Some(off as usize)
        } else {
            None
        }
    }

    /// True if `gfn` lies in the slot.
    #[inline(always)]
    pub fn contains(&self, gfn: Gfn) -> bool {
        self.index_of(gfn).is_some()
    }

    /// True if `[gfn, gfn + n)` lies entirely in the slot.
    #[inline]
    pub fn contains_range(&self, gfn: Gfn, n: u64) -> bool {
        match self.index_of(gfn) {
            Some(i) => n <= self.npages - i as u64,
            None => false,
        }
    }

    /// KVM's `slot_is_aligned`: a page of `1 << shift` bytes may be mapped from this
    /// slot only if `base_gfn` and `npages` are multiples of its frame count.
    #[inline]
    pub fn is_aligned_for(&self, shift: u32) -> bool {
        if shift <= PAGE_SHIFT {
            return true;
        }
        let Some(frames) = 1u64.checked_shl(shift - PAGE_SHIFT) else {
            return false;
        };
        (self.base_gfn.0 | self.npages) & (frames - 1) == 0
    }

    /// The rmap word of `gfn`.
    #[inline(always)]
    pub fn rmap(&self, gfn: Gfn) -> Option<&Rmap> {
        self.index_of(gfn).and_then(|i| self.data.rmap.get(i))
    }

    /// All rmap words, in frame order.
    #[inline]
    pub fn rmaps(&self) -> &[Rmap] {
        &self.data.rmap
    }

    /// Host virtual address of `gfn` (`__gfn_to_hva_memslot`).
    #[inline]
    pub fn gfn_to_hva(&self, gfn: Gfn) -> Option<Hva> {
        let i = self.index_of(gfn)? as u64;
        Some(Hva(self.data.userspace_addr.0 + (i << PAGE_SHIFT)))
    }

    /// Guest frame backed by `hva` (`hva_to_gfn_memslot`).
    #[inline]
    pub fn hva_to_gfn(&self, hva: Hva) -> Option<Gfn> {
        let off = hva.0.checked_sub(self.data.userspace_addr.0)? >> PAGE_SHIFT;
        if off < self.npages {
            Some(Gfn(self.base_gfn.0 + off))
        } else {
            None
        }
    }

    /// The host memory behind the slot.
    #[inline]
    pub fn memory(&self) -> &dyn HostMemory {
        &*self.data.memory
    }

    /// The host physical frame backing `gfn` (KVM's `__gfn_to_pfn_memslot`), or `None`
    /// if the host page is not present (paged out) or `gfn` is outside the slot.
    #[inline(always)]
    pub fn host_pfn(&self, gfn: Gfn) -> Option<u64> {
        self.data.memory.hva_to_pfn(self.gfn_to_hva(gfn)?)
    }

    /// Whether the host backing page holding `gfn` is present.
    #[inline]
    pub fn is_host_present(&self, gfn: Gfn) -> bool {
        self.host_pfn(gfn).is_some()
    }

    /// Mark the host backing page holding `gfn` present or not present (host page-in /
    /// page-out through [`HostMemory`]; callers bracket a page-out with an MMU
    /// invalidation). Returns false if `gfn` is outside the slot or the host memory
    /// refused.
    pub fn set_host_present(&self, gfn: Gfn, present: bool) -> bool {
        let Some(hva) = self.gfn_to_hva(gfn) else {
            return false;
        };
        if present {
            self.data.memory.page_in(hva)
        } else {
            self.data.memory.page_out(hva)
        }
    }

    /// Record `npages` frames from `gfn` as dirty (`kvmppc_update_dirty_map`: a huge page
    /// dirties every 4 KiB frame it covers). The range is clipped to the slot. Does
    /// nothing unless dirty logging is enabled. Returns the number of frames marked.
    pub fn mark_dirty(&self, gfn: Gfn, npages: u64) -> u64 {
        if !self.flags.contains(MemslotFlags::LOG_DIRTY_PAGES) {
            return 0;
        }
        let Some(start) = self.index_of(gfn) else {
            return 0;
        };
        let start = start as u64;
        let end = start.saturating_add(npages).min(self.npages);
        let mut i = start;
        while i < end {
            let w = (i / 64) as usize;
            let lo = i % 64;
            let n = (end - i).min(64 - lo);
            let mask = if n == 64 { !0 } else { ((1u64 << n) - 1) << lo };
            if let Some(word) = self.data.dirty_bitmap.get(w) {
                // ORDERING: Relaxed: the bitmap is an accumulator of independent bits;
                // the dirty-log reader harvests it with an atomic swap and needs no
                // other data ordered with it.
                word.fetch_or(mask, Ordering::Relaxed);
            }
            i += n;
        }
        end - start
    }

    /// Whether frame `gfn` is marked dirty.
    #[inline]
    pub fn is_dirty(&self, gfn: Gfn) -> bool {
        let Some(i) = self.index_of(gfn) else {
            return false;
        };
        self.data
            .dirty_bitmap
            .get(i / 64)
            // ORDERING: Relaxed: see `mark_dirty`.
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (i % 64)) != 0)
    }

    /// The dirty bitmap words (KVM layout).
    #[inline]
    pub fn dirty_bitmap(&self) -> &[AtomicU64] {
        &self.data.dirty_bitmap
    }

    /// Atomically fetch and clear dirty word `i` (the `xchg` loop of
    /// `kvm_vm_ioctl_get_dirty_log_hv`). Out-of-range words read as 0.
    #[inline]
    pub fn take_dirty_word(&self, i: usize) -> u64 {
        // ORDERING: AcqRel swap: the harvest must not be reordered before earlier
        // observations by the caller, nor lose a concurrent fetch_or.
        self.data.dirty_bitmap.get(i).map_or(0, |w| {
            // ORDERING: Relaxed pre-check: a zero word needs no swap (a bit set after it
            // is harvested by the next call); this keeps the empty scan read-only.
            if w.load(Ordering::Relaxed) == 0 {
                0
            } else {
                w.swap(0, Ordering::AcqRel)
            }
        })
    }

    /// Atomically clear the bits `mask` of dirty word `i` (KVM_CLEAR_DIRTY_LOG);
    /// bits beyond the slot are ignored. Returns the bits that were set.
    #[inline]
    pub fn clear_dirty_bits(&self, i: usize, mask: u64) -> u64 {
        // ORDERING: AcqRel: see `take_dirty_word`.
        self.data
            .dirty_bitmap
            .get(i)
            .map_or(0, |w| w.fetch_and(!mask, Ordering::AcqRel) & mask)
    }

    /// Snapshot of dirty word `i` (0 beyond the slot).
    #[inline]
    pub fn dirty_word(&self, i: usize) -> u64 {
        // ORDERING: Acquire, pairs with the AcqRel harvests; a snapshot for manual
        // protection and checks.
        self.data
            .dirty_bitmap
            .get(i)
            .map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// Set every bit of `bits` in dirty word `i` (harvested C bits kept for a later
    /// manual-protect clear); bits beyond the slot are dropped.
    #[inline]
    pub fn or_dirty_word(&self, i: usize, bits: u64) {
        let tail = self.npages % 64;
        let last = (self.npages / 64) as usize;
        let bits = if tail != 0 && i == last {
            bits & ((1u64 << tail) - 1)
        } else {
            bits
        };
        if bits != 0 {
            if let Some(w) = self.data.dirty_bitmap.get(i) {
                // ORDERING: Relaxed: an accumulator, see `mark_dirty`.
                w.fetch_or(bits, Ordering::Relaxed);
            }
        }
    }

    /// Clear the whole dirty bitmap (dirty logging switched on or off).
    pub fn clear_dirty_bitmap(&self) {
        for w in self.data.dirty_bitmap.iter() {
            // ORDERING: Relaxed: the caller publishes the flag change after this.
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Number of frames currently marked dirty.
    pub fn count_dirty(&self) -> u64 {
        self.data
            .dirty_bitmap
            .iter()
            // ORDERING: Relaxed snapshot for statistics and checks.
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Check the slot's own invariants (dirty bitmap tail bits clear, sizes). Used by the
    /// VM checker.
    pub fn check(&self) -> Result<(), SlotCheckError> {
        if self.data.rmap.len() as u64 != self.npages {
            return Err(SlotCheckError::RmapLength {
                id: self.id,
                len: self.data.rmap.len(),
            });
        }
        if self.data.dirty_bitmap.len() as u64 != self.npages.div_ceil(64) {
            return Err(SlotCheckError::BitmapLength {
                id: self.id,
                len: self.data.dirty_bitmap.len(),
            });
        }
        if !self.flags.contains(MemslotFlags::LOG_DIRTY_PAGES) && self.count_dirty() != 0 {
            return Err(SlotCheckError::DirtyWhileNotLogging { id: self.id });
        }
        let tail = self.npages % 64;
        if tail != 0 {
            if let Some(last) = self.data.dirty_bitmap.last() {
                // ORDERING: Relaxed snapshot at a quiescent point.
                if last.load(Ordering::Relaxed) >> tail != 0 {
                    return Err(SlotCheckError::BitmapTail { id: self.id });
                }
            }
        }
        Ok(())
    }
}

/// The memslots of one VM, sorted by `base_gfn`, non-overlapping: an immutable snapshot
/// once published (see [`slots::SlotSet`]).
#[derive(Debug, Default)]
pub struct Memslots {
    slots: Vec<Memslot>,
}

impl Memslots {
    /// No slots.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a slot. Fails on overlap with an existing slot or a duplicate id, or if
    /// memory for the array is short.
    pub fn insert(&mut self, slot: Memslot) -> Result<(), MemslotError> {
        let lo = slot.base_gfn.0;
        let hi = lo + slot.npages;
        if self
            .slots
            .iter()
            .any(|s| s.id == slot.id || (lo < s.base_gfn.0 + s.npages && s.base_gfn.0 < hi))
        {
            return Err(MemslotError::Overlap { id: slot.id });
        }
        self.slots.try_reserve(1).map_err(|_| {
            MemslotError::Alloc(RmapError::Alloc {
                bytes: core::mem::size_of::<Memslot>(),
            })
        })?;
        let pos = self.slots.partition_point(|s| s.base_gfn.0 < lo);
        self.slots.insert(pos, slot);
        Ok(())
    }

    /// A copy sharing every slot's data, allocated fallibly (the writer side of a
    /// lifecycle change builds the next snapshot from it).
    pub fn try_clone(&self) -> Result<Self, MemslotError> {
        let mut slots = Vec::new();
        slots.try_reserve_exact(self.slots.len() + 1).map_err(|_| {
            MemslotError::Alloc(RmapError::Alloc {
                bytes: (self.slots.len() + 1) * core::mem::size_of::<Memslot>(),
            })
        })?;
        slots.extend(self.slots.iter().cloned());
        Ok(Self { slots })
    }

    /// Remove slot `id`, returning it.
    pub fn remove(&mut self, id: SlotId) -> Option<Memslot> {
        let i = self.slots.iter().position(|s| s.id == id)?;
        Some(self.slots.remove(i))
    }

    /// Replace the descriptor of the slot with the same id and base (flag changes);
    /// returns false if there is none.
    pub fn replace(&mut self, slot: Memslot) -> bool {
        match self
            .slots
            .iter_mut()
            .find(|s| s.id == slot.id && s.base_gfn == slot.base_gfn)
        {
            Some(s) => {
                *s = slot;
                true
            }
            None => false,
        }
    }

    /// The slot holding `gfn` (`__gfn_to_memslot`): a linear scan, O(number of slots).
    #[inline(always)]
    pub fn lookup(&self, gfn: Gfn) -> Option<&Memslot> {
        self.slots.iter().find(|s| s.contains(gfn))
    }

    /// The slot with id `id`.
    pub fn get(&self, id: SlotId) -> Option<&Memslot> {
        self.slots.iter().find(|s| s.id == id)
    }

    /// The first slot (in gfn order) whose host range holds `hva`, and the frame it
    /// backs. Several slots may alias one host page; INVALID slots are skipped.
    pub fn hva_to_gfn(&self, hva: Hva) -> Option<(&Memslot, Gfn)> {
        self.slots
            .iter()
            .filter(|s| !s.is_invalid())
            .find_map(|s| s.hva_to_gfn(hva).map(|g| (s, g)))
    }

    /// Iterate the slots in gfn order.
    pub fn iter(&self) -> core::slice::Iter<'_, Memslot> {
        self.slots.iter()
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True if there are no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn slot(npages: u64, shift: u32) -> Memslot {
        Memslot::new(
            SlotId(0),
            Gfn(0x1000),
            npages,
            shift,
            MemslotFlags::LOG_DIRTY_PAGES,
            Hva(0x7f00_0000_0000),
        )
        .unwrap()
    }

    #[test]
    fn lookup_and_translation() {
        let s = slot(0x100, 16);
        assert_eq!(s.index_of(Gfn(0x1000)), Some(0));
        assert_eq!(s.index_of(Gfn(0x10ff)), Some(0xff));
        assert_eq!(s.index_of(Gfn(0x1100)), None);
        assert_eq!(s.index_of(Gfn(0xfff)), None);
        assert_eq!(s.gfn_to_hva(Gfn(0x1001)), Some(Hva(0x7f00_0000_1000)));
        assert_eq!(s.hva_to_gfn(Hva(0x7f00_0000_1fff)), Some(Gfn(0x1001)));
        assert_eq!(s.hva_to_gfn(Hva(0x7f00_0010_0000)), None);
        assert_eq!(s.hva_to_gfn(Hva(0x10)), None);
        assert!(s.contains_range(Gfn(0x10f0), 0x10));
        assert!(!s.contains_range(Gfn(0x10f0), 0x11));
    }

    #[test]
    fn huge_page_dirties_every_frame_and_clips() {
        let s = slot(8192, 24);
        assert_eq!(s.mark_dirty(Gfn(0x1000), 4096), 4096);
        assert_eq!(s.count_dirty(), 4096);
        assert!(s.is_dirty(Gfn(0x1fff)) && !s.is_dirty(Gfn(0x2000)));
        assert_eq!(s.mark_dirty(Gfn(0x2ffe), 16), 2, "clipped at the slot end");
        assert_eq!(s.take_dirty_word(0), !0);
        assert!(!s.is_dirty(Gfn(0x1000)));
        s.check().unwrap();
    }

    #[test]
    fn dirty_logging_off_records_nothing() {
        let s = Memslot::new(SlotId(1), Gfn(0), 64, 12, MemslotFlags::default(), Hva(0)).unwrap();
        assert_eq!(s.mark_dirty(Gfn(3), 1), 0);
        assert_eq!(s.count_dirty(), 0);
    }

    #[test]
    fn odd_sizes_keep_tail_bits_clear() {
        let s = slot(70, 12);
        assert_eq!(s.dirty_bitmap().len(), 2);
        assert_eq!(s.mark_dirty(Gfn(0x1000), 1000), 70);
        s.check().unwrap();
        assert_eq!(s.count_dirty(), 70);
    }

    #[test]
    fn host_presence_is_per_backing_page() {
        let s = slot(0x2000, 24);
        let pfn0 = s.host_pfn(Gfn(0x1000)).unwrap();
        assert_eq!(pfn0, 0x7f00_0000_0000 >> 12);
        assert_eq!(s.host_pfn(Gfn(0x1005)), Some(pfn0 + 5));
        assert!(s.set_host_present(Gfn(0x1800), false));
        assert!(
            !s.is_host_present(Gfn(0x1000)),
            "whole 16M backing page goes"
        );
        assert!(s.is_host_present(Gfn(0x2000)));
        s.set_host_present(Gfn(0x1000), true);
        assert!(s.is_host_present(Gfn(0x1fff)));
        assert!(!s.set_host_present(Gfn(0x3000), false));
    }

    #[test]
    fn max_page_shift_is_alignment_and_backing_together_and_follows_a_move() {
        let agree = |s: &Memslot| {
            for sh in 0..80 {
                assert_eq!(
                    sh <= s.max_page_shift(),
                    s.is_aligned_for(sh) && sh <= s.backing_page_shift(),
                    "shift {sh}, slot at {:#x} of {:#x} over {}",
                    s.base_gfn().0,
                    s.npages(),
                    s.backing_page_shift()
                );
            }
        };
        for (npages, backing) in [(0x1000, 16), (0x100, 16), (0x1000, 24), (0x3, 12)] {
            let s = slot(npages, backing);
            agree(&s);
            for base in [0u64, 0x10, 0x1000, 0x40_0000] {
                if let Ok(m) = s.with_base(Gfn(base)) {
                    agree(&m);
                    agree(&m.with_flags(MemslotFlags::INVALID));
                }
            }
        }
        // A size that is not a multiple of the backing page bounds the shift below it,
        // wherever the slot moves (a base is always aligned to the backing page).
        let s = slot(0x1800, 24);
        assert_eq!(s.max_page_shift(), 23);
        agree(&s);
        for base in [0u64, 0x2000, 0x100_0000] {
            let m = s.with_base(Gfn(base)).unwrap();
            assert_eq!(m.max_page_shift(), 23);
            agree(&m);
        }
    }

    #[test]
    fn alignment_rules() {
        let s = slot(0x1000, 16);
        assert!(s.is_aligned_for(12) && s.is_aligned_for(16) && s.is_aligned_for(24));
        assert!(!s.is_aligned_for(34));
        assert!(matches!(
            Memslot::new(SlotId(0), Gfn(1), 16, 16, MemslotFlags::default(), Hva(0)),
            Err(MemslotError::Misaligned { .. })
        ));
    }

    #[test]
    fn bad_sizes_are_clean_errors() {
        let mk = |n, shift, gfn, hva| {
            Memslot::new(
                SlotId(0),
                Gfn(gfn),
                n,
                shift,
                MemslotFlags::default(),
                Hva(hva),
            )
        };
        assert_eq!(mk(0, 12, 0, 0).unwrap_err(), MemslotError::Empty);
        assert!(matches!(
            mk(1 << 40, 12, 0, 0),
            Err(MemslotError::TooLarge { .. })
        ));
        assert_eq!(
            mk(16, 12, u64::MAX - 3, 0).unwrap_err(),
            MemslotError::Overflow
        );
        assert_eq!(
            mk(16, 12, 0, u64::MAX - 0xfff).unwrap_err(),
            MemslotError::Overflow
        );
        assert!(matches!(
            mk(16, 40, 0, 0),
            Err(MemslotError::BadBackingShift { .. })
        ));
    }

    #[test]
    fn memslots_sorted_lookup_and_overlap() {
        let mut m = Memslots::new();
        let a = Memslot::new(
            SlotId(1),
            Gfn(0x100),
            0x100,
            12,
            MemslotFlags::default(),
            Hva(0x10_0000),
        )
        .unwrap();
        let b = Memslot::new(
            SlotId(2),
            Gfn(0),
            0x100,
            12,
            MemslotFlags::default(),
            Hva(0x20_0000),
        )
        .unwrap();
        let c = Memslot::new(
            SlotId(3),
            Gfn(0x1ff),
            2,
            12,
            MemslotFlags::default(),
            Hva(0x30_0000),
        )
        .unwrap();
        m.insert(a).unwrap();
        m.insert(b).unwrap();
        assert!(matches!(m.insert(c), Err(MemslotError::Overlap { .. })));
        assert_eq!(m.lookup(Gfn(0x150)).map(Memslot::id), Some(SlotId(1)));
        assert_eq!(m.lookup(Gfn(0xff)).map(Memslot::id), Some(SlotId(2)));
        assert!(m.lookup(Gfn(0x200)).is_none());
        let ids: Vec<_> = m.iter().map(Memslot::id).collect();
        assert_eq!(ids, [SlotId(2), SlotId(1)]);
        let (s, g) = m.hva_to_gfn(Hva(0x10_2000)).unwrap();
        assert_eq!((s.id(), g), (SlotId(1), Gfn(0x102)));
    }
}
