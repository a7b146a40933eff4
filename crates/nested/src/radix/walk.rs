//! The partition-scoped radix walk (`kvmppc_mmu_walk_radix_tree`) and its failure causes.
//!
//! [`walk`] translates an L2 real address through a radix tree that lives in guest
//! memory (read through [`GuestMemory`]), from a root given as a partition-table dw0.
//! Every failure is a typed [`WalkError`]; [`FaultCause`] names what L1 is told and
//! [`Exit`] builds the HDSI/HISI that carries it (HDSISR or SRR1 bits, and ASDR).
//!
//! The walk, from the root down (KVM's order):
//! 1. RTS from dw0 must give a 52-bit space;
//! 2. at each level: the table's NLS must be valid for the level, then its base must be
//!    aligned to its size, 2^(NLS+3) bytes;
//! 3. the entry at `index = (addr >> remaining) & (2^NLS - 1)` is read (8 bytes,
//!    big-endian); an unreadable entry is a page-table-access fault at its address;
//! 4. V = 0 is "no translation"; L = 1 ends the walk (not at the root); a directory at
//!    level 0 is unsupported; otherwise descend to NLB/NLS;
//! 5. at a leaf, the RPN must be aligned to the page size; the result is
//!    `(RPN & !(size - 1)) | (addr & (size - 1))`.
//!
//! | condition | [`WalkError`] | cause (HDSISR / SRR1 bit) |
//! |---|---|---|
//! | RTS != 21, bad NLS, misaligned table, root leaf, level-0 directory, misaligned RPN | `Unsupported` | `DSISR_UNSUPP_MMU` 0x0008_0000 |
//! | V = 0 | `NoTranslation` | `DSISR_NOHPTE` 0x4000_0000 |
//! | entry not in guest memory | `TableUnreadable` | `DSISR_PRTABLE_FAULT` 0x0002_0000, ASDR = entry |
//! | store without W, load without R or W | (access check) | `DSISR_PROTFAULT` 0x0800_0000 |
//! | fetch without X | (access check) | SRR1 `SRR1_ISI_N_G_OR_CIP` 0x1000_0000 |
//! | R missing, or C on a store | (R/C check) | `DSISR_SET_RC` 0x0004_0000 |
//!
//! KVM's tolerances are followed, not QEMU's (QEMU masks a misaligned base, accepts a
//! root leaf and does not check RPN alignment).

use super::entry::{RadixEntry, RadixPte};
use super::geometry::{Level, PageSize, RADIX_TREE_BITS};
use super::table::{Pate, PateDw0, PateDw1, Ptcr};
use crate::addr::NGpa;
use revmap_rmap::Gpa;

/// Reads guest-physical memory (for the nested MMU: L1's memory, where L1 keeps its
/// partition table and its tables for the L2s).
pub trait GuestMemory {
    /// The doubleword at `gpa` (8-aligned) as a big-endian load returns it, or `None` if
    /// any of its bytes is not guest RAM (KVM's `kvm_read_guest` failing).
    fn read_be_u64(&self, gpa: Gpa) -> Option<u64>;
}

impl<M: GuestMemory + ?Sized> GuestMemory for &M {
    #[inline]
    fn read_be_u64(&self, gpa: Gpa) -> Option<u64> {
        (**self).read_be_u64(gpa)
    }
}

/// The kind of an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// A load (`r` in traces).
    Load,
    /// A store (`w`).
    Store,
    /// An instruction fetch (`x`).
    Fetch,
}

/// HDSISR / DSISR cause bits (LSB-0 values, Linux names). HISI reports the same values in
/// SRR1 (HSRR1), where [`Dsisr::NOEXEC_OR_G`] is `SRR1_ISI_N_G_OR_CIP`.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Dsisr(pub u64);

impl Dsisr {
    /// No translation (`DSISR_NOHPTE`, IBM 33; `SRR1_ISI_NOPT`; QEMU `NOPTE`).
    pub const NOHPTE: u64 = 0x4000_0000;
    /// Fetch from no-execute or guarded storage (`SRR1_ISI_N_G_OR_CIP`,
    /// `DSISR_NOEXEC_OR_G`, IBM 35).
    pub const NOEXEC_OR_G: u64 = 0x1000_0000;
    /// Protection fault (`DSISR_PROTFAULT`, IBM 36).
    pub const PROTFAULT: u64 = 0x0800_0000;
    /// Bad access (`DSISR_BADACCESS`, IBM 37).
    pub const BADACCESS: u64 = 0x0400_0000;
    /// The access was a store (`DSISR_ISSTORE`, IBM 38).
    pub const ISSTORE: u64 = 0x0200_0000;
    /// Unsupported MMU configuration (`DSISR_UNSUPP_MMU`, IBM 44; QEMU `R_BADCONFIG`).
    pub const UNSUPP_MMU: u64 = 0x0008_0000;
    /// R/C must be set by software (`DSISR_SET_RC`, IBM 45; QEMU `DSISR_ATOMIC_RC`).
    pub const SET_RC: u64 = 0x0004_0000;
    /// A page-table access failed translation (`DSISR_PRTABLE_FAULT`, IBM 46).
    pub const PRTABLE_FAULT: u64 = 0x0002_0000;
    /// copy/paste to a bad address (`DSISR_BAD_COPYPASTE`, IBM 60).
    pub const BAD_COPYPASTE: u64 = 0x8;

    /// The raw value.
    #[inline(always)]
    pub const fn bits(self) -> u64 {
        self.0
    }
}

impl core::fmt::Debug for Dsisr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Dsisr({:#x})", self.0)
    }
}

/// Why a tree is an unsupported MMU configuration (all reported as `DSISR_UNSUPP_MMU`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Unsupported {
    /// RTS does not give a 52-bit space.
    #[error("tree size RTS {rts} ({} bits), only 52 bits exist", rts + 31)]
    TreeSize {
        /// The RTS found.
        rts: u32,
    },
    /// A table size not valid for its level.
    #[error("NLS {nls} not valid at level {level:?}")]
    BadNls {
        /// The level of the table.
        level: Level,
        /// The NLS found.
        nls: u32,
    },
    /// A table base not aligned to the table size.
    #[error("table at {base:#x} not aligned to its size (NLS {nls}) at level {level:?}")]
    MisalignedTable {
        /// The level of the table.
        level: Level,
        /// The base found.
        base: u64,
        /// The table's NLS.
        nls: u32,
    },
    /// A leaf in the root directory (KVM rejects 512 GiB pages).
    #[error("leaf in the root directory")]
    RootLeaf,
    /// A directory entry in a level-0 table.
    #[error("directory entry at level 0")]
    DirectoryAtLevel0,
    /// A leaf whose RPN is not aligned to its page size.
    #[error("leaf RPN {rpn:#x} not aligned to its {size:?} page")]
    MisalignedLeaf {
        /// The page size of the leaf.
        size: PageSize,
        /// The RPN found.
        rpn: u64,
    },
}

/// Why a walk failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WalkError {
    /// The tree is not a supported configuration (−EINVAL in KVM).
    #[error("unsupported radix tree: {0}")]
    Unsupported(Unsupported),
    /// An entry with V = 0 (−ENOENT in KVM).
    #[error("no translation (V = 0 at level {level:?})")]
    NoTranslation {
        /// The level of the invalid entry.
        level: Level,
    },
    /// A table entry is not in guest memory (−EFAULT in KVM).
    #[error("table entry at {entry} is not guest memory")]
    TableUnreadable {
        /// The guest address of the entry.
        entry: Gpa,
    },
}

impl WalkError {
    /// The cause this failure is reflected with.
    #[inline]
    pub const fn cause(self) -> FaultCause {
        match self {
            WalkError::Unsupported(_) => FaultCause::Unsupported,
            WalkError::NoTranslation { .. } => FaultCause::NoTranslation,
            WalkError::TableUnreadable { entry } => FaultCause::TableFault { entry },
        }
    }
}

/// What stops an access at a radix table, as the guest is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultCause {
    /// No translation: `NOHPTE`.
    NoTranslation,
    /// A load or store the EAA bits forbid: `PROTFAULT`.
    Protection,
    /// A fetch without EAA X: `SRR1_ISI_N_G_OR_CIP`.
    NoExecute,
    /// Unsupported configuration: `UNSUPP_MMU`.
    Unsupported,
    /// A table entry that cannot be read: `PRTABLE_FAULT`, ASDR = `entry`.
    TableFault {
        /// The entry's guest address.
        entry: Gpa,
    },
    /// R missing, or C missing on a store: `SET_RC`.
    SetRc,
}

impl FaultCause {
    /// The cause bit (HDSISR for loads and stores, SRR1 for fetches), without ISSTORE.
    #[inline]
    pub const fn bits(self) -> u64 {
        match self {
            FaultCause::NoTranslation => Dsisr::NOHPTE,
            FaultCause::Protection => Dsisr::PROTFAULT,
            FaultCause::NoExecute => Dsisr::NOEXEC_OR_G,
            FaultCause::Unsupported => Dsisr::UNSUPP_MMU,
            FaultCause::TableFault { .. } => Dsisr::PRTABLE_FAULT,
            FaultCause::SetRc => Dsisr::SET_RC,
        }
    }
}

/// A hypervisor storage interrupt, as H_ENTER_NESTED returns it to L1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Exit {
    /// HDSI (trap 0xE00): `hv_state.hdsisr` and `hv_state.asdr`.
    Hdsi {
        /// HDSISR: the cause, with ISSTORE for a store.
        hdsisr: Dsisr,
        /// ASDR: the page-aligned L2 address, or the failing entry's address.
        asdr: u64,
    },
    /// HISI (trap 0xE20): cause bits in the SRR1 image, `hv_state.asdr`.
    Hisi {
        /// The SRR1 cause bits (never ISSTORE).
        srr1: Dsisr,
        /// ASDR, as for HDSI.
        asdr: u64,
    },
}

impl Exit {
    /// Trap vector of an HDSI.
    pub const HDSI_TRAP: u64 = 0xE00;
    /// Trap vector of an HISI.
    pub const HISI_TRAP: u64 = 0xE20;

    /// The interrupt that reflects `cause` for `access` at L2 address `n_gpa`: HISI for a
    /// fetch, HDSI (with ISSTORE on a store) otherwise; ASDR is `n_gpa` rounded down to
    /// 4 KiB, or the entry address for a table fault.
    #[inline]
    pub const fn reflect(cause: FaultCause, access: Access, n_gpa: NGpa) -> Exit {
        let asdr = match cause {
            FaultCause::TableFault { entry } => entry.0,
            _ => n_gpa.raw() & !0xFFF,
        };
        match access {
            Access::Fetch => Exit::Hisi {
                srr1: Dsisr(cause.bits()),
                asdr,
            },
            Access::Load => Exit::Hdsi {
                hdsisr: Dsisr(cause.bits()),
                asdr,
            },
            Access::Store => Exit::Hdsi {
                hdsisr: Dsisr(cause.bits() | Dsisr::ISSTORE),
                asdr,
            },
        }
    }
    /// The trap vector H_ENTER_NESTED returns.
    #[inline]
    pub const fn trap(self) -> u64 {
        match self {
            Exit::Hdsi { .. } => Self::HDSI_TRAP,
            Exit::Hisi { .. } => Self::HISI_TRAP,
        }
    }
}

/// A successful walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The output address, offset included: `(RPN & !(size - 1)) | (addr & (size - 1))`.
    pub raddr: Gpa,
    /// The leaf.
    pub pte: RadixPte,
    /// Where the leaf lives (for R/C updates).
    pub pte_addr: Gpa,
    /// The leaf's page size.
    pub size: PageSize,
    /// The leaf's level.
    pub level: Level,
}

impl Translation {
    /// Whether the leaf's EAA bits permit `access`; else the cause to reflect
    /// (`Protection`, or `NoExecute` for a fetch).
    #[inline]
    pub const fn check_permission(&self, access: Access) -> Result<(), FaultCause> {
        if self.pte.permits(access) {
            Ok(())
        } else if matches!(access, Access::Fetch) {
            Err(FaultCause::NoExecute)
        } else {
            Err(FaultCause::Protection)
        }
    }
    /// Whether R (and C for a store) are already set; else `SetRc`.
    #[inline]
    pub const fn check_rc(&self, access: Access) -> Result<(), FaultCause> {
        if self.pte.rc_permits(access) {
            Ok(())
        } else {
            Err(FaultCause::SetRc)
        }
    }
}

/// Walks the tree rooted at `root` (a partition- or process-table dw0) for `addr`.
///
/// Reads each entry through `mem`; never writes (R/C are the caller's business).
pub fn walk<M: GuestMemory + ?Sized>(
    mem: &M,
    root: PateDw0,
    addr: NGpa,
) -> Result<Translation, WalkError> {
    if !root.is_52_bit() {
        return Err(WalkError::Unsupported(Unsupported::TreeSize {
            rts: root.rts(),
        }));
    }
    let a = addr.raw();
    let mut base = root.rpdb();
    let mut nls = root.rpds();
    let mut remaining = RADIX_TREE_BITS;
    let mut level = Level::Root;
    loop {
        if !level.nls_ok(nls) {
            return Err(WalkError::Unsupported(Unsupported::BadNls { level, nls }));
        }
        if base & ((1u64 << (nls + 3)) - 1) != 0 {
            return Err(WalkError::Unsupported(Unsupported::MisalignedTable {
                level,
                base,
                nls,
            }));
        }
        // nls <= 13 and the level sizes sum to at most 52 - 12, so this never underflows.
        remaining -= nls;
        let index = (a >> remaining) & ((1u64 << nls) - 1);
        let entry = Gpa(base + 8 * index);
        let Some(raw) = mem.read_be_u64(entry) else {
            return Err(WalkError::TableUnreadable { entry });
        };
        match RadixEntry::decode(raw) {
            RadixEntry::Invalid(_) => return Err(WalkError::NoTranslation { level }),
            RadixEntry::Leaf(pte) => {
                if level == Level::Root {
                    return Err(WalkError::Unsupported(Unsupported::RootLeaf));
                }
                // A leaf below the root: remaining is 30, 21, 16 or 12.
                let Some(size) = PageSize::from_shift(remaining) else {
                    return Err(WalkError::Unsupported(Unsupported::BadNls { level, nls }));
                };
                let mask = size.bytes() - 1;
                if pte.rpn() & mask != 0 {
                    return Err(WalkError::Unsupported(Unsupported::MisalignedLeaf {
                        size,
                        rpn: pte.rpn(),
                    }));
                }
                return Ok(Translation {
                    raddr: Gpa((pte.rpn() & !mask) | (a & mask)),
                    pte,
                    pte_addr: entry,
                    size,
                    level,
                });
            }
            RadixEntry::Directory(pde) => {
                let Some(next) = level.below() else {
                    return Err(WalkError::Unsupported(Unsupported::DirectoryAtLevel0));
                };
                base = pde.nlb();
                nls = pde.nls();
                level = next;
            }
        }
    }
}

/// Reads `lpid`'s partition-table entry as KVM's `kvmhv_update_ptbl_cache` does: through
/// the current `ptcr`, [`Pate::EMPTY`] if `lpid` is outside the table (2^(PATS+8)
/// entries) or any of its 16 bytes is not guest memory.
pub fn read_pate<M: GuestMemory + ?Sized>(mem: &M, ptcr: Ptcr, lpid: u64) -> Pate {
    let Some(addr) = ptcr.entry_addr(lpid) else {
        return Pate::EMPTY;
    };
    match (mem.read_be_u64(Gpa(addr)), mem.read_be_u64(Gpa(addr + 8))) {
        (Some(dw0), Some(dw1)) => Pate {
            dw0: PateDw0(dw0),
            dw1: PateDw1(dw1),
        },
        _ => Pate::EMPTY,
    }
}
