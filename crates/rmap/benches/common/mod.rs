//! What the list-rmap benchmarks (`pte_list`, `nested`) share: the lengths measured, the
//! two structures a Rust programmer would reach for instead, the bytes-per-entry table
//! and the driver of the read-only measurements.
#![allow(dead_code)] // each bench uses its own part of the helpers

use criterion::measurement::WallTime;
use criterion::{black_box, BenchmarkGroup, BenchmarkId, Criterion};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::sync::Mutex;

/// The list lengths measured on one gfn.
pub const LENS: [usize; 5] = [1, 2, 14, 100, 1000];
/// The gfn every measurement uses.
pub const GFN: usize = 3;
/// Gfns per design.
pub const NGFN: usize = 8;

/// `Mutex<HashMap<u64, Vec<u64>>>`: gfn -> list of raw entries.
pub struct HashMapVec(pub Mutex<HashMap<u64, Vec<u64>>>);

impl HashMapVec {
    /// An empty map.
    pub fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
    /// Runs `f` on `gfn`'s list, created empty if absent.
    pub fn with<T>(&self, gfn: usize, f: impl FnOnce(&mut Vec<u64>) -> T) -> T {
        f(self.0.lock().unwrap().entry(gfn as u64).or_default())
    }
    /// Entries of `gfn`.
    pub fn count(&self, gfn: usize) -> usize {
        self.0
            .lock()
            .unwrap()
            .get(&(gfn as u64))
            .map_or(0, Vec::len)
    }
    /// Sum of `gfn`'s entries (a walk over all of them).
    pub fn sum(&self, gfn: usize) -> u64 {
        self.0
            .lock()
            .unwrap()
            .get(&(gfn as u64))
            .map_or(0, |l| l.iter().sum())
    }
    /// Drops `gfn`'s list; how many entries it held.
    pub fn take(&self, gfn: usize) -> usize {
        let l = self.0.lock().unwrap().remove(&(gfn as u64));
        l.map_or(0, |l| l.len())
    }
    /// One bucket (key + Vec header) and its control byte, plus the Vec's heap.
    pub fn bytes(&self, gfn: usize) -> usize {
        let m = self.0.lock().unwrap();
        let cap = m.get(&(gfn as u64)).map_or(0, Vec::capacity);
        std::mem::size_of::<(u64, Vec<u64>)>() + 1 + cap * 8
    }
}

/// A `Mutex<SmallVec<[u64; 2]>>` per gfn.
pub struct SmallVecs(pub Box<[Mutex<SmallVec<[u64; 2]>>]>);

impl SmallVecs {
    /// [`NGFN`] empty lists.
    pub fn new() -> Self {
        Self((0..NGFN).map(|_| Mutex::new(SmallVec::new())).collect())
    }
    /// Runs `f` on `gfn`'s list.
    pub fn with<T>(&self, gfn: usize, f: impl FnOnce(&mut SmallVec<[u64; 2]>) -> T) -> T {
        f(&mut self.0[gfn].lock().unwrap())
    }
    /// Entries of `gfn`.
    pub fn count(&self, gfn: usize) -> usize {
        self.0[gfn].lock().unwrap().len()
    }
    /// Sum of `gfn`'s entries.
    pub fn sum(&self, gfn: usize) -> u64 {
        self.0[gfn].lock().unwrap().iter().sum()
    }
    /// Empties `gfn`'s list (freeing its heap); how many entries it held.
    pub fn take(&self, gfn: usize) -> usize {
        std::mem::take(&mut *self.0[gfn].lock().unwrap()).len()
    }
    /// The per-gfn slot plus the spilled heap.
    pub fn bytes(&self, gfn: usize) -> usize {
        let l = self.0[gfn].lock().unwrap();
        let heap = if l.spilled() { l.capacity() * 8 } else { 0 };
        std::mem::size_of::<Mutex<SmallVec<[u64; 2]>>>() + heap
    }
}

/// Prints bytes per entry of each design for each length: `designs()` gives fresh
/// designs, `fill` puts `n` entries on [`GFN`], `bytes` measures it.
pub fn print_memory<D: ?Sized>(
    lens: impl IntoIterator<Item = usize>,
    designs: impl Fn() -> Vec<(&'static str, Box<D>)>,
    fill: impl Fn(&D, usize),
    bytes: impl Fn(&D) -> usize,
) {
    println!("bytes per entry (one gfn):");
    let names: Vec<_> = designs().into_iter().map(|(n, _)| n).collect();
    println!(
        "{:>6} {:>12} {:>18} {:>17}",
        "len", names[0], names[1], names[2]
    );
    for n in lens {
        let mut row = format!("{n:>6}");
        for (_, d) in designs() {
            fill(&d, n);
            row += &format!(" {:>12.2}", bytes(&d) as f64 / n as f64);
        }
        println!("{row}");
    }
}

/// Measures `read` on a list of `n` entries that `fill` builds and `clear` drops after.
pub fn bench_read<T>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    n: usize,
    fill: impl Fn(),
    read: impl Fn(usize) -> T,
    clear: impl Fn(),
) {
    fill();
    g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
        b.iter(|| black_box(read(black_box(GFN))))
    });
    clear();
}

/// What `criterion_group!`/`criterion_main!` expand to, without their undocumented
/// `pub fn` (the workspace warns on missing docs).
pub fn run(benches: &[fn(&mut Criterion)]) {
    let mut c = Criterion::default().configure_from_args();
    for b in benches {
        b(&mut c);
    }
    c.final_summary();
}
