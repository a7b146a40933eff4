//! Helpers shared by the HPT crate's tests and those of `revmap-resize` (which include
//! this file by path): the vendored real traces and a
//! minimal reader of their lines, independent of `revmap-trace` so that the HPT crate
//! checks itself end to end. Each test binary uses a subset of them.
#![allow(dead_code)]

use revmap_hpt::hcall::*;
use revmap_hpt::mmu::{Access, Fault};
use revmap_hpt::{FaultOutcome, Vm};
use revmap_rmap::sync::{thread, Arc};
use revmap_rmap::Ptex;
use std::io::{BufRead, BufReader};

/// The vendored boot trace.
pub const BOOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../traces/boot.txt.gz");
/// The vendored resize trace.
pub const RESIZE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../traces/resize.txt.gz");

/// The lines of a vendored trace. The traces are part of the repository, so a missing
/// one fails the test rather than skipping it.
pub fn trace_lines(path: &str) -> impl Iterator<Item = String> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("vendored trace {path}: {e}"));
    BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .map(|l| l.expect("readable trace line"))
}

/// An HPT hypercall's opcode, input keys (r4..) and output keys (r4..; "" = not recorded).
pub fn opcode(name: &str) -> Option<(u64, &'static [&'static str], &'static [&'static str])> {
    Some(match name {
        "H_ENTER" => (H_ENTER, &["flags", "ptex", "pteh", "ptel"], &["idx"]),
        "H_REMOVE" => (
            H_REMOVE,
            &["flags", "ptex", "avpn"],
            &["old_pteh", "old_ptel"],
        ),
        "H_PROTECT" => (H_PROTECT, &["flags", "ptex", "avpn"], &[]),
        "H_READ" => (
            H_READ,
            &["flags", "ptex"],
            &[
                "pteh0", "ptel0", "pteh1", "ptel1", "pteh2", "ptel2", "pteh3", "ptel3",
            ],
        ),
        "H_BULK_REMOVE" => (
            H_BULK_REMOVE,
            &[
                "tsh0", "tsl0", "tsh1", "tsl1", "tsh2", "tsl2", "tsh3", "tsl3",
            ],
            &["rsp0", "", "rsp1", "", "rsp2", "", "rsp3", ""],
        ),
        _ => return None,
    })
}

/// The value of key `k` (hex with `0x`, else signed decimal).
pub fn field(kv: &[(&str, &str)], k: &str) -> Option<u64> {
    let v = kv.iter().find(|(n, _)| *n == k)?.1;
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse::<i64>().ok().map(|x| x as u64),
    }
}

/// The 256M segment (4K base pages) the shuttle models translate through.
#[cfg(shuttle)]
pub const SEG: revmap_hpt::hash::Segment = revmap_hpt::hash::Segment {
    vsid: 0x5_1234,
    ssize: revmap_hpt::hash::SegmentSize::S256M,
    base_shift: 12,
};

/// The configuration of [`small_vm`]: a KVM-flavour VM with 32 frames of RAM backed by
/// 4K pages and an order-11 HPT, so the instrumented atomics stay few.
#[cfg(any(loom, shuttle))]
pub fn small_config() -> revmap_hpt::VmConfig {
    revmap_hpt::VmConfig {
        ram_bytes: 32 << 12,
        hpt_order: 11,
        flavour: revmap_hpt::Flavour::Kvm,
        backing_page_shift: 12,
    }
}

/// A tiny VM for model checking ([`small_config`]).
#[cfg(any(loom, shuttle))]
pub fn small_vm() -> revmap_hpt::Vm {
    revmap_hpt::Vm::new_small(small_config()).expect("tiny VM")
}

/// Run `f` under loom (preemption bound 3); returns the number of executions explored,
/// which must be more than one (the model really branches).
#[cfg(loom)]
pub fn loom_model(f: impl Fn() + Sync + Send + 'static) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.max_branches = 100_000;
    b.check(move || {
        r.fetch_add(1, Ordering::Relaxed);
        f()
    });
    let n = runs.load(Ordering::Relaxed);
    eprintln!("loom: {n} executions");
    assert!(n > 1, "the model did not branch");
    n
}

/// H_READ of one HPTE, which must succeed: (dword 0, dword 1).
pub fn read(vm: &revmap_hpt::Vm, p: u64) -> (u64, u64) {
    let r = vm.hcall(0, H_READ, &[0, p]);
    assert_eq!(r.ret, H_SUCCESS);
    (r.out[0], r.out[1])
}

/// The whole-VM checker, as a test assertion.
pub fn check(vm: &revmap_hpt::Vm) {
    if let Err(e) = vm.check_invariants() {
        panic!("invariant violated: {e}");
    }
}

/// A thread of vCPU 0 taking a load fault on the absent (paged-out) HPTE `ptex`; join
/// it for the fault's outcome. Its thread comes from the sync switch, so the loom and
/// shuttle models schedule it.
pub fn spawn_absent_load_fault(vm: &Arc<Vm>, ptex: Ptex) -> thread::JoinHandle<FaultOutcome> {
    let vm = Arc::clone(vm);
    thread::spawn(move || {
        let f = Fault::Absent { ptex, mmio: false };
        vm.page_fault(0, &f, Access::Load)
    })
}
