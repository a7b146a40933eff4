//! Resource bounds under a hostile guest that maps one page everywhere: 64 guest page
//! tables whose 512 entries all map gfn 0x100, reached through two page directories,
//! and a guest that touches every one of those 32768 virtual pages.
//!
//! Measured after every access: the gfn's `pte_list` never holds more than
//! [`RMAP_RECYCLE_THRESHOLD`] entries (the add over the threshold zaps the list and asks
//! for a remote flush, `rmap_recycled`), and the shadow MMU never uses more shadow
//! pages than its limit (`n_max_mmu_pages`; older pages are zapped, `evicted`).

use revmap_host::{Memslot, MemslotFlags};
use revmap_rmap::pte_list::RMAP_RECYCLE_THRESHOLD;
use revmap_rmap::{Gfn, Hva, SlotId};
use revmap_shadow::mmu::{AccessOutcome, ShadowMmu};
use revmap_shadow::paging::{
    Access, CpuMode, Gpa, PT_ACCESSED, PT_DIRTY, PT_PRESENT, PT_USER, PT_WRITABLE,
};

const SLOT_PAGES: u64 = 4096;
const P: u64 = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED;
const LEAF: u64 = P | PT_DIRTY;
/// The one data page every PTE maps.
const DATA: u64 = 0x10_0000;
/// Guest page tables (frames 0x10..0x50), 32 under each of two page directories.
const PTS: u64 = 64;

/// What the run measured.
struct Measured {
    max_rmap_len: usize,
    max_used_pages: u64,
    limit: u64,
    rmap_recycled: u64,
    evicted: u64,
}

fn hostile_guest(limit: Option<u64>) -> Measured {
    let mut m = ShadowMmu::new();
    let slot = Memslot::new(
        SlotId(0),
        Gfn(0),
        SLOT_PAGES,
        12,
        MemslotFlags::empty(),
        Hva(0x7f00_0000_0000),
    )
    .unwrap();
    m.add_memslot(slot).unwrap();
    m.set_max_mmu_pages(limit);
    // PML4 (frame 1) -> PDPT (frame 2) -> PDs (frames 3, 4) -> PTs -> DATA.
    m.mem.write_u64(Gpa(0x1000), 0x2000 | P).unwrap();
    for pd in 0..2u64 {
        m.mem
            .write_u64(Gpa(0x2000 + 8 * pd), (0x3000 + (pd << 12)) | P)
            .unwrap();
    }
    for t in 0..PTS {
        let (pd, i) = (t / 32, t % 32);
        let pt = (0x10 + t) << 12;
        m.mem
            .write_u64(Gpa(0x3000 + (pd << 12) + 8 * i), pt | P)
            .unwrap();
        for e in 0..512 {
            m.mem.write_u64(Gpa(pt + 8 * e), DATA | LEAF).unwrap();
        }
    }
    let v = m.add_vcpu(CpuMode::long4(0x1000));
    let mut out = Measured {
        max_rmap_len: 0,
        max_used_pages: 0,
        limit: m.max_mmu_pages(),
        rmap_recycled: 0,
        evicted: 0,
    };
    for t in 0..PTS {
        for e in 0..512u64 {
            let gva = ((t / 32) << 30) | ((t % 32) << 21) | (e << 12);
            let got = m.access(v, gva, Access::empty()).unwrap();
            assert!(
                matches!(got, AccessOutcome::Fixed(g) | AccessOutcome::Hit(g) if g == Gpa(DATA)),
                "{gva:#x}: {got:?}"
            );
            let len = m.rmap_entries(DATA >> 12, 1).unwrap().len();
            out.max_rmap_len = out.max_rmap_len.max(len);
            out.max_used_pages = out.max_used_pages.max(m.used_mmu_pages());
        }
    }
    m.check().unwrap();
    out.rmap_recycled = m.stats.rmap_recycled;
    out.evicted = m.stats.evicted;
    out
}

#[test]
fn one_page_everywhere_keeps_the_rmap_under_the_recycle_threshold() {
    let r = hostile_guest(None);
    // 32768 SPTEs of one gfn were made; the list never held more than the threshold.
    assert!(
        r.max_rmap_len <= RMAP_RECYCLE_THRESHOLD,
        "{}",
        r.max_rmap_len
    );
    assert!(
        r.max_rmap_len > RMAP_RECYCLE_THRESHOLD / 2,
        "{}",
        r.max_rmap_len
    );
    // Each recycle zaps at most THRESHOLD + 1 entries: at least this many happened.
    let spte_count = (PTS * 512) as usize;
    assert!(
        r.rmap_recycled as usize >= spte_count / (RMAP_RECYCLE_THRESHOLD + 1) - 1,
        "{} recycles",
        r.rmap_recycled
    );
    assert!(
        r.max_used_pages <= r.limit,
        "{} > {}",
        r.max_used_pages,
        r.limit
    );
}

#[test]
fn one_page_everywhere_keeps_the_shadow_pages_under_the_limit() {
    // 64 guest page tables need 64 shadow PTs (plus the PML4, PDPT and two PDs).
    let r = hostile_guest(Some(16));
    assert_eq!(r.limit, 16);
    assert!(r.max_used_pages <= 16, "{} shadow pages", r.max_used_pages);
    assert!(r.evicted >= PTS - 16, "{} evicted", r.evicted);
    assert!(
        r.max_rmap_len <= RMAP_RECYCLE_THRESHOLD,
        "{}",
        r.max_rmap_len
    );
}
