//! The preparation worker's lifetime, counted in the process's threads
//! (`/proc/self/task`): a VM with resizing has exactly one worker from its creation on,
//! whatever the guest does (PREPAREs, cancels, commits, a preparation held in progress),
//! and dropping the VM ends it (no leaked thread). One test in this binary, so that no
//! other test's threads come and go meanwhile.
#![cfg(not(any(loom, shuttle)))]

use revmap_hpt::hcall::*;
use revmap_hpt::{Flavour, Vm, VmConfig};
use revmap_resize::ResizeVmExt;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}

/// Whether the thread count reaches `n`: an exiting thread that was joined may still be
/// listed for a moment (the kernel reaps it just after waking the joiner), so look a
/// bounded number of times.
fn settles_to(n: usize) -> bool {
    for _ in 0..2000 {
        if threads() == n {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    threads() == n
}

fn vm() -> Vm {
    revmap_resize::new_vm(VmConfig {
        ram_bytes: 64 << 20,
        hpt_order: 18,
        flavour: Flavour::Kvm,
        backing_page_shift: 12,
    })
    .expect("vm")
}

fn prepare(vm: &Vm, shift: u64) -> i64 {
    vm.hcall(0, H_RESIZE_HPT_PREPARE, &[0, shift]).ret
}

#[test]
fn one_worker_per_vm_from_creation_to_drop() {
    let base = threads();
    let a = vm();
    assert_eq!(threads(), base + 1, "the worker starts with the VM");
    let ctl = a.resize_ctl().expect("resizer");
    assert!(ctl.worker_running());
    // Guest activity starts no thread: preparations, a cancel, a commit.
    for shift in [19, 20, 0, 19] {
        let r = prepare(&a, shift);
        assert!(r == H_SUCCESS || is_long_busy(r), "PREPARE({shift}) = {r}");
        assert_eq!(threads(), base + 1, "PREPARE({shift}) started a thread");
    }
    ctl.wait_prepared();
    assert_eq!(prepare(&a, 19), H_SUCCESS);
    assert_eq!(a.hcall(0, H_RESIZE_HPT_COMMIT, &[0, 19]).ret, H_SUCCESS);
    assert_eq!(a.hpt_order(), 19);
    ctl.wait_workers();
    // (Superseded jobs may never have started; the committed one did.)
    let started = ctl
        .stats()
        .started
        .load(core::sync::atomic::Ordering::Relaxed);
    assert!(started >= 1);
    assert_eq!(ctl.stats().live(), 0, "a prepared table leaked");
    // A second VM has its own worker.
    let b = vm();
    assert_eq!(threads(), base + 2);
    drop(a);
    assert!(
        settles_to(base + 1),
        "dropping the VM did not end its worker"
    );
    // Dropped with a preparation held in progress: the worker is released, finishes
    // (frees the table) and exits.
    let ctl = b.resize_ctl().expect("resizer");
    ctl.hold_preparation(true);
    assert!(is_long_busy(prepare(&b, 20)));
    drop(b);
    assert!(settles_to(base), "a worker outlived its VM");
}
