//! [`ShadowTable`]: L0's shadow partition-scoped table for one L2 (n_gpa → host page),
//! in L0's geometry, with KVM's `kvmppc_create_pte` insertion rules.
//!
//! This is the single-threaded model (the caller serialises, as KVM's `mmu_lock` does);
//! directories are owned boxes, not words in host memory, so no directory can point to
//! a freed table (the table-shape invariant holds by construction).
//!
//! Invariants ([`ShadowTable::check`]): no leaf at the root; leaves only at the level of
//! their size; every leaf valid with its RPN and L2 base aligned to its size; the leaf
//! count matches the tree.
//!
//! Insertion ([`ShadowTable::insert`], `kvmppc_create_pte`): a leaf of another size in
//! the way is removed; a directory under a new large leaf is removed with every leaf in
//! it; an identical leaf is left alone; a leaf differing only in W/R/C gets the new bits
//! ORed in; a leaf with another RPN or attributes is replaced. Every removed leaf is
//! returned so the caller can flush it. The caller adds a nested-rmap entry only for a
//! [`Inserted::New`] or replaced leaf.

use crate::addr::NGpa;
use crate::radix::{Geometry, Level, PageSize, RadixPte, RADIX_TREE_BITS};
use revmap_rmap::error::try_boxed_slice;
use revmap_rmap::RmapError;

#[derive(Debug)]
enum Slot {
    Empty,
    Leaf(RadixPte),
    Dir(Box<[Slot]>),
}

/// The leaf slot on the path `idx` from `t` at level `at`, if the path ends in a leaf.
fn leaf_in<'a>(t: &'a mut [Slot], idx: &[usize; 4], at: Level) -> Option<(&'a mut Slot, Level)> {
    let i = idx[at as usize];
    match &t[i] {
        Slot::Empty => None,
        Slot::Leaf(_) => Some((&mut t[i], at)),
        Slot::Dir(_) => match &mut t[i] {
            Slot::Dir(d) => leaf_in(d, idx, at.below()?),
            _ => None,
        },
    }
}

/// A table of 2^`nls` empty slots, or [`RmapError::Alloc`].
fn try_table(nls: u32) -> Result<Box<[Slot]>, RmapError> {
    try_boxed_slice(1usize << nls, |_| Slot::Empty)
}

/// The directory levels a table can be made for, deepest first (`Level as usize` is
/// the index into [`NewTables`]).
const DIR_LEVELS: [Level; 3] = [Level::Pte, Level::Pmd, Level::Pud];

/// Which directory tables an insertion needs: bit `l` for a new table of level `l`
/// (PTE, PMD or PUD), from [`ShadowTable::tables_needed`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TablesNeeded(u8);

impl TablesNeeded {
    /// No table.
    pub const NONE: TablesNeeded = TablesNeeded(0);

    /// Whether no table is needed.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn has(self, level: Level) -> bool {
        self.0 & (1 << level as u8) != 0
    }
}

/// Directory tables allocated for one insertion before the caller takes its lock (the
/// `new_pud` / `new_pmd` / `new_ptep` that `kvmppc_create_pte`'s callers allocate up
/// front); [`ShadowTable::insert_with`] takes what it links in and the rest is freed
/// when this is dropped.
#[derive(Debug, Default)]
pub struct NewTables {
    by_level: [Option<Box<[Slot]>>; 3],
}

impl NewTables {
    /// The tables of `need` in `geometry`'s sizes, or [`RmapError::Alloc`] (nothing is
    /// kept then).
    pub fn alloc(geometry: Geometry, need: TablesNeeded) -> Result<Self, RmapError> {
        let mut t = NewTables::default();
        for l in DIR_LEVELS {
            if need.has(l) {
                t.by_level[l as usize] = Some(try_table(geometry.nls(l))?);
            }
        }
        Ok(t)
    }

    /// Whether every table of `need` is here.
    pub fn covers(&self, need: TablesNeeded) -> bool {
        DIR_LEVELS
            .iter()
            .all(|&l| !need.has(l) || self.by_level[l as usize].is_some())
    }

    fn take(&mut self, level: Level) -> Option<Box<[Slot]>> {
        self.by_level.get_mut(level as usize)?.take()
    }
}

/// The leaves an insertion displaced, held in what it unlinked (no allocation): a
/// larger leaf that was in the way, and a directory that was under the new large leaf.
#[derive(Debug)]
pub struct Displaced {
    geometry: Geometry,
    leaf: Option<ShadowPte>,
    /// The unlinked directory: its table, the level of that table, the address its
    /// first slot maps.
    dir: Option<(Box<[Slot]>, Level, u64)>,
}

impl Displaced {
    /// Calls `f` on every displaced leaf: the larger leaf first, then the directory's
    /// leaves in address order.
    pub fn for_each(&self, mut f: impl FnMut(ShadowPte)) {
        if let Some(l) = self.leaf {
            f(l);
        }
        if let Some((d, level, base)) = &self.dir {
            visit(self.geometry, d, *level, *base, &mut f);
        }
    }

    /// Number of displaced leaves.
    pub fn len(&self) -> usize {
        let mut n = 0;
        self.for_each(|_| n += 1);
        n
    }

    /// Whether no leaf was displaced.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A leaf of the shadow table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowPte {
    /// The L2 address of the leaf's base.
    pub n_gpa: NGpa,
    /// Its size.
    pub size: PageSize,
    /// The PTE.
    pub pte: RadixPte,
}

/// What an insertion did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// A brand-new leaf (plus any leaves of other sizes it displaced).
    New {
        /// Leaves removed to make room (to be flushed).
        displaced: Vec<ShadowPte>,
    },
    /// The same leaf was already there.
    Identical,
    /// The leaf was there with fewer W/R/C bits; they were ORed in.
    Merged,
    /// A leaf with another RPN or attributes was replaced.
    Replaced {
        /// The old leaf.
        old: ShadowPte,
    },
}

/// What [`ShadowTable::insert_with`] did: as [`Inserted`], with the displaced leaves
/// left in the unlinked entries instead of collected.
#[derive(Debug)]
pub enum Installed {
    /// A brand-new leaf, and the leaves of other sizes it displaced (to be flushed).
    New(Displaced),
    /// The same leaf was already there.
    Identical,
    /// The leaf was there with fewer W/R/C bits; they were ORed in.
    Merged,
    /// A leaf with another RPN or attributes was replaced; this is the old one.
    Replaced(ShadowPte),
}

/// Why an insertion was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShadowInsertError {
    /// The size has no level in this geometry.
    #[error("{0:?} leaves do not exist in this geometry")]
    Size(PageSize),
    /// The L2 base or the RPN is not aligned to the size, or the PTE is not a valid leaf.
    #[error("leaf {0:?} is malformed or misaligned")]
    Malformed(ShadowPte),
    /// A directory table the insertion needs was not allocated beforehand (the table
    /// changed since [`ShadowTable::tables_needed`]; KVM's `-EAGAIN`): nothing changed.
    #[error("a directory table the insertion needs was not allocated beforehand")]
    NeedTable,
    /// Memory for a table or for the displaced-leaf list could not be allocated:
    /// nothing changed.
    #[error(transparent)]
    NoMemory(#[from] RmapError),
}

/// The shadow table of one L2.
#[derive(Debug)]
pub struct ShadowTable {
    geometry: Geometry,
    root: Box<[Slot]>,
    leaves: usize,
}

#[inline]
fn size_of(geometry: Geometry, level: Level) -> Option<PageSize> {
    match level {
        Level::Pud => Some(PageSize::P1G),
        Level::Pmd => Some(PageSize::P2M),
        Level::Pte => Some(geometry.base_page()),
        Level::Root => None,
    }
}

/// Calls `f` on every leaf under `slots` (a table at `level` whose first slot maps
/// `base`), in address order.
fn visit(
    geometry: Geometry,
    slots: &[Slot],
    level: Level,
    base: u64,
    f: &mut impl FnMut(ShadowPte),
) {
    let Some(size) = size_of(geometry, level) else {
        for (i, s) in slots.iter().enumerate() {
            if let Slot::Dir(d) = s {
                let span = 1u64 << (RADIX_TREE_BITS - geometry.nls(Level::Root));
                if let Some(b) = level.below() {
                    visit(geometry, d, b, base + i as u64 * span, f);
                }
            }
        }
        return;
    };

    // A slot at `level` spans one leaf of `size`.
    for (i, s) in slots.iter().enumerate() {
        let at = base + i as u64 * size.bytes();
        match s {
            Slot::Empty => {}
            Slot::Leaf(pte) => f(ShadowPte {
                n_gpa: NGpa::new(at).unwrap_or_default(),
                size,
                pte: *pte,
            }),
            Slot::Dir(d) => {
                if let Some(b) = level.below() {
                    visit(geometry, d, b, at, f);
                }
            }
        }
    }
}

/// The first leaf under `slots` (a table at `level` whose first slot maps `base`) that
/// overlaps `[start, end)`, in address order.
fn first_leaf(
    geometry: Geometry,
    slots: &[Slot],
    level: Level,
    base: u64,
    start: u64,
    end: u64,
) -> Option<ShadowPte> {
    let size = size_of(geometry, level);
    let span = match size {
        Some(s) => s.bytes(),
        None => 1u64 << (RADIX_TREE_BITS - geometry.nls(Level::Root)),
    };
    let first = usize::try_from(start.saturating_sub(base) / span).ok()?;
    for (i, s) in slots.iter().enumerate().skip(first) {
        let at = base + i as u64 * span;
        if at >= end {
            return None;
        }
        match s {
            Slot::Empty => {}
            Slot::Leaf(pte) => {
                if let Some(size) = size {
                    return Some(ShadowPte {
                        n_gpa: NGpa::new(at).unwrap_or_default(),
                        size,
                        pte: *pte,
                    });
                }
            }
            Slot::Dir(d) => {
                if let Some(l) = level
                    .below()
                    .and_then(|b| first_leaf(geometry, d, b, at, start, end))
                {
                    return Some(l);
                }
            }
        }
    }
    None
}

const MERGEABLE: u64 = RadixPte::EAA_RW | RadixPte::R | RadixPte::C;

impl ShadowTable {
    /// An empty table (a 2^13-entry root) of L0's `geometry`, or [`RmapError::Alloc`].
    pub fn new(geometry: Geometry) -> Result<Self, RmapError> {
        Ok(ShadowTable {
            geometry,
            root: try_table(geometry.nls(Level::Root))?,
            leaves: 0,
        })
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Number of leaves.
    pub fn leaves(&self) -> usize {
        self.leaves
    }

    fn level_of(&self, size: PageSize) -> Option<Level> {
        match size {
            PageSize::P1G => Some(Level::Pud),
            PageSize::P2M => Some(Level::Pmd),
            s if s == self.geometry.base_page() => Some(Level::Pte),
            _ => None,
        }
    }

    #[inline]
    fn index(&self, level: Level, n: u64) -> usize {
        let mut remaining = RADIX_TREE_BITS;
        let mut at = Level::Root;
        loop {
            let nls = self.geometry.nls(at);
            remaining -= nls;
            if at == level {
                return ((n >> remaining) & ((1 << nls) - 1)) as usize;
            }
            match at.below() {
                Some(b) => at = b,
                None => return 0,
            }
        }
    }

    /// The leaf covering `n`, if any (the hardware's shadow walk).
    #[inline]
    pub fn lookup(&self, n: NGpa) -> Option<ShadowPte> {
        let mut t = &self.root;
        let mut level = Level::Root;
        loop {
            match &t[self.index(level, n.raw())] {
                Slot::Empty => return None,
                Slot::Leaf(pte) => {
                    let size = self.size_of(level)?;
                    return Some(ShadowPte {
                        n_gpa: n.align_down(size.bytes()),
                        size,
                        pte: *pte,
                    });
                }
                Slot::Dir(d) => {
                    t = d;
                    level = level.below()?;
                }
            }
        }
    }

    /// The first leaf overlapping L2 addresses `[start, end)`, in address order (a
    /// range walk that allocates nothing: the caller continues from the leaf's end).
    pub fn first_leaf_in(&self, start: u64, end: u64) -> Option<ShadowPte> {
        first_leaf(self.geometry, &self.root, Level::Root, 0, start, end)
    }

    #[inline]
    fn size_of(&self, level: Level) -> Option<PageSize> {
        size_of(self.geometry, level)
    }

    /// The level of `new`'s slot, if `new` is a valid leaf of a size of this geometry,
    /// aligned to it.
    fn validate(&self, new: ShadowPte) -> Result<Level, ShadowInsertError> {
        let level = self
            .level_of(new.size)
            .ok_or(ShadowInsertError::Size(new.size))?;
        let mask = new.size.bytes() - 1;
        if new.n_gpa.raw() & mask != 0
            || new.pte.rpn() & mask != 0
            || !new.pte.is_valid()
            || !new.pte.is_leaf()
        {
            return Err(ShadowInsertError::Malformed(new));
        }
        Ok(level)
    }

    /// What inserting a leaf at `n` in a slot of `level` takes: the directory tables to
    /// make, and how many leaves it displaces.
    fn probe(&self, n: u64, level: Level) -> (TablesNeeded, usize) {
        let mut need = 0u8;
        let mut displaced = 0;
        let mut t = &self.root;
        let mut at = Level::Root;
        let mut linked = true;
        while at != level {
            let Some(below) = at.below() else {
                break;
            };
            if linked {
                match &t[self.index(at, n)] {
                    Slot::Dir(d) => t = d,
                    Slot::Leaf(_) => {
                        displaced += 1;
                        linked = false;
                    }
                    Slot::Empty => linked = false,
                }
            }
            if !linked {
                need |= 1 << below as u8;
            }
            at = below;
        }
        if linked {
            if let (Slot::Dir(d), Some(below)) = (&t[self.index(level, n)], level.below()) {
                visit(self.geometry, d, below, 0, &mut |_| displaced += 1);
            }
        }
        (TablesNeeded(need), displaced)
    }

    /// The directory tables that inserting a leaf of `size` at `n` would make (to be
    /// allocated with [`NewTables::alloc`] before the caller takes its lock).
    pub fn tables_needed(
        &self,
        n: NGpa,
        size: PageSize,
    ) -> Result<TablesNeeded, ShadowInsertError> {
        let level = self.level_of(size).ok_or(ShadowInsertError::Size(size))?;
        Ok(self.probe(n.raw(), level).0)
    }

    /// Inserts the leaf `new` (`kvmppc_create_pte`), allocating what it needs first: a
    /// failed allocation is [`ShadowInsertError::NoMemory`] with nothing changed. The
    /// single-threaded model's form of [`insert_with`](Self::insert_with).
    pub fn insert(&mut self, new: ShadowPte) -> Result<Inserted, ShadowInsertError> {
        let level = self.validate(new)?;
        let (need, displaced) = self.probe(new.n_gpa.raw(), level);
        let mut tables = NewTables::alloc(self.geometry, need)?;
        let mut list = Vec::new();
        list.try_reserve_exact(displaced)
            .map_err(|_| RmapError::Alloc {
                bytes: displaced.saturating_mul(core::mem::size_of::<ShadowPte>()),
            })?;
        Ok(match self.insert_with(new, &mut tables)? {
            Installed::New(d) => {
                d.for_each(|l| list.push(l));
                Inserted::New { displaced: list }
            }
            Installed::Identical => Inserted::Identical,
            Installed::Merged => Inserted::Merged,
            Installed::Replaced(old) => Inserted::Replaced { old },
        })
    }

    /// Inserts the leaf `new` (`kvmppc_create_pte`) without allocating: new directory
    /// tables come from `tables` (allocated before the caller's lock from
    /// [`tables_needed`](Self::tables_needed)). If a table it needs is not there,
    /// [`ShadowInsertError::NeedTable`] with nothing changed (the caller allocates and
    /// retries, as KVM retries on `-EAGAIN`).
    pub fn insert_with(
        &mut self,
        new: ShadowPte,
        tables: &mut NewTables,
    ) -> Result<Installed, ShadowInsertError> {
        let level = self.validate(new)?;
        let n = new.n_gpa.raw();
        if !tables.covers(self.probe(n, level).0) {
            return Err(ShadowInsertError::NeedTable);
        }
        let geometry = self.geometry;
        let mut displaced = Displaced {
            geometry,
            leaf: None,
            dir: None,
        };
        let mut idx = [0usize; 4];
        for l in Level::WALK_ORDER {
            idx[l as usize] = self.index(l, n);
        }
        let mut t: &mut Box<[Slot]> = &mut self.root;
        let mut at = Level::Root;
        let mut base = 0u64;
        while at != level {
            let below = at.below().ok_or(ShadowInsertError::Size(new.size))?;
            let span_shift = RADIX_TREE_BITS
                - Level::WALK_ORDER
                    .iter()
                    .take_while(|&&l| l >= at)
                    .map(|&l| geometry.nls(l))
                    .sum::<u32>();
            let i = idx[at as usize];
            base |= (i as u64) << span_shift;
            let slot = &mut t[i];
            if let Slot::Leaf(pte) = *slot {
                // A larger leaf in the way: remove it.
                displaced.leaf = Some(ShadowPte {
                    n_gpa: NGpa::new(base).unwrap_or_default(),
                    size: match at {
                        Level::Pud => PageSize::P1G,
                        _ => PageSize::P2M,
                    },
                    pte,
                });
                *slot = Slot::Empty;
            }
            if let Slot::Empty = slot {
                // Checked above: `tables` covers every table the path lacks.
                *slot = Slot::Dir(tables.take(below).ok_or(ShadowInsertError::NeedTable)?);
            }
            t = match slot {
                Slot::Dir(d) => d,
                _ => return Err(ShadowInsertError::Malformed(new)),
            };
            at = below;
        }
        let i = idx[level as usize];
        let outcome = match std::mem::replace(&mut t[i], Slot::Empty) {
            Slot::Empty => {
                t[i] = Slot::Leaf(new.pte);
                Installed::New(displaced)
            }
            Slot::Dir(d) => {
                // A directory under the new large leaf: every leaf in it goes.
                t[i] = Slot::Leaf(new.pte);
                if let Some(below) = level.below() {
                    displaced.dir = Some((d, below, n));
                }
                Installed::New(displaced)
            }
            Slot::Leaf(old) => {
                let out = if old == new.pte {
                    Installed::Identical
                } else if old.bits() & !MERGEABLE == new.pte.bits() & !MERGEABLE {
                    Installed::Merged
                } else {
                    Installed::Replaced(ShadowPte { pte: old, ..new })
                };
                let pte = match out {
                    Installed::Merged => RadixPte(old.bits() | new.pte.bits()),
                    _ => new.pte,
                };
                t[i] = Slot::Leaf(pte);
                out
            }
        };
        if let Installed::New(d) = &outcome {
            self.leaves = self.leaves + 1 - d.len();
        }
        Ok(outcome)
    }

    fn leaf_slot(&mut self, n: NGpa) -> Option<(&mut Slot, Level)> {
        let mut idx = [0usize; 4];
        for l in Level::WALK_ORDER {
            idx[l as usize] = self.index(l, n.raw());
        }
        leaf_in(&mut self.root, &idx, Level::Root)
    }

    /// Removes the leaf covering `n` (`kvmppc_unmap_pte` on the shadow table; the caller
    /// flushes it with the shadow LPID).
    pub fn remove(&mut self, n: NGpa) -> Option<ShadowPte> {
        let (slot, level) = self.leaf_slot(n)?;
        let Slot::Leaf(pte) = std::mem::replace(slot, Slot::Empty) else {
            return None;
        };
        self.leaves -= 1;
        let size = self.size_of(level)?;
        Some(ShadowPte {
            n_gpa: n.align_down(size.bytes()),
            size,
            pte,
        })
    }

    /// Clears `clear` and sets `set` in the leaf covering `n`; returns the new leaf.
    pub fn update(&mut self, n: NGpa, clear: u64, set: u64) -> Option<RadixPte> {
        let (slot, _) = self.leaf_slot(n)?;
        let Slot::Leaf(pte) = slot else {
            return None;
        };
        *pte = RadixPte((pte.bits() & !clear) | set);
        Some(*pte)
    }

    /// Drops every leaf and directory (`kvmppc_free_pgtable_radix`: the full teardown
    /// that an LPID-wide flush does), keeping the root. Allocates nothing. Returns the
    /// number of leaves dropped.
    pub fn clear(&mut self) -> usize {
        let n = self.leaves;
        for s in self.root.iter_mut() {
            *s = Slot::Empty;
        }
        self.leaves = 0;
        n
    }

    /// Every leaf, in address order.
    pub fn leaves_vec(&self) -> Vec<ShadowPte> {
        let mut out = Vec::new();
        visit(self.geometry, &self.root, Level::Root, 0, &mut |l| {
            out.push(l)
        });
        out
    }

    /// Checks the table's invariants; returns the leaf count.
    pub fn check(&self) -> Result<usize, String> {
        for (i, s) in self.root.iter().enumerate() {
            if let Slot::Leaf(_) = s {
                return Err(format!("leaf at root index {i}"));
            }
        }
        let all = self.leaves_vec();
        for l in &all {
            let mask = l.size.bytes() - 1;
            if !l.pte.is_valid()
                || !l.pte.is_leaf()
                || l.pte.rpn() & mask != 0
                || l.n_gpa.raw() & mask != 0
            {
                return Err(format!("malformed leaf {l:?}"));
            }
        }
        if all.len() != self.leaves {
            return Err(format!(
                "{} leaves counted, {} in the tree",
                self.leaves,
                all.len()
            ));
        }
        Ok(all.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: u64 = RadixPte::R | RadixPte::EAA_READ;

    fn leaf(n: u64, size: PageSize, rpn: u64, flags: u64) -> ShadowPte {
        ShadowPte {
            n_gpa: NGpa::new(n).unwrap(),
            size,
            pte: RadixPte::new(rpn, flags),
        }
    }

    #[test]
    fn insert_lookup_remove_each_size() {
        let mut t = ShadowTable::new(Geometry::Base64K).unwrap();
        for (i, s) in [PageSize::P64K, PageSize::P2M, PageSize::P1G]
            .into_iter()
            .enumerate()
        {
            let n = (i as u64 + 1) << 32;
            let l = leaf(n, s, 0x40_0000_0000, F);
            assert_eq!(t.insert(l), Ok(Inserted::New { displaced: vec![] }));
            let got = t.lookup(NGpa::new(n + s.bytes() - 1).unwrap()).unwrap();
            assert_eq!(got, l);
            assert_eq!(t.lookup(NGpa::new(n + s.bytes()).unwrap()), None);
        }
        assert_eq!(t.check(), Ok(3));
        assert!(matches!(
            t.insert(leaf(0, PageSize::P4K, 0, F)),
            Err(ShadowInsertError::Size(_))
        ));
        assert!(matches!(
            t.insert(leaf(0x1000, PageSize::P64K, 0, F)),
            Err(ShadowInsertError::Malformed(_))
        ));
        let r = t.remove(NGpa::new((2 << 32) + 0x1234).unwrap()).unwrap();
        assert_eq!((r.size, r.n_gpa.raw()), (PageSize::P2M, 2 << 32));
        assert_eq!(t.remove(NGpa::new(2 << 32).unwrap()), None);
        assert_eq!(t.check(), Ok(2));
        assert_eq!(t.clear(), 2);
        assert_eq!(t.check(), Ok(0));
    }

    #[test]
    fn create_pte_rules() {
        let mut t = ShadowTable::new(Geometry::Base64K).unwrap();
        let small = leaf(0x20_0000, PageSize::P64K, 0x10_0000, F);
        let small2 = leaf(0x21_0000, PageSize::P64K, 0x11_0000, F);
        t.insert(small).unwrap();
        t.insert(small2).unwrap();
        assert_eq!(t.insert(small), Ok(Inserted::Identical));
        // W/R/C only: merged.
        let more = leaf(
            0x20_0000,
            PageSize::P64K,
            0x10_0000,
            F | RadixPte::EAA_RW | RadixPte::C,
        );
        assert_eq!(t.insert(more), Ok(Inserted::Merged));
        assert_eq!(t.lookup(small.n_gpa).unwrap().pte, more.pte);
        // Another RPN: replaced.
        let other = leaf(0x20_0000, PageSize::P64K, 0x50_0000, F);
        assert_eq!(
            t.insert(other),
            Ok(Inserted::Replaced {
                old: ShadowPte {
                    pte: more.pte,
                    ..other
                }
            })
        );
        assert_eq!(t.leaves(), 2);
        // A 2M leaf over the directory holding both: they are displaced.
        let big = leaf(0x20_0000, PageSize::P2M, 0x60_0000, F);
        let Ok(Inserted::New { displaced }) = t.insert(big) else {
            panic!()
        };
        assert_eq!(displaced, vec![other, small2]);
        assert_eq!(t.check(), Ok(1));
        // A 64K leaf inside the 2M leaf displaces it.
        let Ok(Inserted::New { displaced }) = t.insert(small) else {
            panic!()
        };
        assert_eq!(displaced, vec![big]);
        assert_eq!(t.check(), Ok(1));
        assert_eq!(
            t.update(small.n_gpa, RadixPte::R, RadixPte::C)
                .map(|p| p.bits() & (RadixPte::R | RadixPte::C)),
            Some(RadixPte::C)
        );
    }

    #[test]
    fn insert_with_takes_only_preallocated_tables_and_changes_nothing_without_them() {
        let g = Geometry::Base64K;
        let mut t = ShadowTable::new(g).unwrap();
        let a = leaf(0x4_0000_0000, PageSize::P64K, 0x10_0000, F);
        let need = t.tables_needed(a.n_gpa, a.size).unwrap();
        assert!(!need.is_empty());
        // Without its tables: refused, nothing changed (KVM's -EAGAIN).
        let mut none = NewTables::default();
        assert!(!none.covers(need));
        assert_eq!(
            t.insert_with(a, &mut none).map(|_| ()),
            Err(ShadowInsertError::NeedTable)
        );
        assert_eq!((t.check(), t.lookup(a.n_gpa)), (Ok(0), None));
        // With them: linked in, the leaf is there.
        let mut tables = NewTables::alloc(g, need).unwrap();
        assert!(tables.covers(need));
        assert!(matches!(
            t.insert_with(a, &mut tables),
            Ok(Installed::New(d)) if d.is_empty()
        ));
        assert_eq!(t.lookup(a.n_gpa), Some(a));
        // Its neighbour in the same PTE table needs no table.
        let b = leaf(0x4_0001_0000, PageSize::P64K, 0x20_0000, F);
        assert_eq!(t.tables_needed(b.n_gpa, b.size), Ok(TablesNeeded::NONE));
        assert!(t.insert_with(b, &mut NewTables::default()).is_ok());
        // A 2 MiB leaf over them needs no table and displaces both.
        let big = leaf(0x4_0000_0000, PageSize::P2M, 0x60_0000, F);
        assert_eq!(t.tables_needed(big.n_gpa, big.size), Ok(TablesNeeded::NONE));
        let Ok(Installed::New(d)) = t.insert_with(big, &mut NewTables::default()) else {
            panic!("2 MiB leaf refused")
        };
        let mut gone = Vec::new();
        d.for_each(|l| gone.push(l));
        assert_eq!((gone, d.len()), (vec![a, b], 2));
        assert_eq!(t.check(), Ok(1));
        // clear() keeps the root: the next insertion needs the directories again.
        assert_eq!(t.clear(), 1);
        assert_eq!(t.check(), Ok(0));
        assert_eq!(t.tables_needed(a.n_gpa, a.size), Ok(need));
    }

    #[test]
    fn first_leaf_in_walks_the_leaves_in_order() {
        let mut t = ShadowTable::new(Geometry::Base64K).unwrap();
        let leaves = [
            leaf(0x1_0000, PageSize::P64K, 0x10_0000, F),
            leaf(0x3_0000, PageSize::P64K, 0x11_0000, F),
            leaf(0x40_0000, PageSize::P2M, 0x60_0000, F),
            leaf(0x80_0000_0000, PageSize::P1G, 0x4000_0000, F),
        ];
        for l in leaves {
            t.insert(l).unwrap();
        }
        let walk = |start: u64, end: u64| {
            let mut out = Vec::new();
            let mut a = start;
            while let Some(l) = t.first_leaf_in(a, end) {
                a = l.n_gpa.raw() + l.size.bytes();
                out.push(l);
            }
            out
        };
        assert_eq!(walk(0, u64::MAX >> 12), leaves.to_vec());
        assert_eq!(walk(0, u64::MAX >> 12), t.leaves_vec());
        // A range starting inside a leaf finds it; an empty range finds nothing.
        assert_eq!(walk(0x3_8000, 0x40_1000), leaves[1..3].to_vec());
        assert_eq!(walk(0x4_0000, 0x40_0000), vec![]);
        assert_eq!(walk(0x80_1000_0000, 0x80_1000_1000), vec![leaves[3]]);
    }
}
