//! Loom models of the nested MMU ([`NestedVm`] on `revmap_rmap::sync`):
//!
//! * a nested fault racing a host unmap of the same L1 page: whatever the interleaving,
//!   the access completes and no shadow leaf is left on the freed host frame (the
//!   `InvalidateSeq` retry); the should-fail variant skips the retry check and loom
//!   finds the interleaving that leaves a shadow leaf on the freed frame;
//! * stale-entry reclaim racing an insert: two L2s fault on one L1 page whose rmap word
//!   is at its bound (cap 1) with a stale entry; the bound holds and every shadow leaf
//!   stays covered (one insert reclaims, the other is refused and served without a
//!   shadow leaf); the should-fail variant reclaims live entries and loom finds the
//!   uncovered leaf.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=2
//! cargo test -p revmap-nested --release --test loom_nested`.
#![cfg(loom)]

mod common;

use common::{host_unmap, l1_tree, Tree, PTCR};
use revmap_nested::radix::{Access, RadixPte};
use revmap_nested::vm::{L2Result, NestedVm, NestedVmConfig};
use revmap_rmap::sync::{thread, Arc, Ordering};

/// 1 MiB of L1 RAM: partition table at 64 KiB, roots from 128 KiB, directories from
/// 320 KiB, data pages from 512 KiB.
const RAM: u64 = 1 << 20;
const DATA: u64 = 0x8_0000;
const K64: u64 = 0x1_0000;
const FULL: u64 = RadixPte::R | RadixPte::C | RadixPte::EAA_READ | RadixPte::EAA_RW;

/// Every lpid of `lpids` maps its L2 pages 0 and 1 to the first data page.
fn setup(cap: usize, lpids: &[u64]) -> NestedVm {
    let mut cfg = NestedVmConfig::new(RAM, 16);
    cfg.rmap_cap = cap;
    let vm = NestedVm::new(cfg).unwrap();
    assert_eq!(vm.h_set_partition_table(PTCR), 0);
    for &l in lpids {
        let t = Tree::compact(l);
        l1_tree(&vm, l, t);
        let pte = t.pte;
        for k in 0..2 {
            vm.l1_store(pte + 8 * k, RadixPte::new(DATA, FULL).bits())
                .unwrap();
        }
    }
    vm
}

fn fault_vs_unmap(skip_retry: bool) {
    loom::model(move || {
        let vm = Arc::new(setup(64, &[1]));
        vm.loom_knobs()
            .skip_invalidate_retry
            .store(skip_retry, Ordering::Relaxed);
        let l2 = {
            let vm = vm.clone();
            thread::spawn(move || vm.enter_nested(1, 0x10, Access::Load))
        };
        host_unmap(&vm, DATA, K64);
        let r = l2.join().unwrap();
        if let Err(v) = vm.check() {
            panic!("shadow leaf left after the unmap: {v:?}");
        }
        assert!(
            matches!(r, L2Result::Ok { l1gpa, .. } if l1gpa == DATA | 0x10),
            "{r:?}"
        );
    });
}

#[test]
fn nested_fault_vs_host_unmap_retries() {
    fault_vs_unmap(false);
}

#[test]
#[should_panic(expected = "shadow leaf left after the unmap")]
fn nested_fault_without_the_retry_check_leaves_a_stale_shadow_leaf() {
    fault_vs_unmap(true);
}

fn reclaim_vs_insert(reclaim_live: bool) {
    loom::model(move || {
        let vm = Arc::new(setup(1, &[1, 2, 3]));
        // L2 3 leaves a stale entry at the data page's word (cap 1).
        assert!(matches!(
            vm.enter_nested(3, 0, Access::Load),
            L2Result::Ok { .. }
        ));
        assert!(vm.destroy_l2(3));
        vm.loom_knobs()
            .reclaim_live_entries
            .store(reclaim_live, Ordering::Relaxed);
        let t = {
            let vm = vm.clone();
            thread::spawn(move || vm.enter_nested(1, 0x20, Access::Load))
        };
        let r2 = vm.enter_nested(2, K64 + 0x20, Access::Load);
        let r1 = t.join().unwrap();
        for r in [r1, r2] {
            assert!(
                matches!(r, L2Result::Ok { l1gpa, .. } if l1gpa == DATA | 0x20),
                "{r:?}"
            );
        }
        assert!(vm.rmap_entries(DATA).len() <= 1);
        if let Err(v) = vm.check() {
            panic!("uncovered shadow leaf: {v:?}");
        }
    });
}

#[test]
fn stale_reclaim_vs_insert_keeps_the_bound_and_coverage() {
    reclaim_vs_insert(false);
}

#[test]
#[should_panic(expected = "uncovered shadow leaf")]
fn reclaiming_live_entries_uncovers_a_shadow_leaf() {
    reclaim_vs_insert(true);
}
