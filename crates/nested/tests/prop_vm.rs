//! Property test, state machine: random sequences of L1 stores (map, remap, change
//! permissions, set R/C), L1 invalidations (page, LPID flush, RIC = 2), L2 destroys, L2
//! accesses and host actions (unmap, age, dirty log) run on a [`NestedVm`] with 64 KiB
//! or 2 MiB host pages. After **every** step the invariant checker of the nested MMU
//! must pass, and every L2 access must give what L1's tables give by KVM L0's rules
//! (`access::l1_translate`, which keeps no shadow state), landing on the host frame that
//! backs the L1 page now.

mod common;

use common::{host_reclaim, l1_expected, l1_tree, root, Tree, FLAGS, PTCR};
use proptest::prelude::*;
use revmap_host::HostMmu;
use revmap_nested::hcall::TlbieInstr;
use revmap_nested::radix::{Access, RadixPte};
use revmap_nested::vm::{L2Result, NestedVm, NestedVmConfig, L1_RAM_HVA};
use revmap_nested::NGpa;
use revmap_rmap::{Gfn, Hva, SlotId};

const RAM: u64 = 1 << 30;
const DATA: u64 = 0x1000_0000;
const K64: u64 = 0x1_0000;
const PAGES: u64 = 40;
const SLOTS: u64 = 8;

fn target(page: u64) -> u64 {
    if page == PAGES {
        RAM + (1 << 30) // emulated MMIO
    } else {
        DATA + page * K64
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// L1 maps L2 page `k` to `page` with `FLAGS[f]` and invalidates it.
    Map {
        lpid: u64,
        k: u64,
        page: u64,
        f: usize,
    },
    /// L1 clears the PTE and invalidates it.
    Unmap { lpid: u64, k: u64 },
    /// L1 sets R and C in its PTE, with no invalidation (an additive change).
    SetRc { lpid: u64, k: u64 },
    /// L1 flushes the LPID (RIC 0 or 2).
    Flush { lpid: u64, ric: u64 },
    /// L1 destroys the L2 object (it comes back on the next entry).
    Destroy { lpid: u64 },
    /// The L2 accesses page `k` at `off`.
    Access {
        lpid: u64,
        k: u64,
        off: u64,
        acc: u8,
    },
    /// The host reclaims L1 page `page`.
    HostUnmap { page: u64 },
    /// The host ages L1 page `page`.
    HostAge { page: u64 },
    /// The host harvests the dirty log.
    DirtyLog,
}

fn op() -> impl Strategy<Value = Op> {
    let lpid = 1u64..=3;
    prop_oneof![
        3 => (lpid.clone(), 0..SLOTS, 0..=PAGES, 0..FLAGS.len())
            .prop_map(|(lpid, k, page, f)| Op::Map { lpid, k, page, f }),
        1 => (lpid.clone(), 0..SLOTS).prop_map(|(lpid, k)| Op::Unmap { lpid, k }),
        1 => (lpid.clone(), 0..SLOTS).prop_map(|(lpid, k)| Op::SetRc { lpid, k }),
        1 => (lpid.clone(), prop_oneof![Just(0u64), Just(2)])
            .prop_map(|(lpid, ric)| Op::Flush { lpid, ric }),
        1 => lpid.clone().prop_map(|lpid| Op::Destroy { lpid }),
        8 => (lpid, 0..SLOTS, 0..K64 / 8, 0u8..3)
            .prop_map(|(lpid, k, off, acc)| Op::Access { lpid, k, off: off * 8, acc }),
        2 => (0..PAGES).prop_map(|page| Op::HostUnmap { page }),
        1 => (0..PAGES).prop_map(|page| Op::HostAge { page }),
        1 => Just(Op::DirtyLog),
    ]
}

fn setup(backing_shift: u32) -> NestedVm {
    let mut cfg = NestedVmConfig::new(RAM, backing_shift);
    cfg.dirty_logging = backing_shift < 21;
    let vm = NestedVm::new(cfg).unwrap();
    assert_eq!(vm.h_set_partition_table(PTCR), 0);
    for l in 1..=3 {
        l1_tree(&vm, l, Tree::spaced(l));
    }
    vm
}

fn pte_addr(lpid: u64, k: u64) -> u64 {
    root(lpid) + 0x4_0000 + 8 * k
}

fn invalidate_page(vm: &NestedVm, lpid: u64, k: u64) {
    let instr = TlbieInstr::encode(0, false, true).0;
    assert_eq!(vm.h_tlb_invalidate(instr, lpid, (k * K64) | (5 << 5)), 0);
}

/// What L1's tables say, as the trace reference model computes it.
fn expected(vm: &NestedVm, lpid: u64, n: u64, acc: Access) -> L2Result {
    l1_expected(vm, RAM, lpid, NGpa::new(n).unwrap(), acc)
}

fn run(backing_shift: u32, ops: &[Op]) -> Result<(), TestCaseError> {
    let vm = setup(backing_shift);
    let host = |page: u64| {
        let mask = (1u64 << backing_shift) - 1;
        let a = (DATA + page * K64) & !mask;
        (Hva(L1_RAM_HVA + a), Hva(L1_RAM_HVA + a + mask + 1))
    };
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Map { lpid, k, page, f } => {
                let v = RadixPte::new(target(page), FLAGS[f]).bits();
                vm.l1_store(pte_addr(lpid, k), v).unwrap();
                invalidate_page(&vm, lpid, k);
            }
            Op::Unmap { lpid, k } => {
                vm.l1_store(pte_addr(lpid, k), 0).unwrap();
                invalidate_page(&vm, lpid, k);
            }
            Op::SetRc { lpid, k } => {
                let a = pte_addr(lpid, k);
                let old = vm.with_l1_memory(|m| {
                    use revmap_nested::radix::GuestMemory;
                    m.read_be_u64(revmap_rmap::Gpa(a))
                });
                if let Some(old) = old.filter(|&o| o != 0) {
                    vm.l1_store(a, old | RadixPte::R | RadixPte::C).unwrap();
                }
            }
            Op::Flush { lpid, ric } => {
                let instr = TlbieInstr::encode(ric as u8, false, true).0;
                assert_eq!(vm.h_tlb_invalidate(instr, lpid, 2 << 10), 0);
            }
            Op::Destroy { lpid } => {
                vm.destroy_l2(lpid as u16);
            }
            Op::Access { lpid, k, off, acc } => {
                let acc = [Access::Load, Access::Store, Access::Fetch][acc as usize];
                let n = k * K64 + off;
                let want = expected(&vm, lpid, n, acc);
                let got = vm.enter_nested(lpid, n, acc);
                let got_cmp = match got {
                    L2Result::Ok { l1gpa, hpa } => {
                        // Lands on the frame backing the L1 page now.
                        prop_assert_eq!(vm.hpa_to_l1gpa(hpa), Some(l1gpa), "step {}", i);
                        L2Result::Ok { l1gpa, hpa: 0 }
                    }
                    r => r,
                };
                prop_assert_eq!(got_cmp, want, "step {}: {:?}", i, op);
            }
            Op::HostUnmap { page } => {
                let (a, b) = host(page);
                host_reclaim(&vm, a, b);
            }
            Op::HostAge { page } => {
                let g = (DATA + page * K64) >> 12;
                vm.age_gfn(SlotId(0), Gfn(g), Gfn(g + 16));
            }
            Op::DirtyLog => {
                vm.get_dirty_log(SlotId(0)).unwrap();
            }
        }
        if let Err(v) = vm.check() {
            return Err(TestCaseError::fail(format!("step {i} {op:?}: {v:#?}")));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn nested_vm_keeps_its_invariants_64k_backing(ops in prop::collection::vec(op(), 1..80)) {
        run(16, &ops)?;
    }

    #[test]
    fn nested_vm_keeps_its_invariants_2m_backing(ops in prop::collection::vec(op(), 1..80)) {
        run(21, &ops)?;
    }
}
