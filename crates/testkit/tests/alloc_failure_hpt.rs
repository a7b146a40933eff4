//! Allocation failure everywhere in a representative run of the HPT MMU with live
//! resizing: VM creation, a second memslot with dirty logging, H_ENTER/H_PROTECT/H_READ/
//! H_REMOVE/H_BULK_REMOVE, the host-side walkers (aging, unmap, dirty log), a resize up
//! and a resize down, memslot deletion. For every k the k-th allocation fails; the
//! failure must surface as a clean error (a PAPR return code or a host error), the VM
//! must pass `check_invariants` afterwards, and the run must continue
//! (`revmap_testkit::failalloc` has the contract).
//!
//! Every allocation a guest or a host walker can trigger fails cleanly: H_ENTER and
//! the other hypercalls return a PAPR code; H_RESIZE_HPT_PREPARE only posts a job to
//! the VM's persistent preparation worker (no thread per preparation), whose table and
//! pre-copy change bitmap are allocated fallibly (H_NO_MEM at the next PREPARE or
//! COMMIT); the pre-copy COMMIT installs that bitmap through a recycled pair of `Arc`s
//! (allocating nothing); memslot publication recycles a spare `Arc` too. What remains
//! infallible is only VM and memslot creation, because stable Rust has no fallible
//! `Arc::new` and no fallible thread spawn:
//!
//! * set-up (`revmap_resize::new_vm`): the `Arc`s of the resize state
//!   (`ResizeCtl::new`), of the RAM memslot's data (`Memslot::with_memory`), of the
//!   change tracker's bitmap cell and its spare (`ChangeTracker::new`), of the memslot
//!   set and its spare (`SlotSet::new`) and of the VM (`Vm::with_hpt`); and spawning
//!   the preparation worker (`revmap_resize::worker::spawn`: the thread's handle and
//!   start-up, which `spawn` waits for so that it is counted here, not later);
//! * `create_memslot`: the new memslot's data `Arc` (`Memslot::with_memory`).

use revmap_hpt::hcall::*;
use revmap_hpt::hpte::{HpteR, HpteV};
use revmap_hpt::papr::{BulkMatch, BulkRemoveRequest, RemoveFlags};
use revmap_hpt::vm::RAM_HVA_BASE;
use revmap_hpt::{Flavour, MemslotFlags, MemslotSpec, PaprError, Ptex, VcpuId, Vm, VmConfig};
use revmap_resize::ResizeVmExt;
use revmap_rmap::{Gfn, Hva, SlotId};
use revmap_testkit::failalloc::{self, FailingAlloc, FaultRun};

#[global_allocator]
static ALLOC: FailingAlloc = FailingAlloc;

/// Frames of the RAM slot (slot 0) and of the logged slot (slot 1).
const RAM_FRAMES: u64 = 4096;
const SLOT1_BASE: u64 = 0x10_0000;
const SLOT1_FRAMES: u64 = 512;
/// Entries entered: half in each slot.
const ENTRIES: u64 = 96;

struct HptRun {
    flavour: Flavour,
}

/// The HPTE index, dword 0 and guest dword 1 of entry `i` (4 KiB pages, spread over
/// the table and over both slots' frames).
fn entry(i: u64) -> (u64, u64, u64) {
    let ptex = (i * 168 + 3) % (1 << 14);
    let gfn = if i % 2 == 0 {
        (i * 37) % RAM_FRAMES
    } else {
        SLOT1_BASE + (i * 11) % SLOT1_FRAMES
    };
    let v = ((i + 1) << HpteV::AVPN_SHIFT) | HpteV::VALID;
    let r = (gfn << 12) | HpteR::M | 2;
    (ptex, v, r)
}

fn ret(what: &str, got: i64, ok: &[i64]) -> Result<(), String> {
    if got == H_SUCCESS || ok.contains(&got) {
        Ok(())
    } else {
        Err(format!("{what} returned {got}"))
    }
}

fn vcpu0() -> VcpuId {
    VcpuId::new(0).unwrap_or_else(|e| panic!("{e}"))
}

/// The indices of every used (valid or host-unmapped) entry of the table.
fn used(vm: &Vm) -> Vec<Ptex> {
    let n = vm.hpt().slots().len();
    (0..n as u32)
        .map(Ptex)
        .filter(|&p| {
            vm.hpt()
                .slot(p)
                .is_some_and(|s| HpteV(s.load_v()).is_used())
        })
        .collect()
}

fn resize(vm: &Vm, shift: u32) -> Result<(), String> {
    let ctl = vm.resize_ctl().ok_or("no resizer installed")?;
    loop {
        let r = vm
            .hcall(0, H_RESIZE_HPT_PREPARE, &[0, u64::from(shift)])
            .ret;
        if is_long_busy(r) {
            ctl.wait_prepared();
            continue;
        }
        if r != H_SUCCESS {
            // As a guest does after a failed preparation: cancel it (shift 0) so that
            // the next PREPARE starts afresh (QEMU keeps a failed preparation for the
            // same shift until it is cancelled).
            let cancel = vm.hcall(0, H_RESIZE_HPT_PREPARE, &[0, 0]).ret;
            return Err(format!(
                "H_RESIZE_HPT_PREPARE returned {r} (cancel: {cancel})"
            ));
        }
        break;
    }
    let r = vm.hcall(0, H_RESIZE_HPT_COMMIT, &[0, u64::from(shift)]).ret;
    ret("H_RESIZE_HPT_COMMIT", r, &[])?;
    if vm.hpt_order() != shift {
        return Err(format!(
            "order {} after a commit to {shift}",
            vm.hpt_order()
        ));
    }
    Ok(())
}

impl FaultRun for HptRun {
    type State = Vm;

    fn setup(&self) -> Result<Vm, String> {
        revmap_resize::new_vm(VmConfig {
            ram_bytes: RAM_FRAMES << 12,
            hpt_order: 18,
            flavour: self.flavour,
            backing_page_shift: 12,
        })
        .map_err(|e| e.to_string())
    }

    fn steps(&self) -> &'static [&'static str] {
        &[
            "create_memslot",
            "h_enter",
            "h_protect",
            "h_read",
            "age_gfn",
            "get_dirty_log",
            "resize_grow",
            "unmap_gfn_range",
            "h_remove",
            "h_bulk_remove",
            "resize_shrink",
            "delete_memslot",
        ]
    }

    fn step(&self, vm: &mut Vm, i: usize) -> Result<(), String> {
        let entries = || (0..ENTRIES).map(entry);
        match i {
            0 => vm
                .create_memslot(MemslotSpec {
                    id: SlotId(1),
                    base_gfn: Gfn(SLOT1_BASE),
                    npages: SLOT1_FRAMES,
                    userspace_addr: Hva(RAM_HVA_BASE + (1 << 40)),
                    backing_page_shift: 12,
                    flags: MemslotFlags::LOG_DIRTY_PAGES,
                })
                .map_err(|e| e.to_string()),
            1 => {
                for (p, v, r) in entries() {
                    let res = vm.hcall(0, H_ENTER, &[H_EXACT, p, v, r]).ret;
                    // A repeated step finds its earlier entries in place.
                    ret("H_ENTER", res, &[H_PTEG_FULL])?;
                }
                Ok(())
            }
            2 => {
                for (p, v, _) in entries().take(32) {
                    let avpn = v & !0x7f;
                    let res = vm.hcall(0, H_PROTECT, &[H_AVPN | 3, p, avpn]).ret;
                    ret("H_PROTECT", res, &[])?;
                }
                Ok(())
            }
            3 => {
                for (p, _, _) in entries() {
                    let res = vm.hcall(0, H_READ, &[0, p & !3]).ret;
                    ret("H_READ", res, &[])?;
                }
                Ok(())
            }
            4 => {
                vm.age_gfn(SlotId(0), Gfn(0), Gfn(RAM_FRAMES));
                Ok(())
            }
            5 => vm
                .get_dirty_log(SlotId(1))
                .map(drop)
                .map_err(|e| e.to_string()),
            6 => resize(vm, 19),
            7 => {
                vm.unmap_gfn_range(SlotId(0), Gfn(0), Gfn(RAM_FRAMES / 2));
                Ok(())
            }
            8 => {
                // The resize moved the entries: find them in the table.
                for p in used(vm).into_iter().take(ENTRIES as usize / 2) {
                    match vm.h_remove(vcpu0(), RemoveFlags::empty(), p, 0) {
                        Ok(_) | Err(PaprError::NotFound) => {}
                        Err(e) => return Err(format!("H_REMOVE {p:?}: {e:?}")),
                    }
                }
                Ok(())
            }
            9 => {
                let reqs: Vec<BulkRemoveRequest> = used(vm)
                    .into_iter()
                    .map(|ptex| BulkRemoveRequest {
                        ptex,
                        matching: BulkMatch::Absolute,
                        avpn: 0,
                    })
                    .collect();
                for batch in reqs.chunks(H_BULK_REMOVE_MAX_BATCH) {
                    vm.h_bulk_remove(vcpu0(), batch)
                        .map_err(|e| format!("H_BULK_REMOVE: {e:?}"))?;
                }
                if used(vm).is_empty() {
                    Ok(())
                } else {
                    Err("entries left after H_BULK_REMOVE of every used entry".into())
                }
            }
            10 => resize(vm, 18),
            11 => vm.delete_memslot(SlotId(1)).map_err(|e| e.to_string()),
            _ => Err(format!("no step {i}")),
        }
    }

    fn check(&self, vm: &Vm) -> Result<(), String> {
        vm.check_invariants().map(drop).map_err(|e| e.to_string())
    }
}

fn sweep(flavour: Flavour, name: &str) {
    let Some(rep) = failalloc::sweep_test(name, &HptRun { flavour }) else {
        return;
    };
    println!("{flavour:?}");
    // Every failure a guest or a host walker triggers is returned as an error by the
    // call that allocated: nothing absorbed, nothing lost.
    assert_eq!(rep.absorbed, 0, "{rep:#?}");
    assert_eq!(
        rep.surfaced + rep.not_reached + rep.infallible.len() as u64,
        rep.allocations,
        "{rep:#?}"
    );
    assert!(rep.surfaced >= 2 * rep.infallible.len() as u64, "{rep:#?}");
    // Only VM and memslot creation keep infallible allocations (module docs): none in
    // a hypercall (resizes included), a host walker or a memslot deletion.
    assert!(rep.infallible.len() <= 13, "{rep:#?}");
    let workers = rep
        .infallible
        .iter()
        .filter(|s| s.contains("revmap_resize::worker::spawn") || s.contains("start-up"))
        .count();
    assert!(workers <= 5, "more than one worker spawned: {rep:#?}");
    for site in &rep.infallible {
        let in_setup = site.contains(" in setup: ")
            && [
                "revmap_resize::state::ResizeCtl::new",
                "revmap_resize::worker::spawn",
                "a new thread's start-up",
                "revmap_host::Memslot::with_memory",
                "revmap_hpt::resize::track::ChangeTracker::new",
                "revmap_host::slots::SlotSet::new",
                "revmap_hpt::vm::Vm::with_hpt",
            ]
            .iter()
            .any(|f| site.contains(f));
        let memslot_data = site.contains(" in create_memslot: ")
            && site.contains("revmap_host::Memslot::with_memory");
        assert!(
            in_setup || memslot_data,
            "an infallible allocation outside VM/memslot creation: {site}"
        );
    }
}

#[test]
fn every_allocation_of_an_hpt_run_with_resizes_can_fail_kvm() {
    sweep(
        Flavour::Kvm,
        "every_allocation_of_an_hpt_run_with_resizes_can_fail_kvm",
    );
}

#[test]
fn every_allocation_of_an_hpt_run_with_resizes_can_fail_qemu() {
    sweep(
        Flavour::Qemu,
        "every_allocation_of_an_hpt_run_with_resizes_can_fail_qemu",
    );
}
