//! Loom models of the TLB invalidation handshakes (`tlb`):
//!
//! * `TlbDomain::tlbie` against a vCPU MMU access epoch: once `tlbie` returns, every
//!   hardware R/C update made through a translation of the old generation has
//!   completed (the hypervisor's harvest of dword 1 after the tlbie is final).
//! * the shootdown-free `TlbDomain::tlbie_after_sc_rmw` (H_REMOVE's path when it
//!   finds no vCPU MMU attached) against a vCPU MMU attaching concurrently: once the
//!   call returns, the vCPU cannot update R/C through the removed entry: either the
//!   hypervisor saw the registration and ran the full handshake, or the vCPU's first
//!   HPT search sees the entry invalid.
//!
//! Each has a should-fail variant that drops one `SeqCst` fence through a hidden
//! `*_with::<false>` entry point that production code never calls.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p revmap-hpt
//! --release --test loom_tlb`.
#![cfg(loom)]

use revmap_hpt::hcall::*;
use revmap_hpt::hpte::{HpteR, HpteV};
use revmap_hpt::tlb::TlbDomain;
use revmap_rmap::sync::{thread, Arc, AtomicU64, Ordering};
use revmap_rmap::Ptex;

mod common;
use common::{loom_model, small_vm};

fn tlbie_model<const FENCED: bool>() {
    loom_model(|| {
        let tlb = Arc::new(TlbDomain::new().expect("domain"));
        // Dword 1 of the entry the vCPU's TLB maps (generation 0), R bit only.
        let rc = Arc::new(AtomicU64::new(0));
        let slot = tlb.register().expect("slot");
        let vcpu = {
            let (tlb, rc) = (tlb.clone(), rc.clone());
            thread::spawn(move || {
                let gen = tlb.begin_access_with::<FENCED>(slot);
                if gen == 0 {
                    // A TLB hit on the old translation: hardware sets R.
                    // ORDERING: Relaxed, as the MMU model's `hw_set_rc`'s value; the
                    // epoch's Release end orders it before a tlbie that sees IDLE.
                    rc.fetch_or(HpteR::R, Ordering::Relaxed);
                }
                tlb.end_access(slot);
            })
        };
        // The hypervisor cleared VALID (not modelled: the vCPU hits in its TLB) and
        // now shoots the translation down, then harvests R/C.
        tlb.tlbie();
        // ORDERING: Relaxed: after tlbie, which acquired every old access's end.
        let harvested = rc.load(Ordering::Relaxed);
        vcpu.join().expect("vcpu");
        assert_eq!(
            harvested,
            rc.load(Ordering::Relaxed),
            "an R/C update through the old translation landed after tlbie returned"
        );
    });
}

#[test]
fn tlbie_waits_for_every_access_of_the_old_generation() {
    tlbie_model::<true>();
}

#[test]
#[should_panic(expected = "an R/C update through the old translation landed after tlbie returned")]
fn without_the_vcpu_fence_tlbie_misses_an_access() {
    tlbie_model::<false>();
}

const PTEH: u64 = (0x1234 << 7) | HpteV::VALID;
const PTEL: u64 = (3 << 12) | HpteR::M | 2;

fn sc_rmw_model<const FENCED: bool>() {
    loom_model(|| {
        let vm = Arc::new(small_vm());
        let r = vm.hcall(0, H_ENTER, &[H_EXACT, 0, PTEH, PTEL]);
        assert_eq!(r.ret, H_SUCCESS);
        let p = Ptex(r.out[0] as u32);
        // No vCPU MMU attached yet: a vCPU attaches while H_REMOVE invalidates.
        let vcpu = {
            let vm = vm.clone();
            thread::spawn(move || {
                let tlb = vm.tlb();
                let slot = tlb.register().expect("slot");
                let gen = tlb.begin_access(slot);
                let s = vm.hpt().slot(p).expect("slot");
                // The HPT search: a VALID entry is loaded into the TLB and used.
                if s.hw_load_v() & HpteV::VALID != 0 {
                    s.hw_set_rc(HpteR::R);
                }
                let _ = gen;
                tlb.end_access(slot);
                tlb.unregister(slot);
            })
        };
        // H_REMOVE's invalidation: clear VALID with a SeqCst RMW, then the
        // shootdown-free completion, then harvest R/C.
        let hpt = vm.hpt();
        let v = hpt.slot(p).expect("slot").load_v();
        let g = hpt
            .try_lock_replace(p, v, v & !HpteV::VALID)
            .expect("unlocked");
        vm.tlb().tlbie_after_sc_rmw_with::<FENCED>();
        let harvested = g.r() & HpteR::RC;
        drop(g);
        vcpu.join().expect("vcpu");
        let s = hpt.slot(p).expect("slot");
        assert_eq!(
            harvested,
            s.load_r() & HpteR::RC,
            "a vCPU used the removed entry after the shootdown-free invalidation"
        );
    });
}

#[test]
fn shootdown_free_invalidation_is_seen_by_a_vcpu_attaching_concurrently() {
    sc_rmw_model::<true>();
}

#[test]
#[should_panic(expected = "a vCPU used the removed entry after the shootdown-free invalidation")]
fn without_the_hypervisor_fence_the_skip_is_unsound() {
    sc_rmw_model::<false>();
}
