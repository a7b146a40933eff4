//! Bounded pools that keep freed tables mapped for reuse, as KVM takes its HPTs from a
//! reserved, already-mapped CMA area: [`BoundedPool`] holds any [`Pooled`] item up to
//! a byte capacity, and [`global`] is the pool of memslot rmap arrays. A slot created
//! at steady state (a VM made again, a slot added back) takes its words from there
//! instead of fresh zero pages, so it costs no page faults and no memset, only a read
//! pass that zeroes the blocks its predecessor used (`revmap_rmap::ring::zero_rmaps`).
//!
//! # Invariants
//!
//! * The pooled bytes never exceed the capacity ([`BoundedPool::set_capacity`]; 0 by
//!   default, so a program that does not opt in keeps nothing beyond its tables).
//! * The rmap pool never hands out an array that is not all zero (empty words).
//! * A pool's mutex is taken only when a table is created or freed, never on a
//!   hypercall path and never with an rmap or HPTE lock held.

use alloc::boxed::Box;
use alloc::vec::Vec;
use revmap_rmap::sync::{lock, Mutex};
use revmap_rmap::Rmap;

/// Something a [`BoundedPool`] can keep: it knows the bytes it holds.
pub trait Pooled {
    /// Bytes of memory this item keeps mapped.
    fn pooled_bytes(&self) -> usize;
}

impl Pooled for Box<[Rmap]> {
    fn pooled_bytes(&self) -> usize {
        core::mem::size_of_val::<[Rmap]>(self)
    }
}

#[derive(Debug)]
struct Inner<T> {
    capacity: usize,
    bytes: usize,
    free: Vec<T>,
}

/// A pool of freed items kept for reuse, bounded in bytes (module docs).
#[derive(Debug)]
pub struct BoundedPool<T> {
    inner: Mutex<Inner<T>>,
}

impl<T: Pooled> Default for BoundedPool<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Pooled> BoundedPool<T> {
    /// An empty pool of capacity 0 (keeps nothing).
    pub const fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                capacity: 0,
                bytes: 0,
                free: Vec::new(),
            }),
        }
    }

    /// Keep at most `bytes` for reuse; items beyond a lowered capacity are freed now.
    pub fn set_capacity(&self, bytes: usize) {
        let mut g = lock(&self.inner);
        g.capacity = bytes;
        while g.bytes > g.capacity {
            let Some(item) = g.free.pop() else { break };
            g.bytes -= item.pooled_bytes();
        }
    }

    /// The capacity in bytes.
    pub fn capacity(&self) -> usize {
        lock(&self.inner).capacity
    }

    /// Bytes held for reuse now.
    pub fn pooled_bytes(&self) -> usize {
        lock(&self.inner).bytes
    }

    /// How many pooled items satisfy `f`.
    pub fn count(&self, f: impl Fn(&T) -> bool) -> usize {
        lock(&self.inner).free.iter().filter(|t| f(t)).count()
    }

    /// Take out a pooled item that satisfies `f`, if there is one (as it was given).
    pub fn take_where(&self, f: impl Fn(&T) -> bool) -> Option<T> {
        let mut g = lock(&self.inner);
        let i = g.free.iter().position(f)?;
        let item = g.free.swap_remove(i);
        g.bytes -= item.pooled_bytes();
        Some(item)
    }

    /// Keep `item` if the capacity allows (else it is freed here, outside the lock);
    /// items of 0 bytes are not kept.
    pub fn give(&self, item: T) {
        let bytes = item.pooled_bytes();
        if bytes == 0 {
            return;
        }
        let mut g = lock(&self.inner);
        if g.bytes.saturating_add(bytes) <= g.capacity && g.free.try_reserve(1).is_ok() {
            g.bytes += bytes;
            g.free.push(item);
        } else {
            drop(g);
            drop(item);
        }
    }
}

/// The pool of memslot rmap arrays.
pub type RmapPool = BoundedPool<Box<[Rmap]>>;

impl RmapPool {
    /// An all-empty array of `n` words, if one of that length is pooled.
    pub(crate) fn take_rmaps(&self, n: usize) -> Option<Box<[Rmap]>> {
        let mut a = self.take_where(|a| a.len() == n)?;
        revmap_rmap::ring::zero_rmaps(&mut a);
        Some(a)
    }
}

static GLOBAL: RmapPool = RmapPool::new();

/// The process-wide pool that new memslots take their rmap words from and freed
/// slots return them to (capacity 0 until set).
pub fn global() -> &'static RmapPool {
    &GLOBAL
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_come_back_empty_and_the_capacity_bounds_the_pool() {
        let pool = RmapPool::new();
        let a = Rmap::new_array(1000).unwrap();
        a[7].lock().add_rc(1 << 39);
        pool.give(a);
        assert_eq!(pool.pooled_bytes(), 0, "capacity 0 keeps nothing");
        pool.set_capacity(8000);
        assert_eq!(pool.capacity(), 8000);
        let a = Rmap::new_array(1000).unwrap();
        a[999].lock().add_rc(1 << 40);
        let addr = a.as_ptr() as usize;
        pool.give(a);
        pool.give(Rmap::new_array(10).unwrap());
        pool.give(Rmap::new_array(0).unwrap());
        assert_eq!(pool.pooled_bytes(), 8000, "the second array does not fit");
        assert_eq!(pool.count(|a| a.len() == 1000), 1);
        assert!(pool.take_rmaps(10).is_none());
        let a = pool.take_rmaps(1000).unwrap();
        assert_eq!(a.as_ptr() as usize, addr, "the same memory comes back");
        assert!(a.iter().all(|w| w.load().0 == 0));
        assert_eq!(pool.pooled_bytes(), 0);
        pool.give(a);
        pool.set_capacity(0);
        assert_eq!(pool.pooled_bytes(), 0, "a lowered capacity frees");
    }
}
