//! Reference-walker cost: one 4-level and one 5-level walk whose A/D bits are already
//! set (the common case), a walk that sets A/D, and one access.c case (setup + walk +
//! compare).
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use revmap_shadow::access_test::{AccessConfig, AccessRunner, SplitMix64};
use revmap_shadow::paging::{
    walk, Access, CpuMode, Gpa, Gva, SparseMemory, CR4_LA57, PT_ACCESSED, PT_DIRTY,
};

const PWUAD: u64 = 0x7 | PT_ACCESSED | PT_DIRTY;

fn tables() -> SparseMemory {
    let mut m = SparseMemory::new();
    for (at, v) in [
        (0x1000, 0x2000 | PWUAD),
        (0x2000, 0x3000 | PWUAD),
        (0x3000, 0x4000 | PWUAD),
        (0x4000, 0x5000 | PWUAD),
        (0x5000, 0x9000 | PWUAD),
    ] {
        m.write_u64(Gpa(at), v).expect("in range");
    }
    m
}

fn walks(c: &mut Criterion) {
    let mut g = c.benchmark_group("walk");
    let mut m = tables();
    let l4 = CpuMode::long4(0x2000);
    g.bench_function("4-level/hit", |b| {
        b.iter(|| walk(&mut m, black_box(&l4), Gva(0x123), Access::WRITE).map(|w| w.outcome))
    });
    let mut l5 = CpuMode::long4(0x1000);
    l5.cr4 |= CR4_LA57;
    g.bench_function("5-level/hit", |b| {
        b.iter(|| walk(&mut m, black_box(&l5), Gva(0x123), Access::WRITE).map(|w| w.outcome))
    });
    g.bench_function("4-level/sets-a-d", |b| {
        b.iter(|| {
            let _ = m.write_u64(Gpa(0x5000), 0x9007);
            walk(&mut m, black_box(&l4), Gva(0x123), Access::WRITE).map(|w| w.ad_writes.len())
        })
    });
    let cfg = AccessConfig::default();
    let mut runner = AccessRunner::new(cfg);
    let mut rng = SplitMix64::new(1);
    g.bench_function("access.c case", |b| {
        b.iter(|| {
            let f = rng.legal_case(&cfg);
            runner.run_case(black_box(f)).is_ok()
        })
    });
    g.finish();
}

criterion_group!(benches, walks);
criterion_main!(benches);
