//! Shadow MMU costs: translation through the shadow table against the two-dimensional
//! walk it caches (guest tables plus a memslot lookup per level, same guest, same run),
//! and the shadow page fault (ns per fault: guest walk, shadow pages, SPTE, rmap_add).
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use revmap_host::{Memslot, MemslotFlags, Memslots};
use revmap_rmap::{Gfn, Hva, SlotId};
use revmap_shadow::mmu::ShadowMmu;
use revmap_shadow::paging::{
    walk, Access, CpuMode, Gpa, GuestPhysMemory, Gva, MemoryError, SparseMemory, PT_ACCESSED,
    PT_DIRTY,
};

const E: u64 = 0x7 | PT_ACCESSED | PT_DIRTY;
const PAGES: u64 = 512;

fn slot() -> Memslot {
    Memslot::new(
        SlotId(0),
        Gfn(0),
        1 << 16,
        12,
        MemslotFlags::empty(),
        Hva(0x7f00_0000_0000),
    )
    .expect("slot")
}

/// Guest memory seen through the memslots: every table read looks its slot up first
/// (the second dimension of the walk).
struct TwoD<'a> {
    slots: &'a Memslots,
    mem: &'a mut SparseMemory,
}

impl GuestPhysMemory for TwoD<'_> {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, MemoryError> {
        let s = self
            .slots
            .lookup(Gfn(gpa.gfn()))
            .ok_or(MemoryError::Unbacked(gpa.0))?;
        black_box(s.gfn_to_hva(Gfn(gpa.gfn())));
        self.mem.read_u64(gpa)
    }
    fn read_u32(&self, gpa: Gpa) -> Result<u32, MemoryError> {
        self.mem.read_u32(gpa)
    }
    fn cmpxchg_u64(&mut self, g: Gpa, o: u64, n: u64) -> Result<Result<(), u64>, MemoryError> {
        self.mem.cmpxchg_u64(g, o, n)
    }
    fn cmpxchg_u32(&mut self, g: Gpa, o: u32, n: u32) -> Result<Result<(), u32>, MemoryError> {
        self.mem.cmpxchg_u32(g, o, n)
    }
}

fn guest(mem: &mut SparseMemory) {
    for (at, v) in [(0x1000u64, 0x2000u64), (0x2000, 0x3000), (0x3000, 0x4000)] {
        mem.write_u64(Gpa(at), v | E).expect("mem");
    }
    for i in 0..PAGES {
        mem.write_u64(Gpa(0x4000 + 8 * i), (0x1000 + i) << 12 | E)
            .expect("mem");
    }
}

fn shadow(c: &mut Criterion) {
    let mut g = c.benchmark_group("shadow");
    let mut m = ShadowMmu::new();
    m.add_memslot(slot()).expect("slot");
    guest(&mut m.mem);
    let v = m.add_vcpu(CpuMode::long4(0x1000));
    for i in 0..PAGES {
        m.access(v, i << 12, Access::empty()).expect("fault");
    }
    let mut i = 0u64;
    g.bench_function("translate/shadow", |b| {
        b.iter(|| {
            i = (i + 1) % PAGES;
            m.translate(v, black_box(i << 12), Access::empty())
        })
    });
    let mut slots = Memslots::new();
    slots.insert(slot()).expect("slot");
    let mut mem = SparseMemory::new();
    guest(&mut mem);
    let mode = CpuMode::long4(0x1000);
    g.bench_function("translate/walk_2d", |b| {
        b.iter(|| {
            i = (i + 1) % PAGES;
            let mut t = TwoD {
                slots: &slots,
                mem: &mut mem,
            };
            walk(&mut t, black_box(&mode), Gva(i << 12), Access::empty()).map(|w| w.outcome)
        })
    });
    g.bench_function("fault/4k-after-unmap", |b| {
        b.iter(|| {
            i = (i + 1) % PAGES;
            m.unmap_gfn_range(SlotId(0), 0x1000 + i, 0x1001 + i)
                .expect("unmap");
            m.access(v, black_box(i << 12), Access::empty())
        })
    });
    g.finish();
}

criterion_group!(benches, shadow);
criterion_main!(benches);
