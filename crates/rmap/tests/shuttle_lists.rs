//! shuttle tests of the pte_list, the nested rmap and their shared pools: 4+ threads,
//! many operations each, random and PCT schedules; the invariant checkers and a
//! per-thread model are checked at the end (a quiescent point).
//!
//! Run: `RUSTFLAGS="--cfg shuttle" CARGO_TARGET_DIR=target/shuttle cargo test -p revmap-rmap --test shuttle_lists`.
#![cfg(all(shuttle, not(loom)))]

use revmap_rmap::nested::{check_nested_rmaps, NestedError, NestedLimits};
use revmap_rmap::pte_list::{check_pte_lists, DescCache, DescPool, PteListHead, SpteHandle};
use revmap_rmap::sync::{thread, Arc};
use revmap_rmap::{Gpa, Lpid, NestedCache, NestedPool, NestedRmap, NestedRmapEntry};
use std::collections::BTreeSet;

const THREADS: u64 = 4;
const OPS: u64 = 40;

/// A tiny deterministic generator per thread (the schedule is what shuttle randomises).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn pte_list_workload() {
    const HEADS: usize = 3;
    let pool = Arc::new(DescPool::new());
    let heads: Arc<Box<[PteListHead]>> = Arc::new(PteListHead::new_array(HEADS).unwrap());
    let hs: Vec<_> = (0..THREADS)
        .map(|t| {
            let (pool, heads) = (pool.clone(), heads.clone());
            thread::spawn(move || {
                let mut rng = Lcg(t + 1);
                let mut mine: Vec<(usize, u64)> = Vec::new();
                let mut cache = DescCache::new(&pool);
                for i in 0..OPS {
                    let gfn = rng.next(HEADS as u64) as usize;
                    match rng.next(4) {
                        0 | 1 => {
                            cache.reserve(1).unwrap();
                            let v = (t * 10_000 + i + 1) * 8;
                            let _ = heads[gfn]
                                .lock()
                                .add(&mut cache, SpteHandle::new(v).unwrap())
                                .unwrap();
                            mine.push((gfn, v));
                        }
                        2 if !mine.is_empty() => {
                            let (g, v) = mine.swap_remove(rng.next(mine.len() as u64) as usize);
                            heads[g]
                                .lock()
                                .remove(&pool, SpteHandle::new(v).unwrap())
                                .unwrap();
                        }
                        _ => {
                            let g = heads[gfn].lock_readonly();
                            let n = g.count(&pool).unwrap();
                            let seen: BTreeSet<u64> = g.iter(&pool).map(|s| s.raw()).collect();
                            assert_eq!(seen.len(), n, "count matches a consistent walk");
                            for &(hg, v) in &mine {
                                if hg == gfn {
                                    assert!(seen.contains(&v), "own entry visible");
                                }
                            }
                        }
                    }
                }
                mine
            })
        })
        .collect();
    let mut want: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); HEADS];
    for h in hs {
        for (g, v) in h.join().unwrap() {
            want[g].insert(v);
        }
    }
    let st = check_pte_lists(&heads, &pool).unwrap();
    for (g, w) in want.iter().enumerate() {
        let got: BTreeSet<u64> = heads[g].lock().iter(&pool).map(|s| s.raw()).collect();
        assert_eq!(&got, w);
    }
    let ps = pool.check().unwrap();
    assert_eq!(ps.in_use, st.descs);
    assert_eq!(ps.unreserved, ps.free);
}

#[test]
fn pte_list_random() {
    shuttle::check_random(pte_list_workload, 300);
}

#[test]
fn pte_list_pct() {
    shuttle::check_pct(pte_list_workload, 300, 3);
}

fn ent(lpid: u64, frame: u64) -> NestedRmapEntry {
    NestedRmapEntry::new(Lpid(lpid as u16), Gpa(frame << 12)).unwrap()
}

fn nested_workload() {
    const WORDS: usize = 2;
    let pool = Arc::new(NestedPool::new());
    let words: Arc<Box<[NestedRmap]>> = Arc::new(NestedRmap::new_array(WORDS).unwrap());
    let limits = NestedLimits::new(8).unwrap();
    // Inserters: thread t inserts (lpid t+1, frame i) entries; some are re-inserted
    // (dedup), and entries of frames older than 5 count as stale (reclaimable).
    let inserters: Vec<_> = (0..THREADS - 1)
        .map(|t| {
            let (pool, words) = (pool.clone(), words.clone());
            thread::spawn(move || {
                let mut rng = Lcg(t + 7);
                let mut cache = NestedCache::new(&pool);
                let mut added = Vec::new();
                for i in 0..OPS {
                    let w = rng.next(WORDS as u64) as usize;
                    let frame = if rng.next(4) == 0 && i > 0 { i - 1 } else { i };
                    cache.reserve(1).unwrap();
                    let e = ent(t + 1, frame);
                    let r = words[w].lock().insert(&mut cache, e, &limits, |x| {
                        x.lpid() != Lpid((t + 1) as u16) || x.gpa().gfn().raw() + 5 > i
                    });
                    match r {
                        Ok(o) => added.push((w, e, o.inserted, o.reclaimed)),
                        Err(NestedError::ListFull { .. }) => {}
                        Err(err) => panic!("{err}"),
                    }
                }
                added
            })
        })
        .collect();
    // Detacher: takes whole lists out and frees them, like L1 unmapping the page.
    let detacher = {
        let (pool, words) = (pool.clone(), words.clone());
        thread::spawn(move || {
            let mut rng = Lcg(99);
            let mut got = Vec::new();
            for _ in 0..OPS / 4 {
                let w = rng.next(WORDS as u64) as usize;
                let d = words[w].detach_all(&pool);
                let v: Vec<_> = d.iter().collect();
                assert_eq!(d.free().unwrap(), v.len());
                let uniq: BTreeSet<_> = v.iter().copied().collect();
                assert_eq!(uniq.len(), v.len(), "no duplicates in a detached list");
                got.extend(v);
            }
            got
        })
    };
    let (mut inserted, mut reclaimed) = (0usize, 0usize);
    for h in inserters {
        for (_, _, kind, rec) in h.join().unwrap() {
            if kind != revmap_rmap::Inserted::Duplicate {
                inserted += 1;
            }
            reclaimed += rec;
        }
    }
    let detached = detacher.join().unwrap();
    let st = check_nested_rmaps(&words, &pool, &limits).unwrap();
    // Every inserted entry was detached, is still present, or was reclaimed as stale.
    assert_eq!(detached.len() + st.entries as usize + reclaimed, inserted);
    let ps = pool.check().unwrap();
    assert_eq!(ps.in_use, st.nodes);
    assert_eq!(ps.unreserved, ps.free);
}

#[test]
fn nested_random() {
    shuttle::check_random(nested_workload, 300);
}

#[test]
fn nested_pct() {
    shuttle::check_pct(nested_workload, 300, 3);
}
