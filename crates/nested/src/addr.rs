//! Address and id newtypes of the nested MMU beyond those of `revmap_rmap::addr`.
//!
//! * L1 guest-physical addresses are [`revmap_rmap::Gpa`]; L2 real addresses (KVM's
//!   `n_gpa`) are [`NGpa`], so the two spaces cannot be mixed up.
//! * L1's name for an L2 is [`revmap_rmap::Lpid`] (`l1_lpid`, 12 bits); the hardware LPID
//!   L0 runs it with is [`ShadowLpid`]. KVM's aging and dirty paths flush with the wrong
//!   one of the two (`kvmhv_update_nest_rmap_rc` flushes with the l1_lpid); distinct types make that a type error.

use crate::radix::RADIX_TREE_BITS;

/// An L2 guest real address (KVM's `n_gpa`), below 2^52.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NGpa(u64);

impl NGpa {
    /// The address `raw`, if it lies in the 52-bit space.
    #[inline]
    pub const fn new(raw: u64) -> Option<NGpa> {
        if raw >> RADIX_TREE_BITS == 0 {
            Some(NGpa(raw))
        } else {
            None
        }
    }
    /// The raw value.
    #[inline(always)]
    pub const fn raw(self) -> u64 {
        self.0
    }
    /// The address rounded down to `bytes` (a power of two).
    #[inline]
    pub const fn align_down(self, bytes: u64) -> NGpa {
        NGpa(self.0 & !(bytes.wrapping_sub(1)))
    }
}

impl core::fmt::Debug for NGpa {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "NGpa({:#x})", self.0)
    }
}

impl core::fmt::Display for NGpa {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A hardware LPID L0 allocated to run an L2 (KVM's `shadow_lpid`), never 0 (the host).
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShadowLpid(u32);

impl ShadowLpid {
    /// The LPID `raw`, if non-zero.
    #[inline]
    pub const fn new(raw: u32) -> Option<ShadowLpid> {
        if raw == 0 {
            None
        } else {
            Some(ShadowLpid(raw))
        }
    }
    /// The raw value.
    #[inline(always)]
    pub const fn raw(self) -> u32 {
        self.0
    }
}

impl core::fmt::Debug for ShadowLpid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "ShadowLpid({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_constructors() {
        assert_eq!(NGpa::new((1 << 52) - 1).map(NGpa::raw), Some((1 << 52) - 1));
        assert_eq!(NGpa::new(1 << 52), None);
        assert_eq!(
            NGpa::new(0x3b9a_6018).map(|a| a.align_down(0x1000).raw()),
            Some(0x3b9a_6000)
        );
        assert_eq!(ShadowLpid::new(0), None);
        assert_eq!(ShadowLpid::new(7).map(ShadowLpid::raw), Some(7));
    }
}
