//! Replays x86 walk traces through the reference walker and prints the counts.
//!
//! `cargo run --release -p revmap-shadow --example check_walks traces/x86/boot.txt.gz ...`

use revmap_shadow::walk_check::WalkChecker;
use std::time::Instant;

fn main() {
    let mut failed = false;
    for path in std::env::args().skip(1) {
        let t = Instant::now();
        match WalkChecker::check_file(&path) {
            Ok(r) => {
                let s = t.elapsed().as_secs_f64();
                println!(
                    "{path}: {} walks checked, {} matched, {} mismatched, {:.2} s ({:.0} walks/s)",
                    r.walks.checked,
                    r.walks.matched,
                    r.walks.mismatched,
                    s,
                    r.walks.checked as f64 / s
                );
                println!(
                    "  cpu {} invlpg {} flush {} | by psz {:?} | faults by ec {:x?} | 5-level {} | A/D writes {} | synthesized new {} changed {} | prot disagreements {} | smap-flag disagreements {}",
                    r.walks.cpu_records, r.walks.invlpgs, r.walks.flushes, r.translated_by_psz, r.faults_by_ec,
                    r.five_level_walks, r.ad_writes, r.synthesized_new, r.synthesized_changed,
                    r.prot_disagreements, r.smap_flag_disagreements
                );
                if let Some(m) = r.walks.first_mismatch {
                    println!(
                        "  first mismatch: line {}: {}: expected {} got {}",
                        m.line, m.what, m.expected, m.got
                    );
                    failed = true;
                }
            }
            Err(e) => {
                eprintln!("{e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
