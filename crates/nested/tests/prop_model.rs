//! Property tests: the walk and the L0 rules never panic on whatever L1 puts in its
//! memory, and what they return is consistent; the hypercall decoder never panics; the
//! nested-guest registry follows a reference-count model through any sequence of
//! get / put / remove.

use proptest::prelude::*;
use revmap_nested::access::{l1_translate, L1Layout, L2Outcome};
use revmap_nested::hcall::{check_enter_nested, TlbInvalidate, H_PARAMETER};
use revmap_nested::radix::{
    walk, Access, Exit, GuestMemory, PateDw0, Ptcr, RadixEntry, SparseMemory, WalkError,
};
use revmap_nested::{GuestId, NGpa, NestedGuests, ShadowLpidAllocator};
use revmap_rmap::{Gpa, Lpid};
use std::collections::HashMap;

const RAM: u64 = 1 << 24;

/// A word that is often a plausible directory or leaf pointing into small memory.
fn entry_word() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (
            0u64..RAM >> 8,
            prop_oneof![Just(5u64), Just(9), Just(13), 0u64..32]
        )
            .prop_map(|(b, nls)| (1 << 63) | (b << 8) | nls),
        (0u64..1 << 20, any::<u16>())
            .prop_map(|(rpn, low)| (3 << 62) | (rpn << 12) | u64::from(low & 0x1ff)),
        Just(0u64),
    ]
}

fn access() -> impl Strategy<Value = Access> {
    prop_oneof![Just(Access::Load), Just(Access::Store), Just(Access::Fetch)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn walk_never_panics_and_results_are_consistent(
        root in prop_oneof![
            any::<u64>(),
            (0u64..RAM >> 16).prop_map(|b| PateDw0::radix52(b << 16, 13).bits()),
        ],
        words in proptest::collection::vec((0u64..RAM >> 3, entry_word()), 0..256),
        addr in 0u64..1 << 52,
        acc in access(),
    ) {
        let mut mem = SparseMemory::new(RAM);
        for (w, v) in words {
            mem.write_be_u64(Gpa(w << 3), v).unwrap();
        }
        let root = PateDw0(root);
        let n = NGpa::new(addr).unwrap();
        match walk(&mem, root, n) {
            Ok(t) => {
                // The leaf is where the walk says, valid, a leaf, and maps the address.
                let raw = mem.read_be_u64(t.pte_addr).unwrap();
                prop_assert_eq!(RadixEntry::decode(raw), RadixEntry::Leaf(t.pte));
                prop_assert_eq!(t.pte.rpn() & (t.size.bytes() - 1), 0);
                prop_assert_eq!(t.raddr.0 & (t.size.bytes() - 1), addr & (t.size.bytes() - 1));
                prop_assert!(root.is_52_bit());
            }
            Err(WalkError::TableUnreadable { entry }) => prop_assert!(entry.0 + 8 > RAM),
            Err(_) => {}
        }
        let layout = L1Layout { ram_bytes: RAM, l0_page_shift: 16 };
        match l1_translate(&mem, root, n, acc, layout) {
            L2Outcome::Complete(t) => {
                prop_assert!(t.pte.permits(acc) && t.pte.rc_permits(acc));
                prop_assert!(t.raddr.0 < RAM && t.size.shift() >= 16);
            }
            L2Outcome::Mmio(g) => prop_assert!(g.0 >= RAM),
            L2Outcome::Exit(e) => {
                let (fetch, asdr) = match e {
                    Exit::Hdsi { hdsisr, asdr } => {
                        prop_assert_eq!(hdsisr.bits() & 0x0200_0000 != 0, acc == Access::Store);
                        (false, asdr)
                    }
                    Exit::Hisi { srr1, asdr } => {
                        prop_assert_eq!(srr1.bits() & 0x0200_0000, 0);
                        (true, asdr)
                    }
                };
                prop_assert_eq!(fetch, acc == Access::Fetch);
                // ASDR is the page of the access unless a table entry failed.
                if let Err(WalkError::TableUnreadable { entry }) = walk(&mem, root, n) {
                    prop_assert_eq!(asdr, entry.0);
                } else {
                    prop_assert_eq!(asdr, addr & !0xfff);
                }
            }
        }
    }

    #[test]
    fn tlb_invalidate_decode_never_panics(instr in any::<u64>(), rs in any::<u64>(), rb in any::<u64>()) {
        match TlbInvalidate::decode(instr, rs, rb) {
            Ok(t) => {
                prop_assert_eq!((instr >> 16) & 1, 1);
                prop_assert_eq!((instr >> 17) & 1, 0);
                let _ = t.page_range();
            }
            Err(e) => prop_assert_eq!(e.papr(), H_PARAMETER),
        }
    }

    #[test]
    fn enter_checks_never_panic(ptcr in any::<u64>(), lpid in any::<u64>()) {
        if let Ok(l) = check_enter_nested(Ptcr(ptcr), lpid) {
            prop_assert!(l.0 != 0 && u64::from(l.0) < Ptcr(ptcr).entries());
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Enter(u16),
    Get(u16),
    Put(usize),
    Remove(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u16..6).prop_map(Op::Enter),
        (0u16..6).prop_map(Op::Get),
        any::<usize>().prop_map(Op::Put),
        any::<usize>().prop_map(Op::Remove),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Model: per guest, (lpid, holders, in idr). refcnt = holders + in idr; a guest is
    /// released exactly when that reaches 0; lookups find the idr member.
    #[test]
    fn registry_follows_the_reference_model(ops in proptest::collection::vec(op(), 1..64)) {
        let ptcr = Ptcr(0x10004);
        let mut reg = NestedGuests::new(ShadowLpidAllocator::new(8));
        let mut model: HashMap<GuestId, (u16, u32, bool)> = HashMap::new();
        let mut held: Vec<GuestId> = Vec::new();
        for op in ops {
            match op {
                Op::Enter(l) | Op::Get(l) => {
                    let create = matches!(op, Op::Enter(_));
                    let r = reg.get(u64::from(l), ptcr, create);
                    if l == 0 {
                        prop_assert!(r.is_err());
                        continue;
                    }
                    let existing = model.iter().find(|(_, m)| m.0 == l && m.2).map(|(id, _)| *id);
                    match (r, existing) {
                        (Ok(Some(id)), Some(e)) => {
                            prop_assert_eq!(id, e);
                            if let Some(m) = model.get_mut(&id) { m.1 += 1; }
                            held.push(id);
                        }
                        (Ok(Some(id)), None) => {
                            prop_assert!(create);
                            model.insert(id, (l, 1, true));
                            held.push(id);
                        }
                        (Ok(None), None) => prop_assert!(!create),
                        // 7 shadow LPIDs only: creation may run out.
                        (Err(e), None) => prop_assert!(create && model.len() == 7, "{:?}", e),
                        (r, e) => prop_assert!(false, "{:?} vs {:?}", r, e),
                    }
                }
                Op::Put(i) if !held.is_empty() => {
                    let id = held.swap_remove(i % held.len());
                    let r = reg.put(id).unwrap();
                    let m = model.get_mut(&id).unwrap();
                    m.1 -= 1;
                    if m.1 == 0 && !m.2 {
                        prop_assert!(r.is_some());
                        model.remove(&id);
                    } else {
                        prop_assert!(r.is_none());
                    }
                }
                Op::Remove(i) if !model.is_empty() => {
                    let mut ids: Vec<_> = model.keys().copied().collect();
                    ids.sort();
                    let id = ids[i % ids.len()];
                    let r = reg.remove(id).unwrap();
                    let m = model.get_mut(&id).unwrap();
                    m.2 = false;
                    if m.1 == 0 {
                        prop_assert!(r.is_some());
                        model.remove(&id);
                    } else {
                        prop_assert!(r.is_none());
                    }
                }
                _ => {}
            }
            prop_assert_eq!(reg.check(), Ok(model.len()));
            for (id, m) in &model {
                let g = reg.guest(*id).unwrap();
                prop_assert_eq!(g.refcnt(), m.1 + u32::from(m.2));
                prop_assert_eq!(g.in_idr(), m.2);
                if m.2 {
                    prop_assert_eq!(reg.lookup(Lpid(m.0)), Some(*id));
                }
            }
        }
    }
}

mod shadow_model {
    use proptest::prelude::*;
    use revmap_nested::radix::{Geometry, PageSize, RadixPte};
    use revmap_nested::shadow::{Inserted, ShadowPte, ShadowTable};
    use revmap_nested::NGpa;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64, u8, u64, bool),
        Remove(u64),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0u64..1 << 14, 0u8..3, 0u64..64, any::<bool>()).prop_map(|(a, s, r, w)| Op::Insert(a, s, r, w)),
            3 => (0u64..1 << 14).prop_map(Op::Remove),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The shadow table against a list of non-overlapping leaves: after every step
        /// both agree on every probed address, and the table's invariants hold.
        #[test]
        fn shadow_table_matches_a_leaf_list(ops in proptest::collection::vec(op(), 1..48)) {
            const SIZES: [PageSize; 3] = [PageSize::P64K, PageSize::P2M, PageSize::P1G];
            let mut t = ShadowTable::new(Geometry::Base64K).unwrap();
            let mut model: Vec<ShadowPte> = Vec::new();
            let covers = |l: &ShadowPte, a: u64| l.n_gpa.raw() <= a && a < l.n_gpa.raw() + l.size.bytes();
            for op in ops {
                match op {
                    Op::Insert(a, s, r, w) => {
                        // Addresses in units of 64K over a 1 GiB window.
                        let size = SIZES[s as usize];
                        let n = size.align_down(a << 16);
                        let flags = RadixPte::R | RadixPte::EAA_READ | if w { RadixPte::EAA_RW } else { 0 };
                        let new = ShadowPte {
                            n_gpa: NGpa::new(n).unwrap(),
                            size,
                            pte: RadixPte::new(r << 30, flags),
                        };
                        let out = t.insert(new).unwrap();
                        let end = n + size.bytes();
                        let same = model.iter().position(|l| l.n_gpa == new.n_gpa && l.size == size);
                        match (out, same) {
                            (Inserted::New { mut displaced }, None) => {
                                let mut gone: Vec<ShadowPte> = model
                                    .iter()
                                    .copied()
                                    .filter(|l| l.n_gpa.raw() < end && n < l.n_gpa.raw() + l.size.bytes())
                                    .collect();
                                gone.sort_by_key(|l| l.n_gpa);
                                displaced.sort_by_key(|l| l.n_gpa);
                                prop_assert_eq!(&displaced, &gone);
                                model.retain(|l| !gone.contains(l));
                                model.push(new);
                            }
                            (Inserted::Identical, Some(i)) => prop_assert_eq!(model[i], new),
                            (Inserted::Merged, Some(i)) => {
                                model[i].pte = RadixPte(model[i].pte.bits() | new.pte.bits());
                            }
                            (Inserted::Replaced { old }, Some(i)) => {
                                prop_assert_eq!(old, model[i]);
                                model[i] = new;
                            }
                            (o, m) => prop_assert!(false, "{:?} vs {:?}", o, m),
                        }
                    }
                    Op::Remove(a) => {
                        let a = a << 16;
                        let got = t.remove(NGpa::new(a).unwrap());
                        let want = model.iter().position(|l| covers(l, a)).map(|i| model.swap_remove(i));
                        prop_assert_eq!(got, want);
                    }
                    Op::Clear => {
                        prop_assert_eq!(t.clear(), model.len());
                        model.clear();
                    }
                }
                prop_assert_eq!(t.check(), Ok(model.len()));
                for probe in (0u64..1 << 30).step_by(1 << 20) {
                    let want = model.iter().copied().find(|l| covers(l, probe));
                    prop_assert_eq!(t.lookup(NGpa::new(probe).unwrap()), want);
                }
            }
        }
    }
}
