//! [`RadixBuilder`]: builds partition-scoped radix trees in a [`SparseMemory`], for tests
//! and examples (what an L1 hypervisor does when it maps memory for an L2).
//!
//! Tables are carved from a caller-given region of guest memory, each aligned to its
//! size (root 64 KiB, levels 2/1 4 KiB, level 0 4 KiB or 256 bytes). Directory entries
//! are written as Linux writes them (V | base | NLS); leaves as [`RadixPte::new`].

use super::entry::{RadixEntry, RadixPde, RadixPte};
use super::geometry::{Geometry, Level, PageSize, RADIX_TREE_BITS};
use super::mem::{MemError, SparseMemory};
use super::table::{Pate, PateDw0, Ptcr};
use super::walk::GuestMemory;
use crate::addr::NGpa;
use core::ops::Range;
use revmap_rmap::Gpa;

/// Why the builder could not do what was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The page size has no level in this geometry (4 KiB in a 64K tree or the reverse).
    #[error("{size:?} pages do not exist in a {geometry:?} tree")]
    SizeNotInGeometry {
        /// The size asked for.
        size: PageSize,
        /// The tree's geometry.
        geometry: Geometry,
    },
    /// An address not aligned to the page size.
    #[error("{addr:#x} is not aligned to a {size:?} page")]
    Misaligned {
        /// The offending address.
        addr: u64,
        /// The page size.
        size: PageSize,
    },
    /// The L2 address is beyond the 52-bit space.
    #[error("{0:?} is outside the 52-bit space")]
    OutOfSpace(NGpa),
    /// A leaf is in the way of a directory, or a directory in the way of a leaf.
    #[error("a {found} at level {level:?} is in the way")]
    Conflict {
        /// The level.
        level: Level,
        /// "leaf" or "directory".
        found: &'static str,
    },
    /// The region given for tables is used up.
    #[error("no room left for a {bytes}-byte table")]
    OutOfTableSpace {
        /// The size of the table that did not fit.
        bytes: u64,
    },
    /// The memory refused a store.
    #[error(transparent)]
    Mem(#[from] MemError),
}

/// Builds one radix tree in guest memory.
#[derive(Debug)]
pub struct RadixBuilder<'m> {
    mem: &'m mut SparseMemory,
    geometry: Geometry,
    root: u64,
    next: u64,
    end: u64,
}

impl<'m> RadixBuilder<'m> {
    /// A new, empty tree of `geometry` whose tables are allocated from `tables` (guest
    /// addresses; the root is allocated at once).
    pub fn new(
        mem: &'m mut SparseMemory,
        geometry: Geometry,
        tables: Range<u64>,
    ) -> Result<Self, BuildError> {
        let mut b = RadixBuilder {
            mem,
            geometry,
            root: 0,
            next: tables.start,
            end: tables.end,
        };
        b.root = b.alloc_table(Level::Root)?;
        Ok(b)
    }

    /// The tree's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The partition-table dw0 that roots this tree (HR | RTS 52 | root | 13).
    pub fn root(&self) -> PateDw0 {
        PateDw0::radix52(self.root, self.geometry.nls(Level::Root))
    }

    /// The memory the tree lives in.
    pub fn memory(&mut self) -> &mut SparseMemory {
        self.mem
    }

    fn alloc_table(&mut self, level: Level) -> Result<u64, BuildError> {
        let bytes = 1u64 << (self.geometry.nls(level) + 3);
        let base = self.next.div_ceil(bytes).checked_mul(bytes);
        match base.and_then(|b| Some((b, b.checked_add(bytes)?))) {
            Some((base, end)) if end <= self.end && self.mem.is_ram(Gpa(base), bytes) => {
                self.next = end;
                // Tables start zeroed (fresh memory, or cleared here if reused).
                for off in (0..bytes).step_by(8) {
                    self.mem.write_be_u64(Gpa(base + off), 0)?;
                }
                Ok(base)
            }
            _ => Err(BuildError::OutOfTableSpace { bytes }),
        }
    }

    fn leaf_level(&self, size: PageSize) -> Result<Level, BuildError> {
        match size {
            PageSize::P1G => Ok(Level::Pud),
            PageSize::P2M => Ok(Level::Pmd),
            s if s == self.geometry.base_page() => Ok(Level::Pte),
            size => Err(BuildError::SizeNotInGeometry {
                size,
                geometry: self.geometry,
            }),
        }
    }

    /// The address of the entry for `n_gpa` at `level`, creating directories on the way.
    fn entry_addr(
        &mut self,
        n_gpa: NGpa,
        level: Level,
        create: bool,
    ) -> Result<Option<Gpa>, BuildError> {
        let mut base = self.root;
        let mut remaining = RADIX_TREE_BITS;
        let mut at = Level::Root;
        loop {
            let nls = self.geometry.nls(at);
            remaining -= nls;
            let entry = Gpa(base + 8 * ((n_gpa.raw() >> remaining) & ((1 << nls) - 1)));
            if at == level {
                return Ok(Some(entry));
            }
            let raw = self.mem.read_be_u64(entry).ok_or(MemError::NotRam(entry))?;
            let below = at.below().ok_or(BuildError::Conflict {
                level: at,
                found: "leaf",
            })?;
            base = match RadixEntry::decode(raw) {
                RadixEntry::Directory(d) => d.nlb(),
                RadixEntry::Leaf(_) => {
                    return Err(BuildError::Conflict {
                        level: at,
                        found: "leaf",
                    })
                }
                RadixEntry::Invalid(_) if !create => return Ok(None),
                RadixEntry::Invalid(_) => {
                    let t = self.alloc_table(below)?;
                    self.mem
                        .write_be_u64(entry, RadixPde::new(t, self.geometry.nls(below)).bits())?;
                    t
                }
            };
            at = below;
        }
    }

    /// Maps the `size` page at `n_gpa` to guest address `target` with leaf flags `flags`
    /// (`RadixPte::R`, `C`, `EAA_*`, `ATT`); replaces a leaf already there. Returns the
    /// leaf's address.
    pub fn map(
        &mut self,
        n_gpa: NGpa,
        target: Gpa,
        size: PageSize,
        flags: u64,
    ) -> Result<Gpa, BuildError> {
        let level = self.leaf_level(size)?;
        for addr in [n_gpa.raw(), target.0] {
            if addr & (size.bytes() - 1) != 0 {
                return Err(BuildError::Misaligned { addr, size });
            }
        }
        if n_gpa.raw() >> RADIX_TREE_BITS != 0 {
            return Err(BuildError::OutOfSpace(n_gpa));
        }
        let Some(entry) = self.entry_addr(n_gpa, level, true)? else {
            return Err(BuildError::OutOfSpace(n_gpa));
        };
        let old = self.mem.read_be_u64(entry).ok_or(MemError::NotRam(entry))?;
        if let RadixEntry::Directory(_) = RadixEntry::decode(old) {
            return Err(BuildError::Conflict {
                level,
                found: "directory",
            });
        }
        self.mem
            .write_be_u64(entry, RadixPte::new(target.0, flags).bits())?;
        Ok(entry)
    }

    /// Clears the `size` leaf at `n_gpa`; returns the old leaf, if there was one.
    pub fn unmap(&mut self, n_gpa: NGpa, size: PageSize) -> Result<Option<RadixPte>, BuildError> {
        let level = self.leaf_level(size)?;
        let Some(entry) = self.entry_addr(n_gpa, level, false)? else {
            return Ok(None);
        };
        let old = self.mem.read_be_u64(entry).ok_or(MemError::NotRam(entry))?;
        match RadixEntry::decode(old) {
            RadixEntry::Leaf(p) => {
                self.mem.write_be_u64(entry, 0)?;
                Ok(Some(p))
            }
            RadixEntry::Directory(_) => Err(BuildError::Conflict {
                level,
                found: "directory",
            }),
            RadixEntry::Invalid(_) => Ok(None),
        }
    }
}

/// Writes `pate` as `lpid`'s entry of the partition table `ptcr` describes.
pub fn write_pate(
    mem: &mut SparseMemory,
    ptcr: Ptcr,
    lpid: u64,
    pate: Pate,
) -> Result<(), BuildError> {
    let Some(addr) = ptcr.entry_addr(lpid) else {
        return Err(BuildError::OutOfTableSpace {
            bytes: Ptcr::ENTRY_BYTES,
        });
    };
    mem.write_be_u64(Gpa(addr), pate.dw0.bits())?;
    mem.write_be_u64(Gpa(addr + 8), pate.dw1.bits())?;
    Ok(())
}
