//! Every guest-visible difference between the two hypervisors we model, in one place.
//!
//! * [`Flavour::Kvm`]: Linux KVM Book3S HV (`book3s_hv_rm_mmu.c`), the default.
//! * [`Flavour::Qemu`]: QEMU's sPAPR machine under TCG (`spapr_vhyp_mmu.c`), which
//!   recorded the traces vendored in `traces/`; replaying those must be bit-exact.
//!
//! Both flavours share one implementation: a real HPT in KVM's representation (HVLOCK
//! lock bit, ABSENT entries for MMIO and paged-out pages, host RPNs in dword 1), the
//! revmap with the guest view of dword 1 and the rmap chains. The flavour only decides
//! validation rules and how entries are *presented* to the guest. Each method below is
//! one documented difference (QEMU's TCG hypercalls against KVM HV) and has a unit test.
//!
//! Policies shared by both flavours (not differences, listed for completeness):
//! * An entry that is removed gets dword 1 zeroed (QEMU stores R = 0; KVM leaves the
//!   stale real word, which would leak a host RPN through H_READ of a free slot).
//! * MMIO entries are ABSENT with key 31 in the real table in both flavours; both present
//!   them as VALID with the guest's own key.
//!
//! Invariant: no other module branches on `Flavour`; it calls these methods.

use crate::hcall::{self, BulkTsh};
use crate::hpte::{kvm_page_shifts, qemu_page_shift_noslb, HpteR, HpteV, PageShifts};

/// Which hypervisor's guest-visible behaviour to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Flavour {
    /// Linux KVM Book3S HV.
    #[default]
    Kvm,
    /// QEMU sPAPR under TCG (the traces' hypervisor).
    Qemu,
}

impl core::str::FromStr for Flavour {
    type Err = UnknownFlavour;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kvm" => Ok(Self::Kvm),
            "qemu" => Ok(Self::Qemu),
            _ => Err(UnknownFlavour),
        }
    }
}

impl core::fmt::Display for Flavour {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Qemu => "qemu",
        })
    }
}

/// A flavour name other than "kvm" or "qemu".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown flavour (expected \"kvm\" or \"qemu\")")]
pub struct UnknownFlavour;

/// Bits of one output register to ignore when comparing a KVM-flavour result with a
/// recorded QEMU result, with the name of the documented difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultMask {
    /// Name of the difference.
    pub name: &'static str,
    /// Bits to ignore.
    pub mask: u64,
}

/// QEMU's guest-visible migration-dirty bit 0x40 in every dword 0 it returns.
pub const MASK_DWORD0_DIRTY: ResultMask = ResultMask {
    name: "dword0-0x40-dirty-bit",
    mask: HpteV::HVLOCK,
};
/// KVM strips bit 62 (`HPTE_GR_RESERVED`) from every returned dword 1.
pub const MASK_GR_RESERVED: ResultMask = ResultMask {
    name: "dword1-bit62-gr-reserved-stripped",
    mask: HpteR::TS,
};
/// H_BULK_REMOVE R/C: QEMU `<< 43` (bits 51/50), KVM `<< 51` (bits 59/58).
pub const MASK_BULK_RC: ResultMask = ResultMask {
    name: "bulk-remove-rc-placement",
    mask: (HpteR::RC << 43) | (HpteR::RC << 51),
};

const DWORD0: &[ResultMask] = &[MASK_DWORD0_DIRTY];
const DWORD1: &[ResultMask] = &[MASK_GR_RESERVED];
const BULK: &[ResultMask] = &[MASK_BULK_RC];

/// The guest-visible differences between the flavours as masks, for comparing a
/// KVM-flavour result with a recorded QEMU result: for output register `out_index`
/// (0 = r4) of `opcode`, the bits to ignore. Empty for [`Flavour::Qemu`] (bit-exact).
///
/// Differences that are not expressible as a static mask (they change the return code
/// too, so a replay notices them anyway) are: H_CLEAR_REF/H_CLEAR_MOD (H_FUNCTION in
/// QEMU), H_ENTER validation (B = 2/3, WIMG, 16M LP bits, V = 0), and the response word
/// of an H_BULK_REMOVE pair with a bad TYPE (always with H_PARAMETER). Linux guests
/// produce none of them.
pub fn result_masks(flavour: Flavour, opcode: u64, out_index: usize) -> &'static [ResultMask] {
    if flavour == Flavour::Qemu {
        return &[];
    }
    match (opcode, out_index) {
        (hcall::H_REMOVE, 0) => DWORD0,
        (hcall::H_REMOVE, 1) => DWORD1,
        (hcall::H_READ, 0 | 2 | 4 | 6) => DWORD0,
        (hcall::H_READ, 1 | 3 | 5 | 7) => DWORD1,
        (hcall::H_BULK_REMOVE, 0 | 2 | 4 | 6) => BULK,
        _ => &[],
    }
}

/// Where H_ENTER's guest address lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Guest RAM (a memslot).
    Ram,
    /// Outside every memslot: emulated I/O.
    Io,
}

/// What the real HPTE must do about the guest's WIMG bits on RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WimgVerdict {
    /// Accept as given.
    Ok,
    /// Accept; the real HPTE is made cacheable (W, I, G cleared, M set); the guest view
    /// keeps the requested bits (KVM on cacheable host memory).
    ForceCacheable,
    /// H_PARAMETER.
    Reject,
}

impl Flavour {
    /// H_ENTER B = 2/3 (reserved segment size): KVM rejects with H_PARAMETER ("H_ENTER
    /// filter out reserved HPTE\[B\] value"); QEMU accepts and stores it.
    #[inline(always)]
    pub const fn rejects_reserved_segment_size(self) -> bool {
        matches!(self, Self::Kvm)
    }

    /// Page-size decoder used by H_ENTER (L bit + LP field): KVM looks at R\[19:12\]
    /// only; QEMU scans the POWER8 table and requires exact RPN-low bits.
    #[inline(always)]
    pub fn page_shifts(self, v: HpteV, r: HpteR) -> Option<PageShifts> {
        match self {
            Self::Kvm => kvm_page_shifts(v, r),
            Self::Qemu => qemu_page_shift_noslb(v, r),
        }
    }

    /// H_ENTER WIMG rule (QEMU's `h_enter`, `kvmppc_do_h_enter`): QEMU requires exactly M
    /// on RAM and I or I|M (G free) on I/O; KVM does not check I/O (MMIO) entries and,
    /// its host RAM being cacheable, accepts anything on RAM but forces the real HPTE
    /// cacheable unless the guest asked for M (W|I|M counts as M on ISA 2.06+, G ignored:
    /// `hpte_cache_flags_ok`).
    #[inline(always)]
    pub fn check_wimg(self, target: Target, r: HpteR) -> WimgVerdict {
        let wimg = r.0 & HpteR::WIMG;
        match (self, target) {
            (Self::Qemu, Target::Ram) => {
                if wimg == HpteR::M {
                    WimgVerdict::Ok
                } else {
                    WimgVerdict::Reject
                }
            }
            (Self::Qemu, Target::Io) => {
                let wim = wimg & (HpteR::W | HpteR::I | HpteR::M);
                if wim == HpteR::I || wim == HpteR::I | HpteR::M {
                    WimgVerdict::Ok
                } else {
                    WimgVerdict::Reject
                }
            }
            (Self::Kvm, Target::Io) => WimgVerdict::Ok,
            (Self::Kvm, Target::Ram) => {
                let wim = wimg & !HpteR::G;
                if wim == HpteR::M || wim == HpteR::W | HpteR::I | HpteR::M {
                    WimgVerdict::Ok
                } else {
                    WimgVerdict::ForceCacheable
                }
            }
        }
    }

    /// H_ENTER's treatment of the guest's V bit: KVM always makes the entry valid;
    /// QEMU stores the guest's bit as given (V = 0 stores an invalid entry).
    #[inline(always)]
    pub const fn forces_valid(self) -> bool {
        matches!(self, Self::Kvm)
    }

    /// H_ENTER's filter of the guest's dword 1 into the guest view: KVM strips
    /// `HPTE_GR_RESERVED` (bit 62); QEMU stores the word raw.
    #[inline(always)]
    pub const fn guest_rpte_of(self, ptel: u64) -> u64 {
        match self {
            Self::Kvm => ptel & !HpteR::TS,
            Self::Qemu => ptel,
        }
    }

    /// Present a real dword 0 to the guest (H_READ, H_REMOVE): HVLOCK and ABSENT never
    /// leak, ABSENT shows as VALID; QEMU additionally shows its migration-dirty bit
    /// 0x40, which is set in every entry of a table that was allocated fresh and never
    /// cleared (no migration is modelled), so it is always shown.
    #[inline(always)]
    pub const fn present_v(self, real_v: u64) -> u64 {
        let mut v = real_v & !HpteV::HV_SW;
        if real_v & HpteV::ABSENT != 0 {
            v |= HpteV::VALID;
        }
        match self {
            Self::Kvm => v,
            Self::Qemu => v | HpteV::HVLOCK,
        }
    }

    /// Present the guest view of dword 1 of an in-use entry: KVM strips bit 62; QEMU
    /// returns it as stored.
    #[inline(always)]
    pub const fn present_r(self, guest_view: u64) -> u64 {
        match self {
            Self::Kvm => guest_view & !HpteR::TS,
            Self::Qemu => guest_view,
        }
    }

    /// The dword 0 value H_REMOVE's H_ANDCOND test sees (`(v & avpn) != 0`): KVM tests
    /// its locked real word (HVLOCK set, ABSENT possible); QEMU its stored word (dirty
    /// bit 0x40 set, never 0x20, V set).
    #[inline(always)]
    pub const fn andcond_view(self, real_v: u64) -> u64 {
        match self {
            Self::Kvm => real_v | HpteV::HVLOCK,
            Self::Qemu => self.present_v(real_v),
        }
    }

    /// Placement of a removed entry's R/C in an H_BULK_REMOVE response: KVM `rc << 51`
    /// (inside the RC field), QEMU `rc << 43` (bits 51/50, outside it).
    #[inline(always)]
    pub const fn bulk_rc_bits(self, r: u64) -> u64 {
        let rc = r & HpteR::RC;
        match self {
            Self::Kvm => rc << 51,
            Self::Qemu => rc << 43,
        }
    }

    /// The response word for an H_BULK_REMOVE pair whose TYPE is neither REQUEST nor
    /// END: KVM rewrites it as RESPONSE|PARM keeping FLAGS and PTEX; QEMU leaves it.
    #[inline(always)]
    pub const fn bulk_bad_type_response(self, tsh: u64) -> u64 {
        match self {
            Self::Kvm => {
                BulkTsh::RESPONSE | BulkTsh::CODE_PARM | (tsh & (BulkTsh::FLAGS | BulkTsh::PTEX))
            }
            Self::Qemu => tsh,
        }
    }

    /// H_CLEAR_REF / H_CLEAR_MOD exist (KVM) or are H_FUNCTION (QEMU).
    #[inline(always)]
    pub const fn has_clear_ref_mod(self) -> bool {
        matches!(self, Self::Kvm)
    }

    /// H_PROTECT on a VALID entry that would become writable: KVM keeps the real HPTE
    /// read-only until a write fault upgrades it (the guest view shows the new bits);
    /// QEMU applies the change immediately.
    #[inline(always)]
    pub const fn protect_keeps_real_readonly(self) -> bool {
        matches!(self, Self::Kvm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hcall::*;

    #[test]
    fn parse_and_display_round_trip() {
        for f in [Flavour::Kvm, Flavour::Qemu] {
            assert_eq!(f.to_string().parse::<Flavour>(), Ok(f));
        }
        assert_eq!("KVM".parse::<Flavour>(), Err(UnknownFlavour));
        assert_eq!(Flavour::default(), Flavour::Kvm);
    }

    #[test]
    fn masks_are_empty_for_qemu_and_cover_each_difference_for_kvm() {
        for op in [H_REMOVE, H_READ, H_BULK_REMOVE, H_ENTER, H_PROTECT] {
            for i in 0..8 {
                assert!(result_masks(Flavour::Qemu, op, i).is_empty());
            }
        }
        assert_eq!(
            result_masks(Flavour::Kvm, H_REMOVE, 0),
            &[MASK_DWORD0_DIRTY]
        );
        assert_eq!(result_masks(Flavour::Kvm, H_REMOVE, 1), &[MASK_GR_RESERVED]);
        assert_eq!(result_masks(Flavour::Kvm, H_READ, 6), &[MASK_DWORD0_DIRTY]);
        assert_eq!(result_masks(Flavour::Kvm, H_READ, 7), &[MASK_GR_RESERVED]);
        assert_eq!(
            result_masks(Flavour::Kvm, H_BULK_REMOVE, 2),
            &[MASK_BULK_RC]
        );
        assert!(result_masks(Flavour::Kvm, H_BULK_REMOVE, 1).is_empty());
        assert!(result_masks(Flavour::Kvm, H_ENTER, 0).is_empty());
        // The trace example: QEMU response vs KVM response differ only under the mask.
        let qemu = 0x820c_0000_0005_76e0u64;
        let kvm = 0x8200_0000_0005_76e0u64 | Flavour::Kvm.bulk_rc_bits(HpteR::RC);
        assert_eq!(
            qemu,
            0x8200_0000_0005_76e0 | Flavour::Qemu.bulk_rc_bits(HpteR::RC)
        );
        assert_eq!(qemu & !MASK_BULK_RC.mask, kvm & !MASK_BULK_RC.mask);
        assert_ne!(qemu, kvm);
    }

    #[test]
    fn reserved_segment_size() {
        assert!(Flavour::Kvm.rejects_reserved_segment_size());
        assert!(!Flavour::Qemu.rejects_reserved_segment_size());
    }

    #[test]
    fn page_size_decoder_choice() {
        let v = HpteV(HpteV::LARGE | HpteV::VALID);
        let r = HpteR(0x20_0000); // 16M with R[23:20] != 0
        assert_eq!(Flavour::Qemu.page_shifts(v, r), None);
        assert_eq!(Flavour::Kvm.page_shifts(v, r), Some(PageShifts::same(24)));
    }

    #[test]
    fn wimg_rules() {
        use WimgVerdict::*;
        let r = |w| HpteR(w);
        assert_eq!(Flavour::Qemu.check_wimg(Target::Ram, r(HpteR::M)), Ok);
        assert_eq!(Flavour::Qemu.check_wimg(Target::Ram, r(HpteR::I)), Reject);
        assert_eq!(
            Flavour::Qemu.check_wimg(Target::Ram, r(HpteR::M | HpteR::G)),
            Reject
        );
        assert_eq!(Flavour::Qemu.check_wimg(Target::Io, r(HpteR::I)), Ok);
        assert_eq!(
            Flavour::Qemu.check_wimg(Target::Io, r(HpteR::I | HpteR::G)),
            Ok
        );
        assert_eq!(
            Flavour::Qemu.check_wimg(Target::Io, r(HpteR::I | HpteR::M)),
            Ok
        );
        assert_eq!(Flavour::Qemu.check_wimg(Target::Io, r(HpteR::M)), Reject);
        assert_eq!(Flavour::Kvm.check_wimg(Target::Io, r(HpteR::M)), Ok);
        assert_eq!(
            Flavour::Kvm.check_wimg(Target::Ram, r(HpteR::M | HpteR::G)),
            Ok
        );
        assert_eq!(
            Flavour::Kvm.check_wimg(Target::Ram, r(HpteR::W | HpteR::I | HpteR::M)),
            Ok
        );
        assert_eq!(
            Flavour::Kvm.check_wimg(Target::Ram, r(HpteR::I)),
            ForceCacheable
        );
    }

    #[test]
    fn valid_bit_and_gr_reserved() {
        assert!(Flavour::Kvm.forces_valid() && !Flavour::Qemu.forces_valid());
        assert_eq!(Flavour::Kvm.guest_rpte_of(u64::MAX), !HpteR::TS);
        assert_eq!(Flavour::Qemu.guest_rpte_of(u64::MAX), u64::MAX);
        assert_eq!(Flavour::Kvm.present_r(HpteR::TS | 1), 1);
        assert_eq!(Flavour::Qemu.present_r(HpteR::TS | 1), HpteR::TS | 1);
    }

    #[test]
    fn dword0_presentation() {
        let absent = 0x1000 | HpteV::ABSENT | HpteV::HVLOCK;
        assert_eq!(Flavour::Kvm.present_v(absent), 0x1001);
        assert_eq!(Flavour::Qemu.present_v(absent), 0x1041);
        assert_eq!(Flavour::Kvm.present_v(0), 0);
        assert_eq!(
            Flavour::Qemu.present_v(0),
            0x40,
            "fresh/removed slot reads 0x40"
        );
        assert_eq!(Flavour::Kvm.andcond_view(0x11), 0x51);
        assert_eq!(Flavour::Qemu.andcond_view(0x31), 0x51);
    }

    #[test]
    fn bulk_remove_differences() {
        assert_eq!(Flavour::Kvm.bulk_rc_bits(HpteR::R), 1 << 59);
        assert_eq!(Flavour::Kvm.bulk_rc_bits(HpteR::C), 1 << 58);
        assert_eq!(Flavour::Qemu.bulk_rc_bits(HpteR::R), 1 << 51);
        assert_eq!(Flavour::Qemu.bulk_rc_bits(HpteR::C), 1 << 50);
        let bad = 0x0200_0000_0000_0010;
        assert_eq!(Flavour::Qemu.bulk_bad_type_response(bad), bad);
        assert_eq!(
            Flavour::Kvm.bulk_bad_type_response(bad),
            0xA200_0000_0000_0010
        );
    }

    #[test]
    fn clear_ref_mod_and_protect() {
        assert!(Flavour::Kvm.has_clear_ref_mod() && !Flavour::Qemu.has_clear_ref_mod());
        assert!(Flavour::Kvm.protect_keeps_real_readonly());
        assert!(!Flavour::Qemu.protect_keeps_real_readonly());
    }
}
