//! Replays both vendored real traces on `revmap_hpt::Vm` under both flavours: zero
//! mismatches and zero invariant violations (boot fully; resize up to its first resize
//! record).

use revmap_sim::replay::{
    new_vm, replay_file, replay_preparsed, Flavour, PreparsedTrace, ReplayOptions,
};
use std::num::NonZeroU64;

fn trace(name: &str) -> String {
    format!("{}/../../traces/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn opts() -> ReplayOptions {
    ReplayOptions {
        check_every: NonZeroU64::new(20_000),
    }
}

#[test]
fn boot_replays_fully_under_both_flavours() {
    for flavour in [Flavour::Kvm, Flavour::Qemu] {
        let rep = replay_file(trace("boot.txt.gz"), &opts(), |s| new_vm(flavour, s)).unwrap();
        assert_eq!(rep.calls, 86_327, "{flavour}");
        assert_eq!(
            rep.matched, rep.calls,
            "{flavour}: {:?}",
            rep.first_mismatch
        );
        assert_eq!(rep.mismatched, 0);
        assert_eq!(rep.checks, 86_327 / 20_000 + 1);
        assert_eq!(rep.invariant_violations, 0, "{:?}", rep.first_violation);
        assert_eq!(rep.stopped_at, None);
        assert!(rep.passed());
        match flavour {
            // Bit-exact: nothing to excuse.
            Flavour::Qemu => assert!(rep.masks_applied.is_empty()),
            // Every successful H_REMOVE returns QEMU's 0x40 in dword 0.
            Flavour::Kvm => assert!(rep.masks_applied.get("dword0-0x40-dirty-bit") > 30_000),
        }
    }
}

#[test]
fn resize_replays_to_its_end_under_both_flavours() {
    for flavour in [Flavour::Kvm, Flavour::Qemu] {
        let rep = replay_file(trace("resize.txt.gz"), &opts(), |s| new_vm(flavour, s)).unwrap();
        assert_eq!(rep.stopped_at, None);
        // Every HPT record: 373,921 ordinary calls and 19 resize calls.
        assert_eq!(rep.calls, 373_940, "{flavour}");
        assert_eq!(rep.mismatched, 0, "{flavour}: {:?}", rep.first_mismatch);
        assert_eq!(rep.invariant_violations, 0, "{:?}", rep.first_violation);
        assert!(rep.passed());
        if flavour == Flavour::Qemu {
            assert!(rep.masks_applied.is_empty(), "bit-exact");
        }
    }
}

#[test]
fn preparsed_mode_agrees_with_streaming() {
    let pre = PreparsedTrace::open(trace("resize.txt.gz")).unwrap();
    assert_eq!(pre.calls(), 373_940);
    for flavour in [Flavour::Kvm, Flavour::Qemu] {
        let vm = new_vm(flavour, pre.vm_spec()).unwrap();
        let mut a = replay_preparsed(&pre, &vm, &opts());
        let mut b = replay_file(trace("resize.txt.gz"), &opts(), |s| new_vm(flavour, s)).unwrap();
        a.seconds = 0.0;
        b.seconds = 0.0;
        assert_eq!(a, b);
    }
}
