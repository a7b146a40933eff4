//! Loom models of the x86 shadow MMU (on `revmap_rmap::sync`):
//!
//! * lockless aging against zapping: an ager walks an rmap under its read-only bit lock
//!   and clears A with an atomic RMW ([`age_rmap_head`], no `mmu_lock`) while a zapper
//!   clears one of the SPTEs and unlinks it ([`clear_and_unlink`], as `drop_spte`):
//!   whatever the interleaving, a present SPTE is on the rmap and a cleared one is not
//!   (invariant 1), and the survivor ends up old. The should-fail variant clears A with
//!   a load and a store, and loom finds the interleaving where it writes the zapped
//!   SPTE back (present, but on no rmap);
//! * a shadow fault against an MMU-notifier invalidation of its page, through
//!   [`ShadowVm`]: the fault samples `mmu_invalidate_seq` and re-checks it (and the
//!   in-progress count) under `mmu_lock`, so no SPTE survives on a host page the
//!   invalidation took away; the should-fail variant skips the re-check
//!   (`LoomKnobs::skip_invalidate_retry`) and loom finds the SPTE the checker rejects.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=3
//! cargo test -p revmap-shadow --release --test loom_shadow`.
#![cfg(loom)]

use revmap_host::{HostMmu, Memslot, MemslotFlags};
use revmap_rmap::pte_list::{DescCache, DescPool, PteListHead, SpteHandle};
use revmap_rmap::sync::{thread, Arc, AtomicU64, Ordering};
use revmap_rmap::{Gfn, Hva, SlotId};
use revmap_shadow::mmu::{
    age_rmap_head, age_rmap_head_load_store, clear_and_unlink, AccessOutcome,
};
use revmap_shadow::paging::{
    Access, CpuMode, Gpa, PT_ACCESSED, PT_DIRTY, PT_PRESENT, PT_USER, PT_WRITABLE,
};
use revmap_shadow::role::Spte;
use revmap_shadow::vm::ShadowVm;

/// A present, accessed 4 KiB leaf SPTE for host frame `pfn`.
fn leaf(pfn: u64) -> u64 {
    Spte::MMU_PRESENT | Spte::PRESENT | Spte::ACCESSED | (pfn << 12)
}

/// rmap entry `k` (the address of SPTE `k`).
fn handle(k: usize) -> SpteHandle {
    SpteHandle::new(8 * (k as u64 + 1)).unwrap()
}

fn index(h: SpteHandle) -> usize {
    (h.raw() / 8 - 1) as usize
}

fn aging_vs_zap(load_store: bool) {
    loom::model(move || {
        let pool = Arc::new(DescPool::new());
        let head = Arc::new(PteListHead::new());
        let sptes = Arc::new([AtomicU64::new(leaf(0x100)), AtomicU64::new(leaf(0x101))]);
        {
            let mut c = DescCache::new(&pool);
            c.reserve(2).unwrap();
            for k in 0..2 {
                let _ = head.lock().add(&mut c, handle(k)).unwrap();
            }
        }
        let ager = {
            let (pool, head, sptes) = (pool.clone(), head.clone(), sptes.clone());
            thread::spawn(move || {
                let of = |h: SpteHandle| sptes.get(index(h));
                if load_store {
                    age_rmap_head_load_store(&head, &pool, of)
                } else {
                    age_rmap_head(&head, &pool, true, of)
                }
            })
        };
        clear_and_unlink(&sptes[0], &head, &pool, handle(0)).unwrap();
        let young = ager.join().unwrap();
        let on: Vec<u64> = head.lock_readonly().iter(&pool).map(|h| h.raw()).collect();
        for k in 0..2 {
            // ORDERING: Relaxed: after the join.
            let s = Spte(sptes[k].load(Ordering::Relaxed));
            assert_eq!(
                s.is_shadow_present(),
                on.contains(&handle(k).raw()),
                "SPTE {k} present but on no rmap: {s:?}"
            );
        }
        assert!(!Spte(sptes[0].load(Ordering::Relaxed)).is_shadow_present());
        assert_eq!(sptes[1].load(Ordering::Relaxed) & Spte::ACCESSED, 0);
        assert!(young, "the survivor was young");
    });
}

#[test]
fn lockless_aging_vs_zap_keeps_rmap_and_sptes_in_step() {
    aging_vs_zap(false);
}

#[test]
#[should_panic(expected = "present but on no rmap")]
fn aging_with_a_load_and_a_store_resurrects_a_zapped_spte() {
    aging_vs_zap(true);
}

const HVA: u64 = 0x7f00_0000_0000;
const DATA_GFN: u64 = 8;

/// A 16-page slot; 4-level tables at gfns 1..=4 map va 0 to gfn 8.
fn small_vm() -> (ShadowVm, usize) {
    let vm = ShadowVm::new();
    let slot = Memslot::new(SlotId(1), Gfn(0), 16, 12, MemslotFlags::empty(), Hva(HVA)).unwrap();
    vm.create_memslot(slot).unwrap();
    let e = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY;
    vm.with_mmu(|m| {
        for (t, next) in [(1u64, 2u64), (2, 3), (3, 4), (4, DATA_GFN)] {
            m.mem.write_u64(Gpa(t << 12), (next << 12) | e).unwrap();
        }
    });
    let v = vm.add_vcpu(CpuMode::long4(0x1000));
    (vm, v)
}

fn fault_vs_invalidation(skip_retry: bool) {
    // A fault is thousands of atomic operations (SPTE reads, rmap bit locks, the
    // descriptor pool): more branches than loom's default allows.
    let mut b = loom::model::Builder::new();
    b.max_branches = 1 << 20;
    b.check(move || {
        let (vm, v) = small_vm();
        let vm = Arc::new(vm);
        vm.with_mmu_read(|m| {
            m.loom_knobs()
                .skip_invalidate_retry
                .store(skip_retry, Ordering::Relaxed)
        });
        let vcpu = {
            let vm = vm.clone();
            thread::spawn(move || vm.access(v, 0x10, Access::empty()).unwrap())
        };
        // The host pages the data frame out inside an invalidation.
        let (lo, hi) = (Hva(HVA + (DATA_GFN << 12)), Hva(HVA + ((DATA_GFN + 1) << 12)));
        vm.invalidate_range_start(lo, hi);
        let slot = vm.with_mmu_read(|m| m.memslots().next().cloned()).unwrap();
        slot.set_host_present(Gfn(DATA_GFN), false);
        vm.invalidate_range_end(lo, hi);
        let r = vcpu.join().unwrap();
        if let Err(e) = vm.check() {
            panic!("SPTE left on a paged-out host page: {e}");
        }
        assert!(
            matches!(r, AccessOutcome::Fixed(g) | AccessOutcome::Hit(g) if g.0 == (DATA_GFN << 12) | 0x10),
            "{r:?}"
        );
    });
}

#[test]
fn shadow_fault_vs_invalidation_retries() {
    fault_vs_invalidation(false);
}

#[test]
#[should_panic(expected = "SPTE left on a paged-out host page")]
fn shadow_fault_without_the_retry_check_maps_a_paged_out_page() {
    fault_vs_invalidation(true);
}
