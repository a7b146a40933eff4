//! The hypercalls that random sequences draw from, shared by the HPT property tests
//! (`tests/prop.rs`) and the `ppc_hcalls` fuzz target, which both include this file by
//! path. Each uses a subset of it.
#![allow(dead_code)]

use revmap_hpt::hcall::{
    H_BULK_REMOVE, H_CLEAR_MOD, H_CLEAR_REF, H_ENTER, H_PROTECT, H_READ, H_REMOVE,
    H_RESIZE_HPT_COMMIT, H_RESIZE_HPT_PREPARE,
};
use revmap_hpt::hpte::{HpteR, HpteV};

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

/// A guest-like HPTE: AVPN tag `tag` (`tag << 7` in dword 0), large-page bit `l` in
/// dword 0 with the large-page size bits `lpbits` in dword 1, frame `gfn`, and the
/// low bits `rbits` of dword 1 and `vbits` of dword 0.
#[derive(Clone, Copy, Debug)]
pub struct GuestHpte {
    /// AVPN tag.
    pub tag: u64,
    /// `HpteV::LARGE` or 0.
    pub l: u64,
    /// The large-page size bits of dword 1.
    pub lpbits: u64,
    /// Guest frame number (masked into the RPN field).
    pub gfn: u64,
    /// Low bits of dword 1 (WIMG, R/C, PP).
    pub rbits: u64,
    /// Low bits of dword 0 (VALID, BOLTED, ...).
    pub vbits: u64,
}

impl GuestHpte {
    /// H_ENTER's PTEH (dword 0).
    pub fn pteh(&self) -> u64 {
        (self.tag << 7) | self.l | self.vbits
    }

    /// H_ENTER's PTEL (dword 1).
    pub fn ptel(&self) -> u64 {
        (self.gfn.wrapping_shl(12) & HpteR::RPN & !0xff_f000) | self.lpbits | self.rbits
    }

    /// The AVPN operand of H_REMOVE, H_READ, H_PROTECT, ...: the tag and BOLTED.
    pub fn avpn(&self) -> u64 {
        self.tag << 7 | (self.vbits & HpteV::BOLTED)
    }
}
