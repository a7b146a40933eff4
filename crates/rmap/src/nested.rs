//! The PowerPC nested-guest rmap (KVM's `kvmhv_insert_nest_rmap` and friends in
//! `arch/powerpc/kvm/book3s_hv_nested.c`): for a radix L1 guest, each
//! memslot rmap word heads the list of (LPID, L2 address) pairs whose shadow PTEs were
//! derived from that L1 page, so that unmapping or aging the page can reach them.
//!
//! # Encoding
//!
//! An entry ([`NestedRmapEntry`], KVM's `n_rmap` value):
//!
//! | bits  | field | meaning |
//! |-------|-------|---------|
//! | 52-63 | `RMAP_NESTED_LPID_MASK` | L1's LPID for the L2 (1..=4095; 0 is the host) |
//! | 12-51 | `RMAP_NESTED_GPA_MASK` | L2 guest real address, 4 KiB frame granular |
//! | 1-11  | — | zero |
//! | 0     | `RMAP_NESTED_IS_SINGLE_ENTRY` | tag: "an inline entry, not a reference" |
//!
//! The rmap word ([`NestedRmapVal`]) is 0 (empty), a tagged inline entry (exactly one
//! entry), or an untagged reference to the first [`NestedNode`] of a list. A node holds
//! an entry and a `next` link; the **last** node's `next` is not a null link but the
//! tagged inline value that the word held before the list was created. So a list of n
//! entries has n-1 nodes, and a walk ends at the first tagged link. Node references are
//! encoded as `(index << 3) | 0b100`: untagged, never 0, and clear of bit 1.
//!
//! Bit 1 of the word is a bit lock ([`NESTED_RMAP_LOCK`]). KVM has none (every list
//! mutation runs under `kvm->mmu_lock`); revmap gives each word its own lock so that
//! gfns are updated in parallel and detach-all may race with insert. Bit 1 is free
//! because it is zero in every entry and every node reference.
//!
//! # Invariants (checked by [`check_nested_rmap`] and
//! [`check_nested_rmaps`])
//!
//! 1. The word is 0, a tagged entry (bits 1-11 zero, LPID non-zero) or a reference to a
//!    live node; the lock bit is clear at rest.
//! 2. A non-empty list ends in a tagged inline value, never a null link; a list of n
//!    entries has exactly n-1 nodes, and no node is reachable twice.
//! 3. No two entries of one word are equal on (LPID, GPA).
//!
//! # Bounded memory
//!
//! L1 invalidations do not remove entries, so stale (LPID, GPA) pairs accumulate until
//! the L1 page itself is unmapped; a busy L1 could make the host allocate without limit.
//! [`NestedGuard::insert`] therefore enforces a per-word cap ([`NestedLimits::cap`],
//! default [`DEFAULT_NESTED_RMAP_CAP`] = 64 entries): when an insert would exceed it,
//! the caller's validation callback is run over the entries and those reported stale
//! are reclaimed (their nodes freed); if the list is still full, the insert is
//! **refused** with [`NestedError::ListFull`] and nothing is added. The caller must
//! then not install the shadow PTE (the fault is retried or served without a nested
//! mapping, e.g. after detaching the whole list), so untracked shadow PTEs never exist.
//! Refusing rather than evicting keeps every live shadow PTE reachable from its rmap.
//!
//! Memory per gfn is therefore at most `8 + 16 × (cap − 1)` bytes: **1016 bytes** with
//! the default cap (8-byte word, one inline entry, 63 nodes of 16 bytes). Each entry
//! beyond the first costs one 16-byte node ([`NestedNode`]: 8-byte entry + 8-byte link;
//! the link must hold a whole tagged entry at the end of the list, so it cannot shrink to
//! a 32-bit index).
//!
//! # Locking
//!
//! Every change of a word and of the nodes it heads happens under the word's lock
//! (`Acquire` RMW to lock, `Release` store of the new value to unlock, which publishes
//! the node writes). Node fields are atomics accessed `Relaxed` under the lock. A
//! detached list ([`DetachedNestedList`]) is owned by its holder alone.
//!
//! # Example
//!
//! ```
//! use revmap_rmap::nested::{check_nested_rmap, NestedLimits};
//! use revmap_rmap::{Gpa, Lpid, NestedCache, NestedPool, NestedRmap, NestedRmapEntry};
//!
//! let pool = NestedPool::new();
//! let word = NestedRmap::new();
//! let limits = NestedLimits::default();
//! let mut cache = NestedCache::new(&pool);
//! for frame in 0..3u64 {
//!     let e = NestedRmapEntry::new(Lpid(5), Gpa(frame << 12))?;
//!     cache.reserve(1)?; // before the lock, like KVM's kzalloc before mmu_lock
//!     // The callback says whether an entry's shadow PTE is still valid (used only
//!     // when the list is at its cap).
//!     word.lock().insert(&mut cache, e, &limits, |_| true)?;
//! }
//! assert_eq!(check_nested_rmap(&word, &pool), Ok(3)); // 3 entries, 2 nodes
//! // L1 unmaps the page: take the list out, invalidate each L2 mapping, free it.
//! let list = word.detach_all(&pool);
//! assert_eq!(list.iter().count(), 3);
//! assert_eq!(list.free()?, 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::addr::{Gpa, Lpid};
use crate::bitlock::BitLockGuard;
use crate::error::RmapError;
use crate::pool::{NodeCache, NodeIdx, Pool, PoolCursor, PoolError, PoolNode, NIL};
use crate::sync::{AtomicU64, Ordering};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::num::NonZeroU64;

/// LPID field of an entry (`RMAP_NESTED_LPID_MASK`).
pub const RMAP_NESTED_LPID_MASK: u64 = 0xfff0_0000_0000_0000;
/// Shift of the LPID field (`RMAP_NESTED_LPID_SHIFT`).
pub const RMAP_NESTED_LPID_SHIFT: u32 = 52;
/// L2 address field of an entry (`RMAP_NESTED_GPA_MASK`).
pub const RMAP_NESTED_GPA_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Tag of an inline entry (`RMAP_NESTED_IS_SINGLE_ENTRY`).
pub const RMAP_NESTED_IS_SINGLE_ENTRY: u64 = 0x1;
/// Lock bit of a nested rmap word (revmap addition, see module docs).
pub const NESTED_RMAP_LOCK: u64 = 1 << 1;
/// Bits 1-11: always zero in an entry.
const ENTRY_ZERO_BITS: u64 = 0xffe;
/// Marker bit of a node reference.
const NODE_REF_MARK: u64 = 1 << 2;
/// Shift of the node index in a node reference.
const NODE_REF_SHIFT: u32 = 3;
/// Largest LPID (12 bits).
pub const MAX_NESTED_LPID: u16 = 0xfff;
/// Default per-word entry cap.
pub const DEFAULT_NESTED_RMAP_CAP: usize = 64;
/// `entry` value of a vacant node: bit 1 set, never a valid entry.
const NODE_VACANT: u64 = 1 << 1;

const _: () = assert!(
    RMAP_NESTED_LPID_MASK | RMAP_NESTED_GPA_MASK | ENTRY_ZERO_BITS | RMAP_NESTED_IS_SINGLE_ENTRY
        == u64::MAX
);
const _: () = assert!(RMAP_NESTED_LPID_MASK & RMAP_NESTED_GPA_MASK == 0);
const _: () = assert!(ENTRY_ZERO_BITS & NESTED_RMAP_LOCK == NESTED_RMAP_LOCK);
#[cfg(not(any(loom, shuttle)))]
const _: () = assert!(core::mem::size_of::<NestedNode>() == 16);
#[cfg(not(any(loom, shuttle)))]
const _: () = assert!(core::mem::size_of::<NestedRmap>() == 8);

/// Errors of nested rmap operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NestedError {
    /// LPID 0 (the host) or above 12 bits.
    #[error("LPID {0} is not a nested guest LPID (1..=4095)")]
    BadLpid(u16),
    /// The L2 address is not 4 KiB aligned or does not fit 52 bits.
    #[error("L2 address {0:#x} is not a 4 KiB-aligned 52-bit address")]
    BadGpa(u64),
    /// The raw value is not a valid entry.
    #[error("{0:#x} is not a valid nested rmap entry")]
    BadEntry(u64),
    /// The word's list is at its cap even after reclaiming stale entries.
    #[error("nested rmap full ({cap} entries) after reclaiming stale entries")]
    ListFull {
        /// The cap in force.
        cap: usize,
    },
    /// The cap must be at least 1.
    #[error("nested rmap cap must be at least 1")]
    BadCap,
    /// The word or a node is malformed.
    #[error("corrupt nested rmap: link {0:#x}")]
    Corrupt(u64),
    /// A pool operation failed (e.g. [`RmapError::PoolExhausted`]: no reservation).
    #[error(transparent)]
    Pool(#[from] PoolError),
}

impl From<RmapError> for NestedError {
    fn from(e: RmapError) -> Self {
        Self::Pool(PoolError::Rmap(e))
    }
}

/// One nested rmap entry: (LPID, L2 frame), stored untagged. See the module docs.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NestedRmapEntry(NonZeroU64);

impl NestedRmapEntry {
    /// An entry for L2 `lpid` (1..=4095) at 4 KiB-aligned L2 address `gpa` (< 2^52).
    pub fn new(lpid: Lpid, gpa: Gpa) -> Result<Self, NestedError> {
        if lpid.raw() == 0 || lpid.raw() > MAX_NESTED_LPID {
            return Err(NestedError::BadLpid(lpid.raw()));
        }
        if gpa.raw() & !RMAP_NESTED_GPA_MASK != 0 {
            return Err(NestedError::BadGpa(gpa.raw()));
        }
        let v = (u64::from(lpid.raw()) << RMAP_NESTED_LPID_SHIFT) | gpa.raw();
        NonZeroU64::new(v).map(Self).ok_or(NestedError::BadEntry(v))
    }

    /// Decode a raw value, tagged or not; rejects set bits 1-11 and LPID 0.
    pub fn from_raw(raw: u64) -> Result<Self, NestedError> {
        if raw & ENTRY_ZERO_BITS != 0 || raw & RMAP_NESTED_LPID_MASK == 0 {
            return Err(NestedError::BadEntry(raw));
        }
        NonZeroU64::new(raw & !RMAP_NESTED_IS_SINGLE_ENTRY)
            .map(Self)
            .ok_or(NestedError::BadEntry(raw))
    }

    /// The L2's LPID as L1 numbers it.
    #[inline(always)]
    pub const fn lpid(self) -> Lpid {
        Lpid((self.0.get() >> RMAP_NESTED_LPID_SHIFT) as u16)
    }

    /// The L2 guest real address (frame aligned).
    #[inline(always)]
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0.get() & RMAP_NESTED_GPA_MASK)
    }

    /// The untagged raw value.
    #[inline(always)]
    pub const fn raw(self) -> u64 {
        self.0.get()
    }

    /// The value with the inline tag set.
    #[inline(always)]
    pub const fn tagged(self) -> u64 {
        self.0.get() | RMAP_NESTED_IS_SINGLE_ENTRY
    }

    /// Equality on (LPID, GPA) (`kvmhv_n_rmap_is_equal`); the same as `==`.
    #[inline(always)]
    pub const fn same_mapping(self, other: Self) -> bool {
        self.0.get() == other.0.get()
    }
}

impl core::fmt::Debug for NestedRmapEntry {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "NestedRmapEntry(lpid {}, gpa {:#x})",
            self.lpid().raw(),
            self.gpa().raw()
        )
    }
}

/// A link (the word's value, or a node's `next`) decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NestedLink {
    /// 0: empty word (never valid as a node's `next`).
    Empty,
    /// A tagged inline entry: the only or the last entry.
    Inline(NestedRmapEntry),
    /// A reference to a node.
    Node(NodeIdx),
}

/// A snapshot of a nested rmap word or link value, with typed accessors.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct NestedRmapVal(u64);

impl NestedRmapVal {
    /// An inline (tagged) entry.
    #[inline(always)]
    pub const fn inline(e: NestedRmapEntry) -> Self {
        Self(e.tagged())
    }

    /// A reference to node `idx`.
    #[inline(always)]
    pub const fn node(idx: NodeIdx) -> Self {
        Self(((idx.raw() as u64) << NODE_REF_SHIFT) | NODE_REF_MARK)
    }

    /// Decode, rejecting malformed values (including a set lock bit).
    #[inline]
    pub fn decode(self) -> Result<NestedLink, NestedError> {
        let v = self.0;
        if v == 0 {
            Ok(NestedLink::Empty)
        } else if v & RMAP_NESTED_IS_SINGLE_ENTRY != 0 {
            NestedRmapEntry::from_raw(v)
                .map(NestedLink::Inline)
                .map_err(|_| NestedError::Corrupt(v))
        } else if v & ((1 << NODE_REF_SHIFT) - 1) == NODE_REF_MARK {
            u32::try_from(v >> NODE_REF_SHIFT)
                .ok()
                .and_then(NodeIdx::new)
                .map(NestedLink::Node)
                .ok_or(NestedError::Corrupt(v))
        } else {
            Err(NestedError::Corrupt(v))
        }
    }
}

crate::word::head_word_accessors!(NestedRmapVal, NESTED_RMAP_LOCK);

/// A list node (`struct rmap_nested`): an untagged entry and the next link. 16 bytes.
///
/// While the node is in the pool, `entry` holds a vacant marker (bit 1, never valid in
/// an entry) and `next` the free-list link.
#[repr(C)]
#[derive(Debug)]
pub struct NestedNode {
    entry: AtomicU64,
    next: AtomicU64,
}

impl NestedNode {
    crate::word::relaxed_fields!(entry / set_entry: entry -> u64);
    #[inline(always)]
    fn next(&self) -> NestedRmapVal {
        // ORDERING: Relaxed under the word lock (module docs).
        NestedRmapVal(self.next.load(Ordering::Relaxed))
    }
    #[inline(always)]
    fn set_next(&self, v: NestedRmapVal) {
        // ORDERING: Relaxed under the word lock (module docs).
        self.next.store(v.0, Ordering::Relaxed)
    }
}

impl PoolNode for NestedNode {
    fn vacant() -> Self {
        Self {
            entry: AtomicU64::new(NODE_VACANT),
            next: AtomicU64::new(u64::from(NIL)),
        }
    }
    fn claim(&self) -> bool {
        // ORDERING: Relaxed: the RMW alone decides ownership; the pool's free-list CAS
        // orders the contents.
        self.entry.swap(0, Ordering::Relaxed) == NODE_VACANT
    }
    fn release(&self) -> bool {
        // ORDERING: Relaxed, as in `claim`.
        self.entry.swap(NODE_VACANT, Ordering::Relaxed) != NODE_VACANT
    }
    fn is_vacant(&self) -> bool {
        self.entry() == NODE_VACANT
    }
    fn free_link(&self) -> u32 {
        self.next().0 as u32
    }
    fn set_free_link(&self, next: u32) {
        self.set_next(NestedRmapVal(u64::from(next)))
    }
}

/// The nested node pool type.
pub type NestedPool = Pool<NestedNode>;
/// A reservation of nested nodes (the node KVM kzallocs before taking `mmu_lock`).
pub type NestedCache<'p> = NodeCache<'p, NestedNode>;

/// The bounded-memory policy of nested rmap words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NestedLimits {
    cap: usize,
}

impl Default for NestedLimits {
    fn default() -> Self {
        Self {
            cap: DEFAULT_NESTED_RMAP_CAP,
        }
    }
}

impl NestedLimits {
    /// A cap of `cap` entries per word (at least 1).
    pub fn new(cap: usize) -> Result<Self, NestedError> {
        if cap == 0 {
            return Err(NestedError::BadCap);
        }
        Ok(Self { cap })
    }

    /// Most entries a word may hold.
    #[inline(always)]
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Most bytes one gfn can cost: the 8-byte word plus `cap - 1` 16-byte nodes.
    pub fn max_bytes_per_gfn(&self) -> usize {
        core::mem::size_of::<u64>()
            + self.cap.saturating_sub(1) * core::mem::size_of::<NestedNode>()
    }
}

/// What [`NestedGuard::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The word was empty: the entry is stored inline, no node used.
    Inline,
    /// The entry was linked in a new node.
    Linked,
    /// An equal (LPID, GPA) entry was already present; nothing changed.
    Duplicate,
}

/// Outcome of [`NestedGuard::insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InsertOutcome {
    /// What happened to the new entry.
    pub inserted: Inserted,
    /// Stale entries reclaimed to make room.
    pub reclaimed: usize,
}

/// One memslot rmap word of a radix L1 guest, heading its nested rmap list. Bit 1 is
/// its lock.
#[repr(transparent)]
#[derive(Debug, Default)]
pub struct NestedRmap(AtomicU64);

impl NestedRmap {
    /// An empty word.
    #[inline]
    pub fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Allocate `n` empty words, failing cleanly.
    pub fn new_array(n: usize) -> Result<Box<[NestedRmap]>, RmapError> {
        crate::error::try_boxed_slice(n, |_| NestedRmap::new())
    }

    /// A lock-free snapshot of the word.
    #[inline]
    pub fn load(&self) -> NestedRmapVal {
        // ORDERING: Relaxed: only the word itself is read; nodes are read under the lock.
        NestedRmapVal(self.0.load(Ordering::Relaxed))
    }

    /// Spin until the word is locked.
    #[inline]
    pub fn lock(&self) -> NestedGuard<'_> {
        NestedGuard(BitLockGuard::lock(&self.0, NESTED_RMAP_LOCK))
    }

    /// Take the whole list out of the word, leaving it empty (`llist_del_all`, the first
    /// step of `kvmhv_remove_nest_rmap_list`). The caller invalidates the entries'
    /// shadow PTEs and then frees the list (or drops it).
    pub fn detach_all<'p>(&self, pool: &'p NestedPool) -> DetachedNestedList<'p> {
        self.lock().detach(pool)
    }

    /// Free every node and empty the word, doing no PTE work
    /// (`kvmhv_free_memslot_nest_rmap`). Returns how many entries there were.
    pub fn free(&self, pool: &NestedPool) -> Result<usize, NestedError> {
        self.detach_all(pool).free()
    }
}

/// A held nested rmap word lock; edits are published by the `Release` unlock on drop.
#[must_use = "dropping the guard unlocks immediately"]
#[derive(Debug)]
pub struct NestedGuard<'a>(BitLockGuard<'a>);

impl NestedGuard<'_> {
    /// The word as it will be stored at unlock.
    #[inline(always)]
    pub fn val(&self) -> NestedRmapVal {
        NestedRmapVal(self.0.value())
    }

    #[inline(always)]
    fn set_val(&mut self, v: NestedRmapVal) {
        self.0.set(v.0)
    }

    /// Iterate over the entries (O(n)).
    pub fn iter<'p>(&self, pool: &'p NestedPool) -> NestedIter<'p> {
        NestedIter::new(self.val(), pool)
    }

    /// Number of entries (O(n)).
    pub fn len(&self, pool: &NestedPool) -> usize {
        self.iter(pool).count()
    }

    /// Whether the word is empty.
    pub fn is_empty(&self) -> bool {
        self.val().bits() == 0
    }

    /// Call `f` on every entry, leaving the list unchanged (the walk of
    /// `kvmhv_update_nest_rmap_rc_list`: R/C propagation to the shadow PTEs, aging).
    /// Returns how many entries were visited.
    pub fn update_all<F: FnMut(NestedRmapEntry)>(&self, pool: &NestedPool, mut f: F) -> usize {
        let mut n = 0;
        for e in self.iter(pool) {
            f(e);
            n += 1;
        }
        n
    }

    /// Insert `entry` (`kvmhv_insert_nest_rmap`) with dedup on (LPID, GPA) and the memory
    /// bound of the module docs.
    ///
    /// * Empty word: the entry goes inline; no node is used.
    /// * An equal entry exists: nothing changes ([`Inserted::Duplicate`]).
    /// * The list holds `limits.cap()` entries: `is_valid` is called on each; those it
    ///   rejects are reclaimed. If the list is still full, [`NestedError::ListFull`].
    /// * Otherwise a node from `cache` (reserved before locking) is pushed at the head;
    ///   a previously inline entry becomes the list's tagged tail.
    ///
    /// Fails with [`RmapError::PoolExhausted`] if a node is needed and `cache` holds no
    /// credit; the list is left valid (possibly after reclaiming).
    pub fn insert<V: FnMut(NestedRmapEntry) -> bool>(
        &mut self,
        cache: &mut NestedCache<'_>,
        entry: NestedRmapEntry,
        limits: &NestedLimits,
        mut is_valid: V,
    ) -> Result<InsertOutcome, NestedError> {
        let pool = cache.pool();
        let mut reclaimed = 0;
        if self.val().decode()? == NestedLink::Empty {
            self.set_val(NestedRmapVal::inline(entry));
            return Ok(InsertOutcome {
                inserted: Inserted::Inline,
                reclaimed,
            });
        }
        let mut len = 0usize;
        for e in self.iter(pool) {
            if e.same_mapping(entry) {
                return Ok(InsertOutcome {
                    inserted: Inserted::Duplicate,
                    reclaimed,
                });
            }
            len += 1;
        }
        if len >= limits.cap() {
            reclaimed = self.retain(pool, &mut is_valid)?;
            len -= reclaimed;
            if len >= limits.cap() {
                return Err(NestedError::ListFull { cap: limits.cap() });
            }
        }
        if len == 0 {
            self.set_val(NestedRmapVal::inline(entry));
            return Ok(InsertOutcome {
                inserted: Inserted::Inline,
                reclaimed,
            });
        }
        let idx = cache.alloc()?;
        let node = pool.get(idx)?;
        node.set_entry(entry.raw());
        node.set_next(self.val());
        self.set_val(NestedRmapVal::node(idx));
        Ok(InsertOutcome {
            inserted: Inserted::Linked,
            reclaimed,
        })
    }

    /// Set the link owned by `owner` (`None`: the word) to `v`.
    fn set_link(
        &mut self,
        pool: &NestedPool,
        owner: Option<NodeIdx>,
        v: NestedRmapVal,
    ) -> Result<(), NestedError> {
        match owner {
            None => self.set_val(v),
            Some(i) => pool.get(i)?.set_next(v),
        }
        Ok(())
    }

    /// Keep only the entries for which `keep` returns true, freeing the nodes of the
    /// others; the list keeps its shape (n entries, n-1 nodes, tagged tail). Returns how
    /// many entries were removed. This is the garbage collection of stale entries.
    pub fn retain<K: FnMut(NestedRmapEntry) -> bool>(
        &mut self,
        pool: &NestedPool,
        mut keep: K,
    ) -> Result<usize, NestedError> {
        let mut removed = 0;
        // `owner` owns the link that points at `cur` (None: the word).
        let mut owner: Option<NodeIdx> = None;
        // The last kept node and the owner of the link pointing at it.
        let mut last_kept: Option<(Option<NodeIdx>, NodeIdx)> = None;
        let mut cur = self.val();
        let mut steps = 0u64;
        loop {
            steps += 1;
            if steps > pool.capacity() + 1 {
                return Err(NestedError::Corrupt(cur.bits()));
            }
            match cur.decode()? {
                NestedLink::Empty => {
                    if owner.is_some() {
                        return Err(NestedError::Corrupt(0));
                    }
                    return Ok(removed);
                }
                NestedLink::Node(idx) => {
                    let node = pool.get(idx)?;
                    let e = NestedRmapEntry::from_raw(node.entry())?;
                    let next = node.next();
                    if keep(e) {
                        last_kept = Some((owner, idx));
                        owner = Some(idx);
                    } else {
                        self.set_link(pool, owner, next)?;
                        pool.free(idx)?;
                        removed += 1;
                    }
                    cur = next;
                }
                NestedLink::Inline(e) => {
                    if !keep(e) {
                        removed += 1;
                        match last_kept {
                            // Every node went too: the word becomes empty.
                            None => self.set_val(NestedRmapVal::EMPTY),
                            // The last kept node's entry becomes the tagged tail.
                            Some((slot, idx)) => {
                                let last = NestedRmapEntry::from_raw(pool.get(idx)?.entry())?;
                                self.set_link(pool, slot, NestedRmapVal::inline(last))?;
                                pool.free(idx)?;
                            }
                        }
                    }
                    return Ok(removed);
                }
            }
        }
    }

    /// Take the whole list out, leaving the word empty at unlock.
    pub fn detach<'p>(&mut self, pool: &'p NestedPool) -> DetachedNestedList<'p> {
        let val = self.val();
        self.set_val(NestedRmapVal::EMPTY);
        DetachedNestedList { pool, val }
    }
}

/// A list taken out of its word: owned by the holder, who may walk it (to invalidate
/// the shadow PTEs) and then frees it. Dropping it frees the nodes too.
#[must_use = "a detached list's entries must be invalidated"]
#[derive(Debug)]
pub struct DetachedNestedList<'p> {
    pool: &'p NestedPool,
    val: NestedRmapVal,
}

impl<'p> DetachedNestedList<'p> {
    /// The entries.
    pub fn iter(&self) -> NestedIter<'p> {
        NestedIter::new(self.val, self.pool)
    }

    /// Free every node; returns how many entries the list had.
    pub fn free(mut self) -> Result<usize, NestedError> {
        self.free_nodes()
    }

    fn free_nodes(&mut self) -> Result<usize, NestedError> {
        let mut cur = core::mem::take(&mut self.val);
        let mut tail: Result<usize, NestedError> = Ok(0);
        let pool = self.pool;
        // Walk the chain lazily: a node's `next` is read before the pool overwrites it
        // with a free link (see `Pool::free_chain`).
        let nodes = core::iter::from_fn(|| match cur.decode() {
            Ok(NestedLink::Node(idx)) => {
                cur = pool.node(idx).map_or(NestedRmapVal(1), NestedNode::next);
                Some(idx)
            }
            Ok(NestedLink::Inline(_)) => {
                tail = Ok(1);
                None
            }
            Ok(NestedLink::Empty) => None,
            Err(e) => {
                tail = Err(e);
                None
            }
        });
        let freed = pool.free_chain(nodes)?;
        Ok(freed as usize + tail?)
    }
}

impl Drop for DetachedNestedList<'_> {
    fn drop(&mut self) {
        // Errors here mean a corrupt list, which the checker reports; nothing to do.
        let _ = self.free_nodes();
    }
}

/// Iterator over a nested rmap list (`for_each_nest_rmap_safe`). It ends early on a
/// malformed link (the checker reports it) and after at most the pool's capacity + 1
/// entries.
#[derive(Debug)]
pub struct NestedIter<'p> {
    nodes: PoolCursor<'p, NestedNode>,
    cur: NestedRmapVal,
    left: u64,
}

impl<'p> NestedIter<'p> {
    fn new(val: NestedRmapVal, pool: &'p NestedPool) -> Self {
        Self {
            nodes: PoolCursor::new(pool),
            cur: val,
            left: pool.capacity() + 1,
        }
    }
}

impl Iterator for NestedIter<'_> {
    type Item = NestedRmapEntry;

    #[inline]
    fn next(&mut self) -> Option<NestedRmapEntry> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        match self.cur.decode() {
            Ok(NestedLink::Inline(e)) => {
                self.cur = NestedRmapVal::EMPTY;
                Some(e)
            }
            Ok(NestedLink::Node(idx)) => {
                let node = self.nodes.node(idx)?;
                let e = NestedRmapEntry::from_raw(node.entry()).ok();
                self.cur = if e.is_some() {
                    node.next()
                } else {
                    NestedRmapVal::EMPTY
                };
                e
            }
            Ok(NestedLink::Empty) | Err(_) => {
                self.cur = NestedRmapVal::EMPTY;
                None
            }
        }
    }
}

/// What [`check_nested_rmap`] found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NestedCheckError {
    /// The lock bit is set at rest.
    #[error("word {0:#x} locked at rest")]
    Locked(u64),
    /// A link is malformed, or a node's `next` is 0 (invariants 1-2).
    #[error("malformed link {0:#x}")]
    BadLink(u64),
    /// A node reference names no live node.
    #[error("node {0} is outside the pool or vacant")]
    BadNode(u32),
    /// A node's entry is invalid (tagged, bits 1-11 set or LPID 0).
    #[error("node {idx} holds invalid entry {raw:#x}")]
    BadEntry {
        /// Node index.
        idx: u32,
        /// Its entry field.
        raw: u64,
    },
    /// A node is reachable twice (a cycle, or shared by two words) (invariant 2).
    #[error("node {0} reached twice")]
    SharedNode(u32),
    /// Two entries are equal on (LPID, GPA) (invariant 3).
    #[error("duplicate entry {0:#x}")]
    Duplicate(u64),
    /// The list holds more entries than the cap.
    #[error("{len} entries above the cap {cap}")]
    OverCap {
        /// Entries.
        len: usize,
        /// Cap.
        cap: usize,
    },
    /// The checker could not allocate scratch memory.
    #[error("checker allocation failed")]
    Alloc,
}

/// Totals over the words checked by [`check_nested_rmaps`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NestedStats {
    /// Words checked.
    pub words: u64,
    /// Entries over all words.
    pub entries: u64,
    /// Nodes over all words (entries − non-empty words, by invariant 2).
    pub nodes: u64,
}

impl NestedStats {
    /// Bytes of words and nodes.
    pub fn bytes(&self) -> u64 {
        self.words * core::mem::size_of::<NestedRmap>() as u64
            + self.nodes * core::mem::size_of::<NestedNode>() as u64
    }
}

fn check_one(
    word: &NestedRmap,
    pool: &NestedPool,
    mut visit: impl FnMut(u32) -> Result<(), NestedCheckError>,
) -> Result<(usize, usize), NestedCheckError> {
    // ORDERING: Acquire: quiescent point; makes the last unlock's node writes visible.
    let raw = word.0.load(Ordering::Acquire);
    let val = NestedRmapVal(raw);
    if val.is_locked() {
        return Err(NestedCheckError::Locked(raw));
    }
    let mut entries: Vec<u64> = Vec::new();
    let mut nodes = 0usize;
    let mut cur = val;
    let mut first = true;
    loop {
        let link = cur
            .decode()
            .map_err(|_| NestedCheckError::BadLink(cur.bits()))?;
        match link {
            NestedLink::Empty if first => return Ok((0, 0)),
            NestedLink::Empty => return Err(NestedCheckError::BadLink(0)),
            NestedLink::Inline(e) => {
                entries
                    .try_reserve(1)
                    .map_err(|_| NestedCheckError::Alloc)?;
                entries.push(e.raw());
                break;
            }
            NestedLink::Node(idx) => {
                let node = pool
                    .node(idx)
                    .filter(|n| !n.is_vacant())
                    .ok_or(NestedCheckError::BadNode(idx.raw()))?;
                visit(idx.raw())?;
                if nodes as u64 > pool.capacity() {
                    return Err(NestedCheckError::SharedNode(idx.raw()));
                }
                let e = node.entry();
                if e & RMAP_NESTED_IS_SINGLE_ENTRY != 0 || NestedRmapEntry::from_raw(e).is_err() {
                    return Err(NestedCheckError::BadEntry {
                        idx: idx.raw(),
                        raw: e,
                    });
                }
                entries
                    .try_reserve(1)
                    .map_err(|_| NestedCheckError::Alloc)?;
                entries.push(e);
                nodes += 1;
                cur = node.next();
            }
        }
        first = false;
    }
    entries.sort_unstable();
    if let Some(w) = entries.windows(2).find(|w| w[0] == w[1]) {
        return Err(NestedCheckError::Duplicate(w[0]));
    }
    Ok((entries.len(), nodes))
}

/// Check invariants 1-3 of one word at a quiescent point; returns its entry count.
pub fn check_nested_rmap(word: &NestedRmap, pool: &NestedPool) -> Result<usize, NestedCheckError> {
    check_one(word, pool, |_| Ok(())).map(|(n, _)| n)
}

/// Check invariants 1-3 of every word, that no node is reachable twice across them,
/// and that no word holds more than `limits.cap()` entries. Quiescent points only.
pub fn check_nested_rmaps(
    words: &[NestedRmap],
    pool: &NestedPool,
    limits: &NestedLimits,
) -> Result<NestedStats, NestedCheckError> {
    let n = usize::try_from(pool.capacity().div_ceil(64)).map_err(|_| NestedCheckError::Alloc)?;
    let mut seen: Vec<u64> = Vec::new();
    seen.try_reserve_exact(n)
        .map_err(|_| NestedCheckError::Alloc)?;
    seen.resize(n, 0);
    let mut stats = NestedStats::default();
    for w in words {
        let (len, nodes) = check_one(w, pool, |idx| {
            let word = seen
                .get_mut((idx / 64) as usize)
                .ok_or(NestedCheckError::BadNode(idx))?;
            if *word & (1 << (idx % 64)) != 0 {
                return Err(NestedCheckError::SharedNode(idx));
            }
            *word |= 1 << (idx % 64);
            Ok(())
        })?;
        if len > limits.cap() {
            return Err(NestedCheckError::OverCap {
                len,
                cap: limits.cap(),
            });
        }
        stats.words += 1;
        stats.entries += len as u64;
        stats.nodes += nodes as u64;
    }
    Ok(stats)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn e(lpid: u16, frame: u64) -> NestedRmapEntry {
        NestedRmapEntry::new(Lpid(lpid), Gpa(frame << 12)).unwrap()
    }

    #[test]
    fn entry_layout_is_kvms() {
        let x = e(0xabc, 0x12_3456_789a);
        assert_eq!(x.raw(), 0xabc1_2345_6789_a000);
        assert_eq!(x.tagged(), 0xabc1_2345_6789_a001);
        assert_eq!(x.lpid(), Lpid(0xabc));
        assert_eq!(x.gpa(), Gpa(0x1_2345_6789_a000));
        assert_eq!(NestedRmapEntry::from_raw(x.tagged()), Ok(x));
        assert_eq!(
            NestedRmapEntry::new(Lpid(0), Gpa(0)),
            Err(NestedError::BadLpid(0))
        );
        assert_eq!(
            NestedRmapEntry::new(Lpid(0x1000), Gpa(0)),
            Err(NestedError::BadLpid(0x1000))
        );
        assert_eq!(
            NestedRmapEntry::new(Lpid(1), Gpa(0x1001)),
            Err(NestedError::BadGpa(0x1001))
        );
        assert_eq!(
            NestedRmapEntry::new(Lpid(1), Gpa(1 << 52)),
            Err(NestedError::BadGpa(1 << 52))
        );
        assert!(NestedRmapEntry::from_raw(0x0010_0000_0000_0002).is_err());
        assert!(NestedRmapEntry::from_raw(0x1000).is_err(), "LPID 0");
        let i = NodeIdx::new(7).unwrap();
        assert_eq!(NestedRmapVal::node(i).decode(), Ok(NestedLink::Node(i)));
        assert_eq!(
            NestedRmapVal::node(i).bits() & 0b11,
            0,
            "untagged, lock clear"
        );
    }

    #[test]
    fn insert_builds_the_kvm_list_shape_and_dedups() {
        let pool = NestedPool::new();
        let w = NestedRmap::new();
        let lim = NestedLimits::default();
        let mut c = NestedCache::new(&pool);
        c.reserve(8).unwrap();
        let mut g = w.lock();
        let r = g.insert(&mut c, e(1, 10), &lim, |_| true).unwrap();
        assert_eq!(r.inserted, Inserted::Inline);
        assert_eq!(g.val(), NestedRmapVal::inline(e(1, 10)));
        let r = g.insert(&mut c, e(1, 10), &lim, |_| true).unwrap();
        assert_eq!(r.inserted, Inserted::Duplicate);
        let r = g.insert(&mut c, e(2, 10), &lim, |_| true).unwrap();
        assert_eq!(r.inserted, Inserted::Linked);
        let NestedLink::Node(n) = g.val().decode().unwrap() else {
            panic!()
        };
        assert_eq!(
            pool.get(n).unwrap().next(),
            NestedRmapVal::inline(e(1, 10)),
            "old inline value became the tagged tail"
        );
        g.insert(&mut c, e(3, 11), &lim, |_| true).unwrap();
        assert_eq!(
            g.insert(&mut c, e(2, 10), &lim, |_| true).unwrap().inserted,
            Inserted::Duplicate
        );
        let got: Vec<_> = g.iter(&pool).collect();
        assert_eq!(got, vec![e(3, 11), e(2, 10), e(1, 10)]);
        drop(g);
        assert_eq!(check_nested_rmap(&w, &pool), Ok(3));
        assert_eq!(pool.check().unwrap().in_use, 2, "n entries, n-1 nodes");
    }

    #[test]
    fn retain_keeps_shape_for_every_subset() {
        // All subsets of a 5-entry list: the survivors, in order, with n-1 nodes.
        for mask in 0u32..32 {
            let pool = NestedPool::new();
            let w = NestedRmap::new();
            let lim = NestedLimits::default();
            let mut c = NestedCache::new(&pool);
            c.reserve(4).unwrap();
            let mut g = w.lock();
            for i in 0..5 {
                g.insert(&mut c, e(1, i), &lim, |_| true).unwrap();
            }
            let order: Vec<_> = g.iter(&pool).collect();
            let removed = g
                .retain(&pool, |x| mask & (1 << x.gpa().gfn().raw()) != 0)
                .unwrap();
            let want: Vec<_> = order
                .iter()
                .copied()
                .filter(|x| mask & (1 << x.gpa().gfn().raw()) != 0)
                .collect();
            assert_eq!(removed, 5 - want.len());
            assert_eq!(g.iter(&pool).collect::<Vec<_>>(), want, "mask {mask:#b}");
            drop(g);
            assert_eq!(check_nested_rmap(&w, &pool), Ok(want.len()));
            drop(c);
            assert_eq!(
                pool.check().unwrap().in_use as usize,
                want.len().saturating_sub(1)
            );
        }
    }

    #[test]
    fn detach_all_and_free() {
        let pool = NestedPool::new();
        let w = NestedRmap::new();
        let lim = NestedLimits::default();
        let mut c = NestedCache::new(&pool);
        c.reserve(10).unwrap();
        for i in 0..10 {
            w.lock().insert(&mut c, e(5, i), &lim, |_| true).unwrap();
        }
        let mut n = 0;
        assert_eq!(w.lock().update_all(&pool, |_| n += 1), 10);
        assert_eq!(n, 10);
        let d = w.detach_all(&pool);
        assert_eq!(w.load(), NestedRmapVal::EMPTY);
        assert_eq!(d.iter().count(), 10);
        assert_eq!(d.free(), Ok(10));
        assert_eq!(pool.check().unwrap().in_use, 0);
        w.lock().insert(&mut c, e(5, 1), &lim, |_| true).unwrap();
        w.lock().insert(&mut c, e(5, 2), &lim, |_| true).unwrap();
        drop(w.detach_all(&pool));
        assert_eq!(pool.check().unwrap().in_use, 0, "drop frees");
        assert_eq!(w.free(&pool), Ok(0));
    }

    #[test]
    fn insert_without_reservation_fails_cleanly() {
        let pool = NestedPool::new();
        let w = NestedRmap::new();
        let lim = NestedLimits::default();
        let mut c = NestedCache::new(&pool);
        let mut g = w.lock();
        g.insert(&mut c, e(1, 1), &lim, |_| true).unwrap();
        assert_eq!(
            g.insert(&mut c, e(1, 2), &lim, |_| true),
            Err(NestedError::from(RmapError::PoolExhausted))
        );
        assert_eq!(g.val(), NestedRmapVal::inline(e(1, 1)));
    }

    #[test]
    fn l1_remapping_many_l2_pages_to_one_gfn_stays_bounded() {
        // L1 maps 10 000 distinct L2 pages onto one L1 gfn over time; only the most
        // recent 10 are still valid (the rest were invalidated by L1 and went stale).
        let pool = NestedPool::new();
        let w = NestedRmap::new();
        let lim = NestedLimits::default();
        let mut c = NestedCache::new(&pool);
        let mut reclaimed = 0;
        for i in 0..10_000u64 {
            c.reserve(1).unwrap();
            let r = w
                .lock()
                .insert(&mut c, e(1 + (i % 7) as u16, i), &lim, |x| {
                    x.gpa().gfn().raw() + 10 > i
                })
                .unwrap();
            assert_ne!(r.inserted, Inserted::Duplicate);
            reclaimed += r.reclaimed;
            let n = check_nested_rmap(&w, &pool).unwrap();
            assert!(n <= lim.cap());
        }
        assert!(reclaimed > 9_000);
        drop(c);
        let st = check_nested_rmaps(core::slice::from_ref(&w), &pool, &lim).unwrap();
        assert!(st.bytes() as usize <= lim.max_bytes_per_gfn());
        assert_eq!(lim.max_bytes_per_gfn(), 1016);
        let ps = pool.check().unwrap();
        assert!(
            ps.capacity <= 2 * lim.cap() as u64,
            "pool stayed small: {ps:?}"
        );
        // If every entry is still valid, the insert is refused and nothing changes.
        let full = w.lock().len(&pool);
        let mut c = NestedCache::new(&pool);
        c.reserve(1).unwrap();
        for i in 0..(lim.cap() - full) as u64 {
            w.lock()
                .insert(&mut c, e(9, 100_000 + i), &lim, |_| true)
                .unwrap();
            c.reserve(1).unwrap();
        }
        assert_eq!(
            w.lock().insert(&mut c, e(9, 200_000), &lim, |_| true),
            Err(NestedError::ListFull { cap: 64 })
        );
        assert_eq!(check_nested_rmap(&w, &pool), Ok(64));
    }

    #[test]
    fn checker_catches_corruption() {
        let pool = NestedPool::new();
        let ws = NestedRmap::new_array(2).unwrap();
        let lim = NestedLimits::default();
        let mut c = NestedCache::new(&pool);
        c.reserve(3).unwrap();
        for i in 0..3 {
            ws[0]
                .lock()
                .insert(&mut c, e(1, i), &lim, |_| true)
                .unwrap();
        }
        assert_eq!(check_nested_rmaps(&ws, &pool, &lim).map(|s| s.nodes), Ok(2));
        let NestedLink::Node(n) = ws[0].load().decode().unwrap() else {
            panic!()
        };
        let node = pool.get(n).unwrap();
        // Duplicate entries.
        let saved = node.entry();
        node.set_entry(e(1, 0).raw());
        assert!(matches!(
            check_nested_rmap(&ws[0], &pool),
            Err(NestedCheckError::Duplicate(_))
        ));
        // A tagged value inside a node.
        node.set_entry(saved | 1);
        assert!(matches!(
            check_nested_rmap(&ws[0], &pool),
            Err(NestedCheckError::BadEntry { .. })
        ));
        node.set_entry(saved);
        // A null link where the tagged tail should be.
        let next = node.next();
        node.set_next(NestedRmapVal::EMPTY);
        assert_eq!(
            check_nested_rmap(&ws[0], &pool),
            Err(NestedCheckError::BadLink(0))
        );
        node.set_next(next);
        // Two words sharing nodes.
        ws[1].0.store(ws[0].load().bits(), Ordering::Relaxed);
        assert!(matches!(
            check_nested_rmaps(&ws, &pool, &lim),
            Err(NestedCheckError::SharedNode(_))
        ));
        ws[1].0.store(0, Ordering::Relaxed);
        assert_eq!(
            check_nested_rmaps(&ws, &pool, &NestedLimits::new(2).unwrap()),
            Err(NestedCheckError::OverCap { len: 3, cap: 2 })
        );
        assert_eq!(NestedLimits::new(0), Err(NestedError::BadCap));
    }
}
