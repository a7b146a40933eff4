//! `revmap run --mmu nested`: the JSON report's keys with zero invariant violations,
//! deterministic mode reproduces a seed, the hostile-L1 scenario stays within the
//! nested rmap bound, plots decode, a bad scenario exits 2.
//!
//! No test is bounded by wall-clock time: threaded runs stop after an access count
//! (`--hcalls`), deterministic ones after a step count.

mod common;

use common::{check_plots, no_panic, revmap, stderr};

/// `revmap run --mmu nested ARGS`.
fn nested(args: &[&str]) -> std::process::Output {
    let mut all = vec!["run", "--mmu", "nested"];
    all.extend_from_slice(args);
    revmap(&all)
}

/// The JSON report of `revmap run --mmu nested ARGS --json`, which must succeed.
fn json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let o = nested(&all);
    no_panic(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn u(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut x = v;
    for k in path {
        x = &x[*k];
    }
    x.as_u64()
        .unwrap_or_else(|| panic!("{path:?} missing or not a count in {v}"))
}

#[test]
fn threaded_json_report_has_the_nested_keys_and_no_violation() {
    let v = json(&["--hcalls", "4000", "--seed", "3"]);
    assert_eq!(v["mmu"], "nested");
    assert_eq!(
        u(&v, &["invariant_violations"]),
        0,
        "{}",
        v["first_violation"]
    );
    assert!(
        u(&v, &["invariant_checks"]) >= 1,
        "the final check at least"
    );
    assert!(u(&v, &["accesses"]) >= 4000);
    for k in [
        "nested_faults",
        "shadow_hits",
        "rmap_invalidations",
        "rmap_entries_max_per_gfn",
        "rmap_bytes_max",
        "rmap_bound",
    ] {
        u(&v, &["nested", k]);
    }
    assert!(u(&v, &["nested", "nested_faults"]) > 0);
    assert!(u(&v, &["l1", "maps"]) > 0 && u(&v, &["l1", "ok"]) > 0);
    assert_eq!(u(&v, &["l1", "mismatches"]), 0);
    assert!(v["host_ops"]["age_gfn"].is_u64());
}

#[test]
fn deterministic_mode_reproduces_a_seed_with_the_checker_every_step() {
    let run = |seed| json(&["--deterministic", "--steps", "300", "--seed", seed]);
    let (a, b, c) = (run("4"), run("4"), run("5"));
    assert_eq!(u(&a, &["invariant_checks"]), 300);
    assert_eq!(
        u(&a, &["invariant_violations"]),
        0,
        "{}",
        a["first_violation"]
    );
    assert_eq!(a["digest"], b["digest"]);
    assert_eq!(a["l1"], b["l1"]);
    assert_ne!(a["digest"], c["digest"], "another seed, another schedule");
}

#[test]
fn hostile_scenario_shows_the_bound_holding() {
    let hostile = ["--scenario", "hostile", "--deterministic", "--steps"];
    let v = json(&[&hostile[..], &["1500"]].concat());
    assert_eq!(v["hostile"], true);
    assert_eq!(
        u(&v, &["invariant_violations"]),
        0,
        "{}",
        v["first_violation"]
    );
    let bound = u(&v, &["nested", "rmap_bound"]);
    let pairs = u(&v, &["l1", "hostile_pairs"]);
    assert!(pairs > 10 * bound, "{pairs} pairs");
    assert_eq!(u(&v, &["nested", "rmap_entries_max_per_gfn"]), bound);
    assert!(u(&v, &["nested", "rmap_bytes_max"]) <= 8 + (bound - 1) * 16);
    let o = nested(&[&hostile[..], &["200"]].concat());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("hostile L1:") && out.contains("invariant_violations 0"),
        "{out}"
    );
}

#[test]
fn plot_writes_the_nested_plots() {
    let dir = std::env::temp_dir().join(format!("revmap-run-nested-{}", std::process::id()));
    let o = nested(&[
        "--deterministic",
        "--steps",
        "300",
        "--plot",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    check_plots(&o, &dir, &["nested_rmap", "nested_throughput"]);
    let svg = std::fs::read_to_string(dir.join("nested_rmap.svg")).unwrap();
    assert!(
        svg.contains("bound (64 entries per L1 gfn)"),
        "the bound is drawn"
    );
}

#[test]
fn bad_nested_scenarios_exit_2_with_a_message() {
    let o = nested(&["--scenario", "no-such-scenario"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no-such-scenario"), "{}", stderr(&o));
    let f = std::env::temp_dir().join(format!("revmap-nested-bad-{}.toml", std::process::id()));
    std::fs::write(&f, "[l1]\nvcpus = 0\n").unwrap();
    let o = nested(&["--scenario", f.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("l1.vcpus"), "{}", stderr(&o));
    no_panic(&o);
}
