//! A proptest state machine over the shadow MMU: random guest page-table stores,
//! accesses, CR3 switches, INVLPG, guest TLB flushes, mode changes, and host unmap,
//! aging and dirty logging. After every step the section-8 invariant checker must pass,
//! and every access (re-validated as the replay rules do, by an INVLPG first) must give
//! what the pure reference walker gives on the same guest memory: the same address or
//! the same #PF error code, and the same A/D bits left in the guest tables.

mod common;

use common::{
    access_of, age, check_access, flush_synced, host_unmap, load_cr3_synced, random_gpte_flags,
};
use proptest::prelude::*;
use revmap_host::MemslotFlags;
use revmap_rmap::SlotId;
use revmap_shadow::mmu::ShadowMmu;
use revmap_shadow::paging::{
    CpuMode, Gpa, GuestPhysMemory, CR0_WP, EFER_NXE, PT_ACCESSED, PT_DIRTY, PT_PAGE_SIZE,
    PT_PRESENT, PT_USER, PT_WRITABLE,
};

const SLOT_PAGES: u64 = 4096;
const TABLES: u64 = 12; // guest tables live in frames 1..=TABLES
const IDX: u64 = 3; // entries 0..IDX of each table are used

#[derive(Clone, Debug)]
enum Op {
    Store { table: u64, idx: u64, val: u64 },
    Access { cpu: usize, va: u64, acc: u8 },
    Cr3 { cpu: usize, table: u64 },
    Invlpg { cpu: usize, va: u64 },
    Flush { cpu: usize },
    Mode { cpu: usize, wp: bool, nxe: bool },
    Unmap { gfn: u64, n: u64 },
    Age { gfn: u64, n: u64 },
    DirtyLog { on: bool },
    GetDirty,
}

fn entry() -> impl Strategy<Value = u64> {
    let flags = prop_oneof![
        3 => Just(PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY),
        1 => random_gpte_flags(),
    ];
    let target = prop_oneof![
        4 => (1..=TABLES).prop_map(|f| f << 12),
        2 => (0x100u64..0x110).prop_map(|f| f << 12),
        1 => prop_oneof![Just(0x20_0000u64), Just(0x40_0000), Just(0x60_0000)]
            .prop_map(|a| a | PT_PAGE_SIZE),
        1 => Just(0u64),
    ];
    (flags, target).prop_map(|(f, t)| f | t)
}

fn va() -> impl Strategy<Value = u64> {
    (0..IDX, 0..IDX, 0..IDX, 0..IDX, 0u64..4096)
        .prop_map(|(a, b, c, d, o)| (a << 39) | (b << 30) | (c << 21) | (d << 12) | (o & !7))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1..=TABLES, 0..IDX, entry()).prop_map(|(table, idx, val)| Op::Store { table, idx, val }),
        10 => (0..2usize, va(), 0u8..6).prop_map(|(cpu, va, acc)| Op::Access { cpu, va, acc }),
        2 => (0..2usize, 1..=4u64).prop_map(|(cpu, table)| Op::Cr3 { cpu, table }),
        2 => (0..2usize, va()).prop_map(|(cpu, va)| Op::Invlpg { cpu, va }),
        1 => (0..2usize).prop_map(|cpu| Op::Flush { cpu }),
        1 => (0..2usize, any::<bool>(), any::<bool>()).prop_map(|(cpu, wp, nxe)| Op::Mode { cpu, wp, nxe }),
        1 => (0u64..SLOT_PAGES, 1u64..600).prop_map(|(gfn, n)| Op::Unmap { gfn, n }),
        1 => (0u64..SLOT_PAGES, 1u64..600).prop_map(|(gfn, n)| Op::Age { gfn, n }),
        1 => any::<bool>().prop_map(|on| Op::DirtyLog { on }),
        1 => Just(Op::GetDirty),
    ]
}

fn run(ops: Vec<Op>, backing: u32, max_pages: Option<u64>) -> Result<(), TestCaseError> {
    let mut m = ShadowMmu::new();
    let slot =
        common::mem::slot0(SLOT_PAGES, backing).map_err(|e| TestCaseError::fail(e.to_string()))?;
    m.add_memslot(slot)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    m.set_max_mmu_pages(max_pages);
    // A minimal valid path for va 0: 1 -> 2 -> 3 -> 4 -> data.
    let full = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY;
    for (t, v) in [(1u64, 0x2000u64), (2, 0x3000), (3, 0x4000), (4, 0x10_0000)] {
        m.mem
            .write_u64(Gpa(t << 12), v | full)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    let c0 = m.add_vcpu(CpuMode::long4(0x1000));
    let c1 = m.add_vcpu(CpuMode::long4(0x2000));
    let cpus = [c0, c1];
    for (step, op) in ops.into_iter().enumerate() {
        let r: Result<(), String> = (|| {
            match op.clone() {
                Op::Store { table, idx, val } => {
                    m.guest_store((table << 12) + idx * 8, val)
                        .map_err(|e| e.to_string())?;
                }
                Op::Access { cpu, va, acc } => {
                    let refmem = check_access(&mut m, cpus[cpu], va, access_of(acc), SLOT_PAGES)?;
                    for t in 1..=TABLES {
                        for i in 0..IDX {
                            let g = Gpa((t << 12) + i * 8);
                            let (a, b) = (
                                m.mem.read_u64(g).unwrap_or(0),
                                refmem.read_u64(g).unwrap_or(0),
                            );
                            if a != b {
                                return Err(format!(
                                    "entry {:#x}: shadow {a:#x}, walker {b:#x}",
                                    g.0
                                ));
                            }
                        }
                    }
                }
                Op::Cr3 { cpu, table } => {
                    let v = cpus[cpu];
                    load_cr3_synced(&mut m, v, table << 12)?;
                }
                Op::Invlpg { cpu, va } => m.invlpg(cpus[cpu], va).map_err(|e| e.to_string())?,
                Op::Flush { cpu } => {
                    flush_synced(&mut m, cpus[cpu])?;
                }
                Op::Mode { cpu, wp, nxe } => {
                    let v = cpus[cpu];
                    let mut mode = m.vcpus()[v].mode;
                    mode.cr0 = if wp {
                        mode.cr0 | CR0_WP
                    } else {
                        mode.cr0 & !CR0_WP
                    };
                    mode.efer = if nxe {
                        mode.efer | EFER_NXE
                    } else {
                        mode.efer & !EFER_NXE
                    };
                    m.set_mode(v, mode).map_err(|e| e.to_string())?;
                }
                Op::Unmap { gfn, n } => host_unmap(&mut m, backing, gfn, n, SLOT_PAGES)?,
                Op::Age { gfn, n } => {
                    let end = age(&mut m, gfn, n, SLOT_PAGES)?;
                    if m.test_age_gfn(SlotId(0), gfn, end) {
                        return Err("still young after aging".into());
                    }
                }
                Op::DirtyLog { on } => {
                    let slot = m.memslots().next().cloned().ok_or("no slot")?;
                    let flags = if on {
                        MemslotFlags::LOG_DIRTY_PAGES
                    } else {
                        MemslotFlags::empty()
                    };
                    m.update_memslot(slot.with_flags(flags));
                    if on {
                        m.slot_remove_write_access(SlotId(0))
                            .map_err(|e| e.to_string())?;
                    }
                }
                Op::GetDirty => {
                    m.get_dirty_log(SlotId(0)).map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            return Err(TestCaseError::fail(format!("step {step} {op:?}: {e}")));
        }
        if let Err(v) = m.check() {
            return Err(TestCaseError::fail(format!("step {step} {op:?}: {v}")));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn shadow_mmu_state_machine_4k_backing(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops, 12, None)?;
    }

    /// The tightest page limit KVM's rules allow here: two vCPUs pin up to eight roots
    /// (the current one and three `prev_roots` each), and with every page pinned
    /// `make_mmu_pages_available` fails (-ENOSPC), so one page more than that.
    #[test]
    fn shadow_mmu_state_machine_2m_backing_tight_limit(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops, 21, Some(9))?;
    }
}
