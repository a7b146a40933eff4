//! Replays the vendored real traces against a tiny plain QEMU model (tests/support):
//! checks the parser's register mapping and the engine end to end, independently of
//! the HPT crate.

mod support;

use revmap_sim::replay::{replay_file, replay_preparsed, PreparsedTrace, ReplayOptions};
use std::num::NonZeroU64;
use support::QemuModel;

fn trace(name: &str) -> String {
    format!("{}/../../traces/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn boot_replays_bit_exact_on_the_model() {
    let opts = ReplayOptions {
        check_every: NonZeroU64::new(10_000),
    };
    let rep = replay_file(trace("boot.txt.gz"), &opts, QemuModel::new).unwrap();
    assert_eq!(rep.calls, 86_327);
    assert_eq!(rep.mismatched, 0, "{:?}", rep.first_mismatch);
    assert_eq!(rep.stopped_at, None);
    assert_eq!(rep.checks, 9);
    assert!(rep.passed());
    let pre = PreparsedTrace::open(trace("boot.txt.gz")).unwrap();
    assert_eq!(pre.calls(), 86_327);
    let vm = QemuModel::new(pre.vm_spec()).unwrap();
    let rep2 = replay_preparsed(&pre, &vm, &opts);
    assert_eq!((rep2.calls, rep2.matched), (86_327, 86_327));
}

#[test]
fn resize_replays_on_the_model_until_its_first_resize_record() {
    // The plain model has no resizing (H_FUNCTION): everything before the first
    // PREPARE (line 122,518) matches; the replay no longer stops there.
    let rep = replay_file(
        trace("resize.txt.gz"),
        &ReplayOptions::default(),
        QemuModel::new,
    )
    .unwrap();
    let m = rep.first_mismatch.unwrap();
    assert_eq!((m.line, m.opcode), (122_518, 0x36c), "{m}");
    assert_eq!(rep.stopped_at, None);
    assert_eq!(rep.calls, 373_940);
    assert!(!rep.passed());
}
