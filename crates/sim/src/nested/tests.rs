//! Tests of the nested simulator: scenarios, deterministic runs (several seeds, 0
//! violations, reproducible digests), the hostile L1's bound, a threaded run.

use super::*;
use crate::det::DeterministicRun;

#[test]
fn embedded_scenarios_equal_the_shipped_files() {
    assert_eq!(
        NestedScenario::from_toml(DEFAULT_NESTED_TOML).unwrap(),
        NestedScenario::default()
    );
    assert_eq!(
        NestedScenario::from_toml(HOSTILE_NESTED_TOML).unwrap(),
        NestedScenario::hostile()
    );
    assert_eq!(
        NestedScenario::embedded("hostile"),
        Some(NestedScenario::hostile())
    );
    assert_eq!(NestedScenario::embedded("nope"), None);
}

#[test]
fn bad_values_name_the_field() {
    let e = NestedScenario::from_toml("[l1]\nvcpus = 0\n").unwrap_err();
    assert!(e.to_string().contains("l1.vcpus"), "{e}");
    let e = NestedScenario::from_toml("[l1]\nbacking_page_shift = 12\n").unwrap_err();
    assert!(e.to_string().contains("backing_page_shift"), "{e}");
    let e = NestedScenario::from_toml("[l1]\nl2_pages = 100000\n").unwrap_err();
    assert!(e.to_string().contains("l2_pages"), "{e}");
    let e = NestedScenario::from_toml("bogus = 1\n").unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
    // Too many L2s' kernel maps for a small L1.
    let e = NestedScenario::from_toml(
        "[l1]\nram_mib = 64\nvcpus = 8\nl2s_per_vcpu = 8\nkernel_2m_leaves = 8\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("l1.ram_mib"), "{e}");
}

/// A small deterministic scenario: `steps` steps of `sc` on 128 MiB of L1 RAM.
fn small(mut sc: NestedScenario, seed: u64, steps: u64) -> NestedScenario {
    sc.seed = seed;
    sc.deterministic.steps = steps;
    sc
}

#[test]
fn deterministic_runs_find_no_violation_and_reproduce() {
    for seed in [1, 2, 3] {
        let sc = small(NestedScenario::default(), seed, 3000);
        let r = sc.run_deterministic().unwrap();
        assert_eq!(
            r.verdict.invariant_violations, 0,
            "seed {seed}: {:?}",
            r.verdict.first_violation
        );
        assert_eq!(r.verdict.invariant_checks, 3000);
        // The run did what the scenario says: L2s faulted pages in through L1, L1
        // changed its tables, the host worked on L1 memory through the nested rmap.
        assert!(r.l1.ok > 1000 && r.l1.maps > 100, "seed {seed}: {:?}", r.l1);
        assert!(r.l1.exit_nohpte > 0 && r.l1.exit_set_rc > 0, "{:?}", r.l1);
        assert!(r.l1.remaps + r.l1.protects + r.l1.ages + r.l1.unmaps > 0);
        assert!(r.nested.counters.nested_faults > 0 && r.nested.counters.shadow_hits > 0);
        assert!(r.nested.counters.rmap_invalidations > 0, "{:?}", r.nested);
        assert!(r.host_ops.unmap_hva_range > 0 && r.host_ops.get_dirty_log > 0);
        assert_eq!(
            sc.run_deterministic().unwrap().verdict.digest,
            r.verdict.digest
        );
    }
}

#[test]
fn hostile_l1_stays_within_the_bound_and_its_rmap_stops_growing() {
    let sc = small(NestedScenario::hostile(), 1, 4000);
    let r = sc.run_deterministic().unwrap();
    assert_eq!(
        r.verdict.invariant_violations, 0,
        "{:?}",
        r.verdict.first_violation
    );
    let (n, bound) = (r.nested.counters, r.nested.rmap_bound);
    // Far more (lpid, L2 address) pairs reached the page than the bound admits ...
    assert!(r.l1.hostile_pairs > 20 * bound, "{:?}", r.l1);
    assert_eq!(n.rmap_entries_max_per_gfn, bound);
    assert!(n.rmap_reclaimed > r.l1.hostile_pairs / 2, "{n:?}");
    // ... and the rmap memory reached its plateau early: one word of the target
    // page, 8 B plus 16 B per extra entry.
    let cap_bytes = 8 + (bound - 1) * 16;
    assert!(n.rmap_bytes_max <= cap_bytes, "{n:?}");
    let half = r.timeline[r.timeline.len() / 2];
    assert_eq!(
        half.rmap_bytes_max, n.rmap_bytes_max,
        "still growing after half the run"
    );
    assert!(r.timeline.iter().all(|s| s.rmap_entries <= bound));
}

#[test]
fn a_threaded_run_checks_at_quiescent_points() {
    let mut sc = NestedScenario::default();
    sc.l1.ram_mib = 128;
    sc.stop_after_accesses = 20_000;
    sc.check_interval_ms = 100;
    let r = run_nested(&sc, |_| std::ops::ControlFlow::Continue(())).unwrap();
    assert_eq!(
        r.verdict.invariant_violations, 0,
        "{:?}",
        r.verdict.first_violation
    );
    assert!(
        r.verdict.invariant_checks >= 2,
        "periodic checks and the final one"
    );
    assert!(r.accesses >= 20_000 && r.l1.ok > 0);
    assert!(!r.timeline.is_empty());
}

#[test]
fn shrink_keeps_the_smallest_scenario_that_still_fails() {
    // A toy scenario: (steps, actors); it fails at step 5 while actor 3 is present.
    let run = |s: &(u64, Vec<u8>)| -> Result<(Option<u64>, u64), ()> {
        let fails = s.1.contains(&3) && s.0 > 5;
        Ok((fails.then_some(5), s.0))
    };
    let cut = |s: &mut (u64, Vec<u8>), steps| s.0 = steps;
    let smaller = |s: &(u64, Vec<u8>)| {
        (0..s.1.len())
            .map(|i| {
                let mut c = s.clone();
                c.1.remove(i);
                c
            })
            .collect()
    };
    let sc = (100, vec![1, 2, 3, 4]);
    let (small, report) = crate::det::shrink(&sc, run, cut, smaller).unwrap().unwrap();
    assert_eq!(
        small,
        (6, vec![3]),
        "cut after the failing step, every other actor gone"
    );
    assert_eq!(report, 6);
    assert_eq!(
        crate::det::shrink(&(100, vec![1]), run, cut, smaller),
        Ok(None)
    );
}

#[test]
fn soak_runs_every_seed_with_a_check_every_step() {
    use crate::soak::SoakTarget;
    let target = NestedSoak::new(NestedScenario::default());
    assert_eq!(target.name(), "nested");
    let a = target.run_seed(5, 300).unwrap();
    assert_eq!((a.steps, a.checks, a.failure.clone()), (300, 300, None));
    assert_eq!(target.run_seed(5, 300).unwrap(), a, "a seed reproduces");
    crate::soak::assert_soaks_clean(&target);
}
