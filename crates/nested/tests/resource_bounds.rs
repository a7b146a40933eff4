//! Resource bound under a hostile L1: eight L2 guests, each mapping all 32 pages of
//! its PTE table to the same L1 page, and every L2 touching every page. The nested
//! rmap word of that L1 page is bounded ([`DEFAULT_NESTED_RMAP_CAP`], 64 entries):
//! measured after every access, and the accesses over the bound are served without a
//! shadow leaf (`rmap_refused`), not refused to the guest.

use revmap_nested::hcall::TlbieInstr;
use revmap_nested::radix::{Access, PateDw0, RadixPde, RadixPte};
use revmap_nested::vm::{L2Result, NestedVm, NestedVmConfig};
use revmap_rmap::nested::DEFAULT_NESTED_RMAP_CAP;

const RAM: u64 = 64 << 20;
const PTCR: u64 = 0x1_0000 | 4;
const PATB: u64 = 0x1_0000;
const K64: u64 = 0x1_0000;
/// The one L1 page every L2 PTE maps.
const TARGET: u64 = 0x200_0000;
const L2S: u64 = 8;
const PTES: u64 = 32;

fn root(lpid: u64) -> u64 {
    0x10_0000 * (lpid + 1)
}

#[test]
fn hostile_l1_keeps_the_nested_rmap_bounded() {
    let mut cfg = NestedVmConfig::new(RAM, 16);
    cfg.dirty_logging = false;
    let vm = NestedVm::new(cfg).unwrap();
    assert_eq!(cfg.rmap_cap, DEFAULT_NESTED_RMAP_CAP);
    assert_eq!(vm.h_set_partition_table(PTCR), 0);
    let flags = RadixPte::R | RadixPte::C | RadixPte::EAA_READ | RadixPte::EAA_RW;
    for lpid in 1..=L2S {
        let r = root(lpid);
        let (pud, pmd, pte) = (r + 0x2_0000, r + 0x3_0000, r + 0x4_0000);
        vm.l1_store(PATB + 16 * lpid, PateDw0::radix52(r, 13).bits())
            .unwrap();
        vm.l1_store(r, RadixPde::new(pud, 9).bits()).unwrap();
        vm.l1_store(pud, RadixPde::new(pmd, 9).bits()).unwrap();
        vm.l1_store(pmd, RadixPde::new(pte, 5).bits()).unwrap();
        for k in 0..PTES {
            vm.l1_store(pte + 8 * k, RadixPte::new(TARGET, flags).bits())
                .unwrap();
        }
        let flush = TlbieInstr::encode(2, false, true).0;
        assert_eq!(vm.h_tlb_invalidate(flush, lpid, 2 << 10), 0);
    }
    let mut max_len = 0;
    for lpid in 1..=L2S {
        for k in 0..PTES {
            let got = vm.enter_nested(lpid, k * K64 + 0x80, Access::Load);
            assert!(
                matches!(got, L2Result::Ok { l1gpa, .. } if l1gpa == TARGET + 0x80),
                "lpid {lpid} page {k}: {got:?}"
            );
            max_len = max_len.max(vm.rmap_entries(TARGET).len());
        }
    }
    vm.check().unwrap();
    let c = vm.counters();
    // 256 translations of one L1 page; the word never held more than the cap.
    assert!(max_len <= DEFAULT_NESTED_RMAP_CAP, "{max_len} entries");
    assert_eq!(
        max_len, DEFAULT_NESTED_RMAP_CAP,
        "the hostile L1 reaches the cap"
    );
    assert!(
        c.rmap_entries_max_per_gfn <= DEFAULT_NESTED_RMAP_CAP as u64,
        "{c:?}"
    );
    assert!(c.rmap_refused > 0, "{c:?}");
}
