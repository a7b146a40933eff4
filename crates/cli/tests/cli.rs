//! Runs the built `revmap` binary: exit codes, messages and the JSON shape.

use std::io::Write;
use std::path::PathBuf;
use std::process::Output;

mod common;
use common::{no_panic, revmap, stderr, stdout};

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("revmap-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::File::create(&p)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    p
}

#[test]
fn help_lists_all_subcommands() {
    let o = revmap(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let s = stdout(&o);
    for c in ["run", "replay", "bench"] {
        assert!(s.contains(c), "{s}");
    }
}

#[test]
fn bench_without_a_subcommand_lists_them() {
    let o = revmap(&["bench"]);
    assert_eq!(o.status.code(), Some(2));
    no_panic(&o);
    let e = stderr(&o);
    for c in ["rmap", "replay", "host", "resize"] {
        assert!(e.contains(c), "{e}");
    }
    let o = revmap(&["--help"]);
    assert!(stdout(&o).contains("resize"), "{}", stdout(&o));
}

/// Issue 14 point 6: a binary file is quoted as a short, escaped excerpt.
#[test]
fn a_binary_file_is_quoted_short_and_escaped() {
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.extend(std::iter::repeat_n(0u8, 600));
    elf.extend(b"\x1b[31m\r\x07 more\n");
    let dir = std::env::temp_dir().join(format!("revmap-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("a.out");
    std::fs::write(&p, &elf).unwrap();
    let ps = p.display().to_string();
    let o = revmap(&["replay", &ps]);
    assert_eq!(o.status.code(), Some(2));
    no_panic(&o);
    let e = stderr(&o);
    assert!(e.starts_with("revmap replay: error: "), "{e}");
    assert!(e.contains(&format!("{ps}:1:")), "{e}");
    assert!(e.contains("\\x7fELF"), "escaped: {e}");
    assert_eq!(e.matches(&ps).count(), 1, "the path once: {e}");
    assert!(
        e.bytes().all(|b| b == b'\n' || (0x20..0x7f).contains(&b)),
        "only printable ASCII: {e:?}"
    );
    // At most 40 bytes quoted, each escaped to at most 4 characters.
    assert!(e.len() < 80 + ps.len() + 4 * 40 + 3, "short: {e}");
}

/// Issue 14 point 10: an empty trace is named once, the same way in every subcommand.
#[test]
fn an_empty_trace_is_named_once() {
    let p = temp_file("empty.txt", "");
    let ps = p.display().to_string();
    for (args, prefix) in [
        (vec!["replay", ps.as_str()], "revmap replay: error: "),
        (
            vec!["bench", "replay", ps.as_str()],
            "revmap bench replay: error: ",
        ),
    ] {
        let o = revmap(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = stderr(&o);
        assert!(e.starts_with(prefix), "{args:?}: {e}");
        assert_eq!(e.matches(&ps).count(), 1, "{args:?}: {e}");
    }
}

#[test]
fn bad_flags_exit_2() {
    for args in [
        &["replay", "--flavour", "xen", "x"][..],
        &["replay", "--check-every", "0", "x"],
        &["replay", "--check-every", "abc", "x"],
        &["replay", "--bogus", "x"],
        &["replay"],
    ] {
        let o = revmap(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        no_panic(&o);
        assert!(!stderr(&o).is_empty());
    }
}

#[test]
fn unreadable_file_exits_2_with_its_name() {
    let o = revmap(&["replay", "/nonexistent/boot.txt.gz"]);
    assert_eq!(o.status.code(), Some(2));
    no_panic(&o);
    assert!(
        stderr(&o).contains("/nonexistent/boot.txt.gz"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn malformed_file_exits_2_naming_file_and_line() {
    let p = temp_file("bad.txt", "# header\nHPT_ALLOC shift=0x12\n");
    let ps = p.display().to_string();
    let o = revmap(&["replay", &ps]);
    assert_eq!(o.status.code(), Some(2));
    no_panic(&o);
    let e = stderr(&o);
    assert!(e.contains(&format!("{ps}:2:")), "{e}");
    let o = revmap(&["replay", "--json", &ps]);
    assert_eq!(o.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["file"], ps.as_str());
    assert!(v["error"].as_str().unwrap().contains(":2:"));
    // Garbage bytes, including a fake gzip header.
    let g = temp_file("garbage.gz", "\u{1f}\u{8b}garbage");
    let o = revmap(&["replay", &g.display().to_string()]);
    assert_eq!(o.status.code(), Some(2));
    no_panic(&o);
}

fn trace(name: &str) -> String {
    format!("{}/../../traces/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn real_traces_pass_with_json_shape() {
    for flavour in ["kvm", "qemu"] {
        let o = revmap(&[
            "replay",
            "--json",
            "--flavour",
            flavour,
            "--check-every",
            "50000",
            &trace("boot.txt.gz"),
            &trace("resize.txt.gz"),
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let v = json_lines(&o);
        assert_eq!(v.len(), 2);
        let boot = &v[0];
        assert!(boot["file"].as_str().unwrap().ends_with("boot.txt.gz"));
        assert_eq!(boot["flavour"], flavour);
        assert_eq!(boot["calls"], 86_327);
        assert_eq!(boot["matched"], 86_327);
        assert_eq!(boot["mismatched"], 0);
        assert!(boot["first_mismatch"].is_null());
        assert_eq!(boot["invariant_violations"], 0);
        assert!(boot["seconds"].as_f64().unwrap() > 0.0);
        assert!(boot["masks_applied"].is_object());
        assert!(boot["stopped_at"].is_null());
        assert_eq!(boot["passed"], true);
        let resize = &v[1];
        assert_eq!(resize["mismatched"], 0);
        assert_eq!(resize["calls"], 373_940);
        assert!(resize["stopped_at"].is_null());
        assert_eq!(resize["passed"], true);
    }
    let o = revmap(&[
        "replay",
        "--flavour",
        "qemu",
        "--preparse",
        &trace("resize.txt.gz"),
    ]);
    assert_eq!(o.status.code(), Some(0));
    let s = stdout(&o);
    assert!(
        !s.contains("STOPPED EARLY") && !s.contains("not yet supported"),
        "{s}"
    );
}

/// One H_ENTER whose recorded idx is wrong: an empty PTEG gives slot 0x3d38 (its
/// first), the record says 0x3d39.
const MISMATCH_TRACE: &str = "HPT_ALLOC shift=18\n\
    H_ENTER cpu=0 flags=0x0 ptex=0x3d38 pteh=0x4009287a77000005 ptel=0x11194 -> ret=0 idx=0x3d39\n";

#[test]
fn mismatch_exits_1_and_is_reported() {
    let p = temp_file("mismatch.txt", MISMATCH_TRACE);
    let ps = p.display().to_string();
    let o = revmap(&["replay", "--json", "--flavour", "qemu", &ps]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v = &json_lines(&o)[0];
    assert_eq!(v["mismatched"], 1);
    let m = &v["first_mismatch"];
    assert_eq!(m["line"], 2);
    assert_eq!(m["hcall"], "H_ENTER");
    assert_eq!(m["field"], "r4");
    assert_eq!(m["expected"], "0x3d39");
    assert_eq!(m["got"], "0x3d38");
    let o = revmap(&["replay", &ps]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("first mismatch: line 2: H_ENTER r4: expected 0x3d39, got 0x3d38"));
}

#[test]
fn malformed_record_after_alloc_exits_2_and_other_files_still_run() {
    let p = temp_file(
        "bad2.txt",
        "HPT_ALLOC shift=18\nH_ENTER cpu=0 flags=0x0 ptex=zz pteh=0x1 ptel=0x0 -> ret=0\n",
    );
    let ps = p.display().to_string();
    let o = revmap(&["replay", "--json", &ps, &trace("boot.txt.gz")]);
    assert_eq!(o.status.code(), Some(2));
    no_panic(&o);
    assert!(
        stderr(&o).contains(&format!("{ps}:2: H_ENTER: bad value `zz` for `ptex`")),
        "{}",
        stderr(&o)
    );
    let v = json_lines(&o);
    assert_eq!(v.len(), 2);
    assert!(v[0]["error"].is_string());
    assert_eq!(v[1]["passed"], true);
}

#[test]
fn host_interference_flags_need_the_mode_and_valid_values() {
    for args in [
        &["replay", "--seed", "3", "x"][..],
        &["replay", "--host-phase", "10", "x"],
        &["replay", "--host-ops", "2", "x"],
        &["replay", "--host-interference", "--seed", "-1", "x"],
        &["replay", "--host-interference", "--host-phase", "0", "x"],
        &["replay", "--host-interference", "--host-ops", "0", "x"],
    ] {
        let o = revmap(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        no_panic(&o);
    }
    let o = revmap(&["replay", "--host-interference", "/nonexistent/t.gz"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/nonexistent/t.gz"));
}

#[test]
fn host_interference_reports_host_ops_and_passes_on_the_boot_trace() {
    let o = revmap(&[
        "replay",
        "--json",
        "--host-interference",
        "--seed",
        "7",
        "--check-every",
        "20000",
        &trace("boot.txt.gz"),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = &json_lines(&o)[0];
    assert_eq!(v["calls"], 86_327);
    assert_eq!(v["mismatched"], 0);
    assert_eq!(v["invariant_violations"], 0);
    assert_eq!(v["checks"], 86_327 / 20_000 + 1);
    assert_eq!(v["passed"], true);
    assert_eq!(v["host"]["seed"], 7);
    assert_eq!(v["host"]["phases"], 86_327 / 256);
    let ops = &v["host_ops"];
    for k in [
        "unmap_hva_range",
        "hptes_unmapped",
        "host_page_in",
        "age_gfn",
        "test_age_gfn",
        "get_dirty_log",
        "clear_dirty_log",
        "dirty_log_rounds",
        "dirty_pages",
        "errors",
    ] {
        assert!(ops[k].is_u64(), "{k}: {ops}");
    }
    let total = v["host"]["host_ops_total"].as_u64().unwrap();
    assert!(total >= 3 * 4 * (86_327 / 256), "{total}");
    assert!(ops["unmap_hva_range"].as_u64().unwrap() > 0);
    assert!(ops["age_gfn"].as_u64().unwrap() > 0);
    assert!(ops["get_dirty_log"].as_u64().unwrap() > 0);
    assert_eq!(ops["errors"], 0);
    // Plain replay JSON has no host fields.
    let o = revmap(&["replay", "--json", &trace("boot.txt.gz")]);
    let v = &json_lines(&o)[0];
    assert!(v.get("host_ops").is_none() && v.get("host").is_none());
}

#[test]
fn host_interference_human_output_and_mismatch_exit_1() {
    let p = temp_file("mismatch-hi.txt", MISMATCH_TRACE);
    let ps = p.display().to_string();
    let o = revmap(&["replay", "--host-interference", "--flavour", "qemu", &ps]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("host interference: seed 1"), "{s}");
    assert!(
        s.contains("unmap_hva_range") && s.contains("get_dirty_log"),
        "{s}"
    );
    assert!(s.contains("first mismatch: line 2: H_ENTER r4"), "{s}");
    assert!(s.contains("result: FAIL"), "{s}");
}
