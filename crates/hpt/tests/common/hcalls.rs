//! The hypercalls that random sequences draw from, shared by the HPT property tests
//! (`tests/prop.rs`) and the `ppc_hcalls` fuzz target, which both include this file by
//! path. Each uses a subset of it.
#![allow(dead_code)]

use revmap_hpt::hcall::{
    H_BULK_REMOVE, H_CLEAR_MOD, H_CLEAR_REF, H_ENTER, H_PROTECT, H_READ, H_REMOVE,
    H_RESIZE_HPT_COMMIT, H_RESIZE_HPT_PREPARE,
};

/// The guest MMU's hypercalls (the first 7), then the resize pair: PREPARE, COMMIT.
pub const OPS: [u64; 9] = [
    H_ENTER,
    H_REMOVE,
    H_READ,
    H_PROTECT,
    H_BULK_REMOVE,
    H_CLEAR_REF,
    H_CLEAR_MOD,
    H_RESIZE_HPT_PREPARE,
    H_RESIZE_HPT_COMMIT,
];

/// The hypercalls of the guest MMU, without resizing.
pub const MMU_OPS: &[u64] = OPS.split_at(7).0;
