//! Replays the recorded QEMU boot and resize traces (if present, resize records
//! included: PREPARE long-busy matched by long-busy or success, a recorded success
//! waits for the preparation, HPT_SHIFT checked) through both flavours: bit-exact
//! in the QEMU flavour, equal under `result_masks` in the KVM flavour, with the
//! invariant checker every 5000 records. (The real replay engine lives in the CLI; this
//! is the HPT crate's own end-to-end check.)
use revmap_hpt::hcall::*;
use revmap_hpt::{result_masks, Flavour, VmConfig};
use revmap_resize::ResizeVmExt;

#[path = "../../hpt/tests/common/mod.rs"]
mod common;
use common::{field, opcode, trace_lines, BOOT, RESIZE};

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
    for (lineno, line) in trace_lines(path).enumerate() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (lhs, rhs) = line.split_once(" -> ").unwrap_or((&line, ""));
        let mut it = lhs.split_whitespace();
        let name = it.next().unwrap();
        let kin: Vec<_> = it.filter_map(|t| t.split_once('=')).collect();
        let kout: Vec<_> = rhs
            .split_whitespace()
            .filter_map(|t| t.split_once('='))
            .collect();
        if name == "HPT_SHIFT" {
            assert_eq!(
                u64::from(vm.hpt_order()),
                field(&kin, "new").unwrap(),
                "line {lineno}"
            );
            continue;
        }
        if let Some(op) = match name {
            "H_RESIZE_HPT_PREPARE" => Some(H_RESIZE_HPT_PREPARE),
            "H_RESIZE_HPT_COMMIT" => Some(H_RESIZE_HPT_COMMIT),
            _ => None,
        } {
            let args = [field(&kin, "flags").unwrap(), field(&kin, "shift").unwrap()];
            let want = field(&kout, "ret").unwrap() as i64;
            if op == H_RESIZE_HPT_PREPARE && want == H_SUCCESS {
                vm.resize_ctl().expect("resizer installed").wait_prepared();
            }
            let got = vm.hcall(0, op, &args).ret;
            let ok = got == want
                || (op == H_RESIZE_HPT_PREPARE && is_long_busy(want) && got == H_SUCCESS);
            assert!(ok, "line {lineno}: {line}: got {got}");
            resizes += 1;
            vm.check_invariants().unwrap();
            continue;
        }
        let Some((op, ins, outs)) = opcode(name) else {
            continue;
        };
        let args: Vec<u64> = ins.iter().map(|k| field(&kin, k).unwrap()).collect();
        let want_ret = field(&kout, "ret").unwrap() as i64;
        let got = vm.hcall(0, op, &args);
        assert_eq!(got.ret, want_ret, "line {lineno}: {line}\n got {got:x?}");
        if got.ret == H_SUCCESS || op == H_BULK_REMOVE {
            for (i, k) in outs.iter().enumerate() {
                if k.is_empty() {
                    continue;
                }
                let Some(want) = field(&kout, k) else {
                    continue;
                };
                let ignore: u64 = result_masks(flavour, op, i)
                    .iter()
                    .map(|m| m.mask)
                    .fold(0, |a, b| a | b);
                assert_eq!(
                    got.out[i] & !ignore,
                    want & !ignore,
                    "line {lineno} out[{i}] ({k}): got {:#x} want {want:#x}\n{line}",
                    got.out[i]
                );
            }
        }
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
