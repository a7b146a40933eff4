//! The x86 shadow-MMU rmap (`pte_list`): a tagged head word per (slot, gfn, level)
//! over 128-byte descriptors of 14 SPTE handles (modern KVM's `pte_list_add`,
//! `pte_list_remove` and `kvm_rmap_lock` in `arch/x86/kvm/mmu/mmu.c`).
//!
//! # Encoding of the head word ([`RmapHeadVal`], KVM's `kvm_rmap_head.val`)
//!
//! | value | meaning |
//! |-------|---------|
//! | `0` | empty |
//! | bit 0 clear, non-zero | the only entry: an [`SpteHandle`] |
//! | bit 0 set (`KVM_RMAP_MANY`) | bits 3-34: [`NodeIdx`] of the **head** descriptor |
//! | bit 1 (`KVM_RMAP_LOCKED`) | lock bit, set only while locked, never at rest |
//!
//! SPTE handles stand for KVM's `u64 *sptep` pointers: opaque non-zero ids that must be
//! 8-aligned ([`SpteHandle::ALIGN`]), so that bits 0-2 of the head word are free for
//! tags exactly as with real pointers. Other values are rejected with
//! [`PteListError::BadSpte`].
//!
//! # Descriptors ([`PteListDesc`], KVM's `struct pte_list_desc`)
//!
//! `more` (next descriptor), `spte_count`, `tail_count` and 14 entries: 128 bytes, metadata
//! first, 64-byte aligned, so lists of up to 6 entries touch one cache line. New
//! descriptors are pushed at the head; every descriptor after the head (a *tail*) is
//! full, so `tail_count = 14 × (descriptors after this one)` and the count is O(1).
//! Removal fills the hole with the head descriptor's last entry (so tails stay full) and
//! frees the head when it empties. Descriptors come from a [`Pool`]; allocation draws on
//! a [`NodeCache`] topped up before the lock is taken.
//!
//! # Invariants (checked by [`check_pte_list`] /
//! [`check_rmap_head`] / [`check_pte_lists`])
//!
//! 1. The head is 0, a valid single handle, or a descriptor index with bit 0 set;
//!    `KVM_RMAP_LOCKED` is clear at rest.
//! 2. Every tail descriptor has 14 entries; the head descriptor 1..=14; each
//!    `tail_count` is 14 × the descriptors after it; no descriptor is empty.
//! 3. `sptes[0..spte_count]` are valid handles, `sptes[spte_count..14]` are 0.
//! 4. After [`PteListGuard::rmap_add`] returns, the count is at most
//!    [`RMAP_RECYCLE_THRESHOLD`].
//!
//! # Locking (KVM's `kvm_rmap_lock` / `kvm_rmap_lock_readonly`)
//!
//! Every change of a list happens under its head's bit lock ([`PteListHead::lock`]): an
//! `Acquire` read-modify-write to lock and a `Release` store of the new head value to
//! unlock, which publishes every descriptor write made under the lock. Walkers that do
//! not modify (aging) use [`PteListHead::lock_readonly`], which elides the lock on an
//! empty head (as KVM does) and otherwise unlocks with the same `Release` store of the
//! unchanged value (a relaxed read-only unlock would let the reads move past it, as
//! KVM's review of `kvm_rmap_unlock_readonly` found).
//! Unlike KVM, writers always take the lock, even on an empty head: KVM relies on
//! `mmu_lock` held for write to exclude other writers, revmap does not assume one.
//! Descriptor fields are atomics accessed `Relaxed` under the lock.
//!
//! # Example
//!
//! ```
//! use revmap_rmap::pte_list::{check_rmap_head, DescCache, DescPool, PteListHead, SpteHandle};
//!
//! let pool = DescPool::new();
//! let head = PteListHead::new();
//! let mut cache = DescCache::new(&pool);
//! // Top up before taking the lock (KVM's mmu_topup_memory_caches); never under it.
//! cache.reserve(1)?;
//! let mut g = head.lock();
//! for raw in [0x1000, 0x1008, 0x1010] {
//!     let r = g.rmap_add(&mut cache, SpteHandle::new(raw)?, |_zap| {})?;
//!     assert!(!r.flush_remote_tlbs);
//! }
//! g.remove(&pool, SpteHandle::new(0x1008)?)?;
//! assert_eq!(g.count(&pool)?, 2);
//! drop(g); // Release-unlock publishes the descriptor writes
//! assert_eq!(check_rmap_head(&head, &pool), Ok(2));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::bitlock::BitLockGuard;
use crate::error::RmapError;
use crate::pool::{NodeCache, NodeIdx, Pool, PoolCursor, PoolError, PoolNode, NIL};
use crate::sync::{AtomicU32, AtomicU64, Ordering};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::num::NonZeroU64;

/// Entries per descriptor (`PTE_LIST_EXT`).
pub const PTE_LIST_EXT: usize = 14;
/// A gfn whose rmap grows past this many entries is zapped by [`PteListGuard::rmap_add`]
/// and a remote TLB flush requested (`RMAP_RECYCLE_THRESHOLD`).
pub const RMAP_RECYCLE_THRESHOLD: usize = 1000;
/// Tag of a head word that names a descriptor (`KVM_RMAP_MANY`).
pub const KVM_RMAP_MANY: u64 = 1 << 0;
/// Lock bit of the head word (`KVM_RMAP_LOCKED`).
pub const KVM_RMAP_LOCKED: u64 = 1 << 1;
/// Shift of the descriptor index in a head word with [`KVM_RMAP_MANY`] set.
pub const RMAP_DESC_SHIFT: u32 = 3;
/// Bits a head word may use besides the entry or index: tags below [`RMAP_DESC_SHIFT`].
const TAG_MASK: u64 = (1 << RMAP_DESC_SHIFT) - 1;
/// `spte_count` value marking a descriptor vacant (in the pool).
const DESC_VACANT: u32 = u32::MAX;

#[cfg(not(any(loom, shuttle)))]
const _: () = assert!(core::mem::size_of::<PteListDesc>() == 128);
#[cfg(not(any(loom, shuttle)))]
const _: () = assert!(core::mem::size_of::<PteListHead>() == 8);
const _: () = assert!(KVM_RMAP_MANY & KVM_RMAP_LOCKED == 0);
const _: () = assert!((KVM_RMAP_MANY | KVM_RMAP_LOCKED) & !TAG_MASK == 0);

/// An SPTE handle: the stand-in for KVM's `u64 *sptep`. Non-zero and 8-aligned.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpteHandle(NonZeroU64);

impl SpteHandle {
    /// Required alignment of a handle (that of a `u64 *`).
    pub const ALIGN: u64 = 8;

    /// A handle; rejects 0 and values that are not multiples of [`Self::ALIGN`].
    #[inline]
    pub const fn new(raw: u64) -> Result<Self, PteListError> {
        if raw % Self::ALIGN != 0 {
            return Err(PteListError::BadSpte(raw));
        }
        match NonZeroU64::new(raw) {
            Some(v) => Ok(Self(v)),
            None => Err(PteListError::BadSpte(raw)),
        }
    }

    /// The raw value.
    #[inline(always)]
    pub const fn raw(self) -> u64 {
        self.0.get()
    }
}

impl core::fmt::Debug for SpteHandle {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Spte({:#x})", self.0)
    }
}

/// Errors of pte_list operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PteListError {
    /// The value is not a valid SPTE handle (0 or not 8-aligned).
    #[error("{0:#x} is not a valid SPTE handle (must be non-zero and 8-aligned)")]
    BadSpte(u64),
    /// The entry to remove is not on the list (KVM: `KVM_BUG_ON_DATA_CORRUPTION`).
    #[error("{0:?} is not on this rmap")]
    NotFound(SpteHandle),
    /// The head word or a descriptor is malformed.
    #[error("corrupt pte_list: head word {0:#x}")]
    Corrupt(u64),
    /// A pool operation failed (e.g. [`RmapError::PoolExhausted`]: no reservation).
    #[error(transparent)]
    Pool(#[from] PoolError),
}

impl From<RmapError> for PteListError {
    fn from(e: RmapError) -> Self {
        Self::Pool(PoolError::Rmap(e))
    }
}

/// What a head word holds, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// No entry.
    Empty,
    /// Exactly one entry, stored inline.
    Single(SpteHandle),
    /// A chain of descriptors starting at this head descriptor.
    Many(NodeIdx),
}

/// A snapshot of a head word (`kvm_rmap_head.val`), with typed accessors.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct RmapHeadVal(u64);

impl RmapHeadVal {
    /// A head holding one entry.
    #[inline(always)]
    pub const fn single(spte: SpteHandle) -> Self {
        Self(spte.raw())
    }

    /// A head naming descriptor `idx`.
    #[inline(always)]
    pub const fn many(idx: NodeIdx) -> Self {
        Self(((idx.raw() as u64) << RMAP_DESC_SHIFT) | KVM_RMAP_MANY)
    }

    /// Decode, rejecting malformed values (lock bit set, bad handle, bad index).
    #[inline]
    pub fn decode(self) -> Result<HeadKind, PteListError> {
        let v = self.0;
        if v == 0 {
            return Ok(HeadKind::Empty);
        }
        if v & KVM_RMAP_MANY == 0 {
            return SpteHandle::new(v)
                .map(HeadKind::Single)
                .map_err(|_| PteListError::Corrupt(v));
        }
        if v & TAG_MASK != KVM_RMAP_MANY {
            return Err(PteListError::Corrupt(v));
        }
        u32::try_from(v >> RMAP_DESC_SHIFT)
            .ok()
            .and_then(NodeIdx::new)
            .map(HeadKind::Many)
            .ok_or(PteListError::Corrupt(v))
    }
}

crate::word::head_word_accessors!(RmapHeadVal, KVM_RMAP_LOCKED);

/// One pte_list descriptor (`struct pte_list_desc`): 128 bytes, 14 entries.
///
/// While the descriptor is in the pool, `spte_count` is `u32::MAX` (vacant) and `more`
/// is the free-list link.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct PteListDesc {
    /// Index of the next descriptor, or [`NIL`].
    more: AtomicU32,
    /// Entries used in this descriptor.
    spte_count: AtomicU32,
    /// Entries in all descriptors after this one.
    tail_count: AtomicU32,
    /// The entries: `sptes[0..spte_count]` non-zero, the rest 0.
    sptes: [AtomicU64; PTE_LIST_EXT],
}

// Every access below is made under the owning head's lock (or, for a vacant
// descriptor, by the pool): the lock's Acquire/Release orders them, so each is Relaxed.
impl PteListDesc {
    crate::word::relaxed_fields!(
        more / set_more: more -> u32,
        count / set_count: spte_count -> u32,
        tail / set_tail: tail_count -> u32,
    );
    #[inline(always)]
    fn spte(&self, i: usize) -> u64 {
        // ORDERING: Relaxed under the head lock (module docs).
        self.sptes.get(i).map_or(0, |s| s.load(Ordering::Relaxed))
    }
    #[inline(always)]
    fn set_spte(&self, i: usize, v: u64) {
        if let Some(s) = self.sptes.get(i) {
            // ORDERING: Relaxed under the head lock (module docs).
            s.store(v, Ordering::Relaxed)
        }
    }
    /// Initialise a freshly allocated descriptor holding `first`.
    fn init(&self, more: u32, tail: u32, first: &[u64]) {
        self.set_more(more);
        self.set_tail(tail);
        for i in 0..PTE_LIST_EXT {
            self.set_spte(i, first.get(i).copied().unwrap_or(0));
        }
        self.set_count(first.len() as u32);
    }
}

impl PoolNode for PteListDesc {
    fn vacant() -> Self {
        Self {
            more: AtomicU32::new(NIL),
            spte_count: AtomicU32::new(DESC_VACANT),
            tail_count: AtomicU32::new(0),
            sptes: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
    fn claim(&self) -> bool {
        // ORDERING: Relaxed: an RMW decides ownership alone; the pool's free-list CAS
        // orders the node's contents.
        self.spte_count.swap(0, Ordering::Relaxed) == DESC_VACANT
    }
    fn release(&self) -> bool {
        // ORDERING: Relaxed, as in `claim`.
        self.spte_count.swap(DESC_VACANT, Ordering::Relaxed) != DESC_VACANT
    }
    fn is_vacant(&self) -> bool {
        self.count() == DESC_VACANT
    }
    fn free_link(&self) -> u32 {
        self.more()
    }
    fn set_free_link(&self, next: u32) {
        self.set_more(next)
    }
}

/// The descriptor pool type.
pub type DescPool = Pool<PteListDesc>;
/// A reservation of descriptors (KVM's `pte_list_desc_cache` per-vCPU cache).
pub type DescCache<'p> = NodeCache<'p, PteListDesc>;

/// One rmap head (`struct kvm_rmap_head`): an `AtomicU64` with bit 1 as its lock.
#[repr(transparent)]
#[derive(Debug, Default)]
pub struct PteListHead(AtomicU64);

impl PteListHead {
    /// An empty head.
    #[inline]
    pub fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Allocate `n` empty heads (one per gfn of a memslot level), failing cleanly.
    pub fn new_array(n: usize) -> Result<Box<[PteListHead]>, RmapError> {
        crate::error::try_boxed_slice(n, |_| PteListHead::new())
    }

    /// A lock-free snapshot (for "is it empty" checks; says nothing about descriptors).
    #[inline]
    pub fn load(&self) -> RmapHeadVal {
        // ORDERING: Relaxed: only the word itself is read; anything it names is read
        // under the lock.
        RmapHeadVal(self.0.load(Ordering::Relaxed))
    }

    /// Spin until the head is locked for modification (`kvm_rmap_lock`).
    #[inline]
    pub fn lock(&self) -> PteListGuard<'_> {
        PteListGuard(BitLockGuard::lock(&self.0, KVM_RMAP_LOCKED))
    }

    /// Lock for a walk that changes nothing (`kvm_rmap_lock_readonly`). An empty head is
    /// not locked at all (lock elision); otherwise unlock stores the unchanged value
    /// with `Release`.
    #[inline]
    pub fn lock_readonly(&self) -> PteListReadGuard<'_> {
        if self.load().bits() == 0 {
            return PteListReadGuard(None);
        }
        PteListReadGuard(Some(BitLockGuard::lock(&self.0, KVM_RMAP_LOCKED)))
    }

    /// Reset to empty through exclusive access, forgetting any descriptors (they stay
    /// allocated in the pool; use [`PteListGuard::destroy`] to free them).
    pub fn reset(&mut self) {
        *self = Self::new();
    }
}

/// Count of the list headed by `val` (O(1)).
fn count_of(val: RmapHeadVal, pool: &DescPool) -> Result<usize, PteListError> {
    Ok(match val.decode()? {
        HeadKind::Empty => 0,
        HeadKind::Single(_) => 1,
        HeadKind::Many(h) => {
            let d = pool.get(h)?;
            d.count() as usize + d.tail() as usize
        }
    })
}

/// The read accessors both guards share, over the head value `self.val()`.
macro_rules! guard_reads {
    () => {
        /// Number of entries (`pte_list_count`), O(1).
        #[inline]
        pub fn count(&self, pool: &DescPool) -> Result<usize, PteListError> {
            count_of(self.val(), pool)
        }

        /// Iterate over the entries: head descriptor first, then the tails.
        #[inline]
        pub fn iter<'p>(&self, pool: &'p DescPool) -> PteListIter<'p> {
            PteListIter::new(self.val(), pool)
        }
    };
}

/// A held (modifying) head lock. Edits update a cached head value published by the
/// `Release` store that unlocks on drop.
#[must_use = "dropping the guard unlocks immediately"]
#[derive(Debug)]
pub struct PteListGuard<'a>(BitLockGuard<'a>);

/// Result of [`PteListGuard::rmap_add`].
#[must_use = "a recycled rmap requires a remote TLB flush for the gfn"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RmapAdd {
    /// Entries before the add (what `pte_list_add` returns).
    pub count_before: usize,
    /// The list passed [`RMAP_RECYCLE_THRESHOLD`] and was zapped: every SPTE was passed
    /// to the zap callback and the caller must flush remote TLBs for the gfn
    /// (`kvm_flush_remote_tlbs_gfn`).
    pub flush_remote_tlbs: bool,
}

impl PteListGuard<'_> {
    /// The head value as it will be stored at unlock.
    #[inline(always)]
    pub fn val(&self) -> RmapHeadVal {
        RmapHeadVal(self.0.value())
    }

    #[inline(always)]
    fn set_val(&mut self, v: RmapHeadVal) {
        self.0.set(v.0);
    }

    guard_reads!();

    /// Add `spte` (`pte_list_add`); returns the count before the add. O(1).
    ///
    /// Allocates at most one descriptor, from `cache` (reserved before locking); if the
    /// cache has no credit, fails with [`RmapError::PoolExhausted`] and changes nothing.
    /// Duplicates are not detected (as in KVM, adding an SPTE twice is a caller bug).
    #[doc(alias = "pte_list_add")]
    pub fn add(
        &mut self,
        cache: &mut DescCache<'_>,
        spte: SpteHandle,
    ) -> Result<usize, PteListError> {
        let pool = cache.pool();
        match self.val().decode()? {
            HeadKind::Empty => {
                self.set_val(RmapHeadVal::single(spte));
                Ok(0)
            }
            HeadKind::Single(old) => {
                let idx = cache.alloc()?;
                pool.get(idx)?.init(NIL, 0, &[old.raw(), spte.raw()]);
                self.set_val(RmapHeadVal::many(idx));
                Ok(1)
            }
            HeadKind::Many(h) => {
                let d = pool.get(h)?;
                let (n, tail) = (d.count(), d.tail());
                if n as usize >= PTE_LIST_EXT {
                    let idx = cache.alloc()?;
                    pool.get(idx)?.init(h.raw(), tail + n, &[spte.raw()]);
                    self.set_val(RmapHeadVal::many(idx));
                } else {
                    d.set_spte(n as usize, spte.raw());
                    d.set_count(n + 1);
                }
                Ok((n + tail) as usize)
            }
        }
    }

    /// Remove `spte` (`pte_list_remove`): linear search, then the hole is filled with
    /// the head descriptor's last entry; an emptied head descriptor is freed. Fails with
    /// [`PteListError::NotFound`] (nothing changes) if `spte` is not on the list.
    #[doc(alias = "pte_list_remove")]
    pub fn remove(&mut self, pool: &DescPool, spte: SpteHandle) -> Result<(), PteListError> {
        match self.val().decode()? {
            HeadKind::Empty => Err(PteListError::NotFound(spte)),
            HeadKind::Single(s) if s == spte => {
                self.set_val(RmapHeadVal::EMPTY);
                Ok(())
            }
            HeadKind::Single(_) => Err(PteListError::NotFound(spte)),
            HeadKind::Many(h) => {
                let head = pool.get(h)?;
                let mut ndesc = head.tail() as usize / PTE_LIST_EXT + 1;
                let mut cur = Some(h);
                while let (Some(idx), true) = (cur, ndesc > 0) {
                    let d = pool.get(idx)?;
                    let used = d.sptes.get(..d.count() as usize).unwrap_or(&d.sptes);
                    // ORDERING: Relaxed under the head lock (module docs).
                    let hit = used
                        .iter()
                        .position(|s| s.load(Ordering::Relaxed) == spte.raw());
                    if let Some(i) = hit {
                        return self.desc_remove_entry(pool, h, d, i);
                    }
                    cur = NodeIdx::new(d.more());
                    ndesc -= 1;
                }
                Err(PteListError::NotFound(spte))
            }
        }
    }

    /// `pte_list_desc_remove_entry`: fill slot `i` of `d` with the head descriptor's
    /// last entry, clear that slot, free the head descriptor if it is now empty.
    fn desc_remove_entry(
        &mut self,
        pool: &DescPool,
        h: NodeIdx,
        d: &PteListDesc,
        i: usize,
    ) -> Result<(), PteListError> {
        let head = pool.get(h)?;
        let n = head.count();
        let Some(j) = n.checked_sub(1) else {
            return Err(PteListError::Corrupt(self.val().bits()));
        };
        d.set_spte(i, head.spte(j as usize));
        head.set_spte(j as usize, 0);
        head.set_count(j);
        if j == 0 {
            let next = NodeIdx::new(head.more());
            self.set_val(next.map_or(RmapHeadVal::EMPTY, RmapHeadVal::many));
            pool.free(h)?;
        }
        Ok(())
    }

    /// Zap every entry (`kvm_zap_all_rmap_sptes` / `pte_list_destroy`): `zap` is called
    /// on each SPTE (the caller clears it), every descriptor is freed and the head
    /// becomes empty. Returns how many entries there were. O(n), no per-entry unlinking.
    #[doc(alias = "pte_list_destroy")]
    #[doc(alias = "kvm_zap_all_rmap_sptes")]
    pub fn destroy<F: FnMut(SpteHandle)>(
        &mut self,
        pool: &DescPool,
        mut zap: F,
    ) -> Result<usize, PteListError> {
        let val = self.val();
        let mut n = 0;
        match val.decode()? {
            HeadKind::Empty => {}
            HeadKind::Single(s) => {
                zap(s);
                n = 1;
            }
            HeadKind::Many(h) => {
                let mut ndesc = pool.get(h)?.tail() as usize / PTE_LIST_EXT + 1;
                let mut cur = Some(h);
                while let (Some(idx), true) = (cur, ndesc > 0) {
                    let d = pool.get(idx)?;
                    for i in 0..(d.count() as usize).min(PTE_LIST_EXT) {
                        if let Ok(s) = SpteHandle::new(d.spte(i)) {
                            zap(s);
                            n += 1;
                        }
                    }
                    cur = NodeIdx::new(d.more());
                    pool.free(idx)?;
                    ndesc -= 1;
                }
            }
        }
        self.set_val(RmapHeadVal::EMPTY);
        Ok(n)
    }

    /// `rmap_add`: add `spte`, and if the list now holds more than
    /// [`RMAP_RECYCLE_THRESHOLD`] entries, zap them all (calling `zap` on each) and report
    /// that a remote TLB flush for the gfn is needed.
    ///
    /// KVM compares the count *before* the add (so 1001 entries may persist); revmap
    /// compares the count after it, so invariant 4 holds literally: no count above the
    /// threshold survives a return.
    pub fn rmap_add<F: FnMut(SpteHandle)>(
        &mut self,
        cache: &mut DescCache<'_>,
        spte: SpteHandle,
        zap: F,
    ) -> Result<RmapAdd, PteListError> {
        let count_before = self.add(cache, spte)?;
        let flush_remote_tlbs = count_before + 1 > RMAP_RECYCLE_THRESHOLD;
        if flush_remote_tlbs {
            self.destroy(cache.pool(), zap)?;
        }
        Ok(RmapAdd {
            count_before,
            flush_remote_tlbs,
        })
    }
}

/// A read-only head lock (`kvm_rmap_lock_readonly`), or nothing for an empty head.
/// Dropping it stores the unchanged value with `Release` (a relaxed one would let the reads move past it).
#[must_use = "dropping the guard unlocks immediately"]
#[derive(Debug)]
pub struct PteListReadGuard<'a>(Option<BitLockGuard<'a>>);

impl PteListReadGuard<'_> {
    /// The head value seen under the lock (empty if the lock was elided).
    #[inline(always)]
    pub fn val(&self) -> RmapHeadVal {
        RmapHeadVal(self.0.as_ref().map_or(0, |g| g.value()))
    }

    /// Whether the lock was elided because the head was empty.
    #[inline(always)]
    pub fn is_elided(&self) -> bool {
        self.0.is_none()
    }

    guard_reads!();
}

/// Iterator over a pte_list (`rmap_get_first`/`rmap_get_next`). Must be used while the
/// head lock is held. It ends early on a malformed chain (which the checker reports)
/// and visits at most the number of descriptors the head's `tail_count` announces.
#[derive(Debug)]
pub struct PteListIter<'p> {
    pool: PoolCursor<'p, PteListDesc>,
    single: Option<SpteHandle>,
    desc: Option<&'p PteListDesc>,
    pos: usize,
    count: usize,
    descs_left: usize,
}

impl<'p> PteListIter<'p> {
    fn new(val: RmapHeadVal, pool: &'p DescPool) -> Self {
        let mut it = Self {
            pool: PoolCursor::new(pool),
            single: None,
            desc: None,
            pos: 0,
            count: 0,
            descs_left: 0,
        };
        match val.decode() {
            Ok(HeadKind::Single(s)) => it.single = Some(s),
            Ok(HeadKind::Many(h)) => {
                if let Some(d) = it.pool.node(h) {
                    it.descs_left = d.tail() as usize / PTE_LIST_EXT;
                    it.enter(d);
                }
            }
            Ok(HeadKind::Empty) | Err(_) => {}
        }
        it
    }

    fn enter(&mut self, d: &'p PteListDesc) {
        self.desc = Some(d);
        self.pos = 0;
        self.count = (d.count() as usize).min(PTE_LIST_EXT);
    }
}

impl Iterator for PteListIter<'_> {
    type Item = SpteHandle;

    /// Internal iteration (used by `for_each`, `sum`, `count`, ...): a tight loop per
    /// descriptor instead of the per-item state machine of `next`.
    #[inline]
    fn fold<B, F: FnMut(B, SpteHandle) -> B>(mut self, init: B, mut f: F) -> B {
        let mut acc = init;
        if let Some(s) = self.single.take() {
            acc = f(acc, s);
        }
        while let Some(d) = self.desc {
            for slot in d.sptes.get(self.pos..self.count).unwrap_or(&[]) {
                // ORDERING: Relaxed under the head lock (module docs).
                match SpteHandle::new(slot.load(Ordering::Relaxed)) {
                    Ok(s) => acc = f(acc, s),
                    Err(_) => return acc,
                }
            }
            if self.descs_left == 0 {
                break;
            }
            self.descs_left -= 1;
            match NodeIdx::new(d.more()).and_then(|i| self.pool.node(i)) {
                Some(next) => self.enter(next),
                None => break,
            }
        }
        acc
    }

    #[inline]
    fn next(&mut self) -> Option<SpteHandle> {
        if let Some(s) = self.single.take() {
            return Some(s);
        }
        loop {
            let d = self.desc?;
            if self.pos < self.count {
                let s = SpteHandle::new(d.spte(self.pos)).ok();
                self.pos += 1;
                if s.is_none() {
                    self.desc = None;
                }
                return s;
            }
            if self.descs_left == 0 {
                self.desc = None;
                return None;
            }
            self.descs_left -= 1;
            match NodeIdx::new(d.more()).and_then(|i| self.pool.node(i)) {
                Some(next) => self.enter(next),
                None => {
                    self.desc = None;
                    return None;
                }
            }
        }
    }
}

/// What [`check_pte_list`] found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PteListCheckError {
    /// The lock bit is set at rest (invariant 1).
    #[error("head {0:#x} is locked at rest")]
    Locked(u64),
    /// The head word is malformed (invariant 1).
    #[error("malformed head word {0:#x}")]
    BadHead(u64),
    /// A descriptor index names no live descriptor.
    #[error("descriptor {0} is outside the pool or vacant")]
    BadDesc(u32),
    /// The head descriptor has 0 or more than 14 entries (invariant 2).
    #[error("head descriptor {idx} has {count} entries")]
    HeadCount {
        /// Descriptor index.
        idx: u32,
        /// Its spte_count.
        count: u32,
    },
    /// A tail descriptor is not full (invariant 2).
    #[error("tail descriptor {idx} has {count} entries, not 14")]
    TailNotFull {
        /// Descriptor index.
        idx: u32,
        /// Its spte_count.
        count: u32,
    },
    /// A tail_count disagrees with the descriptors that follow (invariant 2).
    #[error("descriptor {idx}: tail_count {found}, expected {expected}")]
    TailCount {
        /// Descriptor index.
        idx: u32,
        /// What the chain implies.
        expected: u64,
        /// The stored value.
        found: u32,
    },
    /// An entry below spte_count is not a valid handle, or one above it is not 0
    /// (invariant 3).
    #[error("descriptor {idx} slot {slot} holds {raw:#x}")]
    BadSlot {
        /// Descriptor index.
        idx: u32,
        /// Slot number.
        slot: usize,
        /// Its value.
        raw: u64,
    },
    /// A descriptor is reachable twice (a cycle, or shared by two heads).
    #[error("descriptor {0} reached twice")]
    SharedDesc(u32),
    /// The count is above [`RMAP_RECYCLE_THRESHOLD`] (invariant 4).
    #[error("rmap holds {0} entries, above the recycle threshold")]
    OverThreshold(usize),
    /// The checker could not allocate scratch memory.
    #[error("checker allocation failed")]
    Alloc,
}

/// Totals over the heads checked by [`check_pte_lists`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PteListStats {
    /// Heads checked.
    pub heads: u64,
    /// Entries over all heads.
    pub entries: u64,
    /// Descriptors over all heads.
    pub descs: u64,
}

impl PteListStats {
    /// Bytes of descriptors per entry (excludes the 8-byte heads). At full descriptors
    /// this is 128 / 14 ≈ 9.14.
    pub fn desc_bytes_per_entry(&self) -> f64 {
        if self.entries == 0 {
            return 0.0;
        }
        (self.descs * core::mem::size_of::<PteListDesc>() as u64) as f64 / self.entries as f64
    }

    /// Bytes per entry including the heads.
    pub fn bytes_per_entry(&self) -> f64 {
        if self.entries == 0 {
            return 0.0;
        }
        let bytes = self.descs * core::mem::size_of::<PteListDesc>() as u64
            + self.heads * core::mem::size_of::<PteListHead>() as u64;
        bytes as f64 / self.entries as f64
    }
}

/// Walk one head's chain checking invariants 1-3; calls `visit` on each descriptor
/// index. Returns (entries, descriptors).
fn check_one(
    head: &PteListHead,
    pool: &DescPool,
    mut visit: impl FnMut(u32) -> Result<(), PteListCheckError>,
) -> Result<(usize, usize), PteListCheckError> {
    // ORDERING: Acquire: the checker runs at a quiescent point; Acquire makes the last
    // unlock's descriptor writes visible.
    let raw = head.0.load(Ordering::Acquire);
    let val = RmapHeadVal(raw);
    if val.is_locked() {
        return Err(PteListCheckError::Locked(raw));
    }
    let h = match val.decode() {
        Err(_) => return Err(PteListCheckError::BadHead(raw)),
        Ok(HeadKind::Empty) => return Ok((0, 0)),
        Ok(HeadKind::Single(_)) => return Ok((1, 0)),
        Ok(HeadKind::Many(h)) => h,
    };
    // Collect the chain (bounded by the pool's capacity, duplicates caught by `visit`).
    let mut chain: Vec<(u32, &PteListDesc)> = Vec::new();
    let mut cur = Some(h);
    while let Some(idx) = cur {
        let d = pool
            .node(idx)
            .filter(|d| !d.is_vacant())
            .ok_or(PteListCheckError::BadDesc(idx.raw()))?;
        visit(idx.raw())?;
        if chain.len() as u64 > pool.capacity() {
            return Err(PteListCheckError::SharedDesc(idx.raw()));
        }
        chain.try_reserve(1).map_err(|_| PteListCheckError::Alloc)?;
        chain.push((idx.raw(), d));
        cur = NodeIdx::new(d.more());
    }
    let ndesc = chain.len();
    let mut entries = 0usize;
    for (pos, &(idx, d)) in chain.iter().enumerate() {
        let count = d.count();
        if pos == 0 {
            if count == 0 || count as usize > PTE_LIST_EXT {
                return Err(PteListCheckError::HeadCount { idx, count });
            }
        } else if count as usize != PTE_LIST_EXT {
            return Err(PteListCheckError::TailNotFull { idx, count });
        }
        let expected = (PTE_LIST_EXT * (ndesc - pos - 1)) as u64;
        if u64::from(d.tail()) != expected {
            return Err(PteListCheckError::TailCount {
                idx,
                expected,
                found: d.tail(),
            });
        }
        for slot in 0..PTE_LIST_EXT {
            let raw = d.spte(slot);
            let ok = if slot < count as usize {
                SpteHandle::new(raw).is_ok()
            } else {
                raw == 0
            };
            if !ok {
                return Err(PteListCheckError::BadSlot { idx, slot, raw });
            }
        }
        entries += count as usize;
    }
    Ok((entries, ndesc))
}

/// Check invariants 1-3 of one head at a quiescent point; returns its count.
pub fn check_pte_list(head: &PteListHead, pool: &DescPool) -> Result<usize, PteListCheckError> {
    check_one(head, pool, |_| Ok(())).map(|(n, _)| n)
}

/// Check invariants 1-4 of a gfn's rmap head (one managed by
/// [`PteListGuard::rmap_add`]); returns its count.
pub fn check_rmap_head(head: &PteListHead, pool: &DescPool) -> Result<usize, PteListCheckError> {
    let n = check_pte_list(head, pool)?;
    if n > RMAP_RECYCLE_THRESHOLD {
        return Err(PteListCheckError::OverThreshold(n));
    }
    Ok(n)
}

/// Check invariants 1-3 of every head, and that no descriptor is reachable from two
/// heads (or twice from one). Quiescent points only.
pub fn check_pte_lists(
    heads: &[PteListHead],
    pool: &DescPool,
) -> Result<PteListStats, PteListCheckError> {
    let words =
        usize::try_from(pool.capacity().div_ceil(64)).map_err(|_| PteListCheckError::Alloc)?;
    let mut seen: Vec<u64> = Vec::new();
    seen.try_reserve_exact(words)
        .map_err(|_| PteListCheckError::Alloc)?;
    seen.resize(words, 0);
    let mut stats = PteListStats::default();
    for head in heads {
        let (n, d) = check_one(head, pool, |idx| {
            let w = seen
                .get_mut((idx / 64) as usize)
                .ok_or(PteListCheckError::BadDesc(idx))?;
            if *w & (1 << (idx % 64)) != 0 {
                return Err(PteListCheckError::SharedDesc(idx));
            }
            *w |= 1 << (idx % 64);
            Ok(())
        })?;
        stats.heads += 1;
        stats.entries += n as u64;
        stats.descs += d as u64;
    }
    Ok(stats)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn s(i: u64) -> SpteHandle {
        SpteHandle::new(i * 8).unwrap()
    }

    #[test]
    fn handle_rules() {
        assert_eq!(SpteHandle::new(0), Err(PteListError::BadSpte(0)));
        assert_eq!(SpteHandle::new(12), Err(PteListError::BadSpte(12)));
        assert_eq!(SpteHandle::new(16).map(|h| h.raw()), Ok(16));
    }

    #[test]
    fn head_encoding_round_trips() {
        let i = NodeIdx::new(12345).unwrap();
        assert_eq!(RmapHeadVal::many(i).decode(), Ok(HeadKind::Many(i)));
        assert_eq!(RmapHeadVal::many(i).bits(), (12345 << 3) | 1);
        assert_eq!(
            RmapHeadVal::single(s(5)).decode(),
            Ok(HeadKind::Single(s(5)))
        );
        assert_eq!(RmapHeadVal::EMPTY.decode(), Ok(HeadKind::Empty));
        assert!(RmapHeadVal::from_raw(0x3).decode().is_err(), "lock bit");
        assert!(
            RmapHeadVal::from_raw(0x4).decode().is_err(),
            "unaligned single"
        );
        assert!(RmapHeadVal::from_raw(0x5).decode().is_err());
        assert!(RmapHeadVal::from_raw((u64::from(NIL) << 3) | 1)
            .decode()
            .is_err());
    }

    #[test]
    fn add_remove_count_follow_the_kvm_shape() {
        let pool = DescPool::new();
        let head = PteListHead::new();
        let mut cache = DescCache::new(&pool);
        cache.reserve(4).unwrap();
        let mut g = head.lock();
        for i in 1..=30u64 {
            assert_eq!(g.add(&mut cache, s(i)).unwrap(), (i - 1) as usize);
            assert_eq!(g.count(&pool).unwrap(), i as usize);
        }
        // 30 = 2 (first desc) ... : descriptors hold 14 + 14 + 2, the head one partial.
        let HeadKind::Many(h) = g.val().decode().unwrap() else {
            panic!("expected descriptors")
        };
        let hd = pool.get(h).unwrap();
        assert_eq!((hd.count(), hd.tail()), (2, 28));
        drop(g);
        assert_eq!(check_pte_list(&head, &pool), Ok(30));
        let mut seen: Vec<u64> = head.lock().iter(&pool).map(|x| x.raw() / 8).collect();
        assert_eq!(&seen[..2], &[29, 30], "head descriptor first");
        seen.sort();
        assert_eq!(seen, (1..=30).collect::<Vec<_>>());
        // Remove from a tail: the hole is filled from the head descriptor.
        let mut g = head.lock();
        g.remove(&pool, s(1)).unwrap();
        assert_eq!(g.remove(&pool, s(1)), Err(PteListError::NotFound(s(1))));
        drop(g);
        assert_eq!(check_pte_list(&head, &pool), Ok(29));
        let mut g = head.lock();
        g.remove(&pool, s(2)).unwrap();
        drop(g);
        assert_eq!(check_pte_list(&head, &pool), Ok(28));
        assert_eq!(
            pool.check().unwrap().in_use,
            2,
            "emptied head descriptor freed"
        );
        let mut g = head.lock();
        for i in 3..=30 {
            g.remove(&pool, s(i)).unwrap();
        }
        assert_eq!(g.val(), RmapHeadVal::EMPTY);
        drop(g);
        assert_eq!(pool.check().unwrap().in_use, 0);
    }

    #[test]
    fn add_without_reservation_fails_cleanly() {
        let pool = DescPool::new();
        let head = PteListHead::new();
        let mut cache = DescCache::new(&pool);
        let mut g = head.lock();
        assert_eq!(
            g.add(&mut cache, s(1)),
            Ok(0),
            "single entry needs no descriptor"
        );
        let err = g.add(&mut cache, s(2)).unwrap_err();
        assert_eq!(err, PteListError::from(RmapError::PoolExhausted));
        assert_eq!(g.val(), RmapHeadVal::single(s(1)), "unchanged");
        drop(g);
        assert_eq!(check_pte_list(&head, &pool), Ok(1));
    }

    #[test]
    fn destroy_zaps_everything_and_frees_descriptors() {
        let pool = DescPool::new();
        let head = PteListHead::new();
        let mut cache = DescCache::new(&pool);
        cache.reserve(8).unwrap();
        let mut g = head.lock();
        for i in 1..=50 {
            let _ = g.add(&mut cache, s(i)).unwrap();
        }
        let mut zapped = Vec::new();
        assert_eq!(g.destroy(&pool, |x| zapped.push(x.raw() / 8)), Ok(50));
        zapped.sort();
        assert_eq!(zapped, (1..=50).collect::<Vec<_>>());
        drop(g);
        assert_eq!(check_pte_list(&head, &pool), Ok(0));
        drop(cache);
        assert_eq!(pool.check().unwrap().in_use, 0);
    }

    #[test]
    fn rmap_add_recycles_past_the_threshold() {
        let pool = DescPool::new();
        let head = PteListHead::new();
        let mut cache = DescCache::new(&pool);
        let mut zapped = 0usize;
        for i in 1..=RMAP_RECYCLE_THRESHOLD as u64 {
            cache.reserve(1).unwrap();
            let r = head
                .lock()
                .rmap_add(&mut cache, s(i), |_| zapped += 1)
                .unwrap();
            assert!(!r.flush_remote_tlbs);
            assert_eq!(check_rmap_head(&head, &pool), Ok(i as usize));
        }
        cache.reserve(1).unwrap();
        let r = head
            .lock()
            .rmap_add(&mut cache, s(5000), |_| zapped += 1)
            .unwrap();
        assert_eq!(r.count_before, RMAP_RECYCLE_THRESHOLD);
        assert!(r.flush_remote_tlbs, "remote flush requested");
        assert_eq!(zapped, RMAP_RECYCLE_THRESHOLD + 1);
        assert_eq!(check_rmap_head(&head, &pool), Ok(0));
        drop(cache);
        assert_eq!(pool.check().unwrap().in_use, 0);
    }

    #[test]
    fn readonly_lock_is_elided_on_empty_and_restores_the_value() {
        let pool = DescPool::new();
        let head = PteListHead::new();
        assert!(head.lock_readonly().is_elided());
        let mut cache = DescCache::new(&pool);
        cache.reserve(1).unwrap();
        let _ = head.lock().add(&mut cache, s(1)).unwrap();
        let _ = head.lock().add(&mut cache, s(2)).unwrap();
        let before = head.load();
        {
            let r = head.lock_readonly();
            assert!(!r.is_elided());
            assert!(head.load().is_locked());
            assert_eq!(r.count(&pool), Ok(2));
            assert_eq!(r.iter(&pool).count(), 2);
        }
        assert_eq!(head.load(), before);
    }

    #[test]
    fn checker_catches_corruption() {
        let pool = DescPool::new();
        let heads = PteListHead::new_array(2).unwrap();
        let mut cache = DescCache::new(&pool);
        cache.reserve(2).unwrap();
        {
            let mut g = heads[0].lock();
            for i in 1..=20 {
                let _ = g.add(&mut cache, s(i)).unwrap();
            }
        }
        let stats = check_pte_lists(&heads, &pool).unwrap();
        assert_eq!((stats.entries, stats.descs), (20, 2));
        let HeadKind::Many(h) = heads[0].load().decode().unwrap() else {
            panic!()
        };
        let hd = pool.get(h).unwrap();
        let tail = pool.get(NodeIdx::new(hd.more()).unwrap()).unwrap();
        // A tail that is not full.
        tail.set_count(13);
        assert!(matches!(
            check_pte_list(&heads[0], &pool),
            Err(PteListCheckError::TailNotFull { .. })
        ));
        tail.set_count(14);
        // A bad tail_count.
        hd.set_tail(13);
        assert!(matches!(
            check_pte_list(&heads[0], &pool),
            Err(PteListCheckError::TailCount { .. })
        ));
        hd.set_tail(14);
        // A stale entry past spte_count.
        hd.set_spte(13, 8);
        assert!(matches!(
            check_pte_list(&heads[0], &pool),
            Err(PteListCheckError::BadSlot { slot: 13, .. })
        ));
        hd.set_spte(13, 0);
        // Two heads sharing a descriptor.
        heads[1].0.store(heads[0].load().bits(), Ordering::Relaxed);
        assert!(matches!(
            check_pte_lists(&heads, &pool),
            Err(PteListCheckError::SharedDesc(_))
        ));
        heads[1].0.store(KVM_RMAP_LOCKED | 8, Ordering::Relaxed);
        assert!(matches!(
            check_pte_list(&heads[1], &pool),
            Err(PteListCheckError::Locked(_))
        ));
        heads[1].0.store(0, Ordering::Relaxed);
        assert_eq!(check_pte_lists(&heads, &pool).map(|s| s.entries), Ok(20));
    }

    #[test]
    fn memory_per_entry_at_full_descriptors() {
        let pool = DescPool::new();
        let head = PteListHead::new();
        let mut cache = DescCache::new(&pool);
        cache.reserve(100).unwrap();
        let mut g = head.lock();
        for i in 1..=(14 * 100) {
            let _ = g.add(&mut cache, s(i)).unwrap();
        }
        drop(g);
        let st = check_pte_lists(core::slice::from_ref(&head), &pool).unwrap();
        let b = st.desc_bytes_per_entry();
        assert!((b - 128.0 / 14.0).abs() < 1e-9, "{b}");
        assert!(st.bytes_per_entry() <= 9.2, "{}", st.bytes_per_entry());
    }
}
