//! What L1's tables make of one L2 access, by KVM L0's rules (the L1 side of
//! `__kvmhv_nested_page_fault` up to the L0 side, and its R/C rule).
//!
//! [`l1_translate`] needs only L1's memory and the L2's cached PATE dw0: it is what any
//! shadow implementation must agree with, whatever it caches. In order, the first rule
//! that applies gives the outcome:
//! 1. cached dw0 = 0 → the raw trap, NOHPTE (L1 sees the hardware HDSI/HISI);
//! 2. the walk of L1's table (a [`crate::radix::WalkError`] is reflected with its cause);
//! 3. EAA permission (PROTFAULT, or no-execute for a fetch);
//! 4. a leaf smaller than L0's page size → the raw trap, NOHPTE: KVM's −EINVAL for
//!    4 KiB L1 pages on a 64 KiB L0, which L1 cannot repair;
//! 5. an L1 address outside L1 RAM → emulated MMIO for the L2, no exit to L1;
//! 6. R missing, or C missing on a store → SET_RC (L0 never writes L1's PTE);
//! 7. otherwise the access completes at the translated L1 address.

use crate::addr::NGpa;
use crate::radix::{walk, Access, Exit, FaultCause, GuestMemory, PateDw0, Translation};
use revmap_rmap::Gpa;

/// L0's view of L1's memory that the rules need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L1Layout {
    /// L1 RAM is guest physical `[0, ram_bytes)`; above it is emulated MMIO.
    pub ram_bytes: u64,
    /// log2 of L0's PAGE_SIZE (16 for a 64 KiB host kernel, 12 for 4 KiB).
    pub l0_page_shift: u32,
}

/// The outcome of one L2 access as seen from L1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Outcome {
    /// The access completes (after any faults L0 handles itself).
    Complete(Translation),
    /// L1's leaf maps the page outside L1 RAM: L0 emulates it as MMIO for the L2.
    Mmio(Gpa),
    /// H_ENTER_NESTED returns to L1 with this interrupt.
    Exit(Exit),
}

/// Applies the rules above to an `access` at `n_gpa` of an L2 whose cached PATE dw0 is
/// `l1_root`, reading L1's table from `mem`.
pub fn l1_translate<M: GuestMemory + ?Sized>(
    mem: &M,
    l1_root: PateDw0,
    n_gpa: NGpa,
    access: Access,
    layout: L1Layout,
) -> L2Outcome {
    let reflect = |cause| L2Outcome::Exit(Exit::reflect(cause, access, n_gpa));
    if l1_root.bits() == 0 {
        return reflect(FaultCause::NoTranslation);
    }
    let t = match walk(mem, l1_root, n_gpa) {
        Ok(t) => t,
        Err(e) => return reflect(e.cause()),
    };
    if let Err(cause) = t.check_permission(access) {
        return reflect(cause);
    }
    if t.size.shift() < layout.l0_page_shift {
        return reflect(FaultCause::NoTranslation);
    }
    if t.raddr.0 >= layout.ram_bytes {
        return L2Outcome::Mmio(t.raddr);
    }
    if let Err(cause) = t.check_rc(access) {
        return reflect(cause);
    }
    L2Outcome::Complete(t)
}
