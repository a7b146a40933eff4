//! HPT geometry (order, number of HPTEs and PTEGs, hash mask) and the hash functions
//! for 256M and 1T segments (Linux's `hpt_hash`, QEMU's `ppc_hash64_htab_lookup`).
//!
//! # Invariants
//!
//! * An [`HptGeometry`] always has an order in `18..=36`: 18 is PAPR's minimum, 36 the
//!   largest table 32-bit revmap links can index (KVM's revmap `forw`/`back` are u32).
//!   Orders 37..=46 are legal in PAPR but rejected with
//!   [`HptError::OrderTooLargeForLinks`].
//! * `npte = 2^(order-4)`, `npteg = 2^(order-7)`, `mask = npteg - 1`; a PTEG index is
//!   always `<= mask`, so `pteg * 8 + slot < npte`.

use crate::error::HptError;
use crate::hpte::HpteV;
use revmap_rmap::Ptex;

/// Smallest HPT order PAPR allows (`PPC_MIN_HPT_ORDER`).
pub const MIN_HPT_ORDER: u32 = 18;
/// Largest HPT order PAPR allows (`PPC_MAX_HPT_ORDER`).
pub const MAX_PAPR_HPT_ORDER: u32 = 46;
/// Largest order this implementation supports (2^32 HPTEs, 32-bit links).
pub const MAX_HPT_ORDER: u32 = 36;
/// HPTEs per PTEG (`HPTES_PER_GROUP`).
pub const HPTES_PER_GROUP: u64 = 8;

/// Checked geometry of an HPT of 2^order bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HptGeometry {
    order: u32,
}

impl HptGeometry {
    /// Geometry for `order`, or an error outside `18..=36`.
    pub const fn new(order: u32) -> Result<Self, HptError> {
        if order < MIN_HPT_ORDER || order > MAX_PAPR_HPT_ORDER {
            return Err(HptError::BadOrder { order });
        }
        if order > MAX_HPT_ORDER {
            return Err(HptError::OrderTooLargeForLinks { order });
        }
        Ok(Self { order })
    }
    /// Geometry for a model-checking table below PAPR's minimum (orders 8..18 too:
    /// two PTEGs and up), so that loom's instrumented atomics stay few.
    #[cfg(any(loom, shuttle))]
    pub(crate) const fn new_small(order: u32) -> Result<Self, HptError> {
        if order < 8 {
            return Err(HptError::BadOrder { order });
        }
        if order >= MIN_HPT_ORDER {
            return Self::new(order);
        }
        Ok(Self { order })
    }
    /// The order (log2 of the table size in bytes).
    #[inline(always)]
    pub const fn order(self) -> u32 {
        self.order
    }
    /// Number of HPTEs (`kvmppc_hpt_npte`).
    #[inline(always)]
    pub const fn npte(self) -> u64 {
        1 << (self.order - 4)
    }
    /// Number of PTEGs.
    #[inline(always)]
    pub const fn npteg(self) -> u64 {
        1 << (self.order - 7)
    }
    /// Hash mask (`kvmppc_hpt_mask`, `htab_hash_mask`).
    #[inline(always)]
    pub const fn mask(self) -> u64 {
        self.npteg() - 1
    }
    /// Checked conversion of a guest-supplied HPTE index: `None` (H_PARAMETER) unless
    /// `ptex < npte`. Any u64, including 2^63, is safe to pass.
    #[inline(always)]
    pub const fn ptex(self, raw: u64) -> Option<Ptex> {
        if raw < self.npte() {
            // npte <= 2^32, so the index fits u32.
            Some(Ptex(raw as u32))
        } else {
            None
        }
    }
    /// First HPTE index of PTEG `pteg & mask`.
    #[inline(always)]
    pub const fn group_base(self, pteg: u64) -> Ptex {
        Ptex(((pteg & self.mask()) * HPTES_PER_GROUP) as u32)
    }
}

/// Segment size (the B field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentSize {
    /// 256 MiB segment, B = 0.
    S256M,
    /// 1 TiB segment, B = 1.
    S1T,
}

impl SegmentSize {
    /// Bits of an effective address that lie inside one segment.
    #[inline(always)]
    pub const fn offset_mask(self) -> u64 {
        match self {
            Self::S256M => 0x0FFF_FFFF,
            Self::S1T => 0xFF_FFFF_FFFF,
        }
    }
    /// Shift from VSID to VA.
    #[inline(always)]
    pub const fn shift(self) -> u32 {
        match self {
            Self::S256M => 28,
            Self::S1T => 40,
        }
    }
    /// The B field value placed in dword 0.
    #[inline(always)]
    pub const fn b_bits(self) -> u64 {
        match self {
            Self::S256M => 0,
            Self::S1T => HpteV::B_1T,
        }
    }
}

/// A segment as the MMU sees it (an SLB entry, reduced to what the hash needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Virtual segment id (up to 50 bits for 256M, 38 bits for 1T segments with a
    /// 78-bit VA).
    pub vsid: u64,
    /// Segment size.
    pub ssize: SegmentSize,
    /// Base page shift of the segment (SLB L||LP): 12, 16, 24 or 34.
    pub base_shift: u32,
}

impl Segment {
    /// The 78-bit virtual address of `ea` in this segment.
    #[inline]
    pub fn va(&self, ea: u64) -> u128 {
        (u128::from(self.vsid) << self.ssize.shift()) | u128::from(ea & self.ssize.offset_mask())
    }
}

/// The hash of `ea` in `seg` (Linux's `hpt_hash`): 256M `vsid ^ (off >> p)`, 1T
/// `vsid ^ (vsid << 25) ^ (off >> p)`, with p the segment's base page shift.
/// Masked to 39 bits as Linux's `hpt_hash`.
#[inline]
pub fn hpt_hash(seg: &Segment, ea: u64) -> u64 {
    let off = ea & seg.ssize.offset_mask();
    let p = seg.base_shift.min(63);
    let h = match seg.ssize {
        SegmentSize::S256M => seg.vsid ^ (off >> p),
        SegmentSize::S1T => seg.vsid ^ (seg.vsid << 25) ^ (off >> p),
    };
    h & 0x7F_FFFF_FFFF
}

/// Primary PTEG index of `hash` (`hash & mask`).
#[inline(always)]
pub const fn primary_pteg(geo: HptGeometry, hash: u64) -> u64 {
    hash & geo.mask()
}

/// Secondary PTEG index of `hash` (`~hash & mask`).
#[inline(always)]
pub const fn secondary_pteg(geo: HptGeometry, hash: u64) -> u64 {
    !hash & geo.mask()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_bounds_and_sizes() {
        assert!(matches!(
            HptGeometry::new(17),
            Err(HptError::BadOrder { order: 17 })
        ));
        assert!(matches!(
            HptGeometry::new(37),
            Err(HptError::OrderTooLargeForLinks { order: 37 })
        ));
        assert!(matches!(
            HptGeometry::new(47),
            Err(HptError::BadOrder { .. })
        ));
        let g = HptGeometry::new(18).unwrap();
        assert_eq!((g.npte(), g.npteg(), g.mask()), (16384, 2048, 2047));
        let g = HptGeometry::new(36).unwrap();
        assert_eq!(g.npte(), 1 << 32);
        assert_eq!(g.ptex((1 << 32) - 1), Some(Ptex(u32::MAX)));
        assert_eq!(g.ptex(1 << 32), None);
        let g = HptGeometry::new(24).unwrap();
        assert_eq!(g.ptex(1 << 63), None);
        assert_eq!(g.ptex(u64::MAX), None);
        assert_eq!(g.group_base(u64::MAX), Ptex(((1 << 17) - 1) * 8));
    }

    #[test]
    fn hash_vectors_256m_and_1t() {
        let geo = HptGeometry::new(18).unwrap();
        // 256M, 4K base: vsid ^ (offset >> 12).
        let s = Segment {
            vsid: 0x1234_5678,
            ssize: SegmentSize::S256M,
            base_shift: 12,
        };
        let ea = 0xC000_0000_0ABC_D123;
        let h = hpt_hash(&s, ea);
        assert_eq!(h, 0x1234_5678 ^ 0xABCD);
        assert_eq!(primary_pteg(geo, h), h & 2047);
        assert_eq!(secondary_pteg(geo, h), !h & 2047);
        assert_eq!(primary_pteg(geo, h) ^ secondary_pteg(geo, h), 2047);
        // 64K base.
        let s = Segment {
            base_shift: 16,
            ..s
        };
        assert_eq!(hpt_hash(&s, ea), 0x1234_5678 ^ 0xABC);
        // 16M base.
        let s = Segment {
            base_shift: 24,
            ..s
        };
        assert_eq!(hpt_hash(&s, ea), 0x1234_5678 ^ 0xA);
        // 1T, 64K base: vsid ^ (vsid << 25) ^ (offset >> 16), 39 bits.
        let s = Segment {
            vsid: 0x2_3456_789A,
            ssize: SegmentSize::S1T,
            base_shift: 16,
        };
        let ea = 0x0000_0012_3456_7890;
        let want =
            (0x2_3456_789Au64 ^ (0x2_3456_789Au64 << 25) ^ (0x12_3456_7890 >> 16)) & 0x7F_FFFF_FFFF;
        assert_eq!(hpt_hash(&s, ea), want);
    }

    #[test]
    fn hash_matches_linux_hpt_hash_on_vpn() {
        // Linux: hpt_hash(vpn, shift, ssize) with vpn = va >> 12.
        fn linux(vpn: u64, shift: u32, one_t: bool) -> u64 {
            let (mask, vsid_bits) = if one_t {
                ((1u64 << (40 - shift)) - 1, vpn >> (40 - 12))
            } else {
                ((1u64 << (28 - shift)) - 1, vpn >> (28 - 12))
            };
            let h = if one_t {
                vsid_bits ^ (vsid_bits << 25) ^ ((vpn >> (shift - 12)) & mask)
            } else {
                vsid_bits ^ ((vpn >> (shift - 12)) & mask)
            };
            h & 0x7F_FFFF_FFFF
        }
        for (vsid, ea, shift, one_t) in [
            (0x0abc_def1u64, 0x0123_4567u64, 12u32, false),
            (0x0abc_def1, 0x0fff_ffff, 16, false),
            (0x3_ffff_fffe, 0xff_ffff_ffff, 16, true),
            (0x1_0000_0001, 0x10_0000_0000, 24, true),
        ] {
            let seg = Segment {
                vsid,
                ssize: if one_t {
                    SegmentSize::S1T
                } else {
                    SegmentSize::S256M
                },
                base_shift: shift,
            };
            let vpn = (seg.va(ea) >> 12) as u64;
            assert_eq!(
                hpt_hash(&seg, ea),
                linux(vpn, shift, one_t),
                "{vsid:#x} {ea:#x}"
            );
        }
    }
}
