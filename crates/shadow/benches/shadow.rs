//! Shadow MMU costs: translation through the shadow table against the two-dimensional
//! walk it caches (guest tables plus a memslot lookup per level, same guest, same run),
//! and the shadow page fault (ns per fault: guest walk, shadow pages, SPTE, rmap_add).
//! The guest and MMU come from [`revmap_shadow::fixture`] (shared with `revmap bench x86`).
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use revmap_shadow::fixture::{ShadowFixture, DATA_GFN, SLOT};
use revmap_shadow::paging::{walk, Access, Gva};

const PAGES: u64 = 512;

fn shadow(c: &mut Criterion) {
    let mut g = c.benchmark_group("shadow");
    let mut f = ShadowFixture::new(PAGES).expect("fixture");
    f.touch_all(Access::empty()).expect("fault");
    let v = f.vcpu;
    let mut i = 0u64;
    g.bench_function("translate/shadow", |b| {
        b.iter(|| {
            i = (i + 1) % PAGES;
            f.mmu.translate(v, black_box(i << 12), Access::empty())
        })
    });
    let (slots, mut mem, mode) = ShadowFixture::two_d(PAGES).expect("2d");
    g.bench_function("translate/walk_2d", |b| {
        b.iter(|| {
            i = (i + 1) % PAGES;
            let mut t = revmap_shadow::fixture::TwoD {
                slots: &slots,
                mem: &mut mem,
            };
            walk(&mut t, black_box(&mode), Gva(i << 12), Access::empty()).map(|w| w.outcome)
        })
    });
    g.bench_function("fault/4k-after-unmap", |b| {
        b.iter(|| {
            i = (i + 1) % PAGES;
            f.mmu
                .unmap_gfn_range(SLOT, DATA_GFN + i, DATA_GFN + i + 1)
                .expect("unmap");
            f.mmu.access(v, black_box(i << 12), Access::empty())
        })
    });
    g.finish();
}

criterion_group!(benches, shadow);
criterion_main!(benches);
