//! Baseline reverse maps the rmap benchmarks compare the ring against (feature
//! `baselines`, std only; used by `benches/ring.rs` and by `revmap bench rmap`).
//!
//! Each baseline maps a guest frame to the HPTE indices mapping it, with the operations
//! the ring provides: link at the tail, unlink a given index (keeping order), count and
//! iterate, each under the structure's lock. They are the obvious alternatives to the
//! intrusive ring:
//!
//! * [`MutexHashMap`]: `Mutex<HashMap<u64, Vec<u32>>>`, one global lock, a vector per
//!   frame; unlink searches (O(n)); count is O(1).
//! * [`SlabList`]: a doubly linked ring per frame with nodes in a `slab::Slab` and a
//!   `ptex -> node` table for O(1) unlink, under one `Mutex` (the ring with its links
//!   moved out of the revmap into allocated nodes).
//! * [`SmallVecFrames`]: a `Mutex<SmallVec<[u32; 4]>>` per frame (per-frame lock, up to
//!   four entries inline); unlink searches.
//! * [`RingRmap`]: the ring itself ([`crate::ring`]) behind the same trait.
//!
//! [`BaselineRmap::bytes`] reports the memory each one holds, to compare with the ring's
//! fixed 8 bytes per frame plus 16 bytes per HPTE slot.
//!
//! Invariants: a frame or HPTE index outside the sizes given to `new` is an
//! [`RmapError::OutOfRange`], never a panic; a poisoned mutex is recovered (the data
//! is plain and every update is completed before unlocking). Callers must not link an
//! HPTE index that is already linked (the same precondition as the ring's `link`).

use crate::error::RmapError;
use crate::ring::{Revmap, RmapArray};
use crate::sync::{lock, Mutex, MutexGuard};
use slab::Slab;
use smallvec::SmallVec;
use std::collections::HashMap;
use std::vec::Vec;

/// The operations every benchmarked reverse map provides.
pub trait BaselineRmap: Sync + Sized {
    /// Short name used in benchmark ids.
    const NAME: &'static str;
    /// An empty map for `frames` guest frames and `npte` HPTE slots.
    fn new(frames: usize, npte: usize) -> Result<Self, RmapError>;
    /// Add `ptex` at the tail of `gfn`'s list.
    fn link(&self, gfn: u64, ptex: u32) -> Result<(), RmapError>;
    /// Remove `ptex` from `gfn`'s list, keeping order; false if absent.
    fn unlink(&self, gfn: u64, ptex: u32) -> Result<bool, RmapError>;
    /// Number of entries of `gfn`.
    fn count(&self, gfn: u64) -> Result<usize, RmapError>;
    /// Visit `gfn`'s entries in order; returns their sum (so the walk is not optimised out).
    fn sum(&self, gfn: u64) -> Result<u64, RmapError>;
    /// Bytes of memory held (capacity, not just length).
    fn bytes(&self) -> usize;
}

fn index(i: u64, len: usize) -> Result<usize, RmapError> {
    if i < len as u64 {
        Ok(i as usize)
    } else {
        Err(RmapError::OutOfRange {
            index: i,
            len: len as u64,
        })
    }
}

fn alloc_vec<T: Clone>(n: usize, v: T) -> Result<Vec<T>, RmapError> {
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| RmapError::Alloc {
        bytes: n.saturating_mul(core::mem::size_of::<T>()),
    })?;
    out.resize(n, v);
    Ok(out)
}

/// `Mutex<HashMap<u64, Vec<u32>>>`.
#[derive(Debug, Default)]
pub struct MutexHashMap(Mutex<HashMap<u64, Vec<u32>>>);

impl BaselineRmap for MutexHashMap {
    const NAME: &'static str = "mutex_hashmap";
    fn new(_frames: usize, _npte: usize) -> Result<Self, RmapError> {
        Ok(Self::default())
    }
    fn link(&self, gfn: u64, ptex: u32) -> Result<(), RmapError> {
        let mut m = lock(&self.0);
        m.try_reserve(1)
            .map_err(|_| RmapError::Alloc { bytes: 64 })?;
        push_ptex(m.entry(gfn).or_default(), ptex)
    }
    fn unlink(&self, gfn: u64, ptex: u32) -> Result<bool, RmapError> {
        let mut m = lock(&self.0);
        Ok(m.get_mut(&gfn).is_some_and(|v| remove_ptex(v, ptex)))
    }
    fn count(&self, gfn: u64) -> Result<usize, RmapError> {
        Ok(lock(&self.0).get(&gfn).map_or(0, Vec::len))
    }
    fn sum(&self, gfn: u64) -> Result<u64, RmapError> {
        let m = lock(&self.0);
        Ok(m.get(&gfn).map_or(0, |v| ptex_sum(v)))
    }
    fn bytes(&self) -> usize {
        let m = lock(&self.0);
        // hashbrown: one (key, value) slot plus one control byte per bucket.
        let buckets = m.capacity().next_power_of_two() * 8 / 7;
        buckets * (core::mem::size_of::<(u64, Vec<u32>)>() + 1)
            + m.values().map(|v| v.capacity() * 4).sum::<usize>()
    }
}

/// One node of [`SlabList`].
#[derive(Clone, Copy, Debug)]
struct Node {
    ptex: u32,
    prev: usize,
    next: usize,
}

#[derive(Debug)]
struct SlabInner {
    nodes: Slab<Node>,
    /// Head node key per frame.
    heads: Vec<Option<usize>>,
    /// Node key per HPTE index.
    key_of: Vec<usize>,
}

impl SlabInner {
    fn walk(&self, gfn: u64, mut f: impl FnMut(u32)) -> Result<usize, RmapError> {
        let Some(head) = self.heads[index(gfn, self.heads.len())?] else {
            return Ok(0);
        };
        let (mut k, mut n) = (head, 0);
        while let Some(node) = self.nodes.get(k) {
            f(node.ptex);
            n += 1;
            k = node.next;
            if k == head {
                break;
            }
        }
        Ok(n)
    }
}

/// Doubly linked rings of slab-allocated nodes under one mutex.
#[derive(Debug)]
pub struct SlabList(Mutex<SlabInner>);

impl BaselineRmap for SlabList {
    const NAME: &'static str = "slab_list";
    fn new(frames: usize, npte: usize) -> Result<Self, RmapError> {
        Ok(Self(Mutex::new(SlabInner {
            nodes: Slab::new(),
            heads: alloc_vec(frames, None)?,
            key_of: alloc_vec(npte, usize::MAX)?,
        })))
    }
    fn link(&self, gfn: u64, ptex: u32) -> Result<(), RmapError> {
        let mut s = lock(&self.0);
        let s = &mut *s;
        let f = index(gfn, s.heads.len())?;
        let p = index(u64::from(ptex), s.key_of.len())?;
        let key = s.nodes.vacant_key();
        let node = match s.heads[f] {
            Some(h) => {
                let tail = s.nodes.get(h).map_or(h, |n| n.prev);
                if let Some(t) = s.nodes.get_mut(tail) {
                    t.next = key;
                }
                if let Some(hn) = s.nodes.get_mut(h) {
                    hn.prev = key;
                }
                Node {
                    ptex,
                    prev: tail,
                    next: h,
                }
            }
            None => {
                s.heads[f] = Some(key);
                Node {
                    ptex,
                    prev: key,
                    next: key,
                }
            }
        };
        s.nodes.insert(node);
        s.key_of[p] = key;
        Ok(())
    }
    fn unlink(&self, gfn: u64, ptex: u32) -> Result<bool, RmapError> {
        let mut s = lock(&self.0);
        let s = &mut *s;
        let f = index(gfn, s.heads.len())?;
        let p = index(u64::from(ptex), s.key_of.len())?;
        let key = s.key_of[p];
        let Some(n) = s.nodes.try_remove(key) else {
            return Ok(false);
        };
        s.key_of[p] = usize::MAX;
        if n.next == key {
            s.heads[f] = None;
        } else {
            if let Some(pn) = s.nodes.get_mut(n.prev) {
                pn.next = n.next;
            }
            if let Some(nn) = s.nodes.get_mut(n.next) {
                nn.prev = n.prev;
            }
            if s.heads[f] == Some(key) {
                s.heads[f] = Some(n.next);
            }
        }
        Ok(true)
    }
    fn count(&self, gfn: u64) -> Result<usize, RmapError> {
        lock(&self.0).walk(gfn, |_| ())
    }
    fn sum(&self, gfn: u64) -> Result<u64, RmapError> {
        let mut t = 0;
        lock(&self.0).walk(gfn, |p| t += u64::from(p))?;
        Ok(t)
    }
    fn bytes(&self) -> usize {
        let s = lock(&self.0);
        // A slab entry is an enum of the node and a free-list index.
        s.nodes.capacity() * core::mem::size_of::<Result<Node, usize>>()
            + s.heads.capacity() * core::mem::size_of::<Option<usize>>()
            + s.key_of.capacity() * core::mem::size_of::<usize>()
    }
}

/// A growable list of HPTE indices (`Vec` or `SmallVec`), as two baselines keep per frame.
trait PtexVec: core::ops::Deref<Target = [u32]> {
    /// Makes room for one more index.
    fn reserve_one(&mut self) -> Result<(), RmapError>;
    /// Appends an index (room reserved).
    fn push_one(&mut self, ptex: u32);
    /// Removes the index at `i`, keeping the order.
    fn remove_at(&mut self, i: usize);
}

/// Implements [`PtexVec`] by the inherent methods both list types share.
macro_rules! impl_ptex_vec {
    ($($t:ty),*) => {$(
        impl PtexVec for $t {
            fn reserve_one(&mut self) -> Result<(), RmapError> {
                self.try_reserve(1).map_err(|_| RmapError::Alloc { bytes: 4 })
            }
            fn push_one(&mut self, ptex: u32) {
                self.push(ptex);
            }
            fn remove_at(&mut self, i: usize) {
                self.remove(i);
            }
        }
    )*};
}

impl_ptex_vec!(Vec<u32>, SmallVec<[u32; 4]>);

/// Appends `ptex` to `v`, failing cleanly when memory runs out.
fn push_ptex(v: &mut impl PtexVec, ptex: u32) -> Result<(), RmapError> {
    v.reserve_one()?;
    v.push_one(ptex);
    Ok(())
}

/// Removes the first `ptex` from `v`; whether it was there.
fn remove_ptex(v: &mut impl PtexVec, ptex: u32) -> bool {
    match v.iter().position(|&p| p == ptex) {
        Some(i) => {
            v.remove_at(i);
            true
        }
        None => false,
    }
}

/// The sum of the indices (the benchmarks' checksum).
fn ptex_sum(v: &[u32]) -> u64 {
    v.iter().map(|&p| u64::from(p)).sum()
}

/// A `Mutex<SmallVec<[u32; 4]>>` per frame.
#[derive(Debug)]
pub struct SmallVecFrames(Vec<Mutex<SmallVec<[u32; 4]>>>);

impl SmallVecFrames {
    fn frame(&self, gfn: u64) -> Result<MutexGuard<'_, SmallVec<[u32; 4]>>, RmapError> {
        Ok(lock(&self.0[index(gfn, self.0.len())?]))
    }
}

impl BaselineRmap for SmallVecFrames {
    const NAME: &'static str = "smallvec_frames";
    fn new(frames: usize, _npte: usize) -> Result<Self, RmapError> {
        let mut v = Vec::new();
        v.try_reserve_exact(frames).map_err(|_| RmapError::Alloc {
            bytes: frames.saturating_mul(core::mem::size_of::<Mutex<SmallVec<[u32; 4]>>>()),
        })?;
        v.extend((0..frames).map(|_| Mutex::new(SmallVec::new())));
        Ok(Self(v))
    }
    fn link(&self, gfn: u64, ptex: u32) -> Result<(), RmapError> {
        push_ptex(&mut *self.frame(gfn)?, ptex)
    }
    fn unlink(&self, gfn: u64, ptex: u32) -> Result<bool, RmapError> {
        Ok(remove_ptex(&mut *self.frame(gfn)?, ptex))
    }
    fn count(&self, gfn: u64) -> Result<usize, RmapError> {
        Ok(self.frame(gfn)?.len())
    }
    fn sum(&self, gfn: u64) -> Result<u64, RmapError> {
        Ok(ptex_sum(&self.frame(gfn)?))
    }
    fn bytes(&self) -> usize {
        self.0.capacity() * core::mem::size_of::<Mutex<SmallVec<[u32; 4]>>>()
            + self
                .0
                .iter()
                .map(|m| {
                    let v = lock(m);
                    if v.spilled() {
                        v.capacity() * 4
                    } else {
                        0
                    }
                })
                .sum::<usize>()
    }
}

/// The HPT rmap ring ([`RmapArray`] + [`Revmap`]) under the same interface.
#[derive(Debug)]
pub struct RingRmap {
    rev: Revmap,
    arr: RmapArray,
}

impl BaselineRmap for RingRmap {
    const NAME: &'static str = "ring";
    fn new(frames: usize, npte: usize) -> Result<Self, RmapError> {
        Ok(Self {
            rev: Revmap::new(npte as u64)?,
            arr: RmapArray::new(frames as u64)?,
        })
    }
    #[inline]
    fn link(&self, gfn: u64, ptex: u32) -> Result<(), RmapError> {
        self.rev.try_link(self.arr.get(gfn)?.lock(), ptex)?;
        Ok(())
    }
    #[inline]
    fn unlink(&self, gfn: u64, ptex: u32) -> Result<bool, RmapError> {
        self.rev.try_unlink(&mut self.arr.get(gfn)?.lock(), ptex)
    }
    #[inline]
    fn count(&self, gfn: u64) -> Result<usize, RmapError> {
        let g = self.arr.get(gfn)?.lock();
        Ok(self.rev.chain_len(&g))
    }
    #[inline]
    fn sum(&self, gfn: u64) -> Result<u64, RmapError> {
        let g = self.arr.get(gfn)?.lock();
        Ok(self.rev.iter(&g).map(u64::from).sum())
    }
    fn bytes(&self) -> usize {
        self.arr.bytes() + self.rev.bytes()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn same_behaviour<M: BaselineRmap>() {
        let m = M::new(4, 16).unwrap();
        for p in [3, 5, 7] {
            m.link(1, p).unwrap();
        }
        m.link(2, 9).unwrap();
        assert_eq!(m.count(1).unwrap(), 3);
        assert_eq!(m.sum(1).unwrap(), 15);
        assert!(m.unlink(1, 5).unwrap());
        assert_eq!(m.count(1).unwrap(), 2);
        assert_eq!(m.sum(1).unwrap(), 10);
        assert!(m.unlink(1, 3).unwrap());
        assert!(m.unlink(1, 7).unwrap());
        assert_eq!(m.count(1).unwrap(), 0);
        assert_eq!(m.count(2).unwrap(), 1);
        assert!(m.bytes() > 0);
    }

    #[test]
    fn every_design_behaves_alike() {
        same_behaviour::<MutexHashMap>();
        same_behaviour::<SlabList>();
        same_behaviour::<SmallVecFrames>();
        same_behaviour::<RingRmap>();
    }

    #[test]
    fn out_of_range_is_an_error() {
        assert!(SlabList::new(2, 2).unwrap().link(5, 0).is_err());
        assert!(SlabList::new(2, 2).unwrap().link(0, 9).is_err());
        assert!(SmallVecFrames::new(2, 2).unwrap().count(7).is_err());
        assert!(RingRmap::new(2, 2).unwrap().link(3, 0).is_err());
    }
}
