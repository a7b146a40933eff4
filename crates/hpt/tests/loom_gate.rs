//! Loom model of the vCPU gate (`resize::cell`, KVM's `mmu_ready` plus the exit IPI):
//! a vCPU entering and leaving the gate against a resize commit closing it and
//! draining (`TableCell::close_and_drain`). Whatever the interleaving and whatever
//! the weak-memory outcome, once the drain returns no vCPU is inside the gate.
//!
//! The should-fail variant drops the vCPU's `SeqCst` fence (the hidden
//! `enter_vcpu_with::<false>`, never called by production code): the store-buffering
//! outcome then lets the vCPU read "open" while the committer reads "out", and loom
//! finds the execution where the committer proceeds under a running vCPU.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p revmap-hpt
//! --release --test loom_gate`.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, Ordering};
use revmap_rmap::sync::{thread, Arc};

mod common;
use common::{loom_model, small_vm};

fn gate_model<const FENCED: bool>() {
    loom_model(|| {
        let vm = Arc::new(small_vm());
        // Set by the vCPU only while it is inside the gate.
        let inside = Arc::new(AtomicBool::new(false));
        let vcpu = {
            let (vm, inside) = (vm.clone(), inside.clone());
            thread::spawn(move || {
                let g = vm
                    .tables()
                    .enter_vcpu_with::<FENCED>(revmap_rmap::VcpuId::new(0).expect("vCPU 0"));
                // ORDERING: Relaxed: the model's observation only; the gate's own
                // Release exit orders it before a drain that sees "out".
                inside.store(true, Ordering::Relaxed);
                let _ = g.hpt().geometry();
                inside.store(false, Ordering::Relaxed);
                drop(g);
            })
        };
        let cell = vm.tables();
        cell.close_and_drain(vm.tlb());
        assert!(
            !inside.load(Ordering::Relaxed),
            "a vCPU is inside the gate after the drain"
        );
        cell.reopen();
        vcpu.join().expect("vcpu");
    });
}

#[test]
fn drain_waits_for_every_vcpu_inside_the_gate() {
    gate_model::<true>();
}

#[test]
#[should_panic(expected = "a vCPU is inside the gate after the drain")]
fn without_the_vcpu_fence_the_drain_misses_a_vcpu() {
    gate_model::<false>();
}
