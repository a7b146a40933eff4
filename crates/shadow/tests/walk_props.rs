//! Properties of the reference walker on arbitrary page tables and modes.
//!
//! Each case builds a walk path for a random address in a random paging mode (tables in
//! distinct pages, entries with mostly-valid random flags, sometimes PS, XD, a key or a
//! high address bit, sometimes wholly random), sprinkles random entries over the same
//! pages (self-referencing tables included), and checks what must hold of any walk.

use proptest::prelude::*;
use revmap_shadow::paging::{
    walk, Access, CpuMode, FaultReason, Gpa, GuestPhysMemory, Gva, PagingMode, PfErrorCode,
    SparseMemory, CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PKE, CR4_PKS, CR4_PSE, CR4_SMAP,
    CR4_SMEP, EFER_LMA, EFER_LME, EFER_NXE, PT_ACCESSED, PT_DIRTY,
};

const PAGES: u64 = 16;

/// An entry pointing at page `pfn` of the space, with flags from `low`/`hi`.
fn make_entry(pfn: u64, low: u16, hi: u8, wild: Option<u64>) -> u64 {
    if let Some(w) = wild {
        return w;
    }
    let mut v = (pfn << 12) | u64::from(low & 0x17f) | 1;
    if low & 0xe00 == 0 {
        v |= 1 << 7;
    }
    if low & 0xf000 == 0 {
        v &= !1;
    }
    if hi % 8 == 0 {
        v |= 1 << 63;
    }
    if hi % 3 == 0 {
        v |= u64::from(hi >> 4) << 59;
    }
    if hi % 16 == 1 {
        v |= 1 << (36 + (hi >> 4) % 16);
    }
    v
}

fn entry() -> impl Strategy<Value = (u64, u16, u8, Option<u64>)> {
    (
        0..PAGES,
        any::<u16>(),
        any::<u8>(),
        prop_oneof![19 => Just(None), 1 => any::<u64>().prop_map(Some)],
    )
}

fn mode() -> impl Strategy<Value = CpuMode> {
    (
        0u8..5,
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
        32u8..=52,
        any::<bool>(),
    )
        .prop_map(|(paging, bits, pkru, pkrs, maxphy, a20)| {
            let b = |i: u32| bits >> i & 1 != 0;
            let on = |c: bool, v: u64| if c { v } else { 0 };
            let cr0 = CR0_PE | on(paging > 0, CR0_PG) | on(b(0), CR0_WP);
            let cr4 = on(paging > 1, CR4_PAE)
                | on(paging > 3, CR4_LA57)
                | on(b(1), CR4_PSE)
                | on(b(2), CR4_SMEP)
                | on(b(3), CR4_SMAP)
                | on(b(4), CR4_PKE)
                | on(b(5), CR4_PKS);
            let efer = on(paging > 2, EFER_LMA | EFER_LME) | on(b(6), EFER_NXE);
            let mut m = CpuMode::new(cr0, on(b(7), 0x20), cr4, efer);
            m.pkru = pkru;
            m.pkrs = pkrs;
            m.maxphyaddr = maxphy;
            m.a20 = a20;
            m.gbpages = b(8);
            m.pse36 = b(9);
            m
        })
}

fn access() -> impl Strategy<Value = Access> {
    any::<u8>().prop_map(|b| {
        let mut a = Access::from_bits_truncate(b);
        if a.contains(Access::FETCH) {
            a.remove(Access::WRITE);
        }
        if a.contains(Access::USER) {
            a.remove(Access::IMPLICIT);
        }
        a
    })
}

/// Where the level-`level` entry for `va` lies in the table at `table` (test-side copy of
/// the architectural index rules).
fn slot(mode: &CpuMode, table: u64, level: u8, va: u64) -> (u64, bool) {
    let l = u32::from(level);
    match mode.paging() {
        PagingMode::Bits32 => (table + ((va >> (12 + 10 * (l - 1))) & 1023) * 4, true),
        PagingMode::Pae if level == 3 => (table + ((va >> 30) & 3) * 8, false),
        _ => (table + ((va >> (12 + 9 * (l - 1))) & 511) * 8, false),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn walks_are_total_and_consistent(
        path in proptest::collection::vec(entry(), 5),
        noise in proptest::collection::vec((0..PAGES, 0u64..512, any::<u64>()), 0..16),
        mode in mode(),
        va in any::<u64>(),
        root in 0..PAGES,
        access in access(),
    ) {
        let mut mode = mode;
        mode.cr3 |= root << 12;
        let mut mem = SparseMemory::with_limit(PAGES << 12);
        for (page, i, v) in noise {
            mem.write_u64(Gpa((page << 12) | (i * 8)), v).unwrap();
        }
        // The path: the table at each level is the page the entry above names.
        let mut table = mode.cr3 & !0xfff;
        if mode.paging() == PagingMode::Pae {
            table = mode.cr3 & 0xffff_ffe0;
        }
        let levels = mode.paging().levels();
        for (k, &(pfn, low, hi, wild)) in path.iter().take(usize::from(levels)).enumerate() {
            let level = levels - k as u8;
            let v = make_entry(pfn, low, hi, wild);
            let (at, four) = slot(&mode, table, level, va);
            if four {
                mem.write_u32(Gpa(at), v as u32).unwrap();
            } else {
                mem.write_u64(Gpa(at), v).unwrap();
            }
            table = pfn << 12;
        }
        let before = mem.clone();
        let w = walk(&mut mem, &mode, Gva(va), access).unwrap();
        // A restart happens only when one entry serves at two levels (a self-referencing
        // table): the first A update changes the value the next compare-exchange expects.
        let first = &w.reads[..w.reads.len() / (w.restarts as usize + 1)];
        let self_ref = first
            .iter()
            .enumerate()
            .any(|(i, a)| first[i + 1..].iter().any(|b| b.gpa.0 & !7 == a.gpa.0 & !7));
        prop_assert!(w.restarts == 0 || self_ref);
        prop_assert!(first.len() <= usize::from(levels));
        prop_assert_eq!(w.ad_writes.iter().filter(|a| !a.ok).count(), w.restarts as usize);
        match &w.outcome {
            Err(pf) => {
                // A faulting walk writes nothing.
                prop_assert!(w.ad_writes.is_empty());
                for i in 0..PAGES * 512 {
                    prop_assert_eq!(mem.read_u64(Gpa(i * 8)), before.read_u64(Gpa(i * 8)));
                }
                let e = pf.error_code;
                let p = e.contains(PfErrorCode::PRESENT);
                match pf.reason {
                    FaultReason::NotPresent { .. } | FaultReason::Unbacked { .. } => {
                        prop_assert!(!p)
                    }
                    FaultReason::Reserved { .. } => {
                        prop_assert!(p && e.contains(PfErrorCode::RSVD))
                    }
                    FaultReason::Protection { pk } => {
                        prop_assert!(p && !e.contains(PfErrorCode::RSVD));
                        prop_assert_eq!(pk, e.contains(PfErrorCode::PK));
                    }
                }
                prop_assert_eq!(e.contains(PfErrorCode::WRITE), access.contains(Access::WRITE));
                prop_assert_eq!(e.contains(PfErrorCode::USER), access.contains(Access::USER));
                prop_assert_eq!(
                    e.contains(PfErrorCode::FETCH),
                    access.contains(Access::FETCH) && (mode.nxe() || mode.smep())
                );
            }
            Ok(t) => {
                // A/D writes only add A (and D on the written leaf).
                for a in w.ad_writes.iter().filter(|a| a.ok) {
                    prop_assert_eq!(a.new & a.old, a.old);
                    let added = a.new & !a.old;
                    prop_assert_eq!(added & !(PT_ACCESSED | PT_DIRTY), 0);
                    if added & PT_DIRTY != 0 {
                        prop_assert!(access.contains(Access::WRITE));
                        prop_assert_eq!(a.level, t.leaf_level);
                    }
                }
                // Walking again gives the same translation and writes nothing.
                let again = walk(&mut mem, &mode, Gva(va), access).unwrap();
                prop_assert_eq!(again.translation().map(|t| t.gpa), Some(t.gpa));
                prop_assert!(again.ad_writes.is_empty());
                if !mode.a20 {
                    prop_assert_eq!(t.gpa.0 & (1 << 20), 0);
                }
                // The offset within the page is the address's.
                let mask = (1u64 << t.page_shift) - 1;
                prop_assert_eq!(t.gpa.0 & mask & !(1 << 20), va & mask & !(1 << 20));
            }
        }
    }
}
