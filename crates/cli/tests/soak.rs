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
    ] {
        let out = revmap(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
}
