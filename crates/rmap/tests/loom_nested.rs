//! loom models of the nested rmap (insert racing detach-all) and of the node pool
//! (allocation, growth and free racing a reader of a published node).
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p revmap-rmap
//! --release --test loom_nested`.
#![cfg(loom)]

use revmap_rmap::nested::{check_nested_rmap, NestedLimits};
use revmap_rmap::pool::{NodeCache, Pool, TestNode};
use revmap_rmap::sync::{thread, Arc, AtomicU64, Ordering};
use revmap_rmap::{Gpa, Lpid, NestedCache, NestedPool, NestedRmap, NestedRmapEntry};
use std::collections::BTreeSet;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.max_branches = 20_000;
    b.check(f);
}

fn ent(lpid: u16, frame: u64) -> NestedRmapEntry {
    NestedRmapEntry::new(Lpid(lpid), Gpa(frame << 12)).unwrap()
}

/// An insert (which turns the inline entry into a list, allocating a node) races a
/// detach-all: every entry ends up exactly once either in the detached list or in the
/// word, and the detacher sees the node's contents fully.
#[test]
fn insert_races_detach_all() {
    model(|| {
        let pool = Arc::new(NestedPool::new());
        let word = Arc::new(NestedRmap::new());
        let lim = NestedLimits::default();
        {
            let mut c = NestedCache::new(&pool);
            word.lock()
                .insert(&mut c, ent(1, 1), &lim, |_| true)
                .unwrap();
        }
        let (p2, w2) = (pool.clone(), word.clone());
        let ins = thread::spawn(move || {
            let mut c = NestedCache::new(&p2);
            c.reserve(1).unwrap();
            w2.lock().insert(&mut c, ent(2, 2), &lim, |_| true).unwrap();
        });
        let detached: Vec<_> = {
            let d = word.detach_all(&pool);
            let v = d.iter().collect();
            assert_eq!(d.free().unwrap(), {
                let v: &Vec<NestedRmapEntry> = &v;
                v.len()
            });
            v
        };
        ins.join().unwrap();
        let left: Vec<_> = word.lock().iter(&pool).collect();
        let all: BTreeSet<_> = detached.iter().chain(left.iter()).copied().collect();
        assert_eq!(detached.len() + left.len(), 2);
        assert_eq!(all, [ent(1, 1), ent(2, 2)].into_iter().collect());
        assert_eq!(check_nested_rmap(&word, &pool), Ok(left.len()));
        let s = pool.check().unwrap();
        assert_eq!(s.in_use as usize, left.len().saturating_sub(1));
    });
}

/// One thread reserves past the first chunk (growing the pool), allocates a node,
/// writes it and publishes its index with Release; another frees a node it owns and
/// reserves/allocates concurrently, then reads the published node. Accounting holds and
/// the reader sees the payload.
#[test]
fn pool_alloc_grow_free_with_reader() {
    model(|| {
        let pool: Arc<Pool<TestNode>> = Arc::new(Pool::new());
        let first = {
            let mut c = NodeCache::new(&pool);
            c.reserve(1).unwrap();
            c.alloc().unwrap()
        };
        let published = Arc::new(AtomicU64::new(u64::MAX));
        let (p2, pub2) = (pool.clone(), published.clone());
        let a = thread::spawn(move || {
            let mut c = NodeCache::new(&p2);
            c.reserve(2).unwrap();
            let i = c.alloc().unwrap();
            p2.node(i).unwrap().payload.store(42, Ordering::Relaxed);
            pub2.store(u64::from(i.raw()), Ordering::Release);
        });
        pool.free(first).unwrap();
        let mut c = NodeCache::new(&pool);
        c.reserve(1).unwrap();
        let mine = c.alloc().unwrap();
        let p = published.load(Ordering::Acquire);
        if p != u64::MAX {
            let i = revmap_rmap::pool::NodeIdx::new(p as u32).unwrap();
            assert_ne!(i, mine);
            assert_eq!(pool.node(i).unwrap().payload.load(Ordering::Relaxed), 42);
        }
        a.join().unwrap();
        drop(c);
        let s = pool.check().unwrap();
        assert_eq!(s.in_use, 2);
        assert_eq!(s.unreserved, s.free);
    });
}
