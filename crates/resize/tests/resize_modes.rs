//! Pre-copy vs stop-the-world commit: the guest cannot tell them apart.
//!
//! * The resize trace replays in both modes, both flavours (bit-exact in the QEMU
//!   flavour, under `result_masks` in the KVM flavour), and every guest-visible result
//!   word (return codes and outputs, unmasked) is identical between the two modes.
//! * A random guest (bolted and non-bolted entries of several sizes, H_PROTECT,
//!   H_REMOVE, MMU stores) resized up and down in both modes gives identical H_READ
//!   dumps of the whole table after every commit, and the checker passes.
use revmap_hpt::hcall::*;
use revmap_hpt::{Flavour, Vm, VmConfig};
use revmap_resize::ResizeVmExt;
use revmap_resize::{PrecopyHold, ResizeMode};
use revmap_testkit::rng::Rng;

#[path = "../../hpt/tests/common/mod.rs"]
mod common;
use common::RESIZE;
mod support;
use support::{replay_trace, trace_vm, ResizeStep};
const MODES: [ResizeMode; 2] = [ResizeMode::StopTheWorld, ResizeMode::PreCopy];

/// Replay the resize trace; returns every guest-visible result word in order (empty if
/// the trace is absent).
fn replay(path: &str, flavour: Flavour, mode: ResizeMode) -> Vec<u64> {
    let vm = trace_vm(flavour);
    vm.resize_ctl().expect("resizer installed").set_mode(mode);
    assert_eq!(vm.resize_ctl().expect("resizer installed").mode(), mode);
    let mut commits = 0;
    let seen = replay_trace(&vm, path, flavour, &format!("{mode:?}"), |_, step| {
        if matches!(step, ResizeStep::Hcall { op, .. } if op == H_RESIZE_HPT_COMMIT) {
            commits += 1;
        }
    });
    vm.check_invariants().unwrap();
    assert!(commits >= 4, "the trace commits");
    seen
}

/// The resize trace in `flavour` gives the same guest-visible results in both modes.
fn same_results_in_both_modes(flavour: Flavour) {
    let [a, b] = MODES.map(|m| replay(RESIZE, flavour, m));
    assert!(
        a.len() > 373_000,
        "every record's results collected: {}",
        a.len()
    );
    assert_eq!(a.len(), b.len());
    assert!(a == b, "{flavour:?} flavour: the modes differ");
}

#[test]
fn resize_trace_same_guest_results_in_both_modes_qemu() {
    same_results_in_both_modes(Flavour::Qemu);
}

#[test]
fn resize_trace_same_guest_results_in_both_modes_kvm() {
    same_results_in_both_modes(Flavour::Kvm);
}

/// Every slot as H_READ presents it.
/// One slot as H_READ presents it: (return code, dword 0, dword 1).
type Slot = (i64, u64, u64);

/// The first slot where two VMs' tables differ.
fn diff(a: &Vm, b: &Vm) -> Option<(usize, Slot, Slot)> {
    let (x, y) = (dump(a), dump(b));
    x.iter()
        .zip(&y)
        .enumerate()
        .find(|(_, (p, q))| p != q)
        .map(|(i, (p, q))| (i, *p, *q))
}

fn dump(vm: &Vm) -> Vec<Slot> {
    let n = vm.hpt().geometry().npte();
    (0..n)
        .map(|p| {
            let r = vm.hcall(0, H_READ, &[0, p]);
            (r.ret, r.out[0], r.out[1])
        })
        .collect()
}

/// One random guest step on `vm`; returns its guest-visible result.
fn step(vm: &Vm, rng: &mut Rng, live: &mut Vec<u64>) -> (i64, [u64; 2]) {
    let geo = vm.hpt().geometry();
    match rng.below(10) {
        0..=5 => {
            let vsid = 0x40 + rng.below(8);
            let page = rng.below(1 << 16);
            let bolted = rng.below(16) == 0;
            let (lp, actual, gfn) = if rng.below(4) == 0 {
                (0x1000, 16, rng.below(1 << 10) << 4)
            } else {
                (0, 12, rng.below(1 << 14))
            };
            let ea = page << actual;
            let va = (vsid << 28) | (ea & 0xfff_ffff);
            let hash = vsid ^ ((ea & 0xfff_ffff) >> 12);
            let _ = va;
            let avpn = (((vsid << 28) | (ea & 0xfff_ffff)) >> 23) << 7;
            let mut v = avpn | 1;
            if bolted {
                v |= 0x10;
            }
            if actual != 12 {
                v |= 0x4;
            }
            let secondary = rng.below(4) == 0;
            let group = if secondary {
                v |= 0x2;
                !hash & geo.mask()
            } else {
                hash & geo.mask()
            };
            let r = vm.hcall(0, H_ENTER, &[0, group * 8, v, (gfn << 12) | lp | 0x190]);
            if r.ret == H_SUCCESS {
                live.push(r.out[0]);
            }
            (r.ret, [r.out[0], 0])
        }
        6 | 7 if !live.is_empty() => {
            let i = rng.below(live.len() as u64) as usize;
            let p = live.swap_remove(i);
            let r = vm.hcall(0, H_REMOVE, &[0, p, 0]);
            (r.ret, [r.out[0], r.out[1]])
        }
        _ if !live.is_empty() => {
            let p = live[rng.below(live.len() as u64) as usize];
            let pp = rng.below(4);
            let r = vm.hcall(0, H_PROTECT, &[pp, p, 0]);
            (r.ret, [0, 0])
        }
        _ => (0, [0, 0]),
    }
}

fn commit_to(vm: &Vm, order: u64) -> i64 {
    let r = vm.hcall(0, H_RESIZE_HPT_PREPARE, &[0, order]).ret;
    assert!(r == H_SUCCESS || r == H_LONG_BUSY_ORDER_100_MSEC, "{r}");
    vm.resize_ctl().expect("resizer installed").wait_prepared();
    vm.hcall(0, H_RESIZE_HPT_COMMIT, &[0, order]).ret
}

#[test]
fn random_guest_same_tables_in_both_modes() {
    for flavour in [Flavour::Kvm, Flavour::Qemu] {
        for seed in 1..=6u64 {
            let vms = MODES.map(|m| {
                let vm = revmap_resize::new_vm(VmConfig {
                    ram_bytes: 64 << 20,
                    hpt_order: 18,
                    flavour,
                    backing_page_shift: 24,
                })
                .unwrap();
                vm.resize_ctl().expect("resizer installed").set_mode(m);
                vm
            });
            let mut rngs = [Rng::new(seed * 0x9E37_79B9), Rng::new(seed * 0x9E37_79B9)];
            let mut lives = [Vec::new(), Vec::new()];
            let mut order_rng = Rng::new(seed + 77);
            let mut commits = [0u32; 2];
            for round in 0..6 {
                for _ in 0..600 {
                    let a = step(&vms[0], &mut rngs[0], &mut lives[0]);
                    let b = step(&vms[1], &mut rngs[1], &mut lives[1]);
                    assert_eq!(a, b, "{flavour} seed {seed} round {round}");
                }
                let order = 18 + order_rng.below(3);
                let rets = [commit_to(&vms[0], order), commit_to(&vms[1], order)];
                assert_eq!(rets[0], rets[1], "{flavour} seed {seed}: commit to {order}");
                for (k, vm) in vms.iter().enumerate() {
                    vm.check_invariants().unwrap();
                    if rets[k] == H_SUCCESS {
                        commits[k] += 1;
                        // The non-bolted entries are gone: forget them.
                        lives[k].retain(|&p| vm.hcall(0, H_READ, &[0, p]).out[0] & 0x11 == 0x11);
                    }
                }
                assert_eq!(lives[0], lives[1]);
                assert!(
                    dump(&vms[0]) == dump(&vms[1]),
                    "{flavour} seed {seed} round {round}: tables differ"
                );
            }
            assert!(
                commits[0] >= 3,
                "{flavour} seed {seed}: too few successful commits"
            );
        }
    }
}

/// H_ENTER arguments: a 4K entry for `page` (vsid 0x42) in its primary group of a table
/// of `mask`, exact `slot`.
fn exact(mask: u64, page: u64, slot: u64, gfn: u64, bolted: bool) -> [u64; 4] {
    let vsid = 0x42u64;
    let ptex = ((vsid ^ page) & mask) * 8 + slot;
    let avpn = (((vsid << 28) | (page << 12)) >> 23) << 7;
    let b = if bolted { 0x10 } else { 0 };
    [H_EXACT, ptex, avpn | b | 1, (gfn << 12) | 0x190]
}

/// Run `commit` to `order` on both VMs; on the pre-copy one, apply `changes` between
/// its copy and its stop, on the stop-the-world one before the commit. Returns the
/// two return codes.
fn commit_with_changes(
    vms: &[Vm; 2],
    order: u64,
    at: PrecopyHold,
    changes: impl Fn(&Vm),
) -> [i64; 2] {
    changes(&vms[0]);
    let a = commit_to(&vms[0], order);
    let ctl = vms[1].resize_ctl().expect("resizer installed");
    ctl.hold_precopy_commit(at);
    let b = std::thread::scope(|s| {
        let h = s.spawn(|| commit_to(&vms[1], order));
        while !ctl.precopy_commit_held() {
            if h.is_finished() {
                let r = h.join().unwrap();
                panic!("the commit to {order} never reached {at:?}: {r}");
            }
            std::thread::yield_now();
        }
        changes(&vms[1]);
        ctl.hold_precopy_commit(PrecopyHold::None);
        h.join().unwrap()
    });
    [a, b]
}

/// Both modes' commits succeeded (`rets`), both VMs pass the checker at `order`, and
/// their tables read back identically (no change was lost or applied twice).
fn assert_committed_alike(vms: &[Vm; 2], rets: [i64; 2], order: u32, what: &str) {
    assert_eq!(rets, [H_SUCCESS, H_SUCCESS], "{what}");
    for vm in vms {
        vm.check_invariants().unwrap();
        assert_eq!(vm.hpt_order(), order, "{what}");
    }
    assert_eq!(diff(&vms[0], &vms[1]), None, "{what}: tables differ");
}

/// Both flavours, with the pre-copy commit held before its copy rounds and before its
/// stop: the guest changes the table at each of those points.
const HOLD_CASES: [(Flavour, PrecopyHold); 4] = [
    (Flavour::Kvm, PrecopyHold::BeforeRounds),
    (Flavour::Kvm, PrecopyHold::BeforeStop),
    (Flavour::Qemu, PrecopyHold::BeforeRounds),
    (Flavour::Qemu, PrecopyHold::BeforeStop),
];

fn two_vms(flavour: Flavour, order: u32) -> [Vm; 2] {
    MODES.map(|m| {
        let vm = revmap_resize::new_vm(VmConfig {
            ram_bytes: 64 << 20,
            hpt_order: order,
            flavour,
            backing_page_shift: 24,
        })
        .unwrap();
        vm.resize_ctl().expect("resizer installed").set_mode(m);
        vm
    })
}

#[test]
fn changes_between_copy_and_stop_are_reapplied() {
    use revmap_hpt::mmu::{Access, Fault};
    use revmap_rmap::Ptex;
    for (flavour, at) in HOLD_CASES {
        let vms = two_vms(flavour, 18);
        let m18 = (1u64 << 11) - 1;
        for vm in &vms {
            for k in 0..6 {
                let r = vm.hcall(0, H_ENTER, &exact(m18, 0x100 + k, k % 8, 0x200 + k, true));
                assert_eq!(r.ret, H_SUCCESS);
                let r = vm.hcall(0, H_ENTER, &exact(m18, 0x300 + k, 1, 0x400 + k, false));
                assert_eq!(r.ret, H_SUCCESS);
            }
        }
        let ptex = |page: u64, slot: u64| ((0x42 ^ page) & m18) * 8 + slot;
        let rets = commit_with_changes(&vms, 19, at, |vm| {
            // Remove a copied bolted entry, re-protect another, enter new bolted and
            // non-bolted entries, replace one bolted entry by another at its slot,
            // and page a drained bolted entry back in (VALID again).
            assert_eq!(
                vm.hcall(1, H_REMOVE, &[0, ptex(0x100, 0), 0]).ret,
                H_SUCCESS
            );
            assert_eq!(
                vm.hcall(1, H_PROTECT, &[3, ptex(0x101, 1), 0]).ret,
                H_SUCCESS
            );
            let r = vm.hcall(1, H_ENTER, &exact(m18, 0x500, 4, 0x600, true));
            assert_eq!(r.ret, H_SUCCESS);
            let r = vm.hcall(1, H_ENTER, &exact(m18, 0x501, 2, 0x601, false));
            assert_eq!(r.ret, H_SUCCESS);
            assert_eq!(
                vm.hcall(1, H_REMOVE, &[0, ptex(0x102, 2), 0]).ret,
                H_SUCCESS
            );
            let mut args = exact(m18, 0x102, 2, 0x700, true);
            args[2] |= 0x8; // a guest software bit: a different dword 0
            assert_eq!(vm.hcall(1, H_ENTER, &args).ret, H_SUCCESS);
            let f = Fault::Absent {
                ptex: Ptex(ptex(0x103, 3) as u32),
                mmio: false,
            };
            let _ = vm.page_fault(1, &f, Access::Load);
        });
        assert_committed_alike(&vms, rets, 19, &format!("{flavour} {at:?}"));

        // Shrink 19 -> 18: two bolted entries fold onto one slot. The copy notes the
        // collision; the guest removes one before the stop: both modes succeed.
        let m19 = (1u64 << 12) - 1;
        for vm in &vms {
            for page in [0x001u64, 0x801] {
                let r = vm.hcall(0, H_ENTER, &exact(m19, page, 7, 0x50 + page % 8, true));
                assert_eq!(r.ret, H_SUCCESS);
            }
        }
        let rets = commit_with_changes(&vms, 18, at, |vm| {
            let p = ((0x42 ^ 0x801) & m19) * 8 + 7;
            assert_eq!(vm.hcall(1, H_REMOVE, &[0, p, 0]).ret, H_SUCCESS);
        });
        assert_committed_alike(
            &vms,
            rets,
            18,
            &format!("{flavour} {at:?}: collision resolved"),
        );

        // Grow again, then shrink with a collision the guest creates between the
        // copy and the stop: both modes fail with H_PTEG_FULL, old table kept.
        assert_eq!(
            commit_with_changes(&vms, 19, at, |_| {}),
            [H_SUCCESS, H_SUCCESS]
        );
        let rets = commit_with_changes(&vms, 18, at, |vm| {
            let r = vm.hcall(1, H_ENTER, &exact(m19, 0x801, 7, 0x77, true));
            assert_eq!(r.ret, H_SUCCESS);
        });
        assert_eq!(rets, [H_PTEG_FULL, H_PTEG_FULL], "{flavour}");
        for vm in &vms {
            vm.check_invariants().unwrap();
            assert_eq!(vm.hpt_order(), 19);
            vm.resize_ctl().expect("resizer installed").wait_workers();
            assert_eq!(
                vm.resize_ctl().expect("resizer installed").stats().live(),
                0
            );
        }
        assert!(
            dump(&vms[0]) == dump(&vms[1]),
            "{flavour}: old tables differ"
        );
    }
}

/// The pre-copy change bitmap (one bit per HPTE, `fetch_or` by the vCPUs, words
/// swapped out by the copier) loses no change made between the copy and the stop:
/// eight vCPU threads change, at the same time, the 64 bolted entries of eight groups
/// that share one bitmap word (protect, remove, replace, re-enter) and the last slot of
/// the table (the last word). Any lost mark leaves a stale copy in the new table, which
/// the H_READ dump compared with the stop-the-world VM (same changes, made before its
/// commit) shows.
#[test]
fn concurrent_changes_in_one_bitmap_word_are_all_reapplied() {
    let m18 = (1u64 << 11) - 1;
    // Group `g`'s entry for slot `k`: bit 11 of the page splits the group's entries
    // between the two groups it rehashes to when the table grows.
    let page = |g: u64, k: u64| (0x42 ^ g) | ((k & 1) << 11);
    let groups = 0x100u64..0x108;
    for (flavour, at) in HOLD_CASES {
        let vms = two_vms(flavour, 18);
        for vm in &vms {
            for g in groups.clone() {
                for k in 0..8 {
                    let r = vm.hcall(
                        0,
                        H_ENTER,
                        &exact(m18, page(g, k), k, 0x800 + g * 8 + k, true),
                    );
                    assert_eq!(r.ret, H_SUCCESS);
                }
            }
            let r = vm.hcall(0, H_ENTER, &exact(m18, 0x42 ^ m18, 7, 0x3ff, true));
            assert_eq!(
                (r.ret, r.out[0]),
                (H_SUCCESS, vm.hpt().geometry().npte() - 1)
            );
        }
        let rets = commit_with_changes(&vms, 19, at, |vm| {
            std::thread::scope(|s| {
                for (t, g) in groups.clone().enumerate() {
                    s.spawn(move || {
                        let vcpu = t + 1;
                        let p = |k: u64| g * 8 + k;
                        for k in 0..3 {
                            assert_eq!(vm.hcall(vcpu, H_PROTECT, &[k + 1, p(k), 0]).ret, H_SUCCESS);
                        }
                        for k in 3..6 {
                            assert_eq!(vm.hcall(vcpu, H_REMOVE, &[0, p(k), 0]).ret, H_SUCCESS);
                        }
                        // Replace slot 6 by another bolted entry (another frame).
                        assert_eq!(vm.hcall(vcpu, H_REMOVE, &[0, p(6), 0]).ret, H_SUCCESS);
                        let args = exact(m18, page(g, 6), 6, 0x1800 + g, true);
                        assert_eq!(vm.hcall(vcpu, H_ENTER, &args).ret, H_SUCCESS);
                        // Re-enter slot 3 with a guest software bit in dword 0.
                        let mut args = exact(m18, page(g, 3), 3, 0x2800 + g, true);
                        args[2] |= 0x8;
                        assert_eq!(vm.hcall(vcpu, H_ENTER, &args).ret, H_SUCCESS);
                    });
                }
                s.spawn(|| {
                    let last = vm.hpt().geometry().npte() - 1;
                    assert_eq!(vm.hcall(9, H_PROTECT, &[2, last, 0]).ret, H_SUCCESS);
                });
            });
        });
        assert_committed_alike(
            &vms,
            rets,
            19,
            &format!("{flavour} {at:?}: a change between copy and stop"),
        );
    }
}
