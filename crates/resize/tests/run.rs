//! The vCPU run handle (`run.rs`): hypercalls on a pinned table and memslot snapshot,
//! kicked by resize commits and memslot updates from other threads, a COMMIT through
//! the handle itself, several handles on one thread, and the checker after each step.
#![cfg(not(shuttle))]

use revmap_hpt::hcall::*;
use revmap_hpt::{Flavour, MemslotFlags, MemslotSpec, Vm, VmConfig};
use revmap_resize::ResizeVmExt;
use revmap_rmap::{Gfn, Hva, SlotId, VcpuId};
use std::sync::atomic::{AtomicBool, Ordering};

/// A vCPU id known to be in range.
fn id(n: usize) -> VcpuId {
    VcpuId::new(n).unwrap()
}

fn vm() -> Vm {
    revmap_resize::new_vm(VmConfig {
        ram_bytes: 32 << 20,
        hpt_order: 18,
        flavour: Flavour::Kvm,
        backing_page_shift: 24,
    })
    .unwrap()
}

/// A bolted 4K entry for `page` of frame `gfn` at its primary group (vsid 0x42).
fn enter_args(vm: &Vm, page: u64, gfn: u64) -> [u64; 4] {
    let vsid = 0x42u64;
    let ptex = ((vsid ^ page) & vm.hpt().geometry().mask()) * 8;
    let avpn = ((vsid << 28 | page << 12) >> 23) << 7;
    [0, ptex, avpn | 0x10 | 1, (gfn << 12) | 0x190]
}

const SLOT1: SlotSpecParts = SlotSpecParts {
    base: 0x10_0000,
    npages: 16,
};

struct SlotSpecParts {
    base: u64,
    npages: u64,
}

fn slot1() -> MemslotSpec {
    MemslotSpec {
        id: SlotId(1),
        base_gfn: Gfn(SLOT1.base),
        npages: SLOT1.npages,
        userspace_addr: Hva(0x7f00_0000_0000),
        backing_page_shift: 12,
        flags: MemslotFlags::LOG_DIRTY_PAGES,
    }
}

#[test]
fn run_handle_hypercalls_match_vm_hcall() {
    let a = vm();
    let b = vm();
    let mut run = a.vcpu_run(id(0));
    for page in 0..64 {
        let args = enter_args(&a, page, page);
        let x = run.hcall(H_ENTER, &args);
        let y = b.hcall(0, H_ENTER, &args);
        assert_eq!(x, y);
        let x = run.hcall(H_READ, &[0, x.out[0]]);
        let y = b.hcall(0, H_READ, &[0, y.out[0]]);
        assert_eq!(x, y);
    }
    drop(run);
    a.check_invariants().unwrap();
}

#[test]
fn commit_through_own_run_handle_does_not_wait_for_itself() {
    let vm = vm();
    let mut run = vm.vcpu_run(id(3));
    let e = run.hcall(H_ENTER, &enter_args(&vm, 0x1801, 1));
    assert_eq!(e.ret, H_SUCCESS);
    assert!(matches!(
        run.hcall(H_RESIZE_HPT_PREPARE, &[0, 19]).ret,
        H_SUCCESS | H_LONG_BUSY_ORDER_100_MSEC
    ));
    vm.resize_ctl().expect("resizer installed").wait_prepared();
    assert_eq!(run.hcall(H_RESIZE_HPT_PREPARE, &[0, 19]).ret, H_SUCCESS);
    assert_eq!(run.hcall(H_RESIZE_HPT_COMMIT, &[0, 19]).ret, H_SUCCESS);
    assert!(!run.is_pinned(), "paused by the resize call");
    assert_eq!(vm.hpt_order(), 19);
    // Re-pinned on the new table: the bolted entry moved, H_READ finds it there.
    let n = run.hcall(H_ENTER, &enter_args(&vm, 0x1802, 2));
    assert_eq!(n.ret, H_SUCCESS);
    assert!(run.is_pinned());
    let want = (0x1843 & 0xfff) * 8 + (e.out[0] % 8);
    let r = run.hcall(H_READ, &[0, want]);
    assert_eq!(r.out[0] & 1, 1, "bolted entry present at its new index");
    drop(run);
    vm.check_invariants().unwrap();
}

#[test]
fn several_runs_on_one_thread_survive_a_commit_issued_by_one_of_them() {
    let vm = vm();
    let mut runs = vm.vcpu_runs();
    for cpu in 0..4 {
        let r = runs.hcall(id(cpu), H_ENTER, &enter_args(&vm, 0x100 + cpu as u64, 3));
        assert_eq!(r.ret, H_SUCCESS);
        assert!(runs.is_pinned(id(cpu)));
    }
    runs.hcall(id(1), H_RESIZE_HPT_PREPARE, &[0, 19]);
    vm.resize_ctl().expect("resizer installed").wait_prepared();
    assert_eq!(
        runs.hcall(id(2), H_RESIZE_HPT_COMMIT, &[0, 19]).ret,
        H_SUCCESS
    );
    assert!((0..4).all(|c| !runs.is_pinned(id(c))));
    assert_eq!(runs.hcall(id(0), H_READ, &[0, 0]).ret, H_SUCCESS);
    drop(runs);
    vm.check_invariants().unwrap();
}

#[test]
fn memslot_delete_and_commit_from_other_threads_kick_a_running_vcpu() {
    let vm = vm();
    vm.create_memslot(slot1()).unwrap();
    let stop = AtomicBool::new(false);
    let running = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let vcpu = sc.spawn(|| {
            let mut run = vm.vcpu_run(id(0));
            let mut calls = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let page = 0x200 + calls % 8;
                let gfn = SLOT1.base + calls % SLOT1.npages;
                let e = run.hcall(H_ENTER, &enter_args(&vm, page, gfn));
                assert_eq!(e.ret, H_SUCCESS);
                let r = run.hcall(H_REMOVE, &[0, e.out[0], 0]);
                assert_eq!(r.ret, H_SUCCESS);
                calls += 1;
                running.store(true, Ordering::SeqCst);
            }
            calls
        });
        // The vCPU is running (pinned, in its loop) before the changes start: the
        // main thread's sequence is quicker than a thread's start-up.
        while !running.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // Both stop-the-world kinds while the vCPU runs: they return only because
        // the run handle re-pins at its next hypercall.
        vm.delete_memslot(SlotId(1)).unwrap();
        vm.hcall(5, H_RESIZE_HPT_PREPARE, &[0, 19]);
        vm.resize_ctl().expect("resizer installed").wait_prepared();
        assert_eq!(vm.hcall(5, H_RESIZE_HPT_COMMIT, &[0, 19]).ret, H_SUCCESS);
        vm.create_memslot(slot1()).unwrap();
        stop.store(true, Ordering::SeqCst);
        assert!(vcpu.join().unwrap() > 0);
    });
    assert_eq!(vm.hpt_order(), 19);
    vm.check_invariants().unwrap();
}

#[test]
fn after_delete_returns_a_running_vcpu_sees_the_slot_gone() {
    let vm = vm();
    vm.create_memslot(slot1()).unwrap();
    let mut run = vm.vcpu_run(id(0));
    let e = run.hcall(H_ENTER, &enter_args(&vm, 0x300, SLOT1.base));
    assert_eq!(e.ret, H_SUCCESS);
    std::thread::scope(|sc| {
        let h = sc.spawn(|| vm.delete_memslot(SlotId(1)).unwrap());
        // Keep running until the delete is done (it waits for our re-pin).
        while !h.is_finished() {
            run.hcall(H_READ, &[0, 0]);
        }
    });
    // The entry was flushed (ABSENT); a new one for the range is emulated MMIO now.
    let n = run.hcall(H_ENTER, &enter_args(&vm, 0x301, SLOT1.base + 1));
    assert_eq!(n.ret, H_SUCCESS);
    drop(run);
    let r = vm.hpt().slot(revmap_rmap::Ptex(n.out[0] as u32)).unwrap();
    assert_eq!(
        r.load_r() & revmap_hpt::hpte::HpteR::KEY,
        revmap_hpt::hpte::HpteR::KEY
    );
    vm.check_slot_flushed(Gfn(SLOT1.base), Gfn(SLOT1.base + SLOT1.npages))
        .unwrap();
    vm.check_invariants().unwrap();
}
