//! Property test of the host side: random interleavings of guest hypercalls, vCPU
//! accesses through the MMU (with the fault path) and every host operation (reclaim,
//! aging, dirty logs, change_pte, invalidation brackets, memslot create/move/delete and
//! flag changes), with the whole-VM invariant checker after every step and the model
//! "the guest sees nothing": every host operation leaves every H_READ result unchanged.
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use revmap_hpt::hash::{hpt_hash, primary_pteg, Segment, SegmentSize};
use revmap_hpt::hcall::*;
use revmap_hpt::hpte::{encode_avpn, HpteR, HpteV};
use revmap_hpt::mmu::{Access, AccessOutcome, VcpuMmu};
use revmap_hpt::vm::RAM_HVA_BASE;
use revmap_hpt::{Flavour, MemslotFlags, MemslotSpec, Vm, VmConfig};
use revmap_rmap::{Gfn, Hva, SlotId};

const SEG: Segment = Segment {
    vsid: 0x5_1234,
    ssize: SegmentSize::S256M,
    base_shift: 12,
};
const K: u64 = 8; // guest pages (effective addresses k << 12)
const RAM_FRAMES: u64 = 32;
const SLOT1_HVA: u64 = 0x7f00_0000_0000;

#[derive(Debug, Clone)]
enum Op {
    Enter {
        k: u64,
        gfn: u64,
        ro: bool,
        key31: bool,
    },
    Remove {
        k: u64,
    },
    Protect {
        k: u64,
        ro: bool,
    },
    ClearMod {
        k: u64,
    },
    Access {
        k: u64,
        store: bool,
    },
    Unmap {
        g: u64,
        n: u64,
    },
    Age {
        g: u64,
    },
    TestAge {
        g: u64,
    },
    DirtyLog,
    ChangePte {
        g: u64,
        present: bool,
    },
    Bracket {
        g: u64,
    },
    CreateSlot1 {
        base: u64,
    },
    MoveSlot1 {
        base: u64,
    },
    DeleteSlot1,
    ToggleLogging,
}

fn op() -> impl Strategy<Value = Op> {
    let k = 0..K;
    // RAM frames, slot 1's possible places (0x40.., 0x60..), and MMIO.
    let gfn = prop_oneof![0..RAM_FRAMES, 0x40u64..0x48, 0x60u64..0x68, Just(0x1000u64)];
    prop_oneof![
        4 => (k.clone(), gfn, any::<bool>(), prop::bool::weighted(0.1))
            .prop_map(|(k, gfn, ro, key31)| Op::Enter { k, gfn, ro, key31 }),
        1 => k.clone().prop_map(|k| Op::Remove { k }),
        1 => (k.clone(), any::<bool>()).prop_map(|(k, ro)| Op::Protect { k, ro }),
        1 => k.clone().prop_map(|k| Op::ClearMod { k }),
        4 => (k, any::<bool>()).prop_map(|(k, store)| Op::Access { k, store }),
        2 => (0..RAM_FRAMES, 1u64..4).prop_map(|(g, n)| Op::Unmap { g, n }),
        1 => (0..RAM_FRAMES).prop_map(|g| Op::Age { g }),
        1 => (0..RAM_FRAMES).prop_map(|g| Op::TestAge { g }),
        1 => Just(Op::DirtyLog),
        1 => (0..RAM_FRAMES, any::<bool>()).prop_map(|(g, present)| Op::ChangePte { g, present }),
        1 => (0..RAM_FRAMES).prop_map(|g| Op::Bracket { g }),
        1 => prop_oneof![Just(0x40u64), Just(0x60u64)].prop_map(|base| Op::CreateSlot1 { base }),
        1 => prop_oneof![Just(0x40u64), Just(0x60u64)].prop_map(|base| Op::MoveSlot1 { base }),
        1 => Just(Op::DeleteSlot1),
        1 => Just(Op::ToggleLogging),
    ]
}

fn hva(g: u64) -> Hva {
    Hva(RAM_HVA_BASE + (g << 12))
}

struct World<'a> {
    vm: &'a Vm,
    ptex: [Option<u64>; K as usize],
}

impl World<'_> {
    fn guest_view(&self) -> Vec<(u64, u64)> {
        self.ptex
            .iter()
            .flatten()
            .map(|&p| {
                let r = self.vm.hcall(0, H_READ, &[0, p]);
                (r.out[0], r.out[1])
            })
            .collect()
    }

    fn remove(&mut self, k: u64) {
        if let Some(p) = self.ptex[k as usize].take() {
            assert_eq!(self.vm.hcall(0, H_REMOVE, &[0, p, 0]).ret, H_SUCCESS);
        }
    }

    /// Apply a guest or vCPU op; returns false for host ops (not applied).
    fn guest_op(&mut self, op: &Op, mmu: &mut VcpuMmu<'_>) -> bool {
        let vm = self.vm;
        match *op {
            Op::Enter { k, gfn, ro, key31 } => {
                self.remove(k);
                let ea = k << 12;
                let group = primary_pteg(vm.hpt().geometry(), hpt_hash(&SEG, ea)) * 8;
                let pteh = encode_avpn(SEG.va(ea), 12, false) | HpteV::VALID;
                let key = if key31 { HpteR::KEY } else { 0 };
                let ptel = (gfn << 12) | HpteR::M | key | if ro { 3 } else { 2 };
                let r = vm.hcall(0, H_ENTER, &[0, group, pteh, ptel]);
                assert_eq!(r.ret, H_SUCCESS);
                self.ptex[k as usize] = Some(r.out[0]);
            }
            Op::Remove { k } => self.remove(k),
            Op::Protect { k, ro } => {
                if let Some(p) = self.ptex[k as usize] {
                    let r = vm.hcall(0, H_PROTECT, &[if ro { 3 } else { 2 }, p, 0]);
                    assert_eq!(r.ret, H_SUCCESS);
                }
            }
            Op::ClearMod { k } => {
                if let Some(p) = self.ptex[k as usize] {
                    assert_eq!(vm.hcall(0, H_CLEAR_MOD, &[0, p]).ret, H_SUCCESS);
                }
            }
            Op::Access { k, store } => {
                let a = if store { Access::Store } else { Access::Load };
                let out = mmu.access(&SEG, k << 12, a);
                assert!(
                    !matches!(out, AccessOutcome::NotReady | AccessOutcome::GaveUp(_)),
                    "{out:?}"
                );
                if self.ptex[k as usize].is_none() {
                    assert!(matches!(out, AccessOutcome::GuestFault(_)), "{out:?}");
                }
            }
            _ => return false,
        }
        true
    }

    fn host_op(&mut self, op: &Op) {
        let vm = self.vm;
        let slot0 = SlotId(0);
        match *op {
            Op::Unmap { g, n } => {
                vm.unmap_hva_range(hva(g), hva(g + n));
            }
            Op::Age { g } => {
                vm.age_gfn(slot0, Gfn(g), Gfn(g + 1));
            }
            Op::TestAge { g } => {
                vm.test_age_gfn(slot0, Gfn(g), Gfn(g + 1));
            }
            Op::DirtyLog => {
                let _ = vm.get_dirty_log(slot0);
            }
            Op::ChangePte { g, present } => vm.change_pte(hva(g), present),
            Op::Bracket { g } => {
                vm.invalidate_range_start(hva(g), hva(g + 1));
                vm.invalidate_range_end(hva(g), hva(g + 1));
            }
            Op::CreateSlot1 { base } => {
                let _ = vm.create_memslot(MemslotSpec {
                    id: SlotId(1),
                    base_gfn: Gfn(base),
                    npages: 8,
                    userspace_addr: Hva(SLOT1_HVA),
                    backing_page_shift: 12,
                    flags: MemslotFlags::LOG_DIRTY_PAGES,
                });
            }
            Op::MoveSlot1 { base } => {
                let old = vm.memslot_info(SlotId(1));
                if vm.move_memslot(SlotId(1), Gfn(base)).is_ok() {
                    if let Some(o) = old {
                        let lo = o.base_gfn;
                        if lo != Gfn(base) {
                            vm.check_slot_flushed(lo, Gfn(lo.0 + 8)).unwrap();
                        }
                    }
                }
            }
            Op::DeleteSlot1 => {
                if let Some(o) = vm.memslot_info(SlotId(1)) {
                    vm.delete_memslot(SlotId(1)).unwrap();
                    vm.check_slot_flushed(o.base_gfn, Gfn(o.base_gfn.0 + 8))
                        .unwrap();
                }
            }
            Op::ToggleLogging => {
                let f = vm.memslot_info(slot0).unwrap().flags;
                let log = MemslotFlags::LOG_DIRTY_PAGES;
                let nf = if f.contains(log) {
                    f.difference(log)
                } else {
                    f.union(log)
                };
                vm.set_memslot_flags(slot0, nf).unwrap();
            }
            _ => unreachable!("guest op {op:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel("proptest-regressions"))), ..ProptestConfig::default() })]
    #[test]
    fn host_ops_are_invisible_to_the_guest(ops in prop::collection::vec(op(), 1..60)) {
        let vm = Vm::new(VmConfig {
            ram_bytes: RAM_FRAMES << 12,
            hpt_order: 18,
            flavour: Flavour::Kvm,
            backing_page_shift: 12,
        })
        .unwrap();
        let mut mmu = VcpuMmu::new(&vm).unwrap();
        let mut w = World { vm: &vm, ptex: [None; K as usize] };
        for op in &ops {
            if !w.guest_op(op, &mut mmu) {
                let before = w.guest_view();
                w.host_op(op);
                prop_assert_eq!(&w.guest_view(), &before, "host op {:?} changed the guest view", op);
            }
            if let Err(e) = vm.check_invariants() {
                prop_assert!(false, "after {:?}: {}", op, e);
            }
        }
    }
}
