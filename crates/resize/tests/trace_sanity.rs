//! Replays the recorded QEMU boot and resize traces (if present, resize records
//! included: PREPARE long-busy matched by long-busy or success, a recorded success
//! waits for the preparation, HPT_SHIFT checked) through both flavours: bit-exact
//! in the QEMU flavour, equal under `result_masks` in the KVM flavour, with the
//! invariant checker every 5000 records. (The real replay engine lives in the CLI; this
//! is the HPT crate's own end-to-end check.)
use revmap_hpt::Flavour;

#[path = "../../hpt/tests/common/mod.rs"]
mod common;
use common::{BOOT, RESIZE};
mod support;
use support::{replay_trace, trace_vm, ResizeStep};

fn replay(path: &str, flavour: Flavour) -> usize {
    let vm = trace_vm(flavour);
    let mut n = 0;
    let mut resizes = 0;
    replay_trace(&vm, path, flavour, "", |vm, step| match step {
        ResizeStep::Hcall { .. } => {
            resizes += 1;
            vm.check_invariants().unwrap();
        }
        ResizeStep::Other => {
            n += 1;
            if n % 5000 == 0 {
                vm.check_invariants().unwrap();
            }
        }
        ResizeStep::Shift | ResizeStep::NotResize => {}
    });
    let rep = vm.check_invariants().unwrap();
    eprintln!("{flavour}: {n} records, {resizes} resize calls, {rep:?}");
    n + resizes
}

#[test]
fn boot_trace_is_bit_exact_in_qemu_flavour() {
    replay(BOOT, Flavour::Qemu);
}

#[test]
fn boot_trace_matches_under_masks_in_kvm_flavour() {
    replay(BOOT, Flavour::Kvm);
}

#[test]
fn resize_trace_is_bit_exact_in_qemu_flavour() {
    replay(RESIZE, Flavour::Qemu);
}

#[test]
fn resize_trace_matches_under_masks_in_kvm_flavour() {
    replay(RESIZE, Flavour::Kvm);
}
