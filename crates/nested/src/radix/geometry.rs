//! Geometry of the 52-bit radix tree (RTS = 21): levels, index sizes, page sizes.
//!
//! | level (KVM numbering) | index bits, 4K base | 64K base | one entry maps | leaf |
//! |---|---|---|---|---|
//! | 3 root | 51:39 (NLS 13) | 51:39 (13) | 512 GiB | no (KVM) |
//! | 2 | 38:30 (9) | 38:30 (9) | 1 GiB | 1 GiB |
//! | 1 | 29:21 (9) | 29:21 (9) | 2 MiB | 2 MiB |
//! | 0 | 20:12 (9) | 20:16 (5) | 4 KiB / 64 KiB | base page |
//!
//! These are the only valid configurations on POWER9/POWER10 (KVM and QEMU enforce
//! them); [`Level::nls_ok`] is the check.

/// Address bits translated by the only implemented tree size (RTS = 21).
pub const RADIX_TREE_BITS: u32 = 52;
/// NLS of the root directory.
pub const ROOT_NLS: u32 = 13;
/// NLS of levels 2 and 1.
pub const MID_NLS: u32 = 9;
/// NLS of level 0 with 4 KiB base pages.
pub const PTE_NLS_4K: u32 = 9;
/// NLS of level 0 with 64 KiB base pages.
pub const PTE_NLS_64K: u32 = 5;

/// A level of the tree, numbered as KVM does (3 = root, 0 = base-page table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Level 0: the base-page table (PTE).
    Pte = 0,
    /// Level 1: entries map 2 MiB (PMD).
    Pmd = 1,
    /// Level 2: entries map 1 GiB (PUD).
    Pud = 2,
    /// Level 3: the root (PGD); entries map 512 GiB.
    Root = 3,
}

impl Level {
    /// Levels from the root down.
    pub const WALK_ORDER: [Level; 4] = [Level::Root, Level::Pud, Level::Pmd, Level::Pte];

    /// Whether a table at this level may have 2^`nls` entries.
    #[inline]
    pub const fn nls_ok(self, nls: u32) -> bool {
        match self {
            Level::Root => nls == ROOT_NLS,
            Level::Pud | Level::Pmd => nls == MID_NLS,
            Level::Pte => nls == PTE_NLS_4K || nls == PTE_NLS_64K,
        }
    }
    /// The next level down (`None` below level 0).
    #[inline]
    pub const fn below(self) -> Option<Level> {
        match self {
            Level::Root => Some(Level::Pud),
            Level::Pud => Some(Level::Pmd),
            Level::Pmd => Some(Level::Pte),
            Level::Pte => None,
        }
    }
}

/// Base-page geometry of a tree: the NLS of its level-0 tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Geometry {
    /// 4 KiB base pages (level-0 NLS 9, 4 KiB tables).
    Base4K,
    /// 64 KiB base pages (level-0 NLS 5, 256-byte tables).
    Base64K,
}

impl Geometry {
    /// Level-0 NLS.
    #[inline]
    pub const fn pte_nls(self) -> u32 {
        match self {
            Geometry::Base4K => PTE_NLS_4K,
            Geometry::Base64K => PTE_NLS_64K,
        }
    }
    /// The base page size.
    #[inline]
    pub const fn base_page(self) -> PageSize {
        match self {
            Geometry::Base4K => PageSize::P4K,
            Geometry::Base64K => PageSize::P64K,
        }
    }
    /// NLS of a table at `level`.
    #[inline]
    pub const fn nls(self, level: Level) -> u32 {
        match level {
            Level::Root => ROOT_NLS,
            Level::Pud | Level::Pmd => MID_NLS,
            Level::Pte => self.pte_nls(),
        }
    }
}

/// A radix page size (leaf size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB (a level-0 leaf of a 4K-geometry tree).
    P4K,
    /// 64 KiB (a level-0 leaf of a 64K-geometry tree).
    P64K,
    /// 2 MiB (a level-1 leaf).
    P2M,
    /// 1 GiB (a level-2 leaf).
    P1G,
}

impl PageSize {
    /// Every size, smallest first.
    pub const ALL: [PageSize; 4] = [PageSize::P4K, PageSize::P64K, PageSize::P2M, PageSize::P1G];

    /// log2 of the size in bytes.
    #[inline]
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::P4K => 12,
            PageSize::P64K => 16,
            PageSize::P2M => 21,
            PageSize::P1G => 30,
        }
    }
    /// Size in bytes.
    #[inline]
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }
    /// `addr` rounded down to this size.
    #[inline]
    pub const fn align_down(self, addr: u64) -> u64 {
        addr & !(self.bytes() - 1)
    }
    /// The size whose log2 is `shift`, if it is a radix page size.
    #[inline]
    pub const fn from_shift(shift: u32) -> Option<PageSize> {
        match shift {
            12 => Some(PageSize::P4K),
            16 => Some(PageSize::P64K),
            21 => Some(PageSize::P2M),
            30 => Some(PageSize::P1G),
            _ => None,
        }
    }
    /// The tlbie AP encoding (POWER9 `ibm,processor-radix-AP-encodings`):
    /// 4K = 0, 64K = 5, 2M = 1, 1G = 2.
    #[inline]
    pub const fn ap(self) -> u8 {
        match self {
            PageSize::P4K => 0,
            PageSize::P64K => 5,
            PageSize::P2M => 1,
            PageSize::P1G => 2,
        }
    }
    /// The size an AP value names, if any.
    #[inline]
    pub const fn from_ap(ap: u8) -> Option<PageSize> {
        match ap {
            0 => Some(PageSize::P4K),
            5 => Some(PageSize::P64K),
            1 => Some(PageSize::P2M),
            2 => Some(PageSize::P1G),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_geometries_cover_52_bits() {
        for g in [Geometry::Base4K, Geometry::Base64K] {
            let bits: u32 = Level::WALK_ORDER.iter().map(|&l| g.nls(l)).sum();
            assert_eq!(bits + g.base_page().shift(), RADIX_TREE_BITS);
            for l in Level::WALK_ORDER {
                assert!(l.nls_ok(g.nls(l)));
            }
        }
        assert!(!Level::Root.nls_ok(9));
        assert!(!Level::Pud.nls_ok(5));
        assert!(!Level::Pmd.nls_ok(13));
        assert!(!Level::Pte.nls_ok(13));
        assert!(!Level::Pte.nls_ok(8));
        assert_eq!(Level::Pte.below(), None);
        assert_eq!(Level::Root.below(), Some(Level::Pud));
    }

    #[test]
    fn ap_encodings_round_trip() {
        for s in PageSize::ALL {
            assert_eq!(PageSize::from_ap(s.ap()), Some(s));
            assert_eq!(PageSize::from_shift(s.shift()), Some(s));
        }
        for ap in [3u8, 4, 6, 7] {
            assert_eq!(PageSize::from_ap(ap), None);
        }
        assert_eq!(PageSize::P2M.bytes(), 2 << 20);
        assert_eq!(PageSize::P64K.align_down(0x3b9a_6fff), 0x3b9a_0000);
    }
}
