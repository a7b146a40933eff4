//! `revmap bench`: each subcommand with `--quick --json` exits 0 and prints rows with
//! the documented keys; bad flags and missing files exit 2 without a panic.

use serde_json::Value;
use std::process::{Command, Output};

fn revmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_revmap"))
        .args(args)
        .output()
        .expect("run revmap")
}

/// Runs a quick JSON bench, checks exit 0 and returns its rows.
fn rows(args: &[&str]) -> Vec<serde_json::Map<String, Value>> {
    let o = revmap(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let out = String::from_utf8(o.stdout).unwrap();
    let rows: Vec<_> = out
        .lines()
        .map(|l| match serde_json::from_str::<Value>(l).unwrap() {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        })
        .collect();
    assert!(!rows.is_empty(), "{args:?}: no rows");
    rows
}

fn has_keys(row: &serde_json::Map<String, Value>, keys: &[&str]) {
    for k in keys {
        assert!(row.contains_key(*k), "missing {k} in {row:?}");
    }
}

#[test]
fn bench_rmap_quick_json() {
    let rows = rows(&["bench", "rmap", "--quick", "--json"]);
    for r in &rows {
        has_keys(
            r,
            &[
                "design",
                "baseline",
                "op",
                "chain_len",
                "ns_per_op",
                "bytes_per_entry",
            ],
        );
        assert!(r["ns_per_op"].as_f64().unwrap() > 0.0, "{r:?}");
        assert!(r["bytes_per_entry"].as_f64().unwrap() > 0.0, "{r:?}");
    }
    // Six designs x five lengths x (iterate, count), plus the pair for all but nested.
    assert_eq!(rows.len(), 6 * 5 * 2 + 5 * 5);
    for design in [
        "ring",
        "pte_list",
        "nested",
        "mutex_hashmap",
        "slab_list",
        "smallvec_frames",
    ] {
        for len in [1, 2, 14, 100, 1000] {
            assert!(
                rows.iter().any(|r| r["design"] == design
                    && r["chain_len"] == len
                    && r["op"] == "iterate"),
                "{design} {len}"
            );
        }
    }
    assert!(!rows
        .iter()
        .any(|r| r["design"] == "nested" && r["op"] == "link_unlink"));
}

#[test]
fn bench_replay_quick_json_uses_the_vendored_traces() {
    let rows = rows(&["bench", "replay", "--quick", "--json"]);
    assert_eq!(rows.len(), 4, "two traces x two flavours");
    for r in &rows {
        has_keys(
            r,
            &[
                "file",
                "flavour",
                "calls",
                "hcalls_per_s_median",
                "setup_ms_median",
                "replay_minor_faults_median",
                "parse_mb_per_s",
            ],
        );
        assert!(r["calls"].as_u64().unwrap() > 1000, "{r:?}");
        assert!(r["setup_ms_median"].as_f64().unwrap() > 0.0, "{r:?}");
        assert!(r["hcalls_per_s_median"].as_f64().unwrap() > 0.0, "{r:?}");
        assert!(r["parse_mb_per_s"].as_f64().unwrap() > 0.0, "{r:?}");
    }
    assert!(rows
        .iter()
        .any(|r| r["file"].as_str().unwrap().ends_with("boot.txt.gz") && r["flavour"] == "qemu"));
}

#[test]
fn bench_replay_named_file_and_flavour() {
    let boot = concat!(env!("CARGO_MANIFEST_DIR"), "/../../traces/boot.txt.gz");
    let rows = rows(&[
        "bench",
        "replay",
        "--quick",
        "--json",
        "--flavour",
        "kvm",
        "--runs",
        "1",
        boot,
    ]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["flavour"], "kvm");
    assert_eq!(rows[0]["calls"], 86327);
}

#[test]
fn bench_scaling_quick_json_has_a_row_per_thread_count() {
    let rows = rows(&[
        "bench",
        "scaling",
        "--quick",
        "--json",
        "--max-threads",
        "3",
    ]);
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (i, r) in rows.iter().enumerate() {
        has_keys(
            r,
            &[
                "bench",
                "threads",
                "hcalls_per_s_median",
                "ratio_to_1",
                "nproc",
                "loadavg_1m",
            ],
        );
        assert_eq!(r["bench"], "scaling");
        assert_eq!(r["threads"].as_u64(), Some(i as u64 + 1));
        assert!(r["hcalls_per_s_median"].as_f64().unwrap() > 0.0, "{r:?}");
    }
    assert_eq!(rows[0]["ratio_to_1"].as_f64(), Some(1.0));
}

#[test]
fn bench_host_quick_json() {
    let rows = rows(&["bench", "host", "--quick", "--json"]);
    for r in &rows {
        has_keys(
            r,
            &[
                "op",
                "case",
                "slot_bytes",
                "units",
                "ms_median",
                "ns_per_unit",
                "ratio_to_raw_scan",
            ],
        );
    }
    let ops: Vec<&str> = rows.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(ops.iter().filter(|o| **o == "unmap_gfn_range").count(), 2);
    assert_eq!(ops.iter().filter(|o| **o == "raw_scan").count(), 1);
    assert_eq!(ops.iter().filter(|o| **o == "dirty_log_harvest").count(), 4);
    for r in rows.iter().filter(|r| r["op"] == "dirty_log_harvest") {
        assert!(r["ratio_to_raw_scan"].as_f64().unwrap() > 0.0, "{r:?}");
    }
}

#[test]
fn bench_resize_quick_json_and_table() {
    let rows = rows(&["bench", "resize", "--quick", "--json"]);
    assert_eq!(rows.len(), 3, "orders 20..=22 with --quick");
    for (r, order) in rows.iter().zip(20..) {
        has_keys(
            r,
            &[
                "order",
                "stop_the_world_pause_us",
                "precopy_pause_us",
                "ratio",
            ],
        );
        assert_eq!(r["order"], order);
        assert_eq!(r["repeats"], 1);
        assert!(
            r["stop_the_world_pause_us"].as_f64().unwrap() > 0.0,
            "{r:?}"
        );
    }
    let o = revmap(&["bench", "resize", "--quick", "--max-order", "20"]);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("HPT resize commit pause"), "{out}");
    assert_eq!(lines.len(), 3, "title, header, one row: {out}");
    assert_eq!(
        lines[1].chars().count(),
        lines[2].chars().count(),
        "aligned: {out}"
    );
}

#[test]
fn bench_tables_without_json() {
    let o = revmap(&["bench", "host", "--quick"]);
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(
        out.contains("unmap_gfn_range") && out.contains("x raw scan"),
        "{out}"
    );
}

#[test]
fn bad_flags_and_inputs_exit_2() {
    for args in [
        &["bench"][..],
        &["bench", "nope"],
        &["bench", "rmap", "--bogus"],
        &["bench", "host", "--quick", "extra"],
        &["bench", "replay", "--runs", "0"],
        &["bench", "replay", "--flavour", "xen"],
        &["bench", "replay", "/nonexistent/trace.gz"],
        &["bench", "scaling", "--max-threads", "0"],
    ] {
        let o = revmap(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!err.is_empty(), "{args:?}: no message");
    }
}

/// `revmap bench x86` / `nested`: every documented row, a `bench` key on each, the
/// translate row's two figures from the same run, the memory rows against KVM's.
#[test]
fn bench_x86_and_nested_quick_json() {
    for (which, benches) in [
        (
            "x86",
            &[
                "fault",
                "translate",
                "write_protect",
                "unmap",
                "age",
                "memory",
            ][..],
        ),
        ("nested", &["fault", "translate", "unmap", "memory"]),
    ] {
        let rows = rows(&["bench", which, "--quick", "--json"]);
        for b in benches {
            assert!(rows.iter().any(|r| r["bench"] == *b), "{which}: {b}");
        }
        for r in &rows {
            has_keys(r, &["bench", "case", "units", "unit", "value", "ratio"]);
            assert!(r["value"].as_f64().unwrap() > 0.0, "{r:?}");
            assert!(r["units"].as_u64().unwrap() > 0, "{r:?}");
        }
        let t = rows.iter().find(|r| r["bench"] == "translate").unwrap();
        let s = t["shadow_ns"].as_f64().unwrap();
        let w = t["walk_2d_ns"].as_f64().unwrap();
        assert!(s > 0.0 && w > 0.0, "{t:?}");
        assert_eq!(t["ratio"].as_f64().unwrap(), s / w);
        for m in rows.iter().filter(|r| r["bench"] == "memory") {
            assert!(m["baseline"].as_f64().unwrap() > 0.0, "{m:?}");
        }
    }
    let o = revmap(&["bench", "x86", "--quick"]);
    assert_eq!(o.status.code(), Some(0));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.starts_with("x86 shadow MMU\n") && s.contains("walk_2d"),
        "{s}"
    );
}
