//! The hashed page table itself: 16-byte HPTEs of two atomics, the revmap beside it, and
//! the per-HPTE bit lock on HVLOCK.
//!
//! # Locking and ordering
//!
//! * HVLOCK (0x40) in dword 0 is the HPTE lock (`try_lock_hpte` / `unlock_hpte`). It
//!   protects both dwords and the revmap entry's `guest_rpte`. Locking is an `Acquire`
//!   CAS ([`Hpt::try_lock`] with a busy mask, or a spin in [`Hpt::lock`]); unlocking is
//!   one `Release` store of the new dword 0 ([`HpteGuard::unlock_with`], or `Drop`,
//!   which stores the value the guard holds).
//! * dword 1 is written under the lock with `Relaxed` stores before the `Release` that
//!   publishes dword 0, so a lock-free reader (the MMU model, H_READ) that loads dword 0
//!   with `Acquire` and sees VALID also sees the matching dword 1.
//! * The one writer of dword 1 that does not hold the lock is "hardware" (the MMU
//!   model), which sets R/C with an atomic `fetch_or` and only on VALID entries; the
//!   hypervisor therefore reads dword 1 for R/C only after the invalidation that
//!   stabilises it (KVM's "Don't lose hardware R/C bit updates in H_PROTECT").
//!
//! # Invariants
//!
//! * At rest (no lock held) HVLOCK is clear and VALID and ABSENT are never both set.
//! * The table is zero-filled at creation in both flavours (QEMU's pre-filled 0x40 is a
//!   presentation matter, see `flavour.rs`).
//! * A table created by a resize in the QEMU flavour ([`Hpt::new_pristine`]) also keeps
//!   one "never written since allocation" bit per HPTE: QEMU allocates such tables
//!   all-zero instead of 0x40-filled, so a never-written slot reads back as 0. The bit
//!   is cleared (once, monotonically) when H_ENTER or the rehash writes the slot.
//! * `slots.len() == revmap.len() == geometry.npte()`.

use crate::error::HptError;
use crate::hash::HptGeometry;
use crate::hpte::HpteV;
use alloc::boxed::Box;
use revmap_rmap::bitlock::{wait_unlocked, BitLockGuard};
use revmap_rmap::error::{try_boxed_slice, try_zeroed_boxed_slice, Zeroable};
use revmap_rmap::sync::{AtomicU64, Ordering};
use revmap_rmap::{HpteLocks, Ptex, Revmap};

/// One HPTE: dword 0 (V) and dword 1 (R).
#[derive(Debug, Default)]
#[repr(C, align(16))]
pub struct HpteSlot {
    v: AtomicU64,
    r: AtomicU64,
}

#[cfg(not(any(loom, shuttle)))]
const _: () = assert!(core::mem::size_of::<HpteSlot>() == 16);

// SAFETY: both dwords are `Zeroable` atomics: the all-zero slot is the empty HPTE
// `HpteSlot::default()`.
#[allow(unsafe_code)]
unsafe impl Zeroable for HpteSlot {
    fn zero() -> Self {
        Self::default()
    }
}

impl HpteSlot {
    /// Lock-free snapshot of dword 0.
    #[inline(always)]
    pub fn load_v(&self) -> u64 {
        // ORDERING: Acquire pairs with the Release unlock/publish of the writer, so a
        // reader that sees a VALID dword 0 also sees the dword 1 written before it.
        self.v.load(Ordering::Acquire)
    }
    /// Lock-free snapshot of dword 1.
    #[inline(always)]
    pub fn load_r(&self) -> u64 {
        // ORDERING: Relaxed: ordered after a preceding Acquire load of dword 0 by
        // program order on the reading side; writers publish it via dword 0.
        self.r.load(Ordering::Relaxed)
    }
    /// Dword 0 as the MMU model ("hardware") reads it during an HPT search.
    #[inline(always)]
    pub fn hw_load_v(&self) -> u64 {
        // ORDERING: SeqCst (a plain load on x86), at least Acquire as `load_v`: the
        // vCPU's read of the store-buffering handshake of
        // `TlbDomain::tlbie_after_sc_rmw`, ordered after its registration by the
        // SeqCst fence in `TlbDomain::register` (after a vCPU registers, its searches
        // see every invalidation the hypervisor completed without a TLB shootdown).
        self.v.load(Ordering::SeqCst)
    }
    /// Hardware R/C update (the MMU model): atomically OR `bits` into dword 1.
    #[inline(always)]
    pub fn hw_set_rc(&self, bits: u64) -> u64 {
        // ORDERING: Relaxed RMW: atomicity is what matters (no lost concurrent update);
        // the hypervisor reads it after a tlbie, whose fenced handshake orders it.
        self.r.fetch_or(bits, Ordering::Relaxed)
    }
}

/// A hashed page table of 2^order bytes with its revmap.
#[derive(Debug)]
pub struct Hpt {
    geo: HptGeometry,
    slots: Box<[HpteSlot]>,
    revmap: Revmap,
    /// One bit per HPTE, set while the slot was never written since allocation (only
    /// for tables created by a QEMU-flavour resize; `None` = every slot counts as
    /// written).
    pristine: Option<Box<[AtomicU64]>>,
}

impl Hpt {
    /// A zeroed table of 2^order bytes (orders 18..=36): from the table pool
    /// ([`pool::global`](crate::pool::global)) if it holds one of this order, else
    /// allocated fallibly.
    pub fn new(order: u32) -> Result<Self, HptError> {
        let geo = HptGeometry::new(order)?;
        let n =
            usize::try_from(geo.npte()).map_err(|_| HptError::OrderTooLargeForLinks { order })?;
        #[cfg(all(feature = "std", not(any(loom, shuttle))))]
        if let Some((slots, revmap)) = crate::pool::global().take(order, n) {
            return Ok(Self {
                geo,
                slots,
                revmap,
                pristine: None,
            });
        }
        Self::with_geometry(geo, n)
    }

    /// [`Hpt::new`] without looking in the table pool (freshly allocated zeroed pages).
    pub fn new_unpooled(order: u32) -> Result<Self, HptError> {
        let geo = HptGeometry::new(order)?;
        let n =
            usize::try_from(geo.npte()).map_err(|_| HptError::OrderTooLargeForLinks { order })?;
        Self::with_geometry(geo, n)
    }

    /// Bytes of the HPTE array and the revmap (16 + 16 per slot).
    pub fn bytes(&self) -> usize {
        core::mem::size_of_val::<[HpteSlot]>(&self.slots) + self.revmap.bytes()
    }

    /// Move the HPTE array and the revmap out (for the table pool), leaving this table
    /// with none.
    #[cfg(all(feature = "std", not(any(loom, shuttle))))]
    pub(crate) fn take_arrays(&mut self) -> (Box<[HpteSlot]>, Revmap) {
        (core::mem::take(&mut self.slots), self.revmap.take())
    }

    /// A table of `n` empty slots over `geo`, with its revmap (shared by the constructors).
    fn with_geometry(geo: HptGeometry, n: usize) -> Result<Self, HptError> {
        let slots = try_zeroed_boxed_slice(n)?;
        let revmap = Revmap::new(geo.npte())?;
        Ok(Self {
            geo,
            slots,
            revmap,
            pristine: None,
        })
    }

    /// A zeroed table whose slots all start "never written" (QEMU's resize tables,
    /// which read back as 0 rather than 0x40 until written).
    pub fn new_pristine(order: u32) -> Result<Self, HptError> {
        let mut t = Self::new(order)?;
        let words = t.slots.len().div_ceil(64);
        t.pristine = Some(try_boxed_slice(words, |_| AtomicU64::new(u64::MAX))?);
        Ok(t)
    }

    /// Whether HPTE `ptex` was never written since the table was allocated (always
    /// false for tables not made by [`new_pristine`](Self::new_pristine)).
    #[inline(always)]
    pub fn is_pristine(&self, ptex: Ptex) -> bool {
        let Some(bm) = &self.pristine else {
            return false;
        };
        let i = ptex.0 as usize;
        // ORDERING: Relaxed: the bit is written under the HPTE lock before the Release
        // that publishes dword 0; readers that care load dword 0 first.
        bm.get(i / 64)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (i % 64)) != 0)
    }

    /// Record that HPTE `ptex` has been written (no-op for ordinary tables).
    #[inline(always)]
    pub fn mark_written(&self, ptex: Ptex) {
        if let Some(bm) = &self.pristine {
            let i = ptex.0 as usize;
            if let Some(w) = bm.get(i / 64) {
                let bit = 1u64 << (i % 64);
                // ORDERING: Relaxed: see `is_pristine`; the RMW keeps concurrent writers
                // of other slots in the same word from losing each other's updates.
                if w.load(Ordering::Relaxed) & bit != 0 {
                    w.fetch_and(!bit, Ordering::Relaxed);
                }
            }
        }
    }

    /// Fault every page of the table and its revmap in for writing without changing any
    /// entry (one word per 4 KiB page): the table is allocated zeroed and
    /// would otherwise take its page faults at first use by the guest. A hypervisor
    /// that keeps its HPTs in an already-mapped pool (KVM's reserved CMA area) has them
    /// mapped before the guest runs; this gets the same. Safe concurrently with any
    /// hypercall.
    pub fn populate(&self) {
        let stride = revmap_rmap::ring::touch_stride::<HpteSlot>();
        for s in self.slots.iter().step_by(stride) {
            revmap_rmap::ring::touch_word(&s.r);
        }
        self.revmap.populate();
        if let Some(bm) = &self.pristine {
            for w in bm
                .iter()
                .step_by(revmap_rmap::ring::touch_stride::<AtomicU64>())
            {
                revmap_rmap::ring::touch_word(w);
            }
        }
    }

    /// A tiny zeroed table for model checking (orders from 8, see
    /// `HptGeometry::new_small`).
    #[cfg(any(loom, shuttle))]
    pub(crate) fn new_small(order: u32) -> Result<Self, HptError> {
        let geo = HptGeometry::new_small(order)?;
        Self::with_geometry(geo, 1usize << (order - 4))
    }

    /// Geometry.
    #[inline(always)]
    pub fn geometry(&self) -> HptGeometry {
        self.geo
    }

    /// The revmap array.
    #[inline(always)]
    pub fn revmap(&self) -> &Revmap {
        &self.revmap
    }

    /// HPTE `ptex`, if in range.
    #[inline(always)]
    pub fn slot(&self, ptex: Ptex) -> Option<&HpteSlot> {
        self.slots.get(ptex.0 as usize)
    }

    /// All HPTEs.
    #[inline(always)]
    pub fn slots(&self) -> &[HpteSlot] {
        &self.slots
    }

    /// Try once to lock HPTE `ptex`, only if `(dword0 & busy) == 0` (`try_lock_hpte`).
    /// `busy` always includes HVLOCK. `None` if locked, busy or out of range.
    #[inline(always)]
    pub fn try_lock(&self, ptex: Ptex, busy: u64) -> Option<HpteGuard<'_>> {
        let slot = self.slot(ptex)?;
        BitLockGuard::try_lock(&slot.v, HpteV::HVLOCK, busy | HpteV::HVLOCK).map(|g| HpteGuard {
            g,
            slot,
            ptex,
        })
    }

    /// Lock HPTE `ptex` and change its dword 0 from `expected` (HVLOCK clear) to `new`
    /// in one `SeqCst` RMW; `None` if dword 0 no longer equals `expected` (or is locked).
    ///
    /// H_REMOVE uses it to clear VALID at the moment it locks: the cleared dword 0 is
    /// published to the MMU model by the locking RMW itself, ready for
    /// [`TlbDomain::tlbie_after_sc_rmw`](crate::tlb::TlbDomain::tlbie_after_sc_rmw).
    #[inline(always)]
    pub fn try_lock_replace(&self, ptex: Ptex, expected: u64, new: u64) -> Option<HpteGuard<'_>> {
        let slot = self.slot(ptex)?;
        BitLockGuard::try_lock_replace(&slot.v, HpteV::HVLOCK, expected, new).map(|g| HpteGuard {
            g,
            slot,
            ptex,
        })
    }

    /// Write a free HPTE of a table no other thread can reach (`&mut self`: a resize's
    /// new table before it is installed), without taking the HPTE lock: its guest view
    /// of dword 1, dword 1 and dword 0 (HVLOCK cleared). Returns false, writing nothing,
    /// if the slot is in use (VALID or ABSENT) or out of range.
    pub fn place_unshared(&mut self, ptex: Ptex, v: u64, r: u64, guest_rpte: u64) -> bool {
        let Some(slot) = self.slots.get(ptex.0 as usize) else {
            return false;
        };
        // ORDERING: Relaxed throughout: `&mut self` excludes every other access, and the
        // install that later makes the table reachable publishes these writes (the
        // table cell's Release pivot, Acquire in every reader).
        if slot.v.load(Ordering::Relaxed) & (HpteV::VALID | HpteV::ABSENT) != 0 {
            return false;
        }
        self.revmap.set_guest_rpte(ptex.0, guest_rpte);
        slot.r.store(r, Ordering::Relaxed);
        slot.v.store(v & !HpteV::HVLOCK, Ordering::Relaxed);
        true
    }

    /// Spin until HPTE `ptex` is locked. `None` only if out of range.
    #[inline(always)]
    pub fn lock(&self, ptex: Ptex) -> Option<HpteGuard<'_>> {
        let slot = self.slot(ptex)?;
        Some(HpteGuard {
            g: BitLockGuard::lock(&slot.v, HpteV::HVLOCK),
            slot,
            ptex,
        })
    }
}

/// A held HPTE lock. Dword 0 edits go to the guard's value and are stored by the
/// unlocking `Release` store; dword 1 is written directly (the lock excludes other
/// hypervisor writers; hardware only ORs R/C into VALID entries).
#[must_use = "dropping the guard unlocks immediately"]
#[derive(Debug)]
pub struct HpteGuard<'a> {
    g: BitLockGuard<'a>,
    slot: &'a HpteSlot,
    ptex: Ptex,
}

impl HpteGuard<'_> {
    /// The locked HPTE's index.
    #[inline(always)]
    pub fn ptex(&self) -> Ptex {
        self.ptex
    }
    /// Dword 0 as it will be stored at unlock (HVLOCK clear).
    #[inline(always)]
    pub fn v(&self) -> u64 {
        self.g.value()
    }
    /// Set the dword 0 that unlock will store.
    #[inline(always)]
    pub fn set_v(&mut self, v: u64) {
        self.g.set(v);
    }
    /// Store the pending dword 0 now, keeping the lock (e.g. clear VALID before a tlbie
    /// so that hardware stops using the entry).
    #[inline(always)]
    pub fn publish_v(&self) {
        self.g.publish();
    }
    /// Read dword 1.
    #[inline(always)]
    pub fn r(&self) -> u64 {
        self.slot.load_r()
    }
    /// Write dword 1 (published to lock-free readers by the next dword 0 release).
    #[inline(always)]
    pub fn set_r(&self, r: u64) {
        // ORDERING: Relaxed; published by the Release store of dword 0 (unlock or
        // publish_v) that follows.
        self.slot.r.store(r, Ordering::Relaxed);
    }
    /// Atomically clear `bits` of dword 1, returning the old word (KVM's byte store of
    /// the R byte in `kvmppc_clear_ref_hpte`, which must not lose a concurrent C update).
    #[inline(always)]
    pub fn r_fetch_and_not(&self, bits: u64) -> u64 {
        // ORDERING: Relaxed RMW; the following tlbie orders it against hardware.
        self.slot.r.fetch_and(!bits, Ordering::Relaxed)
    }
    /// Unlock, storing `v` as the new dword 0.
    #[inline(always)]
    pub fn unlock_with(self, v: u64) {
        self.g.unlock_with(v);
    }
}

/// A dropped table's arrays go to the table pool (kept if its capacity allows).
#[cfg(all(feature = "std", not(any(loom, shuttle))))]
impl Drop for Hpt {
    fn drop(&mut self) {
        let order = self.geo.order();
        let (slots, revmap) = self.take_arrays();
        crate::pool::global().give(order, slots, revmap);
    }
}

impl HpteLocks for Hpt {
    type Guard<'a> = HpteGuard<'a>;

    #[inline]
    fn try_lock_hpte(&self, ptex: u32) -> Option<HpteGuard<'_>> {
        self.try_lock(Ptex(ptex), HpteV::HVLOCK)
    }

    #[inline]
    fn wait_hpte_unlocked(&self, ptex: u32) {
        if let Some(s) = self.slot(Ptex(ptex)) {
            wait_unlocked(&s.v, HpteV::HVLOCK);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn lock_protocol_on_hvlock() {
        let t = Hpt::new(18).unwrap();
        assert_eq!(t.slots().len(), 16384);
        assert_eq!(t.revmap().len(), 16384);
        let p = Ptex(9);
        let mut g = t.try_lock(p, HpteV::VALID | HpteV::ABSENT).unwrap();
        assert!(t.try_lock(p, 0).is_none(), "held");
        assert!(t.try_lock_hpte(9).is_none());
        g.set_r(0x1234);
        g.set_v(0x1001 | HpteV::HVLOCK);
        assert_eq!(
            t.slot(p).unwrap().load_v(),
            HpteV::HVLOCK,
            "not yet published"
        );
        g.publish_v();
        assert_eq!(t.slot(p).unwrap().load_v(), 0x1001 | HpteV::HVLOCK);
        drop(g);
        assert_eq!(t.slot(p).unwrap().load_v(), 0x1001);
        assert!(
            t.try_lock(p, HpteV::VALID | HpteV::ABSENT).is_none(),
            "busy mask refuses a valid slot"
        );
        let g = t.lock(p).unwrap();
        assert_eq!(g.v(), 0x1001);
        assert_eq!(g.r_fetch_and_not(0x1000), 0x1234);
        g.unlock_with(0);
        assert_eq!(t.slot(p).unwrap().load_r(), 0x234);
        assert!(t.lock(Ptex(16384)).is_none());
    }

    #[test]
    fn place_unshared_writes_only_a_free_slot() {
        let mut t = Hpt::new_unpooled(18).unwrap();
        let p = Ptex(3);
        assert!(t.place_unshared(p, HpteV::VALID | HpteV::HVLOCK | 0x10, 0x1234, 0x55));
        let s = t.slot(p).unwrap();
        assert_eq!(
            (s.load_v(), s.load_r()),
            (HpteV::VALID | 0x10, 0x1234),
            "unlocked"
        );
        assert_eq!(t.revmap().guest_rpte(3), 0x55);
        assert!(!t.place_unshared(p, 0x11, 0x99, 0x77), "in use (VALID)");
        let s = t.slot(p).unwrap();
        assert_eq!(
            (s.load_v(), s.load_r(), t.revmap().guest_rpte(3)),
            (0x11, 0x1234, 0x55)
        );
        assert!(t.place_unshared(Ptex(4), HpteV::ABSENT, 1, 2));
        assert!(!t.place_unshared(Ptex(4), 0x1, 3, 4), "in use (ABSENT)");
        assert!(!t.place_unshared(Ptex(16384), 0x1, 3, 4), "out of range");
    }

    #[test]
    fn orders_beyond_links_are_clean_errors() {
        assert!(matches!(
            Hpt::new(37),
            Err(HptError::OrderTooLargeForLinks { .. })
        ));
        assert!(matches!(Hpt::new(10), Err(HptError::BadOrder { .. })));
    }
}
