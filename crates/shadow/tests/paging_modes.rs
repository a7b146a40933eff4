//! The shadow MMU for guests without long mode: paging off (direct shadow pages under the
//! PAE root), 32-bit paging (4-byte gptes shadowed in quadrants, 4 MiB pages as 2 MiB
//! halves) and PAE (roots from the PDPTRs), and vCPUs switching between these and 4-level
//! paging over the same tables. A proptest state machine of guest 4- and 8-byte table
//! stores, accesses, CR3 loads (which load the PDPTRs), INVLPG, guest TLB flushes, mode
//! switches and host unmap/aging: after every step the section-8 checker must pass and
//! every access must give what the reference walker gives on the same guest memory (the
//! address or the #PF error code, and the same guest table contents).

mod common;

use common::{
    access_of, age, check_access, flush_synced, host_unmap, load_cr3_synced, random_gpte_flags,
};
use proptest::prelude::*;
use revmap_shadow::mmu::{AccessOutcome, ShadowMmu};
use revmap_shadow::paging::{
    Access, CpuMode, Gpa, GuestPhysMemory, PagingMode, PfErrorCode, SparseMemory, CR0_PE, CR0_PG,
    CR0_WP, CR4_PAE, CR4_PSE, EFER_LMA, EFER_LME, EFER_NXE, PT_ACCESSED, PT_DIRTY, PT_PAGE_SIZE,
    PT_PRESENT, PT_USER, PT_WRITABLE,
};

const SLOT_PAGES: u64 = 4096;
const TABLES: u64 = 8; // guest tables live in frames 1..=TABLES

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Paging {
    Off,
    Bits32,
    Pae,
    Long4,
}

#[derive(Clone, Debug)]
enum Op {
    /// A store of `val` (truncated to 4 bytes if `four`) at byte `off` of table `table`.
    Store {
        table: u64,
        off: u64,
        val: u64,
        four: bool,
    },
    Access {
        cpu: usize,
        va: u64,
        acc: u8,
    },
    Cr3 {
        cpu: usize,
        table: u64,
    },
    Invlpg {
        cpu: usize,
        va: u64,
    },
    Flush {
        cpu: usize,
    },
    Mode {
        cpu: usize,
        paging: Paging,
        wp: bool,
        nxe: bool,
    },
    Unmap {
        gfn: u64,
        n: u64,
    },
    Age {
        gfn: u64,
        n: u64,
    },
}

/// Byte offsets of the entries the VAs below use, in 4- and 8-byte tables: index 0, 1,
/// 2 and those of the upper quadrants.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(4),
        Just(8),
        Just(16),
        Just(24),
        Just(0x3fc),
        Just(0x400),
        Just(0x404),
        Just(0x7fc),
        Just(0x800),
        Just(0x804),
        Just(0x808),
        Just(0xbfc),
        Just(0xc00),
        Just(0xffc),
        Just(0xff8),
        Just(PDPT_OFF),
        Just(PDPT_OFF + 8),
        Just(PDPT_OFF + 24),
    ]
}

/// Where in its page a PAE guest's PDPT lives (CR3 bits 11:5), away from the entries
/// other modes use.
const PDPT_OFF: u64 = 0xfc0;

/// Every offset [`offset`] yields.
const OFFSETS: [u64; 16] = [
    0, 4, 8, 16, 24, 0x3fc, 0x400, 0x404, 0x7fc, 0x800, 0x804, 0x808, 0xbfc, 0xc00, 0xffc, 0xff8,
];

fn entry() -> impl Strategy<Value = u64> {
    let full = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY;
    let flags = prop_oneof![
        3 => Just(full),
        2 => random_gpte_flags(),
        1 => Just(PT_PRESENT), // a PAE PDPTE
    ];
    let target = prop_oneof![
        4 => (1..=TABLES).prop_map(|f| f << 12),
        2 => (0x100u64..0x108).prop_map(|f| f << 12),
        1 => prop_oneof![Just(0x40_0000u64), Just(0x80_0000)].prop_map(|a| a | PT_PAGE_SIZE),
        1 => Just(0u64),
    ];
    (flags, target).prop_map(|(f, t)| f | t)
}

/// 32-bit VAs reaching the entries `offset` writes in every mode.
fn va() -> impl Strategy<Value = u64> {
    let hi = prop_oneof![Just(0u64), Just(1), Just(2), Just(3)]; // bits 31:30
    let mid = prop_oneof![Just(0u64), Just(1), Just(2), Just(511)]; // bits 29:21
    let lo = prop_oneof![Just(0u64), Just(1), Just(2), Just(256), Just(511)]; // bits 20:12
    (hi, mid, lo, 0u64..4096).prop_map(|(h, m, l, o)| (h << 30) | (m << 21) | (l << 12) | (o & !7))
}

fn op() -> impl Strategy<Value = Op> {
    let paging = prop_oneof![
        Just(Paging::Off),
        Just(Paging::Bits32),
        Just(Paging::Pae),
        Just(Paging::Long4)
    ];
    prop_oneof![
        6 => (1..=TABLES, offset(), entry(), any::<bool>())
            .prop_map(|(table, off, val, four)| Op::Store { table, off, val, four }),
        10 => (0..2usize, va(), 0u8..6).prop_map(|(cpu, va, acc)| Op::Access { cpu, va, acc }),
        2 => (0..2usize, 1..=4u64).prop_map(|(cpu, table)| Op::Cr3 { cpu, table }),
        2 => (0..2usize, va()).prop_map(|(cpu, va)| Op::Invlpg { cpu, va }),
        1 => (0..2usize).prop_map(|cpu| Op::Flush { cpu }),
        2 => (0..2usize, paging, any::<bool>(), any::<bool>())
            .prop_map(|(cpu, paging, wp, nxe)| Op::Mode { cpu, paging, wp, nxe }),
        1 => (0u64..SLOT_PAGES, 1u64..600).prop_map(|(gfn, n)| Op::Unmap { gfn, n }),
        1 => (0u64..SLOT_PAGES, 1u64..600).prop_map(|(gfn, n)| Op::Age { gfn, n }),
    ]
}

/// The mode for `paging` at `cr3`, PDPTRs loaded from `mem` (as a CR3 write does).
fn mode(paging: Paging, cr3: u64, wp: bool, nxe: bool, mem: &SparseMemory) -> CpuMode {
    let wp = if wp { CR0_WP } else { 0 };
    let nx = if nxe { EFER_NXE } else { 0 };
    let pg = CR0_PG | CR0_PE | wp;
    let mut m = match paging {
        Paging::Off => CpuMode::new(CR0_PE | wp, cr3, CR4_PSE, nx),
        Paging::Bits32 => CpuMode::new(pg, cr3, CR4_PSE, nx),
        Paging::Pae => CpuMode::new(pg, cr3, CR4_PSE | CR4_PAE, nx),
        Paging::Long4 => CpuMode::new(pg, cr3, CR4_PSE | CR4_PAE, EFER_LME | EFER_LMA | nx),
    };
    if paging == Paging::Pae {
        let base = (cr3 & 0xffff_f000) | PDPT_OFF;
        m.cr3 = base;
        m.pdptrs = Some(core::array::from_fn(|q| {
            mem.read_u64(Gpa(base + 8 * q as u64)).unwrap_or(0)
        }));
    }
    m
}

fn paging_of(m: &CpuMode) -> Paging {
    match m.paging() {
        PagingMode::Off => Paging::Off,
        PagingMode::Bits32 => Paging::Bits32,
        PagingMode::Pae => Paging::Pae,
        _ => Paging::Long4,
    }
}

fn run(ops: Vec<Op>, backing: u32, start: [Paging; 2]) -> Result<(), TestCaseError> {
    let fail = |e: String| TestCaseError::fail(e);
    let mut m = mmu(backing);
    // Every entry the VAs reach points at the next table with P|W|U|A|D, valid in every
    // format, and the PAE PDPTEs (P only) too, so that chains of tables translate in
    // every mode and leaves map table frames.
    let full = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY;
    for t in 1..=TABLES {
        let next = (t % TABLES + 1) << 12;
        let pdpt = (0..4).map(|q| (PDPT_OFF + 8 * q, next | PT_PRESENT));
        for (off, v) in OFFSETS.into_iter().map(|o| (o, next | full)).chain(pdpt) {
            m.mem
                .write_u32(Gpa((t << 12) + off), v as u32)
                .map_err(|e| fail(e.to_string()))?;
        }
    }
    let cpus = [
        m.add_vcpu(mode(start[0], 0x1000, true, true, &m.mem)),
        m.add_vcpu(mode(start[1], 0x2000, true, true, &m.mem)),
    ];
    for (step, op) in ops.into_iter().enumerate() {
        let r: Result<(), String> = (|| {
            match op.clone() {
                Op::Store {
                    table,
                    off,
                    val,
                    four,
                } => {
                    let gpa = (table << 12) + off;
                    if four {
                        m.guest_store_u32(gpa, val as u32)
                    } else {
                        m.guest_store(gpa & !7, val)
                    }
                    .map_err(|e| e.to_string())?;
                }
                Op::Access { cpu, va, acc } => {
                    let refmem = check_access(&mut m, cpus[cpu], va, access_of(acc), SLOT_PAGES)?;
                    for t in 1..=TABLES {
                        for off in (0..4096).step_by(4) {
                            let g = Gpa((t << 12) + off);
                            let (a, b) = (
                                m.mem.read_u32(g).unwrap_or(0),
                                refmem.read_u32(g).unwrap_or(0),
                            );
                            if a != b {
                                return Err(format!("{:#x}: shadow {a:#x}, walker {b:#x}", g.0));
                            }
                        }
                    }
                }
                Op::Cr3 { cpu, table } => {
                    let v = cpus[cpu];
                    let old = m.vcpus()[v].mode;
                    let (wp, nxe) = (old.wp(), old.nxe());
                    let new = mode(paging_of(&old), table << 12, wp, nxe, &m.mem);
                    m.set_mode(v, new).map_err(|e| e.to_string())?;
                    load_cr3_synced(&mut m, v, table << 12)?;
                }
                Op::Invlpg { cpu, va } => m.invlpg(cpus[cpu], va).map_err(|e| e.to_string())?,
                Op::Flush { cpu } => {
                    flush_synced(&mut m, cpus[cpu])?;
                }
                Op::Mode {
                    cpu,
                    paging,
                    wp,
                    nxe,
                } => {
                    let v = cpus[cpu];
                    let cr3 = m.vcpus()[v].mode.cr3;
                    let new = mode(paging, cr3, wp, nxe, &m.mem);
                    m.set_mode(v, new).map_err(|e| e.to_string())?;
                }
                Op::Unmap { gfn, n } => host_unmap(&mut m, backing, gfn, n, SLOT_PAGES)?,
                Op::Age { gfn, n } => {
                    age(&mut m, gfn, n, SLOT_PAGES)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = r {
            return Err(fail(format!("step {step} {op:?}: {e}")));
        }
        if let Err(v) = m.check() {
            return Err(fail(format!("step {step} {op:?}: {v}")));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn bits32_guests_4k_backing(ops in proptest::collection::vec(op(), 1..100)) {
        run(ops, 12, [Paging::Bits32, Paging::Bits32])?;
    }

    #[test]
    fn pae_guests_2m_backing(ops in proptest::collection::vec(op(), 1..100)) {
        run(ops, 21, [Paging::Pae, Paging::Pae])?;
    }

    #[test]
    fn paging_off_and_mixed_modes(ops in proptest::collection::vec(op(), 1..100)) {
        run(ops, 21, [Paging::Off, Paging::Bits32])?;
    }
}

/// An MMU with one `SLOT_PAGES` slot at gfn 0 on host pages of `backing`.
fn mmu(backing: u32) -> ShadowMmu {
    let mut m = ShadowMmu::new();
    let slot = common::mem::slot0(SLOT_PAGES, backing).unwrap();
    m.add_memslot(slot).unwrap();
    m
}

/// Targeted: a 32-bit guest's page directory is shadowed in four quadrant roots, and a
/// 4 MiB page by 2 MiB halves; a 4-byte store to a PDE is emulated and zaps exactly the
/// two SPTEs that derive from it.
#[test]
fn bits32_quadrants_and_4m_pages() {
    let mut m = mmu(21);
    let full = (PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY) as u32;
    // PD at gfn 1: PDE 0 -> PT at gfn 2; PDE 769 (va 0xc040_0000) a 4 MiB page at 8 MiB.
    m.mem.write_u32(Gpa(0x1000), 0x2000 | full).unwrap();
    m.mem
        .write_u32(
            Gpa(0x1000 + 769 * 4),
            0x80_0000 | full | PT_PAGE_SIZE as u32,
        )
        .unwrap();
    // PT entry 600 (va 0x25_8000): in the PT's second half (quadrant 1).
    m.mem
        .write_u32(Gpa(0x2000 + 600 * 4), 0x10_0000 | full)
        .unwrap();
    let v = m.add_vcpu(CpuMode::new(CR0_PG | CR0_PE | CR0_WP, 0x1000, CR4_PSE, 0));
    assert_eq!(
        m.access(v, 0x25_8010, Access::empty()).unwrap(),
        AccessOutcome::Fixed(Gpa(0x10_0010))
    );
    // Both halves of the 4 MiB page: 2 MiB SPTEs in quadrant 3's root.
    for (va, gpa) in [(0xc040_0000u64, 0x80_0000u64), (0xc060_1000, 0xa0_1000)] {
        assert_eq!(
            m.access(v, va, Access::WRITE).unwrap(),
            AccessOutcome::Fixed(Gpa(gpa))
        );
        assert_eq!(
            m.access(v, va, Access::empty()).unwrap(),
            AccessOutcome::Hit(Gpa(gpa))
        );
    }
    m.check().unwrap();
    let roots = m.vcpus()[v].pae_root;
    assert!(roots.iter().all(|r| r.is_some()), "{roots:?}");
    let quads: Vec<u32> = roots
        .iter()
        .flatten()
        .map(|&r| m.sp(r).unwrap().role.quadrant())
        .collect();
    assert_eq!(quads, vec![0, 1, 2, 3]);
    assert!(roots.iter().flatten().all(|&r| m.sp(r).unwrap().gfn == 1));
    assert_eq!(m.rmap_entries(0x100, 1).unwrap().len(), 1);
    assert_eq!(m.rmap_entries(0x800, 2).unwrap().len(), 1);
    assert_eq!(m.rmap_entries(0xa00, 2).unwrap().len(), 1);
    // The PD (gfn 1) is an upper-level table: the 4-byte store to PDE 769 is emulated
    // and zaps both 2 MiB SPTEs; the PT stays mapped.
    assert!(m.is_write_tracked(1));
    assert!(m.guest_store_u32(0x1000 + 769 * 4, 0).unwrap());
    assert!(m.rmap_entries(0x800, 2).unwrap().is_empty());
    assert!(m.rmap_entries(0xa00, 2).unwrap().is_empty());
    assert_eq!(m.rmap_entries(0x100, 1).unwrap().len(), 1);
    assert!(matches!(
        m.access(v, 0xc040_0000, Access::empty()).unwrap(),
        AccessOutcome::Fault(pf) if pf.error_code.is_empty()
    ));
    m.check().unwrap();
}

/// Targeted: with paging off every access maps gva = gpa through direct shadow pages
/// (2 MiB where the host backing allows), and nothing is write-protected.
#[test]
fn paging_off_maps_directly() {
    let mut m = mmu(21);
    let v = m.add_vcpu(CpuMode::new(CR0_PE, 0, 0, 0));
    for va in [0x1234u64, 0x40_0008, 0xc0_0000] {
        assert_eq!(
            m.access(v, va, Access::WRITE | Access::USER).unwrap(),
            AccessOutcome::Fixed(Gpa(va))
        );
        assert_eq!(
            m.access(v, va, Access::FETCH).unwrap(),
            AccessOutcome::Hit(Gpa(va))
        );
    }
    assert_eq!(m.stats.huge_sptes, 3);
    assert_eq!(m.write_protected_gfns(), 0);
    let roots = m.vcpus()[v].pae_root;
    let r0 = m.sp(roots[0].unwrap()).unwrap();
    assert!(r0.role.direct() != 0 && r0.role.level() == 2 && r0.gfn == 0);
    m.check().unwrap();
}

/// Targeted: a PAE guest's roots follow its PDPTRs: a PDPTE store takes effect at the
/// next CR3 load, which frees the PAE roots.
#[test]
fn pae_roots_follow_the_pdptrs() {
    let mut m = mmu(12);
    let full = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY;
    // PDPT at 0x1000 + PDPT_OFF: PDPTE 1 -> PD 2; PD 2 entry 0 -> PT 3 -> 0x10_0000; PD 4 entry 0
    // -> PT 5 -> 0x20_0000.
    m.mem
        .write_u64(Gpa(0x1000 + PDPT_OFF + 8), 0x2000 | PT_PRESENT)
        .unwrap();
    m.mem.write_u64(Gpa(0x2000), 0x3000 | full).unwrap();
    m.mem.write_u64(Gpa(0x3000), 0x10_0000 | full).unwrap();
    m.mem.write_u64(Gpa(0x4000), 0x5000 | full).unwrap();
    m.mem.write_u64(Gpa(0x5000), 0x20_0000 | full).unwrap();
    let mk = |m: &ShadowMmu| mode(Paging::Pae, 0x1000, true, true, &m.mem);
    let v = m.add_vcpu(mk(&m));
    let va = 0x4000_0000u64;
    assert_eq!(
        m.access(v, va, Access::empty()).unwrap(),
        AccessOutcome::Fixed(Gpa(0x10_0000))
    );
    assert_eq!(m.vcpus()[v].pae_root.iter().flatten().count(), 1);
    // Repoint PDPTE 1: no effect until the PDPTRs reload.
    m.guest_store(0x1000 + PDPT_OFF + 8, 0x4000 | PT_PRESENT)
        .unwrap();
    assert_eq!(
        m.access(v, va, Access::empty()).unwrap(),
        AccessOutcome::Hit(Gpa(0x10_0000))
    );
    let new = mk(&m);
    m.set_mode(v, new).unwrap();
    assert_eq!(
        m.access(v, va, Access::empty()).unwrap(),
        AccessOutcome::Fixed(Gpa(0x20_0000))
    );
    m.check().unwrap();
}

/// Targeted (found by this file's proptest): a present PDPTE with reserved bits (here the
/// P|W|U|A|D of a lower-level entry) gets no PAE root, even when the PD it names is already
/// shadowed through another PDPTE, so the access faults with RSVD as the walker says
/// (KVM refuses such PDPTRs at the CR3 load; a caller passing them in must not get a
/// translation).
#[test]
fn reserved_pdpte_faults_even_over_a_shadowed_pd() {
    let mut m = mmu(12);
    let full = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY;
    // PDPTE 0 -> PD 2 (valid); PDPTE 3 -> the same PD with reserved bits; PD 2 entry 0 ->
    // PT 3 -> 0x10_0000.
    m.mem
        .write_u64(Gpa(0x1000 + PDPT_OFF), 0x2000 | PT_PRESENT)
        .unwrap();
    m.mem
        .write_u64(Gpa(0x1000 + PDPT_OFF + 24), 0x2000 | full)
        .unwrap();
    m.mem.write_u64(Gpa(0x2000), 0x3000 | full).unwrap();
    m.mem.write_u64(Gpa(0x3000), 0x10_0000 | full).unwrap();
    let v = m.add_vcpu(mode(Paging::Pae, 0x1000, true, true, &m.mem));
    assert_eq!(
        m.access(v, 0, Access::empty()).unwrap(),
        AccessOutcome::Fixed(Gpa(0x10_0000))
    );
    match m.access(v, 0xc000_0000, Access::empty()).unwrap() {
        AccessOutcome::Fault(f) => assert!(
            f.error_code
                .contains(PfErrorCode::PRESENT | PfErrorCode::RSVD),
            "{f:?}"
        ),
        other => panic!("a reserved PDPTE translated: {other:?}"),
    }
    assert_eq!(m.vcpus()[v].pae_root.iter().flatten().count(), 1);
    m.check().unwrap();
}

/// A 32-bit vCPU's walk sets A in a 4-byte PDE that a PAE vCPU reads as the upper half
/// of an 8-byte PTE, where it is address bit 37: the PAE vCPU's SPTE for that PTE must
/// go (the update is tracked as a write for the 8-byte shadow page), so that its next
/// access, after an INVLPG, translates to the address the table now holds.
#[test]
fn an_ad_update_through_a_32bit_alias_reaches_the_pae_shadow() {
    // Table 4 as a 32-bit page directory: entry 1023 maps a 4 MiB page, A clear. Read as
    // a PAE page table, its 8-byte entry 511 holds that PDE as its upper half.
    let pde = 0x40_0000 | PT_PAGE_SIZE | PT_PRESENT;
    let ops = vec![
        Op::Cr3 { cpu: 0, table: 4 },
        Op::Store {
            table: 4,
            off: 0xffc,
            val: pde,
            four: true,
        },
        Op::Mode {
            cpu: 0,
            paging: Paging::Bits32,
            wp: false,
            nxe: false,
        },
        // PAE vCPU 1: PDPT of table 2 -> PD 3 -> entry 1 -> PT 4 -> entry 511.
        Op::Access {
            cpu: 1,
            va: 0x3f_f000,
            acc: 0,
        },
        // The 32-bit walk through PDE 1023 sets its A bit.
        Op::Access {
            cpu: 0,
            va: 0xffe0_0000,
            acc: 0,
        },
        Op::Access {
            cpu: 1,
            va: 0x3f_f000,
            acc: 0,
        },
    ];
    run(ops, 21, [Paging::Pae, Paging::Pae]).unwrap();
}
