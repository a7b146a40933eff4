//! The nested MMU on the host layer ([`NestedVm`]): L0's table for L1 (R always, C with
//! W on a write fault, 2 MiB leaves over 2 MiB host pages, 4 KiB PAGE_SIZE), the nested
//! rmap at work (host unmap, aging, dirty log), memslot delete and move, L2 destroy, and
//! the bound against a hostile L1. The invariant checker runs after every step.

mod common;

use common::{host_unmap, l1_tree, root, Tree, PTCR};
use revmap_host::HostMmu;
use revmap_nested::hcall::TlbieInstr;
use revmap_nested::radix::{Access, PageSize, RadixPde, RadixPte};
use revmap_nested::vm::{L2Result, NestedVm, NestedVmConfig};
use revmap_rmap::{Gfn, SlotId};

/// L1 data pages start here (2 MiB aligned).
const DATA: u64 = 0x1000_0000;
const K64: u64 = 0x1_0000;
const FULL: u64 =
    RadixPte::R | RadixPte::C | RadixPte::EAA_READ | RadixPte::EAA_RW | RadixPte::EAA_X;

/// L1 registers its partition table and, for each lpid, a 64K-geometry table whose
/// PMD entry 0 points to a PTE table (n_gpa [0, 2 MiB) in 64 KiB pages) and whose PMD
/// entry 1 is free for a 2 MiB leaf.
fn setup(cfg: NestedVmConfig, lpids: &[u64]) -> NestedVm {
    let vm = NestedVm::new(cfg).unwrap();
    assert_eq!(vm.h_set_partition_table(PTCR), 0);
    for &l in lpids {
        l1_tree(&vm, l, Tree::spaced(l));
    }
    vm
}

/// L1 maps L2 page `k` (64 KiB) of `lpid` to L1 address `target` and invalidates it.
fn map(vm: &NestedVm, lpid: u64, k: u64, target: u64, flags: u64) {
    let pte = root(lpid) + 0x4_0000 + 8 * k;
    let v = if flags == 0 {
        0
    } else {
        RadixPte::new(target, flags).bits()
    };
    vm.l1_store(pte, v).unwrap();
    let instr = TlbieInstr::encode(0, false, true).0;
    assert_eq!(vm.h_tlb_invalidate(instr, lpid, (k * K64) | (5 << 5)), 0);
}

fn ok(vm: &NestedVm, lpid: u64, n: u64, acc: Access) -> (u64, u64) {
    match vm.enter_nested(lpid, n, acc) {
        L2Result::Ok { l1gpa, hpa } => (l1gpa, hpa),
        r => panic!("{r:?}"),
    }
}

fn checked(vm: &NestedVm) {
    if let Err(v) = vm.check() {
        panic!("{v:#?}");
    }
}

fn frames(gpa: u64, len: u64) -> (Gfn, Gfn) {
    (Gfn(gpa >> 12), Gfn((gpa + len) >> 12))
}

#[test]
fn l0_leaf_for_l1_has_r_always_and_c_with_w_on_a_write() {
    let vm = setup(NestedVmConfig::new(1 << 30, 16), &[1]);
    map(&vm, 1, 0, DATA, FULL);
    let (l1gpa, _) = ok(&vm, 1, 0x18, Access::Load);
    assert_eq!(l1gpa, DATA | 0x18);
    let l0 = vm.l0_leaf(DATA).unwrap();
    assert_eq!(l0.size, PageSize::P64K);
    assert!(l0.pte.referenced() && !l0.pte.changed() && !l0.pte.may_write());
    let s = vm.shadow_leaf(1, 0).unwrap();
    assert!(s.pte.referenced() && !s.pte.changed() && !s.pte.may_write());
    checked(&vm);
    let faults = vm.counters().nested_faults;
    ok(&vm, 1, 0x20, Access::Store);
    assert!(
        vm.counters().nested_faults > faults,
        "the store faults again"
    );
    let l0 = vm.l0_leaf(DATA).unwrap();
    assert!(l0.pte.referenced() && l0.pte.changed() && l0.pte.may_write());
    let s = vm.shadow_leaf(1, 0).unwrap();
    assert!(s.pte.changed() && s.pte.may_write());
    checked(&vm);
    // A read-only L1 leaf: the shadow leaf never gets W, whatever L0 has.
    map(&vm, 1, 1, DATA, RadixPte::R | RadixPte::EAA_READ);
    ok(&vm, 1, K64, Access::Load);
    assert!(!vm.shadow_leaf(1, K64).unwrap().pte.may_write());
    assert!(matches!(
        vm.enter_nested(1, K64, Access::Store),
        L2Result::Hdsi {
            cause: 0x0a00_0000,
            ..
        }
    ));
    checked(&vm);
}

#[test]
fn host_unmap_removes_every_derived_shadow_leaf_through_the_rmap() {
    let vm = setup(NestedVmConfig::new(1 << 30, 16), &[1, 2]);
    map(&vm, 1, 0, DATA, FULL);
    map(&vm, 1, 1, DATA, FULL);
    map(&vm, 2, 3, DATA, FULL);
    let (_, h0) = ok(&vm, 1, 0, Access::Load);
    ok(&vm, 1, K64, Access::Store);
    ok(&vm, 2, 3 * K64, Access::Load);
    assert_eq!(vm.rmap_entries(DATA).len(), 3);
    assert_eq!(vm.rmap_totals(), (3, 1));
    checked(&vm);
    host_unmap(&vm, DATA, K64);
    assert_eq!((vm.shadow_leaves(1), vm.shadow_leaves(2)), (0, 0));
    assert!(vm.l0_leaf(DATA).is_none());
    assert_eq!(vm.rmap_totals(), (0, 0));
    assert_eq!(vm.counters().rmap_invalidations, 3);
    checked(&vm);
    // The store's C went to the dirty bitmap on unmap.
    let bm = vm.get_dirty_log(SlotId(0)).unwrap();
    assert_ne!(bm[(DATA >> 12) as usize / 64], 0);
    // Re-faulted on a new host frame.
    let (l1gpa, h1) = ok(&vm, 1, 0x40, Access::Load);
    assert_eq!(l1gpa, DATA | 0x40);
    assert_ne!(h1 & !0xffff, h0 & !0xffff);
    checked(&vm);
}

#[test]
fn aging_and_dirty_log_clear_r_and_c_in_shadow_leaves() {
    let vm = setup(NestedVmConfig::new(1 << 30, 16), &[1]);
    map(&vm, 1, 0, DATA, FULL);
    ok(&vm, 1, 0, Access::Store);
    let (lo, hi) = frames(DATA, K64);
    assert!(vm.test_age_gfn(SlotId(0), lo, hi));
    assert!(vm.age_gfn(SlotId(0), lo, hi));
    assert!(!vm.test_age_gfn(SlotId(0), lo, hi));
    assert!(!vm.shadow_leaf(1, 0).unwrap().pte.referenced());
    checked(&vm);
    // The next access sets R again through a fault.
    ok(&vm, 1, 0, Access::Load);
    assert!(vm.test_age_gfn(SlotId(0), lo, hi));
    let bm = vm.get_dirty_log(SlotId(0)).unwrap();
    let bit = (DATA >> 12) as usize;
    assert_ne!(bm[bit / 64] & (1 << (bit % 64)), 0);
    assert!(!vm.shadow_leaf(1, 0).unwrap().pte.changed());
    assert!(!vm.l0_leaf(DATA).unwrap().pte.changed());
    let bm = vm.get_dirty_log(SlotId(0)).unwrap();
    assert!(bm.iter().all(|&w| w == 0), "harvested");
    ok(&vm, 1, 0, Access::Store);
    let bm = vm.get_dirty_log(SlotId(0)).unwrap();
    assert_ne!(bm[bit / 64] & (1 << (bit % 64)), 0, "dirty again");
    checked(&vm);
}

#[test]
fn two_mib_backing_maps_2m_l0_leaves_found_from_any_gfn() {
    let mut cfg = NestedVmConfig::new(1 << 30, 21);
    cfg.dirty_logging = false;
    let vm = setup(cfg, &[1]);
    map(&vm, 1, 0, DATA, FULL);
    map(&vm, 1, 1, DATA + 0x10_0000, FULL);
    let (_, h0) = ok(&vm, 1, 0, Access::Load);
    let (_, h1) = ok(&vm, 1, K64 + 8, Access::Load);
    assert_eq!(h1 - h0, 0x10_0008, "one 2 MiB host page");
    assert_eq!(vm.l0_leaf(DATA + 0x10_0000).unwrap().size, PageSize::P2M);
    // Both entries at the word of the 2 MiB leaf's base; shadow leaves are 64 KiB.
    assert_eq!(vm.rmap_entries(DATA).len(), 2);
    assert!(vm.rmap_entries(DATA + 0x10_0000).is_empty());
    assert_eq!(vm.shadow_leaf(1, K64).unwrap().size, PageSize::P64K);
    checked(&vm);
    // Aging a gfn in the middle of the leaf reaches both shadow leaves.
    let (lo, hi) = frames(DATA + 0x10_0000, K64);
    assert!(vm.age_gfn(SlotId(0), lo, hi));
    assert!(!vm.shadow_leaf(1, 0).unwrap().pte.referenced());
    assert!(!vm.shadow_leaf(1, K64).unwrap().pte.referenced());
    checked(&vm);
    // Unmapping one 64 KiB gfn takes the whole 2 MiB host page and both leaves.
    host_unmap(&vm, DATA + 0x10_0000, K64);
    assert_eq!(vm.shadow_leaves(1), 0);
    assert_eq!(vm.counters().rmap_invalidations, 2);
    checked(&vm);
    let (_, h2) = ok(&vm, 1, 0, Access::Load);
    assert_ne!(h2, h0);
    checked(&vm);
}

#[test]
fn four_kib_page_size_maps_4k_leaves() {
    let mut cfg = NestedVmConfig::new(1 << 30, 12);
    cfg.page = PageSize::P4K;
    let vm = setup(cfg, &[1]);
    map(&vm, 1, 0, DATA, FULL);
    let (l1gpa, _) = ok(&vm, 1, 0x5008, Access::Store);
    assert_eq!(l1gpa, DATA + 0x5008);
    assert_eq!(vm.l0_leaf(DATA + 0x5000).unwrap().size, PageSize::P4K);
    assert_eq!(vm.shadow_leaf(1, 0x5000).unwrap().size, PageSize::P4K);
    assert!(vm.shadow_leaf(1, 0x4000).is_none());
    assert_eq!(vm.rmap_entries(DATA + 0x5000).len(), 1);
    checked(&vm);
    host_unmap(&vm, DATA + 0x5000, 0x1000);
    assert_eq!(vm.shadow_leaves(1), 0);
    checked(&vm);
}

#[test]
fn memslot_delete_and_move_flush_everything_derived() {
    let vm = setup(NestedVmConfig::new(1 << 30, 16), &[1]);
    map(&vm, 1, 0, DATA, FULL);
    ok(&vm, 1, 0, Access::Store);
    vm.move_memslot(SlotId(0), Gfn(1 << 20)).unwrap();
    assert_eq!(vm.shadow_leaves(1), 0);
    assert_eq!(vm.rmap_totals(), (0, 0));
    assert!(vm.l0_leaf(DATA).is_none());
    checked(&vm);
    vm.move_memslot(SlotId(0), Gfn(0)).unwrap();
    ok(&vm, 1, 0, Access::Load);
    assert_eq!(vm.rmap_totals(), (1, 1));
    vm.delete_memslot(SlotId(0)).unwrap();
    assert_eq!((vm.shadow_leaves(1), vm.rmap_totals()), (0, (0, 0)));
    // No slot: the L1 page is emulated MMIO now.
    assert_eq!(
        vm.enter_nested(1, 0, Access::Load),
        L2Result::Mmio { l1gpa: DATA }
    );
    checked(&vm);
}

#[test]
fn destroying_an_l2_leaves_stale_entries_that_stay_harmless() {
    let vm = setup(NestedVmConfig::new(1 << 30, 16), &[1]);
    map(&vm, 1, 0, DATA, FULL);
    ok(&vm, 1, 0, Access::Load);
    assert!(vm.destroy_l2(1));
    assert!(!vm.destroy_l2(1));
    assert_eq!(vm.shadow_leaves(1), 0);
    assert_eq!(vm.rmap_totals(), (1, 1), "the entry stays, stale");
    checked(&vm);
    // A new L2 for lpid 1 re-uses the same (lpid, n_gpa): deduplicated.
    ok(&vm, 1, 0, Access::Load);
    assert_eq!(vm.rmap_totals(), (1, 1));
    assert!(vm.destroy_l2(1));
    host_unmap(&vm, DATA, K64);
    let c = vm.counters();
    assert_eq!((c.rmap_invalidations, c.rmap_stale_skipped), (0, 1));
    assert_eq!(vm.rmap_totals(), (0, 0));
    checked(&vm);
    vm.release_all();
    assert_eq!(vm.rmap_totals(), (0, 0));
    checked(&vm);
}

/// A hostile L1 maps one L1 page at thousands of L2 addresses in turn, accessing and
/// invalidating each, while L0 never unmaps it: stale entries are reclaimed at the
/// bound, so the word never holds more than 64 entries (KVM would keep them all).
#[test]
fn hostile_l1_cannot_grow_the_nested_rmap_past_the_bound() {
    let vm = setup(NestedVmConfig::new(1 << 30, 16), &[1]);
    for k in 0..2000u64 {
        let slot = k % 32;
        map(&vm, 1, slot, DATA, FULL);
        // The PMD entry 0 table is re-pointed at a new 2 MiB L2 window each round.
        let window = k / 32;
        let r = root(1);
        vm.l1_store(r + 0x3_0000, 0).unwrap();
        vm.l1_store(
            r + 0x3_0000 + 8 * (window % 512),
            RadixPde::new(r + 0x4_0000, 5).bits(),
        )
        .unwrap();
        let n = ((window % 512) << 21) | (slot * K64);
        ok(&vm, 1, n | 8, Access::Load);
        // L1 takes the mapping away again.
        vm.l1_store(r + 0x3_0000 + 8 * (window % 512), 0).unwrap();
        let instr = TlbieInstr::encode(0, false, true).0;
        assert_eq!(vm.h_tlb_invalidate(instr, 1, n | (5 << 5)), 0);
        assert!(vm.rmap_entries(DATA).len() <= 64);
    }
    let c = vm.counters();
    assert_eq!(c.rmap_entries_max_per_gfn, 64, "{c:#?}");
    assert!(c.rmap_reclaimed > 0 && c.rmap_refused == 0, "{c:#?}");
    assert!(c.rmap_bytes_max <= 8 + 63 * 16, "{c:#?}");
    checked(&vm);
}

/// The register-level dispatch (the host layer's `HypercallPort`) gives the same
/// answers as the typed API.
#[test]
fn hypercall_port_dispatches_the_nested_hypercalls() {
    use revmap_host::port::HypercallPort;
    use revmap_nested::hcall::{H_ENTER_NESTED, H_SET_PARTITION_TABLE, H_TLB_INVALIDATE};
    use revmap_rmap::VcpuId;
    let vm = setup(NestedVmConfig::new(1 << 30, 16), &[1]);
    let mut port = (&vm).vcpu_runs();
    let v = VcpuId::ZERO;
    assert_eq!(
        port.hcall(v, H_SET_PARTITION_TABLE, &[0x1_0000 | 5]).ret,
        -4
    );
    assert_eq!(port.hcall(v, H_SET_PARTITION_TABLE, &[PTCR]).ret, 0);
    map(&vm, 1, 0, DATA, FULL);
    let r = port.hcall(v, H_ENTER_NESTED, &[1, 0x28, 1]);
    assert_eq!((r.ret, r.out[0], r.out[2]), (0, DATA | 0x28, 0));
    assert_eq!(vm.hpa_to_l1gpa(r.out[1]), Some(DATA | 0x28));
    // L2 page 2 is not mapped: an HDSI with NOHPTE | ISSTORE, ASDR the page.
    let r = port.hcall(v, H_ENTER_NESTED, &[1, 2 * K64 + 8, 1]);
    assert_eq!((r.ret, r.out[0], r.out[1]), (0xE00, 0x4200_0000, 2 * K64));
    let r = port.hcall(v, H_ENTER_NESTED, &[1, 2 * K64, 2]);
    assert_eq!((r.ret, r.out[0]), (0xE20, 0x4000_0000));
    assert_eq!(port.hcall(v, H_ENTER_NESTED, &[0, 0, 0]).ret, -4, "LPID 0");
    assert_eq!(
        port.hcall(v, H_ENTER_NESTED, &[1, 0, 7]).ret,
        -4,
        "bad access"
    );
    // An LPID flush through the port drops the shadow leaf.
    let flush = TlbieInstr::encode(0, false, true).0;
    assert_eq!(port.hcall(v, H_TLB_INVALIDATE, &[flush, 1, 2 << 10]).ret, 0);
    assert_eq!(vm.shadow_leaves(1), 0);
    assert_eq!(port.hcall(v, H_TLB_INVALIDATE, &[0, 1, 0]).ret, -4, "R = 0");
    assert_eq!(port.hcall(v, 0x1234, &[]).ret, -2, "not a nested hcall");
    checked(&vm);
}

/// Turning dirty logging on flushes the slot (KVM's row 3): the 2 MiB L0 leaf goes
/// with its shadow leaves, and the next fault maps a 64 KiB piece.
#[test]
fn dirty_logging_on_flushes_and_forces_page_size_leaves() {
    use revmap_host::MemslotFlags;
    let mut cfg = NestedVmConfig::new(1 << 30, 21);
    cfg.dirty_logging = false;
    let vm = setup(cfg, &[1]);
    map(&vm, 1, 0, DATA, FULL);
    ok(&vm, 1, 0, Access::Store);
    assert_eq!(vm.l0_leaf(DATA).unwrap().size, PageSize::P2M);
    vm.set_memslot_flags(SlotId(0), MemslotFlags::LOG_DIRTY_PAGES)
        .unwrap();
    assert!(vm.l0_leaf(DATA).is_none());
    assert_eq!((vm.shadow_leaves(1), vm.rmap_totals()), (0, (0, 0)));
    checked(&vm);
    ok(&vm, 1, 0, Access::Store);
    assert_eq!(vm.l0_leaf(DATA).unwrap().size, PageSize::P64K);
    let bm = vm.get_dirty_log(SlotId(0)).unwrap();
    let bit = (DATA >> 12) as usize;
    assert_ne!(bm[bit / 64] & (1 << (bit % 64)), 0);
    // The flush moved the 2 MiB leaf's C into the (new) bitmap, as KVM's unmap does.
    assert_eq!(bm.iter().map(|w| w.count_ones()).sum::<u32>(), 512);
    ok(&vm, 1, 8, Access::Store);
    let bm = vm.get_dirty_log(SlotId(0)).unwrap();
    assert_eq!(
        bm.iter().map(|w| w.count_ones()).sum::<u32>(),
        16,
        "one 64 KiB page"
    );
    checked(&vm);
}
