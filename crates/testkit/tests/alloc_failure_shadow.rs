//! Allocation failure everywhere in a representative run of the x86 shadow MMU: VM
//! creation, two memslots (one backed by 2 MiB host pages), guest page tables written
//! through `guest_store`, faults that create shadow pages at every level (4 KiB pages,
//! a 2 MiB guest page over 4 KiB host pages, a huge SPTE, an MMIO 1 GiB page), prefetch,
//! write protection of guest page tables (a write fault on a table, emulated writes,
//! unsync), CR3 switches through `prev_roots`, INVLPG, a vCPU with paging off (PAE
//! roots) switched to long mode, dirty logging, aging, host unmap, eviction under a page
//! limit, a memslot deletion and zap-all. For every k the k-th allocation fails; the
//! failure must surface as a clean error, the MMU must pass its checker afterwards, and
//! the run must continue (`revmap_testkit::failalloc` has the contract).
//!
//! The shadow MMU tops up its caches before it changes anything
//! (`ShadowMmu::mmu_topup_memory_caches`) and never allocates inside, so every failure
//! on an MMU path surfaces as `ShadowError::NoMemory` (or its rmap/memory equivalent);
//! the only allocations left infallible are the `Arc::new`s of VM and memslot creation,
//! which stable Rust cannot make fallible.

use revmap_host::{Memslot, MemslotFlags};
use revmap_rmap::{Gfn, Hva, SlotId};
use revmap_shadow::mmu::{AccessOutcome, ShadowMmu};
use revmap_shadow::paging::{
    Access, CpuMode, CR0_PE, PT_ACCESSED, PT_DIRTY, PT_PAGE_SIZE, PT_PRESENT, PT_USER, PT_WRITABLE,
};
use revmap_testkit::failalloc::{self, FailingAlloc, FaultRun};

#[global_allocator]
static ALLOC: FailingAlloc = FailingAlloc;

/// Slot 0: frames 0..2048 over 4 KiB host pages (tables, data, a 2 MiB guest page).
const SLOT0_PAGES: u64 = 2048;
/// Slot 1: 2 MiB at gfn 0x800 over one 2 MiB host page (a huge SPTE).
const SLOT1_BASE: u64 = 0x800;
const SLOT1_PAGES: u64 = 512;
const FULL: u64 = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY;
/// 4 KiB data pages mapped by the PT at frame 4 (va 0..PAGES*4K); PT entry PAGES maps
/// the PD (frame 3) itself.
const PAGES: u64 = 48;
/// va of the 2 MiB guest page over slot 0 (gpa 2M), of the one over slot 1 (gpa 8M),
/// of the 1 GiB guest page with no memslot behind it (MMIO), of the page mapping the PD.
const VA_2M_SMALL: u64 = 0x20_0000;
const VA_2M_HUGE: u64 = 0x40_0000;
const VA_MMIO: u64 = 0x4000_0000;
const VA_PD: u64 = PAGES << 12;

struct ShadowRun;

struct State {
    m: ShadowMmu,
    cpus: [usize; 3],
}

fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

/// A guest access that must succeed: a write to a write-protected table is emulated
/// (the store itself is left out: only its effect on the shadow pages is modelled).
fn touch(st: &mut State, cpu: usize, va: u64, acc: Access) -> Result<(), String> {
    let v = st.cpus[cpu];
    match st.m.access(v, va, acc).map_err(e)? {
        AccessOutcome::WriteProtected(g) => st.m.track_write(g.0 & !7, 8).map_err(e),
        AccessOutcome::Fault(pf) => Err(format!("#PF {:#x} at {va:#x}", pf.error_code)),
        AccessOutcome::Retry => Err(format!("retry at {va:#x}")),
        _ => Ok(()),
    }
}

fn store(m: &mut ShadowMmu, gpa: u64, val: u64) -> Result<(), String> {
    m.guest_store(gpa, val).map(drop).map_err(e)
}

fn slot(id: u16, base: u64, pages: u64, shift: u32, hva: u64) -> Result<Memslot, String> {
    Memslot::new(
        SlotId(id),
        Gfn(base),
        pages,
        shift,
        MemslotFlags::empty(),
        Hva(hva),
    )
    .map_err(e)
}

fn paging_off() -> CpuMode {
    CpuMode::new(CR0_PE, 0, 0, 0)
}

impl FaultRun for ShadowRun {
    type State = State;

    fn setup(&self) -> Result<State, String> {
        let mut m = ShadowMmu::try_new().map_err(e)?;
        m.add_memslot(slot(0, 0, SLOT0_PAGES, 12, 0x7f00_0000_0000)?)
            .map_err(e)?;
        // PML4 at frame 1 (and a second root at frame 5), PDPT 2, PD 3, PT 4, written
        // by the guest (no shadow page yet: plain stores).
        for (t, v) in [(1u64, 0x2000u64), (5, 0x2000), (2, 0x3000), (3, 0x4000)] {
            store(&mut m, t << 12, v | FULL)?;
        }
        store(&mut m, (2 << 12) + 8, VA_MMIO | FULL | PT_PAGE_SIZE)?;
        store(&mut m, (3 << 12) + 8, 0x20_0000 | FULL | PT_PAGE_SIZE)?;
        store(&mut m, (3 << 12) + 16, 0x80_0000 | FULL | PT_PAGE_SIZE)?;
        for i in 0..PAGES {
            store(&mut m, (4 << 12) + i * 8, (0x100 + i) << 12 | FULL)?;
        }
        store(&mut m, (4 << 12) + PAGES * 8, 0x3000 | FULL)?;
        let c0 = m.try_add_vcpu(CpuMode::long4(0x1000)).map_err(e)?;
        let c1 = m.try_add_vcpu(CpuMode::long4(0x5000)).map_err(e)?;
        let c2 = m.try_add_vcpu(paging_off()).map_err(e)?;
        Ok(State {
            m,
            cpus: [c0, c1, c2],
        })
    }

    fn steps(&self) -> &'static [&'static str] {
        &[
            "create_memslot",
            "read_faults",
            "write_faults",
            "large_pages",
            "mmio",
            "write_protected_table",
            "page_table_stores",
            "cr3_switch",
            "invlpg",
            "paging_off_then_long_mode",
            "dirty_log",
            "age",
            "unmap",
            "eviction",
            "refault",
            "delete_memslot",
            "zap_all",
            "refault_after_zap",
        ]
    }

    fn step(&self, st: &mut State, i: usize) -> Result<(), String> {
        match i {
            0 => {
                if st.m.memslots().any(|s| s.id() == SlotId(1)) {
                    return Ok(()); // a repeated step: the slot was created
                }
                let s = slot(1, SLOT1_BASE, SLOT1_PAGES, 21, 0x7f10_0000_0000)?;
                st.m.add_memslot(s).map_err(e)
            }
            1 => (0..PAGES).try_for_each(|p| touch(st, 0, p << 12, Access::empty())),
            2 => (0..PAGES).try_for_each(|p| touch(st, 1, p << 12, Access::WRITE)),
            3 => {
                (0..8).try_for_each(|p| touch(st, 0, VA_2M_SMALL + (p << 12), Access::WRITE))?;
                (0..8).try_for_each(|p| touch(st, 0, VA_2M_HUGE + (p << 12), Access::empty()))?;
                if st.m.stats.huge_sptes == 0 {
                    return Err("no huge SPTE for the 2 MiB-backed guest page".into());
                }
                Ok(())
            }
            4 => {
                // The fault caches an MMIO SPTE; the second access hits it.
                for _ in 0..2 {
                    match st.m.access(st.cpus[0], VA_MMIO + 0x18, Access::empty()) {
                        Ok(AccessOutcome::Mmio(_)) => {}
                        other => return Err(format!("MMIO access: {other:?}")),
                    }
                }
                Ok(())
            }
            5 => touch(st, 0, VA_PD + 0x18, Access::WRITE),
            6 => {
                // Level-1 table: unsync; upper table (write-tracked): emulated.
                (0..8).try_for_each(|i| {
                    store(&mut st.m, (4 << 12) + i * 8, (0x180 + i) << 12 | FULL)
                })?;
                store(&mut st.m, (3 << 12) + 24, 0)
            }
            7 => {
                let v = st.cpus[0];
                st.m.load_cr3(v, 0x5000).map_err(e)?;
                touch(st, 0, 0, Access::empty())?;
                st.m.load_cr3(v, 0x1000).map_err(e)?;
                st.m.load_cr3(v, 0x1000).map_err(e)
            }
            8 => (0..PAGES).try_for_each(|p| st.m.invlpg(st.cpus[1], p << 12).map_err(e)),
            9 => {
                let v = st.cpus[2];
                if st.m.vcpus()[v].mode == paging_off() {
                    (0..8).try_for_each(|p| touch(st, 2, 0x10_0000 + (p << 12), Access::WRITE))?;
                    (0..2).try_for_each(|q| touch(st, 2, q << 30, Access::empty()))?;
                }
                st.m.set_mode(v, CpuMode::long4(0x1000)).map_err(e)?;
                touch(st, 2, 0x1000, Access::empty())
            }
            10 => {
                let s0 = st.m.memslots().next().cloned().ok_or("no slot")?;
                st.m.update_memslot(s0.with_flags(MemslotFlags::LOG_DIRTY_PAGES));
                st.m.slot_remove_write_access(SlotId(0)).map_err(e)?;
                (0..4).try_for_each(|p| touch(st, 0, p << 12, Access::WRITE))?;
                let log = st.m.get_dirty_log(SlotId(0)).map_err(e)?;
                st.m.clear_dirty_log(SlotId(0), 0, &log).map_err(e)?;
                st.m.update_memslot(s0.with_flags(MemslotFlags::empty()));
                Ok(())
            }
            11 => {
                st.m.age_gfn(SlotId(0), 0, SLOT0_PAGES);
                st.m.test_age_gfn(SlotId(1), SLOT1_BASE, SLOT1_BASE + SLOT1_PAGES);
                Ok(())
            }
            12 => {
                st.m.invalidate.begin();
                let r = st.m.unmap_gfn_range(SlotId(0), 0x100, 0x120);
                st.m.invalidate.end();
                r.map(drop).map_err(e)
            }
            13 => {
                st.m.set_max_mmu_pages(Some(16));
                let r = (0..PAGES).try_for_each(|p| touch(st, 1, p << 12, Access::empty()));
                st.m.set_max_mmu_pages(None);
                if st.m.stats.evicted == 0 {
                    return Err("nothing evicted under the page limit".into());
                }
                r
            }
            14 => (0..PAGES).try_for_each(|p| touch(st, 0, p << 12, Access::WRITE)),
            15 => st.m.remove_memslot(SlotId(1)).map(drop).map_err(e),
            16 => st.m.zap_all().map_err(e),
            17 => {
                (0..PAGES).try_for_each(|p| touch(st, 1, p << 12, Access::empty()))?;
                touch(st, 0, VA_2M_SMALL, Access::WRITE)
            }
            _ => Err(format!("no step {i}")),
        }
    }

    fn check(&self, st: &State) -> Result<(), String> {
        st.m.check().map(drop).map_err(e)
    }
}

#[test]
fn every_allocation_of_a_shadow_mmu_run_can_fail() {
    let Some(rep) =
        failalloc::sweep_test("every_allocation_of_a_shadow_mmu_run_can_fail", &ShadowRun)
    else {
        return;
    };
    // Only VM and memslot creation keep infallible allocations (their `Arc::new`s):
    // none on a fault, host or memslot-change path.
    assert!(rep.infallible.len() <= 3, "{rep:#?}");
    for site in &rep.infallible {
        assert!(
            site.contains(" in setup: ") || site.contains(" in create_memslot: "),
            "an infallible allocation on an MMU path: {site}"
        );
        assert!(site.contains("Arc"), "not an Arc::new: {site}");
    }
    assert!(rep.surfaced > 10 * rep.infallible.len() as u64, "{rep:#?}");
}
