//! Errors of the HPT crate: VM construction ([`HptError`]) and invariant violations
//! found by the whole-VM checker ([`Violation`]). Guest-facing failures are never Rust
//! errors: they are PAPR return codes in an `HcallResult` (see `hcall`).

use revmap_host::{MemslotError, SlotCheckError};
use revmap_rmap::ring::RmapViolation;
use revmap_rmap::RmapError;

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

/// A broken invariant found by `Vm::check_invariants` (numbers refer to
/// kvm-rmap-anatomy.md section E).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// Invariants 1, 2, 3 (bound), 5, 6 on the rmap words and rings.
    #[error("rmap: {0}")]
    Rmap(#[from] RmapViolation),
    /// Invariant 7: HVLOCK held at rest, or VALID and ABSENT both set.
    #[error("HPTE {ptex}: dword0 {v:#x} locked at rest or VALID|ABSENT")]
    BadSoftwareBits {
        /// HPTE index.
        ptex: u32,
        /// dword 0.
        v: u64,
    },
    /// Invariant 3/4: a chain member is not VALID.
    #[error("HPTE {ptex} is on a chain but not VALID (dword0 {v:#x})")]
    ChainedNotValid {
        /// HPTE index.
        ptex: u32,
        /// dword 0.
        v: u64,
    },
    /// Invariant 3/4/13: a chain member's guest gfn is not the frame of the chain.
    #[error("HPTE {ptex} maps gfn {gfn:#x} but is chained on frame {frame:#x}")]
    WrongChain {
        /// HPTE index.
        ptex: u32,
        /// gfn from guest_rpte.
        gfn: u64,
        /// gfn of the chain.
        frame: u64,
    },
    /// Invariant 4/6: a VALID memslot-backed HPTE on no chain, or chain totals differ.
    #[error("{valid} VALID memslot-backed HPTEs but {chained} chain members (first unchained: {first:?})")]
    ChainCount {
        /// VALID, memslot-backed HPTEs.
        valid: usize,
        /// Sum of chain lengths.
        chained: usize,
        /// First VALID HPTE not on a chain.
        first: Option<u32>,
    },
    /// Invariant 8: an MMIO (ABSENT, key 31) HPTE inside a memslot, or a paged-out one
    /// with key 31.
    #[error("HPTE {ptex}: ABSENT entry with key 31 maps RAM gfn {gfn:#x}")]
    Key31InRam {
        /// HPTE index.
        ptex: u32,
        /// Guest frame.
        gfn: u64,
    },
    /// Invariant 9: guest_rpte holds HPTE_GR_RESERVED (KVM flavour).
    #[error("HPTE {ptex}: guest_rpte {rpte:#x} has the reserved bit 62")]
    GuestReserved {
        /// HPTE index.
        ptex: u32,
        /// guest_rpte.
        rpte: u64,
    },
    /// Invariant 13: VALID entry larger than the backing page or in a misaligned slot,
    /// or a real RPN that is not the host page of the guest gfn.
    #[error("HPTE {ptex}: VALID mapping inconsistent with its memslot: {why}")]
    BadMapping {
        /// HPTE index.
        ptex: u32,
        /// What is wrong.
        why: &'static str,
    },
    /// A VALID entry whose page size does not decode.
    #[error("HPTE {ptex}: in-use entry with undecodable page size")]
    BadPageSize {
        /// HPTE index.
        ptex: u32,
    },
    /// An invalid (free) entry holding leftover bits the flavour never leaves behind.
    #[error("HPTE {ptex}: free entry holds v={v:#x} r={r:#x}")]
    DirtyFreeSlot {
        /// HPTE index.
        ptex: u32,
        /// dword 0.
        v: u64,
        /// dword 1.
        r: u64,
    },
    /// Memslot-level invariant (dirty bitmap shape, no dirty bits with logging off).
    #[error(transparent)]
    Memslot(#[from] SlotCheckError),
    /// Invariant 17: a VALID HPTE or a PRESENT rmap word for a frame of a flushed
    /// (INVALID, deleted or moved-away) memslot range.
    #[error("frame {gfn:#x} of a flushed memslot is still mapped")]
    NotFlushed {
        /// Guest frame.
        gfn: u64,
    },
    /// Invariant 16 (quiescence): a vCPU fault is still in flight.
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
