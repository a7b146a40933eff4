//! Both vendored real x86-64 Linux walk traces replay through the shadow MMU with every
//! walk matched and no invariant violation (the traces README's "Replaying through a
//! shadow MMU" rules).

use revmap_shadow::replay::{ReplayReport, ShadowReplayer};

fn replay(name: &str) -> ReplayReport {
    replay_with(name, None)
}

fn replay_with(name: &str, max_pages: Option<u64>) -> ReplayReport {
    let path = format!("{}/../../traces/x86/{name}", env!("CARGO_MANIFEST_DIR"));
    let r = ShadowReplayer::replay_file_with(&path, 10_000, max_pages)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{name}: {} walks, {} matched, {} mismatched, {} checks, {} violations, {:.1}s\n  {:?}\n  stores {} (emulated {}), hits {}, wp {}, mmio {}, pages {}, wp gfns {}",
        r.walks.checked,
        r.walks.matched,
        r.walks.mismatched,
        r.invariant_checks,
        r.invariant_violations,
        r.seconds,
        r.shadow,
        r.guest_stores,
        r.emulated_stores,
        r.shadow_hits,
        r.write_protected,
        r.mmio,
        r.shadow_pages,
        r.write_protected_gfns,
    );
    assert_eq!(
        r.walks.mismatched, 0,
        "first mismatch: {:?}",
        r.walks.first_mismatch
    );
    assert_eq!(r.event_errors, 0, "{:?}", r.walks.first_mismatch);
    assert_eq!(r.invariant_violations, 0, "{:?}", r.first_violation);
    assert_eq!(r.walks.matched, r.walks.checked);
    assert!(r.invariant_checks > 1);
    r
}

#[test]
fn boot_trace_replays_through_the_shadow_mmu() {
    let r = replay("boot.txt.gz");
    assert_eq!(r.walks.checked, 868_749);
    assert!(r.shadow.page_faults > 0 && r.shadow.sp_created > 0);
}

#[test]
fn max_boot_trace_replays_through_the_shadow_mmu() {
    let r = replay("max-boot.txt.gz");
    assert_eq!(r.walks.checked, 960_874);
    assert!(r.shadow.huge_sptes > 0);
}

#[test]
fn boot_trace_replays_under_a_tight_shadow_page_limit() {
    // 64 shadow pages (KVM's minimum) for a guest that uses ~80: eviction zaps pages
    // all along, and every walk still matches.
    let r = replay_with("boot.txt.gz", Some(64));
    assert!(r.shadow.evicted > 0);
    assert!(r.shadow_pages <= 64);
}
