//! Benchmark fixtures shared by `benches/shadow.rs` and `revmap bench x86`: a 64-bit
//! 4-level guest mapping `pages` 4 KiB pages, the shadow MMU over it, and the guest
//! memory seen through the memslots (the two-dimensional walk a shadow table caches).
//!
//! Layout: PML4 at gpa 0x1000, PDPT at 0x2000, PD at 0x3000, PTs from 0x4000 (one per
//! 512 pages), gva `i << 12` mapped to gfn [`DATA_GFN`]` + i`, every entry present,
//! writable, user, accessed and dirty. Invariant: at most [`MAX_PAGES`] pages (one PD).

use crate::mmu::{ShadowError, ShadowMmu};
use crate::paging::{
    Cmpxchg, CpuMode, Gpa, GuestPhysMemory, MemoryError, SparseMemory, PT_ACCESSED, PT_DIRTY,
};
use revmap_host::{Memslot, MemslotFlags, Memslots};
use revmap_rmap::{Gfn, Hva, SlotId};
use std::hint::black_box;

/// The guest's CR3 (the PML4's address).
pub const CR3: u64 = 0x1000;
/// The first data frame: gva `i << 12` maps gfn `DATA_GFN + i`.
pub const DATA_GFN: u64 = 0x1000;
/// Flags of every guest entry: present, writable, user, accessed, dirty.
pub const ENTRY_FLAGS: u64 = 0x7 | PT_ACCESSED | PT_DIRTY;
/// Most pages one PD of PTs maps (1 GiB).
pub const MAX_PAGES: u64 = 512 * 512;
/// The fixture's memslot id.
pub const SLOT: SlotId = SlotId(0);

/// The memslot (4 KiB host pages) covering the tables and `pages` data frames: at least
/// 64 Ki pages, from gfn 0.
pub fn slot(pages: u64) -> Result<Memslot, ShadowError> {
    let n = (DATA_GFN + pages).max(1 << 16);
    Memslot::new(
        SLOT,
        Gfn(0),
        n,
        12,
        MemslotFlags::empty(),
        Hva(0x7f00_0000_0000),
    )
    .map_err(|_| ShadowError::NoSlot(0))
}

/// Writes the guest's tables for `pages` (clamped to [`MAX_PAGES`]) into `mem`.
pub fn build_guest(mem: &mut SparseMemory, pages: u64) -> Result<(), MemoryError> {
    let pages = pages.min(MAX_PAGES);
    mem.write_u64(Gpa(0x1000), 0x2000 | ENTRY_FLAGS)?;
    mem.write_u64(Gpa(0x2000), 0x3000 | ENTRY_FLAGS)?;
    for j in 0..pages.div_ceil(512) {
        mem.write_u64(Gpa(0x3000 + 8 * j), (0x4000 + (j << 12)) | ENTRY_FLAGS)?;
    }
    for i in 0..pages {
        mem.write_u64(Gpa(0x4000 + 8 * i), ((DATA_GFN + i) << 12) | ENTRY_FLAGS)?;
    }
    Ok(())
}

/// Guest memory seen through the memslots: every table read looks its slot up first
/// and translates the gfn to a host address (the second dimension of the walk).
#[derive(Debug)]
pub struct TwoD<'a> {
    /// The memslots consulted per table read.
    pub slots: &'a Memslots,
    /// Guest memory.
    pub mem: &'a mut SparseMemory,
}

impl GuestPhysMemory for TwoD<'_> {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, MemoryError> {
        let s = self
            .slots
            .lookup(Gfn(gpa.gfn()))
            .ok_or(MemoryError::Unbacked(gpa.0))?;
        black_box(s.gfn_to_hva(Gfn(gpa.gfn())));
        self.mem.read_u64(gpa)
    }
    fn read_u32(&self, gpa: Gpa) -> Result<u32, MemoryError> {
        self.mem.read_u32(gpa)
    }
    fn cmpxchg_u64(&mut self, g: Gpa, o: u64, n: u64) -> Cmpxchg<u64> {
        self.mem.cmpxchg_u64(g, o, n)
    }
    fn cmpxchg_u32(&mut self, g: Gpa, o: u32, n: u32) -> Cmpxchg<u32> {
        self.mem.cmpxchg_u32(g, o, n)
    }
}

/// A shadow MMU with one vCPU in 64-bit 4-level mode over the fixture guest.
#[derive(Debug)]
pub struct ShadowFixture {
    /// The shadow MMU.
    pub mmu: ShadowMmu,
    /// The vCPU index.
    pub vcpu: usize,
    /// Data pages mapped by the guest.
    pub pages: u64,
}

impl ShadowFixture {
    /// The MMU, slot and guest tables, nothing faulted in yet.
    pub fn new(pages: u64) -> Result<Self, ShadowError> {
        let pages = pages.clamp(1, MAX_PAGES);
        let mut mmu = ShadowMmu::new();
        mmu.add_memslot(slot(pages)?)?;
        build_guest(&mut mmu.mem, pages).map_err(|_| ShadowError::NoSlot(0))?;
        let vcpu = mmu.add_vcpu(CpuMode::long4(CR3));
        Ok(Self { mmu, vcpu, pages })
    }

    /// Accesses every data page once (`access`: e.g. empty for a read, WRITE for a
    /// write); returns the accesses made.
    pub fn touch_all(&mut self, access: crate::paging::Access) -> Result<u64, ShadowError> {
        for i in 0..self.pages {
            self.mmu.access(self.vcpu, i << 12, access)?;
        }
        Ok(self.pages)
    }

    /// The guest's tables and memslots as a separate two-dimensional-walk setup (same
    /// guest, no shadow MMU).
    pub fn two_d(pages: u64) -> Result<(Memslots, SparseMemory, CpuMode), ShadowError> {
        let mut slots = Memslots::new();
        slots
            .insert(slot(pages)?)
            .map_err(|_| ShadowError::NoSlot(0))?;
        let mut mem = SparseMemory::new();
        build_guest(&mut mem, pages).map_err(|_| ShadowError::NoSlot(0))?;
        Ok((slots, mem, CpuMode::long4(CR3)))
    }
}
