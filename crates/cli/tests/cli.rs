//! Runs the built `revmap` binary: exit codes, messages and the JSON shape.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output};

fn revmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_revmap"))
        .args(args)
        .output()
        .expect("run revmap")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn no_panic(o: &Output) {
    let e = stderr(o);
    assert!(
        !e.contains("panicked") && !e.contains("RUST_BACKTRACE"),
        "{e}"
    );
}

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
fn stubs_say_not_implemented() {
    for c in ["run", "bench"] {
        let o = revmap(&[c]);
        assert_eq!(o.status.code(), Some(2));
        assert!(stderr(&o).contains("not implemented yet"));
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
