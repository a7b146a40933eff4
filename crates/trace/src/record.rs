//! Typed trace records.
//!
//! Invariants:
//! * Every record is `Copy` and fixed-size: parsing never allocates per line.
//! * Register positions follow the PAPR hcall ABI: `args[i]` is `r(4 + i)` on entry and
//!   `Expected::outs[i]` is `r(4 + i)` on return, exactly as the hypervisor reads and
//!   writes them. Registers a record does not name are 0 (inputs) or absent (outputs,
//!   bit `i` of [`Expected::present`] clear).
//! * A [`HcallKind`] always maps to exactly one PAPR opcode and one trace name.

use core::fmt;

/// The hypercalls a trace can record, by PAPR name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HcallKind {
    /// `H_REMOVE` (0x04).
    Remove,
    /// `H_ENTER` (0x08).
    Enter,
    /// `H_READ` (0x0c).
    Read,
    /// `H_CLEAR_MOD` (0x10).
    ClearMod,
    /// `H_CLEAR_REF` (0x14).
    ClearRef,
    /// `H_PROTECT` (0x18).
    Protect,
    /// `H_BULK_REMOVE` (0x124).
    BulkRemove,
    /// `H_RESIZE_HPT_PREPARE` (0x36c).
    ResizePrepare,
    /// `H_RESIZE_HPT_COMMIT` (0x370).
    ResizeCommit,
}

impl HcallKind {
    /// Every kind, in opcode order.
    pub const ALL: [HcallKind; 9] = [
        HcallKind::Remove,
        HcallKind::Enter,
        HcallKind::Read,
        HcallKind::ClearMod,
        HcallKind::ClearRef,
        HcallKind::Protect,
        HcallKind::BulkRemove,
        HcallKind::ResizePrepare,
        HcallKind::ResizeCommit,
    ];

    /// The PAPR opcode (the value the guest puts in r3).
    #[inline]
    pub const fn opcode(self) -> u64 {
        match self {
            HcallKind::Remove => 0x04,
            HcallKind::Enter => 0x08,
            HcallKind::Read => 0x0c,
            HcallKind::ClearMod => 0x10,
            HcallKind::ClearRef => 0x14,
            HcallKind::Protect => 0x18,
            HcallKind::BulkRemove => 0x124,
            HcallKind::ResizePrepare => 0x36c,
            HcallKind::ResizeCommit => 0x370,
        }
    }

    /// The kind whose opcode is `opcode`, if any.
    pub fn from_opcode(opcode: u64) -> Option<HcallKind> {
        HcallKind::ALL.into_iter().find(|k| k.opcode() == opcode)
    }

    /// The PAPR name, as written in traces (`H_ENTER`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            HcallKind::Remove => "H_REMOVE",
            HcallKind::Enter => "H_ENTER",
            HcallKind::Read => "H_READ",
            HcallKind::ClearMod => "H_CLEAR_MOD",
            HcallKind::ClearRef => "H_CLEAR_REF",
            HcallKind::Protect => "H_PROTECT",
            HcallKind::BulkRemove => "H_BULK_REMOVE",
            HcallKind::ResizePrepare => "H_RESIZE_HPT_PREPARE",
            HcallKind::ResizeCommit => "H_RESIZE_HPT_COMMIT",
        }
    }

    /// Whether this is one of the HPT resize hypercalls (PREPARE or COMMIT).
    #[inline]
    pub const fn is_resize(self) -> bool {
        matches!(self, HcallKind::ResizePrepare | HcallKind::ResizeCommit)
    }
}

impl fmt::Display for HcallKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the recording hypervisor returned for one hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Expected {
    /// The PAPR return code (r3), sign-extended.
    pub ret: i64,
    /// Output registers: `outs[i]` is `r(4 + i)`; meaningful only where `present` has bit `i`.
    pub outs: [u64; 8],
    /// Bit `i` set: the trace recorded `outs[i]` and it must be compared.
    pub present: u8,
}

impl Expected {
    /// Number of recorded output registers.
    #[inline]
    pub const fn nouts(&self) -> u32 {
        self.present.count_ones()
    }

    /// The recorded value of output register `i` (`r(4 + i)`), if the trace has it.
    #[inline]
    pub fn out(&self, i: usize) -> Option<u64> {
        if i < 8 && self.present & (1 << i) != 0 {
            Some(self.outs[i])
        } else {
            None
        }
    }
}

/// One recorded hypercall and its recorded result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hcall {
    /// 1-based line number in the trace file.
    pub line: u64,
    /// The vCPU that issued the call (`cpu=`).
    pub cpu: u32,
    /// Which hypercall.
    pub kind: HcallKind,
    /// Input registers: `args[i]` is `r(4 + i)`; registers past `nargs` are 0.
    pub args: [u64; 8],
    /// Number of input registers the record names (r4 .. r(4 + nargs - 1)).
    pub nargs: u8,
    /// The recorded result.
    pub expected: Expected,
}

impl Hcall {
    /// The PAPR opcode.
    #[inline]
    pub const fn opcode(&self) -> u64 {
        self.kind.opcode()
    }

    /// The input registers the record names, r4 first.
    #[inline]
    pub fn args(&self) -> &[u64] {
        &self.args[..usize::from(self.nargs).min(8)]
    }
}

/// Which reference/change bit a `HW_SET_*` record says the MMU set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HwBit {
    /// `HW_SET_R`: the reference bit.
    Reference,
    /// `HW_SET_C`: the change bit.
    Change,
}

impl HwBit {
    /// The bit in HPTE dword 1 (PAPR: R is 0x100, C is 0x80).
    pub const fn mask(self) -> u64 {
        match self {
            HwBit::Reference => 0x100,
            HwBit::Change => 0x80,
        }
    }
}

/// One record of a trace (comments and console lines are not records; see
/// [`crate::Line`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// `HPT_ALLOC shift=S`: the hypervisor allocated a zeroed HPT of 2^S bytes.
    HptAlloc {
        /// 1-based line number.
        line: u64,
        /// log2 of the HPT size in bytes (the HPT order).
        shift: u32,
    },
    /// A hypercall with its inputs and recorded result.
    Hcall(Hcall),
    /// `HPT_SHIFT old=A new=B`: a resize commit succeeded; the HPT is now 2^B bytes.
    HptShift {
        /// 1-based line number.
        line: u64,
        /// Previous order.
        old: u32,
        /// New order.
        new: u32,
    },
    /// `HW_SET_R` / `HW_SET_C`: the MMU set R or C in an HPTE.
    HwSet(HwSet),
}

/// An `HW_SET_R` / `HW_SET_C` record: the MMU set R or C in an HPTE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwSet {
    /// 1-based line number.
    pub line: u64,
    /// Which bit.
    pub bit: HwBit,
    /// The HPTE index, as recorded (not range-checked by the parser).
    pub ptex: u64,
    /// Dword 1 of the HPTE as the MMU read it for the update (QEMU's
    /// `hpte_set_r/c(ptex, pte1)` argument), as recorded; the word afterwards is
    /// [`pte1_after`](Self::pte1_after).
    pub pte1: u64,
}

impl HwSet {
    /// Dword 1 of the HPTE after the update: `pte1` with the bit set.
    pub const fn pte1_after(&self) -> u64 {
        self.pte1 | self.bit.mask()
    }
}

impl Record {
    /// The 1-based line number the record came from.
    pub const fn line(&self) -> u64 {
        match self {
            Record::HptAlloc { line, .. }
            | Record::HptShift { line, .. }
            | Record::HwSet(HwSet { line, .. }) => *line,
            Record::Hcall(h) => h.line,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_round_trip_and_match_papr() {
        assert_eq!(HcallKind::Enter.opcode(), 0x08);
        assert_eq!(HcallKind::BulkRemove.opcode(), 0x124);
        assert_eq!(HcallKind::ResizeCommit.opcode(), 0x370);
        for k in HcallKind::ALL {
            assert_eq!(HcallKind::from_opcode(k.opcode()), Some(k));
        }
        assert_eq!(HcallKind::from_opcode(0x1c), None);
    }

    #[test]
    fn hw_set_sets_papr_r_or_c_in_dword_1() {
        let hw = |bit| HwSet {
            line: 3,
            bit,
            ptex: 0x11,
            pte1: 0x190 & !0x180,
        };
        assert_eq!(hw(HwBit::Reference).pte1_after(), 0x110);
        assert_eq!(hw(HwBit::Change).pte1_after(), 0x090);
        let r = Record::HwSet(hw(HwBit::Change));
        assert_eq!(r.line(), 3);
    }

    #[test]
    fn expected_out_honours_present_mask() {
        let e = Expected {
            ret: 0,
            outs: [1, 2, 3, 4, 5, 6, 7, 8],
            present: 0b101,
        };
        assert_eq!(e.out(0), Some(1));
        assert_eq!(e.out(1), None);
        assert_eq!(e.out(2), Some(3));
        assert_eq!(e.out(9), None);
        assert_eq!(e.nouts(), 2);
    }
}
