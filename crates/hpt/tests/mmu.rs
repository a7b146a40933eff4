//! The MMU ("hardware") model: translation, R/C updates, TLB flushes, faults, and the
//! concurrency property that hypercalls never lose a C bit set by hardware (KVM's
//! "Don't lose hardware R/C bit updates in H_PROTECT").
mod common;
use common::read;
use revmap_hpt::hash::{hpt_hash, primary_pteg, Segment, SegmentSize};
use revmap_hpt::hcall::*;
use revmap_hpt::hpte::{encode_avpn, HpteR, HpteV};
use revmap_hpt::mmu::{Access, Fault, VcpuMmu};
use revmap_hpt::vm::RAM_HVA_BASE;
use revmap_hpt::{Flavour, Vm, VmConfig};
use revmap_rmap::{Gfn, Ptex};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

const SEG: Segment = Segment {
    vsid: 0x5_1234,
    ssize: SegmentSize::S256M,
    base_shift: 12,
};

fn vm(flavour: Flavour) -> Vm {
    Vm::new(VmConfig {
        ram_bytes: 64 << 20,
        hpt_order: 18,
        flavour,
        backing_page_shift: 12,
    })
    .unwrap()
}

/// Enter a 4K page mapping ea = k << 12 to gpa = gpa_page << 12 with pp, in the primary
/// group. Returns the ptex.
fn enter(vm: &Vm, k: u64, gpa_page: u64, pp: u64) -> u64 {
    let ea = k << 12;
    let hash = hpt_hash(&SEG, ea);
    let group = primary_pteg(vm.hpt().geometry(), hash) * 8;
    let pteh = encode_avpn(SEG.va(ea), 12, false) | HpteV::VALID;
    let ptel = (gpa_page << 12) | HpteR::M | pp;
    let r = vm.hcall(0, H_ENTER, &[0, group, pteh, ptel]);
    assert_eq!(r.ret, H_SUCCESS);
    r.out[0]
}

#[test]
fn translate_sets_r_then_c_and_uses_the_tlb() {
    let vm = vm(Flavour::Kvm);
    let p = enter(&vm, 3, 0x42, 2);
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    let t = mmu
        .translate(&SEG, (3 << 12) | 0x123, Access::Load)
        .unwrap();
    assert_eq!(t.real_addr, RAM_HVA_BASE + (0x42 << 12) + 0x123);
    assert_eq!((t.ptex.0 as u64, t.tlb_hit), (p, false));
    assert_eq!(read(&vm, p).1 & HpteR::RC, HpteR::R, "load sets R only");
    let t = mmu.translate(&SEG, 3 << 12, Access::Load).unwrap();
    assert!(t.tlb_hit);
    mmu.translate(&SEG, 3 << 12, Access::Store).unwrap();
    assert_eq!(read(&vm, p).1 & HpteR::RC, HpteR::RC, "store sets C");
    // The guest view still has the guest RPN, never the host one.
    assert_eq!(read(&vm, p).1 & HpteR::RPN, 0x42 << 12);
    vm.check_invariants().unwrap();
}

#[test]
fn invalidation_flushes_the_tlb() {
    let vm = vm(Flavour::Kvm);
    let p = enter(&vm, 5, 0x10, 2);
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    mmu.translate(&SEG, 5 << 12, Access::Store).unwrap();
    let r = vm.hcall(0, H_REMOVE, &[0, p, 0]);
    assert_eq!(r.ret, H_SUCCESS);
    assert_eq!(
        r.out[1] & HpteR::RC,
        HpteR::RC,
        "R/C harvested into the answer"
    );
    assert_eq!(
        mmu.translate(&SEG, 5 << 12, Access::Load),
        Err(Fault::NoHpte)
    );
    let s = vm.memslots().lookup(Gfn(0x10)).unwrap().clone();
    assert!(s.is_dirty(Gfn(0x10)), "C reached the dirty bitmap");
    assert!(
        s.rmap(Gfn(0x10)).unwrap().load().changed(),
        "and the rmap word"
    );
}

#[test]
fn protection_absent_and_mmio_faults() {
    let vm = vm(Flavour::Kvm);
    let p = enter(&vm, 7, 0x20, 3); // read-only
    let mut mmu = VcpuMmu::new(&vm).unwrap();
    mmu.translate(&SEG, 7 << 12, Access::Load).unwrap();
    assert_eq!(
        mmu.translate(&SEG, 7 << 12, Access::Store),
        Err(Fault::Protection {
            ptex: Ptex(p as u32)
        })
    );
    // Host page not present -> ABSENT -> host fault.
    let s = vm.memslots().lookup(Gfn(0x30)).unwrap().clone();
    s.set_host_present(Gfn(0x30), false);
    let p2 = enter(&vm, 8, 0x30, 2);
    assert_eq!(
        mmu.translate(&SEG, 8 << 12, Access::Load),
        Err(Fault::Absent {
            ptex: Ptex(p2 as u32),
            mmio: false
        })
    );
    assert_eq!(read(&vm, p2).0 & HpteV::VALID, 1, "guest sees it valid");
    // I/O address outside RAM -> MMIO.
    let p3 = {
        let ea = 9u64 << 12;
        let group = primary_pteg(vm.hpt().geometry(), hpt_hash(&SEG, ea)) * 8;
        let pteh = encode_avpn(SEG.va(ea), 12, false) | HpteV::VALID;
        let r = vm.hcall(
            0,
            H_ENTER,
            &[0, group, pteh, (1 << 40) | HpteR::I | HpteR::G | 2],
        );
        assert_eq!(r.ret, H_SUCCESS);
        r.out[0]
    };
    assert_eq!(
        mmu.translate(&SEG, 9 << 12, Access::Load),
        Err(Fault::Absent {
            ptex: Ptex(p3 as u32),
            mmio: true
        })
    );
    vm.check_invariants().unwrap();
}

#[test]
fn kvm_protect_keeps_real_readonly_until_fault_qemu_applies() {
    for (f, store_ok) in [(Flavour::Kvm, false), (Flavour::Qemu, true)] {
        let vm = vm(f);
        let p = enter(&vm, 11, 0x50, 3);
        let r = vm.hcall(0, H_PROTECT, &[2, p, 0]);
        assert_eq!(r.ret, H_SUCCESS);
        assert_eq!(read(&vm, p).1 & 3, 2, "guest view shows RW");
        let mut mmu = VcpuMmu::new(&vm).unwrap();
        assert_eq!(
            mmu.translate(&SEG, 11 << 12, Access::Store).is_ok(),
            store_ok,
            "{f}"
        );
    }
}

/// vCPU threads store to pages while the hypervisor clears C, changes protection and
/// removes/re-enters entries. A store that ran entirely between the end of hypervisor
/// operation `a` on its page and the start of operation `a + 1` must be reported by the
/// first *harvesting* operation after `a` (H_CLEAR_MOD's or H_REMOVE's returned R word),
/// or be visible at the end if there is none: intervening H_PROTECTs rewrite dword 1
/// and must merge the hardware C (KVM's H_PROTECT R/C fix).
#[test]
fn no_c_bit_is_lost_under_concurrent_hypercalls() {
    const PAGES: usize = 8;
    const OPS: u64 = 6_000;
    let vm = vm(Flavour::Kvm);
    let ptex: Vec<AtomicU64> = (0..PAGES as u64)
        .map(|k| AtomicU64::new(enter(&vm, k, 0x100 + k, 2)))
        .collect();
    let started: Vec<AtomicU64> = (0..PAGES).map(|_| AtomicU64::new(0)).collect();
    let ended: Vec<AtomicU64> = (0..PAGES).map(|_| AtomicU64::new(0)).collect();
    // Per page, per op number n (1-based): Some(reported C) for harvesting ops.
    let log: Vec<Mutex<Vec<Option<bool>>>> = (0..PAGES).map(|_| Mutex::new(vec![None])).collect();
    let stop = AtomicBool::new(false);
    // Per page: op numbers `a` after which a clean (non-overlapping) store happened.
    let windows: Mutex<Vec<Vec<bool>>> = Mutex::new(vec![Vec::new(); PAGES]);
    let counted = AtomicU64::new(0);
    // Windows first seen by each store thread, summed live: the harvester keeps going
    // until at least `MIN_WINDOWS` distinct windows were observed (each window counts at
    // most once per thread, so the union holds at least half of the sum). Bounded by
    // operation counts, not by how the scheduler happens to share the cores.
    const MIN_WINDOWS: u64 = 150;
    let fresh = AtomicU64::new(0);

    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (vm, started, ended, stop, windows, counted, fresh) =
                (&vm, &started, &ended, &stop, &windows, &counted, &fresh);
            s.spawn(move || {
                let mut mmu = VcpuMmu::new(vm).unwrap();
                let mut mine = vec![Vec::new(); PAGES];
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let k = (x % PAGES as u64) as usize;
                    let a = ended[k].load(Ordering::SeqCst);
                    let ok = mmu.translate(&SEG, (k as u64) << 12, Access::Store).is_ok();
                    fence(Ordering::SeqCst);
                    if ok && started[k].load(Ordering::SeqCst) == a {
                        let w: &mut Vec<bool> = &mut mine[k];
                        if w.len() <= a as usize {
                            w.resize(a as usize + 1, false);
                        }
                        if !w[a as usize] {
                            w[a as usize] = true;
                            fresh.fetch_add(1, Ordering::SeqCst);
                        }
                        n += 1;
                    }
                }
                let mut all = windows.lock().unwrap();
                for (dst, src) in all.iter_mut().zip(mine) {
                    if dst.len() < src.len() {
                        dst.resize(src.len(), false);
                    }
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d |= s;
                    }
                }
                counted.fetch_add(n, Ordering::SeqCst);
            });
        }
        let (vm, started, ended, log, ptex, stop, fresh) =
            (&vm, &started, &ended, &log, &ptex, &stop, &fresh);
        s.spawn(move || {
            // At least OPS operations, then on until the store threads have seen enough
            // windows (capped, so a store path that never succeeds fails the assertion
            // below instead of hanging).
            let mut i = 0u64;
            while i < OPS || (fresh.load(Ordering::SeqCst) < 2 * MIN_WINDOWS && i < 1000 * OPS) {
                let k = (i % PAGES as u64) as usize;
                let p = ptex[k].load(Ordering::SeqCst);
                started[k].fetch_add(1, Ordering::SeqCst);
                let harvested = match (i / PAGES as u64) % 5 {
                    0..=2 => {
                        let r = vm.hcall(0, H_CLEAR_MOD, &[0, p]);
                        assert_eq!(r.ret, H_SUCCESS);
                        Some(r.out[0] & HpteR::C != 0)
                    }
                    3 => {
                        // Toggle pp between two writable values: rewrites dword 1.
                        let pp = if (i / PAGES as u64) % 2 == 0 { 1 } else { 2 };
                        assert_eq!(vm.hcall(0, H_PROTECT, &[pp, p, 0]).ret, H_SUCCESS);
                        None
                    }
                    _ => {
                        let r = vm.hcall(0, H_REMOVE, &[0, p, 0]);
                        assert_eq!(r.ret, H_SUCCESS);
                        ptex[k].store(enter(vm, k as u64, 0x100 + k as u64, 2), Ordering::SeqCst);
                        Some(r.out[1] & HpteR::C != 0)
                    }
                };
                log[k].lock().unwrap().push(harvested);
                ended[k].fetch_add(1, Ordering::SeqCst);
                if i % 64 == 0 {
                    std::thread::yield_now();
                }
                i += 1;
            }
            stop.store(true, Ordering::SeqCst);
        });
    });

    vm.check_invariants().unwrap();
    let windows = windows.into_inner().unwrap();
    let mut lost = Vec::new();
    let mut checked = 0;
    for k in 0..PAGES {
        let log = log[k].lock().unwrap();
        let final_c = read(&vm, ptex[k].load(Ordering::SeqCst)).1 & HpteR::C != 0;
        for (a, _) in windows[k].iter().enumerate().filter(|(_, w)| **w) {
            checked += 1;
            let first = log.iter().skip(a + 1).find_map(|h| *h);
            let ok = first.unwrap_or(final_c);
            if !ok {
                lost.push((k, a));
            }
        }
    }
    let reports: usize = log
        .iter()
        .map(|l| {
            l.lock()
                .unwrap()
                .iter()
                .filter(|h| **h == Some(true))
                .count()
        })
        .sum();
    eprintln!(
        "{} clean stores in {checked} windows, {reports} C reports",
        counted.load(Ordering::SeqCst)
    );
    assert!(
        checked >= MIN_WINDOWS as usize,
        "the test exercised too few windows: {checked}"
    );
    assert!(
        lost.is_empty(),
        "C lost after these (page, op) windows: {lost:?}"
    );
}

/// R/C read only after the tlbie, made deterministic: a vCPU is inside an access (holding
/// a translation from before the hypercall) when the hypercall invalidates the entry; the
/// hypercall's tlbie must wait for it, and the C bit that "hardware" sets in that window
/// must end up in the hypercall's answer or in the entry.
fn c_set_during_invalidation_survives(op: u64) {
    let vm = vm(Flavour::Kvm);
    let p = enter(&vm, 12, 0x60, 2);
    let slot = vm.tlb().register().unwrap();
    vm.tlb().begin_access(slot);
    let entry = vm.hpt().slot(Ptex(p as u32)).unwrap();
    let res = std::thread::scope(|s| {
        let h = s.spawn(|| match op {
            H_PROTECT => vm.hcall(0, H_PROTECT, &[1, p, 0]),
            H_BULK_REMOVE => vm.hcall(0, H_BULK_REMOVE, &[BULK_REQUEST | p, 0, BULK_END, 0]),
            _ => vm.hcall(0, op, &[0, p, 0]),
        });
        // Wait until the hypercall has cleared VALID (published) and is in its tlbie.
        while entry.load_v() & HpteV::VALID != 0 {
            std::hint::spin_loop();
        }
        // Hardware, through its stale translation, sets C now.
        entry.hw_set_rc(HpteR::R | HpteR::C);
        vm.tlb().end_access(slot);
        h.join().unwrap()
    });
    vm.tlb().unregister(slot);
    assert_eq!(res.ret, H_SUCCESS);
    let c = match op {
        H_PROTECT => read(&vm, p).1 & HpteR::C != 0,
        H_REMOVE => res.out[1] & HpteR::C != 0,
        H_CLEAR_MOD => res.out[0] & HpteR::C != 0,
        _ => res.out[0] & (HpteR::C << 51) != 0,
    };
    assert!(
        c,
        "op {op:#x} lost the C bit set before its tlbie completed: {res:x?}"
    );
    if op != H_PROTECT && op != H_CLEAR_MOD {
        assert!(vm.memslots().lookup(Gfn(0x60)).unwrap().is_dirty(Gfn(0x60)));
    }
    vm.check_invariants().unwrap();
}

const BULK_REQUEST: u64 = 0x4000_0000_0000_0000;
const BULK_END: u64 = 0xC000_0000_0000_0000;

/// KVM's "Don't lose hardware R/C bit updates in H_PROTECT".
#[test]
fn h_protect_merges_hardware_c_set_before_tlbie() {
    c_set_during_invalidation_survives(H_PROTECT);
}

/// R/C are final only after the tlbie (the rule of KVM's `kvmppc_do_h_remove`).
#[test]
fn h_remove_reads_rc_after_tlbie() {
    c_set_during_invalidation_survives(H_REMOVE);
}

/// R/C are final only after the tlbie (the rule of KVM's `kvmppc_do_h_remove`).
#[test]
fn h_bulk_remove_reads_rc_after_tlbie() {
    c_set_during_invalidation_survives(H_BULK_REMOVE);
}

/// R/C are final only after the tlbie (the rule of KVM's `kvmppc_do_h_remove`).
#[test]
fn h_clear_mod_reads_c_after_tlbie() {
    c_set_during_invalidation_survives(H_CLEAR_MOD);
}
