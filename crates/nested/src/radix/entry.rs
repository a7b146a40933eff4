//! Radix page-directory and page-table entries (ISA v3.0/v3.1 radix tree, both scopes).
//!
//! One 64-bit word per entry, stored big-endian in memory; the types here hold the
//! architectural value (what a big-endian load returns). Bits are LSB-0 (bit 0 = value
//! 1); each constant also names its IBM (MSB-0) bit and its Linux/QEMU name.
//!
//! * [`RadixPde`]: a directory entry, V = 1 and L = 0: next-level base (NLB) and size (NLS).
//! * [`RadixPte`]: a leaf, V = 1 and L = 1: RPN, R, C, ATT, EAA.
//! * [`RadixEntry::decode`] classifies a raw word as invalid, directory or leaf.
//!
//! Invariants:
//! * The masks of each word partition all 64 bits (pinned by const assertions).
//! * Partition-scoped permission is EAA read / read-write / execute only; the privileged
//!   bit and AMR/IAMR concern process scope ([`RadixPte::permits`] ignores them).

use super::walk::Access;

/// A radix directory entry (PDE): V = 1, L = 0, next-level base and size.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct RadixPde(pub u64);

/// A radix leaf entry (PTE): V = 1, L = 1, real page number, R/C, attributes and EAA.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct RadixPte(pub u64);

/// The accessors every radix word type shares: `bits` (the raw word) and
/// `is_valid` (its V bit). Expanded inside each type's `impl` block.
macro_rules! word_accessors {
    () => {
        /// The raw word.
        #[inline(always)]
        pub const fn bits(self) -> u64 {
            self.0
        }
        /// V bit.
        #[inline(always)]
        pub const fn is_valid(self) -> bool {
            self.0 & Self::V != 0
        }
    };
}

impl RadixPde {
    /// V, valid (bit 63, IBM 0; `_PAGE_PRESENT`, `R_PTE_VALID`).
    pub const V: u64 = 1 << 63;
    /// L, leaf (bit 62, IBM 1; `_PAGE_PTE`, `R_PTE_LEAF`): zero in a directory entry.
    pub const L: u64 = 1 << 62;
    /// Bits 60-61 (IBM 2-3): reserved in a directory entry.
    pub const RSV_HI: u64 = 0x3000_0000_0000_0000;
    /// NLB, next-level base, a byte address (bits 8-59, IBM 4-55; `RPDB_MASK` layout,
    /// `R_PDE_NLB`).
    pub const NLB: u64 = 0x0FFF_FFFF_FFFF_FF00;
    /// Bits 5-7 (IBM 56-58): reserved in a directory entry.
    pub const RSV_LO: u64 = 0xE0;
    /// NLS, next-level size (bits 0-4, IBM 59-63; `R_PDE_NLS`): the next table has
    /// 2^NLS entries and 2^(NLS+3) bytes.
    pub const NLS: u64 = 0x1F;

    /// A valid directory entry pointing to a table at `base` (a byte address, aligned to
    /// 256 bytes at least) of 2^`nls` entries, as Linux writes it (V | base | NLS).
    #[inline]
    pub const fn new(base: u64, nls: u32) -> Self {
        RadixPde(Self::V | (base & Self::NLB) | (nls as u64 & Self::NLS))
    }
    word_accessors!();
    /// Next-level table base (byte address).
    #[inline(always)]
    pub const fn nlb(self) -> u64 {
        self.0 & Self::NLB
    }
    /// Next-level size: log2 of the number of entries of the next table.
    #[inline(always)]
    pub const fn nls(self) -> u32 {
        (self.0 & Self::NLS) as u32
    }
}

impl RadixPte {
    /// V, valid (bit 63, IBM 0; `_PAGE_PRESENT`, `R_PTE_VALID`).
    pub const V: u64 = 1 << 63;
    /// L, leaf (bit 62, IBM 1; `_PAGE_PTE`, `R_PTE_LEAF`).
    pub const L: u64 = 1 << 62;
    /// SW0, software (bit 61, IBM 2; Linux's transient `_PAGE_INVALID`).
    pub const SW0: u64 = 1 << 61;
    /// Bits 57-60 (IBM 3-6): reserved in radix (Linux hash mode keeps keys there).
    pub const RSV_HI: u64 = 0x1E00_0000_0000_0000;
    /// RPN, real page number: the page's base address (bits 12-56, IBM 7-51;
    /// `R_PTE_RPN`).
    pub const RPN: u64 = 0x01FF_FFFF_FFFF_F000;
    /// SW, three software bits (bits 9-11, IBM 52-54; Linux SW1..3: soft-dirty,
    /// special, devmap).
    pub const SW: u64 = 0xE00;
    /// R, referenced (bit 8, IBM 55; `_PAGE_ACCESSED`, `R_PTE_R`).
    pub const R: u64 = 0x100;
    /// C, changed (bit 7, IBM 56; `_PAGE_DIRTY`, `R_PTE_C`).
    pub const C: u64 = 0x80;
    /// Reserved (bit 6, IBM 57; `_RPAGE_RSV1`).
    pub const RSV1: u64 = 0x40;
    /// ATT, storage attributes (bits 4-5, IBM 58-59; `R_PTE_ATT`): see [`Att`].
    pub const ATT: u64 = 0x30;
    /// Shift of the ATT field.
    pub const ATT_SHIFT: u32 = 4;
    /// EAA privileged (bit 3, IBM 60; `_PAGE_PRIVILEGED`, `R_PTE_EAA_PRIV`): process
    /// scope only.
    pub const EAA_PRIV: u64 = 0x8;
    /// EAA read (bit 2, IBM 61; `_PAGE_READ`, `R_PTE_EAA_R`).
    pub const EAA_READ: u64 = 0x4;
    /// EAA read/write (bit 1, IBM 62; `_PAGE_WRITE`, `R_PTE_EAA_RW`): grants read too.
    pub const EAA_RW: u64 = 0x2;
    /// EAA execute (bit 0, IBM 63; `_PAGE_EXEC`, `R_PTE_EAA_X`).
    pub const EAA_X: u64 = 0x1;
    /// The three partition-scoped permission bits.
    pub const EAA_RWX: u64 = Self::EAA_READ | Self::EAA_RW | Self::EAA_X;

    /// A valid leaf mapping the page at `rpn` (a byte address) with the given
    /// low bits (`R`, `C`, `ATT`, `EAA_*`, outside the RPN field).
    #[inline]
    pub const fn new(rpn: u64, flags: u64) -> Self {
        RadixPte(Self::V | Self::L | (rpn & Self::RPN) | (flags & !(Self::RPN | Self::V | Self::L)))
    }
    word_accessors!();
    /// L bit.
    #[inline(always)]
    pub const fn is_leaf(self) -> bool {
        self.0 & Self::L != 0
    }
    /// The real page base address (RPN field, not masked to the page size).
    #[inline(always)]
    pub const fn rpn(self) -> u64 {
        self.0 & Self::RPN
    }
    /// R bit.
    #[inline(always)]
    pub const fn referenced(self) -> bool {
        self.0 & Self::R != 0
    }
    /// C bit.
    #[inline(always)]
    pub const fn changed(self) -> bool {
        self.0 & Self::C != 0
    }
    /// The ATT field.
    #[inline]
    pub const fn att(self) -> Att {
        match (self.0 & Self::ATT) >> Self::ATT_SHIFT {
            0 => Att::Normal,
            1 => Att::Sao,
            2 => Att::NonIdempotentIo,
            _ => Att::TolerantIo,
        }
    }
    /// EAA read: R or RW.
    #[inline(always)]
    pub const fn may_read(self) -> bool {
        self.0 & (Self::EAA_READ | Self::EAA_RW) != 0
    }
    /// EAA read/write.
    #[inline(always)]
    pub const fn may_write(self) -> bool {
        self.0 & Self::EAA_RW != 0
    }
    /// EAA execute.
    #[inline(always)]
    pub const fn may_execute(self) -> bool {
        self.0 & Self::EAA_X != 0
    }
    /// Whether partition-scoped EAA permits `access` (a load needs R or RW, a store RW,
    /// a fetch X). ATT is not consulted: KVM's nested walker ignores it.
    #[inline]
    pub const fn permits(self, access: Access) -> bool {
        match access {
            Access::Load => self.may_read(),
            Access::Store => self.may_write(),
            Access::Fetch => self.may_execute(),
        }
    }
    /// Whether the R/C bits already allow `access` without an R/C update: any access
    /// needs R, a store also C.
    #[inline]
    pub const fn rc_permits(self, access: Access) -> bool {
        self.referenced() && (!matches!(access, Access::Store) || self.changed())
    }
    /// The value after the hardware's R/C update for `access` ("do what the hardware
    /// would do"): R always, C on a store.
    #[inline]
    pub const fn with_rc_for(self, access: Access) -> Self {
        match access {
            Access::Store => RadixPte(self.0 | Self::R | Self::C),
            _ => RadixPte(self.0 | Self::R),
        }
    }
}

/// ATT, the storage attributes of a radix leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Att {
    /// 00: normal memory.
    Normal,
    /// 01: strong access ordering (POWER9 only).
    Sao,
    /// 10: non-idempotent I/O (guarded: an instruction fetch is a no-execute fault).
    NonIdempotentIo,
    /// 11: tolerant I/O (cache-inhibited).
    TolerantIo,
}

/// A raw radix entry classified by its V and L bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RadixEntry {
    /// V = 0: no translation.
    Invalid(u64),
    /// V = 1, L = 0: a directory entry.
    Directory(RadixPde),
    /// V = 1, L = 1: a leaf.
    Leaf(RadixPte),
}

impl RadixEntry {
    /// Classifies the architectural value of an entry.
    #[inline]
    pub const fn decode(raw: u64) -> Self {
        if raw & RadixPte::V == 0 {
            RadixEntry::Invalid(raw)
        } else if raw & RadixPte::L != 0 {
            RadixEntry::Leaf(RadixPte(raw))
        } else {
            RadixEntry::Directory(RadixPde(raw))
        }
    }
}

impl core::fmt::Debug for RadixPde {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "RadixPde({:#x}: v={} nlb={:#x} nls={})",
            self.0,
            self.is_valid() as u8,
            self.nlb(),
            self.nls()
        )
    }
}

impl core::fmt::Debug for RadixPte {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "RadixPte({:#x}: rpn={:#x} r={} c={} att={:?} eaa={:#x})",
            self.0,
            self.rpn(),
            self.referenced() as u8,
            self.changed() as u8,
            self.att(),
            self.0 & (Self::EAA_RWX | Self::EAA_PRIV)
        )
    }
}

const _: () = assert!(
    RadixPde::V | RadixPde::L | RadixPde::RSV_HI | RadixPde::NLB | RadixPde::RSV_LO | RadixPde::NLS
        == u64::MAX
);
const _: () = assert!(
    (RadixPde::V
        ^ RadixPde::L
        ^ RadixPde::RSV_HI
        ^ RadixPde::NLB
        ^ RadixPde::RSV_LO
        ^ RadixPde::NLS)
        == u64::MAX
);
const _: () = assert!(
    RadixPte::V
        ^ RadixPte::L
        ^ RadixPte::SW0
        ^ RadixPte::RSV_HI
        ^ RadixPte::RPN
        ^ RadixPte::SW
        ^ RadixPte::R
        ^ RadixPte::C
        ^ RadixPte::RSV1
        ^ RadixPte::ATT
        ^ RadixPte::EAA_PRIV
        ^ RadixPte::EAA_READ
        ^ RadixPte::EAA_RW
        ^ RadixPte::EAA_X
        == u64::MAX
);
const _: () =
    assert!(core::mem::size_of::<RadixPte>() == 8 && core::mem::size_of::<RadixPde>() == 8);

#[cfg(test)]
mod tests {
    use super::*;

    /// IBM (MSB-0) bit n of a doubleword.
    const fn ibm(n: u32) -> u64 {
        1 << (63 - n)
    }

    #[test]
    fn pte_layout_matches_the_isa() {
        assert_eq!(RadixPte::V, ibm(0));
        assert_eq!(RadixPte::L, ibm(1));
        assert_eq!(RadixPte::SW0, ibm(2));
        assert_eq!(RadixPte::R, ibm(55));
        assert_eq!(RadixPte::C, ibm(56));
        assert_eq!(RadixPte::RSV1, ibm(57));
        assert_eq!(RadixPte::ATT, ibm(58) | ibm(59));
        assert_eq!(RadixPte::EAA_PRIV, ibm(60));
        assert_eq!(RadixPte::EAA_READ, ibm(61));
        assert_eq!(RadixPte::EAA_RW, ibm(62));
        assert_eq!(RadixPte::EAA_X, ibm(63));
        // RPN spans IBM 7..=51.
        let rpn: u64 = (7..=51).map(ibm).sum();
        assert_eq!(RadixPte::RPN, rpn);
        assert_eq!(RadixPte::SW, ibm(52) | ibm(53) | ibm(54));
        // Linux names.
        assert_eq!(RadixPte::R, 0x100); // _PAGE_ACCESSED
        assert_eq!(RadixPte::C, 0x80); // _PAGE_DIRTY
        assert_eq!(RadixPte::EAA_PRIV, 0x8); // _PAGE_PRIVILEGED
    }

    #[test]
    fn pde_layout_matches_the_isa() {
        let nlb: u64 = (4..=55).map(ibm).sum();
        assert_eq!(RadixPde::NLB, nlb);
        let nls: u64 = (59..=63).map(ibm).sum();
        assert_eq!(RadixPde::NLS, nls);
        let d = RadixPde::new(0x12_3400, 9);
        assert_eq!(d.bits(), 0x8000_0000_0012_3409);
        assert!(d.is_valid());
        assert_eq!((d.nlb(), d.nls()), (0x12_3400, 9));
        // A trace's directory word: V | 0x120000 | 9.
        assert_eq!(
            RadixEntry::decode(0x8000000000120009),
            RadixEntry::Directory(RadixPde::new(0x120000, 9))
        );
    }

    #[test]
    fn leaf_fields_decode() {
        // From nested-small: RPN 0x100000000, R, EAA read.
        let p = RadixPte(0xc000000100000104);
        assert_eq!(RadixEntry::decode(p.0), RadixEntry::Leaf(p));
        assert_eq!(p.rpn(), 0x1_0000_0000);
        assert!(p.referenced() && !p.changed());
        assert!(p.may_read() && !p.may_write() && !p.may_execute());
        assert!(p.permits(Access::Load));
        assert!(!p.permits(Access::Store));
        assert!(!p.permits(Access::Fetch));
        assert!(p.rc_permits(Access::Load));
        assert!(!p.rc_permits(Access::Store));
        assert_eq!(p.with_rc_for(Access::Store).0, p.0 | 0x80);
        assert_eq!(p.att(), Att::Normal);
        // RW alone grants read.
        assert!(RadixPte::new(0, RadixPte::EAA_RW).permits(Access::Load));
        assert_eq!(
            RadixPte(RadixPte::V | RadixPte::L | 0x20).att(),
            Att::NonIdempotentIo
        );
        assert_eq!(
            RadixPte(RadixPte::V | RadixPte::L | 0x30).att(),
            Att::TolerantIo
        );
        assert_eq!(RadixPte(RadixPte::V | RadixPte::L | 0x10).att(), Att::Sao);
        assert_eq!(
            RadixEntry::decode(0x4000_0000_0000_0107),
            RadixEntry::Invalid(0x4000_0000_0000_0107)
        );
    }

    #[test]
    fn new_keeps_fields_apart() {
        let p = RadixPte::new(0xFFFF_FFFF_FFFF_FFFF, 0);
        assert_eq!(p.bits(), RadixPte::V | RadixPte::L | RadixPte::RPN);
        let p = RadixPte::new(0x4000, u64::MAX);
        assert_eq!(p.rpn(), 0x4000);
        assert!(p.is_valid() && p.is_leaf());
    }
}
