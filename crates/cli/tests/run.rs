//! `revmap run`: JSON report with zero invariant violations, flags override the
//! scenario, bad scenarios and flags exit 2 with a clear message and no panic, output
//! paths are checked before the run, SIGINT keeps the report, plots decode.
//!
//! No test here is bounded by wall-clock time: runs stop after a hypercall count
//! (`--hcalls`) or a step count (`--deterministic --steps`), and the SIGINT tests wait
//! for the run to say it started, whatever the machine's speed.

mod common;

use common::check_plots;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn revmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_revmap"))
        .args(args)
        .output()
        .unwrap()
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("revmap-run-{}-{name}", std::process::id()))
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let p = temp_path(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const SMALL: &str = "name = \"small\"\ncheck_interval_ms = 300\n[guest]\nram_mib = 256\n\
                     vcpus = 2\nhpt_order = 0\nbacking_page_shift = 16\n[[resize]]\nat = 0.3\norder_delta = 1\n[[resize]]\nat = 0.6\n\
                     order_delta = -2\n";

/// Runs `revmap run` on the `SMALL` scenario (written to `file`) for 300000 hypercalls,
/// with `extra` arguments after.
fn run_small(file: &str, extra: &[&str]) -> Output {
    let f = temp_file(file, SMALL);
    let mut args = vec![
        "run",
        "--scenario",
        f.to_str().unwrap(),
        "--hcalls",
        "300000",
    ];
    args.extend_from_slice(extra);
    revmap(&args)
}

#[test]
fn json_report_has_the_promised_fields_and_no_violation() {
    let o = run_small("small.toml", &["--seed", "5", "--json"]);
    let err = stderr(&o);
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
    assert_eq!(v["interrupted"], false, "{v}");
    // One check after each of the two resizes and one at the end, at least.
    assert!(v["invariant_checks"].as_u64().unwrap() >= 3, "{v}");
    assert_eq!(v["seed"], 5);
    assert_eq!(v["scenario"], "small");
    assert!(v["hcalls_total"].as_u64().unwrap() >= 300000, "{v}");
    assert!(v["hcalls"]["H_ENTER"].as_u64().unwrap() > 1000);
    assert!(v["latency_ns"]["all"]["p99"].as_u64().unwrap() > 0);
    assert!(v["latency_ns"]["H_ENTER"]["count"].as_u64().unwrap() > 1000);
    let rs = v["resize"].as_array().unwrap();
    assert_eq!(
        rs.len(),
        2,
        "both resizes happen within the hypercall count"
    );
    assert_eq!(rs[0]["commit_ret"], 0, "{v}");
    assert_eq!(v["hpt_order"][0], 21);
    // The units the report promises: 4 KiB frames, 16 per 64 KiB backing page.
    assert_eq!(v["migration"]["frames_per_backing_page"], 16);
    assert_eq!(v["migration"]["guest_frames"], 65536);
    let m = &v["memory"];
    assert_eq!(
        m["hpte_slots"].as_u64().unwrap() * 16,
        m["hpt_bytes"].as_u64().unwrap()
    );
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
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            !err.is_empty() && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    let o = revmap(&["run", "--scenario", bad.to_str().unwrap()]);
    let err = stderr(&o);
    assert!(err.contains("guest.vcpus"), "{err}");
    assert!(err.contains(bad.to_str().unwrap()), "names the file: {err}");
}

/// Issue 14 point 7: the flag is named, negative numbers are values, not flags.
#[test]
fn flag_errors_name_the_flag() {
    for (args, want) in [
        (&["run", "--duration", "0"][..], "--duration"),
        (&["run", "--duration", "-1"], "--duration"),
        (&["run", "--seed", "-1"], "--seed"),
        (&["run", "--hcalls", "0"], "--hcalls"),
        (&["run", "--deterministic", "--steps", "0"], "--steps"),
    ] {
        let o = revmap(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("unexpected argument"), "{args:?}: {err}");
        assert!(!err.contains("duration_secs"), "{args:?}: {err}");
    }
    let o = revmap(&["run", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0));
    for want in [
        "30 s",
        "seed 1",
        "Examples",
        "Exit status",
        "130",
        "--hcalls",
    ] {
        assert!(help.contains(want), "{want}: {help}");
    }
}

/// Issue 14 point 8: nothing the run would ignore or misuse is accepted silently.
#[test]
fn silent_acceptance_is_gone() {
    // --duration means nothing in deterministic mode.
    let o = revmap(&["run", "--deterministic", "--duration", "5"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--duration") && err.contains("--deterministic"),
        "{err}"
    );
    // All-zero weights.
    for (text, field) in [
        (
            "[workload.mix]\ntouch = 0\nmunmap_page = 0\nmunmap_range = 0\nmprotect = 0\n\
             fork = 0\nexec = 0\nexit = 0\n",
            "workload.mix",
        ),
        (
            "[workload]\npage_size_weights = [0, 0, 0]\n",
            "workload.page_size_weights",
        ),
    ] {
        let f = temp_file("zero.toml", text);
        let o = revmap(&["run", "--scenario", f.to_str().unwrap()]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(field), "{err}");
        assert!(err.contains(f.to_str().unwrap()), "names the file: {err}");
        assert!(o.stdout.is_empty());
    }
    // A 1 TiB guest with QEMU's HPT order for it (33: 8 GiB, as much again for the
    // revmap) is refused before anything is allocated (no report, no run).
    let f = temp_file("huge.toml", "[guest]\nram_mib = 1048576\nhpt_order = 0\n");
    let o = revmap(&["run", "--scenario", f.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("guest.ram_mib") && err.contains("GiB"),
        "{err}"
    );
    assert!(!err.contains("running scenario"), "{err}");
    assert!(o.stdout.is_empty());
    // A scenario without `name` is named after its file.
    let f = temp_path("unnamed-scenario.toml");
    std::fs::write(&f, "[deterministic]\nsteps = 20\n").unwrap();
    let o = revmap(&[
        "run",
        "--deterministic",
        "--scenario",
        f.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let stem = f.file_stem().unwrap().to_str().unwrap();
    assert_eq!(v["scenario"], stem, "{v}");
}

/// Issue 14 point 1: an unusable --plot directory fails before the run.
#[test]
fn unwritable_plot_dir_fails_before_the_run() {
    // A directory below a regular file can never be created (even by root).
    let file = temp_file("not-a-dir", "x");
    let dir = file.join("plots");
    let o = revmap(&[
        "run",
        "--hcalls",
        "1000000000000",
        "--plot",
        dir.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(dir.to_str().unwrap()), "{err}");
    assert!(err.starts_with("revmap run: error: "), "{err}");
    assert!(
        !err.contains("running scenario"),
        "the run never started: {err}"
    );
    assert!(o.stdout.is_empty(), "no report: nothing ran");
}

#[test]
fn plot_writes_svg_and_png_files_that_decode() {
    let dir = temp_path("plots");
    let o = run_small("plot.toml", &["--json", "--plot", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["invariant_violations"], 0);
    // The ring chart draws bars for the frames mapped at the end; a short run can end
    // with none (the guest's processes have just exited), and then the chart says so.
    let mapped = v["rings"]["chains"].as_u64().unwrap_or(0) > 0;
    if mapped {
        check_plots(&o, &dir, &["latency", "rings", "dirty_pages", "throughput"]);
    } else {
        check_plots(&o, &dir, &["latency", "dirty_pages", "throughput"]);
        let svg = std::fs::read_to_string(dir.join("rings.svg")).unwrap();
        assert!(svg.contains("no HPTE mapped guest memory"), "{svg}");
    }
    // Per-type latency curves: each hypercall type called is in the legend.
    let svg = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
    for k in ["H_ENTER", "H_REMOVE", "H_PROTECT", "H_BULK_REMOVE"] {
        assert!(svg.contains(k), "{k}");
    }
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
    assert_eq!(a["interrupted"], false);
}

/// Starts `revmap ARGS` and sends it SIGINT once it says the run started (the handler is
/// installed before that line); returns its exit code, stdout and stderr.
fn interrupt(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_revmap"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "exited before starting: {seen}"
        );
        seen.push_str(&line);
        if line.contains("running scenario") {
            break;
        }
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    err.read_to_string(&mut seen).unwrap();
    let status = child.wait().unwrap();
    (status.code(), out, seen)
}

/// Issue 14 point 3, deterministic mode: a run far too long to finish is stopped.
#[test]
fn sigint_stops_a_deterministic_run_with_a_partial_report() {
    let (code, out, err) = interrupt(&["run", "--deterministic", "--steps", "100000000", "--json"]);
    assert_eq!(code, Some(130), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["interrupted"], true, "{v}");
    assert_eq!(v["invariant_violations"], 0, "{v}");
    // The checker ran after every step that was done, and far fewer were done.
    let checks = v["invariant_checks"].as_u64().unwrap();
    assert!((1..100_000_000).contains(&checks), "{checks}");
}

/// Issue 14 point 3, threaded mode: actors stop, the checker runs, the report prints.
#[test]
fn sigint_stops_a_threaded_run_with_a_partial_report() {
    let f = temp_file("sigint.toml", SMALL);
    let (code, out, err) = interrupt(&[
        "run",
        "--scenario",
        f.to_str().unwrap(),
        "--hcalls",
        "1000000000000",
    ]);
    assert_eq!(code, Some(130), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.contains("INTERRUPTED"), "{out}");
    assert!(out.contains("invariant_violations 0"), "{out}");
    assert!(out.contains("invariant_checks "), "{out}");
}
