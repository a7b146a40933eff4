//! Smoke test: the trace README example replays bit-exactly in the QEMU flavour.
use revmap_hpt::hcall::*;
use revmap_hpt::{Flavour, Vm, VmConfig};

#[test]
fn trace_readme_example_is_bit_exact_in_qemu_flavour() {
    let vm = Vm::new(VmConfig {
        ram_bytes: 1 << 30,
        hpt_order: 23,
        flavour: Flavour::Qemu,
        backing_page_shift: 24,
    })
    .unwrap();
    let r = vm.hcall(0, H_ENTER, &[0, 0x3d3b8, 0x4009287a77000005, 0x11194]);
    assert_eq!((r.ret, r.out[0]), (H_SUCCESS, 0x3d3b8));
    let r = vm.hcall(0, H_REMOVE, &[0x80000000, 0x3d3b8, 0x4009287a77000000]);
    assert_eq!(r.ret, H_SUCCESS);
    assert_eq!(r.out[0], 0x4009287a77000045);
    assert_eq!(r.out[1], 0x11194);
    let r = vm.hcall(0, H_READ, &[H_READ_4, 0x3d3b8]);
    assert_eq!(r.out, [0x40, 0, 0x40, 0, 0x40, 0, 0x40, 0]);
    vm.check_invariants().unwrap();
}
