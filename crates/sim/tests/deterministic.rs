//! Deterministic mode: the same seed gives the same event digest (and the same
//! report counts); different seeds give different digests; a few hundred seeds run
//! briefly with the checker after every step and find no violation.

use revmap_sim::det::DeterministicRun;
use revmap_sim::scenario::Scenario;

fn scenario(seed: u64, steps: u64, ram_mib: u64) -> Scenario {
    let mut sc = Scenario {
        seed,
        ..Scenario::default()
    };
    sc.deterministic.steps = steps;
    sc.deterministic.ram_mib = ram_mib;
    sc
}

#[test]
fn same_seed_same_digest() {
    let a = scenario(11, 1000, 64).run_deterministic().unwrap();
    let b = scenario(11, 1000, 64).run_deterministic().unwrap();
    let c = scenario(12, 1000, 64).run_deterministic().unwrap();
    assert_eq!(
        a.verdict.invariant_violations, 0,
        "{:?}",
        a.verdict.first_violation
    );
    assert_eq!(a.verdict.invariant_checks, 1000);
    assert_eq!(a.verdict.digest, b.verdict.digest);
    assert_eq!(a.hcalls, b.hcalls);
    assert_eq!(a.host_ops, b.host_ops);
    assert_eq!(a.rings, b.rings);
    assert_eq!(a.hpt_order, b.hpt_order);
    assert_ne!(a.verdict.digest, c.verdict.digest);
    assert_eq!(a.resize.len(), 2);
    assert!(
        a.resize.iter().all(|r| r.commit_ret == Some(0)),
        "{:?}",
        a.resize
    );
    assert!(a.host_ops.total() > 0 && a.hcalls_total > 500);
}

#[test]
fn a_few_hundred_seeds_briefly() {
    let n: u64 = std::env::var("REVMAP_DET_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    for seed in 0..n {
        let r = scenario(1000 + seed, 80, 32).run_deterministic().unwrap();
        assert_eq!(
            r.verdict.invariant_violations,
            0,
            "seed {}: {:?}",
            1000 + seed,
            r.verdict.first_violation
        );
    }
}

#[test]
fn minimise_returns_none_for_a_passing_run() {
    assert!(revmap_sim::det::minimise(&scenario(3, 100, 32))
        .unwrap()
        .is_none());
}
