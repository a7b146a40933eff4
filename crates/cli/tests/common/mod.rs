//! Helpers shared by the integration tests that run the built `revmap` binary.
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs the built `revmap` binary with `args` and collects its output.
pub fn revmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_revmap"))
        .args(args)
        .output()
        .expect("run revmap")
}

/// The standard error of `o`, lossily decoded.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The standard output of `o`, lossily decoded.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts that the run did not panic.
pub fn no_panic(o: &Output) {
    let e = stderr(o);
    assert!(
        !e.contains("panicked") && !e.contains("RUST_BACKTRACE"),
        "{e}"
    );
}
