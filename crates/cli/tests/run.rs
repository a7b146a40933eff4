//! `revmap run`: JSON report with zero invariant violations, flags override the
//! scenario, bad scenarios and flags exit 2 with a clear message and no panic.

use std::path::PathBuf;
use std::process::{Command, Output};

fn revmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_revmap"))
        .args(args)
        .output()
        .unwrap()
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("revmap-run-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

const SMALL: &str = "name = \"small\"\ncheck_interval_ms = 300\n[guest]\nram_mib = 256\n\
                     vcpus = 2\n[[resize]]\nat = 0.3\norder_delta = 1\n[[resize]]\nat = 0.6\n\
                     order_delta = -2\n";

#[test]
fn json_report_has_the_promised_fields_and_no_violation() {
    let f = temp_file("small.toml", SMALL);
    let o = revmap(&[
        "run",
        "--scenario",
        f.to_str().unwrap(),
        "--duration",
        "1.5",
        "--seed",
        "5",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in [
        "hcalls",
        "host_ops",
        "invariant_violations",
        "latency_ns",
        "resize",
        "memory",
        "rings",
        "migration",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    assert_eq!(v["invariant_violations"], 0, "{v}");
    assert!(v["invariant_checks"].as_u64().unwrap() >= 2);
    assert_eq!(v["seed"], 5);
    assert_eq!(v["scenario"], "small");
    assert!(v["hcalls"]["H_ENTER"].as_u64().unwrap() > 1000);
    assert!(v["latency_ns"]["all"]["p99"].as_u64().unwrap() > 0);
    let rs = v["resize"].as_array().unwrap();
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[0]["commit_ret"], 0, "{v}");
    assert_eq!(v["hpt_order"][0], 21);
}

#[test]
fn bad_scenarios_and_flags_exit_2_with_a_message() {
    let bad = temp_file("bad.toml", "[guest]\nvcpus = 0\n");
    for args in [
        vec!["run", "--scenario", bad.to_str().unwrap()],
        vec!["run", "--scenario", "/nonexistent/revmap.toml"],
        vec!["run", "--duration", "0"],
        vec!["run", "--duration", "abc"],
        vec!["run", "--bogus"],
    ] {
        let o = revmap(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            !err.is_empty() && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    let o = revmap(&["run", "--scenario", bad.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("guest.vcpus"));
}

#[test]
fn plot_writes_svg_and_png_files() {
    let f = temp_file("plot.toml", SMALL);
    let dir = std::env::temp_dir().join(format!("revmap-plots-{}", std::process::id()));
    let o = revmap(&[
        "run",
        "--scenario",
        f.to_str().unwrap(),
        "--duration",
        "1",
        "--plot",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for name in ["latency", "rings", "dirty_pages", "throughput"] {
        let svg = std::fs::read_to_string(dir.join(format!("{name}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.len() > 1000, "{name}");
    }
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("invariant_violations 0"), "{s}");
}

#[test]
fn deterministic_mode_reproduces_a_seed() {
    let args = [
        "run",
        "--deterministic",
        "--steps",
        "300",
        "--seed",
        "4",
        "--json",
    ];
    let a: serde_json::Value = serde_json::from_slice(&revmap(&args).stdout).unwrap();
    let b: serde_json::Value = serde_json::from_slice(&revmap(&args).stdout).unwrap();
    assert_eq!(a["digest"], b["digest"]);
    assert_eq!(a["invariant_violations"], 0);
    assert_eq!(a["invariant_checks"], 300);
    assert_eq!(a["deterministic"], true);
}
