//! State-machine property test of the nested rmap against a plain model (word -> set
//! of (LPID, GPA) entries, plus the set of entries the "hardware" considers stale), with
//! the invariant checker (word encoding, list shape, no duplicates, the cap, pool accounting) after every operation.
#![cfg(not(loom))]

mod common;

use proptest::prelude::*;
use revmap_rmap::nested::{check_nested_rmaps, Inserted, NestedLimits};
use revmap_rmap::{
    Gpa, Lpid, NestedCache, NestedError, NestedPool, NestedRmap, NestedRmapEntry, RmapError,
};
use std::collections::BTreeSet;

const WORDS: usize = 3;
const CAP: usize = 5;

#[derive(Debug, Clone)]
enum Op {
    /// Reserve, then insert with the stale set as validation.
    Insert { w: usize, lpid: u16, frame: u64 },
    /// Insert with an empty cache.
    InsertUnreserved { w: usize, lpid: u16, frame: u64 },
    /// L1 invalidates (lpid, frame): the entry goes stale (stays on lists).
    Invalidate { lpid: u16, frame: u64 },
    /// Reclaim (retain only valid entries).
    Reclaim { w: usize },
    /// Walk every entry.
    UpdateAll { w: usize },
    /// Detach the list, check it, free it.
    Detach { w: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let w = 0..WORDS;
    let lpid = 1..4u16;
    let frame = 0..6u64;
    prop_oneof![
        8 => (w.clone(), lpid.clone(), frame.clone())
            .prop_map(|(w, lpid, frame)| Op::Insert { w, lpid, frame }),
        1 => (w.clone(), lpid.clone(), frame.clone())
            .prop_map(|(w, lpid, frame)| Op::InsertUnreserved { w, lpid, frame }),
        3 => (lpid, frame).prop_map(|(lpid, frame)| Op::Invalidate { lpid, frame }),
        1 => w.clone().prop_map(|w| Op::Reclaim { w }),
        1 => w.clone().prop_map(|w| Op::UpdateAll { w }),
        1 => w.prop_map(|w| Op::Detach { w }),
    ]
}

fn ent(lpid: u16, frame: u64) -> NestedRmapEntry {
    NestedRmapEntry::new(Lpid(lpid), Gpa(frame << 12)).unwrap()
}

proptest! {
    #![proptest_config(common::config(256))]

    #[test]
    fn nested_matches_model(ops in prop::collection::vec(op(), 1..150)) {
        let pool = NestedPool::new();
        let words = NestedRmap::new_array(WORDS).unwrap();
        let limits = NestedLimits::new(CAP).unwrap();
        let mut model: Vec<BTreeSet<NestedRmapEntry>> = vec![BTreeSet::new(); WORDS];
        let mut stale: BTreeSet<NestedRmapEntry> = BTreeSet::new();
        for op in ops {
            match op {
                Op::Insert { w, lpid, frame } | Op::InsertUnreserved { w, lpid, frame } => {
                    let reserve = matches!(op, Op::Insert { .. });
                    let e = ent(lpid, frame);
                    // A fresh install is valid again.
                    let was_stale = stale.remove(&e);
                    let mut c = NestedCache::new(&pool);
                    if reserve {
                        c.reserve(1).unwrap();
                    }
                    let r = words[w].lock().insert(&mut c, e, &limits, |x| !stale.contains(&x));
                    let m = &mut model[w];
                    if m.contains(&e) {
                        prop_assert_eq!(r.map(|o| o.inserted), Ok(Inserted::Duplicate));
                        continue;
                    }
                    let mut reclaimed = 0;
                    if m.len() >= CAP {
                        let before = m.len();
                        m.retain(|x| !stale.contains(x));
                        reclaimed = before - m.len();
                    }
                    if m.len() >= CAP {
                        prop_assert_eq!(r, Err(NestedError::ListFull { cap: CAP }));
                        if was_stale { stale.insert(e); }
                    } else if m.is_empty() {
                        let o = r.unwrap();
                        prop_assert_eq!((o.inserted, o.reclaimed), (Inserted::Inline, reclaimed));
                        m.insert(e);
                    } else if !reserve {
                        prop_assert_eq!(r, Err(NestedError::from(RmapError::PoolExhausted)));
                        if was_stale { stale.insert(e); }
                    } else {
                        let o = r.unwrap();
                        prop_assert_eq!((o.inserted, o.reclaimed), (Inserted::Linked, reclaimed));
                        m.insert(e);
                    }
                }
                Op::Invalidate { lpid, frame } => {
                    stale.insert(ent(lpid, frame));
                }
                Op::Reclaim { w } => {
                    let n = words[w].lock().retain(&pool, |x| !stale.contains(&x)).unwrap();
                    let before = model[w].len();
                    model[w].retain(|x| !stale.contains(x));
                    prop_assert_eq!(n, before - model[w].len());
                }
                Op::UpdateAll { w } => {
                    let mut seen = BTreeSet::new();
                    let n = words[w].lock().update_all(&pool, |x| { seen.insert(x); });
                    prop_assert_eq!(n, model[w].len());
                    prop_assert_eq!(&seen, &model[w]);
                }
                Op::Detach { w } => {
                    let d = words[w].detach_all(&pool);
                    prop_assert_eq!(words[w].load().bits(), 0);
                    let got: BTreeSet<_> = d.iter().collect();
                    prop_assert_eq!(&got, &model[w]);
                    prop_assert_eq!(d.free().unwrap(), model[w].len());
                    model[w].clear();
                }
            }
            let st = check_nested_rmaps(&words, &pool, &limits)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let total: usize = model.iter().map(BTreeSet::len).sum();
            let nonempty = model.iter().filter(|m| !m.is_empty()).count();
            prop_assert_eq!(st.entries as usize, total);
            prop_assert_eq!(st.nodes as usize, total - nonempty, "n entries, n-1 nodes");
            let ps = pool.check().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(ps.in_use, st.nodes);
            for (w, m) in model.iter().enumerate() {
                let got: BTreeSet<_> = words[w].lock().iter(&pool).collect();
                prop_assert_eq!(&got, m);
            }
        }
    }
}
