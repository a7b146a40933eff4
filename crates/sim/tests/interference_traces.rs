//! Guest-view invariance on the vendored real traces : each trace is
//! replayed in its recorded order while the host actors run against the same VM; every
//! result must match exactly as in a plain replay, the checker must find nothing at
//! the quiescent points, and thousands of host operations must have interleaved.

use revmap_sim::interference::{replay_with_interference, InterferenceOptions};
use revmap_sim::replay::{new_vm, Flavour, PreparsedTrace};
use std::num::NonZeroU64;

fn trace(name: &str) -> PreparsedTrace {
    PreparsedTrace::open(format!(
        "{}/../../traces/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn check(t: &PreparsedTrace, flavour: Flavour, seed: u64) -> u64 {
    let vm = new_vm(flavour, t.vm_spec()).unwrap();
    let mut opts = InterferenceOptions::new(seed);
    opts.check_every = NonZeroU64::new(10_000).unwrap();
    let rep = replay_with_interference(t, &vm, &opts).unwrap();
    let r = &rep.replay;
    let what = format!("{} {flavour} seed {seed}", t.file());
    assert_eq!(r.calls, t.calls(), "{what}");
    assert_eq!(r.mismatched, 0, "{what}: {:?}", r.first_mismatch);
    assert_eq!(r.invariant_violations, 0, "{what}: {:?}", r.first_violation);
    assert_eq!(r.checks, t.calls() / 10_000 + 1);
    assert!(rep.passed());
    let ops = rep.host_ops;
    assert_eq!(rep.phases, t.calls() / 256);
    assert!(ops.total() >= rep.phases * 3 * 4, "{what}: {ops:?}");
    assert!(
        ops.total() >= 1000,
        "{what}: thousands of host ops: {ops:?}"
    );
    assert!(
        ops.unmap_hva_range > 0 && ops.hptes_unmapped > 0,
        "{what}: {ops:?}"
    );
    assert!(ops.host_page_in > 0 && ops.age_gfn > 0 && ops.test_age_gfn > 0);
    assert!(ops.get_dirty_log > 0 && ops.dirty_log_rounds > 0);
    assert_eq!(ops.errors, 0);
    eprintln!("{what}: {} phases, host ops {ops:?}", rep.phases);
    ops.total()
}

#[test]
fn boot_trace_is_guest_invariant_under_host_interference() {
    let t = trace("boot.txt.gz");
    for seed in [1, 2] {
        check(&t, Flavour::Kvm, seed);
    }
    check(&t, Flavour::Qemu, 3);
}

#[test]
fn resize_trace_is_guest_invariant_under_host_interference() {
    // The whole trace: seven PREPAREs and six COMMITs (three of them H_PTEG_FULL) run
    // while the host unmaps, ages and harvests dirty logs on other threads.
    let t = trace("resize.txt.gz");
    assert_eq!(t.calls(), 373_940, "every HPT record of the resize trace");
    for seed in [4, 5] {
        check(&t, Flavour::Kvm, seed);
    }
    check(&t, Flavour::Qemu, 6);
}
