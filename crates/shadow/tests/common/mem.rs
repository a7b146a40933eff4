//! Guest memory of the shadow MMU's state-machine tests, also included by path by the
//! `shadow_ops` fuzz target: the one RAM slot, and the reference walker's view of it.
#![allow(dead_code)]

use revmap_host::{Memslot, MemslotError, MemslotFlags};
use revmap_rmap::{Gfn, Hva, SlotId};
use revmap_shadow::paging::{Cmpxchg, Gpa, GuestPhysMemory, MemoryError, SparseMemory};

/// Host virtual address of slot 0.
pub const HVA: u64 = 0x7f00_0000_0000;

/// Slot 0: `pages` guest frames from gfn 0, on host pages of `backing` (log2 bytes).
pub fn slot0(pages: u64, backing: u32) -> Result<Memslot, MemslotError> {
    Memslot::new(
        SlotId(0),
        Gfn(0),
        pages,
        backing,
        MemslotFlags::empty(),
        Hva(HVA),
    )
}

/// The reference walker's view: the first `.1` frames (the slot) only.
pub struct Limited<'a>(pub &'a mut SparseMemory, pub u64);

impl Limited<'_> {
    fn check(&self, gpa: Gpa) -> Result<(), MemoryError> {
        if gpa.gfn() >= self.1 {
            return Err(MemoryError::Unbacked(gpa.0));
        }
        Ok(())
    }
}

impl GuestPhysMemory for Limited<'_> {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, MemoryError> {
        self.check(gpa)?;
        self.0.read_u64(gpa)
    }
    fn read_u32(&self, gpa: Gpa) -> Result<u32, MemoryError> {
        self.check(gpa)?;
        self.0.read_u32(gpa)
    }
    fn cmpxchg_u64(&mut self, g: Gpa, o: u64, n: u64) -> Cmpxchg<u64> {
        self.0.cmpxchg_u64(g, o, n)
    }
    fn cmpxchg_u32(&mut self, g: Gpa, o: u32, n: u32) -> Cmpxchg<u32> {
        self.0.cmpxchg_u32(g, o, n)
    }
}
