//! `revmap replay` of x86 walk traces (shadow MMU) and nested traces (nested MMU): format
//! detection by content, the JSON keys, exit codes 0/1/2, `--check-every`, PPC-only
//! flags. Whole vendored x86/nested traces are slow in debug builds, so these tests
//! replay their first lines (CI replays the whole traces in release).

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::Output;

mod common;
use common::{no_panic, revmap, stderr};

fn json_lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("revmap-cli-mmu-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The first `n` lines of a vendored trace (`traces/REL`).
fn head(rel: &str, n: usize) -> Vec<String> {
    let p = format!("{}/../../traces/{rel}", env!("CARGO_MANIFEST_DIR"));
    let f = std::fs::File::open(&p).unwrap();
    BufReader::new(GzDecoder::new(f))
        .lines()
        .take(n)
        .map(Result::unwrap)
        .collect()
}

fn write(name: &str, lines: &[String]) -> String {
    let p = dir().join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p.display().to_string()
}

fn write_gz(name: &str, lines: &[String]) -> String {
    let p = dir().join(name);
    let mut e = GzEncoder::new(std::fs::File::create(&p).unwrap(), Default::default());
    e.write_all((lines.join("\n") + "\n").as_bytes()).unwrap();
    e.finish().unwrap();
    p.display().to_string()
}

fn x86_head() -> Vec<String> {
    head("x86/boot.txt.gz", 3000)
}

fn nested_head() -> Vec<String> {
    head("nested/nested-small.txt.gz", 1500)
}

/// The keys every passing replay reports: `kind`, over `min_checked` results checked, all
/// matched, no invariant violations.
fn replay_ok(v: &Value, kind: &str, min_checked: u64) {
    assert_eq!(v["kind"], kind, "{v}");
    let checked = v["checked"].as_u64().unwrap();
    assert!(checked > min_checked, "{v}");
    assert_eq!(v["matched"].as_u64(), Some(checked), "{v}");
    assert_eq!(v["mismatched"], 0);
    assert!(v["first_mismatch"].is_null());
    assert_eq!(v["invariant_violations"], 0);
    assert!(v["seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(v["passed"], true);
}

fn x86_ok(v: &Value) {
    replay_ok(v, "x86", 1000);
    let s = &v["shadow"];
    assert!(s["page_faults"].as_u64().unwrap() > 0, "{v}");
    assert!(s["rmap_adds"].as_u64().unwrap() > 0, "{v}");
    assert!(s["shadow_pages_created"].as_u64().unwrap() > 0, "{v}");
    for k in [
        "write_protected_gfns",
        "shadow_pages_zapped",
        "shadow_pages",
    ] {
        assert!(s[k].is_u64(), "{k}: {v}");
    }
}

fn nested_ok(v: &Value) {
    replay_ok(v, "nested", 500);
    let n = &v["nested"];
    assert!(n["nested_faults"].as_u64().unwrap() > 0, "{v}");
    assert!(n["rmap_entries_max_per_gfn"].as_u64().unwrap() > 0, "{v}");
    assert!(n["rmap_bytes_max"].as_u64().unwrap() > 0, "{v}");
    assert!(n["rmap_invalidations"].is_u64(), "{v}");
}

#[test]
fn x86_and_nested_are_recognised_by_content_plain_and_gzip() {
    let x = x86_head();
    let n = nested_head();
    // Names that say nothing (or lie) about the format.
    let files = [
        write("a.trace", &x),
        write_gz("b.txt", &x),
        write("c.gz", &n),
        write_gz("d", &n),
    ];
    let args: Vec<&str> = ["replay", "--json"]
        .into_iter()
        .chain(files.iter().map(String::as_str))
        .collect();
    let o = revmap(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json_lines(&o);
    assert_eq!(v.len(), 4);
    for (v, f) in v.iter().zip(&files) {
        assert_eq!(v["file"], f.as_str());
    }
    x86_ok(&v[0]);
    x86_ok(&v[1]);
    assert_eq!(v[0]["checked"], v[1]["checked"]);
    nested_ok(&v[2]);
    nested_ok(&v[3]);
}

#[test]
fn mixed_list_with_a_ppc_trace_keeps_order_and_kinds() {
    let ppc = write("ppc.txt", &head("boot.txt.gz", 400));
    let x = write("x.txt", &x86_head());
    let n = write("n.txt", &nested_head());
    let o = revmap(&["replay", "--json", &n, &ppc, &x]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json_lines(&o);
    let kinds: Vec<&str> = v.iter().map(|v| v["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["nested", "ppc", "x86"]);
    assert_eq!(v[1]["flavour"], "kvm");
    // Human summary.
    let o = revmap(&["replay", &x, &n]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("x86 walk trace, shadow MMU"), "{s}");
    assert!(s.contains("nested-radix trace, nested MMU"), "{s}");
    assert_eq!(s.matches("result: PASS").count(), 2, "{s}");
}

#[test]
fn check_every_applies_to_x86_and_nested() {
    let x = write("ce-x.txt", &x86_head());
    let n = write("ce-n.txt", &nested_head());
    let o = revmap(&["replay", "--json", &x, &n]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json_lines(&o);
    // The defaults (100000 walks, 5000 records) exceed these prefixes: only the end check.
    assert_eq!(v[0]["invariant_checks"], 1);
    assert_eq!(v[1]["invariant_checks"], 1);
    let o = revmap(&["replay", "--json", "--check-every", "100", &x, &n]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json_lines(&o);
    let walks = v[0]["checked"].as_u64().unwrap();
    let x_checks = v[0]["invariant_checks"].as_u64().unwrap();
    assert!(x_checks >= walks / 100, "{} vs {walks}", v[0]);
    let records = v[1]["records"].as_u64().unwrap();
    let n_checks = v[1]["invariant_checks"].as_u64().unwrap();
    assert!(n_checks >= records / 100, "{} vs {records}", v[1]);
    assert_eq!(v[0]["invariant_violations"], 0);
    assert_eq!(v[1]["invariant_violations"], 0);
}

/// Changes the result of the first line starting with `prefix` (and containing `from`).
fn corrupt(lines: &[String], prefix: &str, from: &str, to: &str) -> (Vec<String>, usize) {
    let mut out = lines.to_vec();
    let i = out
        .iter()
        .position(|l| l.starts_with(prefix) && l.contains(from))
        .expect("a line to corrupt");
    out[i] = out[i].replacen(from, to, 1);
    (out, i + 1)
}

#[test]
fn a_mismatch_exits_1_and_names_the_line() {
    let x = x86_head();
    // A walk that completed: claim another physical address.
    let (bad_x, xl) = corrupt(&x, "WALK", "-> pa=0x", "-> pa=0x7");
    let n = nested_head();
    let (bad_n, nl) = corrupt(&n, "H_SET_PARTITION_TABLE", "-> ret=0", "-> ret=-4");
    let bx = write("mm-x.txt", &bad_x);
    let bn = write("mm-n.txt", &bad_n);
    let o = revmap(&["replay", "--json", &bx]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v = &json_lines(&o)[0];
    assert_eq!(v["passed"], false);
    assert!(v["mismatched"].as_u64().unwrap() >= 1);
    assert_eq!(v["first_mismatch"]["line"].as_u64(), Some(xl as u64), "{v}");
    let o = revmap(&["replay", "--json", &bn]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v = &json_lines(&o)[0];
    assert_eq!(v["passed"], false);
    assert!(v["mismatched"].as_u64().unwrap() >= 1);
    let fm = v["first_mismatch"].as_str().unwrap();
    assert!(fm.contains(&format!("{bn}:{nl}:")), "{fm}");
    // Human form says FAIL; a passing file next to it does not lower the exit code.
    let good = write("mm-good.txt", &x);
    let o = revmap(&["replay", &good, &bx]);
    assert_eq!(o.status.code(), Some(1));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("result: PASS") && s.contains("result: FAIL"),
        "{s}"
    );
}

#[test]
fn malformed_x86_and_nested_exit_2_with_file_and_line() {
    let mut x = x86_head();
    x[400] = "WALK cpu=0 va=zzz acc=r".into();
    let mut n = nested_head();
    n[300] = "L2_ACCESS lpid=1 gpa=0x10000 acc=q -> ok".into();
    let bx = write("bad-x.txt", &x);
    let bn = write("bad-n.txt", &n);
    for (f, kind) in [(&bx, "x86"), (&bn, "nested")] {
        let o = revmap(&["replay", f]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        no_panic(&o);
        let e = stderr(&o);
        assert!(e.starts_with("revmap replay: error: "), "{e}");
        assert!(
            e.contains(&format!("{f}:401:")) || e.contains(&format!("{f}:301:")),
            "{e}"
        );
        let o = revmap(&["replay", "--json", f]);
        assert_eq!(o.status.code(), Some(2));
        let v = &json_lines(&o)[0];
        assert_eq!(v["file"], f.as_str());
        assert_eq!(v["kind"], kind);
        assert!(v["error"].as_str().unwrap().contains(f.as_str()), "{v}");
    }
    // The malformed file does not stop the next one; the worst code wins.
    let good = write("bad-good.txt", &nested_head());
    let o = revmap(&["replay", "--json", &bx, &good]);
    assert_eq!(o.status.code(), Some(2));
    let v = json_lines(&o);
    assert_eq!(v.len(), 2);
    assert_eq!(v[1]["passed"], true);
}

#[test]
fn ppc_only_flags_are_an_error_on_x86_and_nested_files() {
    let x = write("f-x.txt", &x86_head());
    let n = write("f-n.txt", &nested_head());
    let ppc = write("f-ppc.txt", &head("boot.txt.gz", 400));
    for flags in [
        &["--flavour", "qemu"][..],
        &["--preparse"],
        &["--host-interference"],
    ] {
        for f in [&x, &n] {
            let mut args = vec!["replay"];
            args.extend_from_slice(flags);
            args.push(f);
            let o = revmap(&args);
            assert_eq!(o.status.code(), Some(2), "{args:?}");
            no_panic(&o);
            let e = stderr(&o);
            assert!(e.contains(flags[0]) && e.contains(f.as_str()), "{e}");
            assert!(e.contains("only to PPC"), "{e}");
        }
    }
    // The PPC file of the same list still runs with the flag.
    let o = revmap(&["replay", "--json", "--flavour", "qemu", &x, &ppc]);
    assert_eq!(o.status.code(), Some(2));
    let v = json_lines(&o);
    assert!(v[0]["error"].is_string());
    assert_eq!(v[1]["kind"], "ppc");
    assert_eq!(v[1]["flavour"], "qemu");
    assert_eq!(v[1]["passed"], true);
}
