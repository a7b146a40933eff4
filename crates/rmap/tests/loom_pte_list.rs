//! loom models of the x86 pte_list: modifications under the head lock racing a
//! read-only walker (lock, iterate, `Release` read-only unlock, as KVM's `kvm_rmap_unlock_readonly`), with
//! descriptor allocation from the pool (which may grow) inside the race.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p revmap-rmap
//! --release --test loom_pte_list`.
#![cfg(loom)]

use revmap_rmap::pte_list::{check_pte_list, DescCache, DescPool, PteListHead, SpteHandle};
use revmap_rmap::sync::{thread, Arc};

fn h(v: u64) -> SpteHandle {
    SpteHandle::new(v).unwrap()
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

/// A writer turns a single entry into a descriptor list (allocating the descriptor
/// from reserved capacity) while a read-only walker iterates: the walker sees the list
/// before or after, never a half-built descriptor.
#[test]
fn single_to_many_races_readonly_walker() {
    model(|| {
        let pool = Arc::new(DescPool::new());
        let head = Arc::new(PteListHead::new());
        {
            let mut c = DescCache::new(&pool);
            let _ = head.lock().add(&mut c, h(8)).unwrap();
        }
        let (p2, h2) = (pool.clone(), head.clone());
        let w = thread::spawn(move || {
            let mut c = DescCache::new(&p2);
            c.reserve(1).unwrap();
            let mut g = h2.lock();
            assert_eq!(g.add(&mut c, h(16)).unwrap(), 1);
        });
        let got = {
            let g = head.lock_readonly();
            let n = g.count(&pool).unwrap();
            let got: Vec<u64> = g.iter(&pool).map(|s| s.raw()).collect();
            assert_eq!(n, got.len());
            sorted(got)
        };
        assert!(got == [8] || got == [8, 16], "{got:?}");
        w.join().unwrap();
        assert_eq!(check_pte_list(&head, &pool), Ok(2));
        let s = pool.check().unwrap();
        assert_eq!(s.in_use, 1);
    });
}

/// A writer removes an entry from a descriptor (the hole is filled from the head
/// descriptor) and adds another while a read-only walker iterates.
#[test]
fn remove_add_races_readonly_walker() {
    model(|| {
        let pool = Arc::new(DescPool::new());
        let head = Arc::new(PteListHead::new());
        {
            let mut c = DescCache::new(&pool);
            c.reserve(1).unwrap();
            let mut g = head.lock();
            let _ = g.add(&mut c, h(8)).unwrap();
            let _ = g.add(&mut c, h(16)).unwrap();
        }
        let (p2, h2) = (pool.clone(), head.clone());
        let w = thread::spawn(move || {
            let mut c = DescCache::new(&p2);
            let mut g = h2.lock();
            g.remove(&p2, h(8)).unwrap();
            assert_eq!(g.add(&mut c, h(24)).unwrap(), 1);
        });
        let got = {
            let g = head.lock_readonly();
            sorted(g.iter(&pool).map(|s| s.raw()).collect())
        };
        assert!(got == [8, 16] || got == [16, 24], "{got:?}");
        w.join().unwrap();
        assert_eq!(check_pte_list(&head, &pool), Ok(2));
    });
}

/// Two writers on one head, each reserving before locking: no lost update, and the
/// pool's accounting holds afterwards.
#[test]
fn two_writers_one_head() {
    model(|| {
        let pool = Arc::new(DescPool::new());
        let head = Arc::new(PteListHead::new());
        let spawn = |v: u64| {
            let (p, hd) = (pool.clone(), head.clone());
            thread::spawn(move || {
                let mut c = DescCache::new(&p);
                c.reserve(1).unwrap();
                let _ = hd.lock().add(&mut c, h(v)).unwrap();
            })
        };
        let a = spawn(8);
        let b = spawn(16);
        a.join().unwrap();
        b.join().unwrap();
        let g = head.lock_readonly();
        assert_eq!(sorted(g.iter(&pool).map(|s| s.raw()).collect()), [8, 16]);
        drop(g);
        assert_eq!(check_pte_list(&head, &pool), Ok(2));
        let s = pool.check().unwrap();
        assert_eq!((s.in_use, s.unreserved, s.free), (1, s.free, s.free));
    });
}
