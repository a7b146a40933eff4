//! Allocation failure everywhere in a representative run of the x86 shadow MMU: a
//! memslot, guest page tables (4K pages and a 2M page), reads and writes that fault
//! shadow pages in, stores to shadowed page tables (the emulated-write path), a CR3
//! switch, INVLPG, dirty logging by write protection, aging, host unmap, zap-all. For
//! every k the k-th allocation fails; the failure must surface as a clean error, the
//! MMU must pass its checker afterwards, and the run must continue
//! (`revmap_testkit::failalloc` has the contract).

use revmap_host::{Memslot, MemslotFlags};
use revmap_rmap::{Gfn, Hva, SlotId};
use revmap_shadow::mmu::{AccessOutcome, ShadowMmu};
use revmap_shadow::paging::{
    Access, CpuMode, Gpa, PT_ACCESSED, PT_DIRTY, PT_PAGE_SIZE, PT_PRESENT, PT_USER, PT_WRITABLE,
};
use revmap_testkit::failalloc::{self, FailingAlloc, FaultRun};

#[global_allocator]
static ALLOC: FailingAlloc = FailingAlloc;

const SLOT_PAGES: u64 = 2048;
const FULL: u64 = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY;
/// 4 KiB data pages mapped by table 4 (va 0..PAGES*4K) and a 2 MiB page at va 2M.
const PAGES: u64 = 48;

struct ShadowRun;

struct State {
    m: ShadowMmu,
    cpus: [usize; 2],
}

fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

fn touch(st: &mut State, cpu: usize, va: u64, acc: Access) -> Result<(), String> {
    let v = st.cpus[cpu];
    match st.m.access(v, va, acc).map_err(e)? {
        AccessOutcome::WriteProtected(g) => st.m.track_write(g.0 & !7, 8).map_err(e),
        AccessOutcome::Fault(pf) => Err(format!("#PF {:#x} at {va:#x}", pf.error_code)),
        _ => Ok(()),
    }
}

impl FaultRun for ShadowRun {
    type State = State;

    fn setup(&self) -> Result<State, String> {
        let mut m = ShadowMmu::new();
        let slot = Memslot::new(
            SlotId(0),
            Gfn(0),
            SLOT_PAGES,
            12,
            MemslotFlags::empty(),
            Hva(0x7f00_0000_0000),
        )
        .map_err(e)?;
        m.add_memslot(slot).map_err(e)?;
        // PML4 at frame 1 (and a second root at frame 5), PDPT 2, PD 3, PT 4.
        for (t, v) in [(1u64, 0x2000u64), (5, 0x2000), (2, 0x3000), (3, 0x4000)] {
            m.mem.write_u64(Gpa(t << 12), v | FULL).map_err(e)?;
        }
        m.mem
            .write_u64(Gpa((3 << 12) + 8), 0x20_0000 | FULL | PT_PAGE_SIZE)
            .map_err(e)?;
        for i in 0..PAGES {
            m.mem
                .write_u64(Gpa((4 << 12) + i * 8), (0x100 + i) << 12 | FULL)
                .map_err(e)?;
        }
        let c0 = m.add_vcpu(CpuMode::long4(0x1000));
        let c1 = m.add_vcpu(CpuMode::long4(0x5000));
        Ok(State { m, cpus: [c0, c1] })
    }

    fn steps(&self) -> &'static [&'static str] {
        &[
            "read_faults",
            "write_faults",
            "large_page",
            "page_table_stores",
            "cr3_switch",
            "invlpg",
            "dirty_log",
            "age",
            "unmap",
            "refault",
            "zap_all",
        ]
    }

    fn step(&self, st: &mut State, i: usize) -> Result<(), String> {
        match i {
            0 => (0..PAGES).try_for_each(|p| touch(st, 0, p << 12, Access::empty())),
            1 => (0..PAGES).try_for_each(|p| touch(st, 1, p << 12, Access::WRITE)),
            2 => (0..8).try_for_each(|p| touch(st, 0, 0x20_0000 + (p << 12), Access::WRITE)),
            3 => (0..8).try_for_each(|i| {
                let gpa = (4 << 12) + i * 8;
                st.m.guest_store(gpa, (0x180 + i) << 12 | FULL).map(drop).map_err(e)
            }),
            4 => {
                let v = st.cpus[0];
                st.m.load_cr3(v, 0x5000).map_err(e)?;
                st.m.load_cr3(v, 0x1000).map_err(e)
            }
            5 => (0..PAGES).try_for_each(|p| st.m.invlpg(st.cpus[1], p << 12).map_err(e)),
            6 => {
                let slot = st.m.memslots().next().cloned().ok_or("no slot")?;
                st.m.update_memslot(slot.with_flags(MemslotFlags::LOG_DIRTY_PAGES));
                st.m.slot_remove_write_access(SlotId(0)).map_err(e)?;
                (0..4).try_for_each(|p| touch(st, 0, p << 12, Access::WRITE))?;
                st.m.get_dirty_log(SlotId(0)).map(drop).map_err(e)
            }
            7 => {
                st.m.age_gfn(SlotId(0), 0, SLOT_PAGES);
                Ok(())
            }
            8 => {
                st.m.invalidate.begin();
                let r = st.m.unmap_gfn_range(SlotId(0), 0x100, 0x120);
                st.m.invalidate.end();
                r.map(drop).map_err(e)
            }
            9 => (0..PAGES).try_for_each(|p| touch(st, 0, p << 12, Access::WRITE)),
            10 => st.m.zap_all().map_err(e),
            _ => Err(format!("no step {i}")),
        }
    }

    fn check(&self, st: &State) -> Result<(), String> {
        st.m.check().map(drop).map_err(e)
    }
}

#[test]
fn every_allocation_of_a_shadow_mmu_run_can_fail() {
    const NAME: &str = "every_allocation_of_a_shadow_mmu_run_can_fail";
    if std::env::var_os(failalloc::CHILD_ENV).is_some() {
        if let Err(e) = failalloc::sweep(&ShadowRun) {
            panic!("{e}");
        }
        return;
    }
    let rep = failalloc::run_in_child(NAME).unwrap_or_else(|e| panic!("{e}"));
    println!("{rep:#?}");
    assert!(rep.allocations > 0);
    assert_eq!(rep.accounted(), rep.allocations, "{rep:#?}");
    assert!(rep.surfaced > rep.infallible.len() as u64, "{rep:#?}");
}
