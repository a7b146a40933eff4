//! Nested rmap against the structures a Rust programmer would reach for instead:
//! `Mutex<HashMap<u64, Vec<u64>>>` and a per-gfn `Mutex<SmallVec<[u64; 2]>>` array, each
//! with the same dedup-on-insert rule. Same operation sequence for each: insert (with
//! the dedup scan), update-all (a walk over every entry), detach-and-free, and count
//! on one gfn with 1, 2, 14, 100 or 1000 entries. Bytes per entry are printed first.
//!
//! Run: `cargo bench -p revmap-rmap --bench nested -- --warm-up-time 1 --measurement-time 3`.

mod common;

use common::{bench_read, print_memory, HashMapVec, SmallVecs, GFN, LENS, NGFN};
use criterion::{black_box, BenchmarkId, Criterion, Throughput};
use revmap_rmap::nested::{check_nested_rmaps, NestedLimits};
use revmap_rmap::{Gpa, Lpid, NestedCache, NestedPool, NestedRmap, NestedRmapEntry};
use std::cell::RefCell;
use std::time::{Duration, Instant};

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

/// The baselines: insert with the same dedup scan, the rest through the shared helpers.
macro_rules! baseline_design {
    ($($t:ty),*) => {$(
        impl Design for $t {
            fn insert(&self, gfn: usize, e: NestedRmapEntry) {
                self.with(gfn, |l| {
                    if !l.contains(&e.raw()) {
                        l.push(e.raw());
                    }
                })
            }
            fn update_all(&self, gfn: usize) -> u64 {
                self.sum(gfn)
            }
            fn detach_free(&self, gfn: usize) -> usize {
                self.take(gfn)
            }
            fn count(&self, gfn: usize) -> usize {
                <$t>::count(self, gfn)
            }
            fn bytes(&self, gfn: usize) -> usize {
                <$t>::bytes(self, gfn)
            }
        }
    )*};
}

baseline_design!(HashMapVec, SmallVecs);

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
        ("mutex_hashmap_vec", Box::new(HashMapVec::new())),
        ("smallvec_per_gfn", Box::new(SmallVecs::new())),
    ]
}

/// n distinct entries spread over 7 L2 LPIDs.
fn entries(n: usize) -> Vec<NestedRmapEntry> {
    (0..n as u64)
        .map(|i| NestedRmapEntry::new(Lpid(1 + (i % 7) as u16), Gpa(i << 12)).unwrap())
        .collect()
}

fn bench(c: &mut Criterion) {
    print_memory(
        LENS,
        designs,
        |d: &(dyn Design + 'static), n| entries(n).into_iter().for_each(|e| d.insert(GFN, e)),
        |d| d.bytes(GFN),
    );
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
                let fill = || es.iter().for_each(|&e| d.insert(GFN, e));
                let clear = || {
                    d.detach_free(GFN);
                };
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
                    "update_all" => bench_read(&mut g, name, n, fill, |x| d.update_all(x), clear),
                    _ => bench_read(&mut g, name, n, fill, |x| d.count(x), clear),
                }
            }
        }
        g.finish();
    }
}

fn main() {
    common::run(&[bench]);
}
