//! Shuttle test of the x86 shadow MMU with six threads on one [`ShadowVm`]: four vCPUs
//! loading and storing through their shadow tables (one of them also repointing PTEs of
//! its own region with guest stores and INVLPG, which unsyncs and resyncs the leaf
//! table), a host thread reclaiming host pages inside MMU-notifier invalidations and
//! aging, and a thread running live-migration dirty-log rounds. Every access completes
//! at the address the guest tables give (host reclaim and write protection are
//! invisible to the guest), and the section-8 invariant checker passes at the end of
//! every schedule.
//!
//! Run: `RUSTFLAGS="--cfg shuttle" CARGO_TARGET_DIR=target/shuttle cargo test
//! -p revmap-shadow --release --test shuttle_shadow`.
#![cfg(shuttle)]

use revmap_host::{HostMmu, Memslot, MemslotFlags};
use revmap_rmap::sync::{thread, Arc, AtomicU64, Ordering};
use revmap_rmap::{Gfn, Hva, SlotId};
use revmap_shadow::mmu::AccessOutcome;
use revmap_shadow::paging::{
    Access, CpuMode, Gpa, PT_ACCESSED, PT_DIRTY, PT_PRESENT, PT_USER, PT_WRITABLE,
};
use revmap_shadow::vm::ShadowVm;
use shuttle::rand::{thread_rng, RngCore};

const HVA: u64 = 0x7f00_0000_0000;
const E: u64 = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY;
/// Shared pages: va `k << 12` maps gfn `0x100 + k`.
const SHARED: u64 = 8;
/// The repointing vCPU's own PTEs: va `(16 + j) << 12`, targets in `0x180..0x188`.
const OWN: u64 = 16;

/// A 4096-page slot; tables: PML4 gfn 1, PDPT 2, PD 3, PT 4.
fn setup() -> ShadowVm {
    let vm = ShadowVm::new();
    let slot = Memslot::new(SlotId(1), Gfn(0), 4096, 12, MemslotFlags::empty(), Hva(HVA)).unwrap();
    vm.create_memslot(slot).unwrap();
    vm.with_mmu(|m| {
        for (a, v) in [(0x1000, 0x2000), (0x2000, 0x3000), (0x3000, 0x4000)] {
            m.mem.write_u64(Gpa(a), v | E).unwrap();
        }
        for k in 0..SHARED {
            m.mem
                .write_u64(Gpa(0x4000 + 8 * k), (0x100 + k) << 12 | E)
                .unwrap();
        }
        for j in 0..4 {
            m.mem
                .write_u64(Gpa(0x4000 + 8 * (OWN + j)), (0x180 + j) << 12 | E)
                .unwrap();
        }
    });
    vm
}

fn expect_at(o: AccessOutcome, gpa: u64) {
    match o {
        AccessOutcome::Hit(g) | AccessOutcome::Fixed(g) => assert_eq!(g.0, gpa, "{o:?}"),
        o => panic!("access to {gpa:#x}: {o:?}"),
    }
}

fn storm() {
    let vm = Arc::new(setup());
    let vcpus: Vec<usize> = (0..4)
        .map(|_| vm.add_vcpu(CpuMode::long4(0x1000)))
        .collect();
    // Accesses completed: the host threads pace themselves on it.
    let done = Arc::new(AtomicU64::new(0));
    let wait_for = |done: &AtomicU64, n: u64| {
        // ORDERING: SeqCst: shuttle runs everything sequentially consistent anyway.
        while done.load(Ordering::SeqCst) < n {
            thread::yield_now();
        }
    };
    let mut threads = Vec::new();
    for (t, v) in vcpus.into_iter().enumerate() {
        let (vm, done) = (vm.clone(), done.clone());
        threads.push(thread::spawn(move || {
            let mut rng = thread_rng();
            for _ in 0..4 {
                let k = rng.next_u64() % SHARED;
                let acc = if rng.next_u64() % 2 == 0 {
                    Access::WRITE
                } else {
                    Access::empty()
                };
                expect_at(
                    vm.access(v, k << 12 | 8, acc).unwrap(),
                    (0x100 + k) << 12 | 8,
                );
                if t == 3 {
                    // Repoint one of this vCPU's own PTEs, INVLPG, use it.
                    let j = rng.next_u64() % 4;
                    let target = 0x180 + rng.next_u64() % 8;
                    vm.guest_store(0x4000 + 8 * (OWN + j), target << 12 | E)
                        .unwrap();
                    let va = (OWN + j) << 12;
                    vm.with_mmu(|m| m.invlpg(v, va)).unwrap();
                    expect_at(vm.access(v, va, Access::WRITE).unwrap(), target << 12);
                }
                // ORDERING: SeqCst: see `wait_for`.
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    {
        let (vm, done) = (vm.clone(), done.clone());
        threads.push(thread::spawn(move || {
            let mut rng = thread_rng();
            for i in 0..4 {
                wait_for(&done, 2 * i + 1);
                let g = 0x100 + rng.next_u64() % SHARED;
                let (lo, hi) = (Hva(HVA + (g << 12)), Hva(HVA + ((g + 2) << 12)));
                if rng.next_u64() % 2 == 0 {
                    vm.unmap_hva_range(lo, hi);
                } else {
                    let young = vm.test_age_gfn(SlotId(1), Gfn(g), Gfn(g + 4));
                    let aged = vm.age_gfn(SlotId(1), Gfn(g), Gfn(g + 4));
                    // Nothing else clears Accessed: what test_age saw young, age finds
                    // young (a vCPU may have made more pages young in between).
                    assert!(aged || !young);
                }
            }
        }));
    }
    {
        let (vm, done) = (vm.clone(), done.clone());
        threads.push(thread::spawn(move || {
            wait_for(&done, 2);
            vm.set_memslot_flags(SlotId(1), MemslotFlags::LOG_DIRTY_PAGES)
                .unwrap();
            for i in 0..2 {
                wait_for(&done, 4 + 4 * i);
                vm.get_dirty_log(SlotId(1)).unwrap();
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    if let Err(v) = vm.check() {
        panic!("invariant violation at quiescence: {v}");
    }
}

#[test]
fn six_threads_on_one_shadow_vm() {
    shuttle::check_random(storm, 300);
}
