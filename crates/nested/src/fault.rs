//! The pure computations of the nested page fault (`__kvmhv_nested_page_fault`) that
//! need no host layer: L0's leaf for an L1 page, the shadow leaf derived from L0's and
//! L1's leaves (permissions, R/C, size, sub-page RPN), the nested-rmap key, and the
//! SET_RC decision.
//!
//! Rules (`kvmppc_book3s_instantiate_page`, `__kvmhv_nested_page_fault`):
//! * L0's partition-scoped leaf for L1 always has R; a write fault (or an upgraded write)
//!   gets EAA W and C together, any other fault drops both, so the first store faults
//!   again (how dirty logging sees writes). Read and execute are granted.
//! * The shadow leaf is L0's leaf with READ removed unless L1 may read, WRITE unless L1
//!   may write, EXEC unless L1 may execute, R unless L1's leaf has R, and C unless L1's
//!   leaf has C **and** the access is a store. So no shadow leaf grants more than both
//!   (no amplification).
//! * An L1 leaf smaller than L0's PAGE_SIZE is unsupported (KVM's −EINVAL).
//! * Size: when L0's leaf is larger than L1's, the shadow leaf is PAGE_SIZE (KVM picks
//!   PMD size only when PMD_SHIFT < L1's shift, which no larger L0 leaf allows) and the
//!   RPN gains the L1-address bits [PAGE_SHIFT, L0 shift) to select the sub-page;
//!   otherwise it is L0's size. The L2 address is rounded down to it.
//! * The nested-rmap entry is (l1_lpid, shadow base) at the rmap word of the L1 page
//!   rounded down to **L0's** leaf ("Align gfn to L1 page size when inserting nest-rmap
//!   entry").
//! * On a SET_RC fault, L0 sets R (and C for a store) in its own leaf and the shadow leaf
//!   only if L1's leaf already has them; otherwise the fault goes back to L1.

use crate::addr::NGpa;
use crate::radix::{Access, FaultCause, PageSize, RadixPte, Translation};
use revmap_rmap::{Gpa, Lpid, NestedError, NestedRmapEntry};

/// log2 of a PMD (level-1) leaf.
pub const PMD_SHIFT: u32 = 21;

/// Why no shadow leaf can be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShadowError {
    /// L1's leaf is smaller than L0's PAGE_SIZE (4 KiB L1 pages on a 64 KiB L0).
    #[error("L1 leaf of {l1:?} is smaller than L0's {page:?} pages")]
    L1LeafTooSmall {
        /// L1's leaf size.
        l1: PageSize,
        /// L0's PAGE_SIZE.
        page: PageSize,
    },
    /// L0's leaf is smaller than its own PAGE_SIZE (a malformed input).
    #[error("L0 leaf of {l0:?} is smaller than L0's {page:?} pages")]
    L0LeafTooSmall {
        /// L0's leaf size.
        l0: PageSize,
        /// L0's PAGE_SIZE.
        page: PageSize,
    },
    /// The nested-rmap entry cannot be encoded (LPID 0).
    #[error(transparent)]
    Rmap(#[from] NestedError),
}

/// L0's partition-scoped leaf for an L1 page (`kvmppc_book3s_instantiate_page`): the
/// host page at `hpa` of `size`, with R, read and execute; W and C only for a write.
pub const fn l0_leaf_for_l1(hpa: u64, write: bool) -> RadixPte {
    let base = RadixPte::R | RadixPte::EAA_READ | RadixPte::EAA_X;
    if write {
        RadixPte::new(hpa, base | RadixPte::EAA_RW | RadixPte::C)
    } else {
        RadixPte::new(hpa, base)
    }
}

/// L0's leaf for L1 as the fault path finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L0Leaf {
    /// The leaf.
    pub pte: RadixPte,
    /// Its size.
    pub size: PageSize,
}

/// A shadow leaf ready to be installed, with its nested-rmap entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowLeaf {
    /// The shadow PTE (its RPN is the host page of this leaf).
    pub pte: RadixPte,
    /// Its size.
    pub size: PageSize,
    /// The L2 address of the leaf's base.
    pub n_gpa: NGpa,
    /// The L1 address whose rmap word holds the entry: the L1 page rounded down to L0's
    /// leaf.
    pub rmap_base: Gpa,
    /// The nested-rmap entry (l1_lpid, `n_gpa`).
    pub rmap_entry: NestedRmapEntry,
}

/// Derives the shadow leaf for an L2 `access` at `n_gpa` (`__kvmhv_nested_page_fault`). `l1` is the
/// walk of L1's table (its `raddr` is the L1 address of the access), `l0` L0's leaf for
/// that L1 address, `page` L0's PAGE_SIZE.
pub fn shadow_leaf(
    l0: L0Leaf,
    l1: &Translation,
    n_gpa: NGpa,
    access: Access,
    page: PageSize,
    l1_lpid: Lpid,
) -> Result<ShadowLeaf, ShadowError> {
    if l1.size < page {
        return Err(ShadowError::L1LeafTooSmall { l1: l1.size, page });
    }
    if l0.size < page {
        return Err(ShadowError::L0LeafTooSmall { l0: l0.size, page });
    }
    let l1pte = l1.pte;
    let mut bits = l0.pte.bits();
    if !l1pte.may_read() {
        bits &= !RadixPte::EAA_READ;
    }
    if !l1pte.may_write() {
        bits &= !RadixPte::EAA_RW;
    }
    if !l1pte.may_execute() {
        bits &= !RadixPte::EAA_X;
    }
    if !l1pte.referenced() {
        bits &= !RadixPte::R;
    }
    if !(l1pte.changed() && access == Access::Store) {
        bits &= !RadixPte::C;
    }
    let l1gpa = l1.raddr.0;
    let size = if l0.size > l1.size {
        let actual = if PMD_SHIFT < l1.size.shift() {
            PageSize::P2M
        } else {
            page
        };
        let mask = l0.size.bytes() - actual.bytes();
        bits |= l1gpa & mask;
        actual
    } else {
        l0.size
    };
    let n_base = n_gpa.align_down(size.bytes());
    Ok(ShadowLeaf {
        pte: RadixPte(bits),
        size,
        n_gpa: n_base,
        rmap_base: Gpa(l0.size.align_down(l1gpa)),
        rmap_entry: NestedRmapEntry::new(l1_lpid, Gpa(n_base.raw()))?,
    })
}

/// The SET_RC decision (`__kvmhv_nested_page_fault`): the R/C bits L0 may set in its own leaf and in the
/// shadow leaf for `access`, or `SetRc` if L1's leaf lacks them (L1 must set its own).
pub const fn rc_to_set(l1pte: RadixPte, access: Access) -> Result<u64, FaultCause> {
    if !l1pte.rc_permits(access) {
        return Err(FaultCause::SetRc);
    }
    Ok(match access {
        Access::Store => RadixPte::R | RadixPte::C,
        _ => RadixPte::R,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::radix::Level;

    fn l1(raddr: u64, size: PageSize, flags: u64) -> Translation {
        Translation {
            raddr: Gpa(raddr),
            pte: RadixPte::new(size.align_down(raddr), flags),
            pte_addr: Gpa(0x1000),
            size,
            level: Level::Pte,
        }
    }

    fn n() -> NGpa {
        NGpa::new(0x3b9a_6018).unwrap()
    }

    const ALL: u64 =
        RadixPte::R | RadixPte::C | RadixPte::EAA_READ | RadixPte::EAA_RW | RadixPte::EAA_X;

    #[test]
    fn l0_leaf_gets_w_and_c_only_on_write() {
        let r = l0_leaf_for_l1(0x7_0000, false);
        assert!(
            r.referenced() && !r.changed() && !r.may_write() && r.may_read() && r.may_execute()
        );
        let w = l0_leaf_for_l1(0x7_0000, true);
        assert!(w.referenced() && w.changed() && w.may_write());
        assert_eq!(w.rpn(), 0x7_0000);
    }

    #[test]
    fn shadow_grants_the_intersection() {
        let l0 = L0Leaf {
            pte: l0_leaf_for_l1(0x50_0000, true),
            size: PageSize::P64K,
        };
        // L1: read-only, R set, C set.
        let t = l1(
            0x1_0000_6018,
            PageSize::P64K,
            RadixPte::R | RadixPte::C | RadixPte::EAA_READ,
        );
        let s = shadow_leaf(l0, &t, n(), Access::Load, PageSize::P64K, Lpid(5)).unwrap();
        assert!(s.pte.may_read() && !s.pte.may_write() && !s.pte.may_execute());
        assert!(s.pte.referenced());
        assert!(!s.pte.changed(), "C only on a store");
        // L1 lacks R: the shadow lacks R (the next access faults SET_RC).
        let t = l1(0x1_0000_6018, PageSize::P64K, RadixPte::EAA_RW);
        let s = shadow_leaf(l0, &t, n(), Access::Store, PageSize::P64K, Lpid(5)).unwrap();
        assert!(!s.pte.referenced() && !s.pte.changed() && s.pte.may_write());
        // L0 without W (a read fault): no W whatever L1 grants.
        let l0r = L0Leaf {
            pte: l0_leaf_for_l1(0x50_0000, false),
            size: PageSize::P64K,
        };
        let t = l1(0x1_0000_6018, PageSize::P64K, ALL);
        let s = shadow_leaf(l0r, &t, n(), Access::Store, PageSize::P64K, Lpid(5)).unwrap();
        assert!(!s.pte.may_write() && !s.pte.changed());
        // Everything on both sides, a store: all of it.
        let s = shadow_leaf(l0, &t, n(), Access::Store, PageSize::P64K, Lpid(5)).unwrap();
        assert_eq!(s.pte.bits() & ALL, ALL);
        assert_eq!(s.pte.rpn(), 0x50_0000);
        assert_eq!(s.n_gpa.raw(), 0x3b9a_0000);
        assert_eq!(s.rmap_base, Gpa(0x1_0000_0000));
        assert_eq!(
            (s.rmap_entry.lpid(), s.rmap_entry.gpa()),
            (Lpid(5), Gpa(0x3b9a_0000))
        );
    }

    #[test]
    fn size_is_l0s_unless_l1s_leaf_is_smaller() {
        // L0 2M, L1 1G: a 2M shadow leaf, rmap at the 2M base.
        let l0 = L0Leaf {
            pte: l0_leaf_for_l1(0x4000_0000, true),
            size: PageSize::P2M,
        };
        let t = l1(0x1_0012_3456, PageSize::P1G, ALL);
        let n = NGpa::new(0x4012_3456).unwrap();
        let s = shadow_leaf(l0, &t, n, Access::Load, PageSize::P64K, Lpid(1)).unwrap();
        assert_eq!((s.size, s.n_gpa.raw()), (PageSize::P2M, 0x4000_0000));
        assert_eq!(s.pte.rpn(), 0x4000_0000);
        assert_eq!(s.rmap_base, Gpa(0x1_0000_0000));
        // L0 2M, L1 64K: a 64K shadow leaf selecting the sub-page; the rmap key stays at
        // L0's 2M base.
        let t = l1(0x1_0012_3456, PageSize::P64K, ALL);
        let s = shadow_leaf(l0, &t, n, Access::Load, PageSize::P64K, Lpid(1)).unwrap();
        assert_eq!((s.size, s.n_gpa.raw()), (PageSize::P64K, 0x4012_0000));
        assert_eq!(s.pte.rpn(), 0x4000_0000 | 0x12_0000);
        assert_eq!(s.rmap_base, Gpa(0x1_0000_0000));
        // L0 1G, L1 2M: KVM picks PAGE_SIZE, not 2M.
        let l0g = L0Leaf {
            pte: l0_leaf_for_l1(0x8000_0000, true),
            size: PageSize::P1G,
        };
        let t = l1(0x1_0032_3456, PageSize::P2M, ALL);
        let s = shadow_leaf(l0g, &t, n, Access::Load, PageSize::P64K, Lpid(1)).unwrap();
        assert_eq!(
            (s.size, s.pte.rpn()),
            (PageSize::P64K, 0x8000_0000 | 0x32_0000)
        );
        // L1 4K on a 64K L0: unsupported.
        let t = l1(0x1_0012_3456, PageSize::P4K, ALL);
        assert_eq!(
            shadow_leaf(l0, &t, n, Access::Load, PageSize::P64K, Lpid(1)),
            Err(ShadowError::L1LeafTooSmall {
                l1: PageSize::P4K,
                page: PageSize::P64K
            })
        );
        // LPID 0 cannot be recorded.
        let t = l1(0x1_0012_3456, PageSize::P64K, ALL);
        assert!(matches!(
            shadow_leaf(l0, &t, n, Access::Load, PageSize::P64K, Lpid(0)),
            Err(ShadowError::Rmap(_))
        ));
    }

    #[test]
    fn set_rc_only_when_l1_has_the_bits() {
        let rc = RadixPte::new(0, RadixPte::R | RadixPte::C | RadixPte::EAA_RW);
        let r = RadixPte::new(0, RadixPte::R | RadixPte::EAA_RW);
        let none = RadixPte::new(0, RadixPte::EAA_RW);
        assert_eq!(rc_to_set(rc, Access::Store), Ok(RadixPte::R | RadixPte::C));
        assert_eq!(rc_to_set(r, Access::Load), Ok(RadixPte::R));
        assert_eq!(rc_to_set(r, Access::Store), Err(FaultCause::SetRc));
        assert_eq!(rc_to_set(none, Access::Fetch), Err(FaultCause::SetRc));
    }
}
