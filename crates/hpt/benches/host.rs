//! Host-side costs: `unmap_gfn_range` over a fully mapped 1 GiB slot (one HPTE per 4 KiB
//! frame, and per 64 KiB page), dirty-log harvest of a 16 GiB slot with 0, 1 and 4
//! clean mappings per frame (and 1 dirty) against a plain sequential read of a `u64`
//! array as long as the rmap array, and the hot path's memslot snapshot lookup.
//!
//! Divide the reported time by the mapping count printed at setup for ns per mapping.
//! Sizes can be reduced with `REVMAP_BENCH_GIB` (default 16 for the dirty log) and the
//! mapping counts chosen with `REVMAP_BENCH_PER_FRAME` (default `0,1,4`).
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use revmap_hpt::{Vm, VmConfig};
use revmap_rmap::Gfn;
use revmap_testkit::host::{raw_scan, DirtyFixture, UnmapFixture};
use std::hint::black_box;

const GIB: u64 = 1 << 30;

fn unmap(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmap_gfn_range 1GiB");
    g.sample_size(10);
    for shift in [12u32, 16] {
        let fx = UnmapFixture::new(GIB, shift).unwrap();
        eprintln!(
            "unmap {}K pages: {} mappings",
            1 << (shift - 10),
            fx.mappings()
        );
        g.bench_function(format!("{}K HPTEs", 1 << (shift - 10)), |b| {
            b.iter_batched(
                || fx.map_all(),
                |()| black_box(fx.unmap_all()),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn dirty(c: &mut Criterion) {
    let gib: u64 = std::env::var("REVMAP_BENCH_GIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let mut g = c.benchmark_group(format!("dirty log {gib}GiB"));
    g.sample_size(10);
    // Written, not `vec![0; n]`: an untouched zeroed allocation maps every page to the
    // kernel's shared zero page, and reading it would measure cache hits, not the memory
    // bandwidth this baseline stands for.
    let words: Vec<u64> = (0..(gib * GIB) >> 12).collect();
    g.bench_function("raw u64 scan (rmap array length)", |b| {
        b.iter(|| black_box(raw_scan(black_box(&words))))
    });
    drop(words);
    let per_frames: Vec<u64> = std::env::var("REVMAP_BENCH_PER_FRAME")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![0, 1, 4]);
    for per_frame in per_frames {
        let fx = DirtyFixture::new(gib * GIB, per_frame).unwrap();
        eprintln!("dirty log: {per_frame}/frame = {} mappings", fx.mappings());
        g.bench_function(format!("harvest, {per_frame} clean mappings/frame"), |b| {
            b.iter(|| black_box(fx.harvest().unwrap()))
        });
        if per_frame == 1 {
            g.bench_function("harvest, 1 dirty mapping/frame", |b| {
                b.iter_batched(
                    || fx.dirty_all(),
                    |()| black_box(fx.harvest().unwrap()),
                    BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();
}

fn lookup(c: &mut Criterion) {
    let vm = Vm::new(VmConfig::default()).unwrap();
    let mut k = 0u64;
    c.bench_function("memslot snapshot load + lookup (hot path)", |b| {
        b.iter(|| {
            k = (k + 4097) & 0x3_ffff;
            let slots = vm.memslots();
            black_box(slots.lookup(Gfn(k)).map(|s| s.npages()))
        })
    });
    // Baseline: the same lookup in a snapshot already held (the cost before the slot
    // set became replaceable was this plus nothing).
    let held = vm.memslots();
    c.bench_function("memslot lookup in a held snapshot (baseline)", |b| {
        b.iter(|| {
            k = (k + 4097) & 0x3_ffff;
            black_box(held.lookup(Gfn(k)).map(|s| s.npages()))
        })
    });
}

mod group {
    #![allow(missing_docs)]
    use super::*;
    criterion_group!(host, lookup, unmap, dirty);
}
criterion_main!(group::host);
