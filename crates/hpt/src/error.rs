//! Errors of the HPT crate: VM construction ([`HptError`]) and invariant violations
//! found by the whole-VM checker ([`Violation`]). Guest-facing failures are never Rust
//! errors: they are PAPR return codes in an `HcallResult` (see `hcall`).

use revmap_host::{MemslotError, SlotCheckError};
use revmap_rmap::ring::RmapViolation;
use revmap_rmap::{Ptex, RmapError};

/// Why a VM or HPT could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HptError {
    /// Order outside PAPR's 18..=46.
    #[error("HPT order {order} outside 18..=46")]
    BadOrder {
        /// The order.
        order: u32,
    },
    /// Order in 37..=46: legal in PAPR but more HPTEs than 32-bit revmap links index.
    #[error("HPT order {order} above 36: 2^{} HPTEs do not fit 32-bit revmap links", order - 4)]
    OrderTooLargeForLinks {
        /// The order.
        order: u32,
    },
    /// Guest RAM size is zero or not a multiple of 4 KiB.
    #[error("guest RAM of {bytes:#x} bytes is empty or not 4 KiB aligned")]
    BadRamSize {
        /// Requested bytes.
        bytes: u64,
    },
    /// The memslot could not be created.
    #[error(transparent)]
    Memslot(#[from] MemslotError),
    /// Table allocation failed.
    #[error(transparent)]
    Alloc(#[from] RmapError),
    /// All vCPU MMU slots are taken.
    #[error("no free vCPU MMU slot (at most {max})")]
    TooManyVcpus {
        /// The limit.
        max: usize,
    },
}

/// A broken invariant found by `Vm::check_invariants`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// rmap words and rings: layout bits only, PRESENT iff the chain is non-empty, the
    /// head index in range, ring links consistent, no index twice.
    #[error("rmap: {0}")]
    Rmap(#[from] RmapViolation),
    /// HVLOCK held at rest, or VALID and ABSENT both set.
    #[error("HPTE {ptex}: dword0 {v:#x} locked at rest or VALID|ABSENT")]
    BadSoftwareBits {
        /// HPTE index.
        ptex: Ptex,
        /// dword 0.
        v: u64,
    },
    /// A chain member is not VALID.
    #[error("HPTE {ptex} is on a chain but not VALID (dword0 {v:#x})")]
    ChainedNotValid {
        /// HPTE index.
        ptex: Ptex,
        /// dword 0.
        v: u64,
    },
    /// A chain member's guest gfn is not the frame of the chain.
    #[error("HPTE {ptex} maps gfn {gfn:#x} but is chained on frame {frame:#x}")]
    WrongChain {
        /// HPTE index.
        ptex: Ptex,
        /// gfn from guest_rpte.
        gfn: u64,
        /// gfn of the chain.
        frame: u64,
    },
    /// A VALID memslot-backed HPTE on no chain, or chain totals differ.
    #[error("{valid} VALID memslot-backed HPTEs but {chained} chain members (first unchained: {first:?})")]
    ChainCount {
        /// VALID, memslot-backed HPTEs.
        valid: usize,
        /// Sum of chain lengths.
        chained: usize,
        /// First VALID HPTE not on a chain.
        first: Option<Ptex>,
    },
    /// An MMIO (ABSENT, key 31) HPTE inside a memslot, or a paged-out one
    /// with key 31.
    #[error("HPTE {ptex}: ABSENT entry with key 31 maps RAM gfn {gfn:#x}")]
    Key31InRam {
        /// HPTE index.
        ptex: Ptex,
        /// Guest frame.
        gfn: u64,
    },
    /// guest_rpte holds HPTE_GR_RESERVED (KVM flavour).
    #[error("HPTE {ptex}: guest_rpte {rpte:#x} has the reserved bit 62")]
    GuestReserved {
        /// HPTE index.
        ptex: Ptex,
        /// guest_rpte.
        rpte: u64,
    },
    /// VALID entry larger than the backing page or in a misaligned slot,
    /// or a real RPN that is not the host page of the guest gfn.
    #[error("HPTE {ptex}: VALID mapping inconsistent with its memslot: {why}")]
    BadMapping {
        /// HPTE index.
        ptex: Ptex,
        /// What is wrong.
        why: &'static str,
    },
    /// A VALID entry whose page size does not decode.
    #[error("HPTE {ptex}: in-use entry with undecodable page size")]
    BadPageSize {
        /// HPTE index.
        ptex: Ptex,
    },
    /// An invalid (free) entry holding leftover bits the flavour never leaves behind.
    #[error("HPTE {ptex}: free entry holds v={v:#x} r={r:#x}")]
    DirtyFreeSlot {
        /// HPTE index.
        ptex: Ptex,
        /// dword 0.
        v: u64,
        /// dword 1.
        r: u64,
    },
    /// Memslot-level invariant (dirty bitmap shape, no dirty bits with logging off).
    #[error(transparent)]
    Memslot(#[from] SlotCheckError),
    /// A VALID HPTE or a PRESENT rmap word for a frame of a flushed
    /// (INVALID, deleted or moved-away) memslot range.
    #[error("frame {gfn:#x} of a flushed memslot is still mapped")]
    NotFlushed {
        /// Guest frame.
        gfn: u64,
    },
    /// Quiescence (with `mmu_ready` clear no fault may turn an entry VALID): a vCPU fault
    /// is still in flight.
    #[error("a vCPU fault is in flight at a quiescent point")]
    FaultInFlight,
}

/// Why a host-side operation (memslot lifecycle, dirty log) failed. Host callers are
/// the VMM and its threads, not the guest: bad arguments are errors here, never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// No memslot with this id.
    #[error("no memslot {id:?}")]
    NoSuchSlot {
        /// The id.
        id: revmap_rmap::SlotId,
    },
    /// The flags contain bits userspace may not set (INVALID, unknown bits) or change
    /// (READONLY after creation, as KVM's `-EINVAL`).
    #[error("memslot flags {flags:#x} not allowed here")]
    BadFlags {
        /// The raw flags.
        flags: u32,
    },
    /// The slot could not be created or moved (size, alignment, overlap, allocation).
    #[error(transparent)]
    Memslot(#[from] MemslotError),
    /// KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG on a slot without dirty logging
    /// (KVM's `-ENOENT`).
    #[error("dirty logging is off for memslot {id:?}")]
    DirtyLogDisabled {
        /// The slot.
        id: revmap_rmap::SlotId,
    },
    /// KVM_CLEAR_DIRTY_LOG outside the slot or with an unaligned first page
    /// (KVM's `-EINVAL`).
    #[error(
        "dirty-log range of {len} words from page {first_page} is outside the slot or unaligned"
    )]
    BadDirtyRange {
        /// First page.
        first_page: u64,
        /// Number of bitmap words.
        len: usize,
    },
    /// Memory for a result could not be reserved.
    #[error(transparent)]
    Alloc(#[from] RmapError),
}

/// Declares [`PaprError`] and its one table of PAPR return codes: each variant is
/// listed once with its `hcall` constant, and [`PaprError::code`],
/// [`PaprError::from_code`] and [`PaprError::ALL`] are generated from that list.
macro_rules! papr_errors {
    ($( $(#[$doc:meta])* $variant:ident = $code:ident, $msg:literal; )*) => {
        /// A PAPR hypercall failure (or non-success status): every PAPR return code
        /// other than `H_SUCCESS`, as returned in r3 by QEMU's `spapr_hcall.c` and
        /// KVM's `book3s_hv_rm_mmu.c`.
        ///
        /// The register-level API ([`Vm::hcall_regs`](crate::Vm::hcall_regs)) returns
        /// [`code`](Self::code)s; the typed API (`Vm::h_enter`, ...) returns this enum.
        /// The two are converted through one table, so they cannot drift apart.
        ///
        /// Each variant's discriminant is its return code, so [`code`](Self::code) is
        /// a plain read of the value (the hypercall hot path converts every result).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
        #[non_exhaustive]
        #[repr(i64)]
        pub enum PaprError {
            $(
                $(#[$doc])*
                #[error($msg)]
                $variant = crate::hcall::$code,
            )*
        }

        impl PaprError {
            /// Every variant, in table order.
            pub const ALL: &'static [PaprError] = &[$(PaprError::$variant),*];

            /// The PAPR return code (r3).
            #[inline]
            pub const fn code(self) -> i64 {
                self as i64
            }

            /// The error of a PAPR return code; `None` for `H_SUCCESS` and for codes
            /// PAPR does not define.
            #[inline]
            pub const fn from_code(code: i64) -> Option<PaprError> {
                match code {
                    $(crate::hcall::$code => Some(PaprError::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

papr_errors! {
    /// `H_BUSY`: try again.
    Busy = H_BUSY, "H_BUSY: hardware busy, retry";
    /// `H_CLOSED`: resize commit without a matching completed prepare.
    Closed = H_CLOSED, "H_CLOSED: no matching pending request";
    /// `H_NOT_AVAILABLE`.
    NotAvailable = H_NOT_AVAILABLE, "H_NOT_AVAILABLE";
    /// `H_CONSTRAINED`.
    Constrained = H_CONSTRAINED, "H_CONSTRAINED";
    /// `H_PARTIAL`.
    Partial = H_PARTIAL, "H_PARTIAL";
    /// `H_IN_PROGRESS`.
    InProgress = H_IN_PROGRESS, "H_IN_PROGRESS";
    /// `H_PAGE_REGISTERED`.
    PageRegistered = H_PAGE_REGISTERED, "H_PAGE_REGISTERED";
    /// `H_PARTIAL_STORE`.
    PartialStore = H_PARTIAL_STORE, "H_PARTIAL_STORE";
    /// `H_PENDING`.
    Pending = H_PENDING, "H_PENDING";
    /// `H_CONTINUE`.
    Continue = H_CONTINUE, "H_CONTINUE";
    /// `H_LONG_BUSY_ORDER_1_MSEC`: retry in about 1 ms (a resize prepare in progress).
    LongBusy1Msec = H_LONG_BUSY_ORDER_1_MSEC, "H_LONG_BUSY_ORDER_1_MSEC: retry in ~1 ms";
    /// `H_LONG_BUSY_ORDER_10_MSEC`.
    LongBusy10Msec = H_LONG_BUSY_ORDER_10_MSEC, "H_LONG_BUSY_ORDER_10_MSEC: retry in ~10 ms";
    /// `H_LONG_BUSY_ORDER_100_MSEC`.
    LongBusy100Msec = H_LONG_BUSY_ORDER_100_MSEC, "H_LONG_BUSY_ORDER_100_MSEC: retry in ~100 ms";
    /// `H_LONG_BUSY_ORDER_1_SEC`.
    LongBusy1Sec = H_LONG_BUSY_ORDER_1_SEC, "H_LONG_BUSY_ORDER_1_SEC: retry in ~1 s";
    /// `H_LONG_BUSY_ORDER_10_SEC`.
    LongBusy10Sec = H_LONG_BUSY_ORDER_10_SEC, "H_LONG_BUSY_ORDER_10_SEC: retry in ~10 s";
    /// `H_LONG_BUSY_ORDER_100_SEC`.
    LongBusy100Sec = H_LONG_BUSY_ORDER_100_SEC, "H_LONG_BUSY_ORDER_100_SEC: retry in ~100 s";
    /// `H_TOO_HARD`: KVM-internal "redo in virtual mode", never seen by a guest.
    TooHard = H_TOO_HARD, "H_TOO_HARD: redo in virtual mode";
    /// `H_HARDWARE`: hardware (or host) error.
    Hardware = H_HARDWARE, "H_HARDWARE: hardware error";
    /// `H_FUNCTION`: the hypercall is not supported.
    Function = H_FUNCTION, "H_FUNCTION: function not supported";
    /// `H_PRIVILEGE`.
    Privilege = H_PRIVILEGE, "H_PRIVILEGE: privilege error";
    /// `H_PARAMETER`: a bad argument (index outside the table, bad flags, ...).
    Parameter = H_PARAMETER, "H_PARAMETER: bad parameter";
    /// `H_BAD_MODE`.
    BadMode = H_BAD_MODE, "H_BAD_MODE: bad mode";
    /// `H_PTEG_FULL`: no free slot in the PTEG (H_ENTER).
    PtegFull = H_PTEG_FULL, "H_PTEG_FULL: no free slot in the PTEG";
    /// `H_NOT_FOUND`: no matching entry.
    NotFound = H_NOT_FOUND, "H_NOT_FOUND: no matching entry";
    /// `H_RESERVED_DABR`.
    ReservedDabr = H_RESERVED_DABR, "H_RESERVED_DABR";
    /// `H_NO_MEM`: the hypervisor is out of memory.
    NoMem = H_NO_MEM, "H_NO_MEM: out of memory";
    /// `H_AUTHORITY`.
    Authority = H_AUTHORITY, "H_AUTHORITY: not authorised";
    /// `H_PERMISSION`.
    Permission = H_PERMISSION, "H_PERMISSION: permission denied";
    /// `H_RESOURCE`: a resource is in use (resize while one is committing).
    Resource = H_RESOURCE, "H_RESOURCE: resource busy";
}

impl PaprError {
    /// `Ok(())` for `H_SUCCESS`, the error of any other PAPR code, and
    /// [`PaprError::Hardware`] for a code PAPR does not define (which no hypercall of
    /// this crate returns).
    #[inline]
    pub const fn check(code: i64) -> Result<(), PaprError> {
        if code == crate::hcall::H_SUCCESS {
            return Ok(());
        }
        match PaprError::from_code(code) {
            Some(e) => Err(e),
            None => Err(PaprError::Hardware),
        }
    }

    /// The register-level return code of a result: `H_SUCCESS` or the error's code.
    #[inline(always)]
    pub const fn code_of(r: Result<(), PaprError>) -> i64 {
        match r {
            Ok(()) => crate::hcall::H_SUCCESS,
            Err(e) => e.code(),
        }
    }

    /// `H_IS_LONG_BUSY`: one of the `H_LONG_BUSY_ORDER_*` "retry later" answers.
    #[inline]
    pub const fn is_long_busy(self) -> bool {
        crate::hcall::is_long_busy(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hcall::*;

    /// Every PAPR return code `hcall` defines, success included.
    const CODES: &[i64] = &[
        H_SUCCESS,
        H_BUSY,
        H_CLOSED,
        H_NOT_AVAILABLE,
        H_CONSTRAINED,
        H_PARTIAL,
        H_IN_PROGRESS,
        H_PAGE_REGISTERED,
        H_PARTIAL_STORE,
        H_PENDING,
        H_CONTINUE,
        H_LONG_BUSY_ORDER_1_MSEC,
        H_LONG_BUSY_ORDER_10_MSEC,
        H_LONG_BUSY_ORDER_100_MSEC,
        H_LONG_BUSY_ORDER_1_SEC,
        H_LONG_BUSY_ORDER_10_SEC,
        H_LONG_BUSY_ORDER_100_SEC,
        H_TOO_HARD,
        H_HARDWARE,
        H_FUNCTION,
        H_PRIVILEGE,
        H_PARAMETER,
        H_BAD_MODE,
        H_PTEG_FULL,
        H_NOT_FOUND,
        H_RESERVED_DABR,
        H_NO_MEM,
        H_AUTHORITY,
        H_PERMISSION,
        H_RESOURCE,
    ];

    #[test]
    fn every_error_round_trips_through_its_code() {
        for &e in PaprError::ALL {
            assert_ne!(e.code(), H_SUCCESS, "{e:?}");
            assert_eq!(PaprError::from_code(e.code()), Some(e), "{e:?}");
            assert_eq!(PaprError::check(e.code()), Err(e));
            assert_eq!(PaprError::code_of(Err(e)), e.code());
        }
    }

    #[test]
    fn every_papr_code_has_exactly_one_error() {
        for &c in CODES {
            match PaprError::from_code(c) {
                None => assert_eq!(c, H_SUCCESS),
                Some(e) => assert_eq!(e.code(), c),
            }
        }
        // The table is a bijection onto the non-success codes.
        assert_eq!(PaprError::ALL.len(), CODES.len() - 1);
        for (i, a) in PaprError::ALL.iter().enumerate() {
            for b in &PaprError::ALL[i + 1..] {
                assert_ne!(a.code(), b.code(), "{a:?} and {b:?} share a code");
            }
        }
    }

    #[test]
    fn success_and_unknown_codes() {
        assert_eq!(PaprError::from_code(H_SUCCESS), None);
        assert_eq!(PaprError::check(H_SUCCESS), Ok(()));
        assert_eq!(PaprError::code_of(Ok(())), H_SUCCESS);
        for unknown in [6, 13, 19, 9906, -12, -17, i64::MIN, i64::MAX] {
            assert_eq!(PaprError::from_code(unknown), None, "{unknown}");
            assert_eq!(PaprError::check(unknown), Err(PaprError::Hardware));
        }
        assert!(PaprError::LongBusy100Sec.is_long_busy());
        assert!(!PaprError::Busy.is_long_busy());
        assert_eq!(PaprError::PtegFull.code(), -6);
        assert_eq!(PaprError::Resource.code(), -16);
    }
}
