//! A pool of memslot rmap arrays that stay mapped for reuse: a slot created at steady
//! state (a VM made again, a slot added back) takes its words from here instead of
//! fresh zero pages, so it costs no page faults and no memset, only a read pass that
//! zeroes the blocks its predecessor used (`revmap_rmap::ring::zero_rmaps`).
//!
//! # Invariants
//!
//! * The pool never hands out an array that is not all zero (empty words).
//! * The pooled bytes never exceed the capacity ([`RmapPool::set_capacity`]; 0 by
//!   default, so a program that does not opt in keeps nothing beyond its slots).
//! * Its mutex is taken only when a slot's arrays are created or freed, never on a
//!   hypercall path and never with an rmap lock held.

use alloc::boxed::Box;
use alloc::vec::Vec;
use revmap_rmap::sync::{lock, Mutex};
use revmap_rmap::Rmap;

#[derive(Debug)]
struct Inner {
    capacity: usize,
    bytes: usize,
    free: Vec<Box<[Rmap]>>,
}

/// A bounded pool of rmap arrays kept mapped for reuse (module docs).
#[derive(Debug)]
pub struct RmapPool {
    inner: Mutex<Inner>,
}

static GLOBAL: RmapPool = RmapPool::new();

/// The process-wide pool that new memslots take their rmap words from and freed
/// slots return them to (capacity 0 until set).
pub fn global() -> &'static RmapPool {
    &GLOBAL
}

impl Default for RmapPool {
    fn default() -> Self {
        Self::new()
    }
}

impl RmapPool {
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

    /// Keep at most `bytes` of rmap arrays for reuse; arrays beyond a lowered capacity
    /// are freed now.
    pub fn set_capacity(&self, bytes: usize) {
        let mut g = lock(&self.inner);
        g.capacity = bytes;
        while g.bytes > g.capacity {
            let Some(a) = g.free.pop() else { break };
            g.bytes -= core::mem::size_of_val::<[Rmap]>(&a);
        }
    }

    /// Bytes of arrays held for reuse now.
    pub fn pooled_bytes(&self) -> usize {
        lock(&self.inner).bytes
    }

    /// An all-empty array of `n` words, if one of that length is pooled.
    pub(crate) fn take(&self, n: usize) -> Option<Box<[Rmap]>> {
        let mut a = {
            let mut g = lock(&self.inner);
            let i = g.free.iter().position(|a| a.len() == n)?;
            let a = g.free.swap_remove(i);
            g.bytes -= core::mem::size_of_val::<[Rmap]>(&a);
            a
        };
        revmap_rmap::ring::zero_rmaps(&mut a);
        Some(a)
    }

    /// Keep `words` if the capacity allows (else they are freed here); empty arrays are
    /// not kept.
    pub(crate) fn give(&self, words: Box<[Rmap]>) {
        let bytes = core::mem::size_of_val::<[Rmap]>(&words);
        if bytes == 0 {
            return;
        }
        let mut g = lock(&self.inner);
        if g.bytes.saturating_add(bytes) <= g.capacity && g.free.try_reserve(1).is_ok() {
            g.bytes += bytes;
            g.free.push(words);
        } else {
            drop(g);
            drop(words);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_come_back_empty_and_the_capacity_bounds_the_pool() {
        let pool = RmapPool::new();
        let a = Rmap::new_array(1000).unwrap();
        a[7].lock().add_rc(1 << 39);
        let addr = a.as_ptr() as usize;
        pool.give(a);
        assert_eq!(pool.pooled_bytes(), 0, "capacity 0 keeps nothing");
        pool.set_capacity(8000);
        let a = Rmap::new_array(1000).unwrap();
        a[999].lock().add_rc(1 << 40);
        let addr2 = a.as_ptr() as usize;
        pool.give(a);
        pool.give(Rmap::new_array(10).unwrap());
        assert_eq!(pool.pooled_bytes(), 8000, "the second array does not fit");
        assert!(pool.take(10).is_none());
        let a = pool.take(1000).unwrap();
        assert_eq!(a.as_ptr() as usize, addr2, "the same memory comes back");
        assert!(a.iter().all(|w| w.load().0 == 0));
        let _ = addr;
        pool.give(a);
        pool.set_capacity(0);
        assert_eq!(pool.pooled_bytes(), 0);
    }
}
