//! Runs the whole kvm-unit-tests `x86/access.c` space (4- and 5-level paging) through
//! the reference walker and prints the counts and the rate.
//!
//! `cargo run --release -p revmap-shadow --example access_all [MAXPHYADDR]`

use revmap_shadow::access_test::{sub_tests, AccessConfig, AccessRunner};
use std::time::Instant;

fn main() {
    let maxphyaddr = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(40);
    let mut failed = false;
    for la57 in [false, true] {
        let cfg = AccessConfig {
            maxphyaddr,
            la57,
            ..AccessConfig::default()
        };
        let t = Instant::now();
        let rep = AccessRunner::new(cfg).run_all();
        let s = t.elapsed().as_secs_f64();
        println!(
            "{}-level maxphyaddr={maxphyaddr}: {} cases, {} faults, {} mismatched, {:.2} s, {:.0} cases/s",
            if la57 { 5 } else { 4 },
            rep.checked,
            rep.faults,
            rep.mismatched,
            s,
            rep.checked as f64 / s
        );
        if let Some(m) = rep.first_mismatch {
            println!("first mismatch: {m}");
            failed = true;
        }
    }
    for (name, res) in sub_tests() {
        match res {
            Ok(()) => println!("{name}: ok"),
            Err(e) => {
                println!("{name}: FAIL: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
