//! Shuttle tests of the resize protocol racing a running guest: a vCPU loading and
//! storing through its MMU (faults page ABSENT bolted entries back in after a KVM
//! commit), a second vCPU entering and removing non-bolted entries, and a host thread
//! unmapping and aging pages, while a resizer runs one of the protocol sequences:
//!
//! * PREPARE(a) then PREPARE(b) before a's preparation finishes (or after: the
//!   scheduler decides), then COMMIT(b): the right table (order b) is installed, a's
//!   table is freed exactly once (by its worker or by the detach), nothing leaks;
//! * cancel (PREPARE 0) during preparation, then COMMIT: H_CLOSED, no leak;
//! * COMMIT without PREPARE: H_CLOSED;
//! * PREPARE(a), COMMIT(b != a): H_CLOSED (KVM releases the request), no leak.
//!
//! After each schedule: every worker finished, `ResizeStats` balance (allocated =
//! freed + installed, nothing live), the table has the expected order, every bolted
//! page still translates (no bolted entry lost) and the whole-VM checker passes.
//!
//! Run: `RUSTFLAGS="--cfg shuttle" CARGO_TARGET_DIR=target/shuttle cargo test -p revmap-resize --release --test shuttle_resize`.
#![cfg(shuttle)]

#[path = "../../hpt/tests/common/mod.rs"]
mod common;
use common::{check, SEG};

/// The tiny model-checking VM with resizing.
fn small_vm() -> Vm {
    common::small_vm().with_resizer(Box::new(
        revmap_resize::ResizeCtl::for_config(&common::small_config())
            .expect("the resize worker starts"),
    ))
}

use revmap_hpt::hash::{hpt_hash, primary_pteg};
use revmap_hpt::hcall::*;
use revmap_hpt::hpte::{encode_avpn, HpteR, HpteV};
use revmap_hpt::mmu::{Access, AccessOutcome, VcpuMmu};
use revmap_hpt::vm::RAM_HVA_BASE;
use revmap_hpt::Vm;
use revmap_resize::ResizeVmExt;
use revmap_rmap::sync::{thread, Arc, Ordering};
use revmap_rmap::{Gfn, Hva, SlotId};

/// Bolted pages 0..BOLTED, non-bolted pages above.
const BOLTED: u64 = 4;

/// H_ENTER arguments mapping ea page `k` -> gfn `gfn` (read/write).
fn enter_args(vm: &Vm, k: u64, gfn: u64, bolted: bool) -> [u64; 4] {
    let ea = k << 12;
    let group = primary_pteg(vm.hpt().geometry(), hpt_hash(&SEG, ea)) * 8;
    let mut pteh = encode_avpn(SEG.va(ea), 12, false) | HpteV::VALID;
    if bolted {
        pteh |= HpteV::BOLTED;
    }
    [0, group, pteh, (gfn << 12) | HpteR::M | 2]
}

#[derive(Debug, Clone, Copy)]
enum Script {
    /// PREPARE(19), PREPARE(18), COMMIT(18).
    PrepareTwiceThenCommit,
    /// PREPARE(19), PREPARE(0), COMMIT(19).
    CancelDuringPreparation,
    /// COMMIT(18) with nothing pending.
    CommitWithoutPrepare,
    /// PREPARE(19), wait, COMMIT(18).
    CommitOtherOrder,
}

fn resizer(vm: &Vm, script: Script) -> u32 {
    let prep = |s: u64| vm.hcall(7, H_RESIZE_HPT_PREPARE, &[0, s]).ret;
    let commit = |s: u64| vm.hcall(7, H_RESIZE_HPT_COMMIT, &[0, s]).ret;
    let busy_or_ok = |r: i64| r == H_SUCCESS || r == H_LONG_BUSY_ORDER_100_MSEC;
    match script {
        Script::PrepareTwiceThenCommit => {
            assert!(busy_or_ok(prep(19)));
            assert!(busy_or_ok(prep(18)), "A detached, B started");
            vm.resize_ctl().expect("resizer installed").wait_prepared();
            assert_eq!(prep(18), H_SUCCESS);
            assert_eq!(commit(18), H_SUCCESS);
            18
        }
        Script::CancelDuringPreparation => {
            assert!(busy_or_ok(prep(19)));
            assert_eq!(prep(0), H_SUCCESS);
            assert_eq!(commit(19), H_CLOSED);
            11
        }
        Script::CommitWithoutPrepare => {
            assert_eq!(commit(18), H_CLOSED);
            11
        }
        Script::CommitOtherOrder => {
            assert!(busy_or_ok(prep(19)));
            vm.resize_ctl().expect("resizer installed").wait_prepared();
            assert_eq!(commit(18), H_CLOSED);
            // KVM released the request.
            assert_eq!(commit(19), H_CLOSED);
            11
        }
    }
}

fn race(script: Script) {
    let vm = Arc::new(small_vm());
    for k in 0..BOLTED {
        let r = vm.hcall(0, H_ENTER, &enter_args(&vm, k, k, true));
        assert_eq!(r.ret, H_SUCCESS);
    }
    let mmu_vcpu = {
        let vm = vm.clone();
        thread::spawn(move || {
            let mut mmu = VcpuMmu::new(&vm).unwrap();
            for k in 0..BOLTED {
                let a = if k % 2 == 0 {
                    Access::Store
                } else {
                    Access::Load
                };
                match mmu.access(&SEG, k << 12, a) {
                    AccessOutcome::Done(_) | AccessOutcome::NotReady => {}
                    other => panic!("bolted page {k}: {other:?}"),
                }
            }
        })
    };
    let hcall_vcpu = {
        let vm = vm.clone();
        thread::spawn(move || {
            let mut run = vm.vcpu_run(revmap_rmap::VcpuId::new(1).unwrap());
            for k in 0..3 {
                let e = run.hcall(H_ENTER, &enter_args(&vm, 0x10 + k, 8 + k, false));
                assert_eq!(e.ret, H_SUCCESS);
                if k == 1 {
                    let r = run.hcall(H_REMOVE, &[0, e.out[0], 0]);
                    // A commit in between drops non-bolted entries (as KVM's rehash does).
                    assert!(r.ret == H_SUCCESS || r.ret == H_NOT_FOUND, "{}", r.ret);
                }
            }
        })
    };
    let host = {
        let vm = vm.clone();
        thread::spawn(move || {
            vm.unmap_hva_range(Hva(RAM_HVA_BASE), Hva(RAM_HVA_BASE + (2 << 12)));
            vm.age_gfn(SlotId(0), Gfn(0), Gfn(16));
            vm.unmap_gfn_range(SlotId(0), Gfn(2), Gfn(9));
        })
    };
    let want = {
        let vm = vm.clone();
        thread::spawn(move || resizer(&vm, script))
    };
    mmu_vcpu.join().unwrap();
    hcall_vcpu.join().unwrap();
    host.join().unwrap();
    let want = want.join().unwrap();
    assert_eq!(vm.hpt_order(), want, "{script:?}: the right table");
    let ctl = vm.resize_ctl().expect("resizer installed");
    ctl.wait_workers();
    let s = ctl.stats();
    // ORDERING: Relaxed: statistics read after every worker finished.
    let (alloc, freed, inst) = (
        s.allocated.load(Ordering::Relaxed),
        s.freed.load(Ordering::Relaxed),
        s.installed.load(Ordering::Relaxed),
    );
    assert_eq!(s.live(), 0, "{script:?}: leak");
    assert_eq!(
        alloc,
        freed + inst,
        "{script:?}: every table freed or installed once"
    );
    assert_eq!(inst, u64::from(want != 11), "{script:?}");
    check(&vm);
    // No bolted entry was lost: each translates again (paged back in if ABSENT).
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    for k in 0..BOLTED {
        match mmu.access(&SEG, k << 12, Access::Load) {
            AccessOutcome::Done(_) => {}
            other => panic!("{script:?}: bolted page {k} after the race: {other:?}"),
        }
    }
    drop(mmu);
    check(&vm);
}

#[test]
fn prepare_a_then_b_then_commit_races_faults_and_unmaps() {
    shuttle::check_random(|| race(Script::PrepareTwiceThenCommit), 60);
}

#[test]
fn prepare_a_then_b_then_commit_pct() {
    shuttle::check_pct(|| race(Script::PrepareTwiceThenCommit), 40, 3);
}

#[test]
fn cancel_during_preparation_races_faults_and_unmaps() {
    shuttle::check_random(|| race(Script::CancelDuringPreparation), 60);
}

#[test]
fn commit_without_prepare_races_faults_and_unmaps() {
    shuttle::check_random(|| race(Script::CommitWithoutPrepare), 30);
}

#[test]
fn commit_with_other_order_races_faults_and_unmaps() {
    shuttle::check_random(|| race(Script::CommitOtherOrder), 60);
}
