//! Trace-replay steps shared by the resize crate's trace tests.
#![allow(dead_code)] // each test binary uses its own part
use super::common::{field, opcode, trace_lines};
use revmap_hpt::hcall::*;
use revmap_hpt::{result_masks, Flavour, HcallResult, Vm, VmConfig};
use revmap_resize::ResizeVmExt;

/// The `key=value` fields of a record's inputs and outputs.
pub type Fields<'a> = Vec<(&'a str, &'a str)>;

/// Split a trace line into its name, input fields and output fields (`None` for
/// comments and blank lines).
pub fn parse(line: &str) -> Option<(&str, Fields<'_>, Fields<'_>)> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let (lhs, rhs) = line.split_once(" -> ").unwrap_or((line, ""));
    let mut it = lhs.split_whitespace();
    let name = it.next()?;
    let kin = it.filter_map(|t| t.split_once('=')).collect();
    let kout = rhs
        .split_whitespace()
        .filter_map(|t| t.split_once('='))
        .collect();
    Some((name, kin, kout))
}

/// What [`resize_record`] made of a record.
pub enum ResizeStep {
    /// Not a resize record: replay it as an ordinary hypercall.
    NotResize,
    /// An ordinary hypercall, replayed and checked ([`replay_trace`]).
    Other,
    /// An `HPT_SHIFT` record, checked against the table's order.
    Shift,
    /// A resize hypercall `op` that returned `ret` (checked against the trace: PREPARE
    /// long-busy matched by long-busy or success; a recorded success waits for the
    /// preparation first). The invariant checker has run after a COMMIT.
    Hcall { op: u64, ret: i64 },
}

/// Replay one record if it is a resize record (`ctx` prefixes assertion messages).
pub fn resize_record(
    vm: &Vm,
    name: &str,
    kin: &Fields,
    kout: &Fields,
    ctx: &dyn std::fmt::Display,
) -> ResizeStep {
    if name == "HPT_SHIFT" {
        assert_eq!(
            u64::from(vm.hpt_order()),
            field(kin, "new").unwrap(),
            "{ctx}"
        );
        return ResizeStep::Shift;
    }
    let op = match name {
        "H_RESIZE_HPT_PREPARE" => H_RESIZE_HPT_PREPARE,
        "H_RESIZE_HPT_COMMIT" => H_RESIZE_HPT_COMMIT,
        _ => return ResizeStep::NotResize,
    };
    let args = [field(kin, "flags").unwrap(), field(kin, "shift").unwrap()];
    let want = field(kout, "ret").unwrap() as i64;
    if op == H_RESIZE_HPT_PREPARE && want == H_SUCCESS {
        vm.resize_ctl().expect("resizer installed").wait_prepared();
    }
    let got = vm.hcall(0, op, &args).ret;
    let ok = got == want || (op == H_RESIZE_HPT_PREPARE && is_long_busy(want) && got == H_SUCCESS);
    assert!(ok, "{ctx}: got {got}");
    if op == H_RESIZE_HPT_COMMIT {
        vm.check_invariants().unwrap();
    }
    ResizeStep::Hcall { op, ret: got }
}

/// Check the outputs `outs` (trace field names, empty for none) of a hypercall `op`
/// against the record's outputs, under the flavour's `result_masks`; `seen` gets every
/// output word checked or not.
pub fn check_outs(
    flavour: Flavour,
    op: u64,
    outs: &[&str],
    kout: &Fields,
    got: &HcallResult,
    ctx: &dyn std::fmt::Display,
    seen: &mut Vec<u64>,
) {
    if got.ret != H_SUCCESS && op != H_BULK_REMOVE {
        return;
    }
    for (i, k) in outs.iter().enumerate() {
        if k.is_empty() {
            continue;
        }
        seen.push(got.out[i]);
        let Some(want) = field(kout, k) else {
            continue;
        };
        let ignore: u64 = result_masks(flavour, op, i)
            .iter()
            .map(|m| m.mask)
            .fold(0, |a, b| a | b);
        assert_eq!(
            got.out[i] & !ignore,
            want & !ignore,
            "{ctx} out[{i}] ({k}): got {:#x} want {want:#x}",
            got.out[i]
        );
    }
}

/// A 1 GiB VM with a 2^23-byte table, 16 MiB backing pages and a resizer: the machine
/// the traces were recorded on.
pub fn trace_vm(flavour: Flavour) -> Vm {
    revmap_resize::new_vm(VmConfig {
        ram_bytes: 1 << 30,
        hpt_order: 23,
        flavour,
        backing_page_shift: 24,
    })
    .unwrap()
}

/// Replay the trace at `path` on `vm`, checking every record's results (bit-exact in
/// the QEMU flavour, under `result_masks` in the KVM flavour; `label` prefixes
/// assertion messages); `after(vm, step)` runs after each record replayed. Returns
/// every guest-visible result word in order: each ordinary call's return code and
/// outputs, and each COMMIT's return code.
pub fn replay_trace(
    vm: &Vm,
    path: &str,
    flavour: Flavour,
    label: &str,
    mut after: impl FnMut(&Vm, ResizeStep),
) -> Vec<u64> {
    let mut seen = Vec::new();
    for (lineno, line) in trace_lines(path).enumerate() {
        let Some((name, kin, kout)) = parse(&line) else {
            continue;
        };
        let ctx = format_args!("{label} line {lineno}: {line}");
        let step = resize_record(vm, name, &kin, &kout, &ctx);
        match step {
            ResizeStep::Hcall { op, ret } if op == H_RESIZE_HPT_COMMIT => seen.push(ret as u64),
            ResizeStep::NotResize => {
                let Some((op, ins, outs)) = opcode(name) else {
                    continue;
                };
                let args: Vec<u64> = ins.iter().map(|k| field(&kin, k).unwrap()).collect();
                let want_ret = field(&kout, "ret").unwrap() as i64;
                let got = vm.hcall(0, op, &args);
                assert_eq!(got.ret, want_ret, "{ctx}\n got {got:x?}");
                seen.push(got.ret as u64);
                check_outs(flavour, op, outs, &kout, &got, &ctx, &mut seen);
                after(vm, ResizeStep::Other);
                continue;
            }
            _ => {}
        }
        after(vm, step);
    }
    seen
}
