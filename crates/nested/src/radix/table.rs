//! PTCR and the partition table: [`Ptcr`], the two doublewords of a partition-table
//! entry ([`PateDw0`], [`PateDw1`]) and [`Pate`].
//!
//! The partition table is an array of 16-byte big-endian entries indexed by LPID; PTCR
//! (and the virtual PTCR an L1 registers with H_SET_PARTITION_TABLE) holds its base and
//! size. A process-table entry's first doubleword has the layout of [`PateDw0`], so one
//! walker serves both scopes.
//!
//! Invariants:
//! * The masks of each word partition its 64 bits (const assertions); each field is named
//!   with its ISA (IBM, MSB-0) bits and its Linux name.
//! * Only the radix form (HR = 1) is decoded field by field; an HPT-form dw0 is reported
//!   as such and never walked.

use super::geometry::RADIX_TREE_BITS;

/// PTCR: partition-table base and size (also L1's virtual PTCR, KVM's `l1_ptcr`).
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Ptcr(pub u64);

impl Ptcr {
    /// PATB, partition-table base, a byte address (bits 12-59, IBM 4-51; `PTCR_PATB`,
    /// `PRTB_MASK`).
    pub const PATB: u64 = 0x0FFF_FFFF_FFFF_F000;
    /// PATS, partition-table size: 2^(PATS+12) bytes (bits 0-4, IBM 59-63; `PTCR_PATS`).
    pub const PATS: u64 = 0x1F;
    /// Reserved bits (60-63 and 5-11).
    pub const RSV: u64 = !(Self::PATB | Self::PATS);
    /// Bytes per partition-table entry.
    pub const ENTRY_BYTES: u64 = 16;

    /// The raw value.
    #[inline(always)]
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// PTCR = 0: no partition table (for an L1, nesting disabled).
    #[inline(always)]
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
    /// The table's base address.
    #[inline(always)]
    pub const fn base(self) -> u64 {
        self.0 & Self::PATB
    }
    /// PATS.
    #[inline(always)]
    pub const fn pats(self) -> u32 {
        (self.0 & Self::PATS) as u32
    }
    /// Table size in bytes, 2^(PATS+12).
    #[inline(always)]
    pub const fn table_bytes(self) -> u64 {
        1 << (self.pats() + 12)
    }
    /// Number of entries, 2^(PATS+8): LPIDs at or above it are outside the table.
    #[inline(always)]
    pub const fn entries(self) -> u64 {
        1 << (self.pats() + 8)
    }
    /// Whether the base is aligned to the table size (QEMU checks it on lookup; Linux L0
    /// does not).
    #[inline(always)]
    pub const fn base_is_aligned(self) -> bool {
        self.base() & (self.table_bytes() - 1) == 0
    }
    /// The address of `lpid`'s entry, or `None` if `lpid` is outside the table.
    #[inline]
    pub const fn entry_addr(self, lpid: u64) -> Option<u64> {
        if lpid >= self.entries() {
            None
        } else {
            Some(self.base() + Self::ENTRY_BYTES * lpid)
        }
    }
}

/// Partition-table entry doubleword 0, radix form: HR, RTS, root base and size.
/// Also the layout of a process-table entry's dw0.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct PateDw0(pub u64);

impl PateDw0 {
    /// HR, host radix (bit 63, IBM 0; `PATB_HR`).
    pub const HR: u64 = 1 << 63;
    /// RTS1, the high 2 bits of RTS (bits 61-62, IBM 1-2).
    pub const RTS1: u64 = 0x6000_0000_0000_0000;
    /// Shift of RTS1.
    pub const RTS1_SHIFT: u32 = 61;
    /// Bit 60 (IBM 3): reserved.
    pub const RSV_HI: u64 = 1 << 60;
    /// RPDB, root page-directory base, a byte address (bits 8-59, IBM 4-55; `RPDB_MASK`).
    pub const RPDB: u64 = 0x0FFF_FFFF_FFFF_FF00;
    /// RTS2, the low 3 bits of RTS (bits 5-7, IBM 56-58).
    pub const RTS2: u64 = 0xE0;
    /// Shift of RTS2.
    pub const RTS2_SHIFT: u32 = 5;
    /// RPDS, root page-directory size: 2^RPDS entries, 2^(RPDS+3) bytes (bits 0-4,
    /// IBM 59-63; `RPDS_MASK`).
    pub const RPDS: u64 = 0x1F;
    /// RTS = 21 (a 52-bit space, the only one POWER9/10 implement):
    /// RTS1 = 0b10, RTS2 = 0b101 (`radix__get_tree_size`).
    pub const RTS_52: u64 = 0x4000_0000_0000_00A0;

    /// A radix dw0 for a 52-bit tree whose root of 2^`rpds` entries is at `root`, as
    /// KVM writes it for its own tables (HR | RTS(52) | root | RPDS).
    #[inline]
    pub const fn radix52(root: u64, rpds: u32) -> Self {
        PateDw0(Self::HR | Self::RTS_52 | (root & Self::RPDB) | (rpds as u64 & Self::RPDS))
    }
    /// The raw value.
    #[inline(always)]
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// HR bit.
    #[inline(always)]
    pub const fn host_radix(self) -> bool {
        self.0 & Self::HR != 0
    }
    /// RTS, assembled from RTS1:RTS2 (QEMU: `((dw0 >> 58) & 0x18) | ((dw0 >> 5) & 7)`).
    #[inline(always)]
    pub const fn rts(self) -> u32 {
        ((((self.0 & Self::RTS1) >> Self::RTS1_SHIFT) << 3)
            | ((self.0 & Self::RTS2) >> Self::RTS2_SHIFT)) as u32
    }
    /// Size of the translated space in address bits, RTS + 31.
    #[inline(always)]
    pub const fn tree_bits(self) -> u32 {
        self.rts() + 31
    }
    /// Whether RTS gives the 52-bit space.
    #[inline(always)]
    pub const fn is_52_bit(self) -> bool {
        self.tree_bits() == RADIX_TREE_BITS
    }
    /// The root directory's base address.
    #[inline(always)]
    pub const fn rpdb(self) -> u64 {
        self.0 & Self::RPDB
    }
    /// RPDS: log2 of the root directory's entry count.
    #[inline(always)]
    pub const fn rpds(self) -> u32 {
        (self.0 & Self::RPDS) as u32
    }
}

/// Partition-table entry doubleword 1, radix form: GR, process-table base and size.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct PateDw1(pub u64);

impl PateDw1 {
    /// GR, guest radix (bit 63, IBM 0; `PATB_GR`); must equal HR.
    pub const GR: u64 = 1 << 63;
    /// Bits 60-62 (IBM 1-3): reserved.
    pub const RSV_HI: u64 = 0x7000_0000_0000_0000;
    /// PRTB, process-table base, a byte address (bits 12-59, IBM 4-51; `PRTB_MASK`).
    /// For LPID != 0 it is a guest real address.
    pub const PRTB: u64 = 0x0FFF_FFFF_FFFF_F000;
    /// Bits 5-11 (IBM 52-58): reserved.
    pub const RSV_LO: u64 = 0xFE0;
    /// PRTS, process-table size: 2^(PRTS+12) bytes (bits 0-4, IBM 59-63).
    pub const PRTS: u64 = 0x1F;
    /// The largest PRTS KVM's own process-table walker accepts.
    pub const KVM_MAX_PRTS: u32 = 24;

    /// The raw value.
    #[inline(always)]
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// GR bit.
    #[inline(always)]
    pub const fn guest_radix(self) -> bool {
        self.0 & Self::GR != 0
    }
    /// Process-table base.
    #[inline(always)]
    pub const fn prtb(self) -> u64 {
        self.0 & Self::PRTB
    }
    /// PRTS.
    #[inline(always)]
    pub const fn prts(self) -> u32 {
        (self.0 & Self::PRTS) as u32
    }
    /// Process-table size in bytes, 2^(PRTS+12).
    #[inline(always)]
    pub const fn process_table_bytes(self) -> u64 {
        1 << (self.prts() + 12)
    }
}

/// A partition-table entry: both doublewords (KVM's `l1_gr_to_hr` / `process_table`
/// when cached for a nested guest).
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash, Debug)]
pub struct Pate {
    /// Doubleword 0: HR, RTS, root.
    pub dw0: PateDw0,
    /// Doubleword 1: GR, process table.
    pub dw1: PateDw1,
}

impl Pate {
    /// The empty entry [0, 0] (no partition; also what a failed read yields in KVM).
    pub const EMPTY: Pate = Pate {
        dw0: PateDw0(0),
        dw1: PateDw1(0),
    };

    /// Decodes the 16 bytes of an entry as stored (big-endian).
    #[inline]
    pub fn from_be_bytes(b: [u8; 16]) -> Self {
        let mut d0 = [0u8; 8];
        let mut d1 = [0u8; 8];
        d0.copy_from_slice(&b[..8]);
        d1.copy_from_slice(&b[8..]);
        Pate {
            dw0: PateDw0(u64::from_be_bytes(d0)),
            dw1: PateDw1(u64::from_be_bytes(d1)),
        }
    }
    /// The 16 bytes as stored (big-endian).
    #[inline]
    pub fn to_be_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.dw0.0.to_be_bytes());
        b[8..].copy_from_slice(&self.dw1.0.to_be_bytes());
        b
    }
    /// Whether dw0 is 0 (KVM: no cached root, "l1_gr_to_hr = 0").
    #[inline(always)]
    pub const fn is_empty(self) -> bool {
        self.dw0.0 == 0
    }
    /// The shadow PATE L0 writes for a nested guest (`kvmhv_update_ptbl_cache`):
    /// dw0 = HR | RTS(52) | shadow root | 13, dw1 = L1's cached dw1 verbatim.
    #[inline]
    pub const fn shadow(shadow_root: u64, l1_dw1: PateDw1) -> Self {
        Pate {
            dw0: PateDw0::radix52(shadow_root, super::geometry::ROOT_NLS),
            dw1: l1_dw1,
        }
    }
}

impl core::fmt::Debug for Ptcr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "Ptcr({:#x}: base={:#x} pats={})",
            self.0,
            self.base(),
            self.pats()
        )
    }
}

impl core::fmt::Debug for PateDw0 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "PateDw0({:#x}: hr={} rts={} rpdb={:#x} rpds={})",
            self.0,
            self.host_radix() as u8,
            self.rts(),
            self.rpdb(),
            self.rpds()
        )
    }
}

impl core::fmt::Debug for PateDw1 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "PateDw1({:#x}: gr={} prtb={:#x} prts={})",
            self.0,
            self.guest_radix() as u8,
            self.prtb(),
            self.prts()
        )
    }
}

const _: () = assert!(Ptcr::PATB ^ Ptcr::PATS ^ Ptcr::RSV == u64::MAX);
const _: () = assert!(
    PateDw0::HR ^ PateDw0::RTS1 ^ PateDw0::RSV_HI ^ PateDw0::RPDB ^ PateDw0::RTS2 ^ PateDw0::RPDS
        == u64::MAX
);
const _: () = assert!(
    PateDw1::GR ^ PateDw1::RSV_HI ^ PateDw1::PRTB ^ PateDw1::RSV_LO ^ PateDw1::PRTS == u64::MAX
);
const _: () = assert!(PateDw0::RTS_52 & !(PateDw0::RTS1 | PateDw0::RTS2) == 0);

#[cfg(test)]
mod tests {
    use super::*;

    const fn ibm(n: u32) -> u64 {
        1 << (63 - n)
    }

    #[test]
    fn ptcr_fields() {
        let p = Ptcr(0x10004);
        assert_eq!(p.base(), 0x10000);
        assert_eq!(p.pats(), 4);
        assert_eq!(p.table_bytes(), 64 * 1024);
        assert_eq!(p.entries(), 4096);
        assert!(p.base_is_aligned());
        assert_eq!(p.entry_addr(1853), Some(0x10000 + 16 * 1853));
        assert_eq!(p.entry_addr(4096), None);
        assert!(!Ptcr(0x10005).base_is_aligned()); // 128 KiB table at 64 KiB
        assert_eq!(Ptcr(0x10003).entries(), 2048);
        assert_eq!(Ptcr::PATB, (4..=51).map(ibm).sum::<u64>());
        assert_eq!(Ptcr::PATS, (59..=63).map(ibm).sum::<u64>());
    }

    #[test]
    fn dw0_fields_follow_the_isa() {
        assert_eq!(PateDw0::HR, ibm(0));
        assert_eq!(PateDw0::RTS1, ibm(1) | ibm(2));
        assert_eq!(PateDw0::RPDB, (4..=55).map(ibm).sum::<u64>());
        assert_eq!(PateDw0::RTS2, ibm(56) | ibm(57) | ibm(58));
        assert_eq!(PateDw0::RPDS, (59..=63).map(ibm).sum::<u64>());
        // The trace's root: HR | RTS52 | 0x100000 | 13.
        let d = PateDw0(0xc0000000001000ad);
        assert!(d.host_radix());
        assert_eq!(d.rts(), 21);
        assert_eq!(d.tree_bits(), 52);
        assert!(d.is_52_bit());
        assert_eq!(d.rpdb(), 0x100000);
        assert_eq!(d.rpds(), 13);
        assert_eq!(PateDw0::radix52(0x100000, 13), d);
        // RTS2 = 0b100 instead of 0b101: RTS 20, a 51-bit tree.
        let bad = PateDw0(0xc00000000010008d);
        assert_eq!(bad.rts(), 20);
        assert!(!bad.is_52_bit());
        // QEMU's formula.
        for raw in [d.0, bad.0, u64::MAX, 0x4000_0000_0000_0000] {
            let q = (((raw >> 58) & 0x18) | ((raw >> 5) & 7)) as u32;
            assert_eq!(PateDw0(raw).rts(), q);
        }
    }

    #[test]
    fn dw1_fields_follow_the_isa() {
        assert_eq!(PateDw1::GR, ibm(0));
        assert_eq!(PateDw1::PRTB, (4..=51).map(ibm).sum::<u64>());
        assert_eq!(PateDw1::PRTS, (59..=63).map(ibm).sum::<u64>());
        let d = PateDw1(0x8000000000110004);
        assert!(d.guest_radix());
        assert_eq!(d.prtb(), 0x110000);
        assert_eq!(d.prts(), 4);
        assert_eq!(d.process_table_bytes(), 64 * 1024);
    }

    #[test]
    fn pate_bytes_round_trip_big_endian() {
        let p = Pate {
            dw0: PateDw0(0xc0000000001000ad),
            dw1: PateDw1(0x8000000000110004),
        };
        let b = p.to_be_bytes();
        assert_eq!(b[0], 0xc0);
        assert_eq!(b[7], 0xad);
        assert_eq!(b[8], 0x80);
        assert_eq!(b[15], 0x04);
        assert_eq!(Pate::from_be_bytes(b), p);
        assert!(Pate::EMPTY.is_empty());
        assert!(!p.is_empty());
        let s = Pate::shadow(0x7_0000, p.dw1);
        assert_eq!(s.dw0.0, 0xc0000000000700ad);
        assert_eq!(s.dw1, p.dw1);
    }
}
