//! pte_list (x86 shadow-MMU rmap) against the structures a Rust programmer would reach
//! for instead: `Mutex<HashMap<u64, Vec<u64>>>` and a per-gfn `Mutex<SmallVec<[u64; 2]>>`
//! array. Same operation sequence for each: add, remove (a fixed shuffled order), iterate
//! and count on one gfn whose chain has 1, 2, 14, 100 or 1000 entries. Bytes per entry of
//! each design are printed first.
//!
//! Run: `cargo bench -p revmap-rmap --bench pte_list -- --warm-up-time 1 --measurement-time 3`.

mod common;

use common::{bench_read, print_memory, HashMapVec, SmallVecs, GFN, LENS, NGFN};
use criterion::{black_box, BenchmarkId, Criterion, Throughput};
use revmap_rmap::pool::{PoolCursor, PoolNode};
use revmap_rmap::pte_list::{
    check_pte_lists, DescCache, DescPool, PteListDesc, PteListHead, SpteHandle,
};
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// The operations every design implements (one gfn's rmap).
trait Design {
    fn add(&self, gfn: usize, v: u64);
    fn remove(&self, gfn: usize, v: u64);
    fn count(&self, gfn: usize) -> usize;
    fn sum(&self, gfn: usize) -> u64;
    fn clear(&self, gfn: usize);
    /// Bytes used for `gfn`'s entries (heads, descriptors, buckets, heap).
    fn bytes(&self, gfn: usize) -> usize;
}

struct PteList {
    pool: &'static DescPool,
    /// The vCPU's descriptor cache, kept across faults as KVM's is.
    cache: RefCell<DescCache<'static>>,
    heads: Box<[PteListHead]>,
}

impl PteList {
    fn new() -> Self {
        // Leaked so the persistent cache can borrow it (bench only).
        let pool: &'static DescPool = Box::leak(Box::new(DescPool::new()));
        Self {
            pool,
            cache: RefCell::new(DescCache::new(pool)),
            heads: PteListHead::new_array(NGFN).unwrap(),
        }
    }
}

impl Design for PteList {
    fn add(&self, gfn: usize, v: u64) {
        // KVM's order: top up the per-vCPU cache, then lock and add.
        let mut c = self.cache.borrow_mut();
        c.reserve(1).unwrap();
        let _ = self.heads[gfn]
            .lock()
            .add(&mut c, SpteHandle::new(v).unwrap())
            .unwrap();
    }
    fn remove(&self, gfn: usize, v: u64) {
        self.heads[gfn]
            .lock()
            .remove(self.pool, SpteHandle::new(v).unwrap())
            .unwrap();
    }
    fn count(&self, gfn: usize) -> usize {
        self.heads[gfn].lock_readonly().count(self.pool).unwrap()
    }
    fn sum(&self, gfn: usize) -> u64 {
        let g = self.heads[gfn].lock_readonly();
        g.iter(self.pool).map(|s| s.raw()).sum()
    }
    fn clear(&self, gfn: usize) {
        let _ = self.heads[gfn].lock().destroy(self.pool, |_| {}).unwrap();
    }
    fn bytes(&self, gfn: usize) -> usize {
        let st = check_pte_lists(&self.heads[gfn..=gfn], self.pool).unwrap();
        8 + st.descs as usize * 128
    }
}

impl Design for HashMapVec {
    fn add(&self, gfn: usize, v: u64) {
        self.with(gfn, |l| l.push(v));
    }
    fn remove(&self, gfn: usize, v: u64) {
        let mut m = self.0.lock().unwrap();
        let list = m.get_mut(&(gfn as u64)).unwrap();
        let i = list.iter().position(|&x| x == v).unwrap();
        list.swap_remove(i);
        if list.is_empty() {
            m.remove(&(gfn as u64));
        }
    }
    fn count(&self, gfn: usize) -> usize {
        HashMapVec::count(self, gfn)
    }
    fn sum(&self, gfn: usize) -> u64 {
        HashMapVec::sum(self, gfn)
    }
    fn clear(&self, gfn: usize) {
        self.take(gfn);
    }
    fn bytes(&self, gfn: usize) -> usize {
        HashMapVec::bytes(self, gfn)
    }
}

impl Design for SmallVecs {
    fn add(&self, gfn: usize, v: u64) {
        self.with(gfn, |l| l.push(v));
    }
    fn remove(&self, gfn: usize, v: u64) {
        self.with(gfn, |l| {
            let i = l.iter().position(|&x| x == v).unwrap();
            l.swap_remove(i);
        });
    }
    fn count(&self, gfn: usize) -> usize {
        SmallVecs::count(self, gfn)
    }
    fn sum(&self, gfn: usize) -> u64 {
        SmallVecs::sum(self, gfn)
    }
    fn clear(&self, gfn: usize) {
        self.take(gfn);
    }
    fn bytes(&self, gfn: usize) -> usize {
        SmallVecs::bytes(self, gfn)
    }
}

fn designs() -> Vec<(&'static str, Box<dyn Design>)> {
    vec![
        ("pte_list", Box::new(PteList::new())),
        ("mutex_hashmap_vec", Box::new(HashMapVec::new())),
        ("smallvec_per_gfn", Box::new(SmallVecs::new())),
    ]
}

fn values(n: usize) -> Vec<u64> {
    (1..=n as u64).map(|i| i * 8).collect()
}

/// A fixed permutation of `v` (xorshift), the same for every design.
fn shuffled(mut v: Vec<u64>) -> Vec<u64> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..v.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
    v
}

fn bench(c: &mut Criterion) {
    print_memory(
        LENS.iter().copied().chain([14 * 100]),
        designs,
        |d: &(dyn Design + 'static), n| values(n).into_iter().for_each(|v| d.add(GFN, v)),
        |d| d.bytes(GFN),
    );
    for op in ["add", "remove", "iterate", "count"] {
        let mut g = c.benchmark_group(op);
        for n in LENS {
            g.throughput(Throughput::Elements(if op == "count" {
                1
            } else {
                n as u64
            }));
            for (name, d) in designs() {
                let vals = values(n);
                let order = shuffled(vals.clone());
                let fill = || vals.iter().for_each(|&v| d.add(GFN, v));
                let clear = || d.clear(GFN);
                match op {
                    "add" => {
                        let _ = g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                            b.iter_custom(|iters| {
                                let mut t = Duration::ZERO;
                                for _ in 0..iters {
                                    let s = Instant::now();
                                    for &v in &vals {
                                        d.add(GFN, black_box(v));
                                    }
                                    t += s.elapsed();
                                    d.clear(GFN);
                                }
                                t
                            })
                        });
                    }
                    "remove" => {
                        let _ = g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                            b.iter_custom(|iters| {
                                let mut t = Duration::ZERO;
                                for _ in 0..iters {
                                    for &v in &vals {
                                        d.add(GFN, v);
                                    }
                                    let s = Instant::now();
                                    for &v in &order {
                                        d.remove(GFN, black_box(v));
                                    }
                                    t += s.elapsed();
                                }
                                t
                            })
                        });
                    }
                    "iterate" => bench_read(&mut g, name, n, fill, |x| d.sum(x), clear),
                    _ => bench_read(&mut g, name, n, fill, |x| d.count(x), clear),
                };
            }
        }
        g.finish();
    }
}

/// Index-based pool vs boxed nodes: the cost of reaching a descriptor from its link
/// (`Pool::node(idx)`: directory cell, chunk, bounds check) against dereferencing a
/// `Box` (what a pointer-linked design pays), over 1000 descriptors in a shuffled order.
fn node_lookup(c: &mut Criterion) {
    let pool = DescPool::new();
    let mut cache = DescCache::new(&pool);
    cache.reserve(1000).unwrap();
    let idxs: Vec<_> = (0..1000).map(|_| cache.alloc().unwrap()).collect();
    let order = shuffled((0..1000u64).collect());
    let idxs: Vec<_> = order.iter().map(|&i| idxs[i as usize]).collect();
    let boxes: Vec<Box<PteListDesc>> = (0..1000).map(|_| Box::new(PteListDesc::vacant())).collect();
    let ptrs: Vec<&PteListDesc> = order.iter().map(|&i| &*boxes[i as usize]).collect();
    let mut g = c.benchmark_group("node_lookup");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("pool_index", |b| {
        b.iter(|| {
            idxs.iter()
                .filter(|&&i| pool.node(black_box(i)).is_some_and(|d| !d.is_vacant()))
                .count()
        })
    });
    g.bench_function("pool_cursor", |b| {
        b.iter(|| {
            let mut cur = PoolCursor::new(&pool);
            idxs.iter()
                .filter(|&&i| cur.node(black_box(i)).is_some_and(|d| !d.is_vacant()))
                .count()
        })
    });
    g.bench_function("box_pointer", |b| {
        b.iter(|| ptrs.iter().filter(|&&d| !black_box(d).is_vacant()).count())
    });
    g.finish();
}

fn main() {
    common::run(&[bench, node_lookup]);
}
