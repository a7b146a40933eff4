//! The PPC Book3S HV reverse map: one rmap word per guest frame heading a ring of HPTE
//! indices threaded through the revmap array that sits beside the hashed page table.
//!
//! # Layout
//!
//! The rmap word ([`RmapWord`], modern KVM layout, LSB-0 bit numbers):
//!
//! | bits  | field | meaning |
//! |-------|-------|---------|
//! | 0-31  | `KVMPPC_RMAP_INDEX` | HPTE index of the chain head |
//! | 32    | `KVMPPC_RMAP_PRESENT` | the chain is non-empty (index 0 is a valid HPTE) |
//! | 39    | changed (`HPTE_R_C << 32`) | a C bit was harvested from an HPTE of this frame |
//! | 40    | `KVMPPC_RMAP_REFERENCED` (`HPTE_R_R << 32`) | an R bit was harvested |
//! | 43    | `KVMPPC_RMAP_LOCK_BIT` | bit lock over the word and the ring it heads |
//! | 56-63 | `KVMPPC_RMAP_TYPE_MASK` | 0, or `KVMPPC_RMAP_HPT` once a chain was populated |
//!
//! The revmap array ([`Revmap`]) has one 16-byte [`RevmapEntry`] per HPTE slot: the
//! guest's view of dword 1 (`guest_rpte`) and 32-bit `forw`/`back` links forming a
//! circular doubly linked ring of the HPTEs that map one frame. Links are 32-bit to save
//! space, so an HPT of more than 2^32 slots (order above 36) is rejected with
//! [`RmapError::TooManySlots`].
//!
//! # Locking
//!
//! * The ring headed by a word, and every bit of the word, change only while its lock
//!   bit (43) is held ([`Rmap::lock`] returns an [`RmapGuard`]).
//! * A revmap entry's `forw`/`back` change only under the rmap lock of the ring that
//!   contains it; its `guest_rpte` changes only under the lock of its HPTE.
//! * Lock order: HPTE lock, then rmap lock. Code that starts from an rmap (unmap, aging,
//!   dirty scan) must therefore never spin on an HPTE lock while holding the rmap lock. It
//!   try-locks the HPTE and, on failure, drops the rmap lock, waits read-only for the HPTE
//!   lock to clear and restarts from the head (KVM's restart rule in `kvm_unmap_rmapp` / `kvm_age_rmapp`). The
//!   walkers [`Rmap::drain_locked`] and [`Rmap::for_each_locked`] implement this rule
//!   over any [`HpteLocks`] implementation; nothing else in revmap walks from an rmap.
//!
//! # Invariants (checked by [`check_rmaps`])
//!
//! 1. Only layout bits are used; the lock bit is clear at rest; the type byte is 0 or
//!    `KVMPPC_RMAP_HPT`, and `KVMPPC_RMAP_HPT` whenever PRESENT is set.
//! 2. PRESENT ⇔ the ring is non-empty; when PRESENT is clear, INDEX is 0.
//! 3. (partly) INDEX < npte when PRESENT.
//! 5. Ring consistency: `rev[rev[i].forw].back == i`, `rev[rev[i].back].forw == i`, and
//!    following `forw` from the head returns to it after exactly k distinct steps.
//! 6. No index is on two rings or twice on one.
//!
//! Invariants that need the HPT itself (membership ⇔ VALID, gfn of the head) are checked
//! by the HPT crate's whole-VM checker, which calls [`Revmap::walk_ring`].
//!
//! # Memory
//!
//! Exactly 8 bytes per guest frame ([`Rmap`], [`RmapArray`]) plus 16 bytes per HPTE slot
//! ([`RevmapEntry`]); a further mapping of a frame costs nothing (pinned by const asserts
//! and by `tests/prop_ring.rs`).
//!
//! # Preconditions
//!
//! [`Revmap::link`] and [`Revmap::unlink`] index the revmap and panic on an index beyond
//! it, like slice indexing: the hypercall layer validates guest indices against npte
//! first. [`Revmap::try_link`] / [`Revmap::try_unlink`] return errors instead.

use crate::bitlock::BitLockGuard;
use crate::error::{try_boxed_slice, try_zeroed_boxed_slice, RmapError, Zeroable};
use crate::sync::{AtomicU32, AtomicU64, Ordering};
use alloc::boxed::Box;

/// HPTE index of the chain head (`KVMPPC_RMAP_INDEX`).
pub const RMAP_INDEX: u64 = 0xffff_ffff;
/// The chain is non-empty (`KVMPPC_RMAP_PRESENT`).
pub const RMAP_PRESENT: u64 = 1 << 32;
/// Shift from HPTE dword-1 R/C bits to their place in the rmap word (`KVMPPC_RMAP_RC_SHIFT`).
pub const RMAP_RC_SHIFT: u32 = 32;
/// HPTE dword-1 referenced bit (`HPTE_R_R`).
pub const HPTE_R_R: u64 = 0x100;
/// HPTE dword-1 changed bit (`HPTE_R_C`).
pub const HPTE_R_C: u64 = 0x80;
/// Changed bit of the rmap word (`HPTE_R_C << 32`).
pub const RMAP_CHANGED: u64 = HPTE_R_C << RMAP_RC_SHIFT;
/// Referenced bit of the rmap word (`KVMPPC_RMAP_REFERENCED`).
pub const RMAP_REFERENCED: u64 = HPTE_R_R << RMAP_RC_SHIFT;
/// Both R/C bits of the rmap word.
pub const RMAP_RC: u64 = RMAP_CHANGED | RMAP_REFERENCED;
/// Bit number of the rmap lock (`KVMPPC_RMAP_LOCK_BIT`).
pub const RMAP_LOCK_BIT: u32 = 43;
/// The rmap lock bit as a mask.
pub const RMAP_LOCK: u64 = 1 << RMAP_LOCK_BIT;
/// The type byte (`KVMPPC_RMAP_TYPE_MASK`).
pub const RMAP_TYPE_MASK: u64 = 0xff << 56;
/// Type of a word whose chain has been populated by an HPT guest (`KVMPPC_RMAP_HPT`).
pub const RMAP_TYPE_HPT: u64 = 0x01 << 56;
/// Type bits of a nested-guest rmap pointer (`KVMPPC_RMAP_NESTED`).
pub const RMAP_TYPE_NESTED: u64 = 0xc0 << 56;
/// Every bit an HPT guest's rmap word may use.
pub const RMAP_LAYOUT: u64 = RMAP_INDEX | RMAP_PRESENT | RMAP_RC | RMAP_LOCK | RMAP_TYPE_MASK;

const _: () = assert!(RMAP_CHANGED == 1 << 39);
const _: () = assert!(RMAP_REFERENCED == 1 << 40);
// The memory contract (8 bytes per frame, 16 per HPTE slot) holds for real atomics;
// loom's and shuttle's instrumented atomics are larger.
#[cfg(not(any(loom, shuttle)))]
const _: () = assert!(core::mem::size_of::<RevmapEntry>() == 16);
#[cfg(not(any(loom, shuttle)))]
const _: () = assert!(core::mem::size_of::<Rmap>() == 8);

/// Largest number of HPTE slots 32-bit links can index (HPT order 36).
pub const MAX_NPTE: u64 = 1 << 32;

/// A snapshot of an rmap word, with typed accessors for its fields.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct RmapWord(pub u64);

impl RmapWord {
    /// The empty word.
    pub const EMPTY: Self = Self(0);

    /// The raw 64-bit value.
    #[inline(always)]
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// The head index, if the chain is non-empty.
    #[inline(always)]
    pub const fn head(self) -> Option<u32> {
        if self.is_present() {
            Some(self.0 as u32)
        } else {
            None
        }
    }
    /// Raw INDEX field (meaningful only when PRESENT).
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self.0 as u32
    }
    /// PRESENT: the chain is non-empty.
    #[inline(always)]
    pub const fn is_present(self) -> bool {
        self.0 & RMAP_PRESENT != 0
    }
    /// Referenced bit.
    #[inline(always)]
    pub const fn referenced(self) -> bool {
        self.0 & RMAP_REFERENCED != 0
    }
    /// Changed bit.
    #[inline(always)]
    pub const fn changed(self) -> bool {
        self.0 & RMAP_CHANGED != 0
    }
    /// The R/C bits in HPTE dword-1 position (`HPTE_R_R | HPTE_R_C` subset).
    #[inline(always)]
    pub const fn rc(self) -> u64 {
        (self.0 & RMAP_RC) >> RMAP_RC_SHIFT
    }
    /// Lock bit.
    #[inline(always)]
    pub const fn is_locked(self) -> bool {
        self.0 & RMAP_LOCK != 0
    }
    /// The type byte (bits 56-63).
    #[inline(always)]
    pub const fn kind(self) -> u64 {
        self.0 & RMAP_TYPE_MASK
    }
}

impl core::fmt::Debug for RmapWord {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RmapWord")
            .field("raw", &format_args!("{:#018x}", self.0))
            .field("head", &self.head())
            .field("R", &self.referenced())
            .field("C", &self.changed())
            .field("locked", &self.is_locked())
            .field("type", &format_args!("{:#x}", self.kind() >> 56))
            .finish()
    }
}

/// One guest frame's rmap word (`memslot->arch.rmap[i]`): an `AtomicU64` with bit 43 as
/// its lock.
#[repr(transparent)]
#[derive(Debug)]
pub struct Rmap(AtomicU64);

// SAFETY: `Rmap` is a `repr(transparent)` `AtomicU64`, which is `Zeroable`; the
// all-zero word is the empty word `Rmap::new()`.
unsafe impl Zeroable for Rmap {
    fn zero() -> Self {
        Self::new()
    }
}

impl Default for Rmap {
    fn default() -> Self {
        Self::new()
    }
}

/// Fault every page of `words` in for writing without changing any word
/// ([`RmapArray::populate`], for arrays held elsewhere, e.g. by a memslot).
pub fn populate_rmaps(words: &[Rmap]) {
    for w in words.iter().step_by(touch_stride::<Rmap>()) {
        w.touch();
    }
}

/// Zero `words` through exclusive access, writing only the 256-byte blocks that hold a
/// non-zero word ([`zero_nonzero_blocks`](crate::error::zero_nonzero_blocks)): a
/// reused rmap array of a slot whose guest mapped a small part costs one read pass.
#[cfg(not(any(loom, shuttle)))]
pub fn zero_rmaps(words: &mut [Rmap]) {
    let n = words.len();
    let p = words.as_mut_ptr().cast::<u64>();
    // SAFETY: `Rmap` is a `repr(transparent)` `AtomicU64`, which has the in-memory
    // representation of `u64`, so the array is `n` initialised, aligned `u64`s; `&mut`
    // gives exclusive access for the slice's lifetime, and 0 is the empty word
    // (`Zeroable`).
    let w = unsafe { core::slice::from_raw_parts_mut(p, n) };
    crate::error::zero_nonzero_blocks(w);
}

impl Rmap {
    /// An empty word.
    #[inline]
    pub fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Allocate `n` empty words (zeroed memory), failing cleanly if memory is short.
    pub fn new_array(n: usize) -> Result<Box<[Rmap]>, RmapError> {
        try_zeroed_boxed_slice(n)
    }

    /// Fault the word's page in for writing without changing the word: an atomic OR of
    /// 0, harmless concurrently with any other access ([`RmapArray::populate`]).
    #[inline]
    pub fn touch(&self) {
        touch_word(&self.0);
    }

    /// A lock-free snapshot of the word.
    #[inline]
    pub fn load(&self) -> RmapWord {
        // ORDERING: Acquire, so that a snapshot showing PRESENT also shows the ring links
        // written before the unlock that published it (used by lock-free statistics and
        // by the checker at quiescent points).
        RmapWord(self.0.load(Ordering::Acquire))
    }

    /// Spin until the lock is held (`lock_rmap`).
    #[inline]
    pub fn lock(&self) -> RmapGuard<'_> {
        RmapGuard(BitLockGuard::lock(&self.0, RMAP_LOCK))
    }

    /// Take the lock if it is free, in one attempt.
    #[inline]
    pub fn try_lock(&self) -> Option<RmapGuard<'_>> {
        BitLockGuard::try_lock(&self.0, RMAP_LOCK, RMAP_LOCK).map(RmapGuard)
    }

    /// Reset to 0 through exclusive access (rmap reset at HPT reallocation, slot flush).
    /// R/C history is lost, as in KVM's `kvmppc_rmap_reset`.
    #[inline]
    pub fn reset(&mut self) {
        *self = Rmap::new();
    }

    /// Reset to 0 through shared access: take the lock and unlock with the word 0.
    /// Returns the word it held. R/C history and the ring are dropped (the ring's
    /// entries keep stale links, harmless because nothing points to them; see
    /// [`Revmap::reset_links`]). This is `kvmppc_rmap_reset` for one word, safe to run
    /// while other threads hold references to the array.
    #[inline]
    pub fn clear(&self) -> RmapWord {
        let mut g = self.lock();
        let old = g.word();
        g.set_word(RmapWord::EMPTY);
        old
    }

    /// Walk the ring, removing every member under its HPTE lock (unmap, slot flush,
    /// resize), obeying the restart rule.
    ///
    /// For each head `ptex` whose HPTE lock could be taken, the entry is unlinked and
    /// `f(rmap_guard, ptex, hpte_guard)` is called with both locks held; `f` invalidates
    /// the HPTE and harvests R/C. When a try-lock fails, the rmap lock is dropped, the
    /// walker waits read-only for the HPTE lock to clear and restarts from the head.
    /// Returns the number of entries removed.
    ///
    /// The HPTE guard's lifetime is that of the `locks` borrow, so `H` may itself borrow
    /// (a view of an HPT, a test wrapper); it need not be `'static`.
    pub fn drain_locked<'l, H, F>(&self, revmap: &Revmap, locks: &'l H, mut f: F) -> usize
    where
        H: HpteLocks + ?Sized + 'l,
        F: FnMut(&mut RmapGuard<'_>, u32, H::Guard<'l>),
    {
        let mut removed = 0;
        loop {
            let mut g = self.lock();
            let Some(head) = g.word().head() else {
                return removed;
            };
            match locks.try_lock_hpte(head) {
                Some(h) => {
                    revmap.unlink(&mut g, head);
                    f(&mut g, head, h);
                    removed += 1;
                }
                None => {
                    drop(g);
                    locks.wait_hpte_unlocked(head);
                }
            }
        }
    }

    /// Visit every member of the ring under its HPTE lock (aging, dirty scan), obeying
    /// the restart rule: on a failed HPTE try-lock the rmap lock is dropped, the walker
    /// waits read-only and restarts from the head, so `f` may see a member more than
    /// once and must be idempotent. `f` must not unlink members; it may return
    /// [`Visit::Stop`] to end the walk early.
    pub fn for_each_locked<'l, H, F>(&self, revmap: &Revmap, locks: &'l H, mut f: F)
    where
        H: HpteLocks + ?Sized + 'l,
        F: FnMut(&mut RmapGuard<'_>, u32, &mut H::Guard<'l>) -> Visit,
    {
        'restart: loop {
            let mut g = self.lock();
            let Some(head) = g.word().head() else {
                return;
            };
            let mut j = head;
            let mut steps: u64 = 0;
            loop {
                let next = revmap.forw(j);
                match locks.try_lock_hpte(j) {
                    Some(mut h) => {
                        if f(&mut g, j, &mut h) == Visit::Stop {
                            return;
                        }
                    }
                    None => {
                        drop(g);
                        locks.wait_hpte_unlocked(j);
                        continue 'restart;
                    }
                }
                j = next;
                steps += 1;
                if j == head || steps >= revmap.len() as u64 {
                    return;
                }
            }
        }
    }
}

/// Write `w`'s page without changing `w` (the `populate` walks): a compare-exchange of
/// its value with itself. (An idempotent RMW such as `fetch_or(0)` may be compiled to
/// a plain load, which maps a zeroed page read-only and leaves the write fault for
/// later.) Safe concurrently with any other access, locks included: it never changes
/// the value, and a failed exchange means another writer wrote the page.
#[inline]
pub fn touch_word(w: &AtomicU64) {
    // ORDERING: Relaxed: no value changes; only the page is written.
    let v = w.load(Ordering::Relaxed);
    // ORDERING: Relaxed: as above.
    let _ = w.compare_exchange(v, v, Ordering::Relaxed, Ordering::Relaxed);
}

/// Elements of `T` per 4 KiB page: the stride of the `populate` walks (at least 1).
#[inline]
pub const fn touch_stride<T>() -> usize {
    let s = core::mem::size_of::<T>();
    if s == 0 || s >= 4096 {
        1
    } else {
        4096 / s
    }
}

/// The rmap words of one memslot (`memslot->arch.rmap`): one [`Rmap`] per 4 KiB guest
/// frame, indexed by the frame's offset in the slot. Exactly 8 bytes per frame.
///
/// It dereferences to `[Rmap]`, so `check_rmaps(array.iter(), ..)` and indexing work.
#[derive(Debug)]
pub struct RmapArray {
    words: Box<[Rmap]>,
}

impl RmapArray {
    /// `npages` empty words, failing cleanly (no abort) if memory is short or the count
    /// does not fit the address space.
    pub fn new(npages: u64) -> Result<Self, RmapError> {
        let n = usize::try_from(npages).map_err(|_| RmapError::Alloc { bytes: usize::MAX })?;
        Ok(Self {
            words: Rmap::new_array(n)?,
        })
    }

    /// The word of the frame at offset `index` in the slot.
    #[inline]
    pub fn get(&self, index: u64) -> Result<&Rmap, RmapError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.words.get(i))
            .ok_or(RmapError::OutOfRange {
                index,
                len: self.words.len() as u64,
            })
    }

    /// Fault every page of the words in for writing without changing any (see
    /// [`Revmap::populate`]). Safe concurrently with any rmap operation.
    pub fn populate(&self) {
        populate_rmaps(&self.words);
    }

    /// Zero every word through shared access (`kvmppc_rmap_reset`); R/C history is lost.
    pub fn reset(&self) {
        for r in self.words.iter() {
            r.clear();
        }
    }

    /// Check invariants 1, 2, 3 (bound), 5 and 6 over this slot's words (see
    /// [`check_rmaps`]).
    pub fn check(&self, revmap: &Revmap) -> Result<RingStats, RmapViolation> {
        check_rmaps(self.words.iter(), revmap, |_, _| Ok(()))
    }

    /// Bytes of memory held by the words: exactly 8 per frame.
    #[inline]
    pub fn bytes(&self) -> usize {
        core::mem::size_of_val::<[Rmap]>(&self.words)
    }
}

impl core::ops::Deref for RmapArray {
    type Target = [Rmap];
    #[inline]
    fn deref(&self) -> &[Rmap] {
        &self.words
    }
}

/// What a [`Rmap::for_each_locked`] visitor wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    /// Go on to the next member.
    Continue,
    /// End the walk.
    Stop,
}

/// Per-HPTE locks, as seen by walkers that start from an rmap.
///
/// Implemented by the hashed page table (HVLOCK in dword 0). The walkers only ever
/// *try* an HPTE lock while holding an rmap lock, never spin on it.
pub trait HpteLocks {
    /// A held HPTE lock; dropping it unlocks.
    type Guard<'a>
    where
        Self: 'a;
    /// Try once to lock HPTE `ptex`.
    fn try_lock_hpte(&self, ptex: u32) -> Option<Self::Guard<'_>>;
    /// Busy-wait, read-only, until HPTE `ptex` is unlocked.
    fn wait_hpte_unlocked(&self, ptex: u32);
}

/// HVLOCK, the KVM software lock bit of HPTE dword 0 (`HPTE_V_HVLOCK`).
pub const HPTE_V_HVLOCK: u64 = 0x40;

/// A standalone table of HPTE lock words (HVLOCK in bit 6 of each), implementing
/// [`HpteLocks`] for users that keep the HPTE locks apart from an HPT: model-checking
/// tests, property tests and benchmarks of the ring. The hashed page table implements
/// [`HpteLocks`] over its own dword 0 instead.
#[derive(Debug)]
pub struct HpteLockArray {
    words: Box<[AtomicU64]>,
}

impl HpteLockArray {
    /// `npte` unlocked words, failing cleanly if memory is short.
    pub fn new(npte: usize) -> Result<Self, RmapError> {
        Ok(Self {
            words: try_zeroed_boxed_slice(npte)?,
        })
    }

    /// Spin until HPTE `ptex`'s lock is held (as hypercalls do: the HPTE lock is the
    /// outer one). `None` if `ptex` is beyond the table.
    #[inline]
    pub fn lock_hpte(&self, ptex: u32) -> Option<BitLockGuard<'_>> {
        self.words
            .get(ptex as usize)
            .map(|w| BitLockGuard::lock(w, HPTE_V_HVLOCK))
    }

    /// Number of HPTE lock words.
    #[inline]
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// True if the table has no words.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
}

impl HpteLocks for HpteLockArray {
    type Guard<'a> = BitLockGuard<'a>;

    #[inline]
    fn try_lock_hpte(&self, ptex: u32) -> Option<BitLockGuard<'_>> {
        self.words
            .get(ptex as usize)
            .and_then(|w| BitLockGuard::try_lock(w, HPTE_V_HVLOCK, HPTE_V_HVLOCK))
    }

    #[inline]
    fn wait_hpte_unlocked(&self, ptex: u32) {
        if let Some(w) = self.words.get(ptex as usize) {
            crate::bitlock::wait_unlocked(w, HPTE_V_HVLOCK);
        }
    }
}

/// A held rmap lock. Edits are made to a cached copy of the word and published by the
/// `Release` store that unlocks (on drop).
#[must_use = "dropping the guard unlocks immediately"]
#[derive(Debug)]
pub struct RmapGuard<'a>(BitLockGuard<'a>);

impl RmapGuard<'_> {
    /// The word as it will be stored at unlock.
    #[inline(always)]
    pub fn word(&self) -> RmapWord {
        RmapWord(self.0.value())
    }

    /// Replace the whole word. The lock bit is ignored.
    #[inline(always)]
    pub fn set_word(&mut self, w: RmapWord) {
        self.0.set(w.0);
    }

    /// OR HPTE-position R/C bits (`HPTE_R_R`/`HPTE_R_C`) into the word (a harvest).
    #[inline(always)]
    pub fn add_rc(&mut self, hpte_rc: u64) {
        let v = self.0.value() | ((hpte_rc & (HPTE_R_R | HPTE_R_C)) << RMAP_RC_SHIFT);
        self.0.set(v);
    }

    /// Clear the given HPTE-position R/C bits and return which of them were set.
    #[inline(always)]
    pub fn take_rc(&mut self, hpte_rc: u64) -> u64 {
        let mask = (hpte_rc & (HPTE_R_R | HPTE_R_C)) << RMAP_RC_SHIFT;
        let v = self.0.value();
        self.0.set(v & !mask);
        (v & mask) >> RMAP_RC_SHIFT
    }
}

/// One revmap entry per HPTE slot (`struct revmap_entry`): 16 bytes.
///
/// `guest_rpte` is the guest's view of HPTE dword 1, with harvested R/C ORed in; it is
/// written only under the HPTE lock. `forw`/`back` are ring links, written only under
/// the rmap lock of the ring holding the entry. All three are atomics accessed
/// `Relaxed`: the locks provide the ordering, the atomics only make concurrent access
/// well-defined (they compile to plain loads and stores).
///
/// The links are stored XORed with the entry's own index, so that the all-zero entry
/// is the off-ring one (links to itself): a revmap is allocated zeroed
/// ([`Zeroable`]), with no pass over its entries.
#[derive(Debug)]
pub struct RevmapEntry {
    guest_rpte: AtomicU64,
    forw: AtomicU32,
    back: AtomicU32,
}

// SAFETY: the three fields are `Zeroable` atomics, so the all-zero bytes are a valid
// entry: `guest_rpte` 0 and both links (stored XORed with the index) to itself.
unsafe impl Zeroable for RevmapEntry {
    fn zero() -> Self {
        Self {
            guest_rpte: AtomicU64::new(0),
            forw: AtomicU32::new(0),
            back: AtomicU32::new(0),
        }
    }
}

// `Revmap::clear` reads entries as pairs of `u64`: 16 bytes, 8-aligned, no padding.
#[cfg(not(any(loom, shuttle)))]
const _: () = assert!(
    core::mem::size_of::<RevmapEntry>() == 16
        && core::mem::align_of::<RevmapEntry>() == 8
        && core::mem::size_of::<AtomicU64>() + 2 * core::mem::size_of::<AtomicU32>() == 16
);

/// The revmap array beside an HPT (`kvm->arch.hpt.rev`).
#[derive(Debug)]
pub struct Revmap {
    entries: Box<[RevmapEntry]>,
}

impl Revmap {
    /// A revmap for `npte` HPTE slots. Fails with [`RmapError::TooManySlots`] above 2^32
    /// slots (32-bit links) and with [`RmapError::Alloc`] if memory is short.
    pub fn new(npte: u64) -> Result<Self, RmapError> {
        if npte > MAX_NPTE {
            return Err(RmapError::TooManySlots { npte });
        }
        let n = usize::try_from(npte).map_err(|_| RmapError::TooManySlots { npte })?;
        Ok(Self {
            entries: try_zeroed_boxed_slice(n)?,
        })
    }

    /// A revmap for an HPT of `order` (2^order bytes, 2^(order-4) slots).
    pub fn for_hpt_order(order: u32) -> Result<Self, RmapError> {
        if !(4..=62).contains(&order) {
            return Err(RmapError::TooManySlots { npte: u64::MAX });
        }
        Self::new(1u64 << (order - 4))
    }

    /// Number of slots.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Move the entries out, leaving an empty revmap behind (a table pool keeps the
    /// array for reuse when its table is dropped).
    pub fn take(&mut self) -> Revmap {
        Revmap {
            entries: core::mem::take(&mut self.entries),
        }
    }

    /// Reset every entry to the all-zero (off-ring, `guest_rpte` 0) state, writing only
    /// the 256-byte blocks that hold a non-zero entry
    /// ([`zero_nonzero_blocks`](crate::error::zero_nonzero_blocks)): a reused revmap of a
    /// mostly empty table costs one read pass, no page fault and few writes.
    #[cfg(not(any(loom, shuttle)))]
    pub fn clear(&mut self) {
        let n = self.entries.len() * (core::mem::size_of::<RevmapEntry>() / 8);
        let p = self.entries.as_mut_ptr().cast::<u64>();
        // SAFETY: `RevmapEntry` is 16 bytes of an `AtomicU64` and two `AtomicU32`
        // (const-asserted below: no padding), each with the in-memory representation of
        // its integer, so the array is `n` initialised, 8-aligned `u64`s; `&mut self`
        // gives exclusive access for the slice's lifetime, and all-zero words are the
        // off-ring entry (`Zeroable`).
        let words = unsafe { core::slice::from_raw_parts_mut(p, n) };
        crate::error::zero_nonzero_blocks(words);
    }

    /// True if the revmap has no slots.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    #[inline(always)]
    fn e(&self, i: u32) -> &RevmapEntry {
        &self.entries[i as usize]
    }

    /// The guest view of dword 1 of HPTE `i`. Read under the HPTE lock for a stable value.
    #[inline(always)]
    pub fn guest_rpte(&self, i: u32) -> u64 {
        // ORDERING: Relaxed; the HPTE lock orders it (see the type docs).
        self.e(i).guest_rpte.load(Ordering::Relaxed)
    }

    /// Set the guest view of dword 1 of HPTE `i`. Caller holds the HPTE lock.
    #[inline(always)]
    pub fn set_guest_rpte(&self, i: u32, v: u64) {
        // ORDERING: Relaxed; published by the HPTE unlock's Release store.
        self.e(i).guest_rpte.store(v, Ordering::Relaxed);
    }

    /// Forward link of entry `i` (meaningful while `i` is on a ring).
    #[inline(always)]
    pub fn forw(&self, i: u32) -> u32 {
        // ORDERING: Relaxed; rings are read under their rmap lock.
        self.e(i).forw.load(Ordering::Relaxed) ^ i
    }

    /// Backward link of entry `i` (meaningful while `i` is on a ring).
    #[inline(always)]
    pub fn back(&self, i: u32) -> u32 {
        // ORDERING: Relaxed; rings are read under their rmap lock.
        self.e(i).back.load(Ordering::Relaxed) ^ i
    }

    #[inline(always)]
    fn set_forw(&self, i: u32, v: u32) {
        // ORDERING: Relaxed; published by the rmap unlock's Release store.
        self.e(i).forw.store(v ^ i, Ordering::Relaxed);
    }

    #[inline(always)]
    fn set_back(&self, i: u32, v: u32) {
        // ORDERING: Relaxed; published by the rmap unlock's Release store.
        self.e(i).back.store(v ^ i, Ordering::Relaxed);
    }

    /// Link HPTE `ptex` into the ring headed by the locked word, at the tail (before the
    /// head), and unlock (`kvmppc_add_revmap_chain`, whose asymmetric contract "always
    /// unlocks the rmap" is expressed by consuming the guard).
    ///
    /// An empty word becomes `ptex | PRESENT | KVMPPC_RMAP_HPT` with its R/C kept.
    /// Returns the word as stored at unlock. The caller holds HPTE `ptex`'s lock and
    /// `ptex` is on no ring. O(1).
    ///
    /// # Panics
    ///
    /// If `ptex >= self.len()` (callers validate guest indices against npte first;
    /// [`try_link`](Self::try_link) returns an error instead).
    #[inline]
    pub fn link(&self, g: RmapGuard<'_>, ptex: u32) -> RmapWord {
        self.link_inner(g, ptex)
    }

    /// [`link`](Self::link) with the index checked: returns [`RmapError::OutOfRange`]
    /// (having unlocked the word unchanged: the guard is consumed either way) if `ptex`
    /// is beyond the table.
    #[inline]
    pub fn try_link(&self, g: RmapGuard<'_>, ptex: u32) -> Result<RmapWord, RmapError> {
        self.check_ptex(ptex)?;
        Ok(self.link_inner(g, ptex))
    }

    #[inline(always)]
    fn link_inner(&self, mut g: RmapGuard<'_>, ptex: u32) -> RmapWord {
        let w = g.word();
        match w.head() {
            Some(head) => {
                let tail = self.back(head);
                self.set_forw(ptex, head);
                self.set_back(ptex, tail);
                self.set_forw(tail, ptex);
                self.set_back(head, ptex);
            }
            None => {
                self.set_forw(ptex, ptex);
                self.set_back(ptex, ptex);
                g.set_word(RmapWord(
                    (w.0 & !(RMAP_INDEX | RMAP_TYPE_MASK))
                        | u64::from(ptex)
                        | RMAP_PRESENT
                        | RMAP_TYPE_HPT,
                ));
            }
        }
        g.word()
    }

    /// Unlink HPTE `ptex` from the ring headed by the locked word (the splice of
    /// `remove_revmap_chain` and `kvmppc_unmap_hpte`). If it was the head, the head moves
    /// to its successor; if it was the only member, PRESENT and INDEX are cleared (R/C and
    /// the type byte are kept). The removed entry's links are reset to itself. O(1).
    ///
    /// The caller holds the rmap lock (`g`) and `ptex` is on this ring. Two cheap
    /// violations of that precondition are detected and make the call a no-op instead of
    /// corrupting the ring: an empty word, and an entry whose links point to itself while
    /// it is not the head (an entry already unlinked: a double unlink must not clear
    /// somebody else's chain). [`try_unlink`](Self::try_unlink) reports them.
    ///
    /// # Panics
    ///
    /// If `ptex >= self.len()` (callers validate guest indices against npte first;
    /// [`try_unlink`](Self::try_unlink) returns an error instead).
    #[inline]
    pub fn unlink(&self, g: &mut RmapGuard<'_>, ptex: u32) {
        self.unlink_inner(g, ptex);
    }

    /// [`unlink`](Self::unlink) with the precondition checked: returns
    /// [`RmapError::OutOfRange`] if `ptex` is beyond the table, `Ok(false)` (and changes
    /// nothing) if the word is empty or `ptex` is evidently not a ring member, `Ok(true)`
    /// once unlinked.
    #[inline]
    pub fn try_unlink(&self, g: &mut RmapGuard<'_>, ptex: u32) -> Result<bool, RmapError> {
        self.check_ptex(ptex)?;
        Ok(self.unlink_inner(g, ptex))
    }

    #[inline(always)]
    fn unlink_inner(&self, g: &mut RmapGuard<'_>, ptex: u32) -> bool {
        let w = g.word();
        let Some(head) = w.head() else {
            return false;
        };
        let next = self.forw(ptex);
        if next == ptex {
            if head != ptex {
                // Off-ring (links reset to itself) and not our head: not a member.
                return false;
            }
            g.set_word(RmapWord(w.0 & !(RMAP_INDEX | RMAP_PRESENT)));
        } else {
            let prev = self.back(ptex);
            self.set_back(next, prev);
            self.set_forw(prev, next);
            if head == ptex {
                g.set_word(RmapWord((w.0 & !RMAP_INDEX) | u64::from(next)));
            }
            self.set_forw(ptex, ptex);
            self.set_back(ptex, ptex);
        }
        true
    }

    /// `Ok(())` if `ptex` indexes a slot of this revmap.
    #[inline]
    pub fn check_ptex(&self, ptex: u32) -> Result<(), RmapError> {
        if (ptex as usize) < self.entries.len() {
            Ok(())
        } else {
            Err(RmapError::OutOfRange {
                index: u64::from(ptex),
                len: self.entries.len() as u64,
            })
        }
    }

    /// Reset every entry's links to itself (`guest_rpte` is kept), as after an HPT reset
    /// or reallocation at the same order, when every rmap word of every memslot is zeroed
    /// too (KVM's `kvmppc_rmap_reset` on HPT reset: a ring whose words were reset but
    /// whose links were not is harmless, the reverse is not; resetting both leaves no trace).
    ///
    /// Call only at a quiescent point: no ring operation may run concurrently (KVM holds
    /// `mmu_setup_lock` with `mmu_ready == 0`); that exclusion also orders these stores.
    pub fn reset_links(&self) {
        for e in self.entries.iter() {
            // ORDERING: Relaxed; the caller's quiescence mechanism (a mutex, a join)
            // publishes the reset to the next user. (0: the link to itself.)
            e.forw.store(0, Ordering::Relaxed);
            // ORDERING: Relaxed; as above.
            e.back.store(0, Ordering::Relaxed);
        }
    }

    /// Fault every page of the revmap in for writing without changing any entry (an
    /// atomic OR of 0 into one entry per 4 KiB), so that the first hypercalls do not
    /// pay the first-touch page faults of the zeroed allocation: what a hypervisor that
    /// takes its tables from an already-mapped pool gets (KVM's HPTs come from a
    /// reserved CMA area). Safe concurrently with any ring operation.
    pub fn populate(&self) {
        for e in self.entries.iter().step_by(touch_stride::<RevmapEntry>()) {
            touch_word(&e.guest_rpte);
        }
    }

    /// Bytes of memory held by this revmap: exactly 16 per HPTE slot.
    #[inline]
    pub fn bytes(&self) -> usize {
        core::mem::size_of_val::<[RevmapEntry]>(&self.entries)
    }

    /// Iterate the members of the ring headed by the locked word, from the head.
    #[inline]
    pub fn iter<'a>(&'a self, g: &RmapGuard<'_>) -> RingIter<'a> {
        RingIter::new(self, g.word())
    }

    /// Number of members of the ring headed by the locked word. O(length).
    pub fn chain_len(&self, g: &RmapGuard<'_>) -> usize {
        self.iter(g).count()
    }

    /// Walk the ring headed by `word` (a snapshot taken at a quiescent point, or under
    /// the lock), checking invariants 2, 3 (index bound) and 5, and calling `visit` on
    /// each member. Returns the chain length.
    pub fn walk_ring(
        &self,
        word: RmapWord,
        mut visit: impl FnMut(u32),
    ) -> Result<usize, RmapViolation> {
        let npte = self.len() as u64;
        let Some(head) = word.head() else {
            if word.index() != 0 {
                return Err(RmapViolation::IndexWithoutPresent { word });
            }
            return Ok(0);
        };
        if u64::from(head) >= npte {
            return Err(RmapViolation::HeadOutOfRange { word, npte });
        }
        let mut j = head;
        let mut k: u64 = 0;
        loop {
            let f = self.forw(j);
            let b = self.back(j);
            if u64::from(f) >= npte || u64::from(b) >= npte {
                return Err(RmapViolation::LinkOutOfRange {
                    ptex: j,
                    forw: f,
                    back: b,
                });
            }
            if self.back(f) != j || self.forw(b) != j {
                return Err(RmapViolation::BrokenLinks { ptex: j });
            }
            visit(j);
            k += 1;
            j = f;
            if j == head {
                return Ok(k as usize);
            }
            if k >= npte {
                return Err(RmapViolation::RingDoesNotClose { head });
            }
        }
    }
}

/// Iterator over the members of one ring (see [`Revmap::iter`]).
#[derive(Debug, Clone)]
pub struct RingIter<'a> {
    revmap: &'a Revmap,
    head: u32,
    next: Option<u32>,
    left: usize,
}

impl<'a> RingIter<'a> {
    /// Iterate the ring headed by `word`, bounded by the revmap length.
    pub fn new(revmap: &'a Revmap, word: RmapWord) -> Self {
        let head = word.index();
        Self {
            revmap,
            head,
            next: word.head(),
            left: revmap.len(),
        }
    }
}

impl Iterator for RingIter<'_> {
    type Item = u32;
    #[inline]
    fn next(&mut self) -> Option<u32> {
        let cur = self.next?;
        if self.left == 0 {
            self.next = None;
            return None;
        }
        self.left -= 1;
        let f = self.revmap.forw(cur);
        self.next = if f == self.head { None } else { Some(f) };
        Some(cur)
    }
}

/// A broken invariant of the rmap words or revmap rings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RmapViolation {
    /// Invariant 1: a bit outside the layout, a type byte other than 0/HPT, or the lock
    /// held at rest.
    #[error("frame {frame}: rmap word {word:?} uses bits outside the layout or is locked at rest")]
    BadLayout {
        /// Index of the frame in its array.
        frame: usize,
        /// The word.
        word: RmapWord,
    },
    /// Invariant 2: INDEX set while PRESENT is clear.
    #[error("rmap word {word:?} has INDEX without PRESENT")]
    IndexWithoutPresent {
        /// The word.
        word: RmapWord,
    },
    /// Invariant 3: head index beyond the table.
    #[error("rmap word {word:?} heads index beyond npte {npte}")]
    HeadOutOfRange {
        /// The word.
        word: RmapWord,
        /// Number of HPTE slots.
        npte: u64,
    },
    /// A link points beyond the table.
    #[error("revmap entry {ptex} links out of range (forw {forw}, back {back})")]
    LinkOutOfRange {
        /// The entry.
        ptex: u32,
        /// Its forward link.
        forw: u32,
        /// Its backward link.
        back: u32,
    },
    /// Invariant 5: `rev[rev[i].forw].back != i` or `rev[rev[i].back].forw != i`.
    #[error("revmap entry {ptex}: forw/back links disagree")]
    BrokenLinks {
        /// The entry.
        ptex: u32,
    },
    /// Invariant 5: following `forw` does not return to the head within npte steps.
    #[error("ring headed by {head} does not close")]
    RingDoesNotClose {
        /// The head.
        head: u32,
    },
    /// Invariant 6: an index is on two rings, or twice on one.
    #[error("HPTE {ptex} is on more than one ring position")]
    DuplicateMember {
        /// The entry.
        ptex: u32,
    },
    /// The checker could not allocate its bitmap.
    #[error("checker allocation of {bytes} bytes failed")]
    Alloc {
        /// How many bytes were requested.
        bytes: usize,
    },
}

/// Summary of a successful [`check_rmaps`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Number of non-empty chains.
    pub chains: usize,
    /// Sum of all chain lengths.
    pub members: usize,
    /// Longest chain.
    pub longest: usize,
}

/// Check invariants 1, 2, 3 (bound), 5 and 6 over a set of rmap words sharing one
/// revmap, at a quiescent point (no lock held). `on_member(frame_index, ptex)` is called
/// for each chain member so that callers can check HPT-level invariants too.
///
/// Invariant 1 here also requires a PRESENT word to carry the type `KVMPPC_RMAP_HPT`
/// (only [`Revmap::link`] sets PRESENT, and it always sets the type). Every chain walk is
/// bounded by npte steps, so a corrupted ring cannot hang the checker (e.g. an HPTE relinked into a second
/// chain after an HPT reset without an rmap reset).
/// The only allocation is a bitmap of npte bits, made fallibly.
pub fn check_rmaps<'a>(
    rmaps: impl IntoIterator<Item = &'a Rmap>,
    revmap: &Revmap,
    mut on_member: impl FnMut(usize, u32) -> Result<(), RmapViolation>,
) -> Result<RingStats, RmapViolation> {
    let words = revmap.len().div_ceil(64);
    let mut seen = try_boxed_slice(words, |_| 0u64).map_err(|_| RmapViolation::Alloc {
        bytes: words.saturating_mul(8),
    })?;
    let mut stats = RingStats::default();
    for (frame, r) in rmaps.into_iter().enumerate() {
        let w = r.load();
        if w.0 == 0 {
            // The empty word: unlocked, no type, no ring; the common case.
            continue;
        }
        let kind = w.kind();
        if w.0 & !RMAP_LAYOUT != 0
            || w.is_locked()
            || (kind != 0 && kind != RMAP_TYPE_HPT)
            || (w.is_present() && kind != RMAP_TYPE_HPT)
        {
            return Err(RmapViolation::BadLayout { frame, word: w });
        }
        let mut first_err = None;
        let len = revmap.walk_ring(w, |p| {
            if first_err.is_some() {
                return;
            }
            let (wi, bit) = ((p / 64) as usize, 1u64 << (p % 64));
            // walk_ring has checked p < npte, so wi < words.
            if let Some(slot) = seen.get_mut(wi) {
                if *slot & bit != 0 {
                    first_err = Some(RmapViolation::DuplicateMember { ptex: p });
                    return;
                }
                *slot |= bit;
            }
            if let Err(e) = on_member(frame, p) {
                first_err = Some(e);
            }
        })?;
        if let Some(e) = first_err {
            return Err(e);
        }
        if len > 0 {
            stats.chains += 1;
            stats.members += len;
            stats.longest = stats.longest.max(len);
        }
    }
    Ok(stats)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn members(rev: &Revmap, r: &Rmap) -> Vec<u32> {
        let g = r.lock();
        rev.iter(&g).collect()
    }

    #[test]
    fn a_zeroed_revmap_is_off_ring_and_populate_changes_nothing() {
        let n = 3 * touch_stride::<RevmapEntry>() + 5;
        let rev = Revmap::new(n as u64).unwrap();
        for i in [0, 1, 255, 256, n as u32 - 1] {
            assert_eq!((rev.forw(i), rev.back(i), rev.guest_rpte(i)), (i, i, 0));
        }
        let arr = RmapArray::new(2 * touch_stride::<Rmap>() as u64 + 1).unwrap();
        let r = &arr[touch_stride::<Rmap>()];
        rev.set_guest_rpte(256, 0x1234);
        rev.link(r.lock(), 256);
        let before = r.load();
        rev.populate();
        arr.populate();
        assert_eq!(r.load(), before);
        assert_eq!(rev.guest_rpte(256), 0x1234);
        assert_eq!(members(&rev, r), [256]);
        assert_eq!(arr[0].load(), RmapWord(0));
        // Links written through the XOR encoding read back as written.
        rev.link(r.lock(), n as u32 - 1);
        assert_eq!(members(&rev, r), [256, n as u32 - 1]);
        rev.unlink(&mut r.lock(), 256);
        assert_eq!((rev.forw(256), rev.back(256)), (256, 256));
        assert_eq!(members(&rev, r), [n as u32 - 1]);
    }

    #[test]
    fn word_layout_is_kvms() {
        assert_eq!(RMAP_PRESENT, 0x0000_0001_0000_0000);
        assert_eq!(RMAP_RC, 0x0000_0180_0000_0000);
        assert_eq!(RMAP_LOCK, 0x0000_0800_0000_0000);
        assert_eq!(RMAP_TYPE_HPT, 0x0100_0000_0000_0000);
        assert_eq!(RMAP_TYPE_NESTED, 0xc000_0000_0000_0000);
    }

    #[test]
    fn link_builds_a_ring_in_insertion_order_and_unlink_moves_head() {
        let rev = Revmap::new(64).unwrap();
        let r = Rmap::new();
        for p in [5, 9, 0, 33] {
            let w = rev.link(r.lock(), p);
            assert!(w.is_present());
            assert_eq!(w.kind(), RMAP_TYPE_HPT);
            assert_eq!(w.index(), 5, "head stays, new entries go to the tail");
        }
        assert_eq!(members(&rev, &r), [5, 9, 0, 33]);
        assert_eq!(check_rmaps([&r], &rev, |_, _| Ok(())).unwrap().members, 4);

        let mut g = r.lock();
        rev.unlink(&mut g, 5);
        assert_eq!(g.word().index(), 9, "removing the head moves it to forw");
        rev.unlink(&mut g, 0);
        drop(g);
        assert_eq!(members(&rev, &r), [9, 33]);
        let mut g = r.lock();
        rev.unlink(&mut g, 33);
        rev.unlink(&mut g, 9);
        assert_eq!(g.word().bits() & (RMAP_PRESENT | RMAP_INDEX), 0);
        assert_eq!(
            g.word().kind(),
            RMAP_TYPE_HPT,
            "type byte stays once populated"
        );
        drop(g);
        check_rmaps([&r], &rev, |_, _| Ok(())).unwrap();
    }

    #[test]
    fn index_zero_is_a_valid_single_member() {
        let rev = Revmap::new(8).unwrap();
        let r = Rmap::new();
        let w = rev.link(r.lock(), 0);
        assert_eq!(w.head(), Some(0));
        assert_eq!(members(&rev, &r), [0]);
    }

    #[test]
    fn rc_harvest_is_kept_across_empty_and_relink() {
        let rev = Revmap::new(8).unwrap();
        let r = Rmap::new();
        rev.link(r.lock(), 3);
        let mut g = r.lock();
        rev.unlink(&mut g, 3);
        g.add_rc(HPTE_R_C);
        drop(g);
        let w = rev.link(r.lock(), 4);
        assert!(w.changed() && !w.referenced());
        assert_eq!(r.lock().take_rc(HPTE_R_C | HPTE_R_R), HPTE_R_C);
        assert!(!r.load().changed());
    }

    #[test]
    fn too_many_slots_is_an_error_not_a_truncation() {
        assert_eq!(
            Revmap::for_hpt_order(41).unwrap_err(),
            RmapError::TooManySlots { npte: 1 << 37 }
        );
        assert!(matches!(
            Revmap::new(MAX_NPTE + 1),
            Err(RmapError::TooManySlots { .. })
        ));
    }

    #[test]
    fn checker_catches_corruption() {
        let rev = Revmap::new(16).unwrap();
        let a = Rmap::new();
        let b = Rmap::new();
        rev.link(a.lock(), 1);
        rev.link(a.lock(), 2);
        // Two words claiming the same entry.
        b.lock()
            .set_word(RmapWord(RMAP_TYPE_HPT | RMAP_PRESENT | 2));
        assert!(matches!(
            check_rmaps([&a, &b], &rev, |_, _| Ok(())),
            Err(RmapViolation::BrokenLinks { .. } | RmapViolation::DuplicateMember { .. })
        ));
        b.lock().set_word(RmapWord(7));
        assert!(matches!(
            check_rmaps([&b], &rev, |_, _| Ok(())),
            Err(RmapViolation::IndexWithoutPresent { .. })
        ));
        b.lock().set_word(RmapWord(1 << 50));
        assert!(matches!(
            check_rmaps([&b], &rev, |_, _| Ok(())),
            Err(RmapViolation::BadLayout { .. })
        ));
        // PRESENT without the HPT type byte.
        b.lock().set_word(RmapWord(RMAP_PRESENT | 1));
        assert!(matches!(
            check_rmaps([&b], &rev, |_, _| Ok(())),
            Err(RmapViolation::BadLayout { .. })
        ));
        // A nested-type word in an HPT guest's array.
        b.lock().set_word(RmapWord(RMAP_TYPE_NESTED));
        assert!(matches!(
            check_rmaps([&b], &rev, |_, _| Ok(())),
            Err(RmapViolation::BadLayout { .. })
        ));
        // A member callback error is propagated.
        b.lock().set_word(RmapWord::EMPTY);
        assert_eq!(
            check_rmaps([&a], &rev, |_, p| Err(RmapViolation::DuplicateMember {
                ptex: p
            })),
            Err(RmapViolation::DuplicateMember { ptex: 1 })
        );
    }

    #[test]
    fn double_unlink_and_foreign_unlink_are_no_ops() {
        let rev = Revmap::new(16).unwrap();
        let a = Rmap::new();
        let b = Rmap::new();
        for p in [1, 2] {
            rev.link(a.lock(), p);
        }
        rev.link(b.lock(), 5);
        let mut g = a.lock();
        rev.unlink(&mut g, 2);
        // 2 is off-ring now (links to itself) and is not the head: must not empty `a`.
        assert_eq!(rev.try_unlink(&mut g, 2), Ok(false));
        // 7 was never linked.
        assert_eq!(rev.try_unlink(&mut g, 7), Ok(false));
        assert_eq!(g.word().head(), Some(1));
        drop(g);
        // Unlinking from an empty word changes nothing.
        let c = Rmap::new();
        assert_eq!(rev.try_unlink(&mut c.lock(), 5), Ok(false));
        assert_eq!(c.load(), RmapWord::EMPTY);
        assert_eq!(members(&rev, &b), [5]);
        check_rmaps([&a, &b, &c], &rev, |_, _| Ok(())).unwrap();
    }

    #[test]
    fn out_of_range_indices_are_errors_in_try_variants() {
        let rev = Revmap::new(8).unwrap();
        let r = Rmap::new();
        assert_eq!(
            rev.try_link(r.lock(), 8),
            Err(RmapError::OutOfRange { index: 8, len: 8 })
        );
        assert!(!r.load().is_locked(), "the guard is consumed: unlocked");
        assert_eq!(rev.try_link(r.lock(), 7).map(|w| w.head()), Ok(Some(7)));
        assert!(rev.try_unlink(&mut r.lock(), u32::MAX).is_err());
        assert_eq!(rev.try_unlink(&mut r.lock(), 7), Ok(true));
        assert_eq!(r.load().head(), None);
    }

    #[test]
    fn reset_clears_words_and_links() {
        let rev = Revmap::new(8).unwrap();
        let arr = RmapArray::new(4).unwrap();
        rev.link(arr[1].lock(), 3);
        rev.link(arr[1].lock(), 4);
        arr[1].lock().add_rc(HPTE_R_R);
        rev.set_guest_rpte(3, 0x1234);
        assert_eq!(arr.check(&rev).unwrap().members, 2);
        arr.reset();
        rev.reset_links();
        assert!(arr.iter().all(|r| r.load() == RmapWord::EMPTY));
        assert_eq!((rev.forw(3), rev.back(4)), (3, 4));
        assert_eq!(
            rev.guest_rpte(3),
            0x1234,
            "guest view survives a link reset"
        );
        assert_eq!(arr.check(&rev).unwrap(), RingStats::default());
        assert!(arr.get(4).is_err());
        assert!(arr.get(3).is_ok());
        // Relinking after the reset builds a fresh ring.
        rev.link(arr[0].lock(), 4);
        assert_eq!(members(&rev, &arr[0]), [4]);
        let old = arr[0].clear();
        assert_eq!(old.head(), Some(4));
    }

    #[cfg(not(shuttle))]
    #[test]
    fn memory_is_8_bytes_per_frame_and_16_per_slot() {
        assert_eq!(core::mem::size_of::<Rmap>(), 8);
        assert_eq!(core::mem::size_of::<RevmapEntry>(), 16);
        assert_eq!(RmapArray::new(1000).unwrap().bytes(), 8000);
        assert_eq!(Revmap::new(1000).unwrap().bytes(), 16000);
    }

    #[cfg(not(shuttle))]
    #[test]
    fn take_and_clear_give_back_an_empty_revmap() {
        let mut rev = Revmap::new(100).unwrap();
        let arr = RmapArray::new(4).unwrap();
        for p in [3, 40, 99] {
            rev.set_guest_rpte(p, 0x1000 + u64::from(p));
            rev.link(arr[1].lock(), p);
        }
        let mut taken = rev.take();
        assert!(rev.is_empty());
        assert_eq!(taken.len(), 100);
        assert_eq!(taken.guest_rpte(40), 0x1000 + 40);
        assert_ne!(taken.forw(3), 3, "linked");
        taken.clear();
        for p in 0..100 {
            assert_eq!(taken.guest_rpte(p), 0);
            assert_eq!((taken.forw(p), taken.back(p)), (p, p), "off-ring");
        }
    }

    /// A toy HPTE lock table for walker tests.
    struct Locks(Box<[AtomicU64]>);
    impl HpteLocks for Locks {
        type Guard<'a> = BitLockGuard<'a>;
        fn try_lock_hpte(&self, p: u32) -> Option<BitLockGuard<'_>> {
            BitLockGuard::try_lock(&self.0[p as usize], 0x40, 0x40)
        }
        fn wait_hpte_unlocked(&self, p: u32) {
            crate::bitlock::wait_unlocked(&self.0[p as usize], 0x40);
        }
    }

    #[test]
    fn walkers_visit_and_drain() {
        let rev = Revmap::new(16).unwrap();
        let locks = Locks((0..16).map(|_| AtomicU64::new(0)).collect());
        let r = Rmap::new();
        for p in [3, 7, 11] {
            rev.link(r.lock(), p);
        }
        let mut seen = Vec::new();
        r.for_each_locked(&rev, &locks, |_, p, _| {
            seen.push(p);
            Visit::Continue
        });
        assert_eq!(seen, [3, 7, 11]);
        let mut drained = Vec::new();
        let n = r.drain_locked(&rev, &locks, |g, p, _| {
            g.add_rc(HPTE_R_R);
            drained.push(p);
        });
        assert_eq!((n, drained), (3, alloc::vec![3, 7, 11]));
        assert!(r.load().referenced() && !r.load().is_present());
    }
}
