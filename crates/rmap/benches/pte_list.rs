//! pte_list (x86 shadow-MMU rmap) against the structures a Rust programmer would reach
//! for instead: `Mutex<HashMap<u64, Vec<u64>>>` and a per-gfn `Mutex<SmallVec<[u64; 2]>>`
//! array. Same operation sequence for each: add, remove (a fixed shuffled order), iterate
//! and count on one gfn whose chain has 1, 2, 14, 100 or 1000 entries. Bytes per entry of
//! each design are printed first.
//!
//! Run: `cargo bench -p revmap-rmap --bench pte_list -- --warm-up-time 1 --measurement-time 3`.

use criterion::{black_box, BenchmarkId, Criterion, Throughput};
use revmap_rmap::pool::{PoolCursor, PoolNode};
use revmap_rmap::pte_list::{
    check_pte_lists, DescCache, DescPool, PteListDesc, PteListHead, SpteHandle,
};
use smallvec::SmallVec;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const LENS: [usize; 5] = [1, 2, 14, 100, 1000];
const GFN: usize = 3;
const NGFN: usize = 8;

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

struct HashMapVec(Mutex<HashMap<u64, Vec<u64>>>);

impl Design for HashMapVec {
    fn add(&self, gfn: usize, v: u64) {
        self.0
            .lock()
            .unwrap()
            .entry(gfn as u64)
            .or_default()
            .push(v);
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
        self.0
            .lock()
            .unwrap()
            .get(&(gfn as u64))
            .map_or(0, Vec::len)
    }
    fn sum(&self, gfn: usize) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(&(gfn as u64))
            .map_or(0, |l| l.iter().sum())
    }
    fn clear(&self, gfn: usize) {
        self.0.lock().unwrap().remove(&(gfn as u64));
    }
    fn bytes(&self, gfn: usize) -> usize {
        // One bucket (key + Vec header) and its control byte, plus the Vec's heap.
        let m = self.0.lock().unwrap();
        let cap = m.get(&(gfn as u64)).map_or(0, Vec::capacity);
        std::mem::size_of::<(u64, Vec<u64>)>() + 1 + cap * 8
    }
}

struct SmallVecs(Box<[Mutex<SmallVec<[u64; 2]>>]>);

impl Design for SmallVecs {
    fn add(&self, gfn: usize, v: u64) {
        self.0[gfn].lock().unwrap().push(v);
    }
    fn remove(&self, gfn: usize, v: u64) {
        let mut l = self.0[gfn].lock().unwrap();
        let i = l.iter().position(|&x| x == v).unwrap();
        l.swap_remove(i);
    }
    fn count(&self, gfn: usize) -> usize {
        self.0[gfn].lock().unwrap().len()
    }
    fn sum(&self, gfn: usize) -> u64 {
        self.0[gfn].lock().unwrap().iter().sum()
    }
    fn clear(&self, gfn: usize) {
        *self.0[gfn].lock().unwrap() = SmallVec::new();
    }
    fn bytes(&self, gfn: usize) -> usize {
        let l = self.0[gfn].lock().unwrap();
        let heap = if l.spilled() { l.capacity() * 8 } else { 0 };
        std::mem::size_of::<Mutex<SmallVec<[u64; 2]>>>() + heap
    }
}

fn designs() -> Vec<(&'static str, Box<dyn Design>)> {
    vec![
        ("pte_list", Box::new(PteList::new())),
        (
            "mutex_hashmap_vec",
            Box::new(HashMapVec(Mutex::new(HashMap::new()))),
        ),
        (
            "smallvec_per_gfn",
            Box::new(SmallVecs(
                (0..NGFN).map(|_| Mutex::new(SmallVec::new())).collect(),
            )),
        ),
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

fn print_memory() {
    println!("bytes per entry (one gfn):");
    println!(
        "{:>6} {:>12} {:>18} {:>17}",
        "len", "pte_list", "mutex_hashmap_vec", "smallvec_per_gfn"
    );
    for n in LENS.iter().copied().chain([14 * 100]) {
        let mut row = format!("{n:>6}");
        for (_, d) in designs() {
            for v in values(n) {
                d.add(GFN, v);
            }
            row += &format!(" {:>12.2}", d.bytes(GFN) as f64 / n as f64);
        }
        println!("{row}");
    }
}

fn bench(c: &mut Criterion) {
    print_memory();
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
                    "iterate" => {
                        for &v in &vals {
                            d.add(GFN, v);
                        }
                        g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                            b.iter(|| black_box(d.sum(black_box(GFN))))
                        });
                        d.clear(GFN);
                    }
                    _ => {
                        for &v in &vals {
                            d.add(GFN, v);
                        }
                        g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                            b.iter(|| black_box(d.count(black_box(GFN))))
                        });
                        d.clear(GFN);
                    }
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
    // What `criterion_group!`/`criterion_main!` expand to, without their undocumented
    // `pub fn` (the workspace warns on missing docs).
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    node_lookup(&mut c);
    c.final_summary();
}
