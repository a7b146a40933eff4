//! Loom models of the host side racing the guest, on a tiny VM (an order-8 HPT of 16
//! HPTEs, 16 frames of RAM on 4 KiB host pages):
//!
//! * H_ENTER racing `unmap_hva_range` (the invalidation retry): after
//!   both, no VALID HPTE maps a host page that is not present;
//! * H_REMOVE racing aging: the R and C bits hardware set are reported (H_REMOVE's
//!   answer, the dirty bitmap) and the chain is empty;
//! * a vCPU fault (page-in) racing an invalidation: VALID implies the host page present;
//! * a dirty-log scan racing H_PROTECT: the C bit is reported by this or the next scan.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p revmap-hpt
//! --release --test loom_host`.
#![cfg(loom)]

use loom::thread;
use revmap_hpt::hcall::*;
use revmap_hpt::hpte::{HpteR, HpteV};
use revmap_hpt::vm::RAM_HVA_BASE;
use revmap_hpt::{Flavour, Vm, VmConfig};
use revmap_rmap::sync::Arc;
use revmap_rmap::{Gfn, Hva, Ptex, SlotId};

const GFN: u64 = 3;
const PTEH: u64 = (0x1234 << 7) | HpteV::VALID;
const PTEL: u64 = (GFN << 12) | HpteR::M | 2;

fn tiny_vm() -> Vm {
    Vm::new_small(VmConfig {
        ram_bytes: 16 << 12,
        hpt_order: 8,
        flavour: Flavour::Kvm,
        backing_page_shift: 12,
    })
    .unwrap()
}

mod common;
use common::{loom_model as model, spawn_absent_load_fault};

fn host_page() -> (Hva, Hva) {
    let a = Hva(RAM_HVA_BASE + (GFN << 12));
    (a, Hva(a.0 + 4096))
}

fn v_of(vm: &Vm, p: u32) -> u64 {
    vm.hpt().slot(Ptex(p)).unwrap().load_v()
}

fn host_present(vm: &Vm) -> bool {
    vm.memslots()
        .get(SlotId(0))
        .unwrap()
        .is_host_present(Gfn(GFN))
}

fn chain_present(vm: &Vm) -> bool {
    let slots = vm.memslots();
    slots
        .get(SlotId(0))
        .unwrap()
        .rmap(Gfn(GFN))
        .unwrap()
        .load()
        .is_present()
}

#[test]
fn h_enter_racing_unmap_never_leaves_valid_over_an_absent_page() {
    model(|| {
        let vm = Arc::new(tiny_vm());
        let t = {
            let vm = vm.clone();
            thread::spawn(move || vm.hcall(0, H_ENTER, &[H_EXACT, 0, PTEH, PTEL]))
        };
        let (a, b) = host_page();
        vm.unmap_hva_range(a, b);
        let r = t.join().unwrap();
        assert_eq!(r.ret, H_SUCCESS);
        let v = v_of(&vm, r.out[0] as u32);
        assert!(!host_present(&vm));
        assert_eq!(v & HpteV::VALID, 0, "VALID over a page the host took away");
        assert_eq!(v & HpteV::ABSENT, HpteV::ABSENT);
        assert!(!chain_present(&vm), "an ABSENT entry is on no chain");
    });
}

#[test]
fn h_remove_racing_aging_loses_no_rc() {
    model(|| {
        let vm = Arc::new(tiny_vm());
        let r = vm.hcall(0, H_ENTER, &[H_EXACT, 0, PTEH, PTEL]);
        assert_eq!(r.ret, H_SUCCESS);
        let p = r.out[0];
        // "Hardware" referenced and changed the page.
        vm.hpt().slot(Ptex(p as u32)).unwrap().hw_set_rc(HpteR::RC);
        let t = {
            let vm = vm.clone();
            thread::spawn(move || vm.age_gfn(SlotId(0), Gfn(GFN), Gfn(GFN + 1)))
        };
        let rm = vm.hcall(0, H_REMOVE, &[0, p, 0]);
        let young = t.join().unwrap();
        assert_eq!(rm.ret, H_SUCCESS);
        assert_eq!(rm.out[1] & HpteR::RC, HpteR::RC, "guest view keeps R and C");
        let slots = vm.memslots();
        let s = slots.get(SlotId(0)).unwrap();
        assert!(s.is_dirty(Gfn(GFN)), "C reached the dirty bitmap");
        let w = s.rmap(Gfn(GFN)).unwrap().load();
        assert!(!w.is_present());
        // R went to the ager or stayed recorded in the rmap word for the next one.
        assert!(young || w.referenced());
    });
}

#[test]
fn fault_racing_invalidation_never_maps_an_absent_page() {
    model(|| {
        let vm = Arc::new(tiny_vm());
        let (a, b) = host_page();
        // A paged-out entry: the host page is gone when the guest enters it.
        vm.unmap_hva_range(a, b);
        let r = vm.hcall(0, H_ENTER, &[H_EXACT, 0, PTEH, PTEL]);
        let p = Ptex(r.out[0] as u32);
        assert_eq!(v_of(&vm, p.0) & HpteV::ABSENT, HpteV::ABSENT);
        let t = spawn_absent_load_fault(&vm, p);
        vm.unmap_hva_range(a, b);
        t.join().unwrap();
        let v = v_of(&vm, p.0);
        if v & HpteV::VALID != 0 {
            assert!(host_present(&vm), "VALID over a page the host took away");
            assert!(chain_present(&vm));
        } else {
            assert!(!chain_present(&vm));
        }
    });
}

#[test]
fn dirty_scan_racing_h_protect_loses_no_c() {
    model(|| {
        let vm = Arc::new(tiny_vm());
        let r = vm.hcall(0, H_ENTER, &[H_EXACT, 0, PTEH, PTEL]);
        let p = r.out[0];
        vm.hpt().slot(Ptex(p as u32)).unwrap().hw_set_rc(HpteR::RC);
        let t = {
            let vm = vm.clone();
            thread::spawn(move || vm.get_dirty_log(SlotId(0)).unwrap()[0])
        };
        // Read-only and back is a real dword-1 change: invalidate + merge R/C (H_PROTECT fix).
        let pr = vm.hcall(0, H_PROTECT, &[3, p, 0]);
        assert_eq!(pr.ret, H_SUCCESS);
        let first = t.join().unwrap();
        let second = vm.get_dirty_log(SlotId(0)).unwrap()[0];
        assert_ne!(
            (first | second) & (1 << GFN),
            0,
            "the C bit was lost between the scan and H_PROTECT"
        );
        assert!(chain_present(&vm));
    });
}
