//! Shuttle tests of the host side against a running guest, larger than the loom models:
//!
//! * a vCPU storing through its MMU (with the fault path), the guest changing
//!   protections and clearing C, and a host thread reclaiming pages, aging and
//!   harvesting dirty logs: every page stored to appears in some dirty log (no lost C),
//!   the whole-VM checker passes at the end;
//! * a memslot move racing H_ENTER into the old range: readers see the slot INVALID in
//!   some schedule, entries made then are MMIO, nothing VALID is left in the old range;
//! * clearing `mmu_ready` racing a page-in: once cleared, the entry no longer changes.
//!
//! Run: `RUSTFLAGS="--cfg shuttle" CARGO_TARGET_DIR=target/shuttle cargo test -p revmap-hpt --release --test shuttle_host`.
#![cfg(shuttle)]

mod common;
use common::{check, small_vm, spawn_absent_load_fault, SEG};

use revmap_hpt::hash::{hpt_hash, primary_pteg};
use revmap_hpt::hcall::*;
use revmap_hpt::hpte::{encode_avpn, HpteR, HpteV};
use revmap_hpt::mmu::{Access, AccessOutcome, Fault, VcpuMmu};
use revmap_hpt::vm::RAM_HVA_BASE;
use revmap_hpt::{MemslotFlags, MemslotSpec, Vm};
use revmap_rmap::sync::{thread, Arc, AtomicU64, Ordering};
use revmap_rmap::{Gfn, Hva, Ptex, SlotId};
use shuttle::rand::{thread_rng, RngCore};

const PAGES: u64 = 8;

/// Map ea page k -> gfn `gfn`; returns the ptex.
fn enter(vm: &Vm, k: u64, gfn: u64, pp: u64) -> u64 {
    let ea = k << 12;
    let group = primary_pteg(vm.hpt().geometry(), hpt_hash(&SEG, ea)) * 8;
    let pteh = encode_avpn(SEG.va(ea), 12, false) | HpteV::VALID;
    let r = vm.hcall(0, H_ENTER, &[0, group, pteh, (gfn << 12) | HpteR::M | pp]);
    assert_eq!(r.ret, H_SUCCESS);
    r.out[0]
}

fn no_lost_dirty_page() {
    let vm = Arc::new(small_vm());
    let ptes: Vec<u64> = (0..PAGES).map(|k| enter(&vm, k, k, 2)).collect();
    let stored = Arc::new(AtomicU64::new(0));
    let logged = Arc::new(AtomicU64::new(0));
    let vcpu = {
        let (vm, stored) = (vm.clone(), stored.clone());
        thread::spawn(move || {
            let mut mmu = VcpuMmu::new(&vm).unwrap();
            let mut rng = thread_rng();
            for _ in 0..6 {
                let k = rng.next_u64() % PAGES;
                match mmu.access(&SEG, k << 12, Access::Store) {
                    AccessOutcome::Done(_) => {
                        stored.fetch_or(1 << k, Ordering::SeqCst);
                    }
                    // Read-only for now (the guest thread toggles protections).
                    AccessOutcome::GuestFault(Fault::Protection { .. }) => {}
                    other => panic!("store to page {k}: {other:?}"),
                }
            }
        })
    };
    let guest = {
        let (vm, ptes) = (vm.clone(), ptes.clone());
        thread::spawn(move || {
            let mut rng = thread_rng();
            for _ in 0..3 {
                let p = ptes[(rng.next_u64() % PAGES) as usize];
                match rng.next_u64() % 3 {
                    0 => vm.hcall(0, H_PROTECT, &[3, p, 0]),
                    1 => vm.hcall(0, H_PROTECT, &[2, p, 0]),
                    _ => vm.hcall(0, H_CLEAR_MOD, &[0, p]),
                };
            }
        })
    };
    let host = {
        let (vm, logged) = (vm.clone(), logged.clone());
        thread::spawn(move || {
            let mut rng = thread_rng();
            for _ in 0..3 {
                let k = rng.next_u64() % PAGES;
                let a = Hva(RAM_HVA_BASE + (k << 12));
                match rng.next_u64() % 3 {
                    0 => {
                        vm.unmap_hva_range(a, Hva(a.0 + 4096));
                    }
                    1 => {
                        vm.age_gfn(SlotId(0), Gfn(k), Gfn(k + 1));
                    }
                    _ => {
                        let log = vm.get_dirty_log(SlotId(0)).unwrap();
                        logged.fetch_or(log[0], Ordering::SeqCst);
                    }
                }
            }
        })
    };
    vcpu.join().unwrap();
    guest.join().unwrap();
    host.join().unwrap();
    let last = vm.get_dirty_log(SlotId(0)).unwrap()[0];
    let all = logged.load(Ordering::SeqCst) | last;
    let s = stored.load(Ordering::SeqCst);
    assert_eq!(s & !all, 0, "stored {s:#x} but logged only {all:#x}");
    check(&vm);
}

#[test]
fn no_lost_dirty_page_random() {
    shuttle::check_random(no_lost_dirty_page, 600);
}

#[test]
fn no_lost_dirty_page_pct() {
    shuttle::check_pct(no_lost_dirty_page, 600, 3);
}

static SAW_INVALID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn move_races_h_enter() {
    let vm = Arc::new(small_vm());
    let old = 0x100u64;
    vm.create_memslot(MemslotSpec {
        id: SlotId(1),
        base_gfn: Gfn(old),
        npages: 8,
        userspace_addr: Hva(0x7f00_0000_0000),
        backing_page_shift: 12,
        flags: MemslotFlags::LOG_DIRTY_PAGES,
    })
    .unwrap();
    for k in 0..3 {
        enter(&vm, 0x10 + k, old + k, 2);
    }
    let mover = {
        let vm = vm.clone();
        thread::spawn(move || vm.move_memslot(SlotId(1), Gfn(0x200)).unwrap())
    };
    let guest = {
        let vm = vm.clone();
        thread::spawn(move || {
            for k in 3..5 {
                let invalid = vm
                    .memslots()
                    .get(SlotId(1))
                    .is_some_and(|s| s.flags().contains(MemslotFlags::INVALID));
                if invalid {
                    SAW_INVALID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                enter(&vm, 0x10 + k, old + k, 2);
            }
        })
    };
    mover.join().unwrap();
    guest.join().unwrap();
    vm.check_slot_flushed(Gfn(old), Gfn(old + 8)).unwrap();
    check(&vm);
    let slots = vm.memslots();
    let s = slots.get(SlotId(1)).unwrap();
    assert_eq!(s.base_gfn(), Gfn(0x200));
    assert!(s.rmaps().iter().all(|r| !r.load().is_present()));
}

#[test]
fn move_races_h_enter_random() {
    shuttle::check_random(move_races_h_enter, 400);
    assert!(
        SAW_INVALID.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no schedule observed the INVALID step"
    );
}

fn mmu_ready_stops_page_in() {
    let vm = Arc::new(small_vm());
    let p = Ptex(enter(&vm, 1, 1, 2) as u32);
    vm.unmap_gfn_range(SlotId(0), Gfn(1), Gfn(2));
    let fault = spawn_absent_load_fault(&vm, p);
    vm.set_mmu_ready(false);
    let v1 = vm.hpt().slot(p).unwrap().load_v();
    fault.join().unwrap();
    let v2 = vm.hpt().slot(p).unwrap().load_v();
    assert_eq!(
        v1, v2,
        "a fault changed the HPT after mmu_ready was cleared"
    );
    check(&vm);
}

#[test]
fn mmu_ready_stops_page_in_random() {
    shuttle::check_random(mmu_ready_stops_page_in, 1000);
}
