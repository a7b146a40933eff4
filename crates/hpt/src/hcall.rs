//! PAPR hypercall opcodes, return codes and flag bits (H_BULK_REMOVE's included), with
//! their PAPR/Linux names. Values are identical in QEMU's `spapr.h` and Linux's
//! `hvcall.h`.
//!
//! Invariant: these are plain constants; return codes are `i64` (sign-extended in r3).

/// H_REMOVE.
pub const H_REMOVE: u64 = 0x04;
/// H_ENTER.
pub const H_ENTER: u64 = 0x08;
/// H_READ.
pub const H_READ: u64 = 0x0c;
/// H_CLEAR_MOD (KVM only).
pub const H_CLEAR_MOD: u64 = 0x10;
/// H_CLEAR_REF (KVM only).
pub const H_CLEAR_REF: u64 = 0x14;
/// H_PROTECT.
pub const H_PROTECT: u64 = 0x18;
/// H_PAGE_INIT (not an HPT call; not implemented here).
pub const H_PAGE_INIT: u64 = 0x2c;
/// H_BULK_REMOVE.
pub const H_BULK_REMOVE: u64 = 0x124;
/// H_BLOCK_REMOVE (pHyp only).
pub const H_BLOCK_REMOVE: u64 = 0x328;
/// H_CLEAR_HPT (not implemented by QEMU or KVM).
pub const H_CLEAR_HPT: u64 = 0x358;
/// H_RESIZE_HPT_PREPARE (`resize`).
pub const H_RESIZE_HPT_PREPARE: u64 = 0x36c;
/// H_RESIZE_HPT_COMMIT (`resize`).
pub const H_RESIZE_HPT_COMMIT: u64 = 0x370;

/// Success.
pub const H_SUCCESS: i64 = 0;
/// Busy.
pub const H_BUSY: i64 = 1;
/// Closed (resize: no matching pending prepare).
pub const H_CLOSED: i64 = 2;
/// Not available.
pub const H_NOT_AVAILABLE: i64 = 3;
/// Constrained.
pub const H_CONSTRAINED: i64 = 4;
/// Partial.
pub const H_PARTIAL: i64 = 5;
/// In progress.
pub const H_IN_PROGRESS: i64 = 14;
/// Page registered.
pub const H_PAGE_REGISTERED: i64 = 15;
/// Partial store.
pub const H_PARTIAL_STORE: i64 = 16;
/// Pending.
pub const H_PENDING: i64 = 17;
/// Continue.
pub const H_CONTINUE: i64 = 18;
/// Long busy, retry in ~1 ms.
pub const H_LONG_BUSY_ORDER_1_MSEC: i64 = 9900;
/// Long busy, retry in ~10 ms.
pub const H_LONG_BUSY_ORDER_10_MSEC: i64 = 9901;
/// Long busy, retry in ~100 ms.
pub const H_LONG_BUSY_ORDER_100_MSEC: i64 = 9902;
/// Long busy, retry in ~1 s.
pub const H_LONG_BUSY_ORDER_1_SEC: i64 = 9903;
/// Long busy, retry in ~10 s.
pub const H_LONG_BUSY_ORDER_10_SEC: i64 = 9904;
/// Long busy, retry in ~100 s.
pub const H_LONG_BUSY_ORDER_100_SEC: i64 = 9905;
/// KVM-internal "redo in virtual mode"; never returned to a guest.
pub const H_TOO_HARD: i64 = 9999;
/// Hardware error.
pub const H_HARDWARE: i64 = -1;
/// Function not supported.
pub const H_FUNCTION: i64 = -2;
/// Privilege error.
pub const H_PRIVILEGE: i64 = -3;
/// Bad parameter.
pub const H_PARAMETER: i64 = -4;
/// Bad mode.
pub const H_BAD_MODE: i64 = -5;
/// PTEG full.
pub const H_PTEG_FULL: i64 = -6;
/// Not found.
pub const H_NOT_FOUND: i64 = -7;
/// Reserved DABR.
pub const H_RESERVED_DABR: i64 = -8;
/// No memory.
pub const H_NO_MEM: i64 = -9;
/// Authority.
pub const H_AUTHORITY: i64 = -10;
/// Permission.
pub const H_PERMISSION: i64 = -11;
/// Resource.
pub const H_RESOURCE: i64 = -16;

/// `H_IS_LONG_BUSY(x)`.
#[inline]
pub const fn is_long_busy(ret: i64) -> bool {
    ret >= H_LONG_BUSY_ORDER_1_MSEC && ret <= H_LONG_BUSY_ORDER_100_SEC
}

/// H_LARGE_PAGE (legacy, ignored).
pub const H_LARGE_PAGE: u64 = 1 << (63 - 16);
/// H_EXACT: H_ENTER uses exactly the given slot.
pub const H_EXACT: u64 = 1 << (63 - 24);
/// H_R_XLATE (ignored).
pub const H_R_XLATE: u64 = 1 << (63 - 25);
/// H_READ_4: H_READ returns four entries.
pub const H_READ_4: u64 = 1 << (63 - 26);
/// H_AVPN: compare `v & ~0x7f` with the avpn argument.
pub const H_AVPN: u64 = 1 << (63 - 32);
/// H_ANDCOND: fail if `v & avpn != 0`.
pub const H_ANDCOND: u64 = 1 << (63 - 33);
/// H_LOCAL (hint, ignored).
pub const H_LOCAL: u64 = 1 << (63 - 35);
/// H_ICACHE_INVALIDATE (H_PAGE_INIT only).
pub const H_ICACHE_INVALIDATE: u64 = 1 << (63 - 40);
/// H_ICACHE_SYNCHRONIZE (H_PAGE_INIT only).
pub const H_ICACHE_SYNCHRONIZE: u64 = 1 << (63 - 41);
/// H_COALESCE_CAND (hint, ignored).
pub const H_COALESCE_CAND: u64 = 1 << (63 - 42);
/// H_ZERO_PAGE (H_PAGE_INIT only).
pub const H_ZERO_PAGE: u64 = 1 << (63 - 48);
/// H_COPY_PAGE (H_PAGE_INIT only).
pub const H_COPY_PAGE: u64 = 1 << (63 - 49);
/// H_N: H_PROTECT no-execute.
pub const H_N: u64 = 0x4;
/// H_PP1.
pub const H_PP1: u64 = 0x2;
/// H_PP2.
pub const H_PP2: u64 = 0x1;

/// Largest number of (TSH, TSL) pairs per H_BULK_REMOVE (`H_BULK_REMOVE_MAX_BATCH`).
pub const H_BULK_REMOVE_MAX_BATCH: usize = 4;

/// The H_BULK_REMOVE translation-specifier high word (TSH), request or response.
///
/// | field | mask | values |
/// |---|---|---|
/// | TYPE (PPC 0:1) | `0xC000…` | 00 unused, 01 REQUEST, 10 RESPONSE, 11 END |
/// | CODE (PPC 2:3) | `0x3000…` | SUCCESS 0, NOT_FOUND, PARM, HW |
/// | RC (PPC 4:5) | `0x0C00…` | R (`0x0800…`), C (`0x0400…`) of the removed entry (KVM) |
/// | FLAGS (PPC 6:7) | `0x0300…` | ABSOLUTE 0, ANDCOND, AVPN, 3 invalid |
/// | PTEX (PPC 8:63) | `0x00FF_FFFF_FFFF_FFFF` | HPTE index |
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkTsh(pub u64);

impl BulkTsh {
    /// TYPE field.
    pub const TYPE: u64 = 0xC000_0000_0000_0000;
    /// TYPE = REQUEST (`HBR_REQUEST`).
    pub const REQUEST: u64 = 0x4000_0000_0000_0000;
    /// TYPE = RESPONSE (`HBR_RESPONSE`).
    pub const RESPONSE: u64 = 0x8000_0000_0000_0000;
    /// TYPE = END (`HBR_END`).
    pub const END: u64 = 0xC000_0000_0000_0000;
    /// CODE field.
    pub const CODE: u64 = 0x3000_0000_0000_0000;
    /// CODE = SUCCESS.
    pub const CODE_SUCCESS: u64 = 0;
    /// CODE = NOT_FOUND.
    pub const CODE_NOT_FOUND: u64 = 0x1000_0000_0000_0000;
    /// CODE = PARM.
    pub const CODE_PARM: u64 = 0x2000_0000_0000_0000;
    /// CODE = HW.
    pub const CODE_HW: u64 = 0x3000_0000_0000_0000;
    /// RC field (KVM placement: R at bit 59, C at bit 58).
    pub const RC: u64 = 0x0C00_0000_0000_0000;
    /// FLAGS field.
    pub const FLAGS: u64 = 0x0300_0000_0000_0000;
    /// FLAGS = ABSOLUTE.
    pub const ABSOLUTE: u64 = 0;
    /// FLAGS = ANDCOND (`HBR_ANDCOND`).
    pub const ANDCOND: u64 = 0x0100_0000_0000_0000;
    /// FLAGS = AVPN (`HBR_AVPN`).
    pub const AVPN: u64 = 0x0200_0000_0000_0000;
    /// PTEX field.
    pub const PTEX: u64 = 0x00FF_FFFF_FFFF_FFFF;
    /// Shift turning FLAGS into H_REMOVE flags (`H_AVPN`/`H_ANDCOND`).
    pub const FLAGS_TO_HREMOVE_SHIFT: u32 = 26;

    /// TYPE bits.
    #[inline(always)]
    pub const fn kind(self) -> u64 {
        self.0 & Self::TYPE
    }
    /// FLAGS bits.
    #[inline(always)]
    pub const fn flags(self) -> u64 {
        self.0 & Self::FLAGS
    }
    /// PTEX.
    #[inline(always)]
    pub const fn ptex(self) -> u64 {
        self.0 & Self::PTEX
    }
    /// H_REMOVE flags equivalent to FLAGS.
    #[inline(always)]
    pub const fn hremove_flags(self) -> u64 {
        self.flags() >> Self::FLAGS_TO_HREMOVE_SHIFT
    }
    /// CODE of a response word.
    #[inline]
    pub const fn code(self) -> crate::papr::BulkCode {
        use crate::papr::BulkCode;
        match self.0 & Self::CODE {
            Self::CODE_SUCCESS => BulkCode::Success,
            Self::CODE_NOT_FOUND => BulkCode::NotFound,
            Self::CODE_PARM => BulkCode::Parameter,
            _ => BulkCode::Hardware,
        }
    }
    /// RC bits of a response word (R and C of the removed entry, in the flavour's
    /// placement).
    #[inline]
    pub const fn rc(self) -> u64 {
        self.0 & Self::RC
    }
    /// PTEX of the word as a [`Ptex`](revmap_rmap::Ptex) (`None` if it does not fit
    /// 32 bits, which no table of order <= 36 has).
    #[inline]
    pub const fn ptex_index(self) -> Option<revmap_rmap::Ptex> {
        let p = self.ptex();
        if p > u32::MAX as u64 {
            None
        } else {
            Some(revmap_rmap::Ptex(p as u32))
        }
    }
}

const _: () = assert!(BulkTsh::AVPN >> BulkTsh::FLAGS_TO_HREMOVE_SHIFT == H_AVPN);
const _: () = assert!(BulkTsh::ANDCOND >> BulkTsh::FLAGS_TO_HREMOVE_SHIFT == H_ANDCOND);
const _: () = assert!(
    BulkTsh::TYPE | BulkTsh::CODE | BulkTsh::RC | BulkTsh::FLAGS | BulkTsh::PTEX == u64::MAX
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_match_the_spec_table() {
        assert_eq!(H_EXACT, 0x0000_0080_0000_0000);
        assert_eq!(H_READ_4, 0x0000_0020_0000_0000);
        assert_eq!(H_AVPN, 0x8000_0000);
        assert_eq!(H_ANDCOND, 0x4000_0000);
        assert_eq!(H_LARGE_PAGE, 0x0000_8000_0000_0000);
        assert_eq!(H_ZERO_PAGE, 0x8000);
        assert!(is_long_busy(9902) && !is_long_busy(9906) && !is_long_busy(0));
    }

    #[test]
    fn bulk_tsh_fields() {
        let t = BulkTsh(0x4200_0000_0005_76e0);
        assert_eq!(t.kind(), BulkTsh::REQUEST);
        assert_eq!(t.flags(), BulkTsh::AVPN);
        assert_eq!(t.ptex(), 0x576e0);
        assert_eq!(t.hremove_flags(), H_AVPN);
    }
}
