//! The reference walker reproduces every walk of the vendored real x86-64 Linux traces
//! (`traces/x86/`, QEMU 7.2 TCG), by the replay rules of their README: every entry
//! address, every A/D update, every translation and #PF error code. The expected counts
//! are the README's own table, measured by the capture's independent reference checker.

use revmap_shadow::walk_check::{WalkCheckReport, WalkChecker};
use std::collections::BTreeMap;

fn replay(name: &str) -> WalkCheckReport {
    let path = format!("{}/../../traces/x86/{name}", env!("CARGO_MANIFEST_DIR"));
    // The traces are vendored: a missing one fails the test, never skips it.
    let r = WalkChecker::check_file(&path).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{name}: {} walks checked, {} matched, {} mismatched",
        r.walks.checked, r.walks.matched, r.walks.mismatched
    );
    assert_eq!(
        r.walks.mismatched, 0,
        "first mismatch: {:?}",
        r.walks.first_mismatch
    );
    assert_eq!(r.walks.matched, r.walks.checked);
    assert_eq!(r.prot_disagreements, 0);
    assert_eq!(r.smap_flag_disagreements, 0);
    r
}

fn faults(t: &[(u64, u64)]) -> BTreeMap<u64, u64> {
    t.iter().copied().collect()
}

#[test]
fn boot_trace_every_walk_matches() {
    let r = replay("boot.txt.gz");
    assert_eq!(r.walks.checked, 868_749);
    assert_eq!(r.translated_by_psz, [(12, 33_010), (21, 835_289)].into());
    assert_eq!(
        r.faults_by_ec,
        faults(&[
            (0x0, 10),
            (0x2, 14),
            (0x3, 12),
            (0x4, 88),
            (0x6, 49),
            (0x7, 96),
            (0x14, 181)
        ])
    );
    assert_eq!(r.five_level_walks, 0);
    assert_eq!(r.ad_writes, 84);
    assert_eq!((r.synthesized_new, r.synthesized_changed), (4567, 2292));
    assert_eq!(
        (r.walks.invlpgs, r.walks.flushes),
        (40_446, 158 + 16_957 + 55)
    );
}

#[test]
fn max_boot_trace_every_walk_matches() {
    let r = replay("max-boot.txt.gz");
    assert_eq!(r.walks.checked, 960_874);
    assert_eq!(
        r.translated_by_psz,
        [(12, 32_096), (21, 783_537), (30, 144_791)].into()
    );
    assert_eq!(
        r.faults_by_ec,
        faults(&[
            (0x0, 10),
            (0x2, 16),
            (0x3, 17),
            (0x4, 85),
            (0x6, 46),
            (0x7, 96),
            (0x14, 180)
        ])
    );
    assert_eq!(r.five_level_walks, 960_852);
    assert_eq!(r.ad_writes, 78);
    assert_eq!((r.synthesized_new, r.synthesized_changed), (4160, 2276));
    assert_eq!(
        (r.walks.invlpgs, r.walks.flushes),
        (40_441, 160 + 16_964 + 58 + 14)
    );
}
