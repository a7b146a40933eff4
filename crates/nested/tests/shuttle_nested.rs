//! Shuttle test of the nested MMU with six threads: four L2 vCPUs (two L2s) loading and
//! storing through their shadow tables, a host thread reclaiming, aging and harvesting
//! dirty logs of L1 memory, and an L1 vCPU flushing the L2s. L1's mappings stay put, so
//! every access completes at the L1 address L1's table gives; no stored page is missing
//! from the dirty logs; the invariant checker passes at the end of every schedule.
//!
//! Run: `RUSTFLAGS="--cfg shuttle" CARGO_TARGET_DIR=target/shuttle cargo test
//! -p revmap-nested --release --test shuttle_nested`.
#![cfg(shuttle)]

mod common;

use common::{host_unmap, l1_tree, Tree, PTCR};
use revmap_host::HostMmu;
use revmap_nested::hcall::TlbieInstr;
use revmap_nested::radix::{Access, RadixPte};
use revmap_nested::vm::{L2Result, NestedVm, NestedVmConfig};
use revmap_rmap::sync::{thread, Arc, AtomicU64, Ordering};
use revmap_rmap::{Gfn, SlotId};
use shuttle::rand::{thread_rng, RngCore};

const RAM: u64 = 1 << 20;
const DATA: u64 = 0x8_0000;
const K64: u64 = 0x1_0000;
const PAGES: u64 = 4;

fn setup() -> NestedVm {
    let vm = NestedVm::new(NestedVmConfig::new(RAM, 16)).unwrap();
    assert_eq!(vm.h_set_partition_table(PTCR), 0);
    let flags = RadixPte::R | RadixPte::C | RadixPte::EAA_READ | RadixPte::EAA_RW;
    for l in 1..=2u64 {
        let t = Tree::compact(l);
        l1_tree(&vm, l, t);
        let pte = t.pte;
        for k in 0..PAGES {
            vm.l1_store(pte + 8 * k, RadixPte::new(DATA + k * K64, flags).bits())
                .unwrap();
        }
    }
    vm
}

fn dirty_pages(bitmap: &[u64]) -> u64 {
    (0..PAGES)
        .filter(|k| {
            let f = ((DATA + k * K64) >> 12) as usize;
            (f..f + 16).any(|b| bitmap.get(b / 64).is_some_and(|w| w & (1 << (b % 64)) != 0))
        })
        .fold(0, |m, k| m | 1 << k)
}

fn storm() {
    let vm = Arc::new(setup());
    let stored = Arc::new(AtomicU64::new(0));
    let logged = Arc::new(AtomicU64::new(0));
    // Accesses completed: the host and L1 threads pace their operations on it, so
    // that they act on pages the L2s have faulted in.
    let done = Arc::new(AtomicU64::new(0));
    let wait_for = |done: &AtomicU64, n: u64| {
        while done.load(Ordering::SeqCst) < n {
            thread::yield_now();
        }
    };
    let mut threads = Vec::new();
    for t in 0..4u64 {
        let (vm, stored, done) = (vm.clone(), stored.clone(), done.clone());
        threads.push(thread::spawn(move || {
            let lpid = 1 + t % 2;
            let mut rng = thread_rng();
            for _ in 0..4 {
                let k = rng.next_u64() % PAGES;
                let acc = if rng.next_u64() % 2 == 0 {
                    Access::Store
                } else {
                    Access::Load
                };
                match vm.enter_nested(lpid, k * K64 + 8, acc) {
                    L2Result::Ok { l1gpa, .. } => {
                        assert_eq!(l1gpa, DATA + k * K64 + 8);
                        if acc == Access::Store {
                            stored.fetch_or(1 << k, Ordering::SeqCst);
                        }
                    }
                    r => panic!("lpid {lpid} page {k}: {r:?}"),
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    {
        let (vm, logged, done) = (vm.clone(), logged.clone(), done.clone());
        threads.push(thread::spawn(move || {
            let mut rng = thread_rng();
            for i in 0..4 {
                wait_for(&done, 2 * i + 1);
                let k = rng.next_u64() % PAGES;
                match rng.next_u64() % 3 {
                    0 => {
                        host_unmap(&vm, DATA + k * K64, K64);
                    }
                    1 => {
                        let g = (DATA + k * K64) >> 12;
                        vm.age_gfn(SlotId(0), Gfn(g), Gfn(g + 16));
                    }
                    _ => {
                        let bm = vm.get_dirty_log(SlotId(0)).unwrap();
                        logged.fetch_or(dirty_pages(&bm), Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    {
        let (vm, done) = (vm.clone(), done.clone());
        threads.push(thread::spawn(move || {
            let instr = TlbieInstr::encode(0, false, true).0;
            let mut rng = thread_rng();
            for i in 0..3 {
                wait_for(&done, 3 * i + 2);
                let lpid = 1 + rng.next_u64() % 2;
                let k = rng.next_u64() % PAGES;
                let rb = if rng.next_u64() % 2 == 0 {
                    2 << 10
                } else {
                    (k * K64) | (5 << 5)
                };
                assert_eq!(vm.h_tlb_invalidate(instr, lpid, rb), 0);
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let bm = vm.get_dirty_log(SlotId(0)).unwrap();
    let logged = logged.load(Ordering::SeqCst) | dirty_pages(&bm);
    assert_eq!(
        stored.load(Ordering::SeqCst) & !logged,
        0,
        "lost dirty page"
    );
    if let Err(v) = vm.check() {
        panic!("{v:?}");
    }
    let c = vm.counters();
    INVALIDATIONS.fetch_add(c.rmap_invalidations, std::sync::atomic::Ordering::Relaxed);
}

/// Shadow leaves removed through the nested rmap over all schedules (the test would be
/// vacuous if host unmaps never met a faulted-in page).
static INVALIDATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[test]
fn six_threads_on_one_nested_vm() {
    shuttle::check_random(storm, 300);
    assert!(INVALIDATIONS.load(std::sync::atomic::Ordering::Relaxed) > 0);
}
