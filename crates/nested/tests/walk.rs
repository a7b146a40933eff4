//! The radix walk against trees built by `RadixBuilder` and broken by hand: every
//! failure cause of the reference's table, both geometries, every leaf size.

use proptest::prelude::*;
use revmap_nested::access::{l1_translate, L1Layout, L2Outcome};
use revmap_nested::radix::{
    walk, Access, BuildError, Dsisr, Exit, FaultCause, Geometry, Level, PageSize, PateDw0,
    RadixBuilder, RadixPde, RadixPte, SparseMemory, Unsupported, WalkError,
};
use revmap_nested::NGpa;
use revmap_rmap::Gpa;

const RAM: u64 = 16 << 30;
const TABLES: core::ops::Range<u64> = 0x10_0000..0x100_0000;
const RWX_RC: u64 =
    RadixPte::R | RadixPte::C | RadixPte::EAA_RW | RadixPte::EAA_READ | RadixPte::EAA_X;

fn n(a: u64) -> NGpa {
    NGpa::new(a).expect("52-bit address")
}

fn tree(geometry: Geometry) -> (SparseMemory, PateDw0) {
    let mut mem = SparseMemory::new(RAM);
    let root = RadixBuilder::new(&mut mem, geometry, TABLES)
        .unwrap()
        .root();
    (mem, root)
}

/// The address of the entry a walk for `addr` reads at `level` (tree must reach it).
fn entry_of(mem: &SparseMemory, root: PateDw0, addr: u64, level: Level) -> Gpa {
    use revmap_nested::radix::GuestMemory;
    let mut base = root.rpdb();
    let mut nls = root.rpds();
    let mut remaining = 52;
    let mut at = Level::Root;
    loop {
        remaining -= nls;
        let e = Gpa(base + 8 * ((addr >> remaining) & ((1 << nls) - 1)));
        if at == level {
            return e;
        }
        let d = RadixPde(mem.read_be_u64(e).unwrap());
        base = d.nlb();
        nls = d.nls();
        at = at.below().unwrap();
    }
}

#[test]
fn every_leaf_size_in_both_geometries() {
    for (g, sizes) in [
        (
            Geometry::Base4K,
            [PageSize::P4K, PageSize::P2M, PageSize::P1G],
        ),
        (
            Geometry::Base64K,
            [PageSize::P64K, PageSize::P2M, PageSize::P1G],
        ),
    ] {
        let mut mem = SparseMemory::new(RAM);
        let mut b = RadixBuilder::new(&mut mem, g, TABLES).unwrap();
        let root = b.root();
        for (i, s) in sizes.into_iter().enumerate() {
            let va = (i as u64 + 1) << 32;
            let pa = (i as u64 + 1) << 30;
            let pte_addr = b.map(n(va), Gpa(pa), s, RWX_RC).unwrap();
            let off = s.bytes() - 8;
            let t = walk(b.memory(), root, n(va + off)).unwrap();
            assert_eq!(t.raddr, Gpa(pa + off), "{g:?} {s:?}");
            assert_eq!(t.size, s);
            assert_eq!(t.pte_addr, pte_addr);
            assert_eq!(
                t.level,
                match s {
                    PageSize::P1G => Level::Pud,
                    PageSize::P2M => Level::Pmd,
                    _ => Level::Pte,
                }
            );
            // One byte past the page is not mapped.
            assert_eq!(
                walk(b.memory(), root, n(va + s.bytes()))
                    .map(|t| t.size)
                    .err()
                    .map(|e| e.cause()),
                Some(FaultCause::NoTranslation)
            );
        }
        let wrong = if g == Geometry::Base4K {
            PageSize::P64K
        } else {
            PageSize::P4K
        };
        assert!(matches!(
            b.map(n(0), Gpa(0), wrong, RWX_RC),
            Err(BuildError::SizeNotInGeometry { .. })
        ));
    }
}

#[test]
fn no_translation_at_every_level() {
    let (mut mem, root) = tree(Geometry::Base64K);
    assert_eq!(
        walk(&mem, root, n(0x1234_0000)),
        Err(WalkError::NoTranslation { level: Level::Root })
    );
    let mut b = RadixBuilder::new(&mut mem, Geometry::Base64K, 0x200_0000..0x300_0000).unwrap();
    let root = b.root();
    b.map(n(0x4000_0000), Gpa(0x4000_0000), PageSize::P64K, RWX_RC)
        .unwrap();
    let m = b.memory();
    assert_eq!(
        walk(m, root, n(0x1_0000_0000)),
        Err(WalkError::NoTranslation { level: Level::Pud })
    );
    assert_eq!(
        walk(m, root, n(0x4020_0000)),
        Err(WalkError::NoTranslation { level: Level::Pmd })
    );
    assert_eq!(
        walk(m, root, n(0x4001_0000)),
        Err(WalkError::NoTranslation { level: Level::Pte })
    );
    assert!(walk(m, root, n(0x4000_ffff)).is_ok());
}

#[test]
fn unsupported_configurations() {
    let (mut mem, root) = tree(Geometry::Base64K);
    let unsupp = |r: Result<_, WalkError>| match r {
        Err(WalkError::Unsupported(u)) => u,
        other => panic!("{other:?}"),
    };
    // RTS 20 (a trace's broken PATE).
    let bad_rts = PateDw0(root.bits() & !0x20);
    assert_eq!(
        unsupp(walk(&mem, bad_rts, n(0))),
        Unsupported::TreeSize { rts: 20 }
    );
    // Root NLS 12.
    let bad_root = PateDw0(root.bits() - 1);
    assert_eq!(
        unsupp(walk(&mem, bad_root, n(0))),
        Unsupported::BadNls {
            level: Level::Root,
            nls: 12
        }
    );
    // Root base aligned to 4 KiB only (a 64 KiB root).
    let mis = PateDw0::radix52(root.rpdb() + 0x1000, 13);
    assert!(matches!(
        unsupp(walk(&mem, mis, n(0))),
        Unsupported::MisalignedTable {
            level: Level::Root,
            ..
        }
    ));
    // A root leaf.
    let e = entry_of(&mem, root, 0, Level::Root);
    mem.write_be_u64(e, RadixPte::new(0, RWX_RC).bits())
        .unwrap();
    assert_eq!(unsupp(walk(&mem, root, n(0))), Unsupported::RootLeaf);
    // A level-2 directory with NLS 5, then a misaligned level-2 table.
    mem.write_be_u64(e, RadixPde::new(0x80_0000, 5).bits())
        .unwrap();
    assert_eq!(
        unsupp(walk(&mem, root, n(0))),
        Unsupported::BadNls {
            level: Level::Pud,
            nls: 5
        }
    );
    mem.write_be_u64(e, RadixPde::new(0x80_0100, 9).bits())
        .unwrap();
    assert!(matches!(
        unsupp(walk(&mem, root, n(0))),
        Unsupported::MisalignedTable {
            level: Level::Pud,
            base: 0x80_0100,
            nls: 9
        }
    ));
    // Level 0 with NLS 9 (4K geometry) is fine; NLS 13 is not.
    let mut b = RadixBuilder::new(&mut mem, Geometry::Base64K, 0x200_0000..0x300_0000).unwrap();
    let root = b.root();
    b.map(n(0), Gpa(0x1_0000), PageSize::P64K, RWX_RC).unwrap();
    let pmd = entry_of(b.memory(), root, 0, Level::Pmd);
    let pte_table =
        RadixPde(revmap_nested::radix::GuestMemory::read_be_u64(b.memory(), pmd).unwrap()).nlb();
    b.memory()
        .write_be_u64(pmd, RadixPde::new(pte_table, 13).bits())
        .unwrap();
    assert_eq!(
        unsupp(walk(b.memory(), root, n(0))),
        Unsupported::BadNls {
            level: Level::Pte,
            nls: 13
        }
    );
    b.memory()
        .write_be_u64(pmd, RadixPde::new(pte_table, 5).bits())
        .unwrap();
    // A directory at level 0.
    let pte = entry_of(b.memory(), root, 0, Level::Pte);
    b.memory()
        .write_be_u64(pte, RadixPde::new(0x90_0000, 5).bits())
        .unwrap();
    assert_eq!(
        unsupp(walk(b.memory(), root, n(0))),
        Unsupported::DirectoryAtLevel0
    );
    // A 64K leaf whose RPN is only 4K aligned; a 2M leaf whose RPN is 64K aligned.
    b.memory()
        .write_be_u64(pte, RadixPte::new(0x1_1000, RWX_RC).bits())
        .unwrap();
    assert_eq!(
        unsupp(walk(b.memory(), root, n(0))),
        Unsupported::MisalignedLeaf {
            size: PageSize::P64K,
            rpn: 0x1_1000
        }
    );
    b.memory()
        .write_be_u64(pmd, RadixPte::new(0x1_0000, RWX_RC).bits())
        .unwrap();
    assert_eq!(
        unsupp(walk(b.memory(), root, n(0))),
        Unsupported::MisalignedLeaf {
            size: PageSize::P2M,
            rpn: 0x1_0000
        }
    );
    assert_eq!(
        WalkError::Unsupported(Unsupported::RootLeaf).cause().bits(),
        Dsisr::UNSUPP_MMU
    );
}

#[test]
fn unreadable_table_entry_is_a_prtable_fault_at_its_address() {
    let (mut mem, root) = tree(Geometry::Base64K);
    let e = entry_of(&mem, root, 0x5000_0000, Level::Root);
    // The level-2 table lies beyond L1 RAM.
    mem.write_be_u64(e, RadixPde::new(RAM + 0x1000_0000, 9).bits())
        .unwrap();
    let err = walk(&mem, root, n(0x5000_0000)).unwrap_err();
    // The level-2 index of 0x5000_0000 (bits 38:30) is 1.
    let entry = Gpa(RAM + 0x1000_0000 + 8);
    assert_eq!(err, WalkError::TableUnreadable { entry });
    let exit = Exit::reflect(err.cause(), Access::Load, n(0x5000_0123));
    assert_eq!(
        exit,
        Exit::Hdsi {
            hdsisr: Dsisr(Dsisr::PRTABLE_FAULT),
            asdr: entry.0
        }
    );
    let exit = Exit::reflect(err.cause(), Access::Fetch, n(0x5000_0123));
    assert_eq!(
        exit,
        Exit::Hisi {
            srr1: Dsisr(Dsisr::PRTABLE_FAULT),
            asdr: entry.0
        }
    );
    assert_eq!(exit.trap(), 0xE20);
}

#[test]
fn l0_rules_in_order() {
    let layout = L1Layout {
        ram_bytes: 8 << 30,
        l0_page_shift: 16,
    };
    let mut mem = SparseMemory::new(8 << 30);
    let mut b = RadixBuilder::new(&mut mem, Geometry::Base64K, TABLES).unwrap();
    let root = b.root();
    let ro = RadixPte::R | RadixPte::EAA_READ;
    b.map(n(0x10_0000), Gpa(0x2_0000), PageSize::P64K, ro)
        .unwrap();
    b.map(
        n(0x20_0000),
        Gpa(0x3_0000),
        PageSize::P64K,
        RadixPte::EAA_RW | RadixPte::EAA_X,
    )
    .unwrap();
    b.map(
        n(0x40_0000),
        Gpa((8 << 30) + (1 << 30)),
        PageSize::P2M,
        RadixPte::EAA_RW,
    )
    .unwrap();
    b.map(
        n(0x80_0000),
        Gpa(0x4_0000),
        PageSize::P64K,
        RadixPte::R | RadixPte::EAA_RW,
    )
    .unwrap();
    let m = b.memory();
    let go = |a: u64, acc| l1_translate(&*m, root, n(a), acc, layout);
    let hdsi = |bits, asdr| {
        L2Outcome::Exit(Exit::Hdsi {
            hdsisr: Dsisr(bits),
            asdr,
        })
    };
    let hisi = |bits, asdr| {
        L2Outcome::Exit(Exit::Hisi {
            srr1: Dsisr(bits),
            asdr,
        })
    };
    // No cached root: the raw trap.
    assert_eq!(
        l1_translate(&*m, PateDw0(0), n(0x10_0008), Access::Store, layout),
        hdsi(Dsisr::NOHPTE | Dsisr::ISSTORE, 0x10_0000)
    );
    // Read-only leaf.
    assert!(
        matches!(go(0x10_0008, Access::Load), L2Outcome::Complete(t) if t.raddr == Gpa(0x2_0008))
    );
    assert_eq!(
        go(0x10_0008, Access::Store),
        hdsi(Dsisr::PROTFAULT | Dsisr::ISSTORE, 0x10_0000)
    );
    assert_eq!(
        go(0x10_1008, Access::Fetch),
        hisi(Dsisr::NOEXEC_OR_G, 0x10_1000)
    );
    // Permission before R/C: no R, but the fetch is allowed → SET_RC.
    assert_eq!(go(0x20_0000, Access::Fetch), hisi(Dsisr::SET_RC, 0x20_0000));
    assert_eq!(
        go(0x20_0000, Access::Store),
        hdsi(Dsisr::SET_RC | Dsisr::ISSTORE, 0x20_0000)
    );
    // MMIO before R/C.
    assert_eq!(
        go(0x40_1234, Access::Store),
        L2Outcome::Mmio(Gpa((9 << 30) + 0x1234))
    );
    // R without C: loads complete, stores need C.
    assert!(matches!(
        go(0x80_0000, Access::Load),
        L2Outcome::Complete(_)
    ));
    assert_eq!(
        go(0x80_0000, Access::Store),
        hdsi(Dsisr::SET_RC | Dsisr::ISSTORE, 0x80_0000)
    );
    // A 4 KiB L1 leaf on a 64 KiB L0: the raw trap, NOHPTE.
    let mut mem4 = SparseMemory::new(8 << 30);
    let mut b4 = RadixBuilder::new(&mut mem4, Geometry::Base4K, TABLES).unwrap();
    let root4 = b4.root();
    b4.map(n(0x1000), Gpa(0x5000), PageSize::P4K, RWX_RC)
        .unwrap();
    assert_eq!(
        l1_translate(b4.memory(), root4, n(0x1008), Access::Load, layout),
        hdsi(Dsisr::NOHPTE, 0x1000)
    );
    // ... which a 4 KiB L0 accepts.
    let layout4 = L1Layout {
        l0_page_shift: 12,
        ..layout
    };
    assert!(matches!(
        l1_translate(b4.memory(), root4, n(0x1008), Access::Load, layout4),
        L2Outcome::Complete(t) if t.raddr == Gpa(0x5008)
    ));
}

#[test]
fn unmap_removes_only_its_leaf() {
    let (mut mem, _) = tree(Geometry::Base4K);
    let mut b = RadixBuilder::new(&mut mem, Geometry::Base4K, 0x200_0000..0x300_0000).unwrap();
    let root = b.root();
    b.map(n(0x1000), Gpa(0x7000), PageSize::P4K, RWX_RC)
        .unwrap();
    b.map(n(0x2000), Gpa(0x8000), PageSize::P4K, RWX_RC)
        .unwrap();
    assert!(b.unmap(n(0x1000), PageSize::P4K).unwrap().is_some());
    assert_eq!(b.unmap(n(0x1000), PageSize::P4K).unwrap(), None);
    assert_eq!(b.unmap(n(0x4000_0000), PageSize::P4K).unwrap(), None);
    assert!(walk(b.memory(), root, n(0x1000)).is_err());
    assert!(walk(b.memory(), root, n(0x2000)).is_ok());
    // A leaf in the way of a directory.
    b.map(n(0x4000_0000), Gpa(0x4000_0000), PageSize::P1G, RWX_RC)
        .unwrap();
    assert!(matches!(
        b.map(n(0x4000_1000), Gpa(0), PageSize::P4K, RWX_RC),
        Err(BuildError::Conflict {
            level: Level::Pud,
            ..
        })
    ));
    assert!(matches!(
        b.map(n(0x1000), Gpa(0x123), PageSize::P4K, RWX_RC),
        Err(BuildError::Misaligned { addr: 0x123, .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the builder maps, the walk translates back, offset included; addresses
    /// in no mapped page fail with NoTranslation.
    #[test]
    fn builder_and_walk_agree(
        g in prop_oneof![Just(Geometry::Base4K), Just(Geometry::Base64K)],
        maps in proptest::collection::vec((0u64..1 << 20, 0u64..1 << 14, any::<u64>()), 1..24),
        probe in any::<u64>(),
    ) {
        let mut mem = SparseMemory::new(RAM);
        let mut b = RadixBuilder::new(&mut mem, g, TABLES).unwrap();
        let root = b.root();
        let mut model: Vec<(u64, u64, PageSize)> = Vec::new();
        for (i, (va_page, pa_page, bits)) in maps.into_iter().enumerate() {
            let size = [g.base_page(), PageSize::P2M, PageSize::P1G][(bits % 3) as usize];
            let va = (va_page << 32 | (i as u64) << 30) & ((1 << 52) - 1);
            let va = size.align_down(va);
            let pa = size.align_down(pa_page << 21);
            if b.map(n(va), Gpa(pa), size, RWX_RC).is_ok() {
                model.retain(|&(v, _, s)| !(v <= va && va < v + s.bytes()));
                model.push((va, pa, size));
            }
        }
        for &(va, pa, size) in &model {
            let off = probe & (size.bytes() - 1);
            let t = walk(b.memory(), root, n(va + off)).unwrap();
            prop_assert_eq!(t.raddr, Gpa(pa + off));
            prop_assert_eq!(t.size, size);
        }
        let p = probe & ((1 << 52) - 1);
        if !model.iter().any(|&(v, _, s)| v <= p && p < v + s.bytes()) {
            let e = walk(b.memory(), root, n(p)).unwrap_err();
            prop_assert_eq!(e.cause(), FaultCause::NoTranslation);
        }
    }
}
