//! Replays both vendored nested traces through the real, thread-safe nested MMU
//! (`revmap_nested::vm::NestedVm` on the shared host layer) with the library replay
//! (`revmap_nested::replay`): every result matched, 0 invariant violations, and the
//! nested statistics the issue asks for.

use revmap_nested::replay::{replay_file, ReplayOptions, ReplayReport};
use std::path::PathBuf;

fn trace(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../traces/nested")
        .join(name)
}

fn assert_clean(r: &ReplayReport, checked: u64) {
    println!("{r:#?}");
    assert_eq!(r.first_mismatch, None);
    assert_eq!(r.first_violation, None);
    assert_eq!(
        (r.checked, r.matched, r.mismatched, r.invariant_violations),
        (checked, checked, 0, 0)
    );
    assert!(r.invariant_checks >= 1);
    let c = &r.counters;
    assert!(c.rmap_entries_max_per_gfn <= 64, "{c:#?}");
    assert!(c.nested_faults > 0 && c.shadow_hits > 0, "{c:#?}");
    assert!(c.rmap_invalidations > 0, "{c:#?}");
    assert!(c.rmap_bytes_max > 0, "{c:#?}");
}

#[test]
fn small_trace_replays_through_nested_vm() {
    let r = replay_file(
        trace("nested-small.txt.gz"),
        ReplayOptions { check_every: 50 },
    )
    .unwrap();
    assert_clean(&r, 3454);
}

#[test]
fn basic_trace_replays_through_nested_vm() {
    let r = replay_file(trace("nested-basic.txt.gz"), ReplayOptions::default()).unwrap();
    assert_clean(&r, 1 + 5521 + 94_462 + 2570 + 961);
}
