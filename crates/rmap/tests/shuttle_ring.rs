//! shuttle stress of the HPT rmap ring: many threads, many operations, random schedules.
//!
//! Run: `RUSTFLAGS="--cfg shuttle" CARGO_TARGET_DIR=target/shuttle cargo test -p revmap-rmap --release --test shuttle_ring`.
//!
//! Four "HPTE owner" threads each own a disjoint set of HPTE slots and, following the
//! hypercall lock order (HPTE lock, then rmap lock), enter them into random frames' rings
//! or remove them (H_ENTER / H_REMOVE). Two walkers start from rmaps and obey the restart
//! rule: an unmapper (`drain_locked`, clearing VALID) and an ager (`for_each_locked`,
//! harvesting R). Every choice comes from shuttle's replayable RNG. At the end
//! `check_rmaps` must pass and ring membership must equal the set of VALID HPTEs, each
//! on the ring of the frame recorded in its `guest_rpte`.
//!
//! shuttle runs every access sequentially consistent, so it checks the protocol (no lost
//! or duplicated members, no deadlock, restart rule), not the memory orderings: those are
//! loom's job (`loom_ring.rs`, `loom_bitlock.rs`).
#![cfg(shuttle)]

use revmap_rmap::ring::{
    check_rmaps, HpteLockArray, Revmap, RmapArray, RmapViolation, Visit, HPTE_R_C, HPTE_R_R,
};
use revmap_rmap::sync::{thread, Arc};
use shuttle::rand::{thread_rng, RngCore};

const NPTE: u32 = 16;
const NFRAMES: u64 = 3;
const OWNERS: u32 = 4;
const OPS_PER_OWNER: usize = 24;
const WALKS: usize = 6;
/// Toy VALID bit of an HPTE word.
const VALID: u64 = 0x1;

struct World {
    rev: Revmap,
    rmaps: RmapArray,
    locks: HpteLockArray,
}

impl World {
    /// H_ENTER: HPTE lock, then link into `gfn`'s ring; the frame goes into guest_rpte.
    fn h_enter(&self, p: u32, gfn: u64) {
        let mut h = self.locks.lock_hpte(p).unwrap();
        if h.value() & VALID != 0 {
            return;
        }
        self.rev.set_guest_rpte(p, gfn);
        self.rev.link(self.rmaps.get(gfn).unwrap().lock(), p);
        h.set(h.value() | VALID);
    }

    /// H_REMOVE: HPTE lock, then unlink from the ring of the frame in guest_rpte.
    fn h_remove(&self, p: u32, rc: u64) {
        let mut h = self.locks.lock_hpte(p).unwrap();
        if h.value() & VALID == 0 {
            return;
        }
        let gfn = self.rev.guest_rpte(p);
        let mut g = self.rmaps.get(gfn).unwrap().lock();
        assert_eq!(self.rev.try_unlink(&mut g, p), Ok(true));
        g.add_rc(rc);
        drop(g);
        h.set(h.value() & !VALID);
    }

    fn check(&self) {
        let mut members = 0;
        check_rmaps(self.rmaps.iter(), &self.rev, |frame, p| {
            let h = self.locks.lock_hpte(p).unwrap();
            members += 1;
            if h.value() & VALID != 0 && self.rev.guest_rpte(p) == frame as u64 {
                Ok(())
            } else {
                Err(RmapViolation::DuplicateMember { ptex: p })
            }
        })
        .unwrap();
        let valid = (0..NPTE)
            .filter(|&p| self.locks.lock_hpte(p).unwrap().value() & VALID != 0)
            .count();
        assert_eq!(members, valid, "every VALID HPTE is on exactly one ring");
        assert!(self.rmaps.iter().all(|r| !r.load().is_locked()));
    }
}

fn model() {
    let w = Arc::new(World {
        rev: Revmap::new(u64::from(NPTE)).unwrap(),
        rmaps: RmapArray::new(NFRAMES).unwrap(),
        locks: HpteLockArray::new(NPTE as usize).unwrap(),
    });
    let mut threads = Vec::new();
    for owner in 0..OWNERS {
        let w = w.clone();
        threads.push(thread::spawn(move || {
            let mut rng = thread_rng();
            let mine: Vec<u32> = (0..NPTE).filter(|p| p % OWNERS == owner).collect();
            for _ in 0..OPS_PER_OWNER {
                let r = rng.next_u64();
                let p = mine[(r % mine.len() as u64) as usize];
                let gfn = (r >> 8) % NFRAMES;
                if (r >> 16) % 3 == 0 {
                    w.h_remove(p, [HPTE_R_R, HPTE_R_C][(r >> 20) as usize % 2]);
                } else {
                    w.h_enter(p, gfn);
                }
            }
        }));
    }
    {
        let w = w.clone();
        threads.push(thread::spawn(move || {
            let mut rng = thread_rng();
            for _ in 0..WALKS {
                let gfn = rng.next_u64() % NFRAMES;
                w.rmaps
                    .get(gfn)
                    .unwrap()
                    .drain_locked(&w.rev, &w.locks, |g, p, mut h| {
                        assert_ne!(h.value() & VALID, 0, "ring member {p} is VALID");
                        assert_eq!(w.rev.guest_rpte(p), gfn);
                        assert_ne!(g.word().head(), Some(p));
                        h.set(h.value() & !VALID);
                    });
            }
        }));
    }
    {
        let w = w.clone();
        threads.push(thread::spawn(move || {
            let mut rng = thread_rng();
            for _ in 0..WALKS {
                let gfn = rng.next_u64() % NFRAMES;
                let mut n = 0;
                w.rmaps
                    .get(gfn)
                    .unwrap()
                    .for_each_locked(&w.rev, &w.locks, |g, p, h| {
                        assert_ne!(h.value() & VALID, 0, "ring member {p} is VALID");
                        assert_eq!(w.rev.guest_rpte(p), gfn);
                        g.add_rc(HPTE_R_R);
                        n += 1;
                        assert!(n <= 4 * NPTE, "walk does not end");
                        Visit::Continue
                    });
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    w.check();
}

/// Six threads, ~100 ring operations and 12 walks per execution, random schedules.
#[test]
fn owners_and_walkers_keep_rings_consistent() {
    shuttle::check_random(model, 1500);
}

/// The same under PCT (probabilistic concurrency testing), which favours schedules with
/// few, well-placed preemptions (depth 3).
#[test]
fn owners_and_walkers_keep_rings_consistent_pct() {
    shuttle::check_pct(model, 1500, 3);
}
