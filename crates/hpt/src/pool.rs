//! A pool of HPT arrays that stay mapped for reuse, as KVM takes its HPTs from a
//! reserved, already-mapped CMA area and zeroes them when allocating.
//!
//! When an [`Hpt`] is dropped (a VM torn down, a table retired by a
//! resize and reclaimed), its HPTE array and revmap go to the [`global`] pool if the
//! pool's byte capacity allows; [`Hpt::new`](crate::table::Hpt::new) and the resize
//! preparation take an array of the same order from it before asking the allocator.
//! So a table made at steady state takes no page fault: it is zeroed by a read pass
//! that rewrites only the 256-byte blocks that are not already zero. The bounded
//! container is the host layer's [`BoundedPool`].
//!
//! # Invariants
//!
//! * Every pooled pair is an HPTE array and a revmap of the same order, `2^(order-4)`
//!   entries each; the pool never hands out a pair that is not all zero.
//! * The pooled bytes never exceed the capacity ([`TablePool::set_capacity`]; 0 by
//!   default, so a program that does not opt in keeps no memory beyond its tables).
//! * The pool's mutex is taken only when a table is created, dropped or scrubbed, never
//!   by a hypercall, and never with an HPTE or rmap lock held.
//! * A pooled pair marked clean is all zero. A retired table goes in dirty; the resize
//!   worker scrubs dirty pairs while it has nothing else to do
//!   ([`TablePool::scrub_one`]), so the next preparation of that order takes a clean
//!   pair and zeroes nothing on the guest's time (KVM zeroes a new HPT in its prepare
//!   work; here most of that work is done before it is asked for).

use crate::error::HptError;
use crate::table::{Hpt, HpteSlot};
use alloc::boxed::Box;
use revmap_host::pool::{BoundedPool, Pooled};
use revmap_rmap::sync::native::{AtomicUsize, Ordering};
use revmap_rmap::Revmap;

/// One pooled table's arrays.
#[derive(Debug)]
struct PooledTable {
    order: u32,
    slots: Box<[HpteSlot]>,
    revmap: Revmap,
    /// Both arrays are known to be all zero (scrubbed since the table was retired).
    clean: bool,
}

impl Pooled for PooledTable {
    fn pooled_bytes(&self) -> usize {
        core::mem::size_of_val::<[HpteSlot]>(&self.slots) + self.revmap.bytes()
    }
}

/// A bounded pool of HPT arrays kept mapped for reuse (module docs).
#[derive(Debug, Default)]
pub struct TablePool(
    BoundedPool<PooledTable>,
    /// Tables taken out by [`scrub_one`](TablePool::scrub_one) and not yet given back.
    AtomicUsize,
);

static GLOBAL: TablePool = TablePool::new();

/// The process-wide pool that [`Hpt::new`](crate::table::Hpt::new) takes from and
/// dropped tables return to (capacity 0 until set).
pub fn global() -> &'static TablePool {
    &GLOBAL
}

/// Set the capacity of both pools a VM's tables come from: the HPT pool ([`global`])
/// and the host layer's pool of memslot rmap arrays ([`revmap_host::pool::global`]),
/// `bytes` each.
pub fn set_vm_pools_capacity(bytes: usize) {
    global().set_capacity(bytes);
    revmap_host::pool::global().set_capacity(bytes);
}

impl TablePool {
    /// An empty pool of capacity 0 (keeps nothing).
    pub const fn new() -> Self {
        Self(BoundedPool::new(), AtomicUsize::new(0))
    }

    /// Keep at most `bytes` of HPTE arrays and revmaps mapped for reuse; pooled tables
    /// beyond a lowered capacity are freed now.
    pub fn set_capacity(&self, bytes: usize) {
        self.0.set_capacity(bytes);
    }

    /// The capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    /// Bytes of arrays held for reuse now.
    pub fn pooled_bytes(&self) -> usize {
        self.0.pooled_bytes()
    }

    /// Pooled tables of `order` now.
    pub fn pooled_tables(&self, order: u32) -> usize {
        self.0.count(|p| p.order == order)
    }

    /// Allocate `count` tables of `order`, fault their pages in and pool them (a
    /// hypervisor reserving its CMA area before guests run). Stops early, without
    /// error, once the capacity is reached.
    pub fn prewarm(&self, order: u32, count: usize) -> Result<(), HptError> {
        for _ in 0..count {
            let mut t = Hpt::new_unpooled(order)?;
            if t.bytes() > self.capacity().saturating_sub(self.pooled_bytes()) {
                break;
            }
            t.populate();
            let (slots, revmap) = t.take_arrays();
            // Freshly allocated zeroed: clean.
            self.give_as(order, slots, revmap, true);
        }
        Ok(())
    }

    /// A zeroed HPTE array and revmap of `order` with `n` entries, if one is pooled.
    pub(crate) fn take(&self, order: u32, n: usize) -> Option<(Box<[HpteSlot]>, Revmap)> {
        let fits = |p: &PooledTable| p.order == order && p.slots.len() == n;
        if let Some(p) = self.0.take_where(|p| fits(p) && p.clean) {
            return Some((p.slots, p.revmap));
        }
        let mut p = self.0.take_where(fits)?;
        p.scrub();
        Some((p.slots, p.revmap))
    }

    /// Zero one dirty pooled table (outside the pool's lock) and put it back clean.
    /// Returns false if no table was dirty. The resize worker calls it when idle.
    pub fn scrub_one(&self) -> bool {
        // ORDERING: counted before the table leaves the pool (the pool's mutex orders
        // the count before the take for anyone who then finds the table gone), so
        // `scrub_all` never sees it neither pooled dirty nor counted. SeqCst: a counter
        // read outside the mutex, off every hot path.
        self.1.fetch_add(1, Ordering::SeqCst);
        let taken = self.0.take_where(|p| !p.clean);
        let scrubbed = taken.is_some();
        if let Some(mut p) = taken {
            p.scrub();
            self.0.give(p);
        }
        // ORDERING: after the give-back (see above).
        self.1.fetch_sub(1, Ordering::SeqCst);
        scrubbed
    }

    /// Scrub every dirty pooled table, and wait for the scrubs other threads (the
    /// resize workers) have in progress: on return no table retired before the call is
    /// left dirty. For a benchmark's untimed set-up.
    pub fn scrub_all(&self) {
        loop {
            while self.scrub_one() {}
            // ORDERING: see `scrub_one`.
            if self.1.load(Ordering::SeqCst) == 0 && self.dirty_tables() == 0 {
                return;
            }
            revmap_rmap::sync::yield_now();
        }
    }

    /// How many pooled tables are waiting to be scrubbed.
    pub fn dirty_tables(&self) -> usize {
        self.0.count(|p| !p.clean)
    }

    /// Keep the arrays of a dropped table of `order` if the capacity allows (else they
    /// are freed here). Empty or mismatched arrays are not kept.
    pub(crate) fn give(&self, order: u32, slots: Box<[HpteSlot]>, revmap: Revmap) {
        self.give_as(order, slots, revmap, false);
    }

    /// [`give`](Self::give), saying whether the arrays are known to be all zero.
    fn give_as(&self, order: u32, slots: Box<[HpteSlot]>, revmap: Revmap, clean: bool) {
        if slots.len() == revmap.len() {
            self.0.give(PooledTable {
                order,
                slots,
                revmap,
                clean,
            });
        }
    }
}

impl PooledTable {
    /// Make both arrays all zero (a read pass; only non-zero blocks are written).
    fn scrub(&mut self) {
        zero_slots(&mut self.slots);
        self.revmap.clear();
        self.clean = true;
    }
}

/// Zero every HPTE, writing only the 256-byte blocks that are not zero
/// ([`zero_nonzero_blocks`](revmap_rmap::error::zero_nonzero_blocks)). Done on whole
/// words, not per field, so that the read pass is vectorised: per HPTE field it cost
/// ~90 instructions per hypercall of the boot trace (callgrind), as words ~10.
#[allow(unsafe_code)]
fn zero_slots(slots: &mut [HpteSlot]) {
    let n = slots.len() * 2;
    let p = slots.as_mut_ptr().cast::<u64>();
    // SAFETY: `HpteSlot` is `repr(C)` of two `AtomicU64`s (16 bytes, const-asserted in
    // `table.rs`), each with the in-memory representation of `u64`, so the array is `n`
    // initialised, aligned `u64`s; `&mut` gives exclusive access for the slice's
    // lifetime, and the all-zero slot is the empty HPTE (`Zeroable`).
    let words = unsafe { core::slice::from_raw_parts_mut(p, n) };
    revmap_rmap::error::zero_nonzero_blocks(words);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hpte::HpteV;
    use revmap_rmap::Ptex;

    #[test]
    fn a_pooled_table_is_reused_zeroed_and_the_capacity_bounds_the_pool() {
        let pool = TablePool::new();
        let mut t = Hpt::new_unpooled(18).unwrap();
        let bytes = 2 * t.slots().len() * 16;
        {
            let g = t.lock(Ptex(5)).unwrap();
            g.set_r(0x1234);
            g.unlock_with(HpteV::VALID | 0x80);
        }
        t.revmap().set_guest_rpte(9, 0x55);
        let (slots, revmap) = t.take_arrays();
        assert!(pool.take(18, 16384).is_none());
        // Capacity 0: not kept.
        pool.give(18, slots, revmap);
        assert_eq!(pool.pooled_bytes(), 0);
        pool.set_capacity(bytes);
        let (slots, revmap) = t.take_arrays();
        assert!(slots.is_empty(), "already taken");
        pool.give(18, slots, revmap);
        assert_eq!(pool.pooled_bytes(), 0, "empty arrays are not kept");

        let mut t = Hpt::new_unpooled(18).unwrap();
        {
            let g = t.lock(Ptex(5)).unwrap();
            g.set_r(0x1234);
            g.unlock_with(HpteV::VALID | 0x80);
        }
        t.revmap().set_guest_rpte(16383, 0x55);
        let addr = t.slots().as_ptr() as usize;
        let (slots, revmap) = t.take_arrays();
        pool.give(18, slots, revmap);
        assert_eq!(pool.pooled_bytes(), bytes);
        assert_eq!(pool.pooled_tables(18), 1);
        // A second one does not fit.
        let mut t2 = Hpt::new_unpooled(18).unwrap();
        let (slots, revmap) = t2.take_arrays();
        pool.give(18, slots, revmap);
        assert_eq!(pool.pooled_tables(18), 1);
        assert!(pool.take(19, 32768).is_none(), "other order");
        let (slots, revmap) = pool.take(18, 16384).unwrap();
        assert_eq!(slots.as_ptr() as usize, addr, "the same memory comes back");
        assert!(slots.iter().all(|s| s.load_v() == 0 && s.load_r() == 0));
        assert!((0..16384).all(|i| revmap.guest_rpte(i) == 0 && revmap.forw(i) == i));
        assert_eq!(pool.pooled_bytes(), 0);
        pool.give(18, slots, revmap);
        pool.set_capacity(0);
        assert_eq!(pool.pooled_bytes(), 0, "a lowered capacity frees");
    }

    #[test]
    fn scrubbing_zeroes_a_retired_table_and_a_take_prefers_a_clean_one() {
        let pool = TablePool::new();
        pool.set_capacity(4 * 2 * 16384 * 16);
        let dirty_table = || {
            let mut t = Hpt::new_unpooled(18).unwrap();
            {
                let g = t.lock(Ptex(5)).unwrap();
                g.set_r(0x1234);
                g.unlock_with(HpteV::VALID | 0x80);
            }
            t.revmap().set_guest_rpte(16383, 0x55);
            t.take_arrays()
        };
        let (slots, revmap) = dirty_table();
        let scrubbed_at = slots.as_ptr() as usize;
        pool.give(18, slots, revmap);
        assert_eq!(pool.dirty_tables(), 1);
        assert!(pool.scrub_one());
        assert_eq!(pool.dirty_tables(), 0);
        assert!(!pool.scrub_one(), "nothing left to scrub");
        // A second retired table stays dirty; the take must pick the scrubbed one.
        let (slots, revmap) = dirty_table();
        pool.give(18, slots, revmap);
        assert_eq!((pool.pooled_tables(18), pool.dirty_tables()), (2, 1));
        let (slots, revmap) = pool.take(18, 16384).unwrap();
        assert_eq!(
            slots.as_ptr() as usize,
            scrubbed_at,
            "the clean table first"
        );
        assert!(slots.iter().all(|s| s.load_v() == 0 && s.load_r() == 0));
        assert!((0..16384).all(|i| revmap.guest_rpte(i) == 0 && revmap.forw(i) == i));
        // The dirty one is zeroed when it is taken.
        let (slots2, revmap2) = pool.take(18, 16384).unwrap();
        assert!(slots2.iter().all(|s| s.load_v() == 0 && s.load_r() == 0));
        assert!((0..16384).all(|i| revmap2.guest_rpte(i) == 0 && revmap2.forw(i) == i));
        assert_eq!(pool.pooled_bytes(), 0);
    }

    #[test]
    fn scrub_all_leaves_nothing_dirty_even_beside_another_scrubber() {
        let pool = TablePool::new();
        pool.set_capacity(8 * 2 * 16384 * 16);
        for _ in 0..6 {
            let mut t = Hpt::new_unpooled(18).unwrap();
            t.revmap().set_guest_rpte(7, 0x55);
            let (slots, revmap) = t.take_arrays();
            pool.give(18, slots, revmap);
        }
        assert_eq!(pool.dirty_tables(), 6);
        std::thread::scope(|s| {
            s.spawn(|| while pool.scrub_one() {});
            pool.scrub_all();
            assert_eq!(pool.dirty_tables(), 0);
            assert_eq!(pool.pooled_tables(18), 6, "every table is back in the pool");
        });
        while let Some((_, revmap)) = pool.take(18, 16384) {
            assert_eq!(revmap.guest_rpte(7), 0);
        }
    }

    #[test]
    fn prewarm_stops_at_the_capacity() {
        let pool = TablePool::new();
        pool.set_capacity(2 * 2 * 16384 * 16 + 100);
        pool.prewarm(18, 3).unwrap();
        assert_eq!(pool.pooled_tables(18), 2);
        assert_eq!(pool.pooled_bytes(), 2 * 2 * 16384 * 16);
        assert!(matches!(
            pool.prewarm(10, 1),
            Err(HptError::BadOrder { .. })
        ));
    }
}
