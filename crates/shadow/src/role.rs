//! The shadow-page role (`union kvm_mmu_page_role`) and the shadow PTE format.
//!
//! Both are packed words declared field by field, never shifted by hand elsewhere:
//! * [`SpRole`]: 32 bits; a shadow page is reused only for an equal gfn **and** an equal
//!   role word (the 2008 access fix, "Januscape" CVE-2026-53359). Layout (LSB 0):
//!   `level` 0–3, `has_4_byte_gpte` 4, `quadrant` 5–6, `direct` 7, `access` 8–10,
//!   `invalid` 11, `efer_nx` 12, `cr0_wp` 13, `smep_andnot_wp` 14, `smap_andnot_wp` 15,
//!   `ad_disabled` 16, `guest_mode` 17, `passthrough` 18, `is_mirror` 19, 20–23 unused,
//!   `smm` 24–31.
//! * [`Spte`]: the legacy-PTE SPTE format of shadow paging: P 0, W 1, U 2, A 5, D 6, PS 7,
//!   Host-writable 9, MMU-writable 10, MMU-present 11, pfn 12–51, NX 63. The non-present
//!   value is bit 63 alone ([`SHADOW_NONPRESENT_VALUE`]). Legal (Host, MMU, W):
//!   111, 110, 100, 000, i.e. W ⇒ MMU-writable ⇒ Host-writable ([`Spte::is_legal`]).
//!
//! Invariant: every setter keeps the other fields unchanged and masks its value to the
//! field width; the layouts are pinned by tests.

use crate::paging::{Acc, CpuRole, PagingMode};

/// `union kvm_mmu_page_role`: what a shadow page's SPTEs mean besides its gfn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(transparent)]
pub struct SpRole(pub u32);

macro_rules! role_fields {
    ($($(#[$m:meta])* $get:ident, $set:ident: $shift:expr, $width:expr;)*) => {
        impl SpRole {
            $(
                $(#[$m])*
                pub const fn $get(self) -> u32 {
                    (self.0 >> $shift) & ((1 << $width) - 1)
                }
                #[doc = concat!("This role with `", stringify!($get), "` = `v` (masked to ", stringify!($width), " bits).")]
                #[must_use]
                pub const fn $set(self, v: u32) -> SpRole {
                    let mask = ((1u32 << $width) - 1) << $shift;
                    SpRole((self.0 & !mask) | ((v << $shift) & mask))
                }
            )*
        }
    };
}

role_fields! {
    /// `level`: the SP's level (1 = maps 4 KiB pages ... 5).
    level, with_level: 0, 4;
    /// `has_4_byte_gpte`: shadows a 32-bit (non-PAE) guest table with 8-byte SPTEs.
    has_4_byte_gpte, with_has_4_byte_gpte: 4, 1;
    /// `quadrant`: which part of a 4-byte guest table this SP covers.
    quadrant, with_quadrant: 5, 2;
    /// `direct`: maps a linear gfn range (no guest table at `gfn`).
    direct, with_direct: 7, 1;
    /// `access`: the AND of the rights of every guest entry above (ACC format).
    access, with_access: 8, 3;
    /// `invalid`: zapped; survives only as a pinned root.
    invalid, with_invalid: 11, 1;
    /// `efer_nx`: bit 63 is XD (forced 1 in shadow roots).
    efer_nx, with_efer_nx: 12, 1;
    /// `cr0_wp`.
    cr0_wp, with_cr0_wp: 13, 1;
    /// `smep_andnot_wp`: CR4.SMEP ∧ ¬CR0.WP.
    smep_andnot_wp, with_smep_andnot_wp: 14, 1;
    /// `smap_andnot_wp`: CR4.SMAP ∧ ¬CR0.WP.
    smap_andnot_wp, with_smap_andnot_wp: 15, 1;
    /// `ad_disabled`: no hardware A/D (access tracking instead).
    ad_disabled, with_ad_disabled: 16, 1;
    /// `guest_mode`: an SP of a nested (L2) MMU.
    guest_mode, with_guest_mode: 17, 1;
    /// `passthrough`: 5-level NPT shadowing a 4-level L1 NPT (no gptes).
    passthrough, with_passthrough: 18, 1;
    /// `is_mirror`: TDX mirror (TDP MMU only).
    is_mirror, with_is_mirror: 19, 1;
    /// `smm`: the address space (selects memslots for rmap and write tracking).
    smm, with_smm: 24, 8;
}

impl SpRole {
    /// The rights field as [`Acc`].
    pub const fn acc(self) -> Acc {
        Acc::from_bits_truncate(self.access() as u8)
    }

    /// Whether the SP shadows a guest table (has gptes): neither direct nor passthrough.
    pub const fn has_gptes(self) -> bool {
        self.direct() == 0 && self.passthrough() == 0
    }

    /// The role of a shadow root for a vCPU in `cpu` (KVM's shadow `root_role`):
    /// the CPU role's base bits, level at least 3 (PAE roots for 32-bit and PAE guests),
    /// `efer_nx` forced to 1, `access` ACC_ALL, direct when paging is off.
    pub const fn root(cpu: &CpuRole, smm: u32) -> SpRole {
        let level = match cpu.paging {
            PagingMode::Off | PagingMode::Bits32 | PagingMode::Pae => 3,
            PagingMode::Long4 => 4,
            PagingMode::Long5 => 5,
        };
        SpRole(0)
            .with_level(level)
            .with_has_4_byte_gpte(cpu.paging.has_4_byte_gpte() as u32)
            .with_direct(matches!(cpu.paging, PagingMode::Off) as u32)
            .with_access(Acc::ALL.bits() as u32)
            .with_efer_nx(1)
            .with_cr0_wp(cpu.cr0_wp as u32)
            .with_smep_andnot_wp(cpu.smep_andnot_wp as u32)
            .with_smap_andnot_wp(cpu.smap_andnot_wp as u32)
            .with_smm(smm)
    }

    /// The role of the child SP linked from SPTE `index` of an SP with role `self`
    /// (KVM's `kvm_mmu_child_role`): one level down, the given `direct` and `access`,
    /// never passthrough; for 4-byte gptes at the PTE level, the quadrant is the low bit
    /// of the parent SPTE index (an 8-byte PDE consumes one address bit fewer than a
    /// 4-byte one, so each 4 MiB guest table is shadowed by two halves).
    #[must_use]
    pub const fn child(self, index: usize, direct: bool, access: Acc) -> SpRole {
        let mut r = self
            .with_level(self.level().saturating_sub(1))
            .with_access(access.bits() as u32)
            .with_direct(direct as u32)
            .with_passthrough(0);
        if r.has_4_byte_gpte() != 0 {
            r = r.with_quadrant((index & 1) as u32);
        }
        r
    }
}

/// The SPTE of a non-present entry on x86-64 (`SHADOW_NONPRESENT_VALUE`): bit 63 alone.
pub const SHADOW_NONPRESENT_VALUE: u64 = 1 << 63;

/// A shadow PTE (legacy-PTE format, as shadow paging uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct Spte(pub u64);

impl Spte {
    /// P.
    pub const PRESENT: u64 = 1;
    /// W.
    pub const WRITABLE: u64 = 1 << 1;
    /// U.
    pub const USER: u64 = 1 << 2;
    /// A (hardware A/D are always on for shadow paging).
    pub const ACCESSED: u64 = 1 << 5;
    /// D.
    pub const DIRTY: u64 = 1 << 6;
    /// PS: a huge leaf at level 2 or 3.
    pub const PAGE_SIZE: u64 = 1 << 7;
    /// Host-writable: the memslot and host mapping are writable; fixed at creation.
    pub const HOST_WRITABLE: u64 = 1 << 9;
    /// MMU-writable: not write-protected for shadowing; cleared only by shadow
    /// write-protection.
    pub const MMU_WRITABLE: u64 = 1 << 10;
    /// MMU-present ("shadow-present"; MMIO SPTEs are not).
    pub const MMU_PRESENT: u64 = 1 << 11;
    /// NX.
    pub const NX: u64 = 1 << 63;
    /// Bits 12..51: the host frame.
    pub const PFN_MASK: u64 = 0x000f_ffff_ffff_f000;

    /// The non-present SPTE.
    pub const NONPRESENT: Spte = Spte(SHADOW_NONPRESENT_VALUE);

    /// A non-leaf SPTE linking a child table at host frame `pfn` (`__link_shadow_page`):
    /// P, W, U, executable, A unless A/D are disabled; rights live only in leaves.
    pub const fn link(pfn: u64, ad_disabled: bool) -> Spte {
        let mut v = Self::MMU_PRESENT
            | Self::PRESENT
            | Self::WRITABLE
            | Self::USER
            | ((pfn << 12) & Self::PFN_MASK);
        if !ad_disabled {
            v |= Self::ACCESSED;
        }
        Spte(v)
    }

    /// Shadow-present (`is_shadow_present_pte`).
    pub const fn is_shadow_present(self) -> bool {
        self.0 & Self::MMU_PRESENT != 0
    }

    /// A leaf at `level` (level 1 always, else PS).
    pub const fn is_leaf(self, level: u32) -> bool {
        level == 1 || self.0 & Self::PAGE_SIZE != 0
    }

    /// The host frame.
    pub const fn pfn(self) -> u64 {
        (self.0 & Self::PFN_MASK) >> 12
    }

    /// W.
    pub const fn is_writable(self) -> bool {
        self.0 & Self::WRITABLE != 0
    }

    /// Host-writable.
    pub const fn is_host_writable(self) -> bool {
        self.0 & Self::HOST_WRITABLE != 0
    }

    /// MMU-writable.
    pub const fn is_mmu_writable(self) -> bool {
        self.0 & Self::MMU_WRITABLE != 0
    }

    /// The (Host-writable, MMU-writable, W) combination is legal: W ⇒ MMU-writable ⇒
    /// Host-writable.
    pub const fn is_legal(self) -> bool {
        (!self.is_writable() || self.is_mmu_writable())
            && (!self.is_mmu_writable() || self.is_host_writable())
    }

    /// The rights a leaf grants, in ACC format.
    pub const fn acc(self) -> Acc {
        let mut a = 0;
        if self.0 & Self::NX == 0 {
            a |= Acc::EXEC.bits();
        }
        if self.is_writable() {
            a |= Acc::WRITE.bits();
        }
        if self.0 & Self::USER != 0 {
            a |= Acc::USER.bits();
        }
        Acc::from_bits_truncate(a)
    }

    /// The MMIO marker (`shadow_mmio_value` with host MAXPHYADDR < 52): bit 51, a
    /// reserved physical-address bit, with P, so that an access takes a reserved-bit
    /// #PF; MMU-present is clear (an MMIO SPTE is not shadow-present).
    pub const MMIO_VALUE: u64 = (1 << 51) | Self::PRESENT;
    /// Width of the memslot generation an MMIO SPTE records (8 bits at 3..=10, 11 bits
    /// at 52..=62).
    pub const MMIO_GEN_BITS: u32 = 19;
    /// The gfn field of an MMIO SPTE: bits 12..=50.
    const MMIO_GFN_MASK: u64 = ((1 << 51) - 1) & !0xfff;

    /// An MMIO SPTE (`make_mmio_spte`) for `gfn` with the W and U of `acc` and the low
    /// [`MMIO_GEN_BITS`](Self::MMIO_GEN_BITS) of memslot generation `gen`.
    pub const fn mmio(gfn: u64, acc: Acc, gen: u64) -> Spte {
        let rights = acc.bits() as u64 & (Acc::WRITE.bits() | Acc::USER.bits()) as u64;
        Spte(
            Self::MMIO_VALUE
                | ((gfn << 12) & Self::MMIO_GFN_MASK)
                | rights
                | ((gen & 0xff) << 3)
                | (((gen >> 8) & 0x7ff) << 52),
        )
    }

    /// An MMIO SPTE (`is_mmio_spte`).
    pub const fn is_mmio(self) -> bool {
        self.0 & (Self::MMIO_VALUE | Self::MMU_PRESENT | Self::NX) == Self::MMIO_VALUE
    }

    /// The gfn an MMIO SPTE records.
    pub const fn mmio_gfn(self) -> u64 {
        (self.0 & Self::MMIO_GFN_MASK) >> 12
    }

    /// The memslot generation an MMIO SPTE records (`get_mmio_spte_generation`).
    pub const fn mmio_gen(self) -> u64 {
        ((self.0 >> 3) & 0xff) | (((self.0 >> 52) & 0x7ff) << 8)
    }

    /// The rights an MMIO SPTE records (W and U; never EXEC).
    pub const fn mmio_acc(self) -> Acc {
        Acc::from_bits_truncate((self.0 & (Self::WRITABLE | Self::USER)) as u8)
    }

    /// This SPTE write-protected for shadowing (`spte_write_protect` with
    /// `pt_protect`): W and MMU-writable cleared.
    #[must_use]
    pub const fn write_protected(self) -> Spte {
        Spte(self.0 & !(Self::WRITABLE | Self::MMU_WRITABLE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmio_sptes_round_trip_and_are_not_shadow_present() {
        for (gfn, gen) in [(0u64, 0u64), (0xfee00, 0x7ffff), (0x3_ffff_ffff, 0x12345)] {
            let s = Spte::mmio(gfn, Acc::WRITE | Acc::USER | Acc::EXEC, gen);
            assert!(s.is_mmio() && !s.is_shadow_present(), "{s:?}");
            assert_eq!((s.mmio_gfn(), s.mmio_gen()), (gfn, gen));
            assert_eq!(s.mmio_acc(), Acc::WRITE | Acc::USER);
        }
        assert_eq!(Spte::mmio(5, Acc::empty(), 1 << 19).mmio_gen(), 0);
        assert!(!Spte::NONPRESENT.is_mmio());
        assert!(!Spte::link(0x8_0000_0000, false).is_mmio());
    }
    use crate::paging::CpuMode;

    #[test]
    fn role_layout_is_kvms() {
        let r = SpRole(0)
            .with_level(0xf)
            .with_quadrant(3)
            .with_access(7)
            .with_smm(0xff);
        assert_eq!(r.0, 0xff00_070f | 3 << 5);
        let fields: [(SpRole, u32); 14] = [
            (SpRole(0).with_has_4_byte_gpte(1), 1 << 4),
            (SpRole(0).with_direct(1), 1 << 7),
            (SpRole(0).with_invalid(1), 1 << 11),
            (SpRole(0).with_efer_nx(1), 1 << 12),
            (SpRole(0).with_cr0_wp(1), 1 << 13),
            (SpRole(0).with_smep_andnot_wp(1), 1 << 14),
            (SpRole(0).with_smap_andnot_wp(1), 1 << 15),
            (SpRole(0).with_ad_disabled(1), 1 << 16),
            (SpRole(0).with_guest_mode(1), 1 << 17),
            (SpRole(0).with_passthrough(1), 1 << 18),
            (SpRole(0).with_is_mirror(1), 1 << 19),
            (SpRole(0).with_level(3), 3),
            (SpRole(0).with_access(5), 5 << 8),
            (SpRole(0).with_smm(1), 1 << 24),
        ];
        for (r, w) in fields {
            assert_eq!(r.0, w);
        }
        // Setters mask to the field and leave the others alone.
        let r = SpRole(u32::MAX).with_level(0x12);
        assert_eq!(r.level(), 2);
        assert_eq!(r.0 | 0xf, u32::MAX);
    }

    #[test]
    fn root_and_child_roles() {
        let mut mode = CpuMode::long4(0x1000);
        mode.efer &= !crate::paging::EFER_NXE;
        let root = SpRole::root(&mode.role(), 0);
        assert_eq!(
            (root.level(), root.efer_nx(), root.cr0_wp(), root.direct()),
            (4, 1, 1, 0)
        );
        let c = root.child(7, false, Acc::USER | Acc::EXEC);
        assert_eq!(
            (c.level(), c.acc(), c.quadrant()),
            (3, Acc::USER | Acc::EXEC, 0)
        );
        assert_ne!(
            c,
            root.child(7, false, Acc::ALL),
            "rights are part of the key"
        );
        assert_ne!(
            c,
            root.child(7, true, Acc::USER | Acc::EXEC),
            "so is direct"
        );
        // 32-bit guests: PAE-shaped roots; PTE-level children carry the quadrant.
        let m32 = CpuMode::new(crate::paging::CR0_PG | crate::paging::CR0_PE, 0, 0, 0);
        let r32 = SpRole::root(&m32.role(), 0);
        assert_eq!(
            (r32.level(), r32.has_4_byte_gpte(), r32.cr0_wp()),
            (3, 1, 0)
        );
        let pd = r32.child(0, false, Acc::ALL).with_quadrant(2);
        let pt = pd.child(5, false, Acc::ALL);
        assert_eq!((pt.level(), pt.quadrant()), (1, 1));
        assert!(pt.has_gptes());
    }

    #[test]
    fn spte_format_and_legality() {
        assert!(!Spte::NONPRESENT.is_shadow_present());
        let l = Spte::link(0x1234, false);
        assert!(l.is_shadow_present() && !l.is_leaf(2) && l.is_leaf(1));
        assert_eq!(l.pfn(), 0x1234);
        assert_eq!(l.0 & Spte::ACCESSED, Spte::ACCESSED);
        assert_eq!(Spte::link(1, true).0 & Spte::ACCESSED, 0);
        let w = Spte(
            Spte::MMU_PRESENT
                | Spte::PRESENT
                | Spte::WRITABLE
                | Spte::HOST_WRITABLE
                | Spte::MMU_WRITABLE
                | Spte::DIRTY,
        );
        assert!(w.is_legal());
        assert_eq!(w.acc(), Acc::WRITE | Acc::EXEC);
        let p = w.write_protected();
        assert!(p.is_legal() && !p.is_writable() && !p.is_mmu_writable() && p.is_host_writable());
        assert!(!Spte(Spte::WRITABLE | Spte::HOST_WRITABLE).is_legal());
        assert!(!Spte(Spte::MMU_WRITABLE).is_legal());
    }
}
