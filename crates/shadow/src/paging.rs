//! The guest paging model: a pure reference walker over guest-physical memory.
//!
//! [`walk`] translates a guest-virtual address the way the CPU (and KVM's
//! `FNAME(walk_addr_generic)`) does, for every paging mode a guest can run in:
//! 32-bit paging (with and without CR4.PSE, with and without PSE-36), PAE paging, and
//! 64-bit 4-level and 5-level paging, with 4 KiB, 2 MiB, 4 MiB and 1 GiB pages.
//!
//! Invariants:
//! * The walker is pure: the only state it touches is the [`GuestPhysMemory`] it is
//!   given, and there only the accessed/dirty bits, each with one atomic compare-exchange
//!   (`cmpxchg_u64` for 8-byte entries, `cmpxchg_u32` for 4-byte ones), as hardware does.
//! * Order (KVM's walker): entries are read from the top level down; a non-present entry
//!   or one with a reserved bit set ends the walk with a #PF; after the leaf the
//!   permission check runs once on the accumulated rights; only if it passes are the A
//!   bits (top down) and the leaf's D bit (writes) set. A faulting walk writes nothing.
//!   A lost compare-exchange restarts the whole walk, at most [`MAX_WALK_RESTARTS`] times.
//! * The #PF error code has hardware semantics: P is 0 for a not-present entry and 1
//!   otherwise, reserved-bit faults carry P|RSVD, PK faults carry P|PK (also when the
//!   R/W or U/S check fails too), I/D is reported only with EFER.NXE (PAE or long mode)
//!   or CR4.SMEP, U means a user-mode (CPL 3, not implicit-supervisor) access.
//! * Reserved bits follow MAXPHYADDR and the mode: KVM's `__reset_rsvds_bits_mask`.
//! * Nothing here panics on any entry value, address or mode.
//!
//! ```
//! use revmap_shadow::paging::{walk, Access, CpuMode, Gpa, Gva, SparseMemory, GuestPhysMemory};
//! let mut mem = SparseMemory::new();
//! // 4-level: PML4 at 0x1000 -> PDPT at 0x2000 -> PD at 0x3000 with a 2 MiB leaf.
//! mem.write_u64(Gpa(0x1000), 0x2000 | 0x7).unwrap();
//! mem.write_u64(Gpa(0x2000), 0x3000 | 0x7).unwrap();
//! mem.write_u64(Gpa(0x3000), 0x20_0000 | 0x83).unwrap(); // P|W|PS, supervisor
//! let mode = CpuMode::long4(0x1000);
//! let w = walk(&mut mem, &mode, Gva(0x1234), Access::WRITE).unwrap();
//! assert_eq!(w.translation().unwrap().gpa, Gpa(0x20_1234));
//! // The walk set A on all three entries and D on the leaf.
//! assert_eq!(w.ad_writes.len(), 3);
//! assert_eq!(mem.read_u64(Gpa(0x3000)).unwrap(), 0x20_0000 | 0x83 | 0x60);
//! ```

use bitflags::bitflags;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use thiserror::Error;

/// A guest-virtual (linear) address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(transparent)]
pub struct Gva(pub u64);

/// A guest-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(transparent)]
pub struct Gpa(pub u64);

impl Gpa {
    /// The guest frame number (4 KiB).
    pub const fn gfn(self) -> u64 {
        self.0 >> 12
    }
}

/// CR0.WP (bit 16): supervisor writes honour R/W.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG (bit 31): paging enabled.
pub const CR0_PG: u64 = 1 << 31;
/// CR0.PE (bit 0): protected mode.
pub const CR0_PE: u64 = 1;
/// CR4.PSE (bit 4): 4 MiB pages in 32-bit paging.
pub const CR4_PSE: u64 = 1 << 4;
/// CR4.PAE (bit 5): 8-byte entries.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.LA57 (bit 12): 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// CR4.SMEP (bit 20).
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP (bit 21).
pub const CR4_SMAP: u64 = 1 << 21;
/// CR4.PKE (bit 22): protection keys for user pages (PKRU).
pub const CR4_PKE: u64 = 1 << 22;
/// CR4.PKS (bit 24): protection keys for supervisor pages (IA32_PKRS).
pub const CR4_PKS: u64 = 1 << 24;
/// EFER.LME (bit 8).
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA (bit 10): long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE (bit 11): bit 63 of entries is XD (else reserved).
pub const EFER_NXE: u64 = 1 << 11;

/// Entry bit 0: present.
pub const PT_PRESENT: u64 = 1;
/// Entry bit 1: R/W.
pub const PT_WRITABLE: u64 = 1 << 1;
/// Entry bit 2: U/S.
pub const PT_USER: u64 = 1 << 2;
/// Entry bit 5: accessed.
pub const PT_ACCESSED: u64 = 1 << 5;
/// Entry bit 6: dirty.
pub const PT_DIRTY: u64 = 1 << 6;
/// Entry bit 7: page size (PDE/PDPTE), PAT in a 4 KiB PTE.
pub const PT_PAGE_SIZE: u64 = 1 << 7;
/// Entry bit 63: execute-disable (with EFER.NXE).
pub const PT64_NX: u64 = 1 << 63;
/// Bits 12..51 of an 8-byte entry: the physical address field.
pub const PT64_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Bits 59..62 of a 64-bit leaf: the protection key.
pub const PT64_PKEY_SHIFT: u32 = 59;

bitflags! {
    /// What kind of access is being translated (the inputs of a #PF error code).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Access: u8 {
        /// A data write (else a read, unless `FETCH`).
        const WRITE = 1 << 0;
        /// A user-mode access (CPL 3). Clear for supervisor and implicit-supervisor accesses.
        const USER = 1 << 1;
        /// An instruction fetch.
        const FETCH = 1 << 2;
        /// An implicit supervisor access (descriptor tables, exception-delivery stacks):
        /// SMAP applies regardless of EFLAGS.AC. Never combined with `USER`.
        const IMPLICIT = 1 << 3;
        /// EFLAGS.AC was set (STAC): explicit supervisor data accesses ignore SMAP.
        const EFLAGS_AC = 1 << 4;
    }
}

bitflags! {
    /// Rights in KVM's ACC format (`ACC_EXEC_MASK` 1, `ACC_WRITE_MASK` 2, `ACC_USER_MASK` 4):
    /// the AND over all levels of R/W, U/S and ¬XD.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct Acc: u8 {
        /// `ACC_EXEC_MASK`: executable (no XD on any level).
        const EXEC = 1;
        /// `ACC_WRITE_MASK`: R/W=1 on every level.
        const WRITE = 2;
        /// `ACC_USER_MASK`: U/S=1 on every level.
        const USER = 4;
    }
}

impl Acc {
    /// `ACC_ALL`.
    pub const ALL: Acc = Acc::all();
}

bitflags! {
    /// The #PF error code (`PFERR_*_MASK`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct PfErrorCode: u32 {
        /// P: 0 = not-present entry, 1 = protection or reserved-bit fault.
        const PRESENT = 1 << 0;
        /// W/R: the access was a write.
        const WRITE = 1 << 1;
        /// U/S: the access was a user-mode access.
        const USER = 1 << 2;
        /// RSVD: a reserved bit was set in an entry.
        const RSVD = 1 << 3;
        /// I/D: instruction fetch (reported only with NXE or SMEP).
        const FETCH = 1 << 4;
        /// PK: protection-key violation.
        const PK = 1 << 5;
    }
}

/// The paging mode selected by CR0.PG, CR4.PAE, EFER.LMA and CR4.LA57.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PagingMode {
    /// CR0.PG=0: gpa = gva, no walk.
    Off,
    /// 32-bit paging: 2 levels of 4-byte entries (10 + 10 index bits).
    Bits32,
    /// PAE paging: 4 PDPTEs (PDPTR registers), then 2 levels of 8-byte entries.
    Pae,
    /// 64-bit 4-level paging (48-bit linear addresses).
    Long4,
    /// 64-bit 5-level paging (57-bit linear addresses).
    Long5,
}

impl PagingMode {
    /// The number of levels walked (KVM's `root_level`; 0 with paging off).
    pub const fn levels(self) -> u8 {
        match self {
            PagingMode::Off => 0,
            PagingMode::Bits32 => 2,
            PagingMode::Pae => 3,
            PagingMode::Long4 => 4,
            PagingMode::Long5 => 5,
        }
    }

    /// Whether entries are 4 bytes (32-bit paging: KVM's `has_4_byte_gpte`).
    pub const fn has_4_byte_gpte(self) -> bool {
        matches!(self, PagingMode::Bits32)
    }
}

/// The vCPU state a walk depends on: control registers, the PKRU/PKRS registers, the
/// relevant CPUID facts and the A20 gate (KVM's `cpu_role` plus what the walk reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CpuMode {
    /// CR0.
    pub cr0: u64,
    /// CR3 (the root table; bits 31:5 under PAE).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER (LMA included).
    pub efer: u64,
    /// PKRU (2 bits per key: AD at 2k, WD at 2k+1).
    pub pkru: u32,
    /// IA32_PKRS (same layout as PKRU, for supervisor pages).
    pub pkrs: u32,
    /// CPUID MAXPHYADDR (physical-address width, 32..=52).
    pub maxphyaddr: u8,
    /// CPUID PDPE1GB: 1 GiB pages allowed (else PDPTE.PS is reserved).
    pub gbpages: bool,
    /// CPUID PSE-36: a 32-bit 4 MiB PDE carries PA bits 32+ in bits 13+.
    pub pse36: bool,
    /// The A20 gate is enabled (else bit 20 of every physical address is masked).
    pub a20: bool,
    /// The PAE PDPTR registers loaded at the last CR3 write; `None` reads the PDPTEs
    /// from memory at each walk (as if reloaded).
    pub pdptrs: Option<[u64; 4]>,
}

impl CpuMode {
    /// A mode from raw registers, with MAXPHYADDR 40, 1 GiB pages, PSE-36, A20 on.
    pub const fn new(cr0: u64, cr3: u64, cr4: u64, efer: u64) -> CpuMode {
        CpuMode {
            cr0,
            cr3,
            cr4,
            efer,
            pkru: 0,
            pkrs: 0,
            maxphyaddr: 40,
            gbpages: true,
            pse36: true,
            a20: true,
            pdptrs: None,
        }
    }

    /// 64-bit 4-level paging at `cr3` with CR0.WP and EFER.NXE set.
    pub const fn long4(cr3: u64) -> CpuMode {
        CpuMode::new(
            CR0_PG | CR0_WP | CR0_PE,
            cr3,
            CR4_PAE,
            EFER_LME | EFER_LMA | EFER_NXE,
        )
    }

    /// The paging mode.
    pub const fn paging(&self) -> PagingMode {
        if self.cr0 & CR0_PG == 0 {
            PagingMode::Off
        } else if self.cr4 & CR4_PAE == 0 {
            PagingMode::Bits32
        } else if self.efer & EFER_LMA == 0 {
            PagingMode::Pae
        } else if self.cr4 & CR4_LA57 != 0 {
            PagingMode::Long5
        } else {
            PagingMode::Long4
        }
    }

    /// CR0.WP.
    pub const fn wp(&self) -> bool {
        self.cr0 & CR0_WP != 0
    }
    /// CR4.PSE (meaningful in 32-bit paging only; PAE and long mode always allow PS).
    pub const fn pse(&self) -> bool {
        self.cr4 & CR4_PSE != 0
    }
    /// Effective NXE: EFER.NXE under PAE or long mode (no XD bit in 4-byte entries).
    pub const fn nxe(&self) -> bool {
        self.efer & EFER_NXE != 0 && self.cr4 & CR4_PAE != 0
    }
    /// CR4.SMEP.
    pub const fn smep(&self) -> bool {
        self.cr4 & CR4_SMEP != 0
    }
    /// CR4.SMAP.
    pub const fn smap(&self) -> bool {
        self.cr4 & CR4_SMAP != 0
    }
    /// Effective PKE: CR4.PKE in long mode.
    pub const fn pke(&self) -> bool {
        self.cr4 & CR4_PKE != 0 && self.efer & EFER_LMA != 0
    }
    /// Effective PKS: CR4.PKS in long mode.
    pub const fn pks(&self) -> bool {
        self.cr4 & CR4_PKS != 0 && self.efer & EFER_LMA != 0
    }

    /// The A20 mask applied to every physical address the walk forms.
    pub const fn a20_mask(&self) -> u64 {
        if self.a20 {
            !0
        } else {
            !(1 << 20)
        }
    }

    /// Physical-address bits `[MAXPHYADDR, 51]` (reserved in every entry's address field).
    pub const fn high_rsvd(&self) -> u64 {
        let m = if self.maxphyaddr > 52 {
            52
        } else {
            self.maxphyaddr
        };
        bits(m as u32, 51)
    }

    /// The reserved-bit mask of an 8-byte entry at `level` (KVM's `rsvd_bits_mask`).
    /// `leaf` selects the large-page format of a PDE/PDPTE with PS=1.
    pub fn rsvd_mask_64(&self, level: u8, leaf: bool) -> u64 {
        let high = self.high_rsvd();
        let nx = if self.nxe() { 0 } else { PT64_NX };
        match (self.paging(), level) {
            (PagingMode::Pae, 3) => PT64_NX | bits(52, 62) | high | 0b1_1110_0110,
            (_, 4) | (_, 5) => high | nx | PT_PAGE_SIZE,
            (_, 3) if leaf => high | nx | bits(13, 29),
            (_, 2) if leaf => high | nx | bits(13, 20),
            _ => high | nx,
        }
    }

    /// The reserved-bit mask of a 32-bit 4 MiB PDE (PSE=1): bit 21 and the PSE-36 bits at
    /// or above MAXPHYADDR (all of 13..21 without PSE-36).
    pub fn rsvd_mask_pse_pde(&self) -> u64 {
        if !self.pse36 {
            return bits(13, 21);
        }
        let m = self.maxphyaddr.clamp(32, 40) as u32;
        bits(13 + (m - 32), 21)
    }
}

/// What of the vCPU state changes how guest entries are interpreted: KVM's `cpu_role`
/// (`kvm_mmu_page_role` base bits plus `kvm_mmu_extended_role`). Two modes with equal
/// roles give every guest entry the same meaning; a change resets the MMU context.
/// CR3, PKRU/PKRS and CR4.PGE are not part of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CpuRole {
    /// The paging mode (KVM's `level` / `root_level` with `has_4_byte_gpte`).
    pub paging: PagingMode,
    /// CR0.WP (`cr0_wp`).
    pub cr0_wp: bool,
    /// Effective EFER.NXE (`efer_nx`).
    pub efer_nx: bool,
    /// CR4.SMEP ∧ ¬CR0.WP (`smep_andnot_wp`).
    pub smep_andnot_wp: bool,
    /// CR4.SMAP ∧ ¬CR0.WP (`smap_andnot_wp`).
    pub smap_andnot_wp: bool,
    /// CR4.PSE (extended role `cr4_pse`).
    pub cr4_pse: bool,
    /// CR4.SMEP (extended `cr4_smep`).
    pub cr4_smep: bool,
    /// CR4.SMAP (extended `cr4_smap`).
    pub cr4_smap: bool,
    /// Effective CR4.PKE (extended `cr4_pke`).
    pub cr4_pke: bool,
    /// Effective CR4.PKS.
    pub cr4_pks: bool,
    /// MAXPHYADDR (reserved bits).
    pub maxphyaddr: u8,
    /// CPUID PDPE1GB.
    pub gbpages: bool,
    /// CPUID PSE-36.
    pub pse36: bool,
}

impl CpuMode {
    /// The role: everything here that changes how entries are read.
    pub const fn role(&self) -> CpuRole {
        let wp = self.wp();
        CpuRole {
            paging: self.paging(),
            cr0_wp: wp,
            efer_nx: self.nxe(),
            smep_andnot_wp: self.smep() && !wp,
            smap_andnot_wp: self.smap() && !wp,
            cr4_pse: self.pse(),
            cr4_smep: self.smep(),
            cr4_smap: self.smap(),
            cr4_pke: self.pke(),
            cr4_pks: self.pks(),
            maxphyaddr: self.maxphyaddr,
            gbpages: self.gbpages,
            pse36: self.pse36,
        }
    }
}

/// Bits `lo..=hi` set (empty if `lo > hi`).
const fn bits(lo: u32, hi: u32) -> u64 {
    if lo > hi || hi > 63 {
        return 0;
    }
    let top = if hi == 63 { !0 } else { (1u64 << (hi + 1)) - 1 };
    top & !((1u64 << lo) - 1)
}

/// Why guest memory could not be accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum MemoryError {
    /// No memory (no visible memslot) at this address.
    #[error("no guest memory at gpa {0:#x}")]
    Unbacked(u64),
    /// The address is not aligned to the access size.
    #[error("misaligned guest access at gpa {0:#x}")]
    Misaligned(u64),
    /// A page of the model's memory (or a walk's record) could not be allocated.
    #[error("out of memory")]
    NoMemory,
}

/// Guest-physical memory as the walker sees it: aligned little-endian loads and atomic
/// compare-exchanges of 4- and 8-byte words.
///
/// `cmpxchg_*` returns `Ok(Ok(()))` if the word held `old` and now holds `new`, and
/// `Ok(Err(current))` if it held something else (nothing written).
pub trait GuestPhysMemory {
    /// Loads the aligned u64 at `gpa`.
    fn read_u64(&self, gpa: Gpa) -> Result<u64, MemoryError>;
    /// Loads the aligned u32 at `gpa`.
    fn read_u32(&self, gpa: Gpa) -> Result<u32, MemoryError>;
    /// Atomically replaces the u64 at `gpa` with `new` if it holds `old`.
    fn cmpxchg_u64(&mut self, gpa: Gpa, old: u64, new: u64) -> Cmpxchg<u64>;
    /// Atomically replaces the u32 at `gpa` with `new` if it holds `old`.
    fn cmpxchg_u32(&mut self, gpa: Gpa, old: u32, new: u32) -> Cmpxchg<u32>;
}

/// The outcome of a compare-exchange on guest memory: `Ok(Ok(()))` if the value was
/// replaced, `Ok(Err(current))` if the memory held `current` instead, or why the
/// address could not be accessed.
pub type Cmpxchg<T> = Result<Result<(), T>, MemoryError>;

/// A multiply-shift hasher for frame numbers (keys are already well spread).
#[derive(Default, Clone, Copy)]
pub struct GfnHasher(u64);

impl Hasher for GfnHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A `HashMap` keyed by frame number with [`GfnHasher`].
pub type GfnMap<V> = HashMap<u64, V, BuildHasherDefault<GfnHasher>>;

/// A simple sparse guest memory: 4 KiB pages allocated on first write, zero elsewhere.
/// With a limit set, addresses at or above it are unbacked.
#[derive(Clone, Debug, Default)]
pub struct SparseMemory {
    pages: GfnMap<Box<[u64; 512]>>,
    limit: Option<u64>,
}

impl SparseMemory {
    /// An empty memory covering the whole physical address space.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty memory backed only below `limit` bytes.
    pub fn with_limit(limit: u64) -> Self {
        SparseMemory {
            pages: GfnMap::default(),
            limit: Some(limit),
        }
    }

    fn check(&self, gpa: Gpa, size: u64) -> Result<(), MemoryError> {
        if gpa.0 % size != 0 {
            return Err(MemoryError::Misaligned(gpa.0));
        }
        match self.limit {
            Some(l) if gpa.0 >= l => Err(MemoryError::Unbacked(gpa.0)),
            _ => Ok(()),
        }
    }

    /// Stores the aligned u64 at `gpa` (a plain guest store).
    pub fn write_u64(&mut self, gpa: Gpa, val: u64) -> Result<(), MemoryError> {
        self.check(gpa, 8)?;
        let gfn = gpa.0 >> 12;
        if !self.pages.contains_key(&gfn) {
            self.pages
                .try_reserve(1)
                .map_err(|_| MemoryError::NoMemory)?;
            let page = revmap_rmap::error::try_box([0; 512]).map_err(|_| MemoryError::NoMemory)?;
            self.pages.insert(gfn, page);
        }
        if let Some(page) = self.pages.get_mut(&gfn) {
            page[((gpa.0 >> 3) & 511) as usize] = val;
        }
        Ok(())
    }

    /// Stores the aligned u32 at `gpa`.
    pub fn write_u32(&mut self, gpa: Gpa, val: u32) -> Result<(), MemoryError> {
        self.check(gpa, 4)?;
        let q = Gpa(gpa.0 & !7);
        let old = self.read_u64(q)?;
        let shift = (gpa.0 & 4) * 8;
        let new = (old & !(0xffff_ffffu64 << shift)) | (u64::from(val) << shift);
        self.write_u64(q, new)
    }

    /// The number of 4 KiB pages holding data.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// Forgets every page.
    pub fn clear(&mut self) {
        self.pages.clear();
    }
}

impl GuestPhysMemory for SparseMemory {
    fn read_u64(&self, gpa: Gpa) -> Result<u64, MemoryError> {
        self.check(gpa, 8)?;
        Ok(self
            .pages
            .get(&(gpa.0 >> 12))
            .map_or(0, |p| p[((gpa.0 >> 3) & 511) as usize]))
    }

    fn read_u32(&self, gpa: Gpa) -> Result<u32, MemoryError> {
        self.check(gpa, 4)?;
        let q = self.read_u64(Gpa(gpa.0 & !7))?;
        Ok((q >> ((gpa.0 & 4) * 8)) as u32)
    }

    fn cmpxchg_u64(&mut self, gpa: Gpa, old: u64, new: u64) -> Cmpxchg<u64> {
        let cur = self.read_u64(gpa)?;
        if cur != old {
            return Ok(Err(cur));
        }
        self.write_u64(gpa, new)?;
        Ok(Ok(()))
    }

    fn cmpxchg_u32(&mut self, gpa: Gpa, old: u32, new: u32) -> Cmpxchg<u32> {
        let cur = self.read_u32(gpa)?;
        if cur != old {
            return Ok(Err(cur));
        }
        self.write_u32(gpa, new)?;
        Ok(Ok(()))
    }
}

/// One paging-structure entry the walk read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryRead {
    /// KVM level: 1 = PTE, 2 = PDE, 3 = PDPTE, 4 = PML4E, 5 = PML5E.
    pub level: u8,
    /// Where the entry is (for PAE PDPTEs: CR3 + 8·index, also when read from PDPTRs).
    pub gpa: Gpa,
    /// The value read (a 4-byte entry zero-extended).
    pub value: u64,
    /// The rights of the entries above this one, ANDed (KVM's `pt_access[level - 1]`):
    /// the `role.access` of a shadow page for the table holding this entry.
    pub pt_access: Acc,
}

impl EntryRead {
    /// The guest frame of the table holding this entry (KVM's `table_gfn[level - 1]`).
    pub const fn table_gfn(&self) -> u64 {
        self.gpa.gfn()
    }
}

/// One accessed/dirty update the walk attempted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdWrite {
    /// The entry's level.
    pub level: u8,
    /// The entry's address.
    pub gpa: Gpa,
    /// The value the compare-exchange expected.
    pub old: u64,
    /// The value it tried to store (`old` plus A, and D on a written leaf).
    pub new: u64,
    /// Whether the compare-exchange succeeded.
    pub ok: bool,
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address of the access (A20-masked).
    pub gpa: Gpa,
    /// log2 of the mapped page size: 12, 21, 22 (4 MiB) or 30.
    pub page_shift: u8,
    /// The leaf level (1 = 4 KiB PTE; 2 = 2/4 MiB PDE; 3 = 1 GiB PDPTE).
    pub leaf_level: u8,
    /// The leaf entry as it was read (before this walk's A/D update).
    pub leaf: u64,
    /// The rights accumulated over all levels (KVM's `pte_access`).
    pub pte_access: Acc,
    /// The protection key of the leaf (0 outside long mode).
    pub pkey: u8,
}

/// Why a walk faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultReason {
    /// The entry at `level` had P=0.
    NotPresent {
        /// Level of the entry.
        level: u8,
    },
    /// The entry at `level` had a reserved bit set.
    Reserved {
        /// Level of the entry.
        level: u8,
    },
    /// A table at `level` lies outside guest memory.
    Unbacked {
        /// Level of the entry that could not be read.
        level: u8,
    },
    /// The permission check on the accumulated rights failed (U/S, R/W, XD, SMEP, SMAP
    /// or a protection key; `pk` tells the last).
    Protection {
        /// The protection-key check failed (possibly among others).
        pk: bool,
    },
}

/// A #PF the walk raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    /// The error code pushed for the guest.
    pub error_code: PfErrorCode,
    /// What caused it.
    pub reason: FaultReason,
}

/// Everything one walk did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Walk {
    /// Every entry read, top level first, in read order (restarts append).
    pub reads: Vec<EntryRead>,
    /// Every A/D compare-exchange attempted, in order.
    pub ad_writes: Vec<AdWrite>,
    /// How many times a lost compare-exchange restarted the walk.
    pub restarts: u32,
    /// The translation or the #PF.
    pub outcome: Result<Translation, PageFault>,
}

impl Walk {
    /// The translation, if the walk succeeded.
    pub fn translation(&self) -> Option<&Translation> {
        self.outcome.as_ref().ok()
    }
    /// The #PF, if the walk faulted.
    pub fn fault(&self) -> Option<&PageFault> {
        self.outcome.as_ref().err()
    }
}

/// A walk that could not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum WalkError {
    /// The A/D compare-exchange kept losing (another agent keeps changing the entries).
    #[error("walk of {0:#x} restarted {MAX_WALK_RESTARTS} times")]
    TooManyRestarts(u64),
    /// Guest memory refused an A/D update (misaligned or vanished table).
    #[error("A/D update failed: {0}")]
    Memory(#[from] MemoryError),
}

/// The most times one walk restarts after a lost A/D compare-exchange.
pub const MAX_WALK_RESTARTS: u32 = 16;

/// The effect of one fault check, for [`permission_fault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PermissionCheck {
    /// Any check failed.
    pub fault: bool,
    /// The protection-key check failed.
    pub pk: bool,
}

/// KVM's `permission_fault`: the single check of an access against the accumulated
/// rights `acc` of a translation whose leaf has protection key `pkey`.
pub fn permission_fault(mode: &CpuMode, access: Access, acc: Acc, pkey: u8) -> PermissionCheck {
    let user = access.contains(Access::USER);
    let write = access.contains(Access::WRITE);
    let fetch = access.contains(Access::FETCH);
    let user_page = acc.contains(Acc::USER);
    let mut fault = false;
    if user && !user_page {
        fault = true;
    }
    if write && !acc.contains(Acc::WRITE) && (user || mode.wp()) {
        fault = true;
    }
    if fetch && !acc.contains(Acc::EXEC) {
        fault = true;
    }
    if fetch && !user && user_page && mode.smep() {
        fault = true;
    }
    if !fetch
        && !user
        && user_page
        && mode.smap()
        && (!access.contains(Access::EFLAGS_AC) || access.contains(Access::IMPLICIT))
    {
        fault = true;
    }
    let mut pk = false;
    if !fetch {
        let reg = if user_page {
            mode.pke().then_some(mode.pkru)
        } else {
            mode.pks().then_some(mode.pkrs)
        };
        if let Some(reg) = reg {
            let bits = (reg >> (2 * u32::from(pkey & 15))) & 3;
            if bits & 1 != 0 || (write && bits & 2 != 0 && (user || mode.wp())) {
                pk = true;
            }
        }
    }
    PermissionCheck {
        fault: fault || pk,
        pk,
    }
}

/// Whether a present gpte at `level` maps a page (KVM's `is_last_gpte`): level 1 always;
/// a PDE with PS (32-bit paging only with CR4.PSE); a long-mode PDPTE with PS.
pub const fn is_last_gpte(mode: &CpuMode, level: u8, gpte: u64) -> bool {
    let ps = gpte & PT_PAGE_SIZE != 0;
    match (mode.paging(), level) {
        (_, 1) => true,
        (PagingMode::Bits32, 2) => ps && mode.pse(),
        (_, 2) => ps,
        (PagingMode::Long4 | PagingMode::Long5, 3) => ps,
        _ => false,
    }
}

/// Whether a present gpte at `level` has a reserved bit set (KVM's
/// `is_rsvd_bits_set` on the guest MMU): the mode's masks by MAXPHYADDR, NXE, level and
/// leaf format, PS in a 1 GiB PDPTE without GBPAGES, the PSE-36 rules of a 4 MiB PDE.
pub fn is_rsvd_gpte(mode: &CpuMode, level: u8, gpte: u64) -> bool {
    let leaf = is_last_gpte(mode, level, gpte);
    if mode.paging().has_4_byte_gpte() {
        return level == 2 && leaf && gpte & mode.rsvd_mask_pse_pde() != 0;
    }
    let mut mask = mode.rsvd_mask_64(level, leaf);
    if leaf && level == 3 && !mode.gbpages {
        mask |= PT_PAGE_SIZE;
    }
    gpte & mask != 0
}

/// The rights a leaf gpte grants by itself (KVM's `gpte_access`), in ACC format.
pub fn gpte_access(mode: &CpuMode, gpte: u64) -> Acc {
    entry_acc(mode, 1, gpte)
}

/// KVM's `protect_clean_gpte`: write permission is withheld from a clean (D=0) leaf so
/// that the first write faults and sets D. A writable SPTE exists only for a dirty gpte.
pub fn protect_clean_gpte(acc: Acc, gpte: u64) -> Acc {
    if gpte & PT_DIRTY == 0 {
        acc - Acc::WRITE
    } else {
        acc
    }
}

/// KVM's `prefetch_invalid_gpte`: a gpte that must not be mapped speculatively (prefetch
/// or unsync resync): not present, A clear, or a reserved bit set.
pub fn prefetch_invalid_gpte(mode: &CpuMode, level: u8, gpte: u64) -> bool {
    gpte & PT_PRESENT == 0 || gpte & PT_ACCESSED == 0 || is_rsvd_gpte(mode, level, gpte)
}

/// The rights one 8-byte entry grants (PAE PDPTEs grant everything).
fn entry_acc(mode: &CpuMode, level: u8, v: u64) -> Acc {
    if mode.paging() == PagingMode::Pae && level == 3 {
        return Acc::ALL;
    }
    let mut a = Acc::empty();
    if v & PT_WRITABLE != 0 {
        a |= Acc::WRITE;
    }
    if v & PT_USER != 0 {
        a |= Acc::USER;
    }
    if !(mode.nxe() && v & PT64_NX != 0) {
        a |= Acc::EXEC;
    }
    a
}

/// The address of the entry for `gva` at `level` in the table at `table`.
fn entry_gpa(mode: &CpuMode, table: u64, level: u8, gva: u64) -> u64 {
    match mode.paging() {
        PagingMode::Bits32 => {
            let idx = (gva >> (12 + 10 * (u32::from(level) - 1))) & 1023;
            table + idx * 4
        }
        PagingMode::Pae if level == 3 => table + ((gva >> 30) & 3) * 8,
        _ => {
            let idx = (gva >> (12 + 9 * (u32::from(level) - 1))) & 511;
            table + idx * 8
        }
    }
}

/// Walks the guest page tables for `gva` under `mode`, as the CPU does for an `access`,
/// setting A/D bits in `mem` if the access is allowed. See the module docs for the rules.
pub fn walk<M: GuestPhysMemory + ?Sized>(
    mem: &mut M,
    mode: &CpuMode,
    gva: Gva,
    access: Access,
) -> Result<Walk, WalkError> {
    let mut w = Walk {
        reads: Vec::new(),
        ad_writes: Vec::new(),
        restarts: 0,
        outcome: Err(PageFault {
            error_code: PfErrorCode::empty(),
            reason: FaultReason::NotPresent { level: 0 },
        }),
    };
    loop {
        // Room for one pass's reads (at most five levels), reserved before it.
        w.reads.try_reserve(5).map_err(|_| MemoryError::NoMemory)?;
        match walk_once(mem, mode, gva, access, &mut w)? {
            Some(outcome) => {
                w.outcome = outcome;
                return Ok(w);
            }
            None => {
                w.restarts += 1;
                if w.restarts >= MAX_WALK_RESTARTS {
                    return Err(WalkError::TooManyRestarts(gva.0));
                }
            }
        }
    }
}

/// One pass of the walk; `None` means a lost compare-exchange (restart).
fn walk_once<M: GuestPhysMemory + ?Sized>(
    mem: &mut M,
    mode: &CpuMode,
    gva: Gva,
    access: Access,
    w: &mut Walk,
) -> Result<Option<Result<Translation, PageFault>>, WalkError> {
    let paging = mode.paging();
    let a20 = mode.a20_mask();
    let nxe_or_smep = mode.nxe() || mode.smep();
    let mut ec = PfErrorCode::empty();
    if access.contains(Access::WRITE) {
        ec |= PfErrorCode::WRITE;
    }
    if access.contains(Access::USER) {
        ec |= PfErrorCode::USER;
    }
    if access.contains(Access::FETCH) && nxe_or_smep {
        ec |= PfErrorCode::FETCH;
    }
    let fault = |ec: PfErrorCode, reason| {
        Some(Err(PageFault {
            error_code: ec,
            reason,
        }))
    };

    let (va, top) = match paging {
        PagingMode::Off => {
            return Ok(Some(Ok(Translation {
                gpa: Gpa(gva.0 & a20),
                page_shift: 12,
                leaf_level: 0,
                leaf: 0,
                pte_access: Acc::ALL,
                pkey: 0,
            })))
        }
        PagingMode::Bits32 | PagingMode::Pae => (gva.0 & 0xffff_ffff, paging.levels()),
        PagingMode::Long4 | PagingMode::Long5 => (gva.0, paging.levels()),
    };
    let mut table = match paging {
        PagingMode::Pae => mode.cr3 & 0xffff_ffe0,
        PagingMode::Bits32 => mode.cr3 & 0xffff_f000,
        _ => mode.cr3 & PT64_ADDR_MASK,
    } & a20;
    let first = w.reads.len();
    let four = paging.has_4_byte_gpte();
    let mut acc = Acc::ALL;
    let mut level = top;
    let (leaf, page_shift, base): (u64, u8, u64) = loop {
        let gpa = entry_gpa(mode, table, level, va) & a20;
        let read = if four {
            mem.read_u32(Gpa(gpa)).map(u64::from)
        } else if let (PagingMode::Pae, 3, Some(p)) = (paging, level, mode.pdptrs) {
            Ok(p[((va >> 30) & 3) as usize])
        } else {
            mem.read_u64(Gpa(gpa))
        };
        let v = match read {
            Ok(v) => v,
            Err(_) => return Ok(fault(ec, FaultReason::Unbacked { level })),
        };
        w.reads.push(EntryRead {
            level,
            gpa: Gpa(gpa),
            value: v,
            pt_access: acc,
        });
        if v & PT_PRESENT == 0 {
            return Ok(fault(ec, FaultReason::NotPresent { level }));
        }
        let rsvd = PfErrorCode::PRESENT | PfErrorCode::RSVD;
        if is_rsvd_gpte(mode, level, v) {
            return Ok(fault(ec | rsvd, FaultReason::Reserved { level }));
        }
        if four {
            acc &= entry_acc(mode, level, v) | Acc::EXEC;
            if is_last_gpte(mode, level, v) && level == 2 {
                let hi = ((v >> 13) & 0xff) << 32;
                break (v, 22, (v & 0xffc0_0000) | hi);
            }
            if level == 1 {
                break (v, 12, v & 0xffff_f000);
            }
            table = v & 0xffff_f000 & a20;
        } else {
            acc &= entry_acc(mode, level, v);
            if is_last_gpte(mode, level, v) {
                let shift = 12 + 9 * (u32::from(level) - 1);
                break (v, shift as u8, v & PT64_ADDR_MASK & !((1u64 << shift) - 1));
            }
            table = v & PT64_ADDR_MASK & a20;
        }
        level -= 1;
        if level == 0 {
            // Unreachable for well-formed modes (level 1 is always a leaf); stay total.
            return Ok(fault(
                ec | PfErrorCode::PRESENT,
                FaultReason::NotPresent { level },
            ));
        }
    };
    let pkey = if paging == PagingMode::Long4 || paging == PagingMode::Long5 {
        ((leaf >> PT64_PKEY_SHIFT) & 15) as u8
    } else {
        0
    };
    let check = permission_fault(mode, access, acc, pkey);
    if check.fault {
        let mut e = ec | PfErrorCode::PRESENT;
        if check.pk {
            e |= PfErrorCode::PK;
        }
        return Ok(fault(e, FaultReason::Protection { pk: check.pk }));
    }
    // FNAME(update_accessed_dirty_bits): top down, A where missing, D on a written leaf.
    let write = access.contains(Access::WRITE);
    let reads = w.reads.len();
    for i in first..reads {
        let e = w.reads[i];
        if paging == PagingMode::Pae && e.level == 3 {
            continue; // PAE PDPTEs have no A bit.
        }
        let is_leaf = i + 1 == reads;
        let mut new = e.value | PT_ACCESSED;
        if is_leaf && write {
            new |= PT_DIRTY;
        }
        if new == e.value {
            continue;
        }
        // Room for the record before the entry is written.
        w.ad_writes
            .try_reserve(1)
            .map_err(|_| MemoryError::NoMemory)?;
        let ok = if four {
            mem.cmpxchg_u32(e.gpa, e.value as u32, new as u32)?.is_ok()
        } else {
            mem.cmpxchg_u64(e.gpa, e.value, new)?.is_ok()
        };
        w.ad_writes.push(AdWrite {
            level: e.level,
            gpa: e.gpa,
            old: e.value,
            new,
            ok,
        });
        if !ok {
            return Ok(None);
        }
    }
    let mask = (1u64 << page_shift) - 1;
    Ok(Some(Ok(Translation {
        gpa: Gpa(((base & !mask) | (va & mask)) & a20),
        page_shift,
        leaf_level: level,
        leaf,
        pte_access: acc,
        pkey,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PT_PRESENT;
    const W: u64 = PT_WRITABLE;
    const U: u64 = PT_USER;
    const PWU: u64 = P | W | U;

    fn mem_with(entries: &[(u64, u64)]) -> SparseMemory {
        let mut m = SparseMemory::new();
        for &(a, v) in entries {
            m.write_u64(Gpa(a), v).unwrap();
        }
        m
    }

    fn ec(w: &Walk) -> u32 {
        w.fault().expect("a fault").error_code.bits()
    }

    /// 32-bit paging: PD at 0x1000; va 0x0040_3123 -> PDE index 1, PTE index 3.
    fn mode32(cr4: u64) -> CpuMode {
        CpuMode::new(CR0_PG | CR0_PE | CR0_WP, 0x1000, cr4, 0)
    }

    #[test]
    fn bits32_4k_walk_uses_4_byte_entries_and_sets_a_d_with_u32_cmpxchg() {
        let mut m = SparseMemory::new();
        m.write_u32(Gpa(0x1004), 0x2000 | PWU as u32).unwrap();
        m.write_u32(Gpa(0x200c), 0x7000 | PWU as u32).unwrap();
        // The neighbouring 4-byte entry must not be touched by the 32-bit cmpxchg.
        m.write_u32(Gpa(0x2008), 0xdead_b001).unwrap();
        let mode = mode32(0);
        let w = walk(
            &mut m,
            &mode,
            Gva(0x0040_3123),
            Access::WRITE | Access::USER,
        )
        .unwrap();
        let t = w.translation().unwrap();
        assert_eq!((t.gpa, t.page_shift, t.leaf_level), (Gpa(0x7123), 12, 1));
        assert_eq!(
            w.reads.iter().map(|r| r.gpa.0).collect::<Vec<_>>(),
            [0x1004, 0x200c]
        );
        assert_eq!(m.read_u32(Gpa(0x200c)).unwrap(), 0x7000 | PWU as u32 | 0x60);
        assert_eq!(m.read_u32(Gpa(0x1004)).unwrap(), 0x2000 | PWU as u32 | 0x20);
        assert_eq!(m.read_u32(Gpa(0x2008)).unwrap(), 0xdead_b001);
        // No XD in 4-byte entries and no NXE: a fetch fault carries no I/D.
        m.write_u32(Gpa(0x200c), 0x7000 | P as u32).unwrap();
        let w = walk(
            &mut m,
            &mode,
            Gva(0x0040_3123),
            Access::FETCH | Access::USER,
        )
        .unwrap();
        assert_eq!(ec(&w), 0x5);
        // ...unless SMEP is on.
        let w = walk(
            &mut m,
            &mode32(CR4_SMEP),
            Gva(0x0040_3123),
            Access::FETCH | Access::USER,
        )
        .unwrap();
        assert_eq!(ec(&w), 0x15);
    }

    #[test]
    fn bits32_pse_4m_pages_with_and_without_pse36() {
        let mut m = SparseMemory::new();
        // A 4 MiB PDE for va 0x0040_0000 at PA 0x3_0080_0000 (PSE-36: bits 13..20 = PA 32..39).
        let pde = 0x0080_0000u64 | (3 << 13) | PT_PAGE_SIZE | PWU;
        m.write_u32(Gpa(0x1004), pde as u32).unwrap();
        let va = Gva(0x0041_2345);
        let w = walk(&mut m, &mode32(CR4_PSE), va, Access::empty()).unwrap();
        let t = w.translation().unwrap();
        assert_eq!(
            (t.gpa, t.page_shift, t.leaf_level),
            (Gpa(0x3_0081_2345), 22, 2)
        );
        // Without PSE-36 (CPUID), bits 13..21 are reserved: P|RSVD.
        let mut no36 = mode32(CR4_PSE);
        no36.pse36 = false;
        let w = walk(&mut m, &no36, va, Access::empty()).unwrap();
        assert_eq!(ec(&w), 0x9);
        assert_eq!(
            w.fault().unwrap().reason,
            FaultReason::Reserved { level: 2 }
        );
        // MAXPHYADDR 33: PA bit 33 (PDE bit 14) is reserved, bit 32 is not.
        let mut m33 = mode32(CR4_PSE);
        m33.maxphyaddr = 33;
        assert_eq!(ec(&walk(&mut m, &m33, va, Access::empty()).unwrap()), 0x9);
        m.write_u32(Gpa(0x1004), (pde & !(1 << 14)) as u32).unwrap();
        let t = *walk(&mut m, &m33, va, Access::empty())
            .unwrap()
            .translation()
            .unwrap();
        assert_eq!(t.gpa, Gpa(0x1_0081_2345));
        // Bit 21 is always reserved in a 4 MiB PDE.
        m.write_u32(Gpa(0x1004), (pde | 1 << 21) as u32).unwrap();
        assert_eq!(
            ec(&walk(&mut m, &mode32(CR4_PSE), va, Access::empty()).unwrap()),
            0x9
        );
        // With CR4.PSE=0 the PS bit is ignored: the PDE points to a page table.
        m.write_u32(Gpa(0x1004), 0x0080_0000 | PT_PAGE_SIZE as u32 | PWU as u32)
            .unwrap();
        m.write_u32(Gpa(0x80_0000 + 0x12 * 4), 0x9000 | PWU as u32)
            .unwrap();
        let w = walk(&mut m, &mode32(0), va, Access::empty()).unwrap();
        assert_eq!(w.translation().unwrap().gpa, Gpa(0x9345));
        assert_eq!(w.reads.len(), 2);
    }

    fn pae(efer: u64) -> CpuMode {
        CpuMode::new(CR0_PG | CR0_PE | CR0_WP, 0x1020, CR4_PAE, efer)
    }

    #[test]
    fn pae_walk_pdptes_nx_and_reserved_bits() {
        // CR3 = 0x1020 (32-byte aligned); va 0xc060_1234: PDPTE 3, PDE 3, PTE 1.
        let mut m = mem_with(&[
            (0x1020 + 3 * 8, 0x2000 | P),
            (0x2000 + 3 * 8, 0x3000 | PWU),
            (0x3000 + 8, 0x8000 | PWU | PT64_NX),
        ]);
        let va = Gva(0x1_c060_1234); // Truncated to 32 bits.
        let w = walk(&mut m, &pae(EFER_NXE), va, Access::WRITE).unwrap();
        assert_eq!(w.translation().unwrap().gpa, Gpa(0x8234));
        // The PDPTE has no A bit: only the PDE and PTE get A (and D).
        assert_eq!(
            w.ad_writes.iter().map(|a| a.level).collect::<Vec<_>>(),
            [2, 1]
        );
        assert_eq!(
            ec(&walk(&mut m, &pae(EFER_NXE), va, Access::FETCH).unwrap()),
            0x11
        );
        // Bit 63 is reserved without NXE.
        assert_eq!(
            ec(&walk(&mut m, &pae(0), va, Access::empty()).unwrap()),
            0x9
        );
        // PDPTE bits 1-2 and 5-8 are reserved.
        for bit in [1, 2, 5, 6, 7, 8] {
            m.write_u64(Gpa(0x1038), 0x2000 | P | 1 << bit).unwrap();
            let w = walk(&mut m, &pae(EFER_NXE), va, Access::empty()).unwrap();
            assert_eq!(
                w.fault().unwrap().reason,
                FaultReason::Reserved { level: 3 },
                "bit {bit}"
            );
        }
        // The cached PDPTRs win over memory.
        let mut cached = pae(EFER_NXE);
        cached.pdptrs = Some([0, 0, 0, 0x2000 | P]);
        assert!(walk(&mut m, &cached, va, Access::empty())
            .unwrap()
            .translation()
            .is_some());
        // A 2 MiB PDE; bit 13 reserved in it.
        m.write_u64(Gpa(0x2018), 0x40_0000 | PT_PAGE_SIZE | PWU)
            .unwrap();
        let t = *walk(&mut m, &cached, va, Access::empty())
            .unwrap()
            .translation()
            .unwrap();
        assert_eq!((t.gpa, t.page_shift), (Gpa(0x40_1234), 21));
        m.write_u64(Gpa(0x2018), 0x40_0000 | 1 << 13 | PT_PAGE_SIZE | PWU)
            .unwrap();
        assert_eq!(
            ec(&walk(&mut m, &cached, va, Access::empty()).unwrap()),
            0x9
        );
    }

    /// 4-level tables: PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000, va 0.
    fn long_tables(pte: u64) -> SparseMemory {
        mem_with(&[
            (0x1000, 0x2000 | PWU),
            (0x2000, 0x3000 | PWU),
            (0x3000, 0x4000 | PWU),
            (0x4000, pte),
        ])
    }

    #[test]
    fn long_mode_reserved_bits_follow_maxphyaddr_and_level() {
        let mut mode = CpuMode::long4(0x1000);
        mode.maxphyaddr = 36;
        let mut m = long_tables(0xff_0000_0000 | PWU);
        let w = walk(&mut m, &mode, Gva(0), Access::WRITE | Access::USER).unwrap();
        assert_eq!(ec(&w), 0xf); // P|W|U|RSVD
        assert_eq!(
            w.fault().unwrap().reason,
            FaultReason::Reserved { level: 1 }
        );
        assert!(w.ad_writes.is_empty() && m.read_u64(Gpa(0x1000)).unwrap() & PT_ACCESSED == 0);
        mode.maxphyaddr = 40;
        assert!(walk(&mut m, &mode, Gva(0), Access::empty())
            .unwrap()
            .translation()
            .is_some());
        // PS in a PML4E is reserved.
        m.write_u64(Gpa(0x1000), 0x2000 | PWU | PT_PAGE_SIZE)
            .unwrap();
        assert_eq!(
            ec(&walk(&mut m, &mode, Gva(0), Access::empty()).unwrap()),
            0x9
        );
        // A 1 GiB PDPTE; bits 13..29 reserved; PS reserved without GBPAGES.
        m.write_u64(Gpa(0x1000), 0x2000 | PWU).unwrap();
        m.write_u64(Gpa(0x2000), 0x4000_0000 | PT_PAGE_SIZE | PWU)
            .unwrap();
        let w = walk(&mut m, &mode, Gva(0x1234_5678), Access::empty()).unwrap();
        let t = w.translation().unwrap();
        assert_eq!(
            (t.gpa, t.page_shift, t.leaf_level),
            (Gpa(0x5234_5678), 30, 3)
        );
        mode.gbpages = false;
        assert_eq!(
            ec(&walk(&mut m, &mode, Gva(0), Access::empty()).unwrap()),
            0x9
        );
        mode.gbpages = true;
        m.write_u64(Gpa(0x2000), 0x4000_0000 | 1 << 29 | PT_PAGE_SIZE | PWU)
            .unwrap();
        assert_eq!(
            ec(&walk(&mut m, &mode, Gva(0), Access::empty()).unwrap()),
            0x9
        );
        // A table outside guest memory faults as not present.
        let mut small = SparseMemory::with_limit(0x3000);
        small.write_u64(Gpa(0x1000), 0x2000 | PWU).unwrap();
        small.write_u64(Gpa(0x2000), 0x8000 | PWU).unwrap();
        let w = walk(&mut small, &mode, Gva(0), Access::empty()).unwrap();
        assert_eq!(
            w.fault().unwrap().reason,
            FaultReason::Unbacked { level: 2 }
        );
        assert_eq!(ec(&w), 0);
    }

    #[test]
    fn five_level_walk_reads_five_entries() {
        let mut m = long_tables(0x9000 | PWU);
        m.write_u64(Gpa(0x5000 + 8 * 0x100), 0x1000 | PWU).unwrap();
        let mut mode = CpuMode::long4(0x5000);
        mode.cr4 |= CR4_LA57;
        let va = Gva(0xff00_0000_0000_0123);
        let w = walk(&mut m, &mode, va, Access::empty()).unwrap();
        assert_eq!(w.reads.len(), 5);
        assert_eq!(w.reads[0].level, 5);
        assert_eq!(w.translation().unwrap().gpa, Gpa(0x9123));
    }

    #[test]
    fn supervisor_rules_wp_smep_smap() {
        let mut mode = CpuMode::long4(0x1000);
        let mut m = long_tables(0x9000 | P | U | PT_DIRTY | PT_ACCESSED);
        // WP=1: a supervisor write to a read-only page faults; WP=0 allows it.
        assert_eq!(
            ec(&walk(&mut m, &mode, Gva(0), Access::WRITE).unwrap()),
            0x3
        );
        mode.cr0 &= !CR0_WP;
        assert!(walk(&mut m, &mode, Gva(0), Access::WRITE)
            .unwrap()
            .translation()
            .is_some());
        // ...but never a user write.
        assert_eq!(
            ec(&walk(&mut m, &mode, Gva(0), Access::WRITE | Access::USER).unwrap()),
            0x7
        );
        // SMEP: supervisor fetch from a user page.
        mode.cr4 |= CR4_SMEP;
        assert_eq!(
            ec(&walk(&mut m, &mode, Gva(0), Access::FETCH).unwrap()),
            0x11
        );
        // SMAP: supervisor data access to a user page, unless AC and explicit.
        mode.cr4 |= CR4_SMAP;
        assert_eq!(
            ec(&walk(&mut m, &mode, Gva(0), Access::empty()).unwrap()),
            0x1
        );
        let ac = Access::EFLAGS_AC;
        assert!(walk(&mut m, &mode, Gva(0), ac)
            .unwrap()
            .translation()
            .is_some());
        let implicit = Access::EFLAGS_AC | Access::IMPLICIT;
        assert_eq!(ec(&walk(&mut m, &mode, Gva(0), implicit).unwrap()), 0x1);
        // SMAP does not apply to fetches (SMEP does) nor to user accesses.
        assert!(walk(&mut m, &mode, Gva(0), Access::USER)
            .unwrap()
            .translation()
            .is_some());
    }

    #[test]
    fn protection_keys_pku_and_pks() {
        let mut mode = CpuMode::long4(0x1000);
        mode.cr4 |= CR4_PKE | CR4_PKS;
        let key3 = 3u64 << PT64_PKEY_SHIFT;
        let mut m = long_tables(0x9000 | PWU | key3 | PT_ACCESSED | PT_DIRTY);
        mode.pkru = 0b10 << 6; // key 3: WD
        assert!(walk(&mut m, &mode, Gva(0), Access::USER)
            .unwrap()
            .translation()
            .is_some());
        assert_eq!(
            ec(&walk(&mut m, &mode, Gva(0), Access::USER | Access::WRITE).unwrap()),
            0x27
        );
        // Supervisor write with WP=0 ignores WD; fetches ignore keys.
        mode.cr0 &= !CR0_WP;
        let ok = walk(&mut m, &mode, Gva(0), Access::WRITE).unwrap();
        assert_eq!(ok.translation().unwrap().pkey, 3);
        mode.pkru = 0b01 << 6; // key 3: AD
        assert!(walk(&mut m, &mode, Gva(0), Access::FETCH | Access::USER)
            .unwrap()
            .translation()
            .is_some());
        assert_eq!(
            ec(&walk(&mut m, &mode, Gva(0), Access::USER).unwrap()),
            0x25
        );
        // PK is reported together with an R/W violation.
        m.write_u64(Gpa(0x4000), 0x9000 | P | U | key3).unwrap();
        assert_eq!(
            ec(&walk(&mut m, &mode, Gva(0), Access::USER | Access::WRITE).unwrap()),
            0x27
        );
        // PKS guards supervisor pages with PKRS.
        m.write_u64(Gpa(0x4000), 0x9000 | P | W | key3).unwrap();
        mode.pkrs = 0b01 << 6;
        assert_eq!(
            ec(&walk(&mut m, &mode, Gva(0), Access::empty()).unwrap()),
            0x21
        );
        // Outside long mode there are no keys.
        mode.efer &= !EFER_LMA;
        assert!(!mode.pke() && !mode.pks());
    }

    #[test]
    fn a20_masks_table_and_final_addresses() {
        let mut m = long_tables(0x10_9000 | PWU);
        let mut mode = CpuMode::long4(0x1000);
        mode.a20 = false;
        let t = *walk(&mut m, &mode, Gva(0x123), Access::empty())
            .unwrap()
            .translation()
            .unwrap();
        assert_eq!(t.gpa, Gpa(0x9123));
    }

    /// A memory whose first `fail` compare-exchanges lose to a concurrent writer.
    struct Racy {
        inner: SparseMemory,
        fail: u32,
    }

    impl GuestPhysMemory for Racy {
        fn read_u64(&self, gpa: Gpa) -> Result<u64, MemoryError> {
            self.inner.read_u64(gpa)
        }
        fn read_u32(&self, gpa: Gpa) -> Result<u32, MemoryError> {
            self.inner.read_u32(gpa)
        }
        fn cmpxchg_u64(&mut self, gpa: Gpa, old: u64, new: u64) -> Cmpxchg<u64> {
            if self.fail > 0 {
                self.fail -= 1;
                return Ok(Err(old ^ PT_ACCESSED));
            }
            self.inner.cmpxchg_u64(gpa, old, new)
        }
        fn cmpxchg_u32(&mut self, gpa: Gpa, old: u32, new: u32) -> Cmpxchg<u32> {
            self.inner.cmpxchg_u32(gpa, old, new)
        }
    }

    #[test]
    fn lost_cmpxchg_restarts_the_walk_and_gives_up_eventually() {
        let mode = CpuMode::long4(0x1000);
        let mut m = Racy {
            inner: long_tables(0x9000 | PWU),
            fail: 1,
        };
        let w = walk(&mut m, &mode, Gva(0), Access::WRITE).unwrap();
        assert_eq!(w.restarts, 1);
        assert_eq!(w.reads.len(), 8); // Re-reads after the restart are recorded.
        assert!(!w.ad_writes[0].ok && w.ad_writes[1..].iter().all(|a| a.ok));
        assert_eq!(m.inner.read_u64(Gpa(0x4000)).unwrap(), 0x9000 | PWU | 0x60);
        let mut m = Racy {
            inner: long_tables(0x9000 | PWU),
            fail: u32::MAX,
        };
        assert_eq!(
            walk(&mut m, &mode, Gva(0), Access::empty()),
            Err(WalkError::TooManyRestarts(0))
        );
    }

    #[test]
    fn role_tracks_interpretation_not_root_or_keys() {
        let a = CpuMode::long4(0x1000);
        let mut b = CpuMode::long4(0x5000);
        b.pkru = 0x5555_5554;
        b.cr4 |= 1 << 7; // PGE
        assert_eq!(a.role(), b.role());
        b.cr0 &= !CR0_WP;
        assert_ne!(a.role(), b.role());
        let mut c = a;
        c.cr4 |= CR4_LA57;
        assert_eq!(c.role().paging, PagingMode::Long5);
        // EFER.NXE without PAE has no effect.
        let p32 = CpuMode::new(CR0_PG | CR0_PE, 0, 0, EFER_NXE);
        assert!(!p32.role().efer_nx);
        assert_eq!(p32.role().paging, PagingMode::Bits32);
    }

    #[test]
    fn pt_access_is_the_rights_above_each_entry() {
        // PML4E P|W|U, PDPTE P|U (read-only), PDE P|W|U|XD, PTE P|W|U.
        let mut m = mem_with(&[
            (0x1000, 0x2000 | PWU),
            (0x2000, 0x3000 | P | U),
            (0x3000, 0x4000 | PWU | PT64_NX),
            (0x4000, 0x9000 | PWU),
        ]);
        let w = walk(&mut m, &CpuMode::long4(0x1000), Gva(0), Access::USER).unwrap();
        let acc: Vec<_> = w.reads.iter().map(|r| r.pt_access).collect();
        assert_eq!(acc, [Acc::ALL, Acc::ALL, Acc::USER | Acc::EXEC, Acc::USER]);
        assert_eq!(w.reads[2].table_gfn(), 3);
        assert_eq!(w.translation().unwrap().pte_access, Acc::USER);
    }

    #[test]
    fn gpte_helpers_for_sync_and_prefetch() {
        let l4 = CpuMode::long4(0);
        let leaf = 0x9000 | PWU | PT_ACCESSED;
        assert!(!prefetch_invalid_gpte(&l4, 1, leaf));
        assert!(prefetch_invalid_gpte(&l4, 1, leaf & !PT_ACCESSED));
        assert!(prefetch_invalid_gpte(&l4, 1, leaf & !P));
        assert!(prefetch_invalid_gpte(&l4, 1, leaf | 1 << 45));
        assert_eq!(gpte_access(&l4, leaf | PT64_NX), Acc::WRITE | Acc::USER);
        assert_eq!(protect_clean_gpte(Acc::ALL, leaf), Acc::USER | Acc::EXEC);
        assert_eq!(protect_clean_gpte(Acc::ALL, leaf | PT_DIRTY), Acc::ALL);
        // Leaf rules by mode.
        assert!(is_last_gpte(&l4, 3, PT_PAGE_SIZE) && !is_last_gpte(&l4, 4, PT_PAGE_SIZE));
        let p32 = CpuMode::new(CR0_PG, 0, 0, 0);
        assert!(!is_last_gpte(&p32, 2, PT_PAGE_SIZE));
        assert!(is_last_gpte(
            &CpuMode::new(CR0_PG, 0, CR4_PSE, 0),
            2,
            PT_PAGE_SIZE
        ));
        let pae = CpuMode::new(CR0_PG, 0, CR4_PAE, 0);
        assert!(!is_last_gpte(&pae, 3, PT_PAGE_SIZE) && is_rsvd_gpte(&pae, 3, PT_PAGE_SIZE));
    }

    #[test]
    fn paging_off_is_identity() {
        let mode = CpuMode::new(CR0_PE, 0, 0, 0);
        let w = walk(
            &mut SparseMemory::new(),
            &mode,
            Gva(0x12_3456),
            Access::WRITE,
        )
        .unwrap();
        assert_eq!(w.translation().unwrap().gpa, Gpa(0x12_3456));
        assert!(w.reads.is_empty());
    }
}
