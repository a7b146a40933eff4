//! Shuttle test of the vCPU run handle against both stop-the-world kinds: a resize
//! COMMIT and a memslot delete race vCPU run handles doing hypercalls and a host walker.
//! Every operation completes (no deadlock: the handles re-pin at their next hypercall),
//! the commit pivots, the deleted slot is flushed, and the whole-VM checker passes.
//!
//! Run: `RUSTFLAGS="--cfg shuttle" CARGO_TARGET_DIR=target/shuttle cargo test -p revmap-resize --release --test shuttle_run`.
#![cfg(shuttle)]

#[path = "../../hpt/tests/common/mod.rs"]
mod common;

use revmap_hpt::hcall::*;
use revmap_hpt::{MemslotFlags, MemslotSpec, Vm};
use revmap_resize::ResizeVmExt;
use revmap_rmap::sync::{thread, Arc};
use revmap_rmap::{Gfn, Hva, SlotId};

const BASE: u64 = 0x100;
const NPAGES: u64 = 8;

fn small_vm() -> Vm {
    let vm = common::small_vm().with_resizer(Box::new(
        revmap_resize::ResizeCtl::for_config(&common::small_config())
            .expect("the resize worker starts"),
    ));
    vm.create_memslot(MemslotSpec {
        id: SlotId(1),
        base_gfn: Gfn(BASE),
        npages: NPAGES,
        userspace_addr: Hva(0x7f00_0000_0000),
        backing_page_shift: 12,
        flags: MemslotFlags::LOG_DIRTY_PAGES,
    })
    .unwrap();
    vm
}

/// A non-bolted 4K entry for `page` -> `gfn` (vsid 0x42), any slot of its group.
fn enter_args(vm: &Vm, page: u64, gfn: u64) -> [u64; 4] {
    let vsid = 0x42u64;
    let ptex = ((vsid ^ page) & vm.hpt().geometry().mask()) * 8;
    let avpn = ((vsid << 28 | page << 12) >> 23) << 7;
    [0, ptex, avpn | 1, (gfn << 12) | 0x190]
}

fn race() {
    let vm = Arc::new(small_vm());
    let vcpus: Vec<_> = (0..2u64)
        .map(|c| {
            let vm = vm.clone();
            thread::spawn(move || {
                let mut run = vm.vcpu_run(revmap_rmap::VcpuId::new(c as usize).unwrap());
                for k in 0..3 {
                    let gfn = if k % 2 == 0 { BASE + k + c } else { k + c };
                    let e = run.hcall(H_ENTER, &enter_args(&vm, 0x10 * c + k, gfn));
                    assert_eq!(e.ret, H_SUCCESS);
                    if k == 1 {
                        let r = run.hcall(H_REMOVE, &[0, e.out[0], 0]);
                        // A commit in between drops non-bolted entries (as KVM's rehash does).
                        let resized = vm.hpt_order() == 18;
                        assert!(r.ret == H_SUCCESS || (resized && r.ret == H_NOT_FOUND));
                    }
                }
            })
        })
        .collect();
    let host = {
        let vm = vm.clone();
        thread::spawn(move || {
            vm.delete_memslot(SlotId(1)).unwrap();
            vm.age_gfn(SlotId(0), Gfn(0), Gfn(8));
            vm.unmap_gfn_range(SlotId(0), Gfn(0), Gfn(4));
        })
    };
    let resizer = {
        let vm = vm.clone();
        thread::spawn(move || {
            let r = vm.hcall(7, H_RESIZE_HPT_PREPARE, &[0, 18]).ret;
            assert!(r == H_SUCCESS || r == H_LONG_BUSY_ORDER_100_MSEC, "{r}");
            vm.resize_ctl().expect("resizer installed").wait_prepared();
            assert_eq!(vm.hcall(7, H_RESIZE_HPT_COMMIT, &[0, 18]).ret, H_SUCCESS);
        })
    };
    for v in vcpus {
        v.join().unwrap();
    }
    host.join().unwrap();
    resizer.join().unwrap();
    assert_eq!(vm.hpt_order(), 18);
    vm.check_slot_flushed(Gfn(BASE), Gfn(BASE + NPAGES))
        .unwrap();
    if let Err(e) = vm.check_invariants() {
        panic!("invariant violated: {e}");
    }
}

#[test]
fn commit_and_memslot_delete_race_run_handles_and_walkers() {
    shuttle::check_random(race, 60);
}

#[test]
fn commit_and_memslot_delete_race_run_handles_and_walkers_pct() {
    shuttle::check_pct(race, 60, 3);
}
