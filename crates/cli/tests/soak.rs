//! `revmap soak`: JSON report, exit status, bad arguments.
mod common;

use common::revmap;

#[test]
fn soak_json_reports_every_step_checked() {
    let out = revmap(&[
        "soak", "--seeds", "3", "--steps", "200", "--jobs", "2", "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["mmu"], "hpt");
    assert_eq!(v["seeds"], 3);
    assert_eq!(v["steps"], 600);
    assert_eq!(v["checks"], 600);
    assert_eq!(v["failures"].as_array().map(Vec::len), Some(0));
    assert_eq!(v["jobs"], 2);
}

/// The JSON report lines of `revmap soak ARGS --json`, one per MMU.
fn soak_json(args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["soak"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = revmap(&all);
    assert!(out.status.success(), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A clean soak report of `mmu`: every step of every seed run and checked.
fn assert_clean(v: &serde_json::Value, mmu: &str, seeds: u64, steps: u64) {
    assert_eq!(v["mmu"], mmu, "{v}");
    assert_eq!(v["seeds"], seeds, "{v}");
    assert_eq!(v["steps_per_seed"], steps, "{v}");
    assert_eq!(v["steps"], seeds * steps, "{v}");
    assert_eq!(v["checks"], seeds * steps, "{v}");
    assert_eq!(v["failures"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");
}

#[test]
fn soak_x86_and_nested_json_report_every_step_checked() {
    let x86 = soak_json(&["--mmu", "x86", "--seeds", "2", "--steps", "300"]);
    assert_eq!(x86.len(), 1);
    assert_clean(&x86[0], "x86", 2, 300);
    let nested = soak_json(&["--mmu", "nested", "--seeds", "3", "--steps", "300"]);
    assert_eq!(nested.len(), 1);
    assert_clean(&nested[0], "nested", 3, 300);
}

#[test]
fn soak_all_runs_each_mmu_once_in_order() {
    let r = soak_json(&["--mmu", "all,hpt", "--seeds", "2", "--steps", "150"]);
    let mmus: Vec<&str> = r.iter().filter_map(|v| v["mmu"].as_str()).collect();
    assert_eq!(mmus, ["hpt", "x86", "nested"]);
    for (v, mmu) in r.iter().zip(mmus) {
        assert_clean(v, mmu, 2, 150);
    }
}

#[test]
fn soak_rejects_bad_arguments() {
    for args in [
        &["soak", "--seeds", "0"][..],
        &["soak", "--steps", "0"],
        &["soak", "--mmu", "sparc"],
        &[
            "soak",
            "--first-seed",
            "18446744073709551615",
            "--seeds",
            "2",
        ],
        &["soak", "--scenario", "/nonexistent.toml"],
        &["soak", "--mmu", "x86", "--scenario", "/nonexistent.toml"],
    ] {
        let out = revmap(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
}

#[test]
fn soak_scenario_file_is_for_one_mmu() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scenarios/nested.toml");
    let out = revmap(&["soak", "--mmu", "hpt,nested", "--scenario", file]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("one MMU"),
        "{out:?}"
    );
    let v = soak_json(&[
        "--mmu",
        "nested",
        "--scenario",
        file,
        "--seeds",
        "1",
        "--steps",
        "100",
    ]);
    assert_clean(&v[0], "nested", 1, 100);
}
