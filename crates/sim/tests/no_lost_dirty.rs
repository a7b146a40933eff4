//! No lost dirty page: every guest store is harvested by some dirty-log round.
//!
//! vCPU threads store to guest pages through the MMU model (`VcpuMmu`), the guest having
//! H_ENTERed a writable HPTE for each page; a translation that hits an ABSENT entry
//! faults into `Vm::page_fault` and retries. Meanwhile the live-migration loop harvests
//! dirty logs round after round, and memory pressure (plus an aging scan) unmaps random
//! host ranges.
//!
//! Ground truth: before each store a vCPU reads the shared round counter, which the
//! migration loop sets at the start of every round (before its first harvest). A store
//! that observed round `r` happened after round `r` started, so its page must be in the
//! log of round `r` or of a later round; the final harvest after every vCPU has stopped
//! is the last round. Runs are bounded by operation counts, never by wall time.
//!
//! Seeds: 20 by default; `REVMAP_DIRTY_SEEDS=N` runs N.

use revmap_hpt::hash::{hpt_hash, primary_pteg, Segment, SegmentSize};
use revmap_hpt::hcall::{H_ENTER, H_SUCCESS};
use revmap_hpt::hpte::{encode_avpn, HpteR, HpteV};
use revmap_hpt::mmu::{Access, Fault, VcpuMmu};
use revmap_hpt::{FaultOutcome, Flavour, MemslotFlags, Vm, VmConfig};
use revmap_rmap::sync::{thread, AtomicU64, AtomicUsize, Ordering};
use revmap_rmap::SlotId;
use revmap_sim::actors::{ActorConfig, ActorKind, HostActors, HostOps, Migration, MigrationEvent};
use revmap_sim::host::HostMmu;
use std::num::NonZeroU64;

const SEG: Segment = Segment {
    vsid: 0x7_4321,
    ssize: SegmentSize::S256M,
    base_shift: 12,
};
const RAM_PAGES: u64 = 1 << 14; // 64 MiB
const PAGES: u64 = 384;
const VCPUS: usize = 3;
const STORES_PER_VCPU: usize = 1500;
/// A hang guard only: a store normally needs a handful of faults.
const MAX_FAULTS_PER_STORE: usize = 10_000_000;
/// A vCPU waits for the next round after this many stores, so every run spans many
/// rounds however the threads are scheduled.
const STORES_PER_ROUND: usize = 25;

/// Guest page `k` (mapped at ea `k << 12`) is frame `gfn_of(k)`: spread over RAM.
fn gfn_of(k: u64) -> u64 {
    (k * 37 + 5) % RAM_PAGES
}

fn new_vm() -> Vm {
    let vm = Vm::new(VmConfig {
        ram_bytes: RAM_PAGES << 12,
        hpt_order: 18,
        flavour: Flavour::Kvm,
        backing_page_shift: 12,
    })
    .unwrap();
    for k in 0..PAGES {
        let ea = k << 12;
        let group = primary_pteg(vm.hpt().geometry(), hpt_hash(&SEG, ea)) * 8;
        let pteh = encode_avpn(SEG.va(ea), 12, false) | HpteV::VALID;
        let ptel = (gfn_of(k) << 12) | HpteR::M | 2;
        let r = vm.hcall(0, H_ENTER, &[0, group, pteh, ptel]);
        assert_eq!(r.ret, H_SUCCESS, "H_ENTER page {k}");
    }
    vm
}

/// A tiny deterministic generator for the vCPUs' page choices (the actors have their
/// own seeded streams).
fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

struct Done<'a>(&'a AtomicUsize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        // ORDERING: SeqCst: the migration loop polls it; no data rides on it.
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Run {
    ops: HostOps,
    stores: usize,
    faults: u64,
    no_hpte: u64,
    rounds: u64,
}

fn run(seed: u64, page_in: bool, manual_protect: bool) -> Run {
    let vm = new_vm();
    if manual_protect {
        vm.set_memslot_flags(
            SlotId(0),
            MemslotFlags::LOG_DIRTY_PAGES.union(MemslotFlags::DIRTY_LOG_MANUAL_PROTECT),
        )
        .unwrap();
        assert!(vm.memslot_views()[0].manual_protect);
    }
    let round = AtomicU64::new(0);
    let running = AtomicUsize::new(VCPUS);
    let faults = AtomicU64::new(0);
    let no_hpte = AtomicU64::new(0);
    // last_logged[gfn] = the last round whose log had gfn dirty.
    let mut last_logged = vec![0u64; RAM_PAGES as usize];
    let cfg = ActorConfig {
        seed,
        kinds: vec![ActorKind::MemoryPressure, ActorKind::Aging],
        page_in,
        max_outstanding: 4,
        // Paced by the migration loop: K operations per actor per round. Free-running
        // back-to-back invalidations would starve the fault path (it retries while an
        // invalidation is in progress, as KVM's does).
        ops_per_phase: NonZeroU64::new(2),
    };
    let (records, ops, rounds) = thread::scope(|s| {
        let actors = HostActors::spawn(s, &vm, &cfg);
        let vcpus: Vec<_> = (0..VCPUS)
            .map(|cpu| {
                let (vm, round, running, faults, no_hpte) =
                    (&vm, &round, &running, &faults, &no_hpte);
                s.spawn(move || {
                    // Counts this vCPU out even if it panics, so the migration loop ends.
                    let _out = Done(running);
                    let mut mmu = VcpuMmu::new(vm).unwrap();
                    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (cpu as u64 + 1);
                    let mut rec = Vec::with_capacity(STORES_PER_VCPU);
                    for n in 0..STORES_PER_VCPU {
                        if n % STORES_PER_ROUND == 0 && n > 0 {
                            // ORDERING: SeqCst: pacing only.
                            let seen = round.load(Ordering::SeqCst);
                            while round.load(Ordering::SeqCst) == seen {
                                thread::yield_now();
                            }
                        }
                        let k = xorshift(&mut rng) % PAGES;
                        // ORDERING: SeqCst (at least Acquire): the store below (the
                        // MMU's fetch_or of C) cannot be ordered before this read.
                        let r = round.load(Ordering::SeqCst);
                        let mut tries = 0;
                        loop {
                            let t = mmu.translate(&SEG, (k << 12) | 8, Access::Store);
                            match t {
                                Ok(_) => break,
                                Err(f @ (Fault::Absent { .. } | Fault::Protection { .. })) => {
                                    // ORDERING: Relaxed: a statistic.
                                    faults.fetch_add(1, Ordering::Relaxed);
                                    match vm.page_fault(cpu, &f, Access::Store) {
                                        // Re-entering the guest takes time: let the
                                        // invalidation that made us retry finish.
                                        FaultOutcome::Retry => thread::yield_now(),
                                        other => panic!("page {k}: fault {f:?} -> {other:?}"),
                                    }
                                }
                                Err(Fault::NoHpte) => {
                                    // The guest never removes these HPTEs, so this is the
                                    // MMU model's two-pass search (VALID, then ABSENT)
                                    // racing a state flip (page-in, or a dirty scan's
                                    // ABSENT window). KVM's real-mode handler re-searches
                                    // VALID|ABSENT and resumes the guest; so do we.
                                    // ORDERING: Relaxed: a statistic.
                                    no_hpte.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            tries += 1;
                            assert!(
                                tries < MAX_FAULTS_PER_STORE,
                                "page {k} never mapped: last {t:?}, HPTE {:?}",
                                vm.hpt()
                                    .slot(revmap_rmap::Ptex(match t {
                                        Err(Fault::Absent { ptex, .. })
                                        | Err(Fault::Protection { ptex }) => ptex.0,
                                        _ => 0,
                                    }))
                                    .map(|s| (s.load_v(), s.load_r()))
                            );
                        }
                        rec.push((gfn_of(k), r));
                    }
                    rec
                })
            })
            .collect();
        // The migration loop, on this thread.
        let mut mig = Migration::new(seed, vm.memslot_views());
        let mut ops = HostOps::default();
        let mut observe = |e: MigrationEvent<'_>| match e {
            // ORDERING: SeqCst: published before this round's first harvest.
            MigrationEvent::RoundStart { round: r } => round.store(r, Ordering::SeqCst),
            MigrationEvent::Log {
                round: r,
                slot,
                bitmap,
            } => {
                for (w, &word) in bitmap.iter().enumerate() {
                    let mut bits = word;
                    while bits != 0 {
                        let b = bits.trailing_zeros() as u64;
                        bits &= bits - 1;
                        let gfn = slot.base_gfn.0 + w as u64 * 64 + b;
                        last_logged[gfn as usize] = r;
                    }
                }
            }
        };
        // ORDERING: SeqCst: see `Done`.
        while running.load(Ordering::SeqCst) != 0 {
            mig.run_round(&vm, &mut ops, &mut observe);
            actors.end_phase();
        }
        let records: Vec<Vec<(u64, u64)>> = vcpus.into_iter().map(|h| h.join().unwrap()).collect();
        // The final harvest: every vCPU has stopped.
        let last = mig.run_round(&vm, &mut ops, &mut observe);
        actors.pause();
        vm.check_invariants().unwrap();
        actors.resume();
        ops.merge(&actors.stop().unwrap());
        (records, ops, last)
    });
    let mut stores = 0;
    for (cpu, rec) in records.iter().enumerate() {
        for (i, &(gfn, r)) in rec.iter().enumerate() {
            stores += 1;
            assert!(
                last_logged[gfn as usize] >= r.max(1),
                "seed {seed}: vCPU {cpu} store {i} to gfn {gfn:#x} after round {r} started \
                 is in no log of round >= {r} (last logged in round {})",
                last_logged[gfn as usize]
            );
        }
    }
    Run {
        ops,
        stores,
        faults: faults.into_inner(),
        no_hpte: no_hpte.into_inner(),
        rounds,
    }
}

fn seeds() -> u64 {
    std::env::var("REVMAP_DIRTY_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

#[test]
fn no_dirty_page_is_lost_over_many_seeds() {
    let mut total = HostOps::default();
    let (mut stores, mut faults, mut no_hpte, mut rounds) = (0, 0, 0, 0);
    for seed in 0..seeds() {
        let r = run(seed, seed % 2 == 0, seed % 4 >= 2);
        total.merge(&r.ops);
        stores += r.stores;
        faults += r.faults;
        no_hpte += r.no_hpte;
        rounds += r.rounds;
    }
    eprintln!(
        "{} seeds: {stores} stores, {faults} faults, {no_hpte} transient NoHpte, {rounds} rounds, \
         host ops {total:?}",
        seeds()
    );
    assert_eq!(stores, seeds() as usize * VCPUS * STORES_PER_VCPU);
    // The interference really happened.
    assert!(total.hptes_unmapped > 0, "{total:?}");
    assert!(faults > 0);
    assert!(total.dirty_pages > 0 && total.get_dirty_log >= 2 * seeds());
    let min_rounds = (STORES_PER_VCPU / STORES_PER_ROUND) as u64 * seeds();
    assert!(rounds >= min_rounds, "{rounds} rounds");
    if seeds() >= 4 {
        assert!(total.clear_dirty_log > 0, "manual protection exercised");
    }
}
