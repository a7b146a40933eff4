//! `revmap run --mmu x86`: the JSON report's keys with zero invariant violations (the
//! shadow MMU checker and the guest's own check of every access), deterministic
//! reproduction, plots that decode, and flag errors that exit 2.
//!
//! No test here is bounded by wall-clock time: runs stop after an access count
//! (`--accesses`) or a step count (`--deterministic --steps`).

mod common;

use common::{no_panic, revmap, stderr};
use std::path::PathBuf;

fn temp_file(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("revmap-run-x86-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

/// A small guest, frequent checks, short dirty-logging passes.
const SMALL: &str = "name = \"x86-small\"\ncheck_interval_ms = 200\n[guest]\nram_mib = 256\n\
                     vcpus = 2\n[migration]\nrounds = 2\npause_ticks = 1\n\
                     [deterministic]\nram_mib = 64\n";

/// `revmap run --mmu x86 --scenario FILE` followed by `rest`.
fn run_x86(scenario: &std::path::Path, rest: &[&str]) -> std::process::Output {
    let mut args = vec![
        "run",
        "--mmu",
        "x86",
        "--scenario",
        scenario.to_str().unwrap(),
    ];
    args.extend_from_slice(rest);
    revmap(&args)
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

#[test]
fn json_report_has_the_promised_keys_and_no_violation() {
    let f = temp_file("small.toml", SMALL);
    let o = run_x86(&f, &["--accesses", "40000", "--seed", "3", "--json"]);
    no_panic(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["mmu"], "x86");
    assert_eq!(v["scenario"], "x86-small");
    assert_eq!(v["seed"], 3);
    assert_eq!(v["vcpus"], 2);
    assert_eq!(v["invariant_violations"], 0, "{v}");
    assert_eq!(v["guest"]["mismatches"], 0, "{v}");
    assert!(v["invariant_checks"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["accesses"].as_u64().unwrap() >= 40000, "{v}");
    assert!(v["elapsed_s"].as_f64().unwrap() > 0.0, "{v}");
    let shadow = &v["shadow"];
    assert!(shadow["page_faults"].as_u64().unwrap() > 0, "{v}");
    assert!(shadow["write_protected_gfns"].is_u64(), "{v}");
    assert!(v["guest"]["forks"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["host_actors"].as_array().unwrap().len(), 3, "{v}");
    let h = &v["host_ops"];
    for k in [
        "unmap_hva_range",
        "age_gfn",
        "test_age_gfn",
        "get_dirty_log",
    ] {
        assert!(h[k].is_u64(), "{k}: {v}");
    }
    assert!(h["unmap_hva_range"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["direct_map"]["pages_2m"], 128, "256 MiB in 2 MiB pages");
}

#[test]
fn deterministic_mode_reproduces_a_seed_with_a_check_every_step() {
    let f = temp_file("det.toml", SMALL);
    let args = ["--deterministic", "--steps", "400", "--seed", "4", "--json"];
    let (a, b) = (run_x86(&f, &args), run_x86(&f, &args));
    assert!(a.status.success(), "{}", stderr(&a));
    let (a, b) = (json(&a), json(&b));
    assert_eq!(a["digest"], b["digest"]);
    assert_eq!(a["shadow"], b["shadow"]);
    assert_eq!(a["invariant_violations"], 0, "{a}");
    assert_eq!(a["invariant_checks"], 400);
    assert_eq!(a["deterministic"], true);
    assert_eq!(a["steps"], 400);
}

#[test]
fn plot_writes_an_svg_and_a_png_that_decodes() {
    let f = temp_file("plot.toml", SMALL);
    let dir = std::env::temp_dir().join(format!("revmap-run-x86-{}-plots", std::process::id()));
    let o = run_x86(
        &f,
        &[
            "--deterministic",
            "--steps",
            "300",
            "--plot",
            dir.to_str().unwrap(),
        ],
    );
    no_panic(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    let svg = std::fs::read_to_string(dir.join("x86_shadow.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("write-protected"),
        "{svg:.200}"
    );
    if stderr(&o).contains("no TrueType font") {
        return;
    }
    let bytes = std::fs::read(dir.join("x86_shadow.png")).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "PNG signature");
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (900, 810));
    let px = info.color_type.samples();
    let inked = buf[..info.buffer_size()]
        .chunks(px)
        .filter(|p| p[..3].iter().any(|&c| c < 200))
        .count();
    assert!(inked > 1000, "something is drawn: {inked} pixels");
}

#[test]
fn bad_flags_and_scenarios_exit_2_with_a_message() {
    let bad = temp_file("bad.toml", "[guest]\nbacking_page_shift = 16\n");
    for (args, want) in [
        (
            vec!["run", "--mmu", "x86", "--scenario", bad.to_str().unwrap()],
            "guest.backing_page_shift",
        ),
        (vec!["run", "--mmu", "x86", "--hcalls", "5"], "--accesses"),
        (vec!["run", "--accesses", "5"], "--mmu x86"),
        (vec!["run", "--mmu", "x86", "--accesses", "0"], "--accesses"),
        (
            vec!["run", "--mmu", "x86", "--deterministic", "--accesses", "5"],
            "--accesses",
        ),
        (vec!["run", "--mmu", "bogus"], "--mmu"),
        // --mmu nested is built (crates/cli/tests/run_nested.rs); here its bad
        // scenario name, in place of the placeholder error of s3-x86run.
        (
            vec!["run", "--mmu", "nested", "--scenario", "no-such-scenario"],
            "embedded nested scenarios",
        ),
    ] {
        let o = revmap(&args);
        let err = stderr(&o);
        no_panic(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}: no report");
    }
    let o = revmap(&["run", "--mmu", "x86", "--scenario", bad.to_str().unwrap()]);
    assert!(stderr(&o).contains(bad.to_str().unwrap()), "names the file");
}
