//! Real threads on one [`NestedVm`]: four L2 vCPU threads (two L2s) load and store
//! through their shadow tables while a host thread reclaims, ages and harvests the dirty
//! log of L1 memory and an L1 vCPU thread invalidates (page and LPID flushes). L1's
//! mappings do not change, so every access must complete at the L1 address L1's table
//! gives; no stored page may be missing from the dirty logs (no lost C); the invariant
//! checker passes at the end. Iteration counts are fixed (no wall-clock bound).
#![cfg(not(any(loom, shuttle)))]

mod common;

use common::{host_unmap, l1_tree, Tree, PTCR};
use revmap_host::HostMmu;
use revmap_nested::hcall::TlbieInstr;
use revmap_nested::radix::{Access, RadixPte};
use revmap_nested::vm::{L2Result, NestedVm, NestedVmConfig};
use revmap_rmap::SlotId;
use std::sync::atomic::{AtomicU64, Ordering};

const RAM: u64 = 1 << 30;
const DATA: u64 = 0x1000_0000;
const K64: u64 = 0x1_0000;
const PAGES: u64 = 16;

/// L2 page k of both L2s maps L1 page k (all permissions, R and C set).
fn setup(backing_shift: u32) -> NestedVm {
    let mut cfg = NestedVmConfig::new(RAM, backing_shift);
    cfg.dirty_logging = true;
    let vm = NestedVm::new(cfg).unwrap();
    assert_eq!(vm.h_set_partition_table(PTCR), 0);
    let flags = RadixPte::R | RadixPte::C | RadixPte::EAA_READ | RadixPte::EAA_RW;
    for l in 1..=2 {
        let Tree { pte, .. } = Tree::spaced(l);
        l1_tree(&vm, l, Tree::spaced(l));
        for k in 0..PAGES {
            let v = RadixPte::new(DATA + k * K64, flags).bits();
            vm.l1_store(pte + 8 * k, v).unwrap();
        }
    }
    vm
}

fn dirty_pages(bitmap: &[u64]) -> u64 {
    let mut pages = 0;
    for k in 0..PAGES {
        let f = ((DATA + k * K64) >> 12) as usize;
        if (f..f + 16).any(|b| bitmap.get(b / 64).is_some_and(|w| w & (1 << (b % 64)) != 0)) {
            pages |= 1 << k;
        }
    }
    pages
}

fn storm(backing_shift: u32) {
    let vm = setup(backing_shift);
    let stored = AtomicU64::new(0);
    let logged = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (vm, stored) = (&vm, &stored);
            s.spawn(move || {
                let lpid = 1 + t % 2;
                let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                for _ in 0..3000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let k = x % PAGES;
                    let off = ((x >> 8) % K64) & !7;
                    let acc = if x & 0x100_0000 != 0 {
                        Access::Store
                    } else {
                        Access::Load
                    };
                    match vm.enter_nested(lpid, k * K64 + off, acc) {
                        L2Result::Ok { l1gpa, .. } => {
                            assert_eq!(l1gpa, DATA + k * K64 + off);
                            if acc == Access::Store {
                                stored.fetch_or(1 << k, Ordering::SeqCst);
                            }
                        }
                        r => panic!("lpid {lpid} page {k}: {r:?} {:?}", vm.counters()),
                    }
                }
            });
        }
        {
            let (vm, logged) = (&vm, &logged);
            s.spawn(move || {
                for i in 0..400u64 {
                    let k = (i * 7) % PAGES;
                    match i % 4 {
                        0 | 1 => {
                            host_unmap(vm, DATA + k * K64, K64);
                        }
                        2 => {
                            let g = (DATA + k * K64) >> 12;
                            vm.age_gfn(SlotId(0), revmap_rmap::Gfn(g), revmap_rmap::Gfn(g + 16));
                        }
                        _ => {
                            let bm = vm.get_dirty_log(SlotId(0)).unwrap();
                            logged.fetch_or(dirty_pages(&bm), Ordering::SeqCst);
                        }
                    }
                }
            });
        }
        {
            let vm = &vm;
            s.spawn(move || {
                let page = TlbieInstr::encode(0, false, true).0;
                for i in 0..400u64 {
                    let lpid = 1 + i % 2;
                    if i % 5 == 0 {
                        assert_eq!(vm.h_tlb_invalidate(page, lpid, 2 << 10), 0);
                    } else {
                        let k = i % PAGES;
                        assert_eq!(vm.h_tlb_invalidate(page, lpid, (k * K64) | (5 << 5)), 0);
                    }
                }
            });
        }
    });
    let bm = vm.get_dirty_log(SlotId(0)).unwrap();
    let logged = logged.load(Ordering::SeqCst) | dirty_pages(&bm);
    let stored = stored.load(Ordering::SeqCst);
    assert_eq!(
        stored & !logged,
        0,
        "stored pages missing from every dirty log"
    );
    if let Err(v) = vm.check() {
        panic!("{v:#?}");
    }
    let c = vm.counters();
    assert!(c.nested_faults > 0, "{c:#?}");
    // Whether a concurrent host unmap happened to find a shadow leaf depends on how the
    // scheduler shared the cores; the unmap path through the nested rmap is exercised
    // deterministically here instead: an access maps page 0, the host unmaps it.
    match vm.enter_nested(1, 0, Access::Load) {
        L2Result::Ok { .. } => {}
        r => panic!("after the storm: {r:?}"),
    }
    host_unmap(&vm, DATA, K64);
    let after = vm.counters();
    assert!(
        after.rmap_invalidations > c.rmap_invalidations,
        "the host unmap removed no shadow leaf: {after:#?}"
    );
    if let Err(v) = vm.check() {
        panic!("{v:#?}");
    }
    println!("{after:#?}");
}

#[test]
fn l2_vcpus_host_and_l1_threads_64k_backing() {
    storm(16);
}

#[test]
fn l2_vcpus_host_and_l1_threads_2m_backing() {
    storm(21);
}
