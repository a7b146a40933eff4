//! loom models of the HPT rmap ring under concurrency (`revmap_rmap::ring`).
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p revmap-rmap
//! --release --test loom_ring`.
//!
//! An "HPTE owner" thread follows the hypercall lock order: it spins for an HPTE lock
//! (`HpteLockArray::lock_hpte`), then takes the rmap lock to link or unlink (H_ENTER,
//! H_REMOVE). A walker starting from the rmap (`drain_locked` as unmap does,
//! `for_each_locked` as aging does) holds the rmap lock and may only *try* HPTE locks,
//! following the restart rule. Bit 0 of each toy HPTE word plays VALID: an HPTE is on
//! the ring if and only if VALID is set, and both change only under the HPTE lock and
//! the rmap lock together (an HPTE is on a ring exactly when it is valid). Each model checks:
//!
//! * no deadlock (an ABBA cycle would spin forever, which loom reports as exceeding its
//!   branch bound);
//! * every member a walker visits is VALID under its HPTE lock;
//! * at the end, `check_rmaps` passes, ring membership equals the VALID set, and every
//!   HPTE was removed exactly once or is still on the ring;
//! * the restart path (failed HPTE try-lock) was actually explored.
#![cfg(loom)]

use loom::model::Builder;
use revmap_rmap::bitlock::BitLockGuard;
use revmap_rmap::ring::{
    check_rmaps, HpteLockArray, HpteLocks, Revmap, Rmap, RmapViolation, Visit, HPTE_R_R,
};
use revmap_rmap::sync::{thread, Arc};

/// Toy VALID bit of an HPTE word (`HPTE_V_VALID`).
const VALID: u64 = 0x1;
/// Toy "visited by aging" bit of an HPTE word (stands for clearing R in the HPTE).
const AGED: u64 = 0x100;

/// Counts restarts across all executions of one model (one static per test, as tests
/// run in parallel). The counter is deliberately outside the model (a std atomic loom
/// does not see): it only records which paths loom explored, so it must not add
/// synchronisation between the modelled threads.
type Restarts = std::sync::atomic::AtomicUsize;

/// `HpteLocks` over the toy table that records walker restarts. With `SPIN` it
/// violates the restart rule: "try" is a spin.
struct Counting<'a, const SPIN: bool>(&'a HpteLockArray, &'static Restarts);

impl<const SPIN: bool> HpteLocks for Counting<'_, SPIN> {
    type Guard<'a>
        = BitLockGuard<'a>
    where
        Self: 'a;
    fn try_lock_hpte(&self, ptex: u32) -> Option<Self::Guard<'_>> {
        if SPIN {
            self.0.lock_hpte(ptex)
        } else {
            self.0.try_lock_hpte(ptex)
        }
    }
    fn wait_hpte_unlocked(&self, ptex: u32) {
        // ORDERING: Relaxed; a statistic outside the model (see `RESTARTS`).
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.wait_hpte_unlocked(ptex);
    }
}

struct World {
    rev: Revmap,
    rmap: Rmap,
    locks: HpteLockArray,
}

impl World {
    /// `npte` slots, with `members` linked (and VALID) in that order.
    fn new(npte: u32, members: &[u32]) -> Arc<Self> {
        let w = World {
            rev: Revmap::new(u64::from(npte)).unwrap(),
            rmap: Rmap::new(),
            locks: HpteLockArray::new(npte as usize).unwrap(),
        };
        for &p in members {
            w.h_enter(p);
        }
        Arc::new(w)
    }

    /// H_ENTER: HPTE lock (spinning: the outer lock), then link under the rmap lock.
    fn h_enter(&self, p: u32) {
        let mut h = self.locks.lock_hpte(p).unwrap();
        assert_eq!(h.value() & VALID, 0);
        self.rev.link(self.rmap.lock(), p);
        h.set(h.value() | VALID);
    }

    /// H_REMOVE: HPTE lock, then, if still VALID, unlink under the rmap lock. Returns
    /// whether this call removed it (a walker may have got there first).
    fn h_remove(&self, p: u32) -> bool {
        let mut h = self.locks.lock_hpte(p).unwrap();
        if h.value() & VALID == 0 {
            return false;
        }
        let mut g = self.rmap.lock();
        assert_eq!(self.rev.try_unlink(&mut g, p), Ok(true));
        g.add_rc(HPTE_R_R);
        drop(g);
        h.set(h.value() & !VALID);
        true
    }

    /// The VALID bit of HPTE `p`, read under its lock.
    fn valid(&self, p: u32) -> bool {
        self.locks.lock_hpte(p).unwrap().value() & VALID != 0
    }

    /// Quiescent check: rings consistent and membership == VALID.
    fn check(&self, npte: u32) -> Vec<u32> {
        let mut members = Vec::new();
        check_rmaps([&self.rmap], &self.rev, |_, p| {
            members.push(p);
            Ok::<(), RmapViolation>(())
        })
        .unwrap();
        for p in 0..npte {
            assert_eq!(self.valid(p), members.contains(&p), "HPTE {p}");
        }
        assert!(!self.rmap.load().is_locked());
        members
    }
}

/// Runs `owner` (the hypercall side) on another thread over world `w`.
fn spawn_owner<T: Send + 'static>(
    w: &Arc<World>,
    owner: impl FnOnce(&World) -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let w = w.clone();
    thread::spawn(move || owner(&w))
}

fn builder() -> Builder {
    let mut b = Builder::new();
    b.preemption_bound = Some(3);
    b
}

/// Unmap (`drain_locked`) racing an owner that enters HPTE 2 and removes HPTE 1.
#[test]
fn drain_races_h_enter_and_h_remove() {
    static RESTARTS: Restarts = Restarts::new(0);
    builder().check(|| {
        let w = World::new(3, &[0, 1]);
        let owner = spawn_owner(&w, |o| {
            o.h_enter(2);
            o.h_remove(1)
        });
        let mut drained = Vec::new();
        w.rmap.drain_locked(
            &w.rev,
            &Counting::<false>(&w.locks, &RESTARTS),
            |g, p, mut h| {
                assert_ne!(h.value() & VALID, 0, "a ring member is VALID");
                assert!(g.word().head() != Some(p));
                h.set(h.value() & !VALID);
                drained.push(p);
            },
        );
        let owner_removed_1 = owner.join().unwrap();
        let left = w.check(3);
        // Every HPTE was removed exactly once, or is still on the ring.
        let mut all: Vec<u32> = drained.iter().chain(&left).copied().collect();
        if owner_removed_1 {
            all.push(1);
        }
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2], "drained {drained:?}, left {left:?}");
        assert!(
            drained.contains(&0),
            "0 was on the ring when the walk began"
        );
    });
    // ORDERING: Relaxed; read after the model finished.
    assert!(RESTARTS.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

/// Aging (`for_each_locked`) racing an owner that enters HPTE 2 and removes HPTE 0 (the
/// head, so the head moves while the walker may be waiting to restart).
#[test]
fn for_each_races_h_enter_and_h_remove_of_head() {
    static RESTARTS: Restarts = Restarts::new(0);
    builder().check(|| {
        let w = World::new(3, &[0, 1]);
        let owner = spawn_owner(&w, |o| {
            o.h_enter(2);
            assert!(o.h_remove(0), "only the owner removes");
        });
        let mut visited = Vec::new();
        w.rmap.for_each_locked(
            &w.rev,
            &Counting::<false>(&w.locks, &RESTARTS),
            |g, p, h| {
                assert_ne!(h.value() & VALID, 0, "a ring member is VALID");
                h.set(h.value() | AGED);
                g.add_rc(HPTE_R_R);
                visited.push(p);
                Visit::Continue
            },
        );
        owner.join().unwrap();
        let left = w.check(3);
        let mut left_sorted = left.clone();
        left_sorted.sort_unstable();
        assert_eq!(left_sorted, [1, 2]);
        assert_eq!(
            left[0], 1,
            "head moved to the successor of the removed head"
        );
        // 1 was on the ring for the whole walk, so it was visited (perhaps twice).
        assert!(visited.contains(&1), "visited {visited:?}");
        assert!(w.locks.lock_hpte(1).unwrap().value() & AGED != 0);
        assert!(w.rmap.load().referenced());
    });
    // ORDERING: Relaxed; read after the model finished.
    assert!(RESTARTS.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

/// Two owners on different HPTEs of one ring (link at the tail and unlink the tail's
/// predecessor) with no walker: the ring stays consistent and ordered.
#[test]
fn two_owners_link_and_unlink_concurrently() {
    builder().check(|| {
        let w = World::new(4, &[0, 1, 2]);
        let t = spawn_owner(&w, |o| o.h_enter(3));
        assert!(w.h_remove(1));
        t.join().unwrap();
        let left = w.check(4);
        assert_eq!(left, [0, 2, 3]);
    });
}

/// The restart rule is necessary: a walker that *spins* on the HPTE lock while holding
/// the rmap lock deadlocks against an owner holding that HPTE lock and waiting for the
/// rmap lock (ABBA). loom reports the endless spin as exceeding its branch bound.
#[test]
#[should_panic(expected = "maximum number of branches")]
fn walker_spinning_on_hpte_lock_deadlocks() {
    static RESTARTS: Restarts = Restarts::new(0);
    builder().check(|| {
        let w = World::new(2, &[0]);
        let owner = spawn_owner(&w, |o| {
            o.h_remove(0);
        });
        w.rmap.drain_locked(
            &w.rev,
            &Counting::<true>(&w.locks, &RESTARTS),
            |_, _, mut h| {
                h.set(h.value() & !VALID);
            },
        );
        owner.join().unwrap();
    });
}
