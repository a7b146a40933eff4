//! Criterion benchmarks of the HPT rmap ring against the baselines of
//! `revmap_rmap::baseline` (feature `baselines`, required by this bench).
//!
//! Run (short, as on the shared machine):
//! `cargo bench -p revmap-rmap --features baselines --bench ring -- --warm-up-time 1 --measurement-time 3`.
//!
//! Groups, each at chain lengths 1, 2, 14, 100 and 1000 on frame 0 (63 other frames hold
//! one mapping each, so map-based baselines are not trivially small):
//!
//! * `link_unlink/<impl>/<n>`: with n-1 members present, link one more HPTE at the tail
//!   and unlink it again (one H_ENTER + one H_REMOVE worth of rmap work, each under the
//!   structure's lock), single-threaded.
//! * `iterate/<impl>/<n>`: visit the n members under the lock.
//! * `count/<impl>/<n>`: number of members (`chain_len` for the ring: O(n); the vector
//!   baselines keep a length).
//!
//! * `link_unlink/lock_floor`: two lock/unlock round trips of an rmap word and nothing
//!   else, the floor under the ring's pair.
//!
//! Before the groups it prints the memory each structure holds (`bytes:` lines).

use criterion::{black_box, BenchmarkId, Criterion};
use revmap_rmap::baseline::{
    BaselineRmap, MutexHashMap, RingRmap as Ring, SlabList, SmallVecFrames,
};
use revmap_rmap::ring::RmapArray;

const FRAMES: usize = 64;
const NPTE: usize = 2048;
const LENGTHS: [u32; 5] = [1, 2, 14, 100, 1000];
/// The HPTE linked and unlinked by the pair benchmark (never preloaded).
const EXTRA: u32 = 2000;

/// A map with `members` HPTEs (0..members) on frame 0 and one on each other frame.
fn populated<M: BaselineRmap>(members: u32) -> M {
    let m = M::new(FRAMES, NPTE).unwrap();
    for p in 0..members {
        m.link(0, p).unwrap();
    }
    for f in 1..FRAMES {
        m.link(f as u64, 1024 + f as u32).unwrap();
    }
    m
}

fn link_unlink<M: BaselineRmap>(c: &mut Criterion) {
    let mut g = c.benchmark_group("link_unlink");
    for n in LENGTHS {
        let m = populated::<M>(n - 1);
        g.bench_with_input(BenchmarkId::new(M::NAME, n), &n, |b, _| {
            b.iter(|| {
                m.link(black_box(0), black_box(EXTRA)).unwrap();
                m.unlink(black_box(0), black_box(EXTRA)).unwrap()
            })
        });
        assert_eq!(m.count(0).unwrap(), n as usize - 1);
    }
    g.finish();
}

/// The floor of the pair: two rmap lock/unlock round trips with no ring work (each is
/// one locked CAS plus a plain release store on x86-64).
fn lock_floor(c: &mut Criterion) {
    let arr = RmapArray::new(FRAMES as u64).unwrap();
    c.bench_function("link_unlink/lock_floor", |b| {
        b.iter(|| {
            drop(arr[black_box(0)].lock());
            drop(arr[black_box(0)].lock());
        })
    });
}

fn iterate<M: BaselineRmap>(c: &mut Criterion) {
    let mut g = c.benchmark_group("iterate");
    for n in LENGTHS {
        let m = populated::<M>(n);
        assert_eq!(m.sum(0).unwrap(), u64::from(n) * u64::from(n - 1) / 2);
        g.bench_with_input(BenchmarkId::new(M::NAME, n), &n, |b, _| {
            b.iter(|| m.sum(black_box(0)).unwrap())
        });
    }
    g.finish();
}

fn count<M: BaselineRmap>(c: &mut Criterion) {
    let mut g = c.benchmark_group("count");
    for n in LENGTHS {
        let m = populated::<M>(n);
        assert_eq!(m.count(0).unwrap(), n as usize);
        g.bench_with_input(BenchmarkId::new(M::NAME, n), &n, |b, _| {
            b.iter(|| m.count(black_box(0)).unwrap())
        });
    }
    g.finish();
}

/// Memory held by each structure in two shapes: 4096 frames with one mapping each over a
/// 8192-slot HPT (the common case: most frames are mapped once), and one frame with 1000
/// mappings (aliasing) over a 2048-slot HPT.
fn report_bytes<M: BaselineRmap>() {
    let spread = M::new(4096, 8192).unwrap();
    for f in 0..4096u32 {
        spread.link(u64::from(f), f * 2).unwrap();
    }
    let alias = M::new(FRAMES, NPTE).unwrap();
    for p in 0..1000 {
        alias.link(0, p).unwrap();
    }
    eprintln!(
        "bytes: {:>16}  4096 frames x 1 mapping (npte 8192): {:>7} B = {:5.1} B/entry | \
         1 frame x 1000 mappings (64 frames, npte 2048): {:>6} B = {:5.1} B/entry",
        M::NAME,
        spread.bytes(),
        spread.bytes() as f64 / 4096.0,
        alias.bytes(),
        alias.bytes() as f64 / 1000.0,
    );
}

fn all(c: &mut Criterion) {
    report_bytes::<Ring>();
    report_bytes::<MutexHashMap>();
    report_bytes::<SlabList>();
    report_bytes::<SmallVecFrames>();
    lock_floor(c);
    link_unlink::<Ring>(c);
    link_unlink::<MutexHashMap>(c);
    link_unlink::<SlabList>(c);
    link_unlink::<SmallVecFrames>(c);
    iterate::<Ring>(c);
    iterate::<MutexHashMap>(c);
    iterate::<SlabList>(c);
    iterate::<SmallVecFrames>(c);
    count::<Ring>(c);
    count::<MutexHashMap>(c);
    count::<SlabList>(c);
    count::<SmallVecFrames>(c);
}

fn main() {
    // What `criterion_group!`/`criterion_main!` expand to, without their undocumented
    // `pub fn` (the workspace denies missing docs).
    let mut c = Criterion::default().configure_from_args();
    all(&mut c);
    c.final_summary();
}
