//! Nested-MMU operation sequences through `revmap_nested::NestedVm`: L1 page-table
//! stores (map, unmap, set R/C), L1 invalidations (page, LPID, RIC 2), L2 destroys, L2
//! accesses, and host reclaim, aging and dirty-log harvests, on 64 KiB or 2 MiB host
//! pages. The shapes follow `crates/nested/tests/prop_vm.rs`, with hostile variants
//! (stores anywhere, any H_TLB_INVALIDATE operands, any partition-table register, any
//! LPID and address).
//!
//! Contract checked after every step: no panic, the nested checker passes, an access
//! that completes lands on the host frame backing its L1 page now, and while the input
//! has made only well-formed L1 changes every L2 access gives what L1's tables give by
//! KVM L0's rules (`access::l1_translate`).
#![no_main]

#[path = "../../crates/nested/tests/common/mod.rs"]
mod common;

use arbitrary::Arbitrary;
use common::{root, PATB, PTCR};
use libfuzzer_sys::fuzz_target;
use revmap_host::HostMmu;
use revmap_nested::hcall::TlbieInstr;
use revmap_nested::radix::{Access, PateDw0, RadixPde, RadixPte};
use revmap_nested::vm::{L2Result, NestedVm, NestedVmConfig, L1_RAM_HVA};
use revmap_nested::NGpa;
use revmap_rmap::{Gfn, Hva, SlotId};

const RAM: u64 = 64 << 20;
const DATA: u64 = 0x200_0000;
const K64: u64 = 0x1_0000;
const PAGES: u64 = 40;
const SLOTS: u64 = 8;
const MAX_STEPS: usize = 128;
/// L1's partition-table register: table at 0x1_0000, size field 4.

#[derive(Arbitrary, Debug)]
struct Input {
    huge_backing: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    Map { lpid: u8, k: u8, page: u8, f: u8 },
    Unmap { lpid: u8, k: u8 },
    SetRc { lpid: u8, k: u8 },
    Flush { lpid: u8, ric2: bool },
    Destroy { lpid: u8 },
    Access { lpid: u8, k: u8, off: u16, acc: u8 },
    HostUnmap { page: u8 },
    HostAge { page: u8 },
    DirtyLog,
    // Hostile L1 behaviour.
    StoreAny { gpa: u32, val: u64 },
    PteAny { lpid: u8, k: u8, val: u64 },
    TlbieAny { instr: u64, rs: u64, rb: u64 },
    SetPtcr { ptcr: u64 },
    AccessAny { lpid: u64, gpa: u64, acc: u8 },
    DestroyAny { lpid: u16 },
}

fn lpid_of(l: u8) -> u64 {
    1 + u64::from(l % 3)
}

fn pte_addr(lpid: u64, k: u64) -> u64 {
    root(lpid) + 0x4_0000 + 8 * k
}

fn target(page: u64) -> u64 {
    if page == PAGES {
        RAM + (1 << 30) // emulated MMIO
    } else {
        DATA + page * K64
    }
}

fn access_of(a: u8) -> Access {
    [Access::Load, Access::Store, Access::Fetch][usize::from(a % 3)]
}

fn setup(backing_shift: u32) -> NestedVm {
    let mut cfg = NestedVmConfig::new(RAM, backing_shift);
    cfg.dirty_logging = backing_shift < 21;
    let vm = NestedVm::new(cfg).expect("a valid configuration");
    assert_eq!(vm.h_set_partition_table(PTCR), 0);
    for lpid in 1..=3 {
        let r = root(lpid);
        let (pud, pmd, pte) = (r + 0x2_0000, r + 0x3_0000, r + 0x4_0000);
        for (a, v) in [
            (PATB + 16 * lpid, PateDw0::radix52(r, 13).bits()),
            (r, RadixPde::new(pud, 9).bits()),
            (pud, RadixPde::new(pmd, 9).bits()),
            (pmd, RadixPde::new(pte, 5).bits()),
        ] {
            vm.l1_store(a, v).expect("L1 RAM");
        }
    }
    vm
}

fn invalidate_page(vm: &NestedVm, lpid: u64, k: u64) -> Result<(), String> {
    let instr = TlbieInstr::encode(0, false, true).0;
    match vm.h_tlb_invalidate(instr, lpid, (k * K64) | (5 << 5)) {
        0 => Ok(()),
        r => Err(format!("page invalidation returned {r}")),
    }
}

/// What L1's tables say, as the trace reference model computes it.
fn expected(vm: &NestedVm, lpid: u64, n: u64, acc: Access) -> Option<L2Result> {
    Some(common::l1_expected(vm, RAM, lpid, NGpa::new(n)?, acc))
}

/// An L2 access; compares with L1's tables when `oracle`.
fn access(vm: &NestedVm, lpid: u64, n: u64, acc: Access, oracle: bool) -> Result<(), String> {
    let want = if oracle {
        expected(vm, lpid, n, acc)
    } else {
        None
    };
    let got = match vm.enter_nested(lpid, n, acc) {
        L2Result::Ok { l1gpa, hpa } => {
            let back = vm.hpa_to_l1gpa(hpa);
            if back != Some(l1gpa) {
                return Err(format!(
                    "access {n:#x} reached hpa {hpa:#x} = L1 {back:x?}, not {l1gpa:#x}"
                ));
            }
            L2Result::Ok { l1gpa, hpa: 0 }
        }
        r => r,
    };
    match want {
        Some(w) if w != got => Err(format!(
            "access {n:#x} {acc:?}: got {got:x?}, L1's tables {w:x?}"
        )),
        _ => Ok(()),
    }
}

fn step(vm: &NestedVm, shift: u32, op: Op, oracle: &mut bool) -> Result<(), String> {
    let host = |page: u8| {
        let mask = (1u64 << shift) - 1;
        let a = (DATA + u64::from(page) % PAGES * K64) & !mask;
        (Hva(L1_RAM_HVA + a), Hva(L1_RAM_HVA + a + mask + 1))
    };
    match op {
        Op::Map { lpid, k, page, f } => {
            let (lpid, k) = (lpid_of(lpid), u64::from(k) % SLOTS);
            let v = RadixPte::new(
                target(u64::from(page) % (PAGES + 1)),
                common::FLAGS[usize::from(f) % common::FLAGS.len()],
            );
            vm.l1_store(pte_addr(lpid, k), v.bits())
                .map_err(|e| e.to_string())?;
            invalidate_page(vm, lpid, k)?;
        }
        Op::Unmap { lpid, k } => {
            let (lpid, k) = (lpid_of(lpid), u64::from(k) % SLOTS);
            vm.l1_store(pte_addr(lpid, k), 0)
                .map_err(|e| e.to_string())?;
            invalidate_page(vm, lpid, k)?;
        }
        Op::SetRc { lpid, k } => {
            let a = pte_addr(lpid_of(lpid), u64::from(k) % SLOTS);
            let old = vm.with_l1_memory(|m| {
                use revmap_nested::radix::GuestMemory;
                m.read_be_u64(revmap_rmap::Gpa(a))
            });
            if let Some(old) = old.filter(|&o| o != 0) {
                vm.l1_store(a, old | RadixPte::R | RadixPte::C)
                    .map_err(|e| e.to_string())?;
            }
        }
        Op::Flush { lpid, ric2 } => {
            let instr = TlbieInstr::encode(if ric2 { 2 } else { 0 }, false, true).0;
            let r = vm.h_tlb_invalidate(instr, lpid_of(lpid), 2 << 10);
            if r != 0 {
                return Err(format!("LPID flush returned {r}"));
            }
        }
        Op::Destroy { lpid } => {
            vm.destroy_l2(lpid_of(lpid) as u16);
        }
        Op::Access { lpid, k, off, acc } => {
            let n = (u64::from(k) % SLOTS) * K64 + (u64::from(off) & 0xfff8);
            access(vm, lpid_of(lpid), n, access_of(acc), *oracle)?;
        }
        Op::HostUnmap { page } => {
            let (a, b) = host(page);
            vm.invalidate_range_start(a, b);
            vm.unmap_hva_range(a, b);
            vm.invalidate_range_end(a, b);
            vm.host_page_in(a, b);
        }
        Op::HostAge { page } => {
            let g = (DATA + u64::from(page) % PAGES * K64) >> 12;
            vm.age_gfn(SlotId(0), Gfn(g), Gfn(g + 16));
        }
        Op::DirtyLog => {
            vm.get_dirty_log(SlotId(0)).map_err(|e| e.to_string())?;
        }
        Op::StoreAny { gpa, val } => {
            *oracle = false;
            let _ = vm.l1_store(u64::from(gpa) & !7, val);
        }
        Op::PteAny { lpid, k, val } => {
            *oracle = false;
            let _ = vm.l1_store(pte_addr(lpid_of(lpid), u64::from(k) % SLOTS), val);
        }
        Op::TlbieAny { instr, rs, rb } => {
            *oracle = false;
            let _ = vm.h_tlb_invalidate(instr, rs, rb);
        }
        Op::SetPtcr { ptcr } => {
            *oracle = false;
            let _ = vm.h_set_partition_table(ptcr);
        }
        Op::AccessAny { lpid, gpa, acc } => {
            access(vm, lpid, gpa, access_of(acc), false)?;
        }
        Op::DestroyAny { lpid } => {
            *oracle = false;
            vm.destroy_l2(lpid);
        }
    }
    Ok(())
}

fuzz_target!(|input: Input| {
    let shift = if input.huge_backing { 21 } else { 16 };
    let vm = setup(shift);
    let mut oracle = true;
    for (i, op) in input.ops.iter().take(MAX_STEPS).enumerate() {
        if let Err(e) = step(&vm, shift, *op, &mut oracle) {
            panic!("step {i} {op:?}: {e}");
        }
        if let Err(v) = vm.check() {
            panic!("step {i} {op:?}: {v:#?}");
        }
    }
});
