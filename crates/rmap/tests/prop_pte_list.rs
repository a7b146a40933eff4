//! State-machine property test of the x86 pte_list against a plain model (gfn ->
//! multiset of SPTE handles), with the invariant checkers (head word, descriptor fill, entries, recycle cap and the pool's
//! accounting) run after every operation.
#![cfg(not(loom))]

mod common;

use proptest::prelude::*;
use revmap_rmap::pte_list::{check_pte_lists, check_rmap_head, PTE_LIST_EXT};
use revmap_rmap::{
    DescCache, DescPool, PteListError, PteListHead, RmapError, SpteHandle, RMAP_RECYCLE_THRESHOLD,
};

const HEADS: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    /// Reserve, then `pte_list_add`.
    Add { gfn: usize, spte: u64 },
    /// `pte_list_add` with an empty cache.
    AddUnreserved { gfn: usize, spte: u64 },
    /// Add many entries in a row (to reach long chains and the recycle threshold).
    AddMany { gfn: usize, n: usize, base: u64 },
    /// `rmap_add` (with recycling).
    RmapAdd { gfn: usize, spte: u64 },
    /// Remove the `pick`-th model entry (or an absent value if the list is empty).
    Remove { gfn: usize, pick: usize },
    /// Remove a value that is not on the list.
    RemoveAbsent { gfn: usize },
    /// Zap all.
    Zap { gfn: usize },
    /// Count and iterate under a read-only lock.
    Read { gfn: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let gfn = 0..HEADS;
    prop_oneof![
        6 => (gfn.clone(), 1..40u64).prop_map(|(gfn, s)| Op::Add { gfn, spte: s * 8 }),
        1 => (gfn.clone(), 1..40u64).prop_map(|(gfn, s)| Op::AddUnreserved { gfn, spte: s * 8 }),
        1 => (gfn.clone(), 1..400usize, 1..1000u64)
            .prop_map(|(gfn, n, base)| Op::AddMany { gfn, n, base }),
        2 => (gfn.clone(), 1..40u64).prop_map(|(gfn, s)| Op::RmapAdd { gfn, spte: s * 8 }),
        5 => (gfn.clone(), any::<usize>()).prop_map(|(gfn, pick)| Op::Remove { gfn, pick }),
        1 => gfn.clone().prop_map(|gfn| Op::RemoveAbsent { gfn }),
        1 => gfn.clone().prop_map(|gfn| Op::Zap { gfn }),
        2 => gfn.prop_map(|gfn| Op::Read { gfn }),
    ]
}

/// Whether adding to a list of `n` entries needs a new descriptor. In descriptor form
/// the head descriptor's fill is determined by `n` (tails are full, the head has
/// 1..=14); a single inline entry (`many == false`) always needs one. A list shrunk to
/// one entry stays in descriptor form, as in KVM.
fn needs_desc(n: usize, many: bool) -> bool {
    (n == 1 && !many) || (n > 0 && n % PTE_LIST_EXT == 0)
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

fn h(v: u64) -> SpteHandle {
    SpteHandle::new(v).unwrap()
}

proptest! {
    #![proptest_config(common::config(128))]

    #[test]
    fn pte_list_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        let pool = DescPool::new();
        let heads = PteListHead::new_array(HEADS).unwrap();
        let mut model: Vec<Vec<u64>> = vec![Vec::new(); HEADS];
        // Whether the list is in descriptor form (the model of the head's tag bit).
        let mut many = [false; HEADS];
        for op in ops {
            match op {
                Op::Add { gfn, spte } => {
                    let mut c = DescCache::new(&pool);
                    c.reserve(1).unwrap();
                    let before = heads[gfn].lock().add(&mut c, h(spte)).unwrap();
                    prop_assert_eq!(before, model[gfn].len());
                    model[gfn].push(spte);
                }
                Op::AddUnreserved { gfn, spte } => {
                    let mut c = DescCache::new(&pool);
                    let r = heads[gfn].lock().add(&mut c, h(spte));
                    if needs_desc(model[gfn].len(), many[gfn]) {
                        prop_assert_eq!(r, Err(PteListError::from(RmapError::PoolExhausted)));
                    } else {
                        prop_assert_eq!(r, Ok(model[gfn].len()));
                        model[gfn].push(spte);
                    }
                }
                Op::AddMany { gfn, n, base } => {
                    let mut c = DescCache::new(&pool);
                    c.reserve((n / PTE_LIST_EXT + 2) as u64).unwrap();
                    let mut g = heads[gfn].lock();
                    for i in 0..n as u64 {
                        let v = (base + i) * 8;
                        prop_assert_eq!(g.add(&mut c, h(v)).unwrap(), model[gfn].len());
                        model[gfn].push(v);
                    }
                }
                Op::RmapAdd { gfn, spte } => {
                    let mut c = DescCache::new(&pool);
                    c.reserve(1).unwrap();
                    let mut zapped = Vec::new();
                    let r = heads[gfn]
                        .lock()
                        .rmap_add(&mut c, h(spte), |s| zapped.push(s.raw()))
                        .unwrap();
                    prop_assert_eq!(r.count_before, model[gfn].len());
                    model[gfn].push(spte);
                    if model[gfn].len() > RMAP_RECYCLE_THRESHOLD {
                        prop_assert!(r.flush_remote_tlbs);
                        prop_assert_eq!(sorted(zapped), sorted(std::mem::take(&mut model[gfn])));
                    } else {
                        prop_assert!(!r.flush_remote_tlbs);
                        prop_assert!(zapped.is_empty());
                    }
                    prop_assert!(check_rmap_head(&heads[gfn], &pool).is_ok());
                }
                Op::Remove { gfn, pick } => {
                    let m = &mut model[gfn];
                    if m.is_empty() {
                        prop_assert_eq!(
                            heads[gfn].lock().remove(&pool, h(8)),
                            Err(PteListError::NotFound(h(8)))
                        );
                    } else {
                        let v = m.swap_remove(pick % m.len());
                        heads[gfn].lock().remove(&pool, h(v)).unwrap();
                    }
                }
                Op::RemoveAbsent { gfn } => {
                    let v = 1 << 40;
                    let before = heads[gfn].load();
                    prop_assert_eq!(
                        heads[gfn].lock().remove(&pool, h(v)),
                        Err(PteListError::NotFound(h(v)))
                    );
                    prop_assert_eq!(heads[gfn].load(), before);
                }
                Op::Zap { gfn } => {
                    let mut zapped = Vec::new();
                    let n = heads[gfn].lock().destroy(&pool, |s| zapped.push(s.raw())).unwrap();
                    prop_assert_eq!(n, model[gfn].len());
                    prop_assert_eq!(sorted(zapped), sorted(std::mem::take(&mut model[gfn])));
                }
                Op::Read { gfn } => {
                    let g = heads[gfn].lock_readonly();
                    prop_assert_eq!(g.count(&pool).unwrap(), model[gfn].len());
                    let got: Vec<u64> = g.iter(&pool).map(|s| s.raw()).collect();
                    prop_assert_eq!(sorted(got), sorted(model[gfn].clone()));
                }
            }
            for (gfn, m) in model.iter().enumerate() {
                if m.is_empty() {
                    many[gfn] = false;
                } else if m.len() > 1 {
                    many[gfn] = true;
                }
                let tagged = heads[gfn].load().bits() & 1 == 1;
                prop_assert_eq!(tagged, many[gfn], "descriptor form as modelled");
            }
            // The checkers after every operation.
            let stats = check_pte_lists(&heads, &pool).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let total: usize = model.iter().map(Vec::len).sum();
            prop_assert_eq!(stats.entries as usize, total);
            let ps = pool.check().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(ps.in_use, stats.descs, "every live descriptor is on a list");
            prop_assert_eq!(ps.unreserved, ps.free, "caches dropped: no credit outstanding");
            for (gfn, m) in model.iter().enumerate() {
                let g = heads[gfn].lock();
                prop_assert_eq!(g.count(&pool).unwrap(), m.len());
                let got: Vec<u64> = g.iter(&pool).map(|s| s.raw()).collect();
                prop_assert_eq!(sorted(got), sorted(m.clone()));
            }
        }
    }
}
