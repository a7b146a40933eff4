//! Replays the recorded QEMU boot and resize traces (if present, resize records
//! included: PREPARE long-busy matched by long-busy or success, a recorded success
//! waits for the preparation, HPT_SHIFT checked) through both flavours: bit-exact
//! in the QEMU flavour, equal under `result_masks` in the KVM flavour, with the
//! invariant checker every 5000 records. (The real replay engine lives in the CLI; this
//! is the HPT crate's own end-to-end check.)
use revmap_hpt::{Flavour, VmConfig};

#[path = "../../hpt/tests/common/mod.rs"]
mod common;
use common::{field, opcode, trace_lines, BOOT, RESIZE};
mod support;
use support::{check_outs, parse, resize_record, ResizeStep};

fn replay(path: &str, flavour: Flavour) -> usize {
    let vm = revmap_resize::new_vm(VmConfig {
        ram_bytes: 1 << 30,
        hpt_order: 23,
        flavour,
        backing_page_shift: 24,
    })
    .unwrap();
    let mut n = 0;
    let mut resizes = 0;
    let mut seen = Vec::new();
    for (lineno, line) in trace_lines(path).enumerate() {
        let Some((name, kin, kout)) = parse(&line) else {
            continue;
        };
        let ctx = format_args!("line {lineno}: {line}");
        match resize_record(&vm, name, &kin, &kout, &ctx) {
            ResizeStep::Shift => continue,
            ResizeStep::Hcall { .. } => {
                resizes += 1;
                vm.check_invariants().unwrap();
                continue;
            }
            ResizeStep::NotResize => {}
        }
        let Some((op, ins, outs)) = opcode(name) else {
            continue;
        };
        let args: Vec<u64> = ins.iter().map(|k| field(&kin, k).unwrap()).collect();
        let want_ret = field(&kout, "ret").unwrap() as i64;
        let got = vm.hcall(0, op, &args);
        assert_eq!(got.ret, want_ret, "{ctx}\n got {got:x?}");
        check_outs(flavour, op, outs, &kout, &got, &ctx, &mut seen);
        seen.clear();
        n += 1;
        if n % 5000 == 0 {
            vm.check_invariants().unwrap();
        }
    }
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
