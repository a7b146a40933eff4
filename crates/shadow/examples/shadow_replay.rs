//! Replays x86 walk traces through the shadow MMU and prints the counts (exit status 1
//! on any mismatch or invariant violation).
//!
//! `cargo run --release -p revmap-shadow --example shadow_replay traces/x86/boot.txt.gz ...`
//! (`REVMAP_CHECK_EVERY=N` runs the invariant checker every N walks; default 100000.)

use revmap_shadow::replay::ShadowReplayer;

fn main() {
    let every = std::env::var("REVMAP_CHECK_EVERY")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let mut failed = false;
    for path in std::env::args().skip(1) {
        match ShadowReplayer::replay_file(&path, every) {
            Ok(r) => {
                println!(
                    "{path}: {} walks checked, {} matched, {} mismatched, {} invariant checks, {} violations, {:.2} s ({:.0} walks/s)",
                    r.walks.checked, r.walks.matched, r.walks.mismatched, r.invariant_checks, r.invariant_violations,
                    r.seconds, r.walks.checked as f64 / r.seconds
                );
                println!(
                    "  cpu {} invlpg {} flush {} | faults by ec {:x?} | guest stores {} (emulated {}) | shadow hits {} | write-protected writes {} | mmio {} | shadow pages {} | write-protected gfns {}",
                    r.walks.cpu_records, r.walks.invlpgs, r.walks.flushes, r.faults_by_ec, r.guest_stores,
                    r.emulated_stores, r.shadow_hits, r.write_protected, r.mmio, r.shadow_pages,
                    r.write_protected_gfns
                );
                println!("  shadow {:?}", r.shadow);
                if let Some(m) = &r.walks.first_mismatch {
                    println!(
                        "  first mismatch: line {}: {}: expected {} got {}",
                        m.line, m.what, m.expected, m.got
                    );
                }
                if let Some(v) = &r.first_violation {
                    println!("  first violation: {v}");
                }
                failed |=
                    r.walks.mismatched > 0 || r.invariant_violations > 0 || r.event_errors > 0;
            }
            Err(e) => {
                eprintln!("{path}: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
