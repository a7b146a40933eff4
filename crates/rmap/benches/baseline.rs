//! Baseline reverse maps the rmap benchmarks compare against (shared module: a bench
//! includes it with `mod baseline;`; it is also declared as a non-running bench target so
//! cargo does not try to run it on its own).
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
//!
//! [`BaselineRmap::bytes`] reports the memory each one holds, to compare with the ring's
//! fixed 8 bytes per frame plus 16 bytes per HPTE slot.
#![allow(dead_code)] // each bench uses a subset

use slab::Slab;
use smallvec::SmallVec;
use std::collections::HashMap;
use std::sync::Mutex;

/// The operations every benchmarked reverse map provides.
pub trait BaselineRmap: Sync {
    /// Short name used in benchmark ids.
    const NAME: &'static str;
    /// An empty map for `frames` guest frames and `npte` HPTE slots.
    fn new(frames: usize, npte: usize) -> Self;
    /// Add `ptex` at the tail of `gfn`'s list.
    fn link(&self, gfn: u64, ptex: u32);
    /// Remove `ptex` from `gfn`'s list, keeping order; false if absent.
    fn unlink(&self, gfn: u64, ptex: u32) -> bool;
    /// Number of entries of `gfn`.
    fn count(&self, gfn: u64) -> usize;
    /// Visit `gfn`'s entries in order; returns their sum (so the walk is not optimised out).
    fn sum(&self, gfn: u64) -> u64;
    /// Bytes of memory held (capacity, not just length).
    fn bytes(&self) -> usize;
}

/// `Mutex<HashMap<u64, Vec<u32>>>`.
#[derive(Default)]
pub struct MutexHashMap(Mutex<HashMap<u64, Vec<u32>>>);

impl BaselineRmap for MutexHashMap {
    const NAME: &'static str = "mutex_hashmap";
    fn new(_frames: usize, _npte: usize) -> Self {
        Self::default()
    }
    fn link(&self, gfn: u64, ptex: u32) {
        self.0.lock().unwrap().entry(gfn).or_default().push(ptex);
    }
    fn unlink(&self, gfn: u64, ptex: u32) -> bool {
        let mut m = self.0.lock().unwrap();
        let Some(v) = m.get_mut(&gfn) else {
            return false;
        };
        match v.iter().position(|&p| p == ptex) {
            Some(i) => {
                v.remove(i);
                true
            }
            None => false,
        }
    }
    fn count(&self, gfn: u64) -> usize {
        self.0.lock().unwrap().get(&gfn).map_or(0, Vec::len)
    }
    fn sum(&self, gfn: u64) -> u64 {
        let m = self.0.lock().unwrap();
        m.get(&gfn)
            .map_or(0, |v| v.iter().map(|&p| u64::from(p)).sum())
    }
    fn bytes(&self) -> usize {
        let m = self.0.lock().unwrap();
        // hashbrown: one (key, value) slot plus one control byte per bucket.
        let buckets = m.capacity().next_power_of_two() * 8 / 7;
        buckets * (std::mem::size_of::<(u64, Vec<u32>)>() + 1)
            + m.values().map(|v| v.capacity() * 4).sum::<usize>()
    }
}

/// One node of [`SlabList`].
#[derive(Clone, Copy)]
struct Node {
    ptex: u32,
    prev: usize,
    next: usize,
}

struct SlabInner {
    nodes: Slab<Node>,
    /// Head node key per frame.
    heads: Vec<Option<usize>>,
    /// Node key per HPTE index.
    key_of: Vec<usize>,
}

/// Doubly linked rings of slab-allocated nodes under one mutex.
pub struct SlabList(Mutex<SlabInner>);

impl BaselineRmap for SlabList {
    const NAME: &'static str = "slab_list";
    fn new(frames: usize, npte: usize) -> Self {
        Self(Mutex::new(SlabInner {
            nodes: Slab::new(),
            heads: vec![None; frames],
            key_of: vec![usize::MAX; npte],
        }))
    }
    fn link(&self, gfn: u64, ptex: u32) {
        let mut s = self.0.lock().unwrap();
        let s = &mut *s;
        let head = s.heads[gfn as usize];
        let key = s.nodes.vacant_key();
        let node = match head {
            Some(h) => {
                let tail = s.nodes[h].prev;
                s.nodes[tail].next = key;
                s.nodes[h].prev = key;
                Node {
                    ptex,
                    prev: tail,
                    next: h,
                }
            }
            None => {
                s.heads[gfn as usize] = Some(key);
                Node {
                    ptex,
                    prev: key,
                    next: key,
                }
            }
        };
        s.nodes.insert(node);
        s.key_of[ptex as usize] = key;
    }
    fn unlink(&self, gfn: u64, ptex: u32) -> bool {
        let mut s = self.0.lock().unwrap();
        let s = &mut *s;
        let key = s.key_of[ptex as usize];
        let Some(n) = s.nodes.try_remove(key) else {
            return false;
        };
        s.key_of[ptex as usize] = usize::MAX;
        if n.next == key {
            s.heads[gfn as usize] = None;
        } else {
            s.nodes[n.prev].next = n.next;
            s.nodes[n.next].prev = n.prev;
            if s.heads[gfn as usize] == Some(key) {
                s.heads[gfn as usize] = Some(n.next);
            }
        }
        true
    }
    fn count(&self, gfn: u64) -> usize {
        self.walk(gfn, |_| ())
    }
    fn sum(&self, gfn: u64) -> u64 {
        let mut t = 0;
        self.walk(gfn, |p| t += u64::from(p));
        t
    }
    fn bytes(&self) -> usize {
        let s = self.0.lock().unwrap();
        // A slab entry is an enum of the node and a free-list index.
        s.nodes.capacity() * std::mem::size_of::<Result<Node, usize>>()
            + s.heads.capacity() * std::mem::size_of::<Option<usize>>()
            + s.key_of.capacity() * std::mem::size_of::<usize>()
    }
}

impl SlabList {
    fn walk(&self, gfn: u64, mut f: impl FnMut(u32)) -> usize {
        let s = self.0.lock().unwrap();
        let Some(head) = s.heads[gfn as usize] else {
            return 0;
        };
        let (mut k, mut n) = (head, 0);
        loop {
            let node = s.nodes[k];
            f(node.ptex);
            n += 1;
            k = node.next;
            if k == head {
                return n;
            }
        }
    }
}

/// A `Mutex<SmallVec<[u32; 4]>>` per frame.
pub struct SmallVecFrames(Vec<Mutex<SmallVec<[u32; 4]>>>);

impl BaselineRmap for SmallVecFrames {
    const NAME: &'static str = "smallvec_frames";
    fn new(frames: usize, _npte: usize) -> Self {
        Self((0..frames).map(|_| Mutex::new(SmallVec::new())).collect())
    }
    fn link(&self, gfn: u64, ptex: u32) {
        self.0[gfn as usize].lock().unwrap().push(ptex);
    }
    fn unlink(&self, gfn: u64, ptex: u32) -> bool {
        let mut v = self.0[gfn as usize].lock().unwrap();
        match v.iter().position(|&p| p == ptex) {
            Some(i) => {
                v.remove(i);
                true
            }
            None => false,
        }
    }
    fn count(&self, gfn: u64) -> usize {
        self.0[gfn as usize].lock().unwrap().len()
    }
    fn sum(&self, gfn: u64) -> u64 {
        self.0[gfn as usize]
            .lock()
            .unwrap()
            .iter()
            .map(|&p| u64::from(p))
            .sum()
    }
    fn bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<Mutex<SmallVec<[u32; 4]>>>()
            + self
                .0
                .iter()
                .map(|m| {
                    let v = m.lock().unwrap();
                    if v.spilled() {
                        v.capacity() * 4
                    } else {
                        0
                    }
                })
                .sum::<usize>()
    }
}
