//! The shadow MMU proper (KVM's `arch/x86/kvm/mmu/mmu.c` + `paging_tmpl.h` for shadow
//! paging): shadow pages over `pte_list` reverse maps, the shadow page fault, write
//! protection of guest page tables, unsync/resync, zapping, and the host-side walkers.
//!
//! [`ShadowMmu`] is the state `mmu_lock` protects; every method taking `&mut self` is a
//! "write-locked" operation, [`ShadowMmu::age_gfn`]/[`ShadowMmu::test_age_gfn`] take
//! `&self` and touch SPTEs only through atomics under the rmap's read-only bit lock (the
//! lockless aging of KVM). [`crate::vm::ShadowVm`] wraps it in the `RwLock` from
//! `revmap_rmap::sync`.
//!
//! # Representation
//!
//! * Shadow pages live in an arena indexed by [`SpId`] (32 bits). A non-leaf SPTE stores
//!   its child's id in the pfn field; a leaf stores the host pfn.
//! * An SPTE's address (KVM's `u64 *sptep`, the rmap entry) is the [`SpteHandle`]
//!   `((id + 1) << 12) | (index << 3)`: non-zero and 8-aligned.
//! * The per-memslot rmaps (`slot->arch.rmap[level - 1]`), the write-track counts
//!   (`gfn_write_track`) and `disallow_lpage` counts live in [`SlotArch`], one per memslot
//!   of the shared host layer, created and dropped by the memslot lifecycle hooks.
//! * `active_mmu_pages` is an intrusive doubly-linked list through the pages (newest at
//!   the head; eviction and fast zap start at the tail); a zapped page moves to a
//!   [`ZapList`] (KVM's `invalid_list`) through the same links; the gfn hash buckets are
//!   intrusive singly-linked chains (KVM's `hlist`). Neither ever allocates.
//!
//! # Memory
//!
//! No allocation happens while an operation changes state (KVM's rule under
//! `mmu_lock`): every operation that may create shadow pages first tops up the page
//! caches ([`ShadowMmu::mmu_topup_memory_caches`]: the SPTE arrays and shadowed
//! translations of the worst case of one fault, [`SP_CACHE_TOPUP`] pages, and room in
//! the arena and its free list), and a fault draws rmap descriptors from a `DescCache`
//! topped up before it; a failed top-up is [`ShadowError::NoMemory`] before anything
//! changed. Inside, shadow pages are taken from the caches only; walks over parents,
//! rmaps, hash chains and unsync descendants iterate in place (the unsync bookkeeping
//! is atomic so that it can be updated under a parent list's read lock) or in fixed-size
//! batches on the stack (KVM's `kvm_mmu_pages`).
//!
//! # Invariants
//!
//! Those of the reference's section 8, checked by [`ShadowMmu::check`]; among them:
//! every shadow-present leaf SPTE is on exactly one rmap, at the gfn recomputed from its
//! shadow page; parent links are exact; a shadowed gfn is write-protected unless every
//! shadow page of it is an unsync level-1 page; no SPTE grants more than the guest entries
//! and the host allow; no shadow page is created under an invalid root.

use crate::paging::{
    gpte_access, is_last_gpte, is_rsvd_gpte, permission_fault, prefetch_invalid_gpte,
    protect_clean_gpte, walk, Acc, Access, Cmpxchg, CpuMode, Gpa, GuestPhysMemory, Gva,
    MemoryError, PageFault, PagingMode, SparseMemory, Walk, WalkError, PT64_ADDR_MASK, PT_PRESENT,
};
use crate::role::{SpRole, Spte};
use crate::write_track::{detect_write_misaligned, written_sptes, FLOOD_THRESHOLD};
use revmap_host::{Memslot, MemslotFlags};
use revmap_rmap::error::try_boxed_slice;
use revmap_rmap::pte_list::{DescCache, DescPool, PteListError, PteListHead, SpteHandle};
use revmap_rmap::sync::{Arc, AtomicU32, AtomicU64, Ordering};
use revmap_rmap::{Gfn, RmapError, SlotId};
use thiserror::Error;

/// Number of SPTEs in a shadow page.
pub const SPTES_PER_PAGE: usize = 512;
/// `KVM_MMU_HASH_SHIFT`: 4096 hash buckets.
pub const MMU_HASH_SHIFT: u32 = 12;
/// `KVM_MIN_FREE_MMU_PAGES`.
pub const MIN_FREE_MMU_PAGES: u64 = 5;
/// `KVM_REFILL_PAGES`.
pub const REFILL_PAGES: u64 = 25;
/// `KVM_MEMSLOT_PAGES_TO_MMU_PAGES_RATIO`.
pub const MEMSLOT_PAGES_TO_MMU_PAGES_RATIO: u64 = 50;
/// `KVM_MIN_ALLOC_MMU_PAGES`.
pub const MIN_ALLOC_MMU_PAGES: u64 = 64;
/// Descriptors topped up before a fault takes the lock (1 rmap + 5 parents + 8 prefetch).
pub const FAULT_DESC_TOPUP: u64 = 14;
/// SPTEs around a fault considered for prefetch (`PTE_PREFETCH_NUM`).
pub const PTE_PREFETCH_NUM: usize = 8;
/// Number of cached previous roots (`KVM_MMU_NUM_PREV_ROOTS`).
pub const NUM_PREV_ROOTS: usize = 3;
/// Shadow pages the caches hold after a top-up: the most one fault (or one root load)
/// creates. A long-mode fault creates at most the root and one page per level below it
/// (5 with 5-level paging); a PAE-root fault at most the four PAE roots and one level-1
/// page (KVM's `PT64_ROOT_MAX_LEVEL` pages plus one spare).
pub const SP_CACHE_TOPUP: usize = 6;
/// Fault attempts under one `mmu_lock` hold before [`AccessOutcome::Retry`] is returned
/// (the caller drops the lock and the guest re-executes the access).
pub const MAX_FAULT_RETRIES: u32 = 8;

/// A shadow page's index in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct SpId(pub u32);

/// The rmap entry (KVM's `sptep`) of SPTE `index` of shadow page `sp`.
pub fn spte_handle(sp: SpId, index: usize) -> Result<SpteHandle, ShadowError> {
    let raw = ((u64::from(sp.0) + 1) << 12) | (((index as u64) & 511) << 3);
    Ok(SpteHandle::new(raw)?)
}

/// The shadow page and index an rmap entry names.
pub fn decode_handle(h: SpteHandle) -> (SpId, usize) {
    let raw = h.raw();
    (
        SpId(((raw >> 12).saturating_sub(1)) as u32),
        ((raw >> 3) & 511) as usize,
    )
}

/// Errors of the shadow MMU (never guest-visible: guest faults are [`AccessOutcome`]s).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ShadowError {
    /// An rmap operation failed (an entry missing at removal is a recorded/recomputed
    /// gfn disagreement: the bug class of the 2026 use-after-frees).
    #[error("rmap: {0}")]
    Rmap(#[from] PteListError),
    /// Descriptor pool exhausted.
    #[error("rmap pool: {0}")]
    Pool(#[from] RmapError),
    /// The guest walk could not complete.
    #[error("guest walk: {0}")]
    Walk(#[from] WalkError),
    /// Guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// No such vCPU.
    #[error("no vCPU {0}")]
    NoVcpu(usize),
    /// No shadow page could be made available (every page pinned as a root).
    #[error("no shadow page available")]
    NoSpace,
    /// A shadow page id named by an SPTE or list is not live.
    #[error("dangling shadow page {0:?}")]
    Dangling(SpId),
    /// No memslot holds this gfn (rmap or write-track bookkeeping).
    #[error("no memslot for gfn {0:#x}")]
    NoSlot(u64),
    /// Memory could not be allocated (KVM's `-ENOMEM` from `mmu_topup_memory_caches`,
    /// the vCPU exits): the call changed nothing and may be repeated.
    #[error("out of memory")]
    NoMemory,
}

/// Every allocation failure, whatever type reports it, as [`ShadowError::NoMemory`].
fn oom<E>(_: E) -> ShadowError {
    ShadowError::NoMemory
}

/// What a guest access through the shadow MMU did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessOutcome {
    /// A shadow-table hit: the guest-physical address.
    Hit(Gpa),
    /// A shadow page fault installed the translation: the guest-physical address.
    Fixed(Gpa),
    /// A write to a write-tracked guest page table: KVM emulates it
    /// (`RET_PF_WRITE_PROTECTED`); the address written.
    WriteProtected(Gpa),
    /// No memslot at the address: an MMIO access (emulated).
    Mmio(Gpa),
    /// A #PF injected into the guest.
    Fault(PageFault),
    /// `RET_PF_RETRY`: the fault kept backing off (an MMU-notifier invalidation in
    /// progress, a changed gpte, an obsolete root); the guest re-executes the access.
    Retry,
}

/// `struct kvm_mmu_page`.
#[derive(Debug)]
pub struct ShadowPage {
    /// The guest table shadowed (indirect) or the first gfn mapped (direct).
    pub gfn: u64,
    /// The role (with `invalid` once zapped).
    pub role: SpRole,
    spt: Box<[AtomicU64]>,
    /// `shadowed_translation`: `gfn << 12 | ACC` per SPTE (indirect, level <= 3).
    translation: Option<Box<[u64]>>,
    parent_ptes: PteListHead,
    /// Level-1 indirect page that may disagree with its gptes.
    pub unsync: bool,
    // The unsync bookkeeping is atomic only to be updated through `&self` while a
    // parent list is read-locked (marking walks up the parents in place); it changes
    // only with `mmu_lock` held for write.
    unsync_children: AtomicU32,
    unsync_child_bitmap: [AtomicU64; 8],
    /// vCPU root / prev_root pins.
    pub root_count: u32,
    mmu_valid_gen: u8,
    write_flooding_count: u8,
    /// The list the page is on (`sp->link`): active, a zap list, or none (a zapped
    /// root still pinned).
    on: OnList,
    /// Links of that list: towards the head (newer) and the tail (older).
    prev: Option<SpId>,
    next: Option<SpId>,
    /// The next page of its hash bucket (`sp->hash_link`).
    hash_next: Option<SpId>,
}

/// The list a shadow page is on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum OnList {
    /// Zapped but pinned as a root: on no list until its last `put_root`.
    #[default]
    None,
    /// `active_mmu_pages`: valid.
    Active,
    /// A [`ZapList`]: zapped, to be freed by [`ShadowMmu::commit_zap`].
    Zap,
}

/// KVM's `invalid_list`: shadow pages prepared for zapping (unlinked, invalid, unpinned)
/// that [`ShadowMmu::commit_zap`] frees after one TLB flush. Linked through the pages
/// themselves: building it never allocates.
#[derive(Debug, Default)]
pub struct ZapList {
    head: Option<SpId>,
    len: usize,
}

impl ZapList {
    /// An empty list.
    pub const fn new() -> Self {
        Self { head: None, len: 0 }
    }

    /// Number of pages on the list.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The SPTE array and shadowed-translation array of one shadow page, allocated ahead
/// (`mmu_shadow_page_cache`, `mmu_shadowed_info_cache`).
#[derive(Debug, Default)]
struct PageCaches {
    spt: Vec<Box<[AtomicU64]>>,
    translation: Vec<Box<[u64]>>,
}

/// At most this many unsync descendants are synced or zapped per batch (KVM's
/// `KVM_PAGE_ARRAY_NR`); the batch lives on the stack.
const PAGE_BATCH: usize = 16;

/// A batch of shadow pages on the stack (`struct kvm_mmu_pages`).
struct Batch {
    ids: [SpId; PAGE_BATCH],
    len: usize,
}

impl Batch {
    const fn new() -> Self {
        Self {
            ids: [SpId(0); PAGE_BATCH],
            len: 0,
        }
    }

    fn is_full(&self) -> bool {
        self.len == PAGE_BATCH
    }

    /// Adds `id` unless it is there already; false if the batch is full.
    fn push(&mut self, id: SpId) -> bool {
        if self.as_slice().contains(&id) {
            return true;
        }
        let Some(slot) = self.ids.get_mut(self.len) else {
            return false;
        };
        *slot = id;
        self.len += 1;
        true
    }

    fn as_slice(&self) -> &[SpId] {
        self.ids.get(..self.len).unwrap_or_default()
    }
}

impl ShadowPage {
    // ORDERING (the unsync bookkeeping below): Relaxed: it changes only under
    // `mmu_lock` held for write, whose release publishes it; the atomics are for
    // interior mutability, not for synchronisation.
    fn unsync_children(&self) -> u32 {
        self.unsync_children.load(Ordering::Relaxed)
    }

    /// Sets unsync bit `i`; the new count of unsync children, `None` if it was set.
    fn set_child_bit(&self, i: usize) -> Option<u32> {
        let w = self.unsync_child_bitmap.get(i / 64)?;
        let bit = 1u64 << (i % 64);
        if w.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            return None;
        }
        Some(self.unsync_children.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Clears unsync bit `i`; the new count of unsync children, `None` if it was clear.
    fn clear_child_bit(&self, i: usize) -> Option<u32> {
        let w = self.unsync_child_bitmap.get(i / 64)?;
        let bit = 1u64 << (i % 64);
        if w.fetch_and(!bit, Ordering::Relaxed) & bit == 0 {
            return None;
        }
        let n = self.unsync_children().saturating_sub(1);
        self.unsync_children.store(n, Ordering::Relaxed);
        Some(n)
    }

    fn clear_unsync_bits(&self) {
        self.unsync_children.store(0, Ordering::Relaxed);
        for w in &self.unsync_child_bitmap {
            w.store(0, Ordering::Relaxed);
        }
    }

    fn unsync_bits_set(&self) -> u32 {
        self.unsync_child_bitmap
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones())
            .sum()
    }

    fn spte(&self, i: usize) -> Spte {
        // ORDERING: Relaxed: SPTE values are published by the mmu_lock release (writers)
        // or the rmap bit lock (aging); nothing else is read through them.
        Spte(
            self.spt
                .get(i)
                .map_or(Spte::NONPRESENT.0, |a| a.load(Ordering::Relaxed)),
        )
    }

    fn set_spte(&self, i: usize, v: Spte) {
        if let Some(a) = self.spt.get(i) {
            // ORDERING: Relaxed: see `spte`.
            a.store(v.0, Ordering::Relaxed);
        }
    }

    fn is_level_leaf(&self, i: usize) -> bool {
        self.spte(i).is_leaf(self.role.level())
    }

    fn test_child_bit(&self, i: usize) -> bool {
        self.unsync_child_bitmap
            .get(i / 64)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (i % 64)) != 0)
    }
}

/// Per-memslot arrays of the x86 MMU (`slot->arch`): rmaps for 4K, 2M and 1G,
/// `gfn_write_track`, `disallow_lpage` for 2M and 1G.
#[derive(Debug)]
pub struct SlotArch {
    /// The host layer's slot descriptor.
    pub slot: Memslot,
    rmap: [Box<[PteListHead]>; 3],
    write_track: Box<[u16]>,
    disallow_lpage: [Box<[u32]>; 2],
}

fn level_shift(level: u32) -> u32 {
    9 * (level.saturating_sub(1))
}

impl SlotArch {
    /// The arrays for `slot`: empty rmaps, no write tracking, huge pages disallowed only
    /// at unaligned slot edges.
    pub fn new(slot: Memslot) -> Result<Self, ShadowError> {
        let base = slot.base_gfn().0;
        let last = base + slot.npages() - 1;
        let n = |level: u32| {
            let s = level_shift(level);
            ((last >> s) - (base >> s) + 1) as usize
        };
        let rmap = [
            PteListHead::new_array(n(1))?,
            PteListHead::new_array(n(2))?,
            PteListHead::new_array(n(3))?,
        ];
        let write_track = try_boxed_slice(n(1), |_| 0u16)?;
        let mut disallow_lpage = [
            try_boxed_slice(n(2), |_| 0u32)?,
            try_boxed_slice(n(3), |_| 0u32)?,
        ];
        for (k, level) in [2u32, 3].into_iter().enumerate() {
            let pages = 1u64 << level_shift(level);
            let arr = &mut disallow_lpage[k];
            if base % pages != 0 {
                if let Some(x) = arr.first_mut() {
                    *x += 1;
                }
            }
            if (last + 1) % pages != 0 {
                if let Some(x) = arr.last_mut() {
                    *x += 1;
                }
            }
        }
        Ok(Self {
            slot,
            rmap,
            write_track,
            disallow_lpage,
        })
    }

    fn contains(&self, gfn: u64) -> bool {
        self.slot.contains(Gfn(gfn))
    }

    fn idx(&self, gfn: u64, level: u32) -> usize {
        let s = level_shift(level);
        ((gfn >> s) - (self.slot.base_gfn().0 >> s)) as usize
    }

    fn rmap_head(&self, gfn: u64, level: u32) -> Option<&PteListHead> {
        if !self.contains(gfn) || !(1..=3).contains(&level) {
            return None;
        }
        self.rmap[(level - 1) as usize].get(self.idx(gfn, level))
    }

    fn dirty_logging(&self) -> bool {
        self.slot.flags().contains(MemslotFlags::LOG_DIRTY_PAGES)
    }
}

/// One vCPU's MMU context (`vcpu->arch.mmu`).
#[derive(Debug, Clone)]
pub struct VcpuMmu {
    /// The guest's control state.
    pub mode: CpuMode,
    /// The current root (`mmu->root.hpa`), loaded lazily.
    pub root: Option<SpId>,
    /// `prev_roots`: (pgd, root), most recent first.
    pub prev_roots: Vec<(u64, SpId)>,
    /// KVM's `pae_root` for guests without long mode (paging off, 32-bit, PAE): the
    /// four level-2 roots, one per GiB of the 32-bit address space, each pinning its
    /// page (`root` is `None` then). Entry `q` shadows the PAE page directory PDPTE `q`
    /// names, quadrant `q` of a 32-bit guest's page directory, or (paging off) maps
    /// gfns `q << 18..` directly; `None` for a non-present PDPTE or before loading.
    /// These roots are never cached in `prev_roots`.
    pub pae_root: [Option<SpId>; 4],
}

/// Whether `mode` is shadowed through a `pae_root` (no long mode).
pub const fn uses_pae_root(mode: &CpuMode) -> bool {
    !matches!(mode.paging(), PagingMode::Long4 | PagingMode::Long5)
}

/// Statistics (KVM's `kvm->stat` and the replay report's `shadow` object).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShadowStats {
    /// Shadow page faults handled (walks of the guest tables).
    pub page_faults: u64,
    /// Shadow-table hits.
    pub hits: u64,
    /// Shadow pages created.
    pub sp_created: u64,
    /// Shadow pages zapped (prepare-zap).
    pub sp_zapped: u64,
    /// Shadow pages zapped for write flooding (`mmu_flooded`).
    pub flooded: u64,
    /// Emulated writes that were misaligned (`mmu_misaligned`).
    pub misaligned: u64,
    /// Emulated guest page-table writes (`kvm_mmu_track_write`).
    pub emulated_writes: u64,
    /// Pages that went unsync (`mmu_unsync`).
    pub unsync: u64,
    /// Unsync pages resynced (`kvm_sync_page`).
    pub synced: u64,
    /// rmap entries added.
    pub rmap_adds: u64,
    /// rmaps zapped over the recycle threshold.
    pub rmap_recycled: u64,
    /// Remote TLB flushes requested.
    pub tlb_flushes: u64,
    /// Shadow pages zapped by the page limit (`mmu_recycled`).
    pub evicted: u64,
    /// Root switches served from `prev_roots`.
    pub prev_root_hits: u64,
    /// Faults retried (stale root, invalidation, changed gpte).
    pub retries: u64,
    /// Guest writes that hit a write-protected page table (`RET_PF_WRITE_PROTECTED`).
    pub write_protected_faults: u64,
    /// Huge SPTEs installed.
    pub huge_sptes: u64,
    /// SPTEs installed by prefetch around a fault (`pte_prefetch`).
    pub prefetched: u64,
    /// MMIO SPTEs installed (`pf_mmio_spte_created`).
    pub mmio_sptes: u64,
    /// Accesses served from a current MMIO SPTE without a guest walk
    /// (`handle_mmio_page_fault`).
    pub mmio_hits: u64,
}

/// The shadow MMU state that `mmu_lock` protects, with guest memory and the vCPU
/// contexts.
#[derive(Debug)]
pub struct ShadowMmu {
    pool: Arc<DescPool>,
    /// The arena; its capacity is reserved by the top-up.
    sps: Vec<Option<ShadowPage>>,
    /// Free arena slots; its capacity is kept at least the arena's, so that freeing
    /// never allocates.
    free_ids: Vec<u32>,
    /// Heads of the gfn hash chains (`mmu_page_hash`).
    hash: Box<[Option<SpId>]>,
    /// `active_mmu_pages`: newest (head) and oldest (tail) page.
    active_head: Option<SpId>,
    active_tail: Option<SpId>,
    /// Page arrays allocated ahead of the faults that use them.
    caches: PageCaches,
    mmu_valid_gen: u8,
    n_used: u64,
    n_max: Option<u64>,
    indirect_shadow_pages: u64,
    slots: Vec<SlotArch>,
    /// Guest-physical memory contents (the walker's view; visibility by memslot).
    pub mem: SparseMemory,
    vcpus: Vec<VcpuMmu>,
    /// Host MMU-notifier sequence.
    pub invalidate: revmap_host::InvalidateSeq,
    /// The memslot generation: bumped by every memslot change; MMIO SPTEs record its
    /// low [`Spte::MMIO_GEN_BITS`] and are stale once it moves on.
    memslots_gen: u64,
    /// Fault injection for the loom models' should-fail variants.
    #[cfg(loom)]
    knobs: LoomKnobs,
    /// Counters.
    pub stats: ShadowStats,
}

/// Bugs a loom model may switch on to show that it catches them.
#[cfg(loom)]
#[derive(Debug, Default)]
pub struct LoomKnobs {
    /// The fault ignores the MMU-notifier sequence and in-progress count (installs an
    /// SPTE during or after a racing invalidation).
    pub skip_invalidate_retry: revmap_rmap::sync::AtomicBool,
}

/// Guest memory restricted to the memslots (a table outside them faults the walk).
struct SlotMem<'a> {
    mem: &'a mut SparseMemory,
    slots: &'a [SlotArch],
}

impl SlotMem<'_> {
    fn check(&self, gpa: Gpa) -> Result<(), MemoryError> {
        if self.slots.iter().any(|s| s.contains(gpa.gfn())) {
            Ok(())
        } else {
            Err(MemoryError::Unbacked(gpa.0))
        }
    }
}

impl GuestPhysMemory for SlotMem<'_> {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, MemoryError> {
        self.check(gpa)?;
        self.mem.read_u64(gpa)
    }
    fn read_u32(&self, gpa: Gpa) -> Result<u32, MemoryError> {
        self.check(gpa)?;
        self.mem.read_u32(gpa)
    }
    fn cmpxchg_u64(&mut self, gpa: Gpa, old: u64, new: u64) -> Cmpxchg<u64> {
        self.check(gpa)?;
        self.mem.cmpxchg_u64(gpa, old, new)
    }
    fn cmpxchg_u32(&mut self, gpa: Gpa, old: u32, new: u32) -> Cmpxchg<u32> {
        self.check(gpa)?;
        self.mem.cmpxchg_u32(gpa, old, new)
    }
}

fn hash_gfn(gfn: u64) -> usize {
    (gfn.wrapping_mul(0x61c8_8646_80b5_83eb) >> (64 - MMU_HASH_SHIFT)) as usize
}

/// The linear address an access to `gva` uses: 32 bits outside long mode.
const fn linear(mode: &CpuMode, gva: u64) -> u64 {
    if uses_pae_root(mode) {
        gva & 0xffff_ffff
    } else {
        gva
    }
}

fn sp_index(gva: u64, level: u32) -> usize {
    ((gva >> (12 + level_shift(level))) & 511) as usize
}

/// The first gfn a leaf SPTE at `level`, index `i`, built from the guest leaf `gpte`
/// maps: the gpte's frame rounded to the SPTE's size; for a 32-bit guest's 4 MiB page
/// (PSE-36 high bits included) the 2 MiB half the SPTE index selects.
fn leaf_gpte_gfn(mode: &CpuMode, level: u32, gpte: u64, i: usize) -> u64 {
    if mode.paging().has_4_byte_gpte() && level == 2 {
        let mut base = (gpte & 0xffc0_0000) >> 12;
        if mode.pse36 {
            base |= ((gpte >> 13) & 0xff) << 20;
        }
        return base + (((i as u64) & 1) << 9);
    }
    (gpte & PT64_ADDR_MASK) >> 12 >> level_shift(level) << level_shift(level)
}

/// Lockless aging of one rmap (`kvm_rmap_age_gfn_range` for one head): under the
/// head's read-only bit lock, for every entry (resolved to its SPTE word by `spte_of`),
/// test A, or clear it with an atomic RMW when `clear`. Runs without `mmu_lock`
/// against writers that zap SPTEs ([`clear_and_unlink`]): the RMW never writes a
/// present value back over a cleared SPTE. True if any SPTE was young.
pub fn age_rmap_head<'a>(
    head: &PteListHead,
    pool: &DescPool,
    clear: bool,
    spte_of: impl Fn(SpteHandle) -> Option<&'a AtomicU64>,
) -> bool {
    age_rmap_head_impl(head, pool, clear, spte_of, false)
}

/// The should-fail variant of [`age_rmap_head`] for the loom models: A cleared by a
/// load and a separate store (a lost update against a concurrent zap).
#[cfg(loom)]
pub fn age_rmap_head_load_store<'a>(
    head: &PteListHead,
    pool: &DescPool,
    spte_of: impl Fn(SpteHandle) -> Option<&'a AtomicU64>,
) -> bool {
    age_rmap_head_impl(head, pool, true, spte_of, true)
}

fn age_rmap_head_impl<'a>(
    head: &PteListHead,
    pool: &DescPool,
    clear: bool,
    spte_of: impl Fn(SpteHandle) -> Option<&'a AtomicU64>,
    load_store: bool,
) -> bool {
    let mut young = false;
    let rg = head.lock_readonly();
    for h in rg.iter(pool) {
        let Some(a) = spte_of(h) else { continue };
        if !clear {
            // ORDERING: Relaxed: a hint (false negatives are fine, as in KVM).
            young |= a.load(Ordering::Relaxed) & Spte::ACCESSED != 0;
        } else if load_store {
            // ORDERING: Relaxed; deliberately not atomic as a whole (loom should-fail).
            let old = a.load(Ordering::Relaxed);
            a.store(old & !Spte::ACCESSED, Ordering::Relaxed);
            young |= old & Spte::ACCESSED != 0;
        } else {
            // ORDERING: Relaxed RMW: only the A bit changes, atomically with respect to
            // a zapper's clear of the whole SPTE; the read-only rmap lock keeps the
            // entry's shadow page alive meanwhile.
            let old = a.fetch_and(!Spte::ACCESSED, Ordering::Relaxed);
            young |= old & Spte::ACCESSED != 0;
        }
    }
    young
}

/// `drop_spte` on one leaf SPTE word `spte` with rmap entry `h` on `head`: clear the
/// SPTE, then remove the entry under the head's bit lock (as
/// `mmu_spte_clear_track_bits` then `rmap_remove`). Lockless agers may hold `head`
/// read-locked and RMW the SPTE's A bit meanwhile; the clear is an atomic swap, so
/// neither loses the other's update.
pub fn clear_and_unlink(
    spte: &AtomicU64,
    head: &PteListHead,
    pool: &DescPool,
    h: SpteHandle,
) -> Result<(), PteListError> {
    // ORDERING: Relaxed RMW: the SPTE's own modification order serialises it with the
    // agers' RMWs; the rmap head lock orders the list update.
    spte.swap(Spte::NONPRESENT.0, Ordering::Relaxed);
    head.lock().remove(pool, h)
}

/// Result of a fault attempt.
enum FaultResult {
    Done(AccessOutcome),
    Retry,
}

impl Default for ShadowMmu {
    fn default() -> Self {
        Self::new()
    }
}

impl ShadowMmu {
    /// An MMU with no memslots, no vCPUs, an empty guest memory (aborts if the hash
    /// table cannot be allocated; see [`try_new`](Self::try_new)).
    pub fn new() -> Self {
        Self::with_hash(vec![None; 1 << MMU_HASH_SHIFT].into_boxed_slice())
    }

    /// [`new`](Self::new), reporting a failed allocation as [`ShadowError::NoMemory`].
    pub fn try_new() -> Result<Self, ShadowError> {
        Ok(Self::with_hash(
            try_boxed_slice(1 << MMU_HASH_SHIFT, |_| None).map_err(oom)?,
        ))
    }

    fn with_hash(hash: Box<[Option<SpId>]>) -> Self {
        Self {
            pool: Arc::new(DescPool::new()),
            sps: Vec::new(),
            free_ids: Vec::new(),
            hash,
            active_head: None,
            active_tail: None,
            caches: PageCaches::default(),
            mmu_valid_gen: 0,
            n_used: 0,
            n_max: None,
            indirect_shadow_pages: 0,
            slots: Vec::new(),
            mem: SparseMemory::new(),
            vcpus: Vec::new(),
            invalidate: revmap_host::InvalidateSeq::default(),
            memslots_gen: 0,
            #[cfg(loom)]
            knobs: LoomKnobs::default(),
            stats: ShadowStats::default(),
        }
    }

    /// The fault-injection switches of the loom models.
    #[cfg(loom)]
    pub fn loom_knobs(&self) -> &LoomKnobs {
        &self.knobs
    }

    #[cfg(not(loom))]
    fn skip_retry(&self) -> bool {
        false
    }

    #[cfg(loom)]
    fn skip_retry(&self) -> bool {
        // ORDERING: Relaxed: set before the model's threads start.
        self.knobs.skip_invalidate_retry.load(Ordering::Relaxed)
    }

    /// The rmap descriptor pool.
    pub fn pool(&self) -> &DescPool {
        &self.pool
    }

    /// Adds a vCPU in `mode`; returns its index (aborts if memory runs out; see
    /// [`try_add_vcpu`](Self::try_add_vcpu)).
    pub fn add_vcpu(&mut self, mode: CpuMode) -> usize {
        self.push_vcpu(mode, Vec::with_capacity(NUM_PREV_ROOTS + 1))
    }

    /// [`add_vcpu`](Self::add_vcpu) with its allocations fallible (`KVM_CREATE_VCPU`
    /// failing with `-ENOMEM`): nothing is added then.
    pub fn try_add_vcpu(&mut self, mode: CpuMode) -> Result<usize, ShadowError> {
        let mut prev_roots = Vec::new();
        prev_roots
            .try_reserve_exact(NUM_PREV_ROOTS + 1)
            .map_err(oom)?;
        self.vcpus.try_reserve(1).map_err(oom)?;
        Ok(self.push_vcpu(mode, prev_roots))
    }

    fn push_vcpu(&mut self, mode: CpuMode, prev_roots: Vec<(u64, SpId)>) -> usize {
        self.vcpus.push(VcpuMmu {
            mode,
            root: None,
            prev_roots,
            pae_root: [None; 4],
        });
        self.vcpus.len() - 1
    }

    /// The vCPU contexts.
    pub fn vcpus(&self) -> &[VcpuMmu] {
        &self.vcpus
    }

    /// `kvm_arch_commit_memory_region` (create): the slot's x86 arrays
    /// ([`prepare_memslot`](Self::prepare_memslot) then
    /// [`add_prepared_memslot`](Self::add_prepared_memslot)).
    pub fn add_memslot(&mut self, slot: Memslot) -> Result<(), ShadowError> {
        let arch = self.prepare_memslot(slot)?;
        self.add_prepared_memslot(arch)
    }

    /// `kvm_arch_prepare_memory_region` (create): the x86 arrays of `slot`, and room
    /// for them in the slot list, allocated before the change is published; changes
    /// nothing else.
    pub fn prepare_memslot(&mut self, slot: Memslot) -> Result<SlotArch, ShadowError> {
        let arch = SlotArch::new(slot)?;
        self.slots.try_reserve(1).map_err(oom)?;
        Ok(arch)
    }

    /// Installs arrays from [`prepare_memslot`](Self::prepare_memslot) (no allocation
    /// unless another slot took the room reserved meanwhile).
    pub fn add_prepared_memslot(&mut self, arch: SlotArch) -> Result<(), ShadowError> {
        self.slots.try_reserve(1).map_err(oom)?;
        let pos = self
            .slots
            .iter()
            .position(|s| s.slot.base_gfn() > arch.slot.base_gfn())
            .unwrap_or(self.slots.len());
        self.slots.insert(pos, arch);
        self.bump_memslots_gen()
    }

    /// The memslot generation (see [`Spte::mmio`]).
    pub fn memslots_generation(&self) -> u64 {
        self.memslots_gen
    }

    /// A memslot change: MMIO SPTEs of older generations become stale; when the
    /// recorded bits wrap, every shadow page is zapped (`kvm_mmu_invalidate_mmio_sptes`).
    fn bump_memslots_gen(&mut self) -> Result<(), ShadowError> {
        self.memslots_gen = self.memslots_gen.wrapping_add(1);
        if self.memslots_gen & ((1 << Spte::MMIO_GEN_BITS) - 1) == 0 {
            self.zap_all_fast()?;
        }
        Ok(())
    }

    /// Whether MMIO SPTE `s` records the current memslot generation.
    fn mmio_current(&self, s: Spte) -> bool {
        s.mmio_gen() == self.memslots_gen & ((1 << Spte::MMIO_GEN_BITS) - 1)
    }

    /// Replaces the descriptor of a slot (flags change) keeping its arrays.
    pub fn update_memslot(&mut self, slot: Memslot) {
        if let Some(s) = self.slots.iter_mut().find(|s| s.slot.id() == slot.id()) {
            s.slot = slot;
        }
        // A wrap zaps everything; a failure there shows in the checker.
        let _ = self.bump_memslots_gen();
    }

    /// `kvm_arch_flush_shadow_memslot` then the removal of the slot's arrays: every
    /// SPTE of the slot is unmapped and every shadow page with gptes inside it zapped
    /// first (the write-track and lpage counts live in the slot).
    pub fn remove_memslot(&mut self, id: SlotId) -> Result<Option<Memslot>, ShadowError> {
        self.flush_memslot(id)?;
        let pos = self.slots.iter().position(|s| s.slot.id() == id);
        let removed = pos.map(|p| self.slots.remove(p).slot);
        self.bump_memslots_gen()?;
        Ok(removed)
    }

    /// `kvm_arch_flush_shadow_memslot` without the quirk: unmap the slot's rmaps and
    /// prepare-zap every shadow page with gptes whose gfn is in the slot.
    pub fn flush_memslot(&mut self, id: SlotId) -> Result<(), ShadowError> {
        let Some(s) = self.slots.iter().find(|s| s.slot.id() == id) else {
            return Ok(());
        };
        let (start, end) = (s.slot.base_gfn().0, s.slot.end_gfn().0);
        self.unmap_gfn_range(id, start, end)?;
        let mut invalid = ZapList::new();
        let r = self.zap_active_where(&mut invalid, |p| {
            p.role.has_gptes() && p.gfn >= start && p.gfn < end
        });
        self.commit_zap(invalid);
        r
    }

    /// Memory-slot list (x86 side).
    pub fn memslots(&self) -> impl Iterator<Item = &Memslot> {
        self.slots.iter().map(|s| &s.slot)
    }

    /// Sets `n_max_mmu_pages` (`KVM_SET_NR_MMU_PAGES`); `None` = memslot pages / 50.
    pub fn set_max_mmu_pages(&mut self, n: Option<u64>) {
        self.n_max = n;
    }

    /// The page limit in force.
    pub fn max_mmu_pages(&self) -> u64 {
        self.n_max.unwrap_or_else(|| {
            let pages: u64 = self.slots.iter().map(|s| s.slot.npages()).sum();
            (pages / MEMSLOT_PAGES_TO_MMU_PAGES_RATIO).max(MIN_ALLOC_MMU_PAGES)
        })
    }

    /// `n_used_mmu_pages`.
    pub fn used_mmu_pages(&self) -> u64 {
        self.n_used
    }

    /// `indirect_shadow_pages`.
    pub fn indirect_shadow_pages(&self) -> u64 {
        self.indirect_shadow_pages
    }

    /// Live (arena) shadow page ids, valid or pinned invalid.
    pub fn live_ids(&self) -> impl Iterator<Item = SpId> + '_ {
        self.sps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .map(|(i, _)| SpId(i as u32))
    }

    /// The shadow page `id`.
    pub fn sp(&self, id: SpId) -> Option<&ShadowPage> {
        self.sps.get(id.0 as usize).and_then(Option::as_ref)
    }

    fn sp_ok(&self, id: SpId) -> Result<&ShadowPage, ShadowError> {
        self.sp(id).ok_or(ShadowError::Dangling(id))
    }

    /// Write SPTE `i` of page `id` and, for an indirect page, the gfn and access it
    /// translates (the sync and fault paths' last step).
    fn install_spte(
        &mut self,
        id: SpId,
        i: usize,
        gfn: u64,
        acc: Acc,
        n: Spte,
    ) -> Result<(), ShadowError> {
        let sp = self.sp_mut(id)?;
        if let Some(t) = sp.translation.as_mut() {
            if let Some(x) = t.get_mut(i) {
                *x = (gfn << 12) | u64::from(acc.bits());
            }
        }
        sp.set_spte(i, n);
        Ok(())
    }

    fn sp_mut(&mut self, id: SpId) -> Result<&mut ShadowPage, ShadowError> {
        self.sps
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .ok_or(ShadowError::Dangling(id))
    }

    /// SPTE `i` of shadow page `id`.
    pub fn spte(&self, id: SpId, i: usize) -> Option<Spte> {
        self.sp(id).map(|s| s.spte(i))
    }

    fn is_obsolete(&self, sp: &ShadowPage) -> bool {
        sp.role.invalid() != 0 || sp.mmu_valid_gen != self.mmu_valid_gen
    }

    fn slot_of(&self, gfn: u64) -> Option<&SlotArch> {
        self.slots.iter().find(|s| s.contains(gfn))
    }

    /// `kvm_mmu_page_get_gfn`: the gfn SPTE `i` of `sp` maps (or would map).
    pub fn sp_get_gfn(sp: &ShadowPage, i: usize) -> u64 {
        match &sp.translation {
            Some(t) => t.get(i).map_or(0, |x| x >> 12),
            None => sp.gfn + ((i as u64) << level_shift(sp.role.level())),
        }
    }

    /// `kvm_mmu_page_get_access`.
    pub fn sp_get_access(sp: &ShadowPage, i: usize) -> Acc {
        match &sp.translation {
            Some(t) => Acc::from_bits_truncate(t.get(i).map_or(0, |x| (x & 7) as u8)),
            None => sp.role.acc(),
        }
    }

    /// Whether `gfn` is write-tracked (an upper-level shadow page shadows it).
    pub fn is_write_tracked(&self, gfn: u64) -> bool {
        self.slot_of(gfn)
            .and_then(|s| s.write_track.get(s.idx(gfn, 1)))
            .is_some_and(|&c| c > 0)
    }

    /// The valid shadow pages with gptes at `gfn` (`for_each_gfn_valid_sp_with_gptes`).
    pub fn gfn_sps(&self, gfn: u64) -> Vec<SpId> {
        self.gfn_sps_iter(gfn).collect()
    }

    /// [`gfn_sps`](Self::gfn_sps) in place, newest first (the hash chain).
    fn gfn_sps_iter(&self, gfn: u64) -> impl Iterator<Item = SpId> + '_ {
        let mut cur = self.hash_first(gfn);
        std::iter::from_fn(move || {
            while let Some(id) = cur {
                let sp = self.sp(id)?;
                cur = sp.hash_next;
                if sp.gfn == gfn && sp.role.has_gptes() && !self.is_obsolete(sp) {
                    return Some(id);
                }
            }
            None
        })
    }

    /// Whether `gfn` is shadowed (some valid shadow page has gptes there).
    pub fn is_shadowed(&self, gfn: u64) -> bool {
        self.gfn_sps_iter(gfn).next().is_some()
    }

    /// Number of write-protected (shadowed) guest frames.
    pub fn write_protected_gfns(&self) -> u64 {
        let mut g: Vec<u64> = self
            .live_ids()
            .filter_map(|id| self.sp(id))
            .filter(|s| s.role.has_gptes() && !self.is_obsolete(s) && !s.unsync)
            .map(|s| s.gfn)
            .collect();
        g.sort_unstable();
        g.dedup();
        g.len() as u64
    }

    // ---------------------------------------------------------------- rmaps

    fn rmap_add(
        &mut self,
        cache: &mut DescCache<'_>,
        sp: SpId,
        i: usize,
        gfn: u64,
        level: u32,
    ) -> Result<(), ShadowError> {
        let h = spte_handle(sp, i)?;
        let Some(head) = self.slot_of(gfn).and_then(|s| s.rmap_head(gfn, level)) else {
            return Err(ShadowError::NoSlot(gfn));
        };
        // A recycled rmap's SPTEs are cleared as they come off it (in place).
        let sps = &self.sps;
        let r = head.lock().rmap_add(cache, h, |z| {
            let (zid, zi) = decode_handle(z);
            if let Some(p) = sps.get(zid.0 as usize).and_then(Option::as_ref) {
                p.set_spte(zi, Spte::NONPRESENT);
            }
        })?;
        self.stats.rmap_adds += 1;
        if r.flush_remote_tlbs {
            self.stats.rmap_recycled += 1;
            self.stats.tlb_flushes += 1;
        }
        Ok(())
    }

    /// The rmap entries at (`gfn`, `level`).
    pub fn rmap_entries(&self, gfn: u64, level: u32) -> Result<Vec<SpteHandle>, ShadowError> {
        let mut v = Vec::new();
        self.for_each_rmap_spte(gfn, level, |h, _| {
            v.try_reserve(1).map_err(oom)?;
            v.push(h);
            Ok(())
        })?;
        Ok(v)
    }

    /// Calls `f` with every rmap entry at (`gfn`, `level`) and its shadow page, in place
    /// under the rmap's read lock (`for_each_rmap_spte`); `f` may update SPTEs (atomics)
    /// but not the rmaps.
    fn for_each_rmap_spte(
        &self,
        gfn: u64,
        level: u32,
        mut f: impl FnMut(SpteHandle, Option<&ShadowPage>) -> Result<(), ShadowError>,
    ) -> Result<(), ShadowError> {
        let Some(head) = self.slot_of(gfn).and_then(|s| s.rmap_head(gfn, level)) else {
            return Ok(());
        };
        let g = head.lock_readonly();
        for h in g.iter(&self.pool) {
            f(h, self.sp(decode_handle(h).0))?;
        }
        Ok(())
    }

    /// `drop_spte` on a leaf: clear and `rmap_remove` with the gfn recomputed.
    fn drop_spte(&mut self, id: SpId, i: usize) -> Result<(), ShadowError> {
        let sp = self.sp_ok(id)?;
        let s = sp.spte(i);
        if !s.is_shadow_present() {
            return Ok(());
        }
        let gfn = Self::sp_get_gfn(sp, i);
        let level = sp.role.level();
        let h = spte_handle(id, i)?;
        let Some(head) = self.slot_of(gfn).and_then(|s| s.rmap_head(gfn, level)) else {
            sp.set_spte(i, Spte::NONPRESENT);
            return Err(ShadowError::NoSlot(gfn));
        };
        let Some(a) = sp.spt.get(i) else {
            return Ok(());
        };
        Ok(clear_and_unlink(a, head, &self.pool, h)?)
    }

    /// `drop_parent_pte`: unlink `child` from SPTE (`parent`, `i`).
    fn drop_parent_pte(&mut self, child: SpId, parent: SpId, i: usize) -> Result<(), ShadowError> {
        let h = spte_handle(parent, i)?;
        self.sp_ok(child)?
            .parent_ptes
            .lock()
            .remove(&self.pool, h)?;
        self.sp_ok(parent)?.set_spte(i, Spte::NONPRESENT);
        Ok(())
    }

    /// Page `id` and its SPTE `i` if that is shadow-present (`None` otherwise). An MMIO
    /// SPTE there is dropped rather than zapped or refreshed (`sync_mmio_spte`): the
    /// next access refaults and makes a new one.
    fn present_spte(&self, id: SpId, i: usize) -> Result<Option<(&ShadowPage, Spte)>, ShadowError> {
        let sp = self.sp_ok(id)?;
        let s = sp.spte(i);
        if s.is_mmio() {
            sp.set_spte(i, Spte::NONPRESENT);
            return Ok(None);
        }
        Ok(s.is_shadow_present().then_some((sp, s)))
    }

    /// `mmu_page_zap_pte`: drop a leaf or unlink a child; true if something was present.
    fn zap_pte(&mut self, id: SpId, i: usize) -> Result<bool, ShadowError> {
        let Some((sp, s)) = self.present_spte(id, i)? else {
            return Ok(false);
        };
        if sp.is_level_leaf(i) {
            self.drop_spte(id, i)?;
        } else {
            self.drop_parent_pte(SpId(s.pfn() as u32), id, i)?;
        }
        Ok(true)
    }

    /// `rmap_write_protect` over the level 1..3 rmaps covering `gfn`: clears W (and
    /// MMU-writable with `pt_protect`); true if a flush is needed.
    fn write_protect_gfn(&mut self, gfn: u64, pt_protect: bool) -> Result<bool, ShadowError> {
        let mut flush = false;
        for level in 1..=3 {
            self.for_each_rmap_spte(gfn, level, |h, sp| {
                let (id, i) = decode_handle(h);
                let sp = sp.ok_or(ShadowError::Dangling(id))?;
                let s = sp.spte(i);
                let n = if pt_protect {
                    s.write_protected()
                } else {
                    Spte(s.0 & !Spte::WRITABLE)
                };
                if n != s {
                    if pt_protect && s.is_mmu_writable() || !pt_protect && s.is_writable() {
                        flush = true;
                    }
                    sp.set_spte(i, n);
                }
                Ok(())
            })?;
        }
        if flush {
            self.stats.tlb_flushes += 1;
        }
        Ok(flush)
    }

    // ---------------------------------------------------------------- shadow pages

    fn account_shadowed(&mut self, id: SpId) -> Result<(), ShadowError> {
        let gfn = self.count_shadowed(id, true)?;
        self.write_protect_gfn(gfn, true)?;
        Ok(())
    }

    fn unaccount_shadowed(&mut self, id: SpId) -> Result<(), ShadowError> {
        self.count_shadowed(id, false)?;
        Ok(())
    }

    /// The counting shared by `account_shadowed` and `unaccount_shadowed`: moves the
    /// indirect-page count, the write-track count of `id`'s gfn (for a table above
    /// level 1) and its `disallow_lpage` counts at levels 2 and 3 by one, up when `up`.
    /// Returns the gfn.
    fn count_shadowed(&mut self, id: SpId, up: bool) -> Result<u64, ShadowError> {
        let sp = self.sp_ok(id)?;
        let (gfn, level) = (sp.gfn, sp.role.level());
        self.indirect_shadow_pages = if up {
            self.indirect_shadow_pages.saturating_add(1)
        } else {
            self.indirect_shadow_pages.saturating_sub(1)
        };
        let Some(slot) = self.slots.iter_mut().find(|s| s.contains(gfn)) else {
            return Err(ShadowError::NoSlot(gfn));
        };
        if level > 1 {
            let i = slot.idx(gfn, 1);
            if let Some(c) = slot.write_track.get_mut(i) {
                *c = if up {
                    c.saturating_add(1)
                } else {
                    c.saturating_sub(1)
                };
            }
        }
        for (k, l) in [2u32, 3].into_iter().enumerate() {
            let i = slot.idx(gfn, l);
            if let Some(c) = slot.disallow_lpage[k].get_mut(i) {
                *c = if up {
                    c.saturating_add(1)
                } else {
                    c.saturating_sub(1)
                };
            }
        }
        Ok(gfn)
    }

    /// `mmu_topup_memory_caches` for shadow pages: fills the caches with the SPTE and
    /// shadowed-translation arrays of [`SP_CACHE_TOPUP`] pages and reserves room for as
    /// many in the arena and its free list. A few compares when they are full. Every
    /// operation that may create shadow pages calls it before it changes anything (a
    /// fault, a root load, a CR3 or mode change); inside, pages come from the caches
    /// only. Err ([`ShadowError::NoMemory`]) changes nothing the checker sees.
    pub fn mmu_topup_memory_caches(&mut self) -> Result<(), ShadowError> {
        let c = &mut self.caches;
        while c.spt.len() < SP_CACHE_TOPUP {
            c.spt
                .try_reserve_exact(SP_CACHE_TOPUP - c.spt.len())
                .map_err(oom)?;
            let spt = try_boxed_slice(SPTES_PER_PAGE, |_| AtomicU64::new(Spte::NONPRESENT.0))
                .map_err(oom)?;
            c.spt.push(spt);
        }
        while c.translation.len() < SP_CACHE_TOPUP {
            c.translation
                .try_reserve_exact(SP_CACHE_TOPUP - c.translation.len())
                .map_err(oom)?;
            let t = try_boxed_slice(SPTES_PER_PAGE, |_| 0u64).map_err(oom)?;
            c.translation.push(t);
        }
        // Arena room: each new page takes a free slot or a new one; the free list can
        // take back every slot of the arena.
        let need = SP_CACHE_TOPUP.saturating_sub(self.free_ids.len());
        if self.sps.capacity() - self.sps.len() < need {
            self.sps.try_reserve(need).map_err(oom)?;
        }
        if self.free_ids.capacity() < self.sps.capacity() {
            let more = self.sps.capacity() - self.free_ids.len();
            self.free_ids.try_reserve_exact(more).map_err(oom)?;
        }
        Ok(())
    }

    /// Whether the caches hold a page of `role` (the arena has room for it).
    fn caches_hold(&self, role: SpRole) -> bool {
        let arena = !self.free_ids.is_empty()
            || (self.sps.len() < self.sps.capacity() && self.free_ids.capacity() > self.sps.len());
        arena
            && !self.caches.spt.is_empty()
            && (!Self::wants_translation(role) || !self.caches.translation.is_empty())
    }

    fn wants_translation(role: SpRole) -> bool {
        role.has_gptes() && role.level() <= 3
    }

    /// `kvm_mmu_alloc_shadow_page`: a new page from the caches (never allocates:
    /// [`ShadowError::NoMemory`] if they were not topped up), hashed, at the head of the
    /// active list, accounted.
    fn alloc_sp(&mut self, gfn: u64, role: SpRole) -> Result<SpId, ShadowError> {
        if !self.caches_hold(role) {
            return Err(ShadowError::NoMemory);
        }
        let Some(spt) = self.caches.spt.pop() else {
            return Err(ShadowError::NoMemory);
        };
        let translation = if Self::wants_translation(role) {
            self.caches.translation.pop()
        } else {
            None
        };
        let sp = ShadowPage {
            gfn,
            role,
            spt,
            translation,
            parent_ptes: PteListHead::new(),
            unsync: false,
            unsync_children: AtomicU32::new(0),
            unsync_child_bitmap: std::array::from_fn(|_| AtomicU64::new(0)),
            root_count: 0,
            mmu_valid_gen: self.mmu_valid_gen,
            write_flooding_count: 0,
            on: OnList::None,
            prev: None,
            next: None,
            hash_next: None,
        };
        let id = match self.free_ids.pop() {
            Some(i) => {
                if let Some(slot) = self.sps.get_mut(i as usize) {
                    *slot = Some(sp);
                }
                SpId(i)
            }
            None => {
                // Within the capacity the top-up reserved (`caches_hold`).
                self.sps.push(Some(sp));
                SpId((self.sps.len() - 1) as u32)
            }
        };
        self.hash_add(id, gfn);
        self.active_add(id);
        self.n_used += 1;
        self.stats.sp_created += 1;
        if role.has_gptes() {
            self.account_shadowed(id)?;
        }
        Ok(id)
    }

    // ---------------------------------------------------------------- lists

    /// The first page of `gfn`'s hash chain (any gfn of the bucket).
    fn hash_first(&self, gfn: u64) -> Option<SpId> {
        self.hash.get(hash_gfn(gfn)).copied().flatten()
    }

    fn hash_add(&mut self, id: SpId, gfn: u64) {
        let head = self.hash_first(gfn);
        if let Ok(sp) = self.sp_mut(id) {
            sp.hash_next = head;
        }
        if let Some(h) = self.hash.get_mut(hash_gfn(gfn)) {
            *h = Some(id);
        }
    }

    fn hash_del(&mut self, id: SpId, gfn: u64) {
        let next = self.sp(id).and_then(|s| s.hash_next);
        let b = hash_gfn(gfn);
        let mut cur = self.hash_first(gfn);
        if cur == Some(id) {
            if let Some(h) = self.hash.get_mut(b) {
                *h = next;
            }
            return;
        }
        while let Some(c) = cur {
            let Ok(sp) = self.sp_mut(c) else { return };
            if sp.hash_next == Some(id) {
                sp.hash_next = next;
                return;
            }
            cur = sp.hash_next;
        }
    }

    /// Puts `id` at the head (newest end) of `active_mmu_pages`.
    fn active_add(&mut self, id: SpId) {
        let old = self.active_head;
        if let Ok(sp) = self.sp_mut(id) {
            sp.on = OnList::Active;
            sp.prev = None;
            sp.next = old;
        }
        match old {
            Some(o) => {
                if let Ok(sp) = self.sp_mut(o) {
                    sp.prev = Some(id);
                }
            }
            None => self.active_tail = Some(id),
        }
        self.active_head = Some(id);
    }

    /// Takes `id` off `active_mmu_pages` (if it is on it).
    fn active_del(&mut self, id: SpId) {
        let Some(sp) = self.sp(id) else { return };
        if sp.on != OnList::Active {
            return;
        }
        let (p, n) = (sp.prev, sp.next);
        match p {
            Some(p) => {
                if let Ok(sp) = self.sp_mut(p) {
                    sp.next = n;
                }
            }
            None => self.active_head = n,
        }
        match n {
            Some(n) => {
                if let Ok(sp) = self.sp_mut(n) {
                    sp.prev = p;
                }
            }
            None => self.active_tail = p,
        }
        if let Ok(sp) = self.sp_mut(id) {
            sp.on = OnList::None;
            sp.prev = None;
            sp.next = None;
        }
    }

    /// Puts zapped, unpinned `id` on `list`.
    fn zap_list_add(&mut self, list: &mut ZapList, id: SpId) {
        let head = list.head;
        if let Ok(sp) = self.sp_mut(id) {
            sp.on = OnList::Zap;
            sp.prev = None;
            sp.next = head;
            list.head = Some(id);
            list.len += 1;
        }
    }

    /// The oldest active page for which `pred` holds.
    fn oldest_active_where(&self, pred: impl Fn(&ShadowPage) -> bool) -> Option<SpId> {
        let mut cur = self.active_tail;
        while let Some(id) = cur {
            let sp = self.sp(id)?;
            if pred(sp) {
                return Some(id);
            }
            cur = sp.prev;
        }
        None
    }

    /// Prepare-zap every active page for which `pred` holds, oldest first; restarts
    /// from the tail when a zap took the next page too (KVM's `goto restart`).
    fn zap_active_where(
        &mut self,
        invalid: &mut ZapList,
        pred: impl Fn(&ShadowPage) -> bool,
    ) -> Result<(), ShadowError> {
        let mut cur = self.active_tail;
        while let Some(id) = cur {
            let sp = self.sp_ok(id)?;
            let newer = sp.prev;
            if pred(sp) {
                self.prepare_zap(id, invalid)?;
                if newer.is_some_and(|n| self.sp(n).is_none_or(|s| s.on != OnList::Active)) {
                    cur = self.active_tail;
                    continue;
                }
            }
            cur = newer;
        }
        Ok(())
    }

    /// Calls `f` for every parent SPTE of `id` (`for_each_rmap_spte` over
    /// `parent_ptes`), in place under the list's read lock; `f` may update unsync bits
    /// (atomics) but not the parent lists.
    fn for_each_parent(
        &self,
        id: SpId,
        mut f: impl FnMut(SpId, usize) -> Result<(), ShadowError>,
    ) -> Result<(), ShadowError> {
        let sp = self.sp_ok(id)?;
        let g = sp.parent_ptes.lock_readonly();
        for h in g.iter(&self.pool) {
            let (p, i) = decode_handle(h);
            f(p, i)?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- shadow pages

    /// `kvm_mmu_get_shadow_page`: find a valid page with equal gfn **and** role, else
    /// create one. A same-gfn unsync page blocks an upper-level role (it is zapped); an
    /// unsync page found is synced first (zapped and missed if that fails). Tops up the
    /// page caches first.
    pub fn get_shadow_page(&mut self, gfn: u64, role: SpRole) -> Result<SpId, ShadowError> {
        self.mmu_topup_memory_caches()?;
        self.find_or_alloc_sp(gfn, role)
    }

    /// [`get_shadow_page`](Self::get_shadow_page) from the topped-up caches.
    fn find_or_alloc_sp(&mut self, gfn: u64, role: SpRole) -> Result<SpId, ShadowError> {
        let mut invalid = ZapList::new();
        let found = self.find_sp(gfn, role, &mut invalid);
        self.commit_zap(invalid);
        match found? {
            Some(id) => Ok(id),
            None => self.alloc_sp(gfn, role),
        }
    }

    fn find_sp(
        &mut self,
        gfn: u64,
        role: SpRole,
        invalid: &mut ZapList,
    ) -> Result<Option<SpId>, ShadowError> {
        // Zapping leaves pages hashed until the commit: the chain stays walkable.
        let mut cur = self.hash_first(gfn);
        while let Some(id) = cur {
            let sp = self.sp_ok(id)?;
            cur = sp.hash_next;
            if sp.gfn != gfn || self.is_obsolete(sp) {
                continue;
            }
            if sp.role != role {
                if role.level() > 1 && sp.unsync {
                    self.prepare_zap(id, invalid)?;
                }
                continue;
            }
            if sp.unsync {
                let ok = self.sync_page(id)?;
                if !ok {
                    self.prepare_zap(id, invalid)?;
                    continue;
                }
            }
            self.sp_mut(id)?.write_flooding_count = 0;
            return Ok(Some(id));
        }
        Ok(None)
    }

    fn mark_unsync_bit(&self, parent: SpId, i: usize) -> Result<(), ShadowError> {
        if self.sp_ok(parent)?.set_child_bit(i) == Some(1) {
            self.mark_unsync_parents(parent)?;
        }
        Ok(())
    }

    /// The parent SPTEs of `id` (for the checker; the MMU walks them in place).
    fn parents(&self, id: SpId) -> Result<Vec<(SpId, usize)>, ShadowError> {
        let mut v = Vec::new();
        self.for_each_parent(id, |p, i| {
            v.push((p, i));
            Ok(())
        })?;
        Ok(v)
    }

    fn mark_unsync_parents(&self, id: SpId) -> Result<(), ShadowError> {
        self.for_each_parent(id, |p, i| self.mark_unsync_bit(p, i))
    }

    fn clear_unsync_child_bit(&self, parent: SpId, i: usize) -> Result<(), ShadowError> {
        let p = self.sp_ok(parent)?;
        if p.clear_child_bit(i) == Some(0) && !p.unsync {
            self.for_each_parent(parent, |pp, pi| self.clear_unsync_child_bit(pp, pi))?;
        }
        Ok(())
    }

    /// `kvm_unsync_page`.
    fn unsync_page(&mut self, id: SpId) -> Result<(), ShadowError> {
        self.stats.unsync += 1;
        self.sp_mut(id)?.unsync = true;
        self.mark_unsync_parents(id)
    }

    /// `mmu_try_to_unsync_pages`: false if the gfn must stay write-protected.
    fn try_to_unsync(
        &mut self,
        gfn: u64,
        can_unsync: bool,
        prefetch: bool,
    ) -> Result<bool, ShadowError> {
        if self.is_write_tracked(gfn) {
            return Ok(false);
        }
        let mut cur = self.hash_first(gfn);
        while let Some(id) = cur {
            let sp = self.sp_ok(id)?;
            cur = sp.hash_next;
            if sp.gfn != gfn || !sp.role.has_gptes() || self.is_obsolete(sp) || sp.unsync {
                continue;
            }
            if prefetch || !can_unsync || sp.role.level() != 1 {
                return Ok(false);
            }
            self.unsync_page(id)?;
        }
        Ok(true)
    }

    fn link(
        &mut self,
        cache: &mut DescCache<'_>,
        parent: SpId,
        i: usize,
        child: SpId,
    ) -> Result<(), ShadowError> {
        let h = spte_handle(parent, i)?;
        let c = self.sp_ok(child)?;
        let _ = c.parent_ptes.lock().add(cache, h)?;
        let mark = c.unsync || c.unsync_children() > 0;
        let ad = c.role.ad_disabled() != 0;
        let rec = (c.gfn << 12) | u64::from(c.role.access());
        let p = self.sp_mut(parent)?;
        if let Some(x) = p.translation.as_mut().and_then(|t| t.get_mut(i)) {
            *x = rec;
        }
        p.set_spte(i, Spte::link(u64::from(child.0), ad));
        if mark {
            self.mark_unsync_bit(parent, i)?;
        }
        Ok(())
    }

    /// The child at (`parent`, `i`) for (`gfn`, `role`): reused only if both match
    /// (the 2026 fixes), else the old entry is dropped and a page found or created,
    /// synced if it has unsync descendants, and linked.
    fn get_child(
        &mut self,
        cache: &mut DescCache<'_>,
        parent: SpId,
        i: usize,
        gfn: u64,
        role: SpRole,
    ) -> Result<SpId, ShadowError> {
        let p = self.sp_ok(parent)?;
        let s = p.spte(i);
        if s.is_shadow_present() {
            if p.is_level_leaf(i) {
                self.drop_spte(parent, i)?;
                self.stats.tlb_flushes += 1;
            } else {
                let c = SpId(s.pfn() as u32);
                let cp = self.sp_ok(c)?;
                if cp.gfn == gfn && cp.role == role {
                    return Ok(c);
                }
                self.drop_parent_pte(c, parent, i)?;
                self.stats.tlb_flushes += 1;
            }
        }
        let c = self.find_or_alloc_sp(gfn, role)?;
        if self.sp_ok(c)?.unsync_children() > 0 {
            self.sync_children(c)?;
        }
        self.link(cache, parent, i, c)?;
        Ok(c)
    }

    // ---------------------------------------------------------------- zapping

    /// Adds the unsync pages below `id` (through unsync child bits) to `batch` until it
    /// is full (`mmu_unsync_walk`).
    fn collect_unsync(&self, id: SpId, batch: &mut Batch) {
        let Some(sp) = self.sp(id) else { return };
        if sp.unsync_children() == 0 {
            return;
        }
        for i in 0..SPTES_PER_PAGE {
            if batch.is_full() {
                return;
            }
            if !sp.test_child_bit(i) {
                continue;
            }
            let s = sp.spte(i);
            if !s.is_shadow_present() || sp.is_level_leaf(i) {
                continue;
            }
            let c = SpId(s.pfn() as u32);
            if let Some(cp) = self.sp(c) {
                if cp.unsync {
                    batch.push(c);
                }
                self.collect_unsync(c, batch);
            }
        }
    }

    /// `zap_unsync_children`: prepare-zap the unsync pages below `id`, a batch at a
    /// time (a zapped page is no longer unsync: each batch makes progress).
    fn zap_unsync_children(&mut self, id: SpId, invalid: &mut ZapList) -> Result<(), ShadowError> {
        loop {
            let mut batch = Batch::new();
            self.collect_unsync(id, &mut batch);
            if batch.len == 0 {
                return Ok(());
            }
            for &d in batch.as_slice() {
                self.prepare_zap(d, invalid)?;
            }
        }
    }

    /// `__kvm_mmu_prepare_zap_page`: unlink `id` from its children and parents, make it
    /// invalid, take it off the active list and, unless pinned as a root, put it on
    /// `invalid` for [`commit_zap`](Self::commit_zap).
    pub fn prepare_zap(&mut self, id: SpId, invalid: &mut ZapList) -> Result<(), ShadowError> {
        let sp = self.sp_ok(id)?;
        if sp.role.invalid() != 0 {
            if sp.root_count == 0 && sp.on == OnList::None {
                self.zap_list_add(invalid, id);
            }
            return Ok(());
        }
        let level = sp.role.level();
        self.stats.sp_zapped += 1;
        if level > 1 {
            self.zap_unsync_children(id, invalid)?;
        }
        for i in 0..SPTES_PER_PAGE {
            self.zap_pte(id, i)?;
        }
        // Clear every parent SPTE pointing here, emptying the parent list.
        {
            let sps = &self.sps;
            let sp = self.sp_ok(id)?;
            let mut g = sp.parent_ptes.lock();
            g.destroy(&self.pool, |h| {
                let (p, i) = decode_handle(h);
                if let Some(pp) = sps.get(p.0 as usize).and_then(Option::as_ref) {
                    pp.set_spte(i, Spte::NONPRESENT);
                }
            })?;
        }
        // Obsolete (old-generation) pages were accounted too: unaccount every page with
        // gptes on its first zap.
        if self.sp_ok(id)?.role.has_gptes() {
            self.unaccount_shadowed(id)?;
        }
        self.active_del(id);
        let sp = self.sp_mut(id)?;
        sp.unsync = false;
        sp.clear_unsync_bits();
        sp.role = sp.role.with_invalid(1);
        let rc = sp.root_count;
        self.n_used = self.n_used.saturating_sub(1);
        if rc == 0 {
            self.zap_list_add(invalid, id);
        }
        Ok(())
    }

    /// `kvm_mmu_commit_zap_page`: one flush, then free every page of `invalid`.
    pub fn commit_zap(&mut self, invalid: ZapList) {
        if invalid.is_empty() {
            return;
        }
        self.stats.tlb_flushes += 1;
        let mut cur = invalid.head;
        while let Some(id) = cur {
            let Some(sp) = self.sp(id) else { break };
            cur = sp.next;
            let gfn = sp.gfn;
            self.hash_del(id, gfn);
            if let Some(slot) = self.sps.get_mut(id.0 as usize) {
                *slot = None;
            }
            // The top-up keeps the free list's capacity at least the arena's.
            if self.free_ids.len() < self.free_ids.capacity() {
                self.free_ids.push(id.0);
            }
        }
    }

    /// Runs `f` with a fresh [`ZapList`], then commits it (also when `f` failed).
    fn zapping(
        &mut self,
        f: impl FnOnce(&mut Self, &mut ZapList) -> Result<(), ShadowError>,
    ) -> Result<(), ShadowError> {
        let mut invalid = ZapList::new();
        let r = f(self, &mut invalid);
        self.commit_zap(invalid);
        r
    }

    /// Prepare-zap and commit one page.
    pub fn zap_page(&mut self, id: SpId) -> Result<(), ShadowError> {
        self.zapping(|m, invalid| m.prepare_zap(id, invalid))
    }

    /// `kvm_mmu_zap_all`.
    pub fn zap_all(&mut self) -> Result<(), ShadowError> {
        self.zapping(|m, invalid| {
            while let Some(id) = m.active_tail {
                m.prepare_zap(id, invalid)?;
            }
            Ok(())
        })
    }

    /// `kvm_mmu_zap_all_fast`: flip the generation, then zap obsolete pages from the
    /// tail, stopping at the first current one. vCPUs reload their roots.
    pub fn zap_all_fast(&mut self) -> Result<(), ShadowError> {
        self.mmu_valid_gen ^= 1;
        self.zapping(|m, invalid| {
            while let Some(id) = m.active_tail {
                if m.sp_ok(id)?.mmu_valid_gen == m.mmu_valid_gen {
                    break;
                }
                m.prepare_zap(id, invalid)?;
            }
            Ok(())
        })
    }

    /// `make_mmu_pages_available`: evict the oldest unpinned pages when fewer than
    /// [`MIN_FREE_MMU_PAGES`] are free.
    fn make_mmu_pages_available(&mut self) -> Result<(), ShadowError> {
        let max = self.max_mmu_pages();
        let avail = |s: &Self| max.saturating_sub(s.n_used);
        if avail(self) >= MIN_FREE_MMU_PAGES {
            return Ok(());
        }
        self.zapping(|m, invalid| {
            while avail(m) < REFILL_PAGES {
                let Some(v) = m.oldest_active_where(|s| s.root_count == 0) else {
                    break;
                };
                m.prepare_zap(v, invalid)?;
                m.stats.evicted += 1;
            }
            Ok(())
        })?;
        if avail(self) == 0 {
            return Err(ShadowError::NoSpace);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- sync

    fn read_gpte(&self, gpa: u64) -> Option<u64> {
        self.slot_of(gpa >> 12)?;
        self.mem.read_u64(Gpa(gpa)).ok()
    }

    /// The gpte SPTE `i` of a page with gptes (`role`, `gfn`) derives from, zero-extended
    /// (`FNAME(get_level1_sp_gpa)` generalised): 8-byte gptes map one to one; a 4-byte
    /// guest table is shadowed in quadrants (`quadrant` selects the 512-entry half of a
    /// guest PT, or the 256-entry quarter of a guest PD, whose 4 MiB entries each give
    /// two 2 MiB SPTEs).
    fn read_sp_gpte(&self, role: SpRole, gfn: u64, i: usize) -> Option<u64> {
        let base = gfn << 12;
        if role.has_4_byte_gpte() == 0 {
            return self.read_gpte(base + 8 * i as u64);
        }
        let mut idx = (u64::from(role.quadrant()) << 9) + i as u64;
        if role.level() == 2 {
            idx >>= 1;
        }
        let gpa = base + 4 * idx;
        self.slot_of(gpa >> 12)?;
        self.mem.read_u32(Gpa(gpa)).ok().map(u64::from)
    }

    /// `sync_spte` for SPTE `i` of unsync/indirect page `id` under `mode`; returns
    /// whether a flush is needed. Drops the SPTE when the gpte no longer allows it.
    fn sync_spte(&mut self, id: SpId, i: usize, mode: &CpuMode) -> Result<bool, ShadowError> {
        let Some((sp, s)) = self.present_spte(id, i)? else {
            return Ok(false);
        };
        let level = sp.role.level();
        let gpte = self.read_sp_gpte(sp.role, sp.gfn, i).unwrap_or(0);
        if prefetch_invalid_gpte(mode, level as u8, gpte) || !is_last_gpte(mode, level as u8, gpte)
        {
            self.drop_spte(id, i)?;
            return Ok(true);
        }
        let sp = self.sp_ok(id)?;
        let acc = protect_clean_gpte(sp.role.acc() & gpte_access(mode, gpte), gpte);
        let gfn = (gpte & PT64_ADDR_MASK) >> 12;
        if gfn != Self::sp_get_gfn(sp, i) {
            self.drop_spte(id, i)?;
            return Ok(true);
        }
        let old_acc = Self::sp_get_access(sp, i);
        let pkey = ((gpte >> crate::paging::PT64_PKEY_SHIFT) & 15) as u8;
        if old_acc == acc && pkey_of(s) == pkey {
            return Ok(false);
        }
        let host_writable = s.is_host_writable();
        let (n, _) = self.make_spte(
            s,
            level,
            gfn,
            s.pfn(),
            acc,
            host_writable,
            pkey,
            true,
            false,
        )?;
        self.install_spte(id, i, gfn, acc, n)?;
        Ok(true)
    }

    /// `kvm_sync_page`: resync every SPTE of `id` from its gptes; false if the page
    /// must be zapped (its role cannot be synced under the current vCPU mode).
    fn sync_page(&mut self, id: SpId) -> Result<bool, ShadowError> {
        let Some(mode) = self.sync_mode(id) else {
            return Ok(false);
        };
        self.stats.synced += 1;
        for i in 0..SPTES_PER_PAGE {
            self.sync_spte(id, i, &mode)?;
        }
        Ok(true)
    }

    /// A vCPU mode under which page `id` may be synced (its role equals the root role
    /// outside level/access/quadrant/passthrough), if any.
    fn sync_mode(&self, id: SpId) -> Option<CpuMode> {
        let sp = self.sp(id)?;
        let mask = |r: SpRole| {
            r.with_level(0)
                .with_access(0)
                .with_quadrant(0)
                .with_passthrough(0)
                .with_invalid(0)
        };
        self.vcpus
            .iter()
            .find(|v| mask(root_role(&v.mode)) == mask(sp.role))
            .map(|v| v.mode)
    }

    /// `mmu_sync_children`: write-protect, then resync every unsync descendant, a
    /// batch at a time (KVM's `kvm_mmu_pages`).
    pub fn sync_children(&mut self, id: SpId) -> Result<(), ShadowError> {
        self.zapping(|m, invalid| m.sync_children_batches(id, invalid))?;
        // Stale-high bits of pages with no unsync descendant left are cleared lazily.
        self.clear_stale_bits(id)
    }

    fn sync_children_batches(
        &mut self,
        id: SpId,
        invalid: &mut ZapList,
    ) -> Result<(), ShadowError> {
        loop {
            let mut batch = Batch::new();
            self.collect_unsync(id, &mut batch);
            if batch.len == 0 {
                return Ok(());
            }
            let len = batch.len;
            if let Some(ids) = batch.ids.get_mut(..len) {
                ids.sort_unstable();
            }
            // Every page of the batch leaves the unsync state here, synced or zapped
            // below: the next walk finds fewer.
            for &d in batch.as_slice() {
                let gfn = self.sp_ok(d)?.gfn;
                self.sp_mut(d)?.unsync = false;
                self.write_protect_gfn(gfn, true)?;
            }
            for &d in batch.as_slice() {
                if self.sp(d).is_none_or(|s| s.role.invalid() != 0) {
                    continue;
                }
                if !self.sync_page(d)? {
                    self.prepare_zap(d, invalid)?;
                    continue;
                }
                self.for_each_parent(d, |p, i| self.clear_unsync_child_bit(p, i))?;
            }
        }
    }

    fn clear_stale_bits(&self, id: SpId) -> Result<(), ShadowError> {
        let Some(sp) = self.sp(id) else {
            return Ok(());
        };
        if sp.unsync_children() == 0 {
            return Ok(());
        }
        for i in 0..SPTES_PER_PAGE {
            if !sp.test_child_bit(i) {
                continue;
            }
            let s = sp.spte(i);
            if !s.is_shadow_present() || sp.is_level_leaf(i) {
                sp.clear_child_bit(i);
                continue;
            }
            let c = SpId(s.pfn() as u32);
            self.clear_stale_bits(c)?;
            if self
                .sp(c)
                .is_some_and(|cp| !cp.unsync && cp.unsync_children() == 0)
            {
                sp.clear_child_bit(i);
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- roots

    fn put_root(&mut self, id: SpId) -> Result<(), ShadowError> {
        let sp = self.sp_mut(id)?;
        sp.root_count = sp.root_count.saturating_sub(1);
        if sp.root_count == 0 && sp.role.invalid() != 0 {
            self.zap_page(id)?;
        }
        Ok(())
    }

    fn root_valid(&self, id: SpId) -> bool {
        self.sp(id).is_some_and(|s| !self.is_obsolete(s))
    }

    /// `kvm_mmu_load` (lazy): free an obsolete root, allocate the root for the current
    /// CR3, sync it.
    fn load_root(&mut self, v: usize) -> Result<Option<SpId>, ShadowError> {
        let vc = self.vcpus.get(v).ok_or(ShadowError::NoVcpu(v))?;
        let mode = vc.mode;
        if uses_pae_root(&mode) {
            self.load_pae_roots(v)?;
            return Ok(None);
        }
        if let Some(r) = vc.root {
            if self.root_valid(r) {
                return Ok(Some(r));
            }
            self.vcpus[v].root = None;
            self.put_root(r)?;
        }
        self.free_obsolete_prev_roots(v)?;
        let gfn = (mode.cr3 & PT64_ADDR_MASK) >> 12;
        if self.slot_of(gfn).is_none() {
            return Ok(None); // the dummy root: every access faults in the walker
        }
        self.make_mmu_pages_available()?;
        let role = root_role(&mode);
        let r = self.get_shadow_page(gfn, role)?;
        self.sp_mut(r)?.root_count += 1;
        self.vcpus[v].root = Some(r);
        self.sync_children(r)?;
        Ok(Some(r))
    }

    /// The gfn and role of `pae_root[q]` under `mode` (`mmu_alloc_shadow_roots` /
    /// `mmu_alloc_direct_roots` at PAE root level): `None` for a non-present PDPTE, and
    /// for a present one with reserved bits set. KVM's `load_pdptrs` refuses the latter
    /// (the CR3 write takes a #GP), so its root allocation never meets one; a caller
    /// that passes such PDPTRs in anyway gets no root for that GiB, and an access there
    /// takes the fault path, whose guest walk reports the reserved-bit #PF.
    fn pae_root_key(&self, mode: &CpuMode, q: usize) -> Option<(u64, SpRole)> {
        let role = root_role(mode).with_level(2);
        match mode.paging() {
            PagingMode::Off => Some(((q as u64) << 18, role)),
            PagingMode::Bits32 => {
                Some(((mode.cr3 & 0xffff_f000) >> 12, role.with_quadrant(q as u32)))
            }
            PagingMode::Pae => {
                let pdpte = match mode.pdptrs {
                    Some(p) => p.get(q).copied().unwrap_or(0),
                    None => self.read_gpte((mode.cr3 & 0xffff_ffe0) + 8 * q as u64)?,
                };
                let usable = pdpte & PT_PRESENT != 0 && !is_rsvd_gpte(mode, 3, pdpte);
                usable.then_some(((pdpte & PT64_ADDR_MASK) >> 12, role))
            }
            PagingMode::Long4 | PagingMode::Long5 => None,
        }
    }

    /// Loads the missing or obsolete entries of vCPU `v`'s `pae_root`.
    fn load_pae_roots(&mut self, v: usize) -> Result<(), ShadowError> {
        let mode = self.vcpus[v].mode;
        for q in 0..4 {
            if let Some(r) = self.vcpus[v].pae_root[q] {
                if self.root_valid(r) {
                    continue;
                }
                self.vcpus[v].pae_root[q] = None;
                self.put_root(r)?;
            }
            let Some((gfn, role)) = self.pae_root_key(&mode, q) else {
                continue;
            };
            if role.has_gptes() && self.slot_of(gfn).is_none() {
                continue; // a guest table outside memory: a dummy root, faults retry
            }
            self.make_mmu_pages_available()?;
            let r = self.get_shadow_page(gfn, role)?;
            self.sp_mut(r)?.root_count += 1;
            self.vcpus[v].pae_root[q] = Some(r);
            self.sync_children(r)?;
        }
        Ok(())
    }

    /// Drops vCPU `v`'s `pae_root` pins.
    fn put_pae_roots(&mut self, v: usize) -> Result<(), ShadowError> {
        let roots = std::mem::take(&mut self.vcpus[v].pae_root);
        for r in roots.into_iter().flatten() {
            self.put_root(r)?;
        }
        Ok(())
    }

    /// The root a fault or a shadow walk of `gva` starts from: the current root, or the
    /// `pae_root` entry of `gva`'s GiB.
    fn walk_root(vc: &VcpuMmu, gva: u64) -> Option<SpId> {
        if uses_pae_root(&vc.mode) {
            vc.pae_root[((gva >> 30) & 3) as usize]
        } else {
            vc.root
        }
    }

    fn free_obsolete_prev_roots(&mut self, v: usize) -> Result<(), ShadowError> {
        self.put_prev_roots_where(v, |m, r| !m.root_valid(r))
    }

    /// Drops (in place, in order) the previous roots of vCPU `v` for which `pred` holds.
    fn put_prev_roots_where(
        &mut self,
        v: usize,
        pred: impl Fn(&Self, SpId) -> bool,
    ) -> Result<(), ShadowError> {
        let mut k = 0;
        loop {
            let vc = self.vcpus.get_mut(v).ok_or(ShadowError::NoVcpu(v))?;
            let Some(&(_, r)) = vc.prev_roots.get(k) else {
                return Ok(());
            };
            if !pred(self, r) {
                k += 1;
                continue;
            }
            self.vcpus[v].prev_roots.remove(k);
            self.put_root(r)?;
        }
    }

    /// Unloads every root of vCPU `v` (`kvm_mmu_unload`).
    pub fn unload(&mut self, v: usize) -> Result<(), ShadowError> {
        self.put_prev_roots_where(v, |_, _| true)?;
        if let Some(r) = self.vcpus[v].root.take() {
            self.put_root(r)?;
        }
        self.put_pae_roots(v)
    }

    /// Room for the previous roots of vCPU `v` plus the current one, reserved before a
    /// root switch changes anything.
    fn reserve_prev_roots(&mut self, v: usize) -> Result<(), ShadowError> {
        let pr = &mut self
            .vcpus
            .get_mut(v)
            .ok_or(ShadowError::NoVcpu(v))?
            .prev_roots;
        if pr.capacity() < NUM_PREV_ROOTS + 1 {
            let more = (NUM_PREV_ROOTS + 1).saturating_sub(pr.len());
            pr.try_reserve_exact(more).map_err(oom)?;
        }
        Ok(())
    }

    /// A CPU state change of vCPU `v` (CR0/CR4/EFER writes, CR3 load, PKRU/PKRS, A20,
    /// MAXPHYADDR): a role change resets the context; a change in how entries are read
    /// that the shadow-page role does not capture (MAXPHYADDR, NXE, PSE, 1G pages) zaps
    /// everything; a CR3 change switches roots (`kvm_mmu_new_pgd`, prev_roots) and syncs
    /// (no PCID: every CR3 load flushes).
    pub fn set_mode(&mut self, v: usize, mode: CpuMode) -> Result<(), ShadowError> {
        let old = self.vcpus.get(v).ok_or(ShadowError::NoVcpu(v))?.mode;
        // Everything a root switch may allocate, before anything changes.
        self.reserve_prev_roots(v)?;
        self.mmu_topup_memory_caches()?;
        let (or, nr) = (old.role(), mode.role());
        if or.maxphyaddr != nr.maxphyaddr
            || or.cr4_pse != nr.cr4_pse
            || or.gbpages != nr.gbpages
            || old.a20 != mode.a20
        {
            self.unload(v)?;
            self.vcpus[v].mode = mode;
            self.zap_all()?;
            return Ok(());
        }
        if or != nr {
            self.unload(v)?;
            self.vcpus[v].mode = mode;
            return Ok(());
        }
        self.vcpus[v].mode = mode;
        if uses_pae_root(&mode) && old.pdptrs != mode.pdptrs {
            // New PDPTRs (`load_pdptrs`): the PAE roots are freed.
            self.put_pae_roots(v)?;
        }
        if old.cr3 & PT64_ADDR_MASK != mode.cr3 & PT64_ADDR_MASK {
            self.new_pgd(v, old.cr3 & PT64_ADDR_MASK)?;
        }
        Ok(())
    }

    /// MOV CR3 without PCIDs (every load flushes): switch roots if the table changed
    /// (`kvm_mmu_new_pgd`), then sync the current root (`kvm_invalidate_pcid` ->
    /// KVM_REQ_MMU_SYNC), also when the value is unchanged.
    pub fn load_cr3(&mut self, v: usize, cr3: u64) -> Result<(), ShadowError> {
        let mut mode = self.vcpus.get(v).ok_or(ShadowError::NoVcpu(v))?.mode;
        let same = mode.cr3 & PT64_ADDR_MASK == cr3 & PT64_ADDR_MASK;
        mode.cr3 = cr3;
        self.set_mode(v, mode)?;
        if same {
            self.sync_roots(v)?;
        }
        Ok(())
    }

    fn new_pgd(&mut self, v: usize, old_pgd: u64) -> Result<(), ShadowError> {
        let mode = self.vcpus[v].mode;
        if uses_pae_root(&mode) {
            // PAE roots are not cached: free them; the next load builds the new ones.
            self.put_pae_roots(v)?;
            return self.sync_roots(v);
        }
        let pgd = mode.cr3 & PT64_ADDR_MASK;
        let role = root_role(&mode);
        let cur = self.vcpus[v].root.take();
        if let Some(r) = cur {
            // Within the room `set_mode` reserved (at most NUM_PREV_ROOTS + 1 entries).
            self.vcpus[v].prev_roots.insert(0, (old_pgd, r));
        }
        let hit = self.vcpus[v].prev_roots.iter().position(|&(p, r)| {
            p == pgd
                && self
                    .sp(r)
                    .is_some_and(|s| s.role == role && !self.is_obsolete(s))
        });
        if let Some(k) = hit {
            let (_, r) = self.vcpus[v].prev_roots.remove(k);
            self.vcpus[v].root = Some(r);
            self.stats.prev_root_hits += 1;
            if let Ok(sp) = self.sp_mut(r) {
                sp.write_flooding_count = 0;
            }
        }
        while self.vcpus[v].prev_roots.len() > NUM_PREV_ROOTS {
            if let Some((_, r)) = self.vcpus[v].prev_roots.pop() {
                self.put_root(r)?;
            }
        }
        self.sync_roots(v)
    }

    /// `kvm_mmu_sync_roots` (KVM_REQ_MMU_SYNC): sync everything reachable from the
    /// current root.
    pub fn sync_roots(&mut self, v: usize) -> Result<(), ShadowError> {
        self.mmu_topup_memory_caches()?;
        let root = self.load_root(v)?;
        let pae = self.vcpus[v].pae_root;
        for r in root.into_iter().chain(pae.into_iter().flatten()) {
            let sp = self.sp_ok(r)?;
            if sp.unsync || sp.unsync_children() > 0 {
                self.sync_children(r)?;
            }
        }
        Ok(())
    }

    /// A guest-wide TLB flush (`kvm_vcpu_flush_tlb_guest`): sync the roots and free
    /// unsync previous roots.
    pub fn flush_tlb_guest(&mut self, v: usize) -> Result<(), ShadowError> {
        self.sync_roots(v)?;
        self.put_prev_roots_where(v, |m, r| m.sp(r).is_some_and(|s| s.unsync_children() > 0))
    }

    /// Invariant 20's measure: unsync pages reachable from vCPU `v`'s current root, and
    /// cached previous roots with unsync descendants.
    pub fn unsync_reachable(&self, v: usize) -> Result<(usize, usize), ShadowError> {
        let vc = self.vcpus.get(v).ok_or(ShadowError::NoVcpu(v))?;
        let mut n = 0;
        let mut stack: Vec<SpId> = vc.root.into_iter().collect();
        stack.extend(vc.pae_root.iter().flatten());
        let mut seen = std::collections::HashSet::new();
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            let sp = self.sp_ok(id)?;
            n += usize::from(sp.unsync);
            for i in 0..SPTES_PER_PAGE {
                let s = sp.spte(i);
                if s.is_shadow_present() && !sp.is_level_leaf(i) {
                    stack.push(SpId(s.pfn() as u32));
                }
            }
        }
        let prev = vc
            .prev_roots
            .iter()
            .filter(|(_, r)| self.sp(*r).is_some_and(|s| s.unsync_children() > 0))
            .count();
        Ok((n, prev))
    }

    /// `kvm_mmu_invlpg`: on the current and previous roots, resync the one leaf SPTE of
    /// each unsync page on the path of `gva`.
    pub fn invlpg(&mut self, v: usize, gva: u64) -> Result<(), ShadowError> {
        let vc = self.vcpus.get(v).ok_or(ShadowError::NoVcpu(v))?;
        let mode = vc.mode;
        let gva = linear(&mode, gva);
        // The previous roots and the current one, on the stack (the sync below changes
        // no root).
        let mut roots = [None; NUM_PREV_ROOTS];
        for (slot, &(_, r)) in roots.iter_mut().zip(&vc.prev_roots) {
            *slot = Some(r);
        }
        let cur = Self::walk_root(vc, gva);
        for r in roots.into_iter().flatten().chain(cur) {
            let mut id = r;
            while let Some(sp) = self.sp(id) {
                if self.is_obsolete(sp) {
                    break;
                }
                let level = sp.role.level();
                let i = sp_index(gva, level);
                if sp.unsync {
                    if self.sync_spte(id, i, &mode)? {
                        self.stats.tlb_flushes += 1;
                    }
                    break;
                }
                if sp.unsync_children() == 0 {
                    break;
                }
                let s = sp.spte(i);
                if !s.is_shadow_present() || sp.is_level_leaf(i) {
                    break;
                }
                id = SpId(s.pfn() as u32);
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- SPTEs

    /// `make_spte`: the new leaf value and whether write access was withheld because
    /// the gfn is (or stays) write-protected for shadowing.
    #[allow(clippy::too_many_arguments)]
    fn make_spte(
        &mut self,
        old: Spte,
        level: u32,
        gfn: u64,
        pfn: u64,
        mut acc: Acc,
        host_writable: bool,
        pkey: u8,
        synchronizing: bool,
        prefetch: bool,
    ) -> Result<(Spte, bool), ShadowError> {
        let mut v = Spte::MMU_PRESENT | Spte::PRESENT | ((pfn << 12) & Spte::PFN_MASK);
        v |= u64::from(pkey & 15) << crate::paging::PT64_PKEY_SHIFT;
        if !prefetch {
            v |= Spte::ACCESSED;
        }
        if level > 1 {
            v |= Spte::PAGE_SIZE;
        }
        if !acc.contains(Acc::EXEC) {
            v |= Spte::NX;
        }
        if acc.contains(Acc::USER) {
            v |= Spte::USER;
        }
        if host_writable {
            v |= Spte::HOST_WRITABLE;
        } else {
            acc -= Acc::WRITE;
        }
        let mut wrprot = false;
        if acc.contains(Acc::WRITE) {
            let was_writable_leaf =
                old.is_shadow_present() && old.is_writable() && old.pfn() == pfn;
            if !was_writable_leaf && !self.try_to_unsync(gfn, !synchronizing, prefetch)? {
                wrprot = true;
            } else {
                v |= Spte::WRITABLE | Spte::MMU_WRITABLE | Spte::DIRTY;
                if let Some(s) = self.slot_of(gfn) {
                    if s.dirty_logging() {
                        s.slot.mark_dirty(Gfn(gfn), 1);
                    }
                }
            }
        }
        Ok((Spte(v), wrprot))
    }

    /// `mmu_set_spte`; returns whether write access was withheld.
    #[allow(clippy::too_many_arguments)]
    fn set_spte(
        &mut self,
        cache: &mut DescCache<'_>,
        id: SpId,
        i: usize,
        gfn: u64,
        pfn: u64,
        acc: Acc,
        host_writable: bool,
        pkey: u8,
        prefetch: bool,
    ) -> Result<bool, ShadowError> {
        let sp = self.sp_ok(id)?;
        let level = sp.role.level();
        let old = sp.spte(i);
        if old.is_shadow_present() {
            if !sp.is_level_leaf(i) {
                self.drop_parent_pte(SpId(old.pfn() as u32), id, i)?;
                self.stats.tlb_flushes += 1;
            } else if old.pfn() != pfn || Self::sp_get_gfn(sp, i) != gfn {
                self.drop_spte(id, i)?;
                self.stats.tlb_flushes += 1;
            }
        }
        let sp = self.sp_ok(id)?;
        let old = sp.spte(i);
        let was_present = old.is_shadow_present();
        let (n, wrprot) = self.make_spte(
            old,
            level,
            gfn,
            pfn,
            acc,
            host_writable,
            pkey,
            false,
            prefetch,
        )?;
        self.install_spte(id, i, gfn, acc, n)?;
        if old.is_mmu_writable() && !n.is_mmu_writable() {
            self.stats.tlb_flushes += 1;
        }
        if level > 1 {
            self.stats.huge_sptes += 1;
        }
        if !was_present {
            self.rmap_add(cache, id, i, gfn, level)?;
        }
        Ok(wrprot)
    }

    // ---------------------------------------------------------------- faults

    /// Translates a guest access by vCPU `v` through the shadow table, taking a shadow
    /// page fault on a miss or a hardware permission fault.
    pub fn access(
        &mut self,
        v: usize,
        gva: u64,
        access: Access,
    ) -> Result<AccessOutcome, ShadowError> {
        let pool = self.pool.clone();
        let mut cache = DescCache::new(&pool);
        cache.reserve(FAULT_DESC_TOPUP).map_err(oom)?;
        self.access_with_cache(&mut cache, v, gva, access)
    }

    /// The descriptor pool, shared, for topping up a [`DescCache`] before `mmu_lock`.
    pub fn pool_arc(&self) -> Arc<DescPool> {
        self.pool.clone()
    }

    /// [`access`](Self::access) drawing rmap descriptors from `cache`, which the caller
    /// topped up (with [`FAULT_DESC_TOPUP`] per fault) before taking `mmu_lock`
    /// (`mmu_topup_memory_caches`); a fault never allocates descriptors otherwise.
    pub fn access_with_cache(
        &mut self,
        cache: &mut DescCache<'_>,
        v: usize,
        gva: u64,
        access: Access,
    ) -> Result<AccessOutcome, ShadowError> {
        if let Some(gpa) = self.translate(v, gva, access)? {
            self.stats.hits += 1;
            return Ok(AccessOutcome::Hit(gpa));
        }
        if let Some(gpa) = self.mmio_hit(v, gva, access)? {
            self.stats.mmio_hits += 1;
            return Ok(AccessOutcome::Mmio(gpa));
        }
        for _ in 0..MAX_FAULT_RETRIES {
            // mmu_topup_memory_caches: descriptors and shadow pages for the worst case
            // of one fault attempt, before it changes anything.
            if cache.credits() < FAULT_DESC_TOPUP {
                cache.reserve(FAULT_DESC_TOPUP).map_err(oom)?;
            }
            self.mmu_topup_memory_caches()?;
            match self.page_fault(cache, v, gva, access)? {
                FaultResult::Done(AccessOutcome::Fixed(gpa)) => {
                    // The installed SPTE must now translate the access.
                    return Ok(match self.translate(v, gva, access)? {
                        Some(g) => AccessOutcome::Fixed(g),
                        None => AccessOutcome::Fixed(gpa),
                    });
                }
                FaultResult::Done(o) => return Ok(o),
                FaultResult::Retry => self.stats.retries += 1,
            }
        }
        Ok(AccessOutcome::Retry)
    }

    /// The hardware's walk of the shadow table: `Some(gpa)` if the leaf allows the
    /// access under the vCPU's CR0/CR4 (the guest's SMEP/SMAP/PK rules apply to the
    /// SPTE's rights, as the CPU runs with the guest's CR4).
    pub fn translate(
        &self,
        v: usize,
        gva: u64,
        access: Access,
    ) -> Result<Option<Gpa>, ShadowError> {
        let vc = self.vcpus.get(v).ok_or(ShadowError::NoVcpu(v))?;
        let gva = linear(&vc.mode, gva);
        let Some((sp, i, s)) = self.shadow_walk(vc, gva) else {
            return Ok(None);
        };
        if !s.is_shadow_present() {
            return Ok(None);
        }
        let mut mode = vc.mode;
        mode.cr0 |= crate::paging::CR0_WP; // the host always runs with WP=1
        if permission_fault(&mode, access, s.acc(), pkey_of(s)).fault {
            return Ok(None);
        }
        let gfn = Self::sp_get_gfn(sp, i);
        let size = 1u64 << (12 + level_shift(sp.role.level()));
        Ok(Some(Gpa((gfn << 12) | (gva & (size - 1)))))
    }

    /// The hardware's walk of the shadow table for `gva` down to the SPTE it stops at:
    /// a present leaf, or a non-present or MMIO entry; `None` without a usable root.
    fn shadow_walk(&self, vc: &VcpuMmu, gva: u64) -> Option<(&ShadowPage, usize, Spte)> {
        let mut id = Self::walk_root(vc, gva)?;
        loop {
            let sp = self.sp(id)?;
            if self.is_obsolete(sp) {
                return None;
            }
            let i = sp_index(gva, sp.role.level());
            let s = sp.spte(i);
            if !s.is_shadow_present() || sp.is_level_leaf(i) {
                return Some((sp, i, s));
            }
            id = SpId(s.pfn() as u32);
        }
    }

    /// `handle_mmio_page_fault`: a reserved-bit fault on an MMIO SPTE of the current
    /// memslot generation is emulated without walking the guest tables; `Some(gpa)`
    /// if the SPTE is current and its recorded rights allow `access` (a stale one, a
    /// fetch, or protection keys go to the slow path, which walks and rebuilds it).
    pub fn mmio_hit(&self, v: usize, gva: u64, access: Access) -> Result<Option<Gpa>, ShadowError> {
        let vc = self.vcpus.get(v).ok_or(ShadowError::NoVcpu(v))?;
        let gva = linear(&vc.mode, gva);
        let Some((_, _, s)) = self.shadow_walk(vc, gva) else {
            return Ok(None);
        };
        if !s.is_mmio() || !self.mmio_current(s) {
            return Ok(None);
        }
        let mut mode = vc.mode;
        mode.cr0 |= crate::paging::CR0_WP;
        if access.contains(Access::FETCH)
            || mode.pke()
            || mode.pks()
            || permission_fault(&mode, access, s.mmio_acc(), 0).fault
        {
            return Ok(None);
        }
        Ok(Some(Gpa((s.mmio_gfn() << 12) | (gva & 0xfff))))
    }

    /// `FNAME(page_fault)` + `FNAME(fetch)`.
    fn page_fault(
        &mut self,
        cache: &mut DescCache<'_>,
        v: usize,
        gva: u64,
        access: Access,
    ) -> Result<FaultResult, ShadowError> {
        self.stats.page_faults += 1;
        let mode = self.vcpus.get(v).ok_or(ShadowError::NoVcpu(v))?.mode;
        let gva = linear(&mode, gva);
        let paging = mode.paging();
        // The guest's levels; the shadow walk starts below the PAE root without long mode.
        let walker_top = u32::from(paging.levels());
        let shadow_top = if uses_pae_root(&mode) { 2 } else { walker_top };
        // Paging off: no gptes; a direct map of up to 2 MiB under the PAE root
        // (`nonpaging_page_fault`).
        let direct_map = paging == PagingMode::Off;
        let w = {
            let mut m = SlotMem {
                mem: &mut self.mem,
                slots: &self.slots,
            };
            walk(&mut m, &mode, Gva(gva), access)?
        };
        self.track_aliased_ad_writes(&w, paging)?;
        let t = match w.outcome {
            Err(pf) => return Ok(FaultResult::Done(AccessOutcome::Fault(pf))),
            Ok(t) => t,
        };
        let leaf_level = if direct_map {
            2
        } else {
            u32::from(t.leaf_level)
        };
        let n = (walker_top + 1).saturating_sub(leaf_level) as usize;
        let Some(reads) = w.reads.get(w.reads.len().saturating_sub(n)..) else {
            return Ok(FaultResult::Retry);
        };
        // The gptes as they are now (after this walk's A/D update), for the re-checks
        // (at most one per level).
        let mut snap = [None; 6];
        for (x, e) in snap.iter_mut().zip(reads) {
            *x = self.read_gpte(e.gpa.0);
        }
        let gfn = t.gpa.gfn();
        let write = access.contains(Access::WRITE);
        let user = access.contains(Access::USER);
        // No memslot: an MMIO access; the path is built and an MMIO SPTE cached at the
        // 4 KiB leaf (`kvm_handle_noslot_fault`, `mark_mmio_spte`).
        let mmio = self.slot_of(gfn).is_none();
        if write && self.is_write_tracked(gfn) {
            self.stats.write_protected_faults += 1;
            return Ok(FaultResult::Done(AccessOutcome::WriteProtected(t.gpa)));
        }
        // kvm_mmu_faultin_pfn.
        let seq = self.invalidate.sample();
        if self.invalidate.in_progress() && !self.skip_retry() {
            return Ok(FaultResult::Retry);
        }
        let (host_writable, backing_shift) = match self.slot_of(gfn) {
            Some(slot) if slot.slot.is_invalid() => return Ok(FaultResult::Retry),
            Some(slot) => {
                if !slot.slot.is_host_present(Gfn(gfn)) {
                    slot.slot.set_host_present(Gfn(gfn), true);
                }
                (
                    !slot.slot.flags().contains(MemslotFlags::READONLY),
                    slot.slot.backing_page_shift(),
                )
            }
            None => (false, 12),
        };
        let mut acc = t.pte_access;
        if !direct_map && !write {
            acc = protect_clean_gpte(acc, t.leaf);
        }
        if !direct_map && !mmio && write && !user && !mode.wp() {
            acc = (acc | Acc::WRITE) - Acc::USER;
            if mode.smep() {
                acc -= Acc::EXEC;
            }
        }
        // "mmu_lock": the retry check, reclaim, then the stale-root check after it.
        if self.invalidate.retry(seq) && !self.skip_retry() {
            return Ok(FaultResult::Retry);
        }
        match self.make_mmu_pages_available() {
            // Caching an MMIO SPTE is an optimisation: with every shadow page pinned the
            // access is emulated uncached instead of failing (KVM would fail the fault).
            Err(ShadowError::NoSpace) if mmio => {
                return Ok(FaultResult::Done(AccessOutcome::Mmio(t.gpa)))
            }
            r => r?,
        }
        self.load_root(v)?;
        let Some(root) = Self::walk_root(&self.vcpus[v], gva) else {
            return Ok(FaultResult::Retry);
        };
        if !self.root_valid(root) {
            return Ok(FaultResult::Retry);
        }
        if paging == PagingMode::Pae
            && reads.get(1).map(|e| e.table_gfn()) != Some(self.sp_ok(root)?.gfn)
        {
            // The PDPTE changed since the root was loaded: free that root (KVM frees
            // the roots when the PDPTRs change) and retry with a fresh one.
            let q = ((gva >> 30) & 3) as usize;
            self.vcpus[v].pae_root[q] = None;
            self.put_root(root)?;
            return Ok(FaultResult::Retry);
        }
        // Indirect part.
        let mut sp = root;
        for level in ((leaf_level + 1)..=shadow_top).rev() {
            let i = sp_index(gva, level);
            self.sp_mut(sp)?.write_flooding_count = 0;
            let k = (walker_top - level + 1) as usize; // the entry at level - 1
            let (Some(e), Some(&cur)) = (reads.get(k), snap.get(k)) else {
                return Ok(FaultResult::Retry);
            };
            let role = self.sp_ok(sp)?.role.child(i, false, e.pt_access);
            let child = self.get_child(cache, sp, i, e.table_gfn(), role)?;
            if self.read_gpte(e.gpa.0) != cur || !self.root_valid(root) {
                return Ok(FaultResult::Retry);
            }
            sp = child;
        }
        // kvm_mmu_hugepage_adjust (none for MMIO), then the direct part.
        let goal = if mmio {
            1
        } else {
            self.hugepage_level(gfn, leaf_level, backing_shift, acc)
        };
        for level in ((goal + 1)..=leaf_level).rev() {
            let i = sp_index(gva, level);
            // The direct child at level - 1 covers 512^(level - 1) frames.
            let cgfn = gfn & !((1u64 << level_shift(level)) - 1);
            let role = self.sp_ok(sp)?.role.child(i, true, acc);
            sp = self.get_child(cache, sp, i, cgfn, role)?;
        }
        let i = sp_index(gva, goal);
        if mmio {
            self.set_mmio_spte(sp, i, gfn, acc)?;
            return Ok(FaultResult::Done(AccessOutcome::Mmio(t.gpa)));
        }
        let leaf_gfn = gfn & !((1u64 << level_shift(goal)) - 1);
        let Some(pfn) = self
            .slot_of(leaf_gfn)
            .and_then(|s| s.slot.host_pfn(Gfn(leaf_gfn)))
        else {
            return Ok(FaultResult::Retry);
        };
        let wrprot = self.set_spte(
            cache,
            sp,
            i,
            leaf_gfn,
            pfn,
            acc,
            host_writable,
            t.pkey,
            false,
        )?;
        self.pte_prefetch(cache, sp, i, &mode, t.pkey)?;
        if write && wrprot {
            self.stats.write_protected_faults += 1;
            return Ok(FaultResult::Done(AccessOutcome::WriteProtected(t.gpa)));
        }
        Ok(FaultResult::Done(AccessOutcome::Fixed(t.gpa)))
    }

    /// `mark_mmio_spte`: replaces leaf `i` of `id` (dropping a present one) with an MMIO
    /// SPTE for `gfn` recording the current memslot generation.
    fn set_mmio_spte(&mut self, id: SpId, i: usize, gfn: u64, acc: Acc) -> Result<(), ShadowError> {
        if self.zap_pte(id, i)? {
            self.stats.tlb_flushes += 1;
        }
        let s = Spte::mmio(gfn, acc, self.memslots_gen);
        self.sp_ok(id)?.set_spte(i, s);
        self.stats.mmio_sptes += 1;
        Ok(())
    }

    /// `FNAME(pte_prefetch)` / `direct_pte_prefetch` after a fault installed leaf
    /// `fault_i` of level-1 page `id`: the other SPTEs of its aligned group of
    /// [`PTE_PREFETCH_NUM`], skipping present ones and stopping at the first that cannot
    /// be mapped (indirect: a gpte not present, not accessed or with reserved bits;
    /// both: no memslot, a host page not resident, or write access into a
    /// dirty-logged slot). Never during an MMU-notifier invalidation. Prefetched SPTEs
    /// start with A clear and never unsync a shadowed gfn.
    fn pte_prefetch(
        &mut self,
        cache: &mut DescCache<'_>,
        id: SpId,
        fault_i: usize,
        mode: &CpuMode,
        pkey: u8,
    ) -> Result<(), ShadowError> {
        let sp = self.sp_ok(id)?;
        if sp.role.level() != 1 || sp.role.ad_disabled() != 0 || self.invalidate.in_progress() {
            return Ok(());
        }
        let (role, sp_gfn) = (sp.role, sp.gfn);
        let start = fault_i & !(PTE_PREFETCH_NUM - 1);
        for i in start..start + PTE_PREFETCH_NUM {
            let s = self.sp_ok(id)?.spte(i);
            if i == fault_i || s.is_shadow_present() {
                continue;
            }
            let (gfn, acc, pkey) = if role.direct() != 0 {
                (Self::sp_get_gfn(self.sp_ok(id)?, i), role.acc(), pkey)
            } else {
                let Some(gpte) = self.read_sp_gpte(role, sp_gfn, i) else {
                    break;
                };
                if prefetch_invalid_gpte(mode, 1, gpte) {
                    break;
                }
                let acc = protect_clean_gpte(role.acc() & gpte_access(mode, gpte), gpte);
                let pkey = ((gpte >> crate::paging::PT64_PKEY_SHIFT) & 15) as u8;
                ((gpte & PT64_ADDR_MASK) >> 12, acc, pkey)
            };
            let Some(slot) = self.slot_of(gfn) else { break };
            if slot.slot.is_invalid()
                || (slot.dirty_logging() && acc.contains(Acc::WRITE))
                || !slot.slot.is_host_present(Gfn(gfn))
                || cache.credits() == 0
            {
                break;
            }
            let Some(pfn) = slot.slot.host_pfn(Gfn(gfn)) else {
                break;
            };
            let host_writable = !slot.slot.flags().contains(MemslotFlags::READONLY);
            self.set_spte(cache, id, i, gfn, pfn, acc, host_writable, pkey, true)?;
            self.stats.prefetched += 1;
        }
        Ok(())
    }

    /// The largest level a leaf for `gfn` may use: guest leaf level, host backing,
    /// the frame inside one slot, no shadowed gfn inside (`disallow_lpage`), no dirty
    /// logging, 1G only with host GBPAGES (a 1G backing).
    fn hugepage_level(&self, gfn: u64, guest_level: u32, backing_shift: u32, _acc: Acc) -> u32 {
        let Some(slot) = self.slot_of(gfn) else {
            return 1;
        };
        if slot.dirty_logging() {
            return 1;
        }
        let mut level = 1;
        for l in 2..=guest_level.min(3) {
            if backing_shift < 12 + level_shift(l) {
                break;
            }
            let k = (l - 2) as usize;
            let i = slot.idx(gfn, l);
            if slot.disallow_lpage[k].get(i).is_none_or(|&c| c > 0) {
                break;
            }
            level = l;
        }
        level
    }

    // ---------------------------------------------------------------- emulated writes

    /// The walk's A/D updates are its own stores to guest memory, which KVM does not
    /// route through write tracking (`FNAME(update_accessed_dirty_bits)`): harmless for
    /// shadow pages in the walker's gpte size, where A and D change no translation. A
    /// table that is also shadowed in the other size (a 32-bit page directory that a PAE
    /// vCPU uses as a page table) reads a 4-byte update of the upper half of an 8-byte
    /// gpte as address bits 37 and 38: such an update is tracked as the write it is
    /// for that format ([`track_write`](Self::track_write)), so that no SPTE keeps the
    /// old address.
    fn track_aliased_ad_writes(&mut self, w: &Walk, paging: PagingMode) -> Result<(), ShadowError> {
        let four = paging.has_4_byte_gpte();
        for a in w.ad_writes.iter().filter(|a| a.ok) {
            let aliased = self.gfn_sps_iter(a.gpa.gfn()).any(|id| {
                self.sp(id)
                    .is_some_and(|sp| (sp.role.has_4_byte_gpte() != 0) != four)
            });
            if aliased {
                self.track_write(a.gpa.0, if four { 4 } else { 8 })?;
            }
        }
        Ok(())
    }

    /// `kvm_mmu_track_write`: an emulated guest store of `bytes` at `gpa` (the store
    /// itself is the caller's): zap the written SPTEs of every shadow page of the gfn,
    /// or the page itself on misaligned or flooding writes.
    pub fn track_write(&mut self, gpa: u64, bytes: u32) -> Result<(), ShadowError> {
        if self.indirect_shadow_pages == 0 {
            return Ok(());
        }
        self.stats.emulated_writes += 1;
        self.zapping(|m, invalid| m.track_write_pages(gpa, bytes, invalid))
    }

    /// The body of [`track_write`](Self::track_write): every shadow page of the gfn
    /// (the hash chain, in place: zapped pages stay hashed until the commit).
    fn track_write_pages(
        &mut self,
        gpa: u64,
        bytes: u32,
        invalid: &mut ZapList,
    ) -> Result<(), ShadowError> {
        let gfn = gpa >> 12;
        let mut cur = self.hash_first(gfn);
        while let Some(id) = cur {
            let sp = self.sp_ok(id)?;
            cur = sp.hash_next;
            if sp.gfn != gfn || !sp.role.has_gptes() || self.is_obsolete(sp) {
                continue;
            }
            let role = sp.role;
            if detect_write_misaligned(role, gpa, bytes) {
                self.stats.misaligned += 1;
                self.prepare_zap(id, invalid)?;
                continue;
            }
            if role.level() > 1 {
                let sp = self.sp_mut(id)?;
                sp.write_flooding_count = sp.write_flooding_count.saturating_add(1);
                if sp.write_flooding_count >= FLOOD_THRESHOLD {
                    self.stats.flooded += 1;
                    self.prepare_zap(id, invalid)?;
                    continue;
                }
            }
            if let Some(r) = written_sptes(role, gpa) {
                let mut flush = false;
                for i in r {
                    flush |= self.zap_pte(id, i)?;
                }
                if flush {
                    self.stats.tlb_flushes += 1;
                }
            }
        }
        Ok(())
    }

    /// Whether some shadow-present SPTE maps `gfn` writable.
    pub fn gfn_mapped_writable(&self, gfn: u64) -> Result<bool, ShadowError> {
        let mut writable = false;
        for level in 1..=3 {
            self.for_each_rmap_spte(gfn, level, |h, sp| {
                let (_, i) = decode_handle(h);
                writable |= sp.is_some_and(|sp| sp.spte(i).is_writable());
                Ok(())
            })?;
        }
        Ok(writable)
    }

    /// A guest 8-byte store to guest memory routed as the shadow MMU's SPTEs would
    /// route it: a plain store through a writable SPTE or to an unshadowed gfn; a write
    /// fault on a shadowed gfn (emulated with an upper-level page there, else unsync and
    /// store). Returns whether it was emulated.
    pub fn guest_store(&mut self, gpa: u64, val: u64) -> Result<bool, ShadowError> {
        self.guest_store_sized(gpa, val, 8)
    }

    /// A guest 4-byte store (a 32-bit guest's page-table entry), routed like
    /// [`guest_store`](Self::guest_store).
    pub fn guest_store_u32(&mut self, gpa: u64, val: u32) -> Result<bool, ShadowError> {
        self.guest_store_sized(gpa, u64::from(val), 4)
    }

    /// A store of `bytes` (4 or 8) at `gpa`; an emulated one is tracked as the aligned
    /// gpte-sized write it covers.
    fn guest_store_sized(&mut self, gpa: u64, val: u64, bytes: u32) -> Result<bool, ShadowError> {
        let gfn = gpa >> 12;
        let tracked = gpa & !(u64::from(bytes) - 1);
        let store = |m: &mut SparseMemory| match bytes {
            4 => m.write_u32(Gpa(gpa), val as u32),
            _ => m.write_u64(Gpa(gpa), val),
        };
        if !self.gfn_mapped_writable(gfn)? && self.is_shadowed(gfn) {
            // A write fault: emulate on a write-tracked gfn (or if unsync is refused),
            // else unsync the level-1 pages and let the store through.
            if self.is_write_tracked(gfn) || !self.try_to_unsync(gfn, true, false)? {
                self.stats.write_protected_faults += 1;
                store(&mut self.mem)?;
                self.track_write(tracked, bytes)?;
                return Ok(true);
            }
        }
        store(&mut self.mem)?;
        Ok(false)
    }

    // ---------------------------------------------------------------- host side

    /// `kvm_unmap_gfn_range` for `[start, end)` of `slot`: zap every SPTE of the range
    /// at all levels (shadow pages stay). Returns how many were zapped.
    pub fn unmap_gfn_range(
        &mut self,
        slot: SlotId,
        start: u64,
        end: u64,
    ) -> Result<u64, ShadowError> {
        let Some(s) = self.slots.iter().find(|s| s.slot.id() == slot) else {
            return Ok(0);
        };
        let lo = start.max(s.slot.base_gfn().0);
        let hi = end.min(s.slot.end_gfn().0);
        // Each SPTE is cleared as its entry comes off the rmap (in place).
        let sps = &self.sps;
        let mut zapped = 0u64;
        for level in 1..=3u32 {
            if lo >= hi {
                break;
            }
            let sh = level_shift(level);
            let mut g = (lo >> sh) << sh;
            while g < hi {
                let gg = g.max(lo);
                if let Some(head) = s.rmap_head(gg, level) {
                    if head.load().bits() != 0 {
                        head.lock().destroy(&self.pool, |h| {
                            let (id, i) = decode_handle(h);
                            if let Some(sp) = sps.get(id.0 as usize).and_then(Option::as_ref) {
                                sp.set_spte(i, Spte::NONPRESENT);
                            }
                            zapped += 1;
                        })?;
                    }
                }
                g += 1 << sh;
            }
        }
        if zapped != 0 {
            self.stats.tlb_flushes += 1;
        }
        Ok(zapped)
    }

    fn age_range(&self, slot: SlotId, start: u64, end: u64, clear: bool) -> bool {
        let Some(s) = self.slots.iter().find(|s| s.slot.id() == slot) else {
            return false;
        };
        let lo = start.max(s.slot.base_gfn().0);
        let hi = end.min(s.slot.end_gfn().0);
        let mut young = false;
        for level in 1..=3u32 {
            let sh = level_shift(level);
            let mut g = (lo >> sh) << sh;
            while g < hi {
                if let Some(head) = s.rmap_head(g.max(lo), level) {
                    young |= age_rmap_head(head, &self.pool, clear, |h| {
                        let (id, i) = decode_handle(h);
                        self.sp(id).and_then(|sp| sp.spt.get(i))
                    });
                }
                g += 1 << sh;
            }
        }
        young
    }

    /// `kvm_age_gfn`: clear A in every SPTE of the range (lockless: rmap read locks and
    /// atomic SPTE updates only). True if any was young.
    pub fn age_gfn(&self, slot: SlotId, start: u64, end: u64) -> bool {
        self.age_range(slot, start, end, true)
    }

    /// `kvm_test_age_gfn`.
    pub fn test_age_gfn(&self, slot: SlotId, start: u64, end: u64) -> bool {
        self.age_range(slot, start, end, false)
    }

    /// `kvm_mmu_slot_remove_write_access` (dirty logging on): clear W (not
    /// MMU-writable) in every SPTE of the slot, all levels.
    pub fn slot_remove_write_access(&mut self, slot: SlotId) -> Result<bool, ShadowError> {
        let Some(s) = self.slots.iter().find(|s| s.slot.id() == slot) else {
            return Ok(false);
        };
        let mut flush = false;
        for level in 0..3 {
            for head in s.rmap[level].iter() {
                if head.load().bits() == 0 {
                    continue;
                }
                let g = head.lock_readonly();
                for h in g.iter(&self.pool) {
                    let (id, i) = decode_handle(h);
                    if let Some(sp) = self.sp(id) {
                        let x = sp.spte(i);
                        if x.is_writable() {
                            sp.set_spte(i, Spte(x.0 & !Spte::WRITABLE));
                            flush = true;
                        }
                    }
                }
            }
        }
        if flush {
            self.stats.tlb_flushes += 1;
        }
        Ok(flush)
    }

    /// `KVM_GET_DIRTY_LOG` (no manual protect): harvest the slot's bitmap words and
    /// write-protect (W only) the 4K SPTEs of each harvested gfn
    /// (`kvm_mmu_write_protect_pt_masked`). KVM bitmap layout.
    pub fn get_dirty_log(&mut self, slot: SlotId) -> Result<Vec<u64>, ShadowError> {
        let Some(s) = self.slots.iter().find(|s| s.slot.id() == slot) else {
            return Err(ShadowError::NoSlot(u64::from(slot.0)));
        };
        let memslot = s.slot.clone();
        let words = memslot.npages().div_ceil(64) as usize;
        let mut out = Vec::new();
        out.try_reserve_exact(words).map_err(oom)?;
        for w in 0..words {
            let bits = memslot.take_dirty_word(w);
            out.push(bits);
            self.write_protect_mask(&memslot, w, bits)?;
        }
        Ok(out)
    }

    /// `KVM_CLEAR_DIRTY_LOG`: clear `bits` from frame `first_page` (64-aligned), and
    /// write-protect the cleared gfns.
    pub fn clear_dirty_log(
        &mut self,
        slot: SlotId,
        first_page: u64,
        bits: &[u64],
    ) -> Result<(), ShadowError> {
        let Some(s) = self.slots.iter().find(|s| s.slot.id() == slot) else {
            return Err(ShadowError::NoSlot(u64::from(slot.0)));
        };
        let memslot = s.slot.clone();
        for (k, &mask) in bits.iter().enumerate() {
            let w = (first_page / 64) as usize + k;
            let cleared = memslot.clear_dirty_bits(w, mask);
            self.write_protect_mask(&memslot, w, cleared)?;
        }
        Ok(())
    }

    fn write_protect_mask(
        &mut self,
        slot: &Memslot,
        w: usize,
        mut bits: u64,
    ) -> Result<(), ShadowError> {
        while bits != 0 {
            let b = bits.trailing_zeros() as u64;
            bits &= bits - 1;
            let gfn = slot.base_gfn().0 + (w as u64) * 64 + b;
            self.for_each_rmap_spte(gfn, 1, |h, sp| {
                let (_, i) = decode_handle(h);
                if let Some(sp) = sp {
                    let x = sp.spte(i);
                    if x.is_writable() {
                        sp.set_spte(i, Spte(x.0 & !Spte::WRITABLE));
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// The role of a shadow root for `mode`: KVM's shadow `root_role`, except that
/// `efer_nx` is the guest's EFER.NXE instead of forced to 1. KVM forces it because the
/// host runs with NX on; here it also keys the pages, so that two vCPUs that read gpte
/// bit 63 differently (XD vs reserved) never share a shadow page.
pub fn root_role(mode: &CpuMode) -> SpRole {
    SpRole::root(&mode.role(), 0).with_efer_nx(u32::from(mode.nxe()))
}

/// The protection key stored in a leaf SPTE (bits 59..62, mirrored from the gpte).
fn pkey_of(s: Spte) -> u8 {
    ((s.0 >> crate::paging::PT64_PKEY_SHIFT) & 15) as u8
}

/// A broken invariant (reference section 8), with the rule's number.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("invariant {rule}: {detail}")]
pub struct Violation {
    /// The invariant's number in the reference's list.
    pub rule: u8,
    /// What was found.
    pub detail: String,
}

fn violation(rule: u8, detail: String) -> Violation {
    Violation { rule, detail }
}

impl ShadowMmu {
    /// The ids on `active_mmu_pages` (checker only), after checking its links: each
    /// page once, `prev` mirroring `next`, the tail at the end.
    fn active_list(&self) -> Result<std::collections::HashSet<u32>, String> {
        let mut seen = std::collections::HashSet::new();
        let (mut cur, mut prev) = (self.active_head, None);
        while let Some(id) = cur {
            let sp = self
                .sp(id)
                .ok_or(format!("active list names dead {id:?}"))?;
            if !seen.insert(id.0) || sp.prev != prev || sp.on != OnList::Active {
                return Err(format!("active list broken at {id:?}"));
            }
            prev = Some(id);
            cur = sp.next;
        }
        if self.active_tail != prev {
            return Err("active list tail is not its last page".into());
        }
        Ok(seen)
    }

    /// The hash chain of `gfn`'s bucket (checker only).
    fn hash_chain(&self, gfn: u64) -> Vec<SpId> {
        let mut v = Vec::new();
        let mut cur = self.hash_first(gfn);
        while let Some(id) = cur {
            if v.contains(&id) || v.len() > self.sps.len() {
                break; // a cycle: the caller reports the page missing
            }
            v.push(id);
            cur = self.sp(id).and_then(|s| s.hash_next);
        }
        v
    }

    /// Checks the invariants of the reference's section 8 that hold whenever
    /// `mmu_lock` is not held (1-5, 8, 10-13, 15, 17, 18, 22's host side, and the
    /// pte_list shape). Returns the number of leaf SPTEs checked.
    pub fn check(&self) -> Result<u64, Violation> {
        use std::collections::{HashMap, HashSet};
        // Every rmap entry, with where it is filed.
        let mut filed: HashMap<u64, (u64, u32)> = HashMap::new();
        for s in &self.slots {
            for level in 1..=3u32 {
                for (k, head) in s.rmap[(level - 1) as usize].iter().enumerate() {
                    if head.load().bits() == 0 {
                        continue;
                    }
                    revmap_rmap::pte_list::check_rmap_head(head, &self.pool).map_err(|e| {
                        violation(1, format!("rmap shape at level {level} index {k}: {e}"))
                    })?;
                    let g = head.lock_readonly();
                    for h in g.iter(&self.pool) {
                        let base = s.slot.base_gfn().0 >> level_shift(level);
                        let gfn = (base + k as u64) << level_shift(level);
                        if filed.insert(h.raw(), (gfn, level)).is_some() {
                            return Err(violation(1, format!("{h:?} on two rmaps")));
                        }
                    }
                }
            }
        }
        let mut leaves = 0u64;
        let mut used = 0u64;
        let mut indirect = 0u64;
        let mut keys = HashSet::new();
        let mut parents_expected: HashMap<u32, HashSet<u64>> = HashMap::new();
        let mut root_refs: HashMap<u32, u32> = HashMap::new();
        for v in &self.vcpus {
            for r in v
                .root
                .iter()
                .chain(v.prev_roots.iter().map(|(_, r)| r))
                .chain(v.pae_root.iter().flatten())
            {
                *root_refs.entry(r.0).or_default() += 1;
            }
        }
        let mut writable_gfns = HashSet::new();
        let active = self.active_list().map_err(|e| violation(5, e))?;
        for id in self.live_ids() {
            let Some(sp) = self.sp(id) else { continue };
            let rc = root_refs.get(&id.0).copied().unwrap_or(0);
            if sp.root_count != rc {
                return Err(violation(
                    8,
                    format!("{id:?} root_count {} != {rc}", sp.root_count),
                ));
            }
            if sp.role.invalid() != 0 {
                if sp.root_count == 0 {
                    return Err(violation(6, format!("{id:?} invalid, unpinned, not freed")));
                }
                if sp.on == OnList::Active || active.contains(&id.0) {
                    return Err(violation(6, format!("{id:?} invalid on active list")));
                }
                for i in 0..SPTES_PER_PAGE {
                    if sp.spte(i).is_shadow_present() {
                        return Err(violation(9, format!("invalid {id:?} has SPTE {i}")));
                    }
                }
                continue;
            }
            used += 1;
            if sp.on != OnList::Active
                || !active.contains(&id.0)
                || !self.hash_chain(sp.gfn).contains(&id)
            {
                return Err(violation(5, format!("{id:?} not hashed or not active")));
            }
            if !self.is_obsolete(sp) {
                if sp.role.has_gptes() {
                    indirect += 1;
                }
                if !keys.insert((sp.gfn, sp.role)) {
                    return Err(violation(
                        5,
                        format!("two valid pages at gfn {:#x}", sp.gfn),
                    ));
                }
            }
            if sp.unsync
                && (sp.role.level() != 1 || sp.role.direct() != 0 || self.is_write_tracked(sp.gfn))
            {
                return Err(violation(
                    17,
                    format!("{id:?} unsync at level {}", sp.role.level()),
                ));
            }
            if sp.unsync || sp.unsync_children() > 0 {
                for (p, i) in self.parents(id).map_err(|e| violation(2, e.to_string()))? {
                    if self.sp(p).is_none_or(|pp| !pp.test_child_bit(i)) {
                        return Err(violation(18, format!("{p:?}[{i}] lacks the unsync bit")));
                    }
                }
            }
            let bits = sp.unsync_bits_set();
            if sp.unsync_children() < bits {
                return Err(violation(18, format!("{id:?} unsync_children stale-low")));
            }
            let level = sp.role.level();
            for i in 0..SPTES_PER_PAGE {
                let s = sp.spte(i);
                if s.is_mmio() {
                    // MMIO SPTEs: 4 KiB leaves in no rmap (the rmap pass finds any entry
                    // naming them); a current one caches a gfn without a memslot.
                    if level != 1 || (self.mmio_current(s) && self.slot_of(s.mmio_gfn()).is_some())
                    {
                        return Err(violation(
                            1,
                            format!("{id:?}[{i}] MMIO SPTE for gfn {:#x}", s.mmio_gfn()),
                        ));
                    }
                    continue;
                }
                if !s.is_shadow_present() {
                    continue;
                }
                let h = spte_handle(id, i).map_err(|e| violation(1, e.to_string()))?;
                if !sp.is_level_leaf(i) {
                    let c = SpId(s.pfn() as u32);
                    let Some(cp) = self.sp(c) else {
                        return Err(violation(2, format!("{id:?}[{i}] links dead {c:?}")));
                    };
                    if cp.role.level() + 1 != level {
                        return Err(violation(
                            2,
                            format!("{id:?}[{i}] links {c:?} at wrong level"),
                        ));
                    }
                    if filed.contains_key(&h.raw()) {
                        return Err(violation(1, format!("non-leaf {id:?}[{i}] on an rmap")));
                    }
                    parents_expected.entry(c.0).or_default().insert(h.raw());
                    self.check_child(id, sp, i, c, cp)?;
                    continue;
                }
                leaves += 1;
                let gfn = Self::sp_get_gfn(sp, i);
                match filed.remove(&h.raw()) {
                    Some((g, l)) if l == level && g == gfn => {}
                    other => {
                        return Err(violation(
                            1,
                            format!("{id:?}[{i}] gfn {gfn:#x} L{level} filed at {other:?}"),
                        ))
                    }
                }
                if !s.is_legal() {
                    return Err(violation(15, format!("{id:?}[{i}] illegal {s:?}")));
                }
                let acc = Self::sp_get_access(sp, i);
                // CR0.WP=0: a supervisor write may install W (with U cleared).
                let granted = if sp.role.cr0_wp() == 0 {
                    s.acc() - Acc::WRITE
                } else {
                    s.acc()
                };
                if !acc.contains(s.acc()) || !sp.role.acc().contains(granted) {
                    return Err(violation(
                        13,
                        format!("{id:?}[{i}] grants {:?} > {acc:?}", s.acc()),
                    ));
                }
                if s.is_writable() && s.0 & Spte::DIRTY == 0 {
                    return Err(violation(13, format!("{id:?}[{i}] writable, not dirty")));
                }
                if s.is_writable() {
                    writable_gfns.insert(gfn);
                    // Dirty logging: a writable SPTE exists only for a gfn marked dirty
                    // since the last harvest (which write-protects what it reaps).
                    if let Some(slot) = self.slot_of(gfn) {
                        if slot.dirty_logging() && !slot.slot.is_dirty(Gfn(gfn)) {
                            return Err(violation(
                                15,
                                format!("{id:?}[{i}] writable, gfn {gfn:#x} not dirty-logged"),
                            ));
                        }
                    }
                }
                if let Some(slot) = self.slot_of(gfn) {
                    if slot.slot.host_pfn(Gfn(gfn)) != Some(s.pfn()) {
                        return Err(violation(
                            22,
                            format!("{id:?}[{i}] pfn disagrees with host"),
                        ));
                    }
                }
                if let (Some(mode), true, true) =
                    (self.sync_mode(id), sp.role.has_gptes(), !sp.unsync)
                {
                    let gpte = self.read_sp_gpte(sp.role, sp.gfn, i).unwrap_or(0);
                    // Invariant 16 too: only accessed gptes are mapped (also by prefetch).
                    let ok = gpte & 1 != 0
                        && gpte & crate::paging::PT_ACCESSED != 0
                        && leaf_gpte_gfn(&mode, level, gpte, i) == gfn
                        && (sp.role.cr0_wp() == 0 || gpte_access(&mode, gpte).contains(s.acc()));
                    if !ok {
                        return Err(violation(
                            13,
                            format!("{id:?}[{i}] stale: gpte {gpte:#x}, spte {s:?} gfn {gfn:#x}"),
                        ));
                    }
                }
            }
        }
        if let Some((h, at)) = filed.iter().next() {
            return Err(violation(
                1,
                format!("rmap entry {h:#x} at {at:?} names no leaf"),
            ));
        }
        if used != self.n_used || indirect != self.indirect_shadow_pages {
            return Err(violation(
                8,
                format!(
                    "n_used {} (real {used}), indirect {} (real {indirect})",
                    self.n_used, self.indirect_shadow_pages
                ),
            ));
        }
        for id in self.live_ids() {
            let Some(sp) = self.sp(id) else { continue };
            let got: HashSet<u64> = self
                .parents(id)
                .map_err(|e| violation(2, e.to_string()))?
                .into_iter()
                .filter_map(|(p, i)| spte_handle(p, i).ok().map(|h| h.raw()))
                .collect();
            let want = parents_expected.remove(&id.0).unwrap_or_default();
            if got != want {
                return Err(violation(
                    2,
                    format!("{id:?} parent_ptes {got:x?} != {want:x?}"),
                ));
            }
            if sp.role.invalid() != 0 || self.is_obsolete(sp) || !sp.role.has_gptes() {
                continue;
            }
            let g = sp.gfn;
            if sp.role.level() > 1 {
                let n = self
                    .gfn_sps(g)
                    .iter()
                    .filter(|&&x| self.sp(x).is_some_and(|p| p.role.level() > 1))
                    .count();
                let tracked = self
                    .slot_of(g)
                    .and_then(|s| s.write_track.get(s.idx(g, 1)).copied())
                    .unwrap_or(0);
                if usize::from(tracked) < n {
                    return Err(violation(10, format!("gfn {g:#x} tracked {tracked} < {n}")));
                }
            }
            if writable_gfns.contains(&g) && !sp.unsync {
                return Err(violation(
                    11,
                    format!("gfn {g:#x} mapped writable, {id:?} sync"),
                ));
            }
            if !sp.unsync {
                for level in 1..=3 {
                    for h in self
                        .rmap_entries(g, level)
                        .map_err(|e| violation(10, e.to_string()))?
                    {
                        let (x, xi) = decode_handle(h);
                        if self.spte(x, xi).is_some_and(|s| s.is_mmu_writable()) {
                            return Err(violation(10, format!("shadowed gfn {g:#x} MMU-writable")));
                        }
                    }
                }
            }
            for (k, l) in [2u32, 3].into_iter().enumerate() {
                let Some(slot) = self.slot_of(g) else {
                    continue;
                };
                let c = slot.disallow_lpage[k]
                    .get(slot.idx(g, l))
                    .copied()
                    .unwrap_or(0);
                if c == 0 {
                    return Err(violation(
                        12,
                        format!("gfn {g:#x} shadowed, L{l} lpage allowed"),
                    ));
                }
            }
        }
        Ok(leaves)
    }

    /// Invariant 3 and 14 for the link (`parent`, `i`) -> `child`: the child's role is
    /// the child role of the parent with the child's own direct/access; for a synced
    /// indirect parent, its gfn and access are those the gpte gives.
    fn check_child(
        &self,
        parent: SpId,
        p: &ShadowPage,
        i: usize,
        child: SpId,
        c: &ShadowPage,
    ) -> Result<(), Violation> {
        let want = p.role.child(i, c.role.direct() != 0, c.role.acc());
        if c.role.with_invalid(0) != want {
            return Err(violation(
                3,
                format!("{parent:?}[{i}] -> {child:?} role {:?}", c.role),
            ));
        }
        if c.role.direct() != 0 {
            let span = 1u64 << level_shift(p.role.level());
            let gfn = Self::sp_get_gfn(p, i);
            if c.gfn != gfn || c.gfn % span != 0 {
                return Err(violation(
                    3,
                    format!("{parent:?}[{i}] direct child gfn {:#x}", c.gfn),
                ));
            }
            return Ok(());
        }
        if let (Some(mode), true) = (self.sync_mode(parent), p.role.has_gptes()) {
            let gpte = self.read_sp_gpte(p.role, p.gfn, i).unwrap_or(0);
            let gfn = (gpte & PT64_ADDR_MASK) >> 12;
            let acc = p.role.acc() & gpte_access(&mode, gpte);
            if gpte & 1 == 0 || gfn != c.gfn || acc != c.role.acc() {
                return Err(violation(
                    3,
                    format!(
                        "{parent:?}[{i}] -> {child:?}: gpte {gpte:#x} vs gfn {:#x}",
                        c.gfn
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::{PT_ACCESSED, PT_DIRTY, PT_PAGE_SIZE, PT_PRESENT, PT_USER, PT_WRITABLE};
    use revmap_rmap::Hva;

    const P: u64 = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED;
    const LEAF: u64 = P | PT_DIRTY;

    /// A 16 MiB slot with 4K backing (or 2M), PML4 at gfn 1, PDPT 2, PD 3, PT 4;
    /// va 0x400000 -> gfn 0x100 (4K), va 0x600000 -> gfn 0x200 (2M page).
    fn setup(backing: u32) -> (ShadowMmu, usize) {
        let mut m = ShadowMmu::new();
        let slot = Memslot::new(
            SlotId(0),
            Gfn(0),
            4096,
            backing,
            MemslotFlags::empty(),
            Hva(0x7f00_0000_0000),
        )
        .unwrap();
        m.add_memslot(slot).unwrap();
        m.mem.write_u64(Gpa(0x1000), 0x2000 | P).unwrap();
        m.mem.write_u64(Gpa(0x2000), 0x3000 | P).unwrap();
        m.mem.write_u64(Gpa(0x3000 + 2 * 8), 0x4000 | P).unwrap();
        m.mem
            .write_u64(Gpa(0x3000 + 3 * 8), 0x20_0000 | LEAF | PT_PAGE_SIZE)
            .unwrap();
        m.mem.write_u64(Gpa(0x4000), 0x10_0000 | LEAF).unwrap();
        let v = m.add_vcpu(CpuMode::long4(0x1000));
        (m, v)
    }

    fn ok(m: &ShadowMmu) {
        if let Err(e) = m.check() {
            panic!("{e}");
        }
    }

    #[test]
    fn fault_then_hit_and_write_protection() {
        let (mut m, v) = setup(12);
        let r = m.access(v, 0x40_0123, Access::empty()).unwrap();
        assert_eq!(r, AccessOutcome::Fixed(Gpa(0x10_0123)));
        assert_eq!(
            m.access(v, 0x40_0123, Access::WRITE).unwrap(),
            AccessOutcome::Hit(Gpa(0x10_0123))
        );
        ok(&m);
        assert_eq!(m.rmap_entries(0x100, 1).unwrap().len(), 1);
        for g in [1, 2, 3] {
            assert!(m.is_write_tracked(g), "upper-level table {g} tracked");
        }
        assert!(m.is_shadowed(4) && !m.is_write_tracked(4));
        assert_eq!(m.used_mmu_pages(), 4);
        // A 2M guest page over 4K host backing: a direct level-1 page.
        let r = m.access(v, 0x60_5008, Access::empty()).unwrap();
        assert_eq!(r, AccessOutcome::Fixed(Gpa(0x20_5008)));
        assert_eq!(m.used_mmu_pages(), 5);
        assert_eq!(m.stats.huge_sptes, 0);
        ok(&m);
        // Not present -> #PF, no SPTE.
        let r = m.access(v, 0x80_0000, Access::empty()).unwrap();
        assert!(matches!(r, AccessOutcome::Fault(pf) if pf.error_code.is_empty()));
        ok(&m);
    }

    #[test]
    fn huge_spte_when_host_backing_allows_and_not_over_a_shadowed_gfn() {
        let (mut m, v) = setup(21);
        let r = m.access(v, 0x60_5008, Access::empty()).unwrap();
        assert_eq!(r, AccessOutcome::Fixed(Gpa(0x20_5008)));
        assert_eq!(m.stats.huge_sptes, 1);
        assert_eq!(m.rmap_entries(0x200, 2).unwrap().len(), 1);
        ok(&m);
        // The 4K page at 0x100 is in the 2M frame holding the tables: 4K mapping.
        m.access(v, 0x40_0000, Access::empty()).unwrap();
        assert_eq!(m.stats.huge_sptes, 1);
        ok(&m);
    }

    #[test]
    fn store_to_a_leaf_table_unsyncs_and_invlpg_resyncs() {
        let (mut m, v) = setup(12);
        m.access(v, 0x40_0000, Access::empty()).unwrap();
        // The guest repoints the PTE: the PT (gfn 4) is only a level-1 table: unsync.
        assert!(!m.guest_store(0x4000, 0x10_1000 | LEAF).unwrap());
        ok(&m);
        let pt = m.gfn_sps(4)[0];
        assert!(m.sp(pt).unwrap().unsync);
        // Stale until INVLPG (the guest must flush).
        assert_eq!(
            m.translate(v, 0x40_0000, Access::empty()).unwrap(),
            Some(Gpa(0x10_0000))
        );
        m.invlpg(v, 0x40_0000).unwrap();
        ok(&m);
        assert_eq!(
            m.access(v, 0x40_0000, Access::empty()).unwrap(),
            AccessOutcome::Fixed(Gpa(0x10_1000))
        );
        // A CR3 reload syncs and write-protects again.
        let mode = m.vcpus()[v].mode;
        let mut other = mode;
        other.cr3 = 0x5000;
        m.mem.write_u64(Gpa(0x5000), 0x2000 | P).unwrap();
        m.set_mode(v, other).unwrap();
        m.set_mode(v, mode).unwrap();
        assert!(!m.sp(pt).unwrap().unsync);
        assert_eq!(m.stats.prev_root_hits, 1);
        ok(&m);
    }

    #[test]
    fn emulated_write_to_upper_table_zaps_and_floods() {
        let (mut m, v) = setup(12);
        m.access(v, 0x40_0000, Access::empty()).unwrap();
        let pd = m.gfn_sps(3)[0];
        // Repoint the PDE at another PT (gfn 6): emulated; the SPTE is zapped.
        m.mem.write_u64(Gpa(0x6000), 0x10_2000 | LEAF).unwrap();
        assert!(m.guest_store(0x3000 + 16, 0x6000 | P).unwrap());
        assert!(!m.spte(pd, 2).unwrap().is_shadow_present());
        ok(&m);
        assert_eq!(
            m.access(v, 0x40_0000, Access::empty()).unwrap(),
            AccessOutcome::Fixed(Gpa(0x10_2000))
        );
        ok(&m);
        // Flooding: writes to the PD without using it zap it at the third.
        for k in 0..3 {
            m.guest_store(0x3000 + 8 * (100 + k), 0).unwrap();
        }
        assert_eq!(m.stats.flooded, 1);
        assert!(m.gfn_sps(3).is_empty());
        ok(&m);
        // Misaligned write zaps too.
        m.access(v, 0x40_0000, Access::empty()).unwrap();
        m.track_write(0x3003, 2).unwrap();
        assert_eq!(m.stats.misaligned, 1);
        ok(&m);
    }

    #[test]
    fn child_reused_only_on_equal_gfn_and_role() {
        let (mut m, v) = setup(12);
        // A second PDE to the same PT, read-only: same gfn, other access -> other page.
        m.mem
            .write_u64(Gpa(0x3000 + 5 * 8), 0x4000 | (P & !PT_WRITABLE))
            .unwrap();
        m.access(v, 0x40_0000, Access::empty()).unwrap();
        m.access(v, 0xa0_0000, Access::empty()).unwrap();
        assert_eq!(m.gfn_sps(4).len(), 2);
        ok(&m);
        // A write through the read-only path faults (CVE-2021-38198's test).
        let r = m.access(v, 0xa0_0000, Access::WRITE).unwrap();
        assert!(matches!(r, AccessOutcome::Fault(_)));
        ok(&m);
    }

    #[test]
    fn zap_all_fast_eviction_and_host_side() {
        let (mut m, v) = setup(12);
        m.access(v, 0x40_0000, Access::WRITE).unwrap();
        m.access(v, 0x60_0000, Access::empty()).unwrap();
        assert!(m.test_age_gfn(SlotId(0), 0x100, 0x101));
        assert!(m.age_gfn(SlotId(0), 0x100, 0x101));
        assert!(!m.test_age_gfn(SlotId(0), 0x100, 0x101));
        assert_eq!(m.unmap_gfn_range(SlotId(0), 0x100, 0x101).unwrap(), 1);
        assert_eq!(m.translate(v, 0x40_0000, Access::empty()).unwrap(), None);
        ok(&m);
        m.zap_all_fast().unwrap();
        ok(&m);
        assert_eq!(m.used_mmu_pages(), 0);
        // The pinned obsolete root is replaced on the next access.
        m.access(v, 0x40_0000, Access::empty()).unwrap();
        ok(&m);
        m.zap_all().unwrap();
        ok(&m);
        // Eviction: a tiny limit still serves faults.
        m.set_max_mmu_pages(Some(6));
        for k in 0..8u64 {
            m.mem
                .write_u64(Gpa(0x3000 + (10 + k) * 8), (0x10 + k) << 12 | P)
                .unwrap();
            m.mem
                .write_u64(Gpa((0x10 + k) << 12), 0x10_0000 | LEAF)
                .unwrap();
            m.access(v, (10 + k) << 21, Access::empty()).unwrap();
            ok(&m);
        }
        assert!(m.stats.evicted > 0, "{:?}", m.stats);
        assert!(m.used_mmu_pages() <= 6 + MIN_FREE_MMU_PAGES);
    }

    #[test]
    fn zapped_root_stays_pinned_until_reload() {
        let (mut m, v) = setup(12);
        m.access(v, 0x40_0000, Access::empty()).unwrap();
        let root = m.vcpus()[v].root.unwrap();
        // Flooding the PML4 (the root's gfn) zaps the root in use: it stays pinned,
        // invalid, empty, off the active list.
        for k in 0..3 {
            m.guest_store(0x1000 + 8 * (200 + k), 0).unwrap();
        }
        let sp = m.sp(root).unwrap();
        assert!(sp.role.invalid() != 0 && sp.root_count == 1);
        ok(&m);
        // The next access reloads: the old root is freed, nothing is built under it.
        assert_eq!(
            m.access(v, 0x40_0000, Access::empty()).unwrap(),
            AccessOutcome::Fixed(Gpa(0x10_0000))
        );
        // (The arena may hand the freed id out again: compare states, not ids.)
        let now = m.vcpus()[v].root.unwrap();
        let sp = m.sp(now).unwrap();
        assert!(sp.role.invalid() == 0 && sp.root_count == 1 && sp.gfn == 1);
        assert_eq!(m.live_ids().count() as u64, m.used_mmu_pages());
        ok(&m);
    }

    #[test]
    fn faults_back_off_during_an_invalidation() {
        let (mut m, v) = setup(12);
        m.invalidate.begin();
        assert_eq!(
            m.access(v, 0x40_0000, Access::empty()).unwrap(),
            AccessOutcome::Retry
        );
        assert_eq!(m.rmap_entries(0x100, 1).unwrap().len(), 0);
        ok(&m);
        m.invalidate.end();
        assert_eq!(
            m.access(v, 0x40_0000, Access::empty()).unwrap(),
            AccessOutcome::Fixed(Gpa(0x10_0000))
        );
        ok(&m);
    }

    #[test]
    fn prefetch_maps_accessed_neighbours_with_a_clear_and_stops_at_an_invalid_gpte() {
        let (mut m, v) = setup(12);
        // PT (gfn 4) entries 1..=4: dirty, clean, not accessed, dirty.
        let pte = |i: u64| Gpa(0x4000 + 8 * i);
        m.mem.write_u64(pte(1), 0x10_1000 | LEAF).unwrap();
        m.mem.write_u64(pte(2), 0x10_2000 | P).unwrap();
        m.mem
            .write_u64(pte(3), 0x10_3000 | (LEAF & !PT_ACCESSED))
            .unwrap();
        m.mem.write_u64(pte(4), 0x10_4000 | LEAF).unwrap();
        assert_eq!(
            m.access(v, 0x40_0000, Access::empty()).unwrap(),
            AccessOutcome::Fixed(Gpa(0x10_0000))
        );
        ok(&m);
        assert_eq!(m.stats.prefetched, 2);
        let faults = m.stats.page_faults;
        for (g, writable) in [(0x101, true), (0x102, false)] {
            let h = m.rmap_entries(g, 1).unwrap();
            assert_eq!(h.len(), 1, "gfn {g:#x} prefetched");
            let (id, i) = decode_handle(h[0]);
            let s = m.spte(id, i).unwrap();
            assert_eq!(
                s.0 & Spte::ACCESSED,
                0,
                "prefetched SPTEs start with A clear"
            );
            assert_eq!(s.is_writable(), writable, "W only for a dirty gpte");
        }
        assert!(m.rmap_entries(0x103, 1).unwrap().is_empty());
        assert!(
            m.rmap_entries(0x104, 1).unwrap().is_empty(),
            "the loop stopped"
        );
        // The prefetched translations serve accesses without a fault; a write to the
        // clean one faults (and the walk sets its D).
        for (va, acc) in [(0x40_1000, Access::WRITE), (0x40_2000, Access::empty())] {
            assert!(matches!(
                m.access(v, va, acc).unwrap(),
                AccessOutcome::Hit(_)
            ));
        }
        assert_eq!(m.stats.page_faults, faults);
        assert_eq!(
            m.access(v, 0x40_2000, Access::WRITE).unwrap(),
            AccessOutcome::Fixed(Gpa(0x10_2000))
        );
        assert_ne!(m.mem.read_u64(pte(2)).unwrap() & PT_DIRTY, 0);
        ok(&m);
        // A neighbour that is a shadowed guest table (gfn 4 itself) is prefetched
        // read-only even from a dirty writable gpte: prefetch never unsyncs.
        m.mem.write_u64(pte(9), 0x4000 | LEAF).unwrap();
        m.mem.write_u64(pte(8), 0x10_8000 | LEAF).unwrap();
        m.invlpg(v, 0x40_8000).unwrap();
        assert!(matches!(
            m.access(v, 0x40_8000, Access::empty()).unwrap(),
            AccessOutcome::Fixed(_)
        ));
        let h = m.rmap_entries(4, 1).unwrap();
        assert_eq!(h.len(), 1);
        let (id, i) = decode_handle(h[0]);
        assert!(!m.spte(id, i).unwrap().is_writable());
        ok(&m);
    }

    #[test]
    fn mmio_spte_cached_until_the_memslots_change() {
        let (mut m, v) = setup(12);
        // PT entry 7 -> gpa 32 MiB, outside the 16 MiB slot: MMIO.
        m.mem
            .write_u64(Gpa(0x4000 + 8 * 7), 0x200_0000 | LEAF)
            .unwrap();
        let va = 0x40_7008;
        assert_eq!(
            m.access(v, va, Access::WRITE).unwrap(),
            AccessOutcome::Mmio(Gpa(0x200_0008))
        );
        assert_eq!(m.stats.mmio_sptes, 1);
        ok(&m);
        // Served from the MMIO SPTE: no guest walk.
        let faults = m.stats.page_faults;
        assert_eq!(
            m.access(v, va, Access::empty()).unwrap(),
            AccessOutcome::Mmio(Gpa(0x200_0008))
        );
        assert_eq!((m.stats.mmio_hits, m.stats.page_faults), (1, faults));
        // The guest drops U (a store to its unsync PT, then INVLPG, which drops the MMIO
        // SPTE): a user access faults in the walk.
        m.guest_store(0x4000 + 8 * 7, 0x200_0000 | (LEAF & !PT_USER))
            .unwrap();
        m.invlpg(v, va).unwrap();
        assert!(matches!(
            m.access(v, va, Access::USER).unwrap(),
            AccessOutcome::Fault(_)
        ));
        m.guest_store(0x4000 + 8 * 7, 0x200_0000 | LEAF).unwrap();
        m.invlpg(v, va).unwrap();
        assert!(matches!(
            m.access(v, va, Access::empty()).unwrap(),
            AccessOutcome::Mmio(_)
        ));
        ok(&m);
        // New memory there: the generation moves on, the MMIO SPTE is stale and the
        // next access maps the page.
        let gen = m.memslots_generation();
        let slot = Memslot::new(
            SlotId(1),
            Gfn(0x2000),
            16,
            12,
            MemslotFlags::empty(),
            Hva(0x7f10_0000_0000),
        )
        .unwrap();
        m.add_memslot(slot).unwrap();
        assert_eq!(m.memslots_generation(), gen + 1);
        ok(&m);
        assert_eq!(
            m.access(v, va, Access::empty()).unwrap(),
            AccessOutcome::Fixed(Gpa(0x200_0008))
        );
        assert_eq!(m.stats.mmio_hits, 1);
        ok(&m);
    }

    #[test]
    fn rmap_recycled_over_the_threshold() {
        let (mut m, v) = setup(12);
        // Three page tables whose 512 entries all map gfn 0x100: 1536 SPTEs of one gfn,
        // one per fault (the gptes start with A clear, so prefetch maps none of them
        // ahead of their own access).
        for (k, pt) in [0x10u64, 0x11, 0x12].into_iter().enumerate() {
            m.mem
                .write_u64(Gpa(0x3000 + 8 * (8 + k as u64)), pt << 12 | P)
                .unwrap();
            for i in 0..512 {
                m.mem
                    .write_u64(Gpa((pt << 12) + 8 * i), 0x10_0000 | (LEAF & !PT_ACCESSED))
                    .unwrap();
            }
        }
        for k in 0..3u64 {
            for i in 0..512u64 {
                let gva = ((8 + k) << 21) | (i << 12);
                assert_eq!(
                    m.access(v, gva, Access::empty()).unwrap(),
                    AccessOutcome::Fixed(Gpa(0x10_0000))
                );
            }
        }
        assert_eq!(m.stats.rmap_recycled, 1);
        let n = m.rmap_entries(0x100, 1).unwrap().len();
        // The 1001st add (entry 488 of the second table) zaps all 1001 entries, the new
        // one included; the fault on entry 489 then prefetches entry 488 back (its gpte
        // is accessed now, and it is in 489's group of 8), and stops at entry 490.
        assert_eq!(m.stats.prefetched, 1);
        assert_eq!(n, 1536 - 1001 + 1);
        ok(&m);
    }

    #[test]
    fn dirty_log_write_protects_and_records() {
        let (mut m, v) = setup(12);
        let slot = m
            .memslots()
            .next()
            .unwrap()
            .with_flags(MemslotFlags::LOG_DIRTY_PAGES);
        m.update_memslot(slot);
        m.slot_remove_write_access(SlotId(0)).unwrap();
        m.access(v, 0x40_0000, Access::WRITE).unwrap();
        let log = m.get_dirty_log(SlotId(0)).unwrap();
        assert_eq!(log[0x100 / 64], 1 << (0x100 % 64));
        // Harvesting write-protected it: the next write faults and dirties again.
        assert_eq!(m.translate(v, 0x40_0000, Access::WRITE).unwrap(), None);
        m.access(v, 0x40_0000, Access::WRITE).unwrap();
        assert_eq!(m.get_dirty_log(SlotId(0)).unwrap()[4], 1);
        ok(&m);
    }
}
