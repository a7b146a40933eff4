//! Nested rmap against the structures a Rust programmer would reach for instead:
//! `Mutex<HashMap<u64, Vec<u64>>>` and a per-gfn `Mutex<SmallVec<[u64; 2]>>` array, each
//! with the same dedup-on-insert rule. Same operation sequence for each: insert (with
//! the dedup scan), update-all (a walk over every entry), detach-and-free, and count
//! on one gfn with 1, 2, 14, 100 or 1000 entries. Bytes per entry are printed first.
//!
//! Run: `cargo bench -p revmap-rmap --bench nested -- --warm-up-time 1 --measurement-time 3`.

use criterion::{black_box, BenchmarkId, Criterion, Throughput};
use revmap_rmap::nested::{check_nested_rmaps, NestedLimits};
use revmap_rmap::{Gpa, Lpid, NestedCache, NestedPool, NestedRmap, NestedRmapEntry};
use smallvec::SmallVec;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const LENS: [usize; 5] = [1, 2, 14, 100, 1000];
const GFN: usize = 3;
const NGFN: usize = 8;

trait Design {
    fn insert(&self, gfn: usize, e: NestedRmapEntry);
    fn update_all(&self, gfn: usize) -> u64;
    fn detach_free(&self, gfn: usize) -> usize;
    fn count(&self, gfn: usize) -> usize;
    fn bytes(&self, gfn: usize) -> usize;
}

struct Nested {
    pool: &'static NestedPool,
    /// The caller's node cache, kept across faults (bench only: the pool is leaked).
    cache: RefCell<NestedCache<'static>>,
    words: Box<[NestedRmap]>,
    limits: NestedLimits,
}

impl Design for Nested {
    fn insert(&self, gfn: usize, e: NestedRmapEntry) {
        let mut c = self.cache.borrow_mut();
        c.reserve(1).unwrap();
        let _ = self.words[gfn]
            .lock()
            .insert(&mut c, e, &self.limits, |_| true)
            .unwrap();
    }
    fn update_all(&self, gfn: usize) -> u64 {
        let mut s = 0;
        self.words[gfn]
            .lock()
            .update_all(self.pool, |e| s += e.raw());
        s
    }
    fn detach_free(&self, gfn: usize) -> usize {
        self.words[gfn].free(self.pool).unwrap()
    }
    fn count(&self, gfn: usize) -> usize {
        self.words[gfn].lock().len(self.pool)
    }
    fn bytes(&self, gfn: usize) -> usize {
        check_nested_rmaps(&self.words[gfn..=gfn], self.pool, &self.limits)
            .unwrap()
            .bytes() as usize
    }
}

struct HashMapVec(Mutex<HashMap<u64, Vec<u64>>>);

impl Design for HashMapVec {
    fn insert(&self, gfn: usize, e: NestedRmapEntry) {
        let mut m = self.0.lock().unwrap();
        let l = m.entry(gfn as u64).or_default();
        if !l.contains(&e.raw()) {
            l.push(e.raw());
        }
    }
    fn update_all(&self, gfn: usize) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(&(gfn as u64))
            .map_or(0, |l| l.iter().sum())
    }
    fn detach_free(&self, gfn: usize) -> usize {
        let l = self.0.lock().unwrap().remove(&(gfn as u64));
        l.map_or(0, |l| l.len())
    }
    fn count(&self, gfn: usize) -> usize {
        self.0
            .lock()
            .unwrap()
            .get(&(gfn as u64))
            .map_or(0, Vec::len)
    }
    fn bytes(&self, gfn: usize) -> usize {
        let m = self.0.lock().unwrap();
        let cap = m.get(&(gfn as u64)).map_or(0, Vec::capacity);
        std::mem::size_of::<(u64, Vec<u64>)>() + 1 + cap * 8
    }
}

struct SmallVecs(Box<[Mutex<SmallVec<[u64; 2]>>]>);

impl Design for SmallVecs {
    fn insert(&self, gfn: usize, e: NestedRmapEntry) {
        let mut l = self.0[gfn].lock().unwrap();
        if !l.contains(&e.raw()) {
            l.push(e.raw());
        }
    }
    fn update_all(&self, gfn: usize) -> u64 {
        self.0[gfn].lock().unwrap().iter().sum()
    }
    fn detach_free(&self, gfn: usize) -> usize {
        let l = std::mem::take(&mut *self.0[gfn].lock().unwrap());
        l.len()
    }
    fn count(&self, gfn: usize) -> usize {
        self.0[gfn].lock().unwrap().len()
    }
    fn bytes(&self, gfn: usize) -> usize {
        let l = self.0[gfn].lock().unwrap();
        let heap = if l.spilled() { l.capacity() * 8 } else { 0 };
        std::mem::size_of::<Mutex<SmallVec<[u64; 2]>>>() + heap
    }
}

fn designs() -> Vec<(&'static str, Box<dyn Design>)> {
    vec![
        (
            "nested",
            Box::new({
                let pool: &'static NestedPool = Box::leak(Box::new(NestedPool::new()));
                Nested {
                    pool,
                    cache: RefCell::new(NestedCache::new(pool)),
                    words: NestedRmap::new_array(NGFN).unwrap(),
                    limits: NestedLimits::new(usize::MAX).unwrap(),
                }
            }),
        ),
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

/// n distinct entries spread over 7 L2 LPIDs.
fn entries(n: usize) -> Vec<NestedRmapEntry> {
    (0..n as u64)
        .map(|i| NestedRmapEntry::new(Lpid(1 + (i % 7) as u16), Gpa(i << 12)).unwrap())
        .collect()
}

fn print_memory() {
    println!("bytes per entry (one gfn):");
    println!(
        "{:>6} {:>12} {:>18} {:>17}",
        "len", "nested", "mutex_hashmap_vec", "smallvec_per_gfn"
    );
    for n in LENS {
        let mut row = format!("{n:>6}");
        for (_, d) in designs() {
            for e in entries(n) {
                d.insert(GFN, e);
            }
            row += &format!(" {:>12.2}", d.bytes(GFN) as f64 / n as f64);
        }
        println!("{row}");
    }
}

fn bench(c: &mut Criterion) {
    print_memory();
    for op in ["insert", "update_all", "detach_free", "count"] {
        let mut g = c.benchmark_group(format!("nested_{op}"));
        for n in LENS {
            g.throughput(Throughput::Elements(if op == "count" {
                1
            } else {
                n as u64
            }));
            for (name, d) in designs() {
                let es = entries(n);
                let timed = |d: &dyn Design, iters: u64, timed_insert: bool| {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        let s = Instant::now();
                        for &e in &es {
                            d.insert(GFN, black_box(e));
                        }
                        if timed_insert {
                            t += s.elapsed();
                        }
                        let s = Instant::now();
                        black_box(d.detach_free(GFN));
                        if !timed_insert {
                            t += s.elapsed();
                        }
                    }
                    t
                };
                match op {
                    "insert" => {
                        let _ = g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                            b.iter_custom(|iters| timed(&*d, iters, true))
                        });
                    }
                    "detach_free" => {
                        let _ = g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                            b.iter_custom(|iters| timed(&*d, iters, false))
                        });
                    }
                    "update_all" => {
                        for &e in &es {
                            d.insert(GFN, e);
                        }
                        g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                            b.iter(|| black_box(d.update_all(black_box(GFN))))
                        });
                        d.detach_free(GFN);
                    }
                    _ => {
                        for &e in &es {
                            d.insert(GFN, e);
                        }
                        g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                            b.iter(|| black_box(d.count(black_box(GFN))))
                        });
                        d.detach_free(GFN);
                    }
                }
            }
        }
        g.finish();
    }
}

fn main() {
    // What `criterion_group!`/`criterion_main!` expand to, without their undocumented
    // `pub fn` (the workspace warns on missing docs).
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
