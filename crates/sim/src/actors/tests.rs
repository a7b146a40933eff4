use super::*;
use crate::testutil::{ram_slot, FakeHost, Seen};

const NPAGES: u64 = 1 << 18; // 1 GiB

fn slots() -> Vec<SlotView> {
    vec![ram_slot(NPAGES, false)]
}

fn two_slots() -> Vec<SlotView> {
    vec![
        ram_slot(NPAGES, false),
        SlotView {
            id: SlotId(1),
            base_gfn: Gfn(1 << 20),
            npages: 100,
            userspace_addr: Hva(0x7f00_0000_0000),
            backing_page_shift: 12,
            dirty_logging: true,
            manual_protect: true,
        },
    ]
}

fn plan(kind: ActorKind, seed: u64, n: usize) -> Vec<HostOp> {
    let mut a = Actor::new(kind, &ActorConfig::all(seed), two_slots());
    (0..n).map_while(|_| a.next_op()).collect()
}

#[test]
fn op_sequences_are_a_function_of_the_seed() {
    for kind in [
        ActorKind::MemoryPressure,
        ActorKind::Aging,
        ActorKind::Migration,
    ] {
        let a = plan(kind, 7, 500);
        assert_eq!(a.len(), 500, "{kind:?}");
        assert_eq!(a, plan(kind, 7, 500), "{kind:?}: same seed, same ops");
        if kind != ActorKind::Migration {
            assert_ne!(a, plan(kind, 8, 500), "{kind:?}: another seed differs");
        }
    }
}

#[test]
fn pressure_ranges_are_aligned_powers_of_two_inside_ram_and_paged_back() {
    let mut p = Pressure::new(3, slots(), 4, true);
    let base = 0x7e00_0000_0000u64;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut sizes = std::collections::BTreeSet::new();
    for _ in 0..4000 {
        match p.next_op().unwrap() {
            HostOp::UnmapHva { start, end } => {
                let (lo, hi) = ((start.0 - base) >> 12, (end.0 - base) >> 12);
                let n = hi - lo;
                assert!(n.is_power_of_two() && n <= 4096 && lo % n == 0 && hi <= NPAGES);
                sizes.insert(n);
                out.push((start.0, end.0));
                assert!(out.len() <= 4, "at most max_outstanding unmapped");
            }
            HostOp::PageIn { start, end } => {
                assert_eq!(out.remove(0), (start.0, end.0), "oldest first");
            }
            op => panic!("{op:?}"),
        }
    }
    assert_eq!(sizes.len(), 13, "one page up to 16 MiB: {sizes:?}");
    // Without page-in, only unmaps.
    let mut p = Pressure::new(3, slots(), 4, false);
    assert!((0..100).all(|_| matches!(p.next_op(), Some(HostOp::UnmapHva { .. }))));
}

#[test]
fn aging_walks_every_slot_completely_in_order() {
    let mut a = Aging::new(5, two_slots());
    let mut next = [0u64, 1 << 20];
    let mut wraps = 0;
    let mut tests = 0;
    for _ in 0..20_000 {
        match a.next_op().unwrap() {
            HostOp::AgeGfn { slot, start, end } => {
                let k = slot.0 as usize;
                assert_eq!(start.0, next[k], "contiguous chunks");
                assert!(end.0 > start.0 && end.0 - start.0 <= 512);
                next[k] = end.0;
                let slot_end = if k == 0 { NPAGES } else { (1 << 20) + 100 };
                assert!(end.0 <= slot_end);
                if end.0 == slot_end {
                    next[k] = if k == 0 { 0 } else { 1 << 20 };
                    wraps += 1;
                }
            }
            HostOp::TestAgeGfn { .. } => tests += 1,
            op => panic!("{op:?}"),
        }
    }
    assert!(wraps >= 2, "went around at least once: {wraps}");
    assert!(tests > 1000);
}

#[test]
fn migration_rounds_cover_every_slot_and_clear_manual_ones() {
    let host = FakeHost::new(two_slots());
    host.touch(0, 5, true);
    host.touch(1, 99, true);
    host.touch(1, 3, true);
    let mut m = Migration::new(1, host.memslot_views());
    let mut ops = HostOps::default();
    let mut events = Vec::new();
    let mut obs = |e: MigrationEvent<'_>| match e {
        MigrationEvent::RoundStart { round } => events.push((round, None, 0)),
        MigrationEvent::Log {
            round,
            slot,
            bitmap,
        } => events.push((
            round,
            Some(slot.id),
            bitmap.iter().map(|w| w.count_ones()).sum(),
        )),
    };
    assert_eq!(m.run_round(&host, &mut ops, &mut obs), 1);
    assert!(m.at_round_start());
    assert_eq!(m.run_round(&host, &mut ops, &mut obs), 2);
    assert_eq!(
        events,
        [
            (1, None, 0),
            (1, Some(SlotId(0)), 1),
            (1, Some(SlotId(1)), 2),
            (2, None, 0),
            (2, Some(SlotId(0)), 0),
            (2, Some(SlotId(1)), 0),
        ],
        "the manual slot's bits were cleared after round 1"
    );
    assert_eq!(ops.dirty_log_rounds, 2);
    assert_eq!(ops.get_dirty_log, 4);
    assert_eq!(ops.dirty_pages, 3);
    assert_eq!(ops.max_dirty_pages_per_round, 3);
    // 100 frames = 2 bitmap words, cleared in one or two chunks, in order.
    let clears: Vec<Seen> = host
        .seen()
        .into_iter()
        .filter(|o| matches!(o, Seen::Clear(..)))
        .collect();
    assert!(
        clears == [Seen::Clear(SlotId(1), 0, 2)]
            || clears == [Seen::Clear(SlotId(1), 0, 1), Seen::Clear(SlotId(1), 64, 1)],
        "{clears:?}"
    );
    assert_eq!(ops.clear_dirty_log, clears.len() as u64);
    assert!(host.violations().is_empty(), "{:?}", host.violations());
}

#[test]
fn actor_steps_count_operations() {
    let host = FakeHost::new(slots());
    let cfg = ActorConfig::all(11);
    let mut ops = HostOps::default();
    for kind in cfg.kinds.clone() {
        let mut a = Actor::new(kind, &cfg, host.memslot_views());
        for _ in 0..100 {
            a.step(&host, &mut ops).unwrap();
        }
    }
    assert_eq!(ops.total(), 300);
    assert_eq!(ops.unmap_hva_range + ops.host_page_in, 100);
    assert_eq!(ops.age_gfn + ops.test_age_gfn, 100);
    assert_eq!(ops.get_dirty_log, 100);
    assert_eq!(ops.dirty_log_rounds, 100);
    assert_eq!(host.seen().len(), 300);
    assert!(host.violations().is_empty(), "{:?}", host.violations());
}

#[test]
fn no_slots_means_no_operations() {
    let host = FakeHost::new(Vec::new());
    let cfg = ActorConfig::all(1);
    for kind in cfg.kinds.clone() {
        let mut a = Actor::new(kind, &cfg, Vec::new());
        assert_eq!(a.step(&host, &mut HostOps::default()), None);
    }
}

#[test]
fn threads_run_pause_and_stop() {
    let host = FakeHost::new(slots());
    let ops = thread::scope(|s| {
        let actors = HostActors::spawn(s, &host, &ActorConfig::all(2));
        assert_eq!(actors.len(), 3);
        while actors.ops_so_far() < 300 {
            thread::yield_now();
        }
        for _ in 0..50 {
            actors.pause();
            assert!(!host.busy(), "no operation runs while paused");
            let before = host.seen().len();
            // A window bounded by the actors' own progress: every parked actor has
            // re-checked the pause flag a few more times (not a count of yields).
            let polls = actors.park_polls();
            while actors.park_polls() < polls + 4 * actors.len() as u64 {
                thread::yield_now();
            }
            assert!(!host.busy());
            assert_eq!(host.seen().len(), before, "nothing started while paused");
            actors.resume();
            let at = actors.ops_so_far();
            while actors.ops_so_far() < at + 3 {
                thread::yield_now();
            }
        }
        actors.stop().unwrap()
    });
    assert!(ops.total() >= 300 + 150);
    assert_eq!(ops.total() as usize, host.seen().len());
    assert!(ops.unmap_hva_range > 0 && ops.age_gfn > 0 && ops.get_dirty_log > 0);
    assert!(host.violations().is_empty(), "{:?}", host.violations());
}

#[test]
fn phases_give_exactly_k_operations_per_actor() {
    let host = FakeHost::new(slots());
    let cfg = ActorConfig {
        ops_per_phase: NonZeroU64::new(5),
        ..ActorConfig::all(9)
    };
    let ops = thread::scope(|s| {
        let actors = HostActors::spawn(s, &host, &cfg);
        for ph in 1..=40 {
            assert_eq!(actors.end_phase(), ph);
            let n = actors.ops_so_far();
            // Phase ph-1 is complete; the actors may already be in phase ph.
            assert!((15 * ph..=15 * (ph + 1)).contains(&n), "phase {ph}: {n}");
        }
        // The 41st phase is open: the actors run it while we pause; then stop.
        actors.pause();
        actors.resume();
        actors.stop().unwrap()
    });
    assert!((600..=615).contains(&ops.total()), "{}", ops.total());
    assert!(host.violations().is_empty());
}

#[test]
fn per_actor_sequences_under_threads_match_the_plan() {
    let host = FakeHost::new(slots());
    let cfg = ActorConfig {
        ops_per_phase: NonZeroU64::new(50),
        ..ActorConfig::all(21)
    };
    thread::scope(|s| {
        let actors = HostActors::spawn(s, &host, &cfg);
        actors.end_phase();
        actors.pause();
        actors.stop().unwrap()
    });
    let seen = host.seen();
    let pressure: Vec<Seen> = seen
        .iter()
        .filter(|o| matches!(o, Seen::Unmap(..) | Seen::PageIn(..)))
        .cloned()
        .collect();
    let mut p = Actor::new(ActorKind::MemoryPressure, &cfg, slots());
    let expect: Vec<Seen> = (0..pressure.len())
        .map(|_| match p.next_op().unwrap() {
            HostOp::UnmapHva { start, end } => Seen::Unmap(start, end),
            HostOp::PageIn { start, end } => Seen::PageIn(start, end),
            op => panic!("{op:?}"),
        })
        .collect();
    assert!(pressure.len() >= 50);
    assert_eq!(pressure, expect);
    let aging: Vec<Seen> = seen
        .iter()
        .filter(|o| matches!(o, Seen::Age(..) | Seen::TestAge(..)))
        .cloned()
        .collect();
    let mut a = Actor::new(ActorKind::Aging, &cfg, slots());
    let expect: Vec<Seen> = (0..aging.len())
        .map(|_| match a.next_op().unwrap() {
            HostOp::AgeGfn { slot, start, end } => Seen::Age(slot, start, end),
            HostOp::TestAgeGfn { slot, gfn } => Seen::TestAge(slot, gfn, Gfn(gfn.0 + 1)),
            op => panic!("{op:?}"),
        })
        .collect();
    assert_eq!(aging, expect);
}

#[test]
fn a_panicking_actor_is_reported_and_does_not_hang_pause() {
    struct Boom;
    impl HostMmu for Boom {
        type Error = String;
        fn memslot_views(&self) -> Vec<SlotView> {
            slots()
        }
        fn unmap_hva_range(&self, _: Hva, _: Hva) -> u64 {
            panic!("boom")
        }
        fn invalidate_range_start(&self, _: Hva, _: Hva) {}
        fn invalidate_range_end(&self, _: Hva, _: Hva) {}
        fn unmap_gfn_range(&self, _: SlotId, _: Gfn, _: Gfn) -> u64 {
            0
        }
        fn host_page_in(&self, _: Hva, _: Hva) {}
        fn age_gfn(&self, _: SlotId, _: Gfn, _: Gfn) -> bool {
            false
        }
        fn test_age_gfn(&self, _: SlotId, _: Gfn, _: Gfn) -> bool {
            false
        }
        fn get_dirty_log(&self, _: SlotId) -> Result<Vec<u64>, String> {
            Err("gone".into())
        }
        fn clear_dirty_log(&self, _: SlotId, _: u64, _: &[u64]) -> Result<(), String> {
            Ok(())
        }
    }
    let cfg = ActorConfig {
        ops_per_phase: NonZeroU64::new(3),
        ..ActorConfig::all(1)
    };
    let r = thread::scope(|s| {
        let actors = HostActors::spawn(s, &Boom, &cfg);
        actors.end_phase();
        actors.end_phase();
        actors.pause();
        actors.resume();
        actors.stop()
    });
    assert_eq!(
        r,
        Err(ActorPanicked {
            kind: ActorKind::MemoryPressure
        })
    );
}
