//! The typed resize hypercalls (`Vm::h_resize_hpt_prepare/commit`) against the
//! register-level ones (`Vm::hcall`) on two identical VMs with resizing.
use revmap_hpt::hcall::*;
use revmap_hpt::{Flavour, PaprError, Vm, VmConfig};
use revmap_resize::ResizeVmExt;

fn vm(flavour: Flavour) -> Vm {
    revmap_resize::new_vm(VmConfig {
        ram_bytes: 64 << 20,
        hpt_order: 18,
        flavour,
        backing_page_shift: 24,
    })
    .unwrap()
}

#[test]
fn resize_through_both_apis() {
    let (a, b) = (vm(Flavour::Kvm), vm(Flavour::Kvm));
    let first = a.h_resize_hpt_prepare(19);
    let raw_first = b.hcall(0, H_RESIZE_HPT_PREPARE, &[0, 19]).ret;
    assert!(
        first.is_ok() || first.is_err_and(PaprError::is_long_busy),
        "{first:?}"
    );
    assert!(raw_first == H_SUCCESS || is_long_busy(raw_first));
    a.resize_ctl().expect("resizer installed").wait_prepared();
    b.resize_ctl().expect("resizer installed").wait_prepared();
    assert_eq!(a.h_resize_hpt_prepare(19), Ok(()));
    assert_eq!(b.hcall(0, H_RESIZE_HPT_PREPARE, &[0, 19]).ret, H_SUCCESS);
    // A commit for another size than the prepared one.
    let bad = a.h_resize_hpt_commit(20).map_err(PaprError::code);
    assert_eq!(bad, Err(b.hcall(0, H_RESIZE_HPT_COMMIT, &[0, 20]).ret));
    assert!(bad.is_err());
    a.resize_ctl().expect("resizer installed").wait_prepared();
    b.resize_ctl().expect("resizer installed").wait_prepared();
    let _ = a.h_resize_hpt_prepare(19);
    let _ = b.hcall(0, H_RESIZE_HPT_PREPARE, &[0, 19]);
    a.resize_ctl().expect("resizer installed").wait_prepared();
    b.resize_ctl().expect("resizer installed").wait_prepared();
    assert_eq!(a.h_resize_hpt_prepare(19), Ok(()));
    assert_eq!(b.hcall(0, H_RESIZE_HPT_PREPARE, &[0, 19]).ret, H_SUCCESS);
    assert_eq!(a.h_resize_hpt_commit(19), Ok(()));
    assert_eq!(b.hcall(0, H_RESIZE_HPT_COMMIT, &[0, 19]).ret, H_SUCCESS);
    assert_eq!((a.hpt_order(), b.hpt_order()), (19, 19));
    // Nothing pending any more.
    assert_eq!(a.h_resize_hpt_commit(19), Err(PaprError::Closed));
    assert_eq!(b.hcall(0, H_RESIZE_HPT_COMMIT, &[0, 19]).ret, H_CLOSED);
}
