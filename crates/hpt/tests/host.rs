//! The host side: memslot lifecycle, MMU notifiers, aging, dirty logging and the fault
//! path, each checked against the whole-VM invariant checker, with named regression
//! tests for past KVM bugs (each test's doc names it), for R/C conservation, the
//! invalidation race, `mmu_ready` and the memslot flush.
mod common;
use common::read;
use revmap_hpt::hash::{hpt_hash, primary_pteg, Segment, SegmentSize};
use revmap_hpt::hcall::*;
use revmap_hpt::hpte::{encode_avpn, HpteR, HpteV};
use revmap_hpt::mmu::{Access, AccessOutcome, Fault, VcpuMmu};
use revmap_hpt::vm::RAM_HVA_BASE;
use revmap_hpt::{
    FaultOutcome, Flavour, HostError, MemslotFlags, MemslotSpec, Violation, Vm, VmConfig,
};
use revmap_rmap::{Gfn, Gpa, Hva, Ptex, SlotId};

const MB: u64 = 1 << 20;

fn seg(base_shift: u32) -> Segment {
    Segment {
        vsid: 0x5_1234 + u64::from(base_shift),
        ssize: SegmentSize::S256M,
        base_shift,
    }
}

/// 64 MiB of RAM at gpa 0 backed by 16 MiB host pages, order 18.
fn vm_with(backing: u32, flavour: Flavour) -> Vm {
    Vm::new(VmConfig {
        ram_bytes: 64 * MB,
        hpt_order: 18,
        flavour,
        backing_page_shift: backing,
    })
    .unwrap()
}

fn vm() -> Vm {
    vm_with(24, Flavour::Kvm)
}

/// H_ENTER a page of `shift` (12, 16, 24) mapping `ea` (in the segment of that base
/// size) to guest address `gpa`, with `pp` and extra dword-1 bits. Returns (ptex, ret).
fn enter_raw(vm: &Vm, shift: u32, ea: u64, gpa: u64, extra: u64) -> (u64, i64) {
    let s = seg(shift);
    let hash = hpt_hash(&s, ea);
    let group = primary_pteg(vm.hpt().geometry(), hash) * 8;
    let large = if shift > 12 { HpteV::LARGE } else { 0 };
    let lp = if shift == 16 { 0x1000 } else { 0 };
    let pteh = encode_avpn(s.va(ea), shift, false) | large | HpteV::VALID;
    let ptel = gpa | lp | HpteR::M | extra;
    let r = vm.hcall(0, H_ENTER, &[0, group, pteh, ptel]);
    (r.out[0], r.ret)
}

fn enter(vm: &Vm, shift: u32, ea: u64, gpa: u64, pp: u64) -> u64 {
    let (p, ret) = enter_raw(vm, shift, ea, gpa, pp);
    assert_eq!(ret, H_SUCCESS);
    p
}

fn v_of(vm: &Vm, p: u64) -> u64 {
    vm.hpt().slot(Ptex(p as u32)).unwrap().load_v()
}

fn r_of(vm: &Vm, p: u64) -> u64 {
    vm.hpt().slot(Ptex(p as u32)).unwrap().load_r()
}

fn check(vm: &Vm) -> revmap_hpt::CheckReport {
    vm.check_invariants()
        .unwrap_or_else(|e| panic!("invariant violated: {e}"))
}

fn spec(id: u16, base: u64, npages: u64, hva: u64, backing: u32) -> MemslotSpec {
    MemslotSpec {
        id: SlotId(id),
        base_gfn: Gfn(base),
        npages,
        userspace_addr: Hva(hva),
        backing_page_shift: backing,
        flags: MemslotFlags::LOG_DIRTY_PAGES,
    }
}

fn done(o: AccessOutcome) -> revmap_hpt::mmu::Translation {
    match o {
        AccessOutcome::Done(t) => t,
        other => panic!("access did not complete: {other:?}"),
    }
}

// ---------------------------------------------------------------- lifecycle

#[test]
fn create_lookup_info_and_errors() {
    let vm = vm();
    let hva = 0x7f00_0000_0000;
    vm.create_memslot(spec(1, 0x10_0000, 256, hva, 12)).unwrap();
    assert_eq!(vm.memslot_ids(), [SlotId(0), SlotId(1)]);
    assert_eq!(
        vm.memslot_info(SlotId(1)),
        Some(spec(1, 0x10_0000, 256, hva, 12))
    );
    assert_eq!(
        vm.hva_to_gfn(Hva(hva + 0x3123)),
        Some((SlotId(1), Gfn(0x10_0003)))
    );
    assert_eq!(vm.hva_to_gfn(Hva(RAM_HVA_BASE)), Some((SlotId(0), Gfn(0))));
    assert_eq!(vm.hva_to_gfn(Hva(hva + 256 * 4096)), None);
    // Overlapping frames or a duplicate id.
    assert!(matches!(
        vm.create_memslot(spec(2, 0x10_00ff, 4, 0x1000_0000, 12)),
        Err(HostError::Memslot(_))
    ));
    assert!(matches!(
        vm.create_memslot(spec(1, 0x20_0000, 4, 0x1000_0000, 12)),
        Err(HostError::Memslot(_))
    ));
    // INVALID is internal; unknown bits are refused.
    let mut bad = spec(3, 0x30_0000, 4, 0x1000_0000, 12);
    bad.flags = MemslotFlags::INVALID;
    assert!(matches!(
        vm.create_memslot(bad),
        Err(HostError::BadFlags { .. })
    ));
    assert!(matches!(
        vm.delete_memslot(SlotId(9)),
        Err(HostError::NoSuchSlot { .. })
    ));
    check(&vm);
}

/// KVM's rmap array size check (a syzkaller report): a huge memslot is a clean error.
#[test]
fn huge_slot_is_a_clean_error_and_changes_nothing() {
    let vm = vm();
    let before = vm.memslot_ids();
    let r = vm.create_memslot(spec(1, 1 << 40, 1 << 40, 0, 12));
    assert!(matches!(r, Err(HostError::Memslot(_))), "{r:?}");
    assert_eq!(vm.memslot_ids(), before);
    check(&vm);
}

/// Map `n` 4K pages of slot 0 (gfn i -> ea i), store through each (R and C set).
fn map_and_dirty(vm: &Vm, mmu: &mut VcpuMmu<'_>, gfns: impl Iterator<Item = u64>) -> Vec<u64> {
    gfns.map(|g| {
        let p = enter(vm, 12, g << 12, g << 12, 2);
        done(mmu.store(&seg(12), g << 12));
        p
    })
    .collect()
}

/// After a memslot delete, no rmap word of the slot is PRESENT and no VALID HPTE maps
/// its frames; R/C are harvested.
#[test]
fn delete_flushes_chains_and_harvests_rc_inv17() {
    let vm = vm();
    vm.create_memslot(spec(1, 0x10_0000, 64, 0x7f00_0000_0000, 12))
        .unwrap();
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let ps = map_and_dirty(&vm, &mut mmu, 0x10_0000..0x10_0010);
    let rep = check(&vm);
    assert_eq!(rep.chain_members, 16);
    vm.delete_memslot(SlotId(1)).unwrap();
    assert_eq!(vm.memslot_ids(), [SlotId(0)]);
    for &p in &ps {
        let v = v_of(&vm, p);
        assert_eq!(v & (HpteV::VALID | HpteV::ABSENT), HpteV::ABSENT);
        // The guest's view is unchanged, and kept the harvested R/C (no R/C bit is lost).
        let (gv, gr) = read(&vm, p);
        assert_eq!(gv & HpteV::VALID, HpteV::VALID);
        assert_eq!(gr & HpteR::RC, HpteR::RC);
    }
    vm.check_slot_flushed(Gfn(0x10_0000), Gfn(0x10_0040))
        .unwrap();
    let rep = check(&vm);
    assert_eq!((rep.valid, rep.chain_members), (0, 0));
    // A fault on such an entry is now MMIO (no memslot).
    drop(mmu);
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    assert_eq!(
        mmu.load(&seg(12), (0x10_0003 << 12) | 0x18),
        AccessOutcome::Mmio {
            gpa: Gpa((0x10_0003 << 12) | 0x18)
        }
    );
}

/// KVM's "perform an invalid memslot step for gpa base change": a moved slot leaves
/// nothing keyed by its old gfns.
#[test]
fn move_leaves_nothing_keyed_by_old_gfns() {
    let vm = vm();
    vm.create_memslot(spec(1, 0x10_0000, 64, 0x7f00_0000_0000, 12))
        .unwrap();
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let ps = map_and_dirty(&vm, &mut mmu, 0x10_0000..0x10_0008);
    let data_before = vm.memslots().get(SlotId(1)).unwrap().clone();
    vm.move_memslot(SlotId(1), Gfn(0x20_0000)).unwrap();
    let slots = vm.memslots();
    let moved = slots.get(SlotId(1)).unwrap();
    assert_eq!(moved.base_gfn(), Gfn(0x20_0000));
    assert!(moved.same_data(&data_before), "the rmap array is inherited");
    assert!(slots.lookup(Gfn(0x10_0000)).is_none());
    assert!(moved.rmaps().iter().all(|r| !r.load().is_present()));
    assert!(
        moved.rmaps()[0].load().changed(),
        "R/C history kept in the words"
    );
    drop(slots);
    vm.check_slot_flushed(Gfn(0x10_0000), Gfn(0x10_0040))
        .unwrap();
    check(&vm);
    for &p in &ps {
        assert_eq!(v_of(&vm, p) & HpteV::VALID, 0);
    }
    // Overlap with slot 0 and misalignment are refused before anything changes.
    assert!(vm.move_memslot(SlotId(1), Gfn(0)).is_err());
    assert_eq!(vm.memslot_info(SlotId(1)).unwrap().base_gfn, Gfn(0x20_0000));
    // A fresh mapping at the new place works, through the same rmap array.
    let p = enter(&vm, 12, 0x55 << 12, 0x20_0005 << 12, 2);
    assert_eq!(v_of(&vm, p) & HpteV::VALID, HpteV::VALID);
    check(&vm);
}

#[test]
fn flags_toggle_dirty_logging_and_refuse_readonly_changes() {
    let vm = vm();
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    map_and_dirty(&vm, &mut mmu, 0x10..0x12);
    let p = enter(&vm, 12, 0x20 << 12, 0x20 << 12, 2);
    done(mmu.store(&seg(12), 0x20 << 12));
    assert_eq!(vm.hcall(0, H_REMOVE, &[0, p, 0]).ret, H_SUCCESS);
    assert!(vm.memslots().get(SlotId(0)).unwrap().count_dirty() > 0);
    vm.set_memslot_flags(SlotId(0), MemslotFlags::default())
        .unwrap();
    assert_eq!(vm.memslots().get(SlotId(0)).unwrap().count_dirty(), 0);
    assert!(matches!(
        vm.get_dirty_log(SlotId(0)),
        Err(HostError::DirtyLogDisabled { .. })
    ));
    check(&vm);
    vm.set_memslot_flags(SlotId(0), MemslotFlags::LOG_DIRTY_PAGES)
        .unwrap();
    assert!(matches!(
        vm.set_memslot_flags(SlotId(0), MemslotFlags::READONLY),
        Err(HostError::BadFlags { .. })
    ));
    assert!(matches!(
        vm.set_memslot_flags(SlotId(0), MemslotFlags::INVALID),
        Err(HostError::BadFlags { .. })
    ));
    check(&vm);
}

/// An ABSENT entry with key 31 is MMIO and never maps RAM: a slot created over such
/// entries turns them into paged-out RAM entries.
#[test]
fn creating_a_slot_over_mmio_entries_turns_them_into_ram_inv8() {
    let vm = vm();
    let gpa = 0x4000_0000u64; // beyond the 64 MiB of RAM
    let p = enter(&vm, 12, 0x77 << 12, gpa, 2);
    assert!(HpteR(r_of(&vm, p)).is_key31(), "MMIO entry");
    let before = vm.mmio_update();
    vm.create_memslot(spec(1, gpa >> 12, 16, 0x7f00_0000_0000, 12))
        .unwrap();
    assert!(vm.mmio_update() > before, "MMIO caches invalidated");
    assert!(!HpteR(r_of(&vm, p)).is_key31());
    check(&vm);
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let t = done(mmu.load(&seg(12), 0x77 << 12));
    assert_eq!(t.real_addr, 0x7f00_0000_0000);
    check(&vm);
}

// ---------------------------------------------------------------- notifiers

#[test]
fn unmap_hva_range_pages_out_harvests_and_faults_back() {
    let vm = vm_with(12, Flavour::Kvm);
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let ps = map_and_dirty(&vm, &mut mmu, 0x100..0x104);
    let n = vm.unmap_hva_range(
        Hva(RAM_HVA_BASE + (0x101 << 12)),
        Hva(RAM_HVA_BASE + (0x103 << 12)),
    );
    assert_eq!(n, 2);
    let slots = vm.memslots();
    let s = slots.get(SlotId(0)).unwrap();
    for (k, &p) in ps.iter().enumerate() {
        let g = Gfn(0x100 + k as u64);
        let out = (1..3).contains(&k);
        assert_eq!(v_of(&vm, p) & HpteV::ABSENT != 0, out, "entry {k}");
        assert_eq!(s.is_host_present(g), !out);
        assert_eq!(s.is_dirty(g), out, "C harvested into the bitmap at unmap");
        if out {
            assert!(s.rmap(g).unwrap().load().changed());
            assert!(!s.rmap(g).unwrap().load().is_present());
        }
    }
    drop(slots);
    check(&vm);
    // The guest sees nothing: H_READ unchanged (ABSENT shown VALID, R/C kept).
    let (v, r) = read(&vm, ps[1]);
    assert_eq!(v & HpteV::VALID, HpteV::VALID);
    assert_eq!(r & HpteR::RC, HpteR::RC);
    // Next access faults it back in at the right host address.
    let t = done(mmu.load(&seg(12), (0x101 << 12) | 0x44));
    assert_eq!(t.real_addr, RAM_HVA_BASE + (0x101 << 12) + 0x44);
    assert_eq!(v_of(&vm, ps[1]) & HpteV::VALID, HpteV::VALID);
    let rep = check(&vm);
    assert_eq!(rep.chain_members, 3);
}

/// Dirty logging of a huge-page HPTE marks every base page it covers.
#[test]
fn large_page_unmap_covers_every_frame_and_dirties_4096() {
    let vm = vm();
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    // A 16M page at gpa 16M (frames 0x1000..0x2000).
    let p = enter(&vm, 24, 0x100_0000, 0x100_0000, 2);
    done(mmu.store(&seg(24), 0x100_0000 + 0x12_3456));
    // Unmap a single 4K frame in the middle of it: the whole HPTE goes.
    let n = vm.unmap_gfn_range(SlotId(0), Gfn(0x1800), Gfn(0x1801));
    assert_eq!(n, 1);
    assert_eq!(v_of(&vm, p) & HpteV::ABSENT, HpteV::ABSENT);
    let slots = vm.memslots();
    let s = slots.get(SlotId(0)).unwrap();
    assert_eq!(s.count_dirty(), 4096, "every 4K frame of the 16M page");
    assert!(s.is_dirty(Gfn(0x1000)) && s.is_dirty(Gfn(0x1fff)));
    assert!(!s.is_dirty(Gfn(0x2000)));
    drop(slots);
    check(&vm);
    // A range just past the page does not touch a re-mapped page.
    done(mmu.load(&seg(24), 0x100_0000));
    assert_eq!(vm.unmap_gfn_range(SlotId(0), Gfn(0x2000), Gfn(0x2001)), 0);
    assert_eq!(v_of(&vm, p) & HpteV::VALID, HpteV::VALID);
    // Dirty log of the large page: 4096 bits at the aligned base.
    vm.get_dirty_log(SlotId(0)).unwrap();
    done(mmu.store(&seg(24), 0x100_0000 + 0x42));
    let log = vm.get_dirty_log(SlotId(0)).unwrap();
    let set: u32 = log.iter().map(|w| w.count_ones()).sum();
    assert_eq!(set, 4096);
    assert_eq!(log[0x1000 / 64], !0);
    check(&vm);
}

/// KVM's "Clear the key field of HPTE when the page is paged out": a paged-out RAM
/// page the guest keyed 31 faults in as RAM, not as MMIO.
#[test]
fn paged_out_key31_ram_page_is_paged_in_not_mmio() {
    let vm = vm();
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    // Guest maps RAM with storage key 31.
    let p = enter(&vm, 12, 0x42 << 12, 0x42 << 12, HpteR::KEY | 2);
    assert!(HpteR(r_of(&vm, p)).is_key31());
    done(mmu.load(&seg(12), 0x42 << 12));
    vm.unmap_hva_range(
        Hva(RAM_HVA_BASE + (0x42 << 12)),
        Hva(RAM_HVA_BASE + (0x43 << 12)),
    );
    assert_eq!(v_of(&vm, p) & HpteV::ABSENT, HpteV::ABSENT);
    assert!(
        !HpteR(r_of(&vm, p)).is_key31(),
        "key cleared on unmap (the key must be cleared when a page is paged out)"
    );
    check(&vm);
    assert_eq!(
        mmu.translate(&seg(12), 0x42 << 12, Access::Load),
        Err(Fault::Absent {
            ptex: Ptex(p as u32),
            mmio: false
        })
    );
    let t = done(mmu.load(&seg(12), 0x42 << 12));
    assert_eq!(t.real_addr, RAM_HVA_BASE + (0x42 << 12));
    assert!(HpteR(r_of(&vm, p)).is_key31(), "guest key restored");
    assert_eq!(v_of(&vm, p) & HpteV::VALID, HpteV::VALID);
    check(&vm);
}

#[test]
fn mmio_entries_are_reported_never_paged_in() {
    let vm = vm();
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let p = enter(&vm, 12, 0x9 << 12, 0x8000_0000, HpteR::I | HpteR::G | 2);
    let f = mmu
        .translate(&seg(12), 0x9 << 12, Access::Load)
        .unwrap_err();
    assert_eq!(
        vm.page_fault(0, &f, Access::Load),
        FaultOutcome::Mmio {
            gpa: Gpa(0x8000_0000)
        }
    );
    assert_eq!(v_of(&vm, p) & HpteV::ABSENT, HpteV::ABSENT);
    check(&vm);
}

#[test]
fn age_and_test_age() {
    let vm = vm_with(12, Flavour::Kvm);
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let g = 0x33u64;
    let p = enter(&vm, 12, g << 12, g << 12, 2);
    let (s, lo, hi) = (SlotId(0), Gfn(g), Gfn(g + 1));
    assert!(!vm.test_age_gfn(s, lo, hi));
    done(mmu.load(&seg(12), g << 12));
    assert!(vm.test_age_gfn(s, lo, hi));
    assert!(vm.test_age_gfn(s, lo, hi), "test_age changes nothing");
    assert!(vm.age_gfn(s, lo, hi));
    assert_eq!(r_of(&vm, p) & HpteR::R, 0, "R cleared in the real HPTE");
    assert_eq!(read(&vm, p).1 & HpteR::R, HpteR::R, "guest view keeps R");
    assert!(!vm.test_age_gfn(s, lo, hi));
    assert!(!vm.age_gfn(s, lo, hi));
    // The tlbie made the next access set R again.
    done(mmu.load(&seg(12), g << 12));
    assert!(vm.age_gfn(s, lo, hi));
    // H_CLEAR_REF records the reference in the rmap word: aging consumes it once.
    done(mmu.load(&seg(12), g << 12));
    assert_eq!(vm.hcall(0, H_CLEAR_REF, &[0, p]).ret, H_SUCCESS);
    assert!(vm.test_age_gfn(s, lo, hi));
    assert!(vm.age_gfn(s, lo, hi));
    assert!(!vm.age_gfn(s, lo, hi));
    check(&vm);
}

/// No HPTE turns VALID if an invalidation of its page began after the inserter sampled
/// the invalidation sequence.
#[test]
fn h_enter_during_an_invalidation_is_absent_then_faults_in() {
    let vm = vm_with(12, Flavour::Kvm);
    let (a, b) = (
        Hva(RAM_HVA_BASE + (0x50 << 12)),
        Hva(RAM_HVA_BASE + (0x51 << 12)),
    );
    vm.invalidate_range_start(a, b);
    let p = enter(&vm, 12, 0x50 << 12, 0x50 << 12, 2);
    assert_eq!(
        v_of(&vm, p) & (HpteV::VALID | HpteV::ABSENT),
        HpteV::ABSENT,
        "no VALID entry while an invalidation is in progress"
    );
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let f = mmu
        .translate(&seg(12), 0x50 << 12, Access::Load)
        .unwrap_err();
    assert_eq!(vm.page_fault(0, &f, Access::Load), FaultOutcome::Retry);
    assert_eq!(v_of(&vm, p) & HpteV::VALID, 0, "fault backs off too");
    vm.invalidate_range_end(a, b);
    done(mmu.load(&seg(12), 0x50 << 12));
    assert_eq!(v_of(&vm, p) & HpteV::VALID, HpteV::VALID);
    check(&vm);
}

#[test]
fn change_pte_unmaps_and_records_presence() {
    let vm = vm_with(12, Flavour::Kvm);
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let p = enter(&vm, 12, 0x60 << 12, 0x60 << 12, 2);
    done(mmu.load(&seg(12), 0x60 << 12));
    let hva = Hva(RAM_HVA_BASE + (0x60 << 12));
    vm.change_pte(hva, true);
    assert_eq!(v_of(&vm, p) & HpteV::ABSENT, HpteV::ABSENT);
    assert!(vm
        .memslots()
        .get(SlotId(0))
        .unwrap()
        .is_host_present(Gfn(0x60)));
    vm.change_pte(hva, false);
    assert!(!vm
        .memslots()
        .get(SlotId(0))
        .unwrap()
        .is_host_present(Gfn(0x60)));
    // The fault path pages the host page back in.
    done(mmu.load(&seg(12), 0x60 << 12));
    assert!(vm
        .memslots()
        .get(SlotId(0))
        .unwrap()
        .is_host_present(Gfn(0x60)));
    vm.unmap_hva_range(hva, Hva(hva.0 + 4096));
    vm.host_page_in(hva, Hva(hva.0 + 1));
    assert!(vm
        .memslots()
        .get(SlotId(0))
        .unwrap()
        .is_host_present(Gfn(0x60)));
    check(&vm);
}

/// rmaps are keyed by (slot, gfn), not by host page (KVM's move to per-memslot rmaps).
#[test]
fn one_host_page_two_gfns_two_independent_rmaps() {
    let vm = vm_with(12, Flavour::Kvm);
    // Slot 1 aliases the host pages of RAM frames 0x100.. at gfn 0x10_0000.
    let mut sp = spec(1, 0x10_0000, 16, RAM_HVA_BASE + (0x100 << 12), 12);
    sp.flags = MemslotFlags::default();
    vm.create_memslot(sp).unwrap();
    let p0 = enter(&vm, 12, 0x1 << 12, 0x100 << 12, 2);
    let p1 = enter(&vm, 12, 0x2 << 12, 0x10_0000 << 12, 2);
    let rep = check(&vm);
    assert_eq!((rep.chains, rep.chain_members), (2, 2));
    // One host page, two rmaps: the reclaim unmaps both.
    let n = vm.unmap_hva_range(
        Hva(RAM_HVA_BASE + (0x100 << 12)),
        Hva(RAM_HVA_BASE + (0x101 << 12)),
    );
    assert_eq!(n, 2);
    assert_eq!(v_of(&vm, p0) & HpteV::ABSENT, HpteV::ABSENT);
    assert_eq!(v_of(&vm, p1) & HpteV::ABSENT, HpteV::ABSENT);
    check(&vm);
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    done(mmu.load(&seg(12), 0x2 << 12));
    vm.delete_memslot(SlotId(1)).unwrap();
    vm.check_slot_flushed(Gfn(0x10_0000), Gfn(0x10_0010))
        .unwrap();
    assert_eq!(v_of(&vm, p0) & HpteV::ABSENT, HpteV::ABSENT);
    check(&vm);
}

// ---------------------------------------------------------------- dirty log

#[test]
fn dirty_log_harvests_c_from_hptes_bitmap_and_hcalls() {
    let vm = vm_with(12, Flavour::Kvm);
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let ps = map_and_dirty(&vm, &mut mmu, [1u64, 70, 130].into_iter());
    let log = vm.get_dirty_log(SlotId(0)).unwrap();
    assert_eq!(log.len(), (64 * MB / 4096 / 64) as usize);
    assert_eq!(log[0], 1 << 1);
    assert_eq!(log[1], 1 << 6);
    assert_eq!(log[2], 1 << 2);
    // C moved into the guest view, cleared in the real HPTE; H_READ unchanged.
    assert_eq!(r_of(&vm, ps[0]) & HpteR::C, 0);
    assert_eq!(read(&vm, ps[0]).1 & HpteR::C, HpteR::C);
    assert!(vm.get_dirty_log(SlotId(0)).unwrap().iter().all(|&w| w == 0));
    // A store after the harvest is caught (the tlbie dropped the cached C).
    done(mmu.store(&seg(12), 70 << 12));
    assert_eq!(vm.get_dirty_log(SlotId(0)).unwrap()[1], 1 << 6);
    // C recorded by H_CLEAR_MOD and H_REMOVE reaches the next log.
    done(mmu.store(&seg(12), 1 << 12));
    assert_eq!(vm.hcall(0, H_CLEAR_MOD, &[0, ps[0]]).ret, H_SUCCESS);
    done(mmu.store(&seg(12), 130 << 12));
    assert_eq!(vm.hcall(0, H_REMOVE, &[0, ps[2], 0]).ret, H_SUCCESS);
    let log = vm.get_dirty_log(SlotId(0)).unwrap();
    assert_eq!((log[0], log[2]), (1 << 1, 1 << 2));
    check(&vm);
}

#[test]
fn manual_protect_get_keeps_and_clear_clears() {
    let vm = vm_with(12, Flavour::Kvm);
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    map_and_dirty(&vm, &mut mmu, [3u64, 200].into_iter());
    assert!(matches!(
        vm.clear_dirty_log(SlotId(0), 0, &[1]),
        Err(HostError::BadFlags { .. })
    ));
    vm.set_memslot_flags(
        SlotId(0),
        MemslotFlags::LOG_DIRTY_PAGES.union(MemslotFlags::DIRTY_LOG_MANUAL_PROTECT),
    )
    .unwrap();
    // Logging restarted with a clean bitmap, but the HPTEs' C bits are still there.
    let log = vm.get_dirty_log(SlotId(0)).unwrap();
    assert_eq!((log[0], log[3]), (1 << 3, 1 << 8));
    let again = vm.get_dirty_log(SlotId(0)).unwrap();
    assert_eq!(again, log, "manual protect: not cleared by get");
    vm.clear_dirty_log(SlotId(0), 0, &[1 << 3]).unwrap();
    let after = vm.get_dirty_log(SlotId(0)).unwrap();
    assert_eq!((after[0], after[3]), (0, 1 << 8));
    assert!(matches!(
        vm.clear_dirty_log(SlotId(0), 3, &[1]),
        Err(HostError::BadDirtyRange { .. })
    ));
    assert!(matches!(
        vm.clear_dirty_log(SlotId(0), 64 * 256, &[1]),
        Err(HostError::BadDirtyRange { .. })
    ));
    check(&vm);
}

// ---------------------------------------------------------------- fault path

/// While `mmu_ready` is clear, no fault turns an HPTE VALID.
#[test]
fn mmu_not_ready_blocks_faults() {
    let vm = vm_with(12, Flavour::Kvm);
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let p = enter(&vm, 12, 0x70 << 12, 0x70 << 12, 2);
    vm.unmap_gfn_range(SlotId(0), Gfn(0x70), Gfn(0x71));
    vm.set_mmu_ready(false);
    assert!(!vm.mmu_ready());
    assert_eq!(mmu.load(&seg(12), 0x70 << 12), AccessOutcome::NotReady);
    assert_eq!(v_of(&vm, p) & HpteV::VALID, 0);
    check(&vm);
    vm.set_mmu_ready(true);
    done(mmu.load(&seg(12), 0x70 << 12));
    check(&vm);
}

#[test]
fn write_upgrade_after_h_protect_to_rw() {
    let vm = vm_with(12, Flavour::Kvm);
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let p = enter(&vm, 12, 0x80 << 12, 0x80 << 12, 3); // read-only
    done(mmu.load(&seg(12), 0x80 << 12));
    assert_eq!(
        mmu.store(&seg(12), 0x80 << 12),
        AccessOutcome::GuestFault(Fault::Protection {
            ptex: Ptex(p as u32)
        })
    );
    // Guest makes it writable; the KVM flavour keeps the real HPTE read-only.
    let avpn = v_of(&vm, p) & !0x7f;
    assert_eq!(
        vm.hcall(0, H_PROTECT, &[H_AVPN | 2, p, avpn]).ret,
        H_SUCCESS
    );
    assert!(!HpteR(r_of(&vm, p)).is_writable());
    done(mmu.store(&seg(12), 0x80 << 12));
    assert!(
        HpteR(r_of(&vm, p)).is_writable(),
        "upgraded by the fault path"
    );
    assert_eq!(r_of(&vm, p) & HpteR::RC, HpteR::RC);
    check(&vm);
}

#[test]
fn readonly_slot_store_is_mmio_exit() {
    let vm = vm_with(12, Flavour::Kvm);
    let mut sp = spec(1, 0x10_0000, 16, 0x7f00_0000_0000, 12);
    sp.flags = MemslotFlags::READONLY;
    vm.create_memslot(sp).unwrap();
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    enter(&vm, 12, 0x5 << 12, 0x10_0001 << 12, 2);
    done(mmu.load(&seg(12), 0x5 << 12));
    assert_eq!(
        mmu.store(&seg(12), (0x5 << 12) | 8),
        AccessOutcome::Mmio {
            gpa: Gpa((0x10_0001 << 12) | 8)
        }
    );
    check(&vm);
}

#[test]
fn checker_reports_a_chained_entry_of_an_invalid_slot_as_unflushed() {
    // Negative check of the invariant-17 checker: a VALID entry over a range reported
    // as flushed is caught.
    let vm = vm_with(12, Flavour::Kvm);
    enter(&vm, 12, 0x90 << 12, 0x90 << 12, 2);
    assert_eq!(
        vm.check_slot_flushed(Gfn(0x90), Gfn(0x91)),
        Err(Violation::NotFlushed { gfn: 0x90 })
    );
}

// ---------------------------------------------------------------- host memory

/// Host memory that is not the identity map: frame `i` of the range is host frame
/// `pfn_base + i`, and pages can be taken away.
#[derive(Debug)]
struct OffsetMemory {
    start: Hva,
    npages: u64,
    pfn_base: u64,
    out: revmap_rmap::sync::AtomicBool,
}

impl revmap_host::HostMemory for OffsetMemory {
    fn hva_range(&self) -> (Hva, Hva) {
        (self.start, Hva(self.start.0 + (self.npages << 12)))
    }
    fn page_shift(&self) -> u32 {
        12
    }
    fn hva_to_pfn(&self, hva: Hva) -> Option<u64> {
        let i = hva.0.checked_sub(self.start.0)? >> 12;
        let out = self.out.load(revmap_rmap::sync::Ordering::SeqCst);
        (i < self.npages && !(out && i == 0)).then_some(self.pfn_base + i)
    }
    fn page_out(&self, hva: Hva) -> bool {
        let hit = hva == self.start;
        if hit {
            self.out.store(true, revmap_rmap::sync::Ordering::SeqCst);
        }
        hit
    }
    fn page_in(&self, hva: Hva) -> bool {
        let hit = hva == self.start;
        if hit {
            self.out.store(false, revmap_rmap::sync::Ordering::SeqCst);
        }
        hit
    }
}

#[test]
fn memslot_over_custom_host_memory_maps_its_frames() {
    let vm = vm();
    let base = 0x10_0000u64; // above the 64 MiB of RAM
    let start = Hva(0x5000_0000_0000);
    let mem = OffsetMemory {
        start,
        npages: 16,
        pfn_base: 0x4_2000,
        out: revmap_rmap::sync::AtomicBool::new(false),
    };
    vm.create_memslot_with_memory(
        SlotId(9),
        Gfn(base),
        16,
        MemslotFlags::default(),
        Box::new(mem),
    )
    .unwrap();
    let info = vm.memslot_info(SlotId(9)).unwrap();
    assert_eq!((info.userspace_addr, info.backing_page_shift), (start, 12));

    // The real RPN comes from the host memory, not from the identity map.
    let p = enter(&vm, 12, 0x1000, (base + 1) << 12, 0);
    assert_eq!(HpteR(r_of(&vm, p)).page_addr(12), (0x4_2000 + 1) << 12);
    check(&vm);

    // A host page the memory reports absent makes H_ENTER's entry ABSENT, and paging it
    // out through the VM unmaps what maps it.
    let q = enter(&vm, 12, 0x2000, base << 12, 0);
    assert_ne!(v_of(&vm, q) & HpteV::VALID, 0);
    assert_eq!(vm.unmap_hva_range(start, Hva(start.0 + 0x1000)), 1);
    assert_eq!(v_of(&vm, q) & HpteV::VALID, 0);
    let q2 = enter(&vm, 12, 0x3000, base << 12, 0);
    assert_eq!(
        v_of(&vm, q2) & HpteV::VALID,
        0,
        "absent host page: not VALID"
    );
    check(&vm);

    // Memory smaller than the slot is refused.
    let small = OffsetMemory {
        start: Hva(0x6000_0000_0000),
        npages: 4,
        pfn_base: 0,
        out: revmap_rmap::sync::AtomicBool::new(false),
    };
    assert!(matches!(
        vm.create_memslot_with_memory(
            SlotId(10),
            Gfn(0x20_0000),
            8,
            MemslotFlags::default(),
            Box::new(small)
        ),
        Err(HostError::Memslot(
            revmap_host::MemslotError::BackingTooSmall { .. }
        ))
    ));
}
