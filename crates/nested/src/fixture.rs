//! Benchmark fixture of `revmap bench nested`: a [`NestedVm`] whose L1 has registered
//! its partition table and one L2 (`LPID`) with a 64K-geometry radix table mapping L2
//! page `k` (64 KiB) to L1 address [`DATA`]` + k * 64 KiB`, R and C preset, every
//! permission. The same tables are kept in a separate [`SparseMemory`] so that L1's
//! table can be walked outside the VM (the two-level walk a shadow table replaces).
//!
//! Layout (L1 addresses): partition table at 0x1_0000 (PATS 4), the L2's root at
//! 0x10_0000, its PUD at 0x12_0000, its PMD at 0x13_0000, PTE tables (32 entries, 2 MiB
//! each) from 0x20_0000. Invariant: at most [`MAX_PAGES`] pages (one PMD).

use crate::radix::mem::SparseMemory;
use crate::radix::walk::{walk, GuestMemory};
use crate::radix::{Access, PateDw0, RadixPde, RadixPte};
use crate::shadow::ShadowPte;
use crate::vm::{L2Result, NestedVm, NestedVmConfig, NestedVmError, L1_RAM_HVA};
use revmap_host::HostMmu;
use revmap_rmap::{Gpa, Hva};

/// L1's PTCR: partition table at 0x1_0000, PATS 4.
pub const PTCR: u64 = 0x1_0000 | 4;
/// The L2's LPID.
pub const LPID: u64 = 1;
/// The first L1 data page.
pub const DATA: u64 = 0x1000_0000;
/// The L2 page size (64 KiB).
pub const PAGE: u64 = 0x1_0000;
/// Most pages one PMD of 32-entry PTE tables maps (1 GiB).
pub const MAX_PAGES: u64 = 512 * 32;
const ROOT: u64 = 0x10_0000;
const PUD: u64 = 0x12_0000;
const PMD: u64 = 0x13_0000;
const PTES: u64 = 0x20_0000;
const FULL: u64 =
    RadixPte::R | RadixPte::C | RadixPte::EAA_READ | RadixPte::EAA_RW | RadixPte::EAA_X;

/// The VM, its L2's table, and a copy of L1's tables.
#[derive(Debug)]
pub struct NestedFixture {
    /// The VM.
    pub vm: NestedVm,
    /// A copy of the L2's tables in L1 memory.
    pub tables: SparseMemory,
    /// The L2's partition-table entry (its table's root).
    pub root: PateDw0,
    /// L2 pages mapped.
    pub pages: u64,
}

impl NestedFixture {
    /// A VM (64 KiB host pages) with the L2's `pages` pages mapped by L1, nothing
    /// faulted in yet.
    pub fn new(pages: u64) -> Result<Self, NestedVmError> {
        let pages = pages.clamp(1, MAX_PAGES);
        let ram = DATA + pages * PAGE;
        let vm = NestedVm::new(NestedVmConfig::new(ram, 16))?;
        let mut tables = SparseMemory::new(ram);
        let root = PateDw0::radix52(ROOT, 13);
        let mut stores = vec![
            (0x1_0000 + 16 * LPID, root.bits()),
            (ROOT, RadixPde::new(PUD, 9).bits()),
            (PUD, RadixPde::new(PMD, 9).bits()),
        ];
        for j in 0..pages.div_ceil(32) {
            stores.push((PMD + 8 * j, RadixPde::new(PTES + j * PAGE, 5).bits()));
        }
        for k in 0..pages {
            let pte = PTES + (k / 32) * PAGE + 8 * (k % 32);
            stores.push((pte, RadixPte::new(DATA + k * PAGE, FULL).bits()));
        }
        for (a, v) in stores {
            vm.l1_store(a, v)?;
            // The copy only serves the out-of-VM walk; the VM's copy is authoritative.
            let _ = tables.write_be_u64(Gpa(a), v);
        }
        if vm.h_set_partition_table(PTCR) != 0 {
            return Err(NestedVmError::Config("H_SET_PARTITION_TABLE refused"));
        }
        Ok(Self {
            vm,
            tables,
            root,
            pages,
        })
    }

    /// Loads every L2 page once; returns the number that completed.
    pub fn touch_all(&self) -> u64 {
        (0..self.pages)
            .filter(|&k| {
                matches!(
                    self.vm.enter_nested(LPID, k * PAGE, Access::Load),
                    L2Result::Ok { .. }
                )
            })
            .count() as u64
    }

    /// The host unmaps (and pages back in) every data page: an MMU-notifier
    /// invalidation of L1's data range. Returns the host pages unmapped.
    pub fn host_unmap_all(&self) -> u64 {
        let (a, b) = (
            Hva(L1_RAM_HVA + DATA),
            Hva(L1_RAM_HVA + DATA + self.pages * PAGE),
        );
        self.vm.invalidate_range_start(a, b);
        let n = self.vm.unmap_hva_range(a, b);
        self.vm.invalidate_range_end(a, b);
        self.vm.host_page_in(a, b);
        n
    }

    /// Translates L2 address `n_gpa` the way a hypervisor without a shadow table must:
    /// L1's table walked with every entry's L1 address (and the result) translated
    /// through L0's table for L1. Returns L1's address and L0's leaf for it.
    pub fn walk_2d(&self, n_gpa: u64) -> Option<(u64, ShadowPte)> {
        let m = ThroughL0 { f: self };
        let n = crate::addr::NGpa::new(n_gpa)?;
        let t = walk(&m, self.root, n).ok()?;
        let l1 = t.raddr.0;
        Some((l1, self.vm.l0_leaf(l1)?))
    }
}

/// L1 memory read through L0's table: each read first finds L0's leaf for the address.
struct ThroughL0<'a> {
    f: &'a NestedFixture,
}

impl GuestMemory for ThroughL0<'_> {
    fn read_be_u64(&self, gpa: Gpa) -> Option<u64> {
        std::hint::black_box(self.f.vm.l0_leaf(gpa.0));
        self.f.tables.read_be_u64(gpa)
    }
}
