//! The nested-HV hypercalls' numbers, return codes, argument decoding and checks, and
//! the one mapping from their errors to PAPR return codes ([`HcallError::papr`]).
//!
//! * H_SET_PARTITION_TABLE ([`check_set_partition_table`]): PATS <= 4 (at most 4096
//!   entries) and a base inside L1's memory, else H_PARAMETER; PTCR 0 is accepted and
//!   disables nesting.
//! * H_ENTER_NESTED, its memory-side checks ([`check_enter_nested`]): PTCR 0 →
//!   H_NOT_AVAILABLE; LPID 0 (revmap rejects it, unlike Linux L0) or an LPID outside L1's
//!   partition table → H_PARAMETER.
//! * H_TLB_INVALIDATE ([`TlbInvalidate::decode`]): r4 is a tlbie image (RIC, PRS, R),
//!   r5 = RS (LPID in the low 32 bits), r6 = RB (EPN, IS, AP). R = 0, PRS = 1, RIC = 3,
//!   IS = 1, and IS = 0 with RIC != 0 are H_PARAMETER; an IS = 0 AP that names no page
//!   size is H_PARAMETER before any LPID lookup.
//! * H_COPY_TOFROM_GUEST ([`decode_h_copy_tofrom_guest`]): both directions or an
//!   effective address above 52 bits → H_PARAMETER.
//! * H_RPT_INVALIDATE ([`decode_h_rpt_invalidate`]): end < start → H_P5; for a nested
//!   guest, nesting off → H_FUNCTION, target other than CMMU → H_P2, no known page size
//!   → H_P4; ranges above 33 pages of a size become an LPID flush.

use crate::addr::NGpa;
use crate::radix::{PageSize, Ptcr};
use revmap_rmap::nested::MAX_NESTED_LPID;
use revmap_rmap::{Gpa, Lpid};

/// H_SET_PARTITION_TABLE opcode.
pub const H_SET_PARTITION_TABLE: u64 = 0xF800;
/// H_ENTER_NESTED opcode.
pub const H_ENTER_NESTED: u64 = 0xF804;
/// H_TLB_INVALIDATE opcode.
pub const H_TLB_INVALIDATE: u64 = 0xF808;
/// H_COPY_TOFROM_GUEST opcode.
pub const H_COPY_TOFROM_GUEST: u64 = 0xF80C;
/// H_RPT_INVALIDATE opcode.
pub const H_RPT_INVALIDATE: u64 = 0x448;

/// Success.
pub const H_SUCCESS: i64 = 0;
/// Nesting not available (H_ENTER_NESTED with PTCR 0).
pub const H_NOT_AVAILABLE: i64 = 3;
/// Not supported / nesting not enabled for this VM.
pub const H_FUNCTION: i64 = -2;
/// Bad parameter.
pub const H_PARAMETER: i64 = -4;
/// Bad mode (TM state).
pub const H_BAD_MODE: i64 = -5;
/// Not found (H_COPY_TOFROM_GUEST shortfall).
pub const H_NOT_FOUND: i64 = -7;
/// Out of memory.
pub const H_NO_MEM: i64 = -9;
/// Writing back L2 state failed.
pub const H_AUTHORITY: i64 = -10;
/// Bad parameter 2.
pub const H_P2: i64 = -55;
/// Bad parameter 3.
pub const H_P3: i64 = -56;
/// Bad parameter 4.
pub const H_P4: i64 = -57;
/// Bad parameter 5.
pub const H_P5: i64 = -58;
/// Unsupported (H_RPT_INVALIDATE on a non-radix guest).
pub const H_UNSUPPORTED: i64 = -67;
/// Internal: a signal is pending (the dispatcher returns r3 = 0 and exits to userspace).
pub const H_INTERRUPT: i64 = -69;
/// Internal: userspace must emulate (MMIO); also r3 = 0 to L1.
pub const H_TOO_HARD: i64 = 9999;

/// The largest PATS an L1 may register (a 64 KiB table of 4096 entries).
pub const MAX_L1_PATS: u32 = 4;

/// Why a nested hypercall was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum HcallError {
    /// Nesting is not enabled for this VM.
    #[error("nested virtualization is not enabled")]
    NestingDisabled,
    /// H_SET_PARTITION_TABLE: PATS above 4.
    #[error("partition table of PATS {pats} exceeds 4096 entries")]
    TableTooLarge {
        /// The PATS asked for.
        pats: u32,
    },
    /// H_SET_PARTITION_TABLE: the base is not L1 memory.
    #[error("partition table base {0} is not L1 memory")]
    TableNotInMemory(Gpa),
    /// H_ENTER_NESTED with PTCR 0.
    #[error("no partition table registered (PTCR 0)")]
    NoPartitionTable,
    /// H_ENTER_NESTED naming LPID 0 (the host's; a 0 nested-rmap entry would hide a list).
    #[error("LPID 0 cannot name a nested guest")]
    LpidZero,
    /// An LPID at or above L1's partition-table size (or above 12 bits).
    #[error("LPID {lpid} is outside the partition table ({entries} entries)")]
    LpidOutOfRange {
        /// The LPID named.
        lpid: u64,
        /// Entries of the current table.
        entries: u64,
    },
    /// H_TLB_INVALIDATE in the hash form (R = 0).
    #[error("tlbie with R = 0 (hash) is not supported")]
    TlbieHash,
    /// H_TLB_INVALIDATE process-scoped (PRS = 1): the L2 does that itself.
    #[error("process-scoped tlbie (PRS = 1) is not emulated")]
    TlbieProcessScoped,
    /// H_TLB_INVALIDATE with RIC = 3 (reserved).
    #[error("RIC = 3 is reserved")]
    TlbieRic3,
    /// H_TLB_INVALIDATE with IS = 1 (PID scope).
    #[error("IS = 1 (PID scope) is not a partition-scoped form")]
    TlbieIs1,
    /// H_TLB_INVALIDATE of one page (IS = 0) with RIC != 0.
    #[error("a page invalidation (IS = 0) must have RIC = 0, not {ric}")]
    TlbiePageRic {
        /// The RIC given.
        ric: u8,
    },
    /// H_RPT_INVALIDATE with end < start.
    #[error("H_RPT_INVALIDATE range ends ({end:#x}) before it starts ({start:#x})")]
    RptEndBeforeStart {
        /// r8.
        start: u64,
        /// r9.
        end: u64,
    },
    /// H_RPT_INVALIDATE of a nested guest with a target other than CMMU.
    #[error("H_RPT_INVALIDATE target {0:#x} is not CMMU for a nested flush")]
    RptTarget(u64),
    /// H_RPT_INVALIDATE of TLB entries with no known page size in the mask.
    #[error("H_RPT_INVALIDATE page-size mask {0:#x} names no page size")]
    RptPageSizes(u64),
    /// H_COPY_TOFROM_GUEST with both `to` and `from` set.
    #[error("H_COPY_TOFROM_GUEST with both a source and a destination")]
    CopyBothDirections,
    /// H_COPY_TOFROM_GUEST with an effective address using bits 52-63.
    #[error("H_COPY_TOFROM_GUEST effective address {0:#x} uses bits 52-63")]
    CopyBadEaddr(u64),
    /// H_TLB_INVALIDATE of one page with an AP that names no page size.
    #[error("AP {ap} names no page size")]
    TlbieBadAp {
        /// The AP given.
        ap: u8,
    },
}

impl HcallError {
    /// The PAPR return code L1 sees (the crate's one error-to-code table).
    pub const fn papr(self) -> i64 {
        match self {
            HcallError::NestingDisabled => H_FUNCTION,
            HcallError::NoPartitionTable => H_NOT_AVAILABLE,
            HcallError::RptEndBeforeStart { .. } => H_P5,
            HcallError::RptTarget(_) => H_P2,
            HcallError::RptPageSizes(_) => H_P4,
            HcallError::TableTooLarge { .. }
            | HcallError::TableNotInMemory(_)
            | HcallError::LpidZero
            | HcallError::LpidOutOfRange { .. }
            | HcallError::TlbieHash
            | HcallError::TlbieProcessScoped
            | HcallError::TlbieRic3
            | HcallError::TlbieIs1
            | HcallError::TlbiePageRic { .. }
            | HcallError::CopyBothDirections
            | HcallError::CopyBadEaddr(_)
            | HcallError::TlbieBadAp { .. } => H_PARAMETER,
        }
    }
}

/// H_SET_PARTITION_TABLE's checks (`kvmhv_set_partition_table`): PATS <= 4, and
/// `base_is_l1_memory` (asked about the table's base; KVM checks its gfn is a visible
/// L1 gfn) must hold. On success the caller stores `ptcr` verbatim and does nothing
/// else (no flush, no nested-guest change).
pub fn check_set_partition_table(
    ptcr: Ptcr,
    base_is_l1_memory: impl FnOnce(Gpa) -> bool,
) -> Result<(), HcallError> {
    if ptcr.pats() > MAX_L1_PATS {
        return Err(HcallError::TableTooLarge { pats: ptcr.pats() });
    }
    if !base_is_l1_memory(Gpa(ptcr.base())) {
        return Err(HcallError::TableNotInMemory(Gpa(ptcr.base())));
    }
    Ok(())
}

/// The memory-side checks of H_ENTER_NESTED, in KVM's order: PTCR 0 → H_NOT_AVAILABLE;
/// LPID 0 → H_PARAMETER (revmap's choice); an LPID outside the current partition table
/// (`kvmhv_get_nested`) → H_PARAMETER. Returns the L2's LPID.
pub fn check_enter_nested(ptcr: Ptcr, l1_lpid: u64) -> Result<Lpid, HcallError> {
    if ptcr.is_zero() {
        return Err(HcallError::NoPartitionTable);
    }
    if l1_lpid == 0 {
        return Err(HcallError::LpidZero);
    }
    let entries = ptcr.entries().min(u64::from(MAX_NESTED_LPID) + 1);
    if l1_lpid >= entries {
        return Err(HcallError::LpidOutOfRange {
            lpid: l1_lpid,
            entries,
        });
    }
    // l1_lpid < 4096: fits 12 bits.
    Ok(Lpid(l1_lpid as u16))
}

/// The tlbie instruction image of H_TLB_INVALIDATE's r4.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TlbieInstr(pub u64);

impl TlbieInstr {
    /// RIC, radix invalidation control (bits 18-19).
    pub const RIC: u64 = 0x3 << 18;
    /// PRS, process-scoped (bit 17).
    pub const PRS: u64 = 1 << 17;
    /// R, radix (bit 16).
    pub const R: u64 = 1 << 16;

    /// The image L1 builds (`H_TLBIE_P1_ENC(ric, prs, r)`).
    pub const fn encode(ric: u8, prs: bool, r: bool) -> Self {
        TlbieInstr(((ric as u64 & 3) << 18) | ((prs as u64) << 17) | ((r as u64) << 16))
    }
    /// RIC.
    pub const fn ric(self) -> u8 {
        ((self.0 & Self::RIC) >> 18) as u8
    }
    /// PRS.
    pub const fn prs(self) -> bool {
        self.0 & Self::PRS != 0
    }
    /// R.
    pub const fn radix(self) -> bool {
        self.0 & Self::R != 0
    }
}

/// RB of a tlbie (H_TLB_INVALIDATE's r6).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TlbieRb(pub u64);

impl TlbieRb {
    /// EPN: the effective page number, an address (bits 12-63).
    pub const EPN: u64 = !0xFFF;
    /// IS, invalidation selector (bits 10-11): 0 page, 1 PID, 2 LPID, 3 all.
    pub const IS: u64 = 0x3 << 10;
    /// AP, actual page size (bits 5-7).
    pub const AP: u64 = 0x7 << 5;
    /// IS = 2 with LPID scope (`TLBIEL_INVAL_SET_LPID`).
    pub const INVAL_SET_LPID: u64 = 0x800;

    /// The address (EPN << 12).
    pub const fn addr(self) -> u64 {
        self.0 & Self::EPN
    }
    /// IS.
    pub const fn is(self) -> u8 {
        ((self.0 & Self::IS) >> 10) as u8
    }
    /// AP.
    pub const fn ap(self) -> u8 {
        ((self.0 & Self::AP) >> 5) as u8
    }
}

/// What an LPID-wide invalidation flushes (RIC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ric {
    /// RIC 0: TLB entries (L0 drops the L2's shadow translations).
    Tlb,
    /// RIC 1: page-walk cache (L0 caches no L1 directory: nothing to do).
    Pwc,
    /// RIC 2: everything, including the partition-table cache (re-read the PATE).
    All,
}

/// A decoded, accepted H_TLB_INVALIDATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlbInvalidate {
    /// IS = 0, RIC = 0: one page of `size` containing `addr` for `lpid`.
    Page {
        /// RS low 32 bits (an L1 LPID; unknown or out-of-table LPIDs are a no-op).
        lpid: u32,
        /// The address from RB (not yet aligned).
        addr: u64,
        /// The page size AP names.
        size: PageSize,
    },
    /// IS = 2: everything of `lpid`.
    Lpid {
        /// RS low 32 bits.
        lpid: u32,
        /// What to flush.
        ric: Ric,
    },
    /// IS = 3: every LPID.
    All {
        /// What to flush.
        ric: Ric,
    },
}

impl TlbInvalidate {
    /// Decodes and checks H_TLB_INVALIDATE(r4 = instr, r5 = rs, r6 = rb).
    pub fn decode(instr: u64, rs: u64, rb: u64) -> Result<Self, HcallError> {
        let i = TlbieInstr(instr);
        let rb = TlbieRb(rb);
        let lpid = (rs & 0xFFFF_FFFF) as u32;
        if !i.radix() {
            return Err(HcallError::TlbieHash);
        }
        if i.prs() {
            return Err(HcallError::TlbieProcessScoped);
        }
        let ric = match i.ric() {
            0 => Ric::Tlb,
            1 => Ric::Pwc,
            2 => Ric::All,
            _ => return Err(HcallError::TlbieRic3),
        };
        match rb.is() {
            0 => {
                if ric != Ric::Tlb {
                    return Err(HcallError::TlbiePageRic { ric: i.ric() });
                }
                let ap = rb.ap();
                let size = PageSize::from_ap(ap).ok_or(HcallError::TlbieBadAp { ap })?;
                Ok(TlbInvalidate::Page {
                    lpid,
                    addr: rb.addr(),
                    size,
                })
            }
            1 => Err(HcallError::TlbieIs1),
            2 => Ok(TlbInvalidate::Lpid { lpid, ric }),
            _ => Ok(TlbInvalidate::All { ric }),
        }
    }

    /// For a page invalidation: the L2 range it covers, `[start, start + size)` with
    /// `start` aligned down to `size`; `None` if it lies beyond the 52-bit space (no
    /// translation can exist there) or for the LPID-wide forms.
    pub fn page_range(self) -> Option<(NGpa, PageSize)> {
        match self {
            TlbInvalidate::Page { addr, size, .. } => {
                NGpa::new(size.align_down(addr)).map(|a| (a, size))
            }
            _ => None,
        }
    }
}

/// Which way H_COPY_TOFROM_GUEST copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CopyDirection {
    /// From the L2's effective address into L1 memory at `to` (L1 emulating a load).
    FromGuest {
        /// The L1 destination (r7).
        to: Gpa,
    },
    /// From L1 memory at `from` to the L2's effective address (L1 emulating a store).
    /// Both `to` and `from` 0 also land here, as a copy from L1 address 0 (KVM's reading).
    ToGuest {
        /// The L1 source (r8).
        from: Gpa,
    },
}

/// A checked H_COPY_TOFROM_GUEST request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CopyRequest {
    /// The L2's l1_lpid (r4); the caller looks it up without creating it (unknown →
    /// H_PARAMETER).
    pub lpid: u64,
    /// The L2 process id (r5).
    pub pid: u64,
    /// The L2 effective address (r6).
    pub eaddr: u64,
    /// The direction and the L1 address.
    pub direction: CopyDirection,
    /// Bytes to copy (r9).
    pub len: u64,
}

impl CopyRequest {
    /// The quadrant L0 copies through with LPIDR = the shadow LPID: 1 (PIDR = pid) for a
    /// non-zero pid, 2 (PID 0) otherwise.
    pub const fn quadrant(&self) -> u8 {
        if self.pid != 0 {
            1
        } else {
            2
        }
    }
}

/// Decodes and checks H_COPY_TOFROM_GUEST(r4 = lpid, r5 = pid, r6 = eaddr, r7 = to,
/// r8 = from, r9 = n): both directions → H_PARAMETER; eaddr bits 52-63 → H_PARAMETER.
/// (Any shortfall of the copy itself is H_NOT_FOUND; L0 never demand-faults for it.)
pub fn decode_h_copy_tofrom_guest(
    lpid: u64,
    pid: u64,
    eaddr: u64,
    to: u64,
    from: u64,
    len: u64,
) -> Result<CopyRequest, HcallError> {
    if to != 0 && from != 0 {
        return Err(HcallError::CopyBothDirections);
    }
    if eaddr >> 52 != 0 {
        return Err(HcallError::CopyBadEaddr(eaddr));
    }
    let direction = if to != 0 {
        CopyDirection::FromGuest { to: Gpa(to) }
    } else {
        CopyDirection::ToGuest { from: Gpa(from) }
    };
    Ok(CopyRequest {
        lpid,
        pid,
        eaddr,
        direction,
        len,
    })
}

/// H_RPT_INVALIDATE type bit: the id is a nested guest's LPID (partition scope).
pub const H_RPTI_TYPE_NESTED: u64 = 0x1;
/// H_RPT_INVALIDATE type bit: TLB entries.
pub const H_RPTI_TYPE_TLB: u64 = 0x2;
/// H_RPT_INVALIDATE type bit: page-walk cache.
pub const H_RPTI_TYPE_PWC: u64 = 0x4;
/// H_RPT_INVALIDATE type bit: partition-table (with NESTED) or process-table cache.
pub const H_RPTI_TYPE_PAT: u64 = 0x8;
/// TLB | PWC | PAT: everything of a nested guest (an RIC = 2 LPID flush).
pub const H_RPTI_TYPE_NESTED_ALL: u64 = H_RPTI_TYPE_TLB | H_RPTI_TYPE_PWC | H_RPTI_TYPE_PAT;
/// H_RPT_INVALIDATE target: all vCPUs' MMUs (the only target a nested flush accepts).
pub const H_RPTI_TARGET_CMMU: u64 = 0x1;
/// Ranges longer than this many pages of a size become an LPID-wide flush
/// (`tlb_range_flush_page_ceiling`).
pub const RANGE_FLUSH_PAGE_CEILING: u64 = 33;

/// The H_RPT_INVALIDATE page-size mask bit of `size` (4K 0x1, 64K 0x2, 2M 0x4, 1G 0x8).
pub const fn rpt_page_size_bit(size: PageSize) -> u64 {
    match size {
        PageSize::P4K => 0x1,
        PageSize::P64K => 0x2,
        PageSize::P2M => 0x4,
        PageSize::P1G => 0x8,
    }
}

/// What an accepted H_RPT_INVALIDATE asks of L0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RptInvalidate {
    /// Without NESTED: a process-scoped flush of L1's own LPID (not a nested-MMU matter).
    ProcessScoped,
    /// Nothing to do (PWC alone: L0 keeps no nested page-walk cache).
    Nothing,
    /// An LPID-wide flush of the L2 `lpid` (an unknown LPID is a no-op, H_SUCCESS).
    Lpid {
        /// The L2's l1_lpid (r4).
        lpid: u64,
        /// RIC 2 for NESTED_ALL, RIC 0 otherwise.
        ric: Ric,
    },
    /// Page invalidations of `lpid`: for each size, every page of that size in
    /// `[start, end)` (at most 33 pages each).
    Pages {
        /// The L2's l1_lpid.
        lpid: u64,
        /// The sizes asked for, smallest first.
        sizes: Vec<PageSize>,
        /// r8.
        start: u64,
        /// r9.
        end: u64,
    },
}

/// Decodes and checks H_RPT_INVALIDATE(r4 = id, r5 = target, r6 = type, r7 = page sizes,
/// r8 = start, r9 = end) from a radix L1 (`kvmppc_h_rpt_invalidate` →
/// `do_h_rpt_invalidate_pat`), in KVM's order: end < start → H_P5; with NESTED: nesting
/// off → H_FUNCTION, target != CMMU → H_P2; NESTED_ALL → RIC 2 LPID flush; the whole
/// space (0, −1) → RIC 0 LPID flush; TLB → per page size, an LPID flush when a range
/// exceeds 33 pages, H_P4 when the mask names no size; PWC alone → nothing.
pub fn decode_h_rpt_invalidate(
    id: u64,
    target: u64,
    kind: u64,
    page_sizes: u64,
    start: u64,
    end: u64,
    nesting_enabled: bool,
) -> Result<RptInvalidate, HcallError> {
    if end < start {
        return Err(HcallError::RptEndBeforeStart { start, end });
    }
    if kind & H_RPTI_TYPE_NESTED == 0 {
        return Ok(RptInvalidate::ProcessScoped);
    }
    if !nesting_enabled {
        return Err(HcallError::NestingDisabled);
    }
    if target != H_RPTI_TARGET_CMMU {
        return Err(HcallError::RptTarget(target));
    }
    if kind & H_RPTI_TYPE_NESTED_ALL == H_RPTI_TYPE_NESTED_ALL {
        return Ok(RptInvalidate::Lpid {
            lpid: id,
            ric: Ric::All,
        });
    }
    if kind & H_RPTI_TYPE_TLB == 0 {
        return Ok(RptInvalidate::Nothing);
    }
    if start == 0 && end == u64::MAX {
        return Ok(RptInvalidate::Lpid {
            lpid: id,
            ric: Ric::Tlb,
        });
    }
    let sizes: Vec<PageSize> = PageSize::ALL
        .into_iter()
        .filter(|&s| page_sizes & rpt_page_size_bit(s) != 0)
        .collect();
    if sizes.is_empty() {
        return Err(HcallError::RptPageSizes(page_sizes));
    }
    if sizes
        .iter()
        .any(|s| (end - start) >> s.shift() > RANGE_FLUSH_PAGE_CEILING)
    {
        return Ok(RptInvalidate::Lpid {
            lpid: id,
            ric: Ric::Tlb,
        });
    }
    Ok(RptInvalidate::Pages {
        lpid: id,
        sizes,
        start,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_tofrom_guest_checks() {
        let r =
            decode_h_copy_tofrom_guest(3, 9, 0xc000_0000_0000_1000 >> 12, 0x5000, 0, 64).unwrap();
        assert_eq!(r.direction, CopyDirection::FromGuest { to: Gpa(0x5000) });
        assert_eq!(r.quadrant(), 1);
        let r = decode_h_copy_tofrom_guest(3, 0, 0x1000, 0, 0x6000, 8).unwrap();
        assert_eq!(r.direction, CopyDirection::ToGuest { from: Gpa(0x6000) });
        assert_eq!(r.quadrant(), 2);
        let r = decode_h_copy_tofrom_guest(3, 0, 0x1000, 0, 0, 8).unwrap();
        assert_eq!(r.direction, CopyDirection::ToGuest { from: Gpa(0) });
        assert_eq!(
            decode_h_copy_tofrom_guest(3, 0, 0x1000, 1, 2, 8).map_err(HcallError::papr),
            Err(H_PARAMETER)
        );
        assert_eq!(
            decode_h_copy_tofrom_guest(3, 0, 1 << 52, 1, 0, 8),
            Err(HcallError::CopyBadEaddr(1 << 52))
        );
    }

    #[test]
    fn rpt_invalidate_rules() {
        let nested_tlb = H_RPTI_TYPE_NESTED | H_RPTI_TYPE_TLB;
        let d = |kind, sizes, start, end| {
            decode_h_rpt_invalidate(5, H_RPTI_TARGET_CMMU, kind, sizes, start, end, true)
        };
        assert_eq!(
            d(nested_tlb, 0x2, 0x20, 0x10).map_err(HcallError::papr),
            Err(H_P5)
        );
        assert_eq!(
            decode_h_rpt_invalidate(5, 0x2, nested_tlb, 0x2, 0, 0x1_0000, true)
                .map_err(HcallError::papr),
            Err(H_P2)
        );
        assert_eq!(
            decode_h_rpt_invalidate(5, 1, nested_tlb, 0x2, 0, 0x1_0000, false)
                .map_err(HcallError::papr),
            Err(H_FUNCTION)
        );
        assert_eq!(
            d(H_RPTI_TYPE_TLB, 0x2, 0, 1),
            Ok(RptInvalidate::ProcessScoped)
        );
        assert_eq!(
            d(H_RPTI_TYPE_NESTED | H_RPTI_TYPE_NESTED_ALL, 0, 0, 0),
            Ok(RptInvalidate::Lpid {
                lpid: 5,
                ric: Ric::All
            })
        );
        assert_eq!(
            d(H_RPTI_TYPE_NESTED | H_RPTI_TYPE_PWC, 0x2, 0, 1),
            Ok(RptInvalidate::Nothing)
        );
        assert_eq!(
            d(nested_tlb, 0x2, 0, u64::MAX),
            Ok(RptInvalidate::Lpid {
                lpid: 5,
                ric: Ric::Tlb
            })
        );
        assert_eq!(
            d(nested_tlb, 0x10, 0, 0x1_0000).map_err(HcallError::papr),
            Err(H_P4)
        );
        // 33 pages of 64 KiB: page by page; 34: an LPID flush.
        assert_eq!(
            d(nested_tlb, 0x2, 0x10_0000, 0x10_0000 + 33 * 0x1_0000),
            Ok(RptInvalidate::Pages {
                lpid: 5,
                sizes: vec![PageSize::P64K],
                start: 0x10_0000,
                end: 0x10_0000 + 33 * 0x1_0000
            })
        );
        assert_eq!(
            d(nested_tlb, 0x2, 0x10_0000, 0x10_0000 + 34 * 0x1_0000),
            Ok(RptInvalidate::Lpid {
                lpid: 5,
                ric: Ric::Tlb
            })
        );
        // Several sizes: the smallest decides the ceiling.
        assert_eq!(
            d(nested_tlb, 0x6, 0, 34 * 0x1_0000),
            Ok(RptInvalidate::Lpid {
                lpid: 5,
                ric: Ric::Tlb
            })
        );
        let Ok(RptInvalidate::Pages { sizes, .. }) = d(nested_tlb, u64::MAX, 0, 0x1000) else {
            panic!()
        };
        assert_eq!(sizes, PageSize::ALL.to_vec());
    }

    const RIC2_LPID: u64 = 0x90000; // H_TLBIE_P1_ENC(2, 0, 1), as in the traces.

    #[test]
    fn tlbie_encoding_matches_the_traces() {
        assert_eq!(TlbieInstr::encode(2, false, true).0, RIC2_LPID);
        let i = TlbieInstr(RIC2_LPID);
        assert_eq!((i.ric(), i.prs(), i.radix()), (2, false, true));
        assert_eq!(
            TlbInvalidate::decode(RIC2_LPID, 0x73d, TlbieRb::INVAL_SET_LPID),
            Ok(TlbInvalidate::Lpid {
                lpid: 0x73d,
                ric: Ric::All
            })
        );
    }

    #[test]
    fn every_rejected_form_is_h_parameter() {
        let r = |ric, prs, radix| TlbieInstr::encode(ric, prs, radix).0;
        let cases = [
            (r(0, false, false), 0x800, HcallError::TlbieHash),
            (r(0, true, true), 0x800, HcallError::TlbieProcessScoped),
            (r(3, false, true), 0x800, HcallError::TlbieRic3),
            (r(0, false, true), 0x400, HcallError::TlbieIs1),
            (r(1, false, true), 0x0, HcallError::TlbiePageRic { ric: 1 }),
            (r(2, false, true), 0x0, HcallError::TlbiePageRic { ric: 2 }),
            (r(0, false, true), 3 << 5, HcallError::TlbieBadAp { ap: 3 }),
            (r(0, false, true), 7 << 5, HcallError::TlbieBadAp { ap: 7 }),
        ];
        for (instr, rb, want) in cases {
            let got = TlbInvalidate::decode(instr, 5, rb);
            assert_eq!(got, Err(want), "instr {instr:#x} rb {rb:#x}");
            assert_eq!(want.papr(), H_PARAMETER);
        }
    }

    #[test]
    fn accepted_forms() {
        let r0 = TlbieInstr::encode(0, false, true).0;
        // One 64K page, AP 5, unaligned EPN.
        let t = TlbInvalidate::decode(r0, 0x1_0000_0007, 0x3b9a_7000 | (5 << 5)).unwrap();
        assert_eq!(
            t,
            TlbInvalidate::Page {
                lpid: 7,
                addr: 0x3b9a_7000,
                size: PageSize::P64K
            }
        );
        assert_eq!(
            t.page_range(),
            Some((NGpa::new(0x3b9a_0000).unwrap(), PageSize::P64K))
        );
        for (ap, size) in [(0, PageSize::P4K), (1, PageSize::P2M), (2, PageSize::P1G)] {
            let t = TlbInvalidate::decode(r0, 1, ap << 5).unwrap();
            assert!(matches!(t, TlbInvalidate::Page { size: s, .. } if s == size));
        }
        // Beyond the 52-bit space: accepted, nothing to do.
        let t = TlbInvalidate::decode(r0, 1, 0xFFF0_0000_0000_0000).unwrap();
        assert_eq!(t.page_range(), None);
        for (ric, want) in [(0, Ric::Tlb), (1, Ric::Pwc), (2, Ric::All)] {
            let i = TlbieInstr::encode(ric, false, true).0;
            assert_eq!(
                TlbInvalidate::decode(i, 9, 0x800),
                Ok(TlbInvalidate::Lpid { lpid: 9, ric: want })
            );
            assert_eq!(
                TlbInvalidate::decode(i, 9, 0xC00),
                Ok(TlbInvalidate::All { ric: want })
            );
        }
    }

    #[test]
    fn set_partition_table_checks() {
        let ram = |g: Gpa| g.0 < 0x1_0000_0000;
        assert_eq!(check_set_partition_table(Ptcr(0x10004), ram), Ok(()));
        assert_eq!(check_set_partition_table(Ptcr(0), ram), Ok(()));
        // Misaligned base (128 KiB table at 64 KiB) is accepted, as KVM does.
        assert_eq!(
            check_set_partition_table(Ptcr(0x10003 + 0x1_0000), ram),
            Ok(())
        );
        let e = check_set_partition_table(Ptcr(0x10005), ram).unwrap_err();
        assert_eq!(e, HcallError::TableTooLarge { pats: 5 });
        assert_eq!(e.papr(), H_PARAMETER);
        let e = check_set_partition_table(Ptcr(0x2_0000_0000 | 4), ram).unwrap_err();
        assert_eq!(e, HcallError::TableNotInMemory(Gpa(0x2_0000_0000)));
        assert_eq!(e.papr(), H_PARAMETER);
    }

    #[test]
    fn enter_nested_checks() {
        assert_eq!(
            check_enter_nested(Ptcr(0), 1).map_err(HcallError::papr),
            Err(H_NOT_AVAILABLE)
        );
        assert_eq!(
            check_enter_nested(Ptcr(0x10004), 0),
            Err(HcallError::LpidZero)
        );
        assert_eq!(check_enter_nested(Ptcr(0x10004), 4095), Ok(Lpid(4095)));
        assert_eq!(
            check_enter_nested(Ptcr(0x10003), 2048).map_err(HcallError::papr),
            Err(H_PARAMETER)
        );
        assert_eq!(check_enter_nested(Ptcr(0x10003), 2047), Ok(Lpid(2047)));
        // A larger table (set through ONE_REG) still cannot name more than 12 bits.
        assert!(check_enter_nested(Ptcr(0x10008), 4096).is_err());
        assert_eq!(HcallError::NestingDisabled.papr(), H_FUNCTION);
    }
}
