//! Conformance tests for H_RESIZE_HPT_PREPARE/COMMIT (polling, cancel, H_CLOSED/H_BUSY,
//! bad arguments, shrink collisions, same order, allocation failure), both flavours where
//! they differ, with the checker after every step.
use revmap_hpt::hcall::*;
use revmap_hpt::{Flavour, Vm, VmConfig};
use revmap_resize::ResizeVmExt;

const BOTH: [Flavour; 2] = [Flavour::Kvm, Flavour::Qemu];

fn vm(f: Flavour) -> Vm {
    // 32 MiB of RAM: RAM-derived order 18, so PREPARE accepts at most 19.
    revmap_resize::new_vm(VmConfig {
        ram_bytes: 32 << 20,
        hpt_order: 18,
        flavour: f,
        backing_page_shift: 24,
    })
    .unwrap()
}

fn prep(vm: &Vm, shift: u64) -> i64 {
    vm.hcall(0, H_RESIZE_HPT_PREPARE, &[0, shift]).ret
}
fn commit(vm: &Vm, shift: u64) -> i64 {
    vm.hcall(0, H_RESIZE_HPT_COMMIT, &[0, shift]).ret
}
fn prepared(vm: &Vm, shift: u64) {
    vm.resize_ctl().expect("resizer installed").wait_prepared();
    assert_eq!(prep(vm, shift), H_SUCCESS);
}

/// A bolted 4K entry (256M segment, vsid 0x42) at its primary group for page `page`.
fn enter_bolted(vm: &Vm, page: u64) -> u64 {
    let vsid = 0x42u64;
    let hash = vsid ^ page;
    let ptex = (hash & vm.hpt().geometry().mask()) * 8;
    let avpn = ((vsid << 28 | page << 12) >> 23) << 7;
    let r = vm.hcall(
        0,
        H_ENTER,
        &[0, ptex, avpn | 0x10 | 1, (page << 12) | 0x190],
    );
    assert_eq!(r.ret, H_SUCCESS);
    r.out[0]
}

#[test]
fn item27_prepare_busy_then_success_commit_moves_bolted_and_drops_others() {
    for f in BOTH {
        let vm = vm(f);
        let b = enter_bolted(&vm, 0x1801);
        let nb = vm.hcall(0, H_ENTER, &[0, 0, 0x4000_0000_0000_0001, 0x2190]);
        assert_eq!(nb.ret, H_SUCCESS);
        let r = prep(&vm, 19);
        assert!(r == H_LONG_BUSY_ORDER_100_MSEC, "{f}: {r}");
        prepared(&vm, 19);
        assert_eq!(prep(&vm, 19), H_SUCCESS, "repeatable");
        assert_eq!(commit(&vm, 19), H_SUCCESS);
        assert_eq!(vm.hpt_order(), 19);
        vm.check_invariants().unwrap();
        // Grow: group g -> g or g + 2^11; 0x1801 ^ 0x42 = 0x1843, new mask 0xfff.
        let want = (0x1843 & 0xfff) * 8 + (b % 8);
        let rd = vm.hcall(0, H_READ, &[0, want]);
        assert_eq!(rd.out[0] & 0x11, 0x11, "{f}: bolted entry at its new index");
        let rd = vm.hcall(0, H_READ, &[0, nb.out[0]]);
        assert_eq!(rd.out[0] & 1, 0, "{f}: non-bolted entry dropped");
        // Ranges use the new size.
        let top = (1u64 << 15) - 1;
        assert_eq!(vm.hcall(0, H_READ, &[0, top]).ret, H_SUCCESS);
        assert_eq!(vm.hcall(0, H_READ, &[0, top + 1]).ret, H_PARAMETER);
        // QEMU: never-written slots of the new table read 0, not 0x40.
        let free = vm.hcall(0, H_READ, &[0, 8]).out[0];
        assert_eq!(free, 0, "{f}");
        assert_eq!(commit(&vm, 19), H_CLOSED, "second commit after success");
    }
}

#[test]
fn item28_29_cancel_and_commit_refusals() {
    for f in BOTH {
        let vm = vm(f);
        assert_eq!(prep(&vm, 0), H_SUCCESS, "cancel with nothing pending");
        assert_eq!(commit(&vm, 19), H_CLOSED, "commit without prepare");
        assert_eq!(prep(&vm, 19), H_LONG_BUSY_ORDER_100_MSEC);
        assert_eq!(prep(&vm, 0), H_SUCCESS, "cancel during preparation");
        assert_eq!(commit(&vm, 18), H_CLOSED);
        prepared_after_start(&vm, 19);
        assert_eq!(commit(&vm, 18), H_CLOSED, "commit with a different order");
        // QEMU keeps the pending prepare on H_CLOSED; KVM released it.
        let again = commit(&vm, 19);
        match f {
            Flavour::Qemu => assert_eq!(again, H_SUCCESS),
            Flavour::Kvm => assert_eq!(again, H_CLOSED),
        }
        vm.resize_ctl().expect("resizer installed").wait_workers();
        assert_eq!(
            vm.resize_ctl().expect("resizer installed").stats().live(),
            0,
            "{f}: no leak"
        );
        vm.check_invariants().unwrap();
    }
}

fn prepared_after_start(vm: &Vm, shift: u64) {
    assert_eq!(prep(vm, shift), H_LONG_BUSY_ORDER_100_MSEC);
    prepared(vm, shift);
}

#[test]
fn item29_commit_while_allocating_is_busy() {
    for f in BOTH {
        let vm = vm(f);
        vm.resize_ctl()
            .expect("resizer installed")
            .hold_preparation(true);
        assert_eq!(prep(&vm, 19), H_LONG_BUSY_ORDER_100_MSEC);
        assert_eq!(commit(&vm, 19), H_BUSY);
        vm.resize_ctl()
            .expect("resizer installed")
            .hold_preparation(false);
        vm.resize_ctl().expect("resizer installed").wait_workers();
        assert_eq!(
            vm.resize_ctl().expect("resizer installed").stats().live(),
            u64::from(f == Flavour::Qemu)
        );
    }
}

#[test]
fn item30_argument_checks() {
    for f in BOTH {
        let vm = vm(f);
        for s in [17, 47, 1] {
            assert_eq!(prep(&vm, s), H_PARAMETER, "{f} shift {s}");
        }
        assert_eq!(vm.hcall(0, H_RESIZE_HPT_PREPARE, &[1, 19]).ret, H_PARAMETER);
        assert_eq!(vm.hcall(0, H_RESIZE_HPT_COMMIT, &[1, 19]).ret, H_PARAMETER);
        assert_eq!(prep(&vm, 20), H_RESOURCE, "above RAM order + 1");
    }
}

#[test]
fn item31_prepare_a_then_b_before_a_finishes_then_commit_b() {
    for f in BOTH {
        let vm = vm(f);
        let ctl = vm.resize_ctl().expect("resizer installed");
        ctl.hold_preparation(true);
        assert_eq!(prep(&vm, 19), H_LONG_BUSY_ORDER_100_MSEC);
        assert_eq!(
            prep(&vm, 18),
            H_LONG_BUSY_ORDER_100_MSEC,
            "A detached, B started"
        );
        ctl.hold_preparation(false);
        prepared(&vm, 18);
        assert_eq!(commit(&vm, 19), H_CLOSED);
        if f == Flavour::Kvm {
            prepared_after_start(&vm, 18);
        }
        assert_eq!(commit(&vm, 18), H_SUCCESS);
        ctl.wait_workers();
        let s = ctl.stats();
        assert_eq!(s.live(), 0, "{f}: no leak");
        vm.check_invariants().unwrap();
    }
}

#[test]
fn item32_shrink_collision_fails_and_keeps_old_table() {
    for f in BOTH {
        let vm = revmap_resize::new_vm(VmConfig {
            ram_bytes: 64 << 20,
            hpt_order: 19,
            flavour: f,
            backing_page_shift: 24,
        })
        .unwrap();
        // Two bolted entries in groups g and g + 2^11, same slot: collide at order 18.
        let a = enter_bolted(&vm, 0x0001);
        let b = enter_bolted(&vm, 0x0801);
        assert_eq!(a % 8, b % 8);
        prepared_after_start(&vm, 18);
        assert_eq!(commit(&vm, 18), H_PTEG_FULL);
        assert_eq!(vm.hpt_order(), 19);
        vm.check_invariants().unwrap();
        for p in [a, b] {
            assert_eq!(vm.hcall(0, H_READ, &[0, p]).out[0] & 0x11, 0x11, "{f}");
        }
        assert_eq!(commit(&vm, 18), H_CLOSED, "pending consumed");
    }
}

#[test]
fn item35_same_order_keeps_positions_item36_alloc_failure() {
    for f in BOTH {
        let vm = vm(f);
        let b = enter_bolted(&vm, 0x123);
        prepared_after_start(&vm, 18);
        assert_eq!(commit(&vm, 18), H_SUCCESS);
        assert_eq!(vm.hcall(0, H_READ, &[0, b]).out[0] & 0x11, 0x11);
        vm.resize_ctl()
            .expect("resizer installed")
            .inject_alloc_failure();
        assert_eq!(prep(&vm, 19), H_LONG_BUSY_ORDER_100_MSEC);
        vm.resize_ctl().expect("resizer installed").wait_prepared();
        assert_eq!(prep(&vm, 19), H_NO_MEM);
        match f {
            // QEMU keeps the failed request; commit answers H_NO_MEM (our policy).
            Flavour::Qemu => assert_eq!(commit(&vm, 19), H_NO_MEM),
            // KVM forgot it after reporting once.
            Flavour::Kvm => assert_eq!(commit(&vm, 19), H_CLOSED),
        }
        vm.check_invariants().unwrap();
    }
}
