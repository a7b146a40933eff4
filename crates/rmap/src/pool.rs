//! Node pools: an index-based arena for pte_list descriptors and nested rmap nodes.
//!
//! KVM allocates rmap descriptors from per-vCPU memory caches topped up *before* the MMU
//! lock is taken (`mmu_topup_memory_caches`), so that allocation under the lock never
//! sleeps and never fails: the fault path never fails for want of memory once its cache is
//! topped up. This module is that design:
//!
//! * A [`Pool`] owns the nodes. They live in up to [`NCHUNKS`] chunks of geometrically
//!   growing size (chunk `k` holds `2^CHUNK_BASE_SHIFT << k` nodes), each published once
//!   through a [`OnceBox`] in a fixed directory. A chunk is never moved or freed before
//!   the pool is dropped, so a node's address is stable: readers holding an index (under
//!   the head lock that owns the node) never race with growth.
//! * Nodes are named by 32-bit [`NodeIdx`] indices (half a pointer: this is what lets a
//!   pte_list descriptor carry its link, two counters and 14 entries in 128 bytes, and
//!   it makes links checkable: an index is either inside the pool or rejected).
//! * A [`NodeCache`] is a per-caller reservation (KVM's `kvm_mmu_memory_cache`):
//!   [`NodeCache::reserve`] tops it up to `n` credits, growing the pool if needed, and
//!   fails cleanly with [`RmapError::Alloc`]; it must be called before any head lock is
//!   taken. [`NodeCache::alloc`] draws one credit and pops a node from the shared free
//!   list; it never allocates memory and returns [`RmapError::PoolExhausted`] if the
//!   caller did not reserve. Unused credits go back to the pool when the cache drops.
//! * Freed nodes go on a lock-free free list (a Treiber stack of indices with a 32-bit
//!   ABA tag in the head word), threaded through a field each node type lends for the
//!   purpose ([`PoolNode::set_free_link`]). A node also carries a *vacant* marker,
//!   flipped by an atomic read-modify-write, so a double free is detected exactly and
//!   reported as [`PoolError::DoubleFree`] without touching the free list.
//!
//! # Invariants (checked by [`Pool::check`] at quiescent points)
//!
//! 1. Every node on the free list is vacant, lies inside the published chunks and is on
//!    the list once; every vacant node is on the list.
//! 2. `in_use + free == capacity` (in_use = nodes not vacant).
//! 3. `unreserved <= free`: the free nodes not promised to any cache never exceed the
//!    free nodes (the difference is the credits held by live caches).
//!
//! Accounting guarantees that a caller holding a credit always finds a node on the free
//! list: a credit is created only after the node it stands for was pushed (the
//! `unreserved` counter is increased with `Release` after the push and taken with
//! `Acquire`), and every popper holds a credit.
//!
//! Node fields are atomics accessed `Relaxed` under the lock of the head that owns the
//! node; the pool's own atomics provide the ordering between the freeing and the next
//! allocating owner (the free-list push is `Release`, the pop `Acquire`).
//!
//! Under `cfg(loom)` the chunk base shrinks to 2 nodes so that models stay small. The
//! directory cells are [`OnceBox`]es from [`crate::sync`]; publication of a chunk
//! happens-before any index of it is handed out (the free-list CAS), and the cell's
//! own Release/Acquire pair (model-checked under loom) publishes its contents.

use crate::bitlock::BitLockGuard;
use crate::error::{try_boxed_slice, RmapError};
use crate::sync::{AtomicU64, OnceBox, Ordering};
use alloc::boxed::Box;
use alloc::vec::Vec;

/// log2 of the number of nodes in chunk 0.
#[cfg(not(loom))]
pub const CHUNK_BASE_SHIFT: u32 = 6;
/// log2 of the number of nodes in chunk 0 (tiny under loom).
#[cfg(loom)]
pub const CHUNK_BASE_SHIFT: u32 = 1;
const CHUNK_BASE: u64 = 1 << CHUNK_BASE_SHIFT;
/// Number of chunk slots in a pool's directory: enough for `2^32 - 2^CHUNK_BASE_SHIFT`
/// nodes, the most 32-bit indices can name with [`NIL`] left free.
pub const NCHUNKS: usize = (32 - CHUNK_BASE_SHIFT) as usize;
/// The largest number of nodes a pool can hold.
pub const MAX_NODES: u64 = chunk_start(NCHUNKS);
/// The raw index value that means "no node" in links.
pub const NIL: u32 = u32::MAX;

const _: () = assert!(MAX_NODES <= NIL as u64);

/// Grow-lock bit of the pool's chunk-count word.
const GROW_LOCK: u64 = 1 << 63;

/// First index of chunk `k`.
const fn chunk_start(k: usize) -> u64 {
    CHUNK_BASE * ((1u64 << k) - 1)
}

/// Number of nodes in chunk `k`.
const fn chunk_len(k: usize) -> u64 {
    CHUNK_BASE << k
}

/// (chunk, offset) of index `i`.
#[inline(always)]
const fn locate(i: u32) -> (usize, usize) {
    let q = ((i as u64) >> CHUNK_BASE_SHIFT) + 1;
    let k = (63 - q.leading_zeros()) as usize;
    (k, (i as u64 - chunk_start(k)) as usize)
}

/// Index of a node in a [`Pool`]: 32 bits, never [`NIL`].
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeIdx(u32);

impl NodeIdx {
    /// A node index; `None` for [`NIL`].
    #[inline(always)]
    pub const fn new(raw: u32) -> Option<Self> {
        if raw == NIL {
            None
        } else {
            Some(Self(raw))
        }
    }

    /// The raw index.
    #[inline(always)]
    pub const fn raw(self) -> u32 {
        self.0
    }
}

impl core::fmt::Debug for NodeIdx {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "NodeIdx({})", self.0)
    }
}

impl core::fmt::Display for NodeIdx {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A node type that can live in a [`Pool`].
///
/// The pool needs two things from a node: a *vacant* marker it can flip atomically (so
/// double frees are caught) and a 32-bit free-list link, which may reuse a field that is
/// meaningless while the node is vacant. All methods are called by the pool only; node
/// owners must not touch a node after freeing it.
pub trait PoolNode: Send + Sync + Sized {
    /// A fresh, vacant node.
    fn vacant() -> Self;
    /// Mark the node in use; `false` if it was not vacant.
    fn claim(&self) -> bool;
    /// Mark the node vacant; `false` if it was vacant already (a double free).
    fn release(&self) -> bool;
    /// Whether the node is vacant.
    fn is_vacant(&self) -> bool;
    /// The free-list link of a vacant node.
    fn free_link(&self) -> u32;
    /// Set the free-list link of a vacant node.
    fn set_free_link(&self, next: u32);
}

/// Errors of pool operations other than reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// A reservation or allocation error.
    #[error(transparent)]
    Rmap(#[from] RmapError),
    /// The node was already vacant.
    #[error("node {0} freed twice")]
    DoubleFree(NodeIdx),
    /// The index names no node of this pool.
    #[error("node index {0} is outside the pool")]
    BadIndex(NodeIdx),
}

/// What [`Pool::check`] found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolCheckError {
    /// A free-list link names no node of the pool.
    #[error("free list links to index {0}, outside the pool")]
    LinkOutOfRange(u32),
    /// A node appears twice on the free list (or the list has a cycle).
    #[error("node {0} is on the free list twice")]
    DuplicateFree(u32),
    /// A node on the free list is marked in use.
    #[error("node {0} is on the free list but marked in use")]
    FreeNodeInUse(u32),
    /// Some vacant nodes are not on the free list.
    #[error("{vacant} vacant nodes but {listed} on the free list")]
    VacantNotListed {
        /// Nodes marked vacant.
        vacant: u64,
        /// Nodes on the free list.
        listed: u64,
    },
    /// More nodes are unreserved than free.
    #[error("{unreserved} nodes unreserved but only {free} free")]
    OverReserved {
        /// The unreserved counter.
        unreserved: u64,
        /// Nodes on the free list.
        free: u64,
    },
    /// The checker could not allocate its scratch bitmap.
    #[error("checker allocation failed")]
    Alloc,
}

/// Pool accounting at a quiescent point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Nodes in the published chunks.
    pub capacity: u64,
    /// Nodes in use (not vacant).
    pub in_use: u64,
    /// Nodes on the free list.
    pub free: u64,
    /// Free nodes not promised to any cache.
    pub unreserved: u64,
    /// Bytes of node memory (capacity × node size).
    pub node_bytes: u64,
}

/// An index-based arena of `T` nodes with stable addresses. See the module docs.
pub struct Pool<T> {
    dir: [OnceBox<[Box<[T]>; 1]>; NCHUNKS],
    /// Number of published chunks; bit 63 is the grow lock.
    chunks: AtomicU64,
    /// Free-list head: ABA tag in bits 32-63, head index (or [`NIL`]) in bits 0-31.
    free: AtomicU64,
    /// Free nodes not promised to any [`NodeCache`].
    unreserved: AtomicU64,
    /// Most nodes this pool may grow to.
    limit: u64,
}

impl<T: PoolNode> core::fmt::Debug for Pool<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Pool")
            .field("capacity", &self.capacity())
            .field("unreserved", &self.unreserved())
            .field("limit", &self.limit)
            .finish()
    }
}

impl<T: PoolNode> Default for Pool<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: PoolNode> Pool<T> {
    /// An empty pool that may grow to [`MAX_NODES`]. Allocates nothing.
    pub fn new() -> Self {
        Self::with_limit(MAX_NODES)
    }

    /// An empty pool that may grow to at most `max_nodes` nodes (a memory budget:
    /// reservations beyond it fail with [`RmapError::Alloc`]). Allocates nothing.
    pub fn with_limit(max_nodes: u64) -> Self {
        Self {
            dir: core::array::from_fn(|_| OnceBox::new()),
            chunks: AtomicU64::new(0),
            free: AtomicU64::new(NIL as u64),
            unreserved: AtomicU64::new(0),
            limit: max_nodes.min(MAX_NODES),
        }
    }

    /// Nodes in the published chunks. A caller that holds (or reached through a lock)
    /// any node index sees a capacity covering it: growth publishes the new count before
    /// crediting the new nodes.
    pub fn capacity(&self) -> u64 {
        // ORDERING: Relaxed: the caller's happens-before edge to the credit (or to the
        // lock holder that allocated) already orders it after `grow`'s Release publish;
        // coherence then forbids reading an older count. Chunk contents are reached
        // through `dir`.
        chunk_start((self.chunks.load(Ordering::Relaxed) & !GROW_LOCK) as usize)
    }

    /// Free nodes not currently promised to a cache (a snapshot).
    pub fn unreserved(&self) -> u64 {
        // ORDERING: Relaxed: a statistic.
        self.unreserved.load(Ordering::Relaxed)
    }

    /// The node at `idx`, if it lies in a published chunk.
    #[inline]
    pub fn node(&self, idx: NodeIdx) -> Option<&T> {
        let (k, off) = locate(idx.0);
        self.dir.get(k)?.get()?[0].get(off)
    }

    /// The node at `idx`, or [`PoolError::BadIndex`].
    #[inline]
    pub fn get(&self, idx: NodeIdx) -> Result<&T, PoolError> {
        self.node(idx).ok_or(PoolError::BadIndex(idx))
    }

    /// Publish chunks until at least `want` nodes are unreserved (or fail cleanly).
    fn grow(&self, want: u64) -> Result<(), RmapError> {
        let mut g = BitLockGuard::lock(&self.chunks, GROW_LOCK);
        // Another grower may have added capacity while we waited for the lock.
        // ORDERING: Acquire pairs with the Release increments below.
        let mut have = self.unreserved.load(Ordering::Acquire);
        while have < want {
            let k = g.value() as usize;
            let size = core::mem::size_of::<T>() as u64;
            if k >= NCHUNKS {
                return Err(RmapError::Alloc { bytes: usize::MAX });
            }
            let (start, len) = (chunk_start(k), chunk_len(k));
            let bytes = usize::try_from(len.saturating_mul(size)).unwrap_or(usize::MAX);
            if start + len > self.limit {
                return Err(RmapError::Alloc { bytes });
            }
            let n = usize::try_from(len).map_err(|_| RmapError::Alloc { bytes })?;
            let mut nodes = Some(try_boxed_slice(n, |_| T::vacant())?);
            let cell: Box<[Box<[T]>]> = try_boxed_slice(1, |_| nodes.take().unwrap_or_default())?;
            let cell: Box<[Box<[T]>; 1]> =
                cell.try_into().map_err(|_| RmapError::Alloc { bytes: 0 })?;
            // Thread the new nodes into a chain first..last (private until pushed).
            for (j, node) in cell[0].iter().enumerate() {
                node.set_free_link((start + j as u64 + 1) as u32);
            }
            let slot = self.dir.get(k).ok_or(RmapError::Alloc { bytes })?;
            slot.set(cell).map_err(|_| RmapError::Alloc { bytes })?;
            g.set(k as u64 + 1);
            // Publish the new capacity (Release, lock still held) before any credit for
            // the new nodes exists: whoever Acquires such a credit, or a list built from
            // such nodes, then reads a capacity that covers them (walk bounds use it).
            g.publish();
            self.push_chain(start as u32, (start + len - 1) as u32);
            // ORDERING: Release, so a reserver that Acquires this credit also sees the
            // push above (and so finds a node when it pops).
            self.unreserved.fetch_add(len, Ordering::Release);
            have += len;
        }
        Ok(())
    }

    /// Push the chain `first..=last` (already linked) on the free list.
    fn push_chain(&self, first: u32, last: u32) {
        let Some(last_node) = NodeIdx::new(last).and_then(|i| self.node(i)) else {
            return;
        };
        // ORDERING: Relaxed: the CAS below validates the value.
        let mut h = self.free.load(Ordering::Relaxed);
        loop {
            last_node.set_free_link(h as u32);
            let new = (((h >> 32).wrapping_add(1)) << 32) | first as u64;
            // ORDERING: Release publishes the links and every write the freeing owner
            // made to the nodes to the next popper's Acquire.
            match self
                .free
                .compare_exchange_weak(h, new, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(cur) => h = cur,
            }
        }
    }

    /// Pop a node off the free list.
    fn pop(&self) -> Option<NodeIdx> {
        // ORDERING: Acquire pairs with the pusher's Release, so the link read below is
        // the one written before the push.
        let mut h = self.free.load(Ordering::Acquire);
        loop {
            let idx = NodeIdx::new(h as u32)?;
            let next = self.node(idx)?.free_link();
            let new = (((h >> 32).wrapping_add(1)) << 32) | next as u64;
            // ORDERING: Acquire on success: we now own the node and must see the
            // previous owner's writes (published by its Release push). The ABA tag makes
            // a stale `next` fail the CAS.
            match self
                .free
                .compare_exchange_weak(h, new, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) => return Some(idx),
                Err(cur) => h = cur,
            }
        }
    }

    /// Take up to `want` unreserved credits, growing the pool if needed.
    fn take_credits(&self, want: u64) -> Result<(), RmapError> {
        // ORDERING: Acquire pairs with the Release increments (grow, free), so the
        // nodes these credits stand for are visible on the free list.
        let mut u = self.unreserved.load(Ordering::Acquire);
        loop {
            if u >= want {
                // ORDERING: Acquire as above; failure just retries.
                match self.unreserved.compare_exchange_weak(
                    u,
                    u - want,
                    Ordering::Acquire,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return Ok(()),
                    Err(cur) => u = cur,
                }
            } else {
                self.grow(want)?;
                // ORDERING: Acquire, as above.
                u = self.unreserved.load(Ordering::Acquire);
            }
        }
    }

    /// Return `n` credits to the pool.
    fn return_credits(&self, n: u64) {
        if n > 0 {
            // ORDERING: Release, as for every increment of `unreserved`.
            self.unreserved.fetch_add(n, Ordering::Release);
        }
    }

    /// Free the node at `idx`: mark it vacant and push it on the free list.
    ///
    /// The caller must have unlinked it from every structure; its fields are not
    /// cleared. Fails with [`PoolError::DoubleFree`] (nothing changes) if it was vacant,
    /// or [`PoolError::BadIndex`].
    pub fn free(&self, idx: NodeIdx) -> Result<(), PoolError> {
        let node = self.get(idx)?;
        if !node.release() {
            return Err(PoolError::DoubleFree(idx));
        }
        self.push_chain(idx.0, idx.0);
        // ORDERING: Release: the credit becomes takeable only after the push.
        self.unreserved.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Free a chain of nodes with one free-list push and one credit update (instead of
    /// two atomic read-modify-writes per node): each node is still marked vacant with
    /// its own RMW, so double frees are caught. `idxs` may read a node's fields to find
    /// the next index: a node's free link is written only after the next index has been
    /// produced. On error (double free, bad index) the nodes freed so far are pushed and
    /// the error is returned. Returns how many nodes were freed.
    pub fn free_chain<I: IntoIterator<Item = NodeIdx>>(&self, idxs: I) -> Result<u64, PoolError> {
        let mut first: Option<NodeIdx> = None;
        let mut last: Option<(NodeIdx, &T)> = None;
        let mut n = 0u64;
        let mut result = Ok(());
        for idx in idxs {
            let node = match self.get(idx) {
                Ok(node) => node,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            if !node.release() {
                result = Err(PoolError::DoubleFree(idx));
                break;
            }
            match last {
                Some((_, prev)) => prev.set_free_link(idx.0),
                None => first = Some(idx),
            }
            last = Some((idx, node));
            n += 1;
        }
        if let (Some(f), Some((l, _))) = (first, last) {
            self.push_chain(f.0, l.0);
            // ORDERING: Release: the credits become takeable only after the push.
            self.unreserved.fetch_add(n, Ordering::Release);
        }
        result.map(|()| n)
    }

    /// Check the pool's accounting (module invariants 1-3). Call only at a quiescent
    /// point (no concurrent alloc, free or reserve).
    pub fn check(&self) -> Result<PoolStats, PoolCheckError> {
        let capacity = self.capacity();
        let words = usize::try_from(capacity.div_ceil(64)).map_err(|_| PoolCheckError::Alloc)?;
        let mut seen: Vec<u64> = Vec::new();
        seen.try_reserve_exact(words)
            .map_err(|_| PoolCheckError::Alloc)?;
        seen.resize(words, 0);
        let mut free = 0u64;
        // ORDERING: Acquire: the checker runs at a quiescent point; Acquire makes the
        // last push's links visible.
        let mut cur = self.free.load(Ordering::Acquire) as u32;
        while let Some(idx) = NodeIdx::new(cur) {
            if u64::from(cur) >= capacity {
                return Err(PoolCheckError::LinkOutOfRange(cur));
            }
            let node = self.node(idx).ok_or(PoolCheckError::LinkOutOfRange(cur))?;
            let (w, b) = ((cur / 64) as usize, cur % 64);
            let word = seen.get_mut(w).ok_or(PoolCheckError::LinkOutOfRange(cur))?;
            if *word & (1 << b) != 0 {
                return Err(PoolCheckError::DuplicateFree(cur));
            }
            *word |= 1 << b;
            if !node.is_vacant() {
                return Err(PoolCheckError::FreeNodeInUse(cur));
            }
            free += 1;
            cur = node.free_link();
        }
        let mut vacant = 0u64;
        for cell in self.dir.iter() {
            let Some(chunk) = cell.get() else { break };
            vacant += chunk[0].iter().filter(|n| n.is_vacant()).count() as u64;
        }
        if vacant != free {
            return Err(PoolCheckError::VacantNotListed {
                vacant,
                listed: free,
            });
        }
        let unreserved = self.unreserved();
        if unreserved > free {
            return Err(PoolCheckError::OverReserved { unreserved, free });
        }
        Ok(PoolStats {
            capacity,
            in_use: capacity - free,
            free,
            unreserved,
            node_bytes: capacity * core::mem::size_of::<T>() as u64,
        })
    }
}

/// A lookup cursor over a [`Pool`] that remembers the last chunk it visited, so that
/// walking a chain whose nodes share a chunk costs one bounds check per hop instead of
/// the directory and chunk loads of [`Pool::node`].
pub struct PoolCursor<'p, T> {
    pool: &'p Pool<T>,
    base: u32,
    chunk: &'p [T],
}

impl<T: PoolNode> core::fmt::Debug for PoolCursor<'_, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PoolCursor")
            .field("base", &self.base)
            .field("len", &self.chunk.len())
            .finish()
    }
}

impl<'p, T: PoolNode> PoolCursor<'p, T> {
    /// A cursor with no chunk cached yet.
    #[inline]
    pub fn new(pool: &'p Pool<T>) -> Self {
        Self {
            pool,
            base: 0,
            chunk: &[],
        }
    }

    /// The node at `idx` (as [`Pool::node`]).
    #[inline(always)]
    pub fn node(&mut self, idx: NodeIdx) -> Option<&'p T> {
        // Below `base` the subtraction wraps to a huge offset and misses.
        let off = idx.0.wrapping_sub(self.base) as usize;
        if let Some(n) = self.chunk.get(off) {
            return Some(n);
        }
        let (k, off) = locate(idx.0);
        let chunk: &'p [T] = &self.pool.dir.get(k)?.get()?[0];
        self.base = chunk_start(k) as u32;
        self.chunk = chunk;
        chunk.get(off)
    }
}

/// A per-caller reservation of pool nodes (KVM's `kvm_mmu_memory_cache`).
///
/// Top it up with [`reserve`](Self::reserve) before taking any head lock; allocate
/// under the lock with [`alloc`](Self::alloc), which never allocates memory. Credits
/// not used are returned to the pool when the cache is dropped.
pub struct NodeCache<'p, T: PoolNode> {
    pool: &'p Pool<T>,
    credits: u64,
}

impl<T: PoolNode> core::fmt::Debug for NodeCache<'_, T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NodeCache")
            .field("credits", &self.credits)
            .finish()
    }
}

impl<'p, T: PoolNode> NodeCache<'p, T> {
    /// An empty cache drawing on `pool`.
    pub fn new(pool: &'p Pool<T>) -> Self {
        Self { pool, credits: 0 }
    }

    /// The pool this cache draws on.
    #[inline(always)]
    pub fn pool(&self) -> &'p Pool<T> {
        self.pool
    }

    /// Nodes this cache may still allocate.
    #[inline(always)]
    pub fn credits(&self) -> u64 {
        self.credits
    }

    /// Top the cache up so that at least `n` allocations will succeed (KVM's
    /// `kvm_mmu_topup_memory_cache`). Grows the pool if needed; on failure (memory or
    /// the pool's limit) returns [`RmapError::Alloc`] and the cache keeps what it had.
    /// Call before taking any head lock.
    pub fn reserve(&mut self, n: u64) -> Result<(), RmapError> {
        if self.credits >= n {
            return Ok(());
        }
        let want = n - self.credits;
        self.pool.take_credits(want)?;
        self.credits += want;
        Ok(())
    }

    /// Allocate a node from reserved capacity: no memory is allocated. The node's
    /// fields hold whatever its previous owner left; the caller initialises them.
    /// Fails with [`RmapError::PoolExhausted`] if the cache holds no credit.
    #[inline]
    pub fn alloc(&mut self) -> Result<NodeIdx, RmapError> {
        if self.credits == 0 {
            return Err(RmapError::PoolExhausted);
        }
        // A credit guarantees a node on the free list (module docs); `None` would be an
        // accounting bug, reported rather than panicking.
        let idx = self.pool.pop().ok_or(RmapError::PoolExhausted)?;
        self.credits -= 1;
        match self.pool.node(idx) {
            Some(node) if node.claim() => Ok(idx),
            _ => Err(RmapError::PoolExhausted),
        }
    }

    /// Hand unused credits back to the pool now.
    pub fn release_all(&mut self) {
        self.pool.return_credits(self.credits);
        self.credits = 0;
    }
}

impl<T: PoolNode> Drop for NodeCache<'_, T> {
    fn drop(&mut self) {
        self.release_all();
    }
}

/// A minimal pool node for this crate's unit tests and its loom pool model: a payload
/// and a vacant-marker/free-link word. Not part of the API.
#[cfg(any(test, loom))]
#[doc(hidden)]
#[derive(Debug)]
pub struct TestNode {
    /// What the test stores in the node.
    pub payload: AtomicU64,
    state: AtomicU64,
}

#[cfg(any(test, loom))]
const TEST_VACANT: u64 = 1 << 40;

// ORDERING: Relaxed throughout the test node, as in the real node types: the
// marker RMWs decide ownership alone and the pool's free-list CAS orders contents.
#[cfg(any(test, loom))]
impl PoolNode for TestNode {
    fn vacant() -> Self {
        Self {
            payload: AtomicU64::new(0),
            state: AtomicU64::new(TEST_VACANT | NIL as u64),
        }
    }
    fn claim(&self) -> bool {
        self.state.swap(0, Ordering::Relaxed) & TEST_VACANT != 0
    }
    fn release(&self) -> bool {
        self.state.fetch_or(TEST_VACANT, Ordering::Relaxed) & TEST_VACANT == 0
    }
    fn is_vacant(&self) -> bool {
        self.state.load(Ordering::Relaxed) & TEST_VACANT != 0
    }
    fn free_link(&self) -> u32 {
        self.state.load(Ordering::Relaxed) as u32
    }
    fn set_free_link(&self, next: u32) {
        self.state
            .store(TEST_VACANT | next as u64, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn locate_matches_chunk_geometry() {
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(CHUNK_BASE as u32 - 1), (0, CHUNK_BASE as usize - 1));
        assert_eq!(locate(CHUNK_BASE as u32), (1, 0));
        assert_eq!(
            locate(3 * CHUNK_BASE as u32 - 1),
            (1, 2 * CHUNK_BASE as usize - 1)
        );
        assert_eq!(locate(3 * CHUNK_BASE as u32), (2, 0));
        let last = (MAX_NODES - 1) as u32;
        let (k, off) = locate(last);
        assert_eq!(k, NCHUNKS - 1);
        assert_eq!(chunk_start(k) + off as u64, u64::from(last));
        assert_eq!(off as u64, chunk_len(k) - 1);
        assert_eq!(locate(last + 1).0, NCHUNKS, "past the directory");
        assert!(MAX_NODES <= u64::from(NIL));
    }

    #[test]
    fn reserve_alloc_free_accounting() {
        let pool: Pool<TestNode> = Pool::new();
        assert_eq!(pool.capacity(), 0);
        let mut c = NodeCache::new(&pool);
        assert_eq!(c.alloc(), Err(RmapError::PoolExhausted));
        c.reserve(3).unwrap();
        assert_eq!(pool.capacity(), CHUNK_BASE);
        let a = c.alloc().unwrap();
        let b = c.alloc().unwrap();
        assert_ne!(a, b);
        let s = pool.check().unwrap();
        assert_eq!(s.in_use, 2);
        assert_eq!(s.in_use + s.free, s.capacity);
        assert_eq!(s.free - s.unreserved, 1, "one credit outstanding");
        pool.free(a).unwrap();
        assert_eq!(pool.free(a), Err(PoolError::DoubleFree(a)));
        assert!(pool.check().is_ok(), "double free changed nothing");
        drop(c);
        let s = pool.check().unwrap();
        assert_eq!(
            (s.in_use, s.free, s.unreserved),
            (1, CHUNK_BASE - 1, CHUNK_BASE - 1)
        );
        assert_eq!(
            pool.free(NodeIdx::new(1 << 20).unwrap()),
            Err(PoolError::BadIndex(NodeIdx(1 << 20)))
        );
    }

    #[test]
    fn growth_keeps_addresses_stable_and_reuses_freed_nodes() {
        let pool: Pool<TestNode> = Pool::new();
        let mut c = NodeCache::new(&pool);
        c.reserve(1).unwrap();
        let first = c.alloc().unwrap();
        let addr = pool.node(first).unwrap() as *const TestNode;
        pool.node(first)
            .unwrap()
            .payload
            .store(77, Ordering::Relaxed);
        c.reserve(1000).unwrap();
        assert!(pool.capacity() >= 1001);
        assert!(core::ptr::eq(addr, pool.node(first).unwrap()));
        assert_eq!(
            pool.node(first).unwrap().payload.load(Ordering::Relaxed),
            77
        );
        let mut got = alloc::vec::Vec::new();
        for _ in 0..1000 {
            got.push(c.alloc().unwrap());
        }
        assert_eq!(c.alloc(), Err(RmapError::PoolExhausted));
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 1000);
        for &i in &got {
            pool.free(i).unwrap();
        }
        let cap = pool.capacity();
        c.reserve(1000).unwrap();
        assert_eq!(pool.capacity(), cap, "freed nodes are reused, no growth");
        pool.check().unwrap();
    }

    #[test]
    fn cursor_agrees_with_node() {
        let pool: Pool<TestNode> = Pool::new();
        let mut c = NodeCache::new(&pool);
        c.reserve(500).unwrap();
        let mut cur = PoolCursor::new(&pool);
        for i in [0u32, 1, 63, 64, 65, 191, 192, 5, 447, 448, 100_000, 3] {
            let idx = NodeIdx::new(i).unwrap();
            let (a, b) = (pool.node(idx), cur.node(idx));
            assert_eq!(a.map(|n| n as *const _), b.map(|n| n as *const _), "{i}");
        }
    }

    #[test]
    fn free_chain_pushes_once_and_catches_double_free() {
        let pool: Pool<TestNode> = Pool::new();
        let mut c = NodeCache::new(&pool);
        c.reserve(5).unwrap();
        let v: alloc::vec::Vec<_> = (0..5).map(|_| c.alloc().unwrap()).collect();
        drop(c);
        assert_eq!(pool.free_chain(v[..3].iter().copied()), Ok(3));
        assert_eq!(pool.check().unwrap().in_use, 2);
        assert_eq!(
            pool.free_chain([v[3], v[0], v[4]]),
            Err(PoolError::DoubleFree(v[0]))
        );
        let s = pool.check().unwrap();
        assert_eq!(
            (s.in_use, s.unreserved),
            (1, s.free),
            "v[3] freed, v[4] kept"
        );
        assert_eq!(pool.free_chain([v[4]]), Ok(1));
        assert_eq!(pool.free_chain([]), Ok(0));
        assert_eq!(pool.check().unwrap().in_use, 0);
    }

    #[test]
    fn reserve_fails_cleanly_at_the_limit() {
        let pool: Pool<TestNode> = Pool::with_limit(CHUNK_BASE);
        let mut c = NodeCache::new(&pool);
        c.reserve(CHUNK_BASE).unwrap();
        let mut d = NodeCache::new(&pool);
        assert!(matches!(d.reserve(1), Err(RmapError::Alloc { .. })));
        assert_eq!(d.credits(), 0);
        assert_eq!(c.credits(), CHUNK_BASE);
        let s = pool.check().unwrap();
        assert_eq!((s.capacity, s.unreserved), (CHUNK_BASE, 0));
        drop(c);
        d.reserve(1).unwrap();
        assert_eq!(d.alloc().map(|i| i.raw() < CHUNK_BASE as u32), Ok(true));
    }

    #[test]
    fn checker_detects_corruption() {
        let pool: Pool<TestNode> = Pool::new();
        let mut c = NodeCache::new(&pool);
        c.reserve(2).unwrap();
        let a = c.alloc().unwrap();
        drop(c);
        // A node marked vacant behind the pool's back is not on the free list.
        assert!(pool.node(a).unwrap().release());
        assert!(matches!(
            pool.check(),
            Err(PoolCheckError::VacantNotListed { .. })
        ));
        assert!(pool.node(a).unwrap().claim());
        pool.check().unwrap();
        // A free-list node marked in use.
        let head = NodeIdx::new(pool.free.load(Ordering::Relaxed) as u32).unwrap();
        let link = pool.node(head).unwrap().free_link();
        assert!(pool.node(head).unwrap().claim());
        assert_eq!(pool.check(), Err(PoolCheckError::FreeNodeInUse(head.raw())));
        pool.node(head).unwrap().set_free_link(link);
        pool.check().unwrap();
        // A cycle on the free list.
        pool.node(head).unwrap().set_free_link(head.raw());
        assert_eq!(pool.check(), Err(PoolCheckError::DuplicateFree(head.raw())));
    }

    #[cfg(feature = "std")]
    #[test]
    fn concurrent_reserve_alloc_free() {
        use crate::sync::{thread, Arc};
        let pool: Arc<Pool<TestNode>> = Arc::new(Pool::new());
        let hs: alloc::vec::Vec<_> = (0..4u64)
            .map(|t| {
                let pool = pool.clone();
                thread::spawn(move || {
                    let mut c = NodeCache::new(&pool);
                    let mut mine = alloc::vec::Vec::new();
                    for round in 0..200u64 {
                        c.reserve(8).unwrap();
                        for j in 0..8 {
                            let i = c.alloc().unwrap();
                            pool.node(i)
                                .unwrap()
                                .payload
                                .store(t << 32 | round << 8 | j, Ordering::Relaxed);
                            mine.push((i, t << 32 | round << 8 | j));
                        }
                        for (i, v) in mine.drain(..5) {
                            assert_eq!(pool.node(i).unwrap().payload.load(Ordering::Relaxed), v);
                            pool.free(i).unwrap();
                        }
                    }
                    for (i, _) in mine {
                        pool.free(i).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let s = pool.check().unwrap();
        assert_eq!(s.in_use, 0);
        assert_eq!(s.unreserved, s.free);
    }
}
