//! The HPTE format: dword 0 ([`HpteV`]) and dword 1 ([`HpteR`]) in the pre-ISA-3.0
//! layout that PAPR hypercalls use, and the page-size decoders (L bit + LP field).
//!
//! Masks are LSB-0 (bit 0 = least significant); the PAPR/ISA "PPC bit n" is
//! `1 << (63 - n)`. Every field is named as in QEMU (`HPTE64_*`) and Linux/KVM
//! (`HPTE_*`). The layout is pinned by const assertions and unit tests.
//!
//! # Invariants
//!
//! * The two software bits KVM owns in dword 0 ([`HpteV::HVLOCK`], [`HpteV::ABSENT`])
//!   are never set in a value handed to or from the guest (presentation strips them).
//! * Only this layout is stored; the ISA 3.0 format is never produced (KVM converts it
//!   only at the boundary since "Make HPT resizing work on POWER9").
//! * Page sizes are decoded only through [`kvm_page_shifts`] and
//!   [`qemu_page_shift_noslb`]; which one applies is a flavour decision (`flavour.rs`).

/// HPTE dword 0 ("V"): segment size, AVPN, software bits, L, H, V.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct HpteV(pub u64);

/// HPTE dword 1 ("R"): PP0, TS, keys, RPN/LP, R, C, WIMG, N, PP.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct HpteR(pub u64);

impl HpteV {
    /// B, segment size (PPC 0:1; `HPTE64_V_SSIZE`, `HPTE_V_SSIZE_SHIFT` 62):
    /// 0 = 256M, 1 = 1T, 2/3 reserved.
    pub const B: u64 = 0xC000_0000_0000_0000;
    /// Shift of the B field.
    pub const B_SHIFT: u32 = 62;
    /// B = 1: 1T segment (`HPTE64_V_1TB_SEG`, `HPTE_V_1TB_SEG`).
    pub const B_1T: u64 = 0x4000_0000_0000_0000;
    /// Abbreviated virtual page number, VA bits 77:23 (PPC 2:56; `HPTE_V_AVPN`).
    pub const AVPN: u64 = 0x3FFF_FFFF_FFFF_FF80;
    /// Shift of the AVPN field (`HPTE_V_AVPN_SHIFT`).
    pub const AVPN_SHIFT: u32 = 7;
    /// KVM's HPTE lock (`HPTE_V_HVLOCK`, PPC 57); QEMU's migration dirty flag
    /// (`HPTE64_V_HPTE_DIRTY`) at the same position.
    pub const HVLOCK: u64 = 0x40;
    /// KVM "absent": valid to the guest, not in hardware (`HPTE_V_ABSENT`, PPC 58).
    pub const ABSENT: u64 = 0x20;
    /// Guest software bit: bolted entry (`HPTE_V_BOLTED`, PPC 59).
    pub const BOLTED: u64 = 0x10;
    /// Bare-metal Linux's HPT lock (`HPTE_V_LOCK`, PPC 60); guest-owned here.
    pub const LOCK: u64 = 0x08;
    /// L: large page, size in dword 1's LP field (`HPTE_V_LARGE`, PPC 61).
    pub const LARGE: u64 = 0x04;
    /// H: entry sits in the secondary PTEG (`HPTE_V_SECONDARY`, PPC 62).
    pub const SECONDARY: u64 = 0x02;
    /// V: valid (`HPTE_V_VALID`, PPC 63).
    pub const VALID: u64 = 0x01;
    /// The two hypervisor software bits (QEMU's H_ENTER clears `0x60`).
    pub const HV_SW: u64 = Self::HVLOCK | Self::ABSENT;
    /// Bits ignored by AVPN comparisons (`v & ~0x7f`).
    pub const LOW7: u64 = 0x7F;

    /// Raw value.
    #[inline(always)]
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// B field (0..=3).
    #[inline(always)]
    pub const fn segment_size(self) -> u64 {
        self.0 >> Self::B_SHIFT
    }
    /// 1T segment.
    #[inline(always)]
    pub const fn is_1t(self) -> bool {
        self.segment_size() == 1
    }
    /// AVPN value (`HPTE_V_AVPN_VAL`): VA >> 23.
    #[inline(always)]
    pub const fn avpn_val(self) -> u64 {
        (self.0 & Self::AVPN) >> Self::AVPN_SHIFT
    }
    /// B + AVPN, as compared by H_AVPN (`v & ~0x7f`).
    #[inline(always)]
    pub const fn compare_bits(self) -> u64 {
        self.0 & !Self::LOW7
    }
    /// V bit.
    #[inline(always)]
    pub const fn is_valid(self) -> bool {
        self.0 & Self::VALID != 0
    }
    /// ABSENT bit.
    #[inline(always)]
    pub const fn is_absent(self) -> bool {
        self.0 & Self::ABSENT != 0
    }
    /// VALID or ABSENT: the slot is in use (KVM's notion of "not free").
    #[inline(always)]
    pub const fn is_used(self) -> bool {
        self.0 & (Self::VALID | Self::ABSENT) != 0
    }
    /// HVLOCK bit.
    #[inline(always)]
    pub const fn is_locked(self) -> bool {
        self.0 & Self::HVLOCK != 0
    }
    /// BOLTED bit.
    #[inline(always)]
    pub const fn is_bolted(self) -> bool {
        self.0 & Self::BOLTED != 0
    }
    /// L bit.
    #[inline(always)]
    pub const fn is_large(self) -> bool {
        self.0 & Self::LARGE != 0
    }
    /// H bit.
    #[inline(always)]
    pub const fn is_secondary(self) -> bool {
        self.0 & Self::SECONDARY != 0
    }
}

impl HpteR {
    /// PP0, high protection bit (`HPTE_R_PP0`, PPC 0).
    pub const PP0: u64 = 0x8000_0000_0000_0000;
    /// TS (`HPTE_R_TS`, PPC 1); KVM's `HPTE_GR_RESERVED`/`HPTE_GR_MODIFIED` in the guest
    /// view, stripped from every KVM answer.
    pub const TS: u64 = 0x4000_0000_0000_0000;
    /// Storage key bits 4:3 (`HPTE_R_KEY_HI`, PPC 2:3).
    pub const KEY_HI: u64 = 0x3000_0000_0000_0000;
    /// Real page number (`HPTE_R_RPN`, PPC 4:51); low bits carry LP for large pages.
    pub const RPN: u64 = 0x0FFF_FFFF_FFFF_F000;
    /// Shift of the RPN field.
    pub const RPN_SHIFT: u32 = 12;
    /// LP, large-page size encoding, R bits 19:12 (overlaps the low RPN bits).
    pub const LP: u64 = 0xF_F000;
    /// Storage key bits 2:0 (`HPTE_R_KEY_LO`, PPC 52:54).
    pub const KEY_LO: u64 = 0xE00;
    /// Both key fields: all set = key 31 (KVM's emulated-MMIO marker with ABSENT).
    pub const KEY: u64 = Self::KEY_HI | Self::KEY_LO;
    /// R: referenced (`HPTE_R_R`, PPC 55).
    pub const R: u64 = 0x100;
    /// C: changed (`HPTE_R_C`, PPC 56).
    pub const C: u64 = 0x80;
    /// R and C.
    pub const RC: u64 = Self::R | Self::C;
    /// W: write-through (`HPTE_R_W`).
    pub const W: u64 = 0x40;
    /// I: cache-inhibited (`HPTE_R_I`).
    pub const I: u64 = 0x20;
    /// M: memory coherence (`HPTE_R_M`).
    pub const M: u64 = 0x10;
    /// G: guarded (`HPTE_R_G`).
    pub const G: u64 = 0x08;
    /// WIMG (`HPTE_R_WIMG`).
    pub const WIMG: u64 = 0x78;
    /// N: no-execute (`HPTE_R_N`).
    pub const N: u64 = 0x4;
    /// PP, low protection bits (`HPTE_R_PP`).
    pub const PP: u64 = 0x3;
    /// The bits H_PROTECT replaces.
    pub const PROTECT_MASK: u64 = Self::PP0 | Self::PP | Self::N | Self::KEY_HI | Self::KEY_LO;
    /// Linux `PP_RXRX` (pp = 3).
    pub const PP_RXRX: u64 = 3;
    /// Linux `PP_RXXX` (PP0 | 2).
    pub const PP_RXXX: u64 = Self::PP0 | 2;

    /// Raw value.
    #[inline(always)]
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// 5-bit storage key (`HPTE64_R_KEY`).
    #[inline(always)]
    pub const fn key(self) -> u64 {
        ((self.0 & Self::KEY_HI) >> 57) | ((self.0 & Self::KEY_LO) >> 9)
    }
    /// The real/guest address of the page base for a page of `1 << shift` bytes.
    #[inline(always)]
    pub const fn page_addr(self, shift: u32) -> u64 {
        self.0 & Self::RPN & !((1u64 << shift) - 1)
    }
    /// KVM's `hpte_is_writable`: pp is neither `PP_RXRX` nor `PP_RXXX`.
    #[inline(always)]
    pub const fn is_writable(self) -> bool {
        let pp = self.0 & (Self::PP0 | Self::PP);
        pp != Self::PP_RXRX && pp != Self::PP_RXXX
    }
    /// KVM's `hpte_make_readonly`: `PP_RXXX` if PP0 is set or pp is `PP_RWXX`, else
    /// `PP_RXRX`.
    #[inline(always)]
    pub const fn make_readonly(self) -> Self {
        if self.0 & Self::PP0 != 0 || self.0 & Self::PP == 0 {
            Self(self.0 | Self::PP0 | 2)
        } else {
            Self(self.0 | Self::PP)
        }
    }
    /// Storage key 31 (all key bits set).
    #[inline(always)]
    pub const fn is_key31(self) -> bool {
        self.0 & Self::KEY == Self::KEY
    }
}

const _: () = assert!(HpteV::B | HpteV::AVPN | 0x7F == u64::MAX);
const _: () = assert!(HpteV::B & HpteV::AVPN == 0);
const _: () = assert!(
    HpteR::PP0
        | HpteR::TS
        | HpteR::KEY_HI
        | HpteR::RPN
        | HpteR::KEY_LO
        | HpteR::R
        | HpteR::C
        | HpteR::WIMG
        | HpteR::N
        | HpteR::PP
        == u64::MAX
);
const _: () = assert!(HpteR::W | HpteR::I | HpteR::M | HpteR::G == HpteR::WIMG);

impl core::fmt::Debug for HpteV {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "HpteV({:#018x}", self.0)?;
        for (b, n) in [
            (Self::HVLOCK, " HVLOCK"),
            (Self::ABSENT, " ABSENT"),
            (Self::BOLTED, " BOLTED"),
            (Self::LARGE, " L"),
            (Self::SECONDARY, " H"),
            (Self::VALID, " V"),
        ] {
            if self.0 & b != 0 {
                f.write_str(n)?;
            }
        }
        f.write_str(")")
    }
}

impl core::fmt::Debug for HpteR {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "HpteR({:#018x} key={} pp={:#x}{}{})",
            self.0,
            self.key(),
            self.0 & (Self::PP0 | Self::PP),
            if self.0 & Self::R != 0 { " R" } else { "" },
            if self.0 & Self::C != 0 { " C" } else { "" }
        )
    }
}

/// Base (segment) and actual page shift of an HPTE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageShifts {
    /// Base page shift: the page size of the segment, used by the hash.
    pub base: u32,
    /// Actual page shift: the size of the page this entry maps.
    pub actual: u32,
}

impl PageShifts {
    /// A uniform (non-mixed) size.
    pub const fn same(shift: u32) -> Self {
        Self {
            base: shift,
            actual: shift,
        }
    }
}

/// One row of the POWER7/8 segment page-size table (`ppc_hash64_opts_POWER7`): a base
/// page shift and the (actual shift, LP encoding) pairs allowed in such a segment.
#[derive(Debug, Clone, Copy)]
pub struct SegmentPageSizes {
    /// Base page shift of the segment.
    pub base: u32,
    /// (actual shift, LP value in R bits 19:12) in scan order.
    pub enc: &'static [(u32, u64)],
}

/// The POWER8 page-size set, in QEMU's scan order (`ppc_hash64_opts_POWER7`).
pub const POWER8_PAGE_SIZES: [SegmentPageSizes; 4] = [
    SegmentPageSizes {
        base: 12,
        enc: &[(12, 0x0), (16, 0x7), (24, 0x38)],
    },
    SegmentPageSizes {
        base: 16,
        enc: &[(16, 0x1), (24, 0x8)],
    },
    SegmentPageSizes {
        base: 24,
        enc: &[(24, 0x0)],
    },
    SegmentPageSizes {
        base: 34,
        enc: &[(34, 0x3)],
    },
];

/// QEMU's `hpte_page_shift` for one segment row: the actual shift of (v, r) in a
/// segment of that base size, or `None`.
#[inline]
pub fn qemu_hpte_page_shift(sps: &SegmentPageSizes, v: HpteV, r: HpteR) -> Option<u32> {
    if !v.is_large() {
        return (sps.base == 12).then_some(12);
    }
    sps.enc.iter().find_map(|&(shift, enc)| {
        if shift == 12 {
            return None;
        }
        let mask = ((1u64 << shift) - 1) & HpteR::RPN;
        (r.0 & mask == enc << HpteR::RPN_SHIFT).then_some(shift)
    })
}

/// QEMU's `ppc_hash64_hpte_page_shift_noslb`: L = 0 gives 4K; otherwise the first row
/// of [`POWER8_PAGE_SIZES`] with a matching encoding gives (base, actual). No match is
/// `None` (H_PARAMETER). Requires R bits above the LP nibble up to the actual size to
/// match exactly (so a 16M page with R\[23:20\] ≠ 0 is rejected; KVM masks them).
#[inline]
pub fn qemu_page_shift_noslb(v: HpteV, r: HpteR) -> Option<PageShifts> {
    if !v.is_large() {
        return Some(PageShifts::same(12));
    }
    POWER8_PAGE_SIZES.iter().find_map(|sps| {
        qemu_hpte_page_shift(sps, v, r).map(|actual| PageShifts {
            base: sps.base,
            actual,
        })
    })
}

/// KVM's `kvmppc_hpte_page_shifts`: looks only at R\[15:12\] (LP) and R\[19:16\]
/// (lphi). `None` is an invalid encoding (H_PARAMETER).
#[inline]
pub fn kvm_page_shifts(v: HpteV, r: HpteR) -> Option<PageShifts> {
    if !v.is_large() {
        return Some(PageShifts::same(12));
    }
    let lp = (r.0 >> 12) & 0xf;
    let lphi = (r.0 >> 16) & 0xf;
    match (lp, lphi) {
        (0, 0) => Some(PageShifts::same(24)),
        (1, _) => Some(PageShifts::same(16)),
        (3, 0) => Some(PageShifts::same(34)),
        (7, _) => Some(PageShifts {
            base: 12,
            actual: 16,
        }),
        (8, 0) => Some(PageShifts {
            base: 16,
            actual: 24,
        }),
        (8, 3) => Some(PageShifts {
            base: 12,
            actual: 24,
        }),
        _ => None,
    }
}

/// Linux `hpte_encode_avpn(vpn, psize, ssize)` with `vpn = VA >> 12`: the value the guest
/// passes as `avpn` to H_REMOVE/H_PROTECT (`B | AVPN`, page-offset bits cleared for pages
/// larger than 8M).
#[inline]
pub fn encode_avpn(va: u128, actual_shift: u32, one_tb: bool) -> u64 {
    let avpnm: u64 = if actual_shift > 23 {
        (1u64 << (actual_shift - 23)) - 1
    } else {
        0
    };
    let v = (((va >> 23) as u64) & !avpnm) << HpteV::AVPN_SHIFT;
    (v & HpteV::AVPN) | if one_tb { HpteV::B_1T } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dword0_layout_matches_papr() {
        assert_eq!(HpteV::B, 0xC000_0000_0000_0000);
        assert_eq!(HpteV::B_1T, 1 << 62);
        assert_eq!(HpteV::AVPN, 0x3FFF_FFFF_FFFF_FF80);
        assert_eq!(
            [
                HpteV::HVLOCK,
                HpteV::ABSENT,
                HpteV::BOLTED,
                HpteV::LOCK,
                HpteV::LARGE,
                HpteV::SECONDARY,
                HpteV::VALID
            ],
            [1 << 6, 1 << 5, 1 << 4, 1 << 3, 1 << 2, 1 << 1, 1 << 0]
        );
        let v = HpteV(0x4009_287a_7700_0045);
        assert!(v.is_1t() && v.is_valid() && v.is_large() && v.is_locked());
        assert_eq!(v.compare_bits(), 0x4009_287a_7700_0000);
        assert_eq!(
            v.avpn_val(),
            0x4009_287a_7700_0000 >> 7 & (HpteV::AVPN >> 7)
        );
    }

    #[test]
    fn dword1_layout_matches_papr() {
        assert_eq!(HpteR::PP0, 1 << 63);
        assert_eq!(HpteR::TS, 1 << 62);
        assert_eq!(HpteR::KEY_HI, 0x3 << 60);
        assert_eq!(HpteR::KEY_LO, 0x7 << 9);
        assert_eq!((HpteR::R, HpteR::C), (0x100, 0x80));
        assert_eq!(
            (HpteR::W, HpteR::I, HpteR::M, HpteR::G, HpteR::N, HpteR::PP),
            (0x40, 0x20, 0x10, 0x08, 0x4, 0x3)
        );
        assert_eq!(HpteR(HpteR::KEY).key(), 31);
        assert_eq!(HpteR(0x1000_0000_0000_0200).key(), 0b01001);
        assert_eq!(HpteR::PROTECT_MASK, 0xB000_0000_0000_0E07);
    }

    #[test]
    fn writability_and_make_readonly_follow_kvm() {
        for (pp, w) in [
            (0, true),
            (1, true),
            (2, true),
            (3, false),
            (HpteR::PP0 | 2, false),
        ] {
            assert_eq!(HpteR(pp).is_writable(), w, "pp {pp:#x}");
        }
        assert_eq!(HpteR(0).make_readonly(), HpteR(HpteR::PP_RXXX));
        assert_eq!(HpteR(2).make_readonly(), HpteR(3));
        assert_eq!(HpteR(HpteR::PP0).make_readonly(), HpteR(HpteR::PP_RXXX));
        assert!(!HpteR(1).make_readonly().is_writable());
    }

    const L: HpteV = HpteV(HpteV::LARGE | HpteV::VALID);
    const S: HpteV = HpteV(HpteV::VALID);

    #[test]
    fn both_decoders_agree_on_every_power8_encoding() {
        let table: [(u64, u32, u32); 7] = [
            (0x0, 12, 12), // placeholder row replaced below for L = 0
            (0x7, 12, 16),
            (0x38, 12, 24),
            (0x1, 16, 16),
            (0x8, 16, 24),
            (0x0, 24, 24),
            (0x3, 34, 34),
        ];
        assert_eq!(
            qemu_page_shift_noslb(S, HpteR(0x1234_5000)),
            Some(PageShifts::same(12))
        );
        assert_eq!(
            kvm_page_shifts(S, HpteR(0x1234_5000)),
            Some(PageShifts::same(12))
        );
        for &(lp, base, actual) in &table[1..] {
            let r = HpteR(0x4_0000_0000 | (lp << 12));
            let want = Some(PageShifts { base, actual });
            assert_eq!(qemu_page_shift_noslb(L, r), want, "qemu lp {lp:#x}");
            assert_eq!(kvm_page_shifts(L, r), want, "kvm lp {lp:#x}");
        }
    }

    #[test]
    fn decoders_differ_where_the_spec_says() {
        // Bad LP.
        let bad = HpteR(0x2000);
        assert_eq!(qemu_page_shift_noslb(L, bad), None);
        assert_eq!(kvm_page_shifts(L, bad), None);
        // 16M with R[23:20] != 0: QEMU rejects, KVM masks.
        let r = HpteR(0x20_0000);
        assert_eq!(qemu_page_shift_noslb(L, r), None);
        assert_eq!(kvm_page_shifts(L, r), Some(PageShifts::same(24)));
        // 64K with RPN bits above 15 set: both accept (those bits are RPN).
        let r = HpteR(0x1234_1000);
        assert_eq!(qemu_page_shift_noslb(L, r), Some(PageShifts::same(16)));
        assert_eq!(kvm_page_shifts(L, r), Some(PageShifts::same(16)));
        // 16G needs R[33:12] == 3 in QEMU; KVM only R[19:12].
        let r = HpteR((1 << 20) | 0x3000);
        assert_eq!(qemu_page_shift_noslb(L, r), None);
        assert_eq!(
            kvm_page_shifts(L, HpteR((1 << 20) | 0x3000)),
            Some(PageShifts::same(34))
        );
    }

    #[test]
    fn encode_avpn_masks_offset_bits_of_huge_pages() {
        let va: u128 = (0x1234u128 << 28) | (1 << 23) | (1 << 24);
        assert_eq!(
            encode_avpn(va, 16, false),
            (((va >> 23) as u64) << 7) & HpteV::AVPN
        );
        assert_eq!(encode_avpn(va, 24, false) & (1 << 7), 0);
        assert_eq!(encode_avpn(va, 24, true) >> 62, 1);
    }
}
