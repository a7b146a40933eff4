//! A seeded model of a Linux x86-64 guest driving the shadow MMU ([`ShadowVm`]): one
//! [`X86Cpu`] per vCPU, over the kernel's shared direct map ([`KernelMap`]).
//!
//! * Boot ([`KernelMap::boot`]): the kernel direct map at `0xffff_8880_0000_0000` maps
//!   all of RAM with 1 GiB pages where a whole GiB is RAM and 2 MiB pages for the rest,
//!   in tables written into guest memory (the first 2 MiB of RAM hold them); every
//!   process's PML4 points its kernel half at the same PDPT, as Linux's `pgd_alloc`
//!   copies the kernel entries.
//! * Processes ([`X86Cpu::step`]): each vCPU runs its own processes with real 4-level
//!   tables built in guest memory by 8-byte stores through [`ShadowVm::guest_store`]
//!   (routed as the SPTEs route them: plain, unsync or emulated), touching their VMAs
//!   through [`ShadowVm::access`]. A #PF the MMU injects is handled as Linux's fault
//!   handler does: demand paging (new frame, tables allocated on the way), or a
//!   copy-on-write break (reuse when the frame is no longer shared), then INVLPG and
//!   the access again. fork write-protects the parent's writable pages, shares every
//!   frame with the child and flushes (CR3 reload); exec builds a new mm, switches CR3
//!   and tears the old one down; exit switches to another process and tears down;
//!   munmap clears the PTEs, frees emptied page tables and flushes (INVLPG per page up
//!   to 33 pages, else a CR3 reload: Linux's `tlb_single_page_flush_ceiling`); PTE
//!   updates (MADV_DONTNEED, page migration, write-protection) store the PTE and
//!   INVLPG; the scheduler switches CR3 between the vCPU's processes. The kernel reads
//!   any frame and writes its own frames through the direct map.
//!
//! # Guest-observable correctness
//!
//! The model knows every mapping it made. Every access's outcome is compared with what
//! its tables imply: a completed access (shadow hit, fixed fault, or an emulated write
//! to a write-protected frame) must land on the frame and offset the tables map; a #PF
//! must be one the tables imply (not present, or a write to a read-only page), with the
//! error code's P, W, U and I/D bits. Anything else is a mismatch ([`X86Counters::mismatches`]),
//! as is an error of the MMU.
//!
//! # Invariants
//!
//! * Every choice comes from the vCPU's own ChaCha8 stream (seed, vCPU), never from
//!   timing or results that depend on another thread; maps are ordered (`BTreeMap`), so
//!   on one thread the sequence of MMU calls is a pure function of the seed.
//! * Frames are partitioned between vCPUs (each allocates only from its own range), and
//!   a process runs only on its vCPU, so no two threads edit the same guest page table.
//!   The kernel's tables are written once at boot.
//! * Every frame that is not a live page table is all zero: PTEs are cleared before a
//!   table is freed, and data writes store zero (data contents are not modelled), so a
//!   freed frame can be reused as a table or as data.
//! * A PTE change that removes or changes a translation is followed by INVLPG or a
//!   CR3 reload before the next access through it (as the hardware TLB requires).

use crate::report::digest_word;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use revmap_shadow::mmu::{AccessOutcome, ShadowError};
use revmap_shadow::paging::{
    Access, CpuMode, PfErrorCode, CR4_SMAP, CR4_SMEP, PT64_NX, PT_ACCESSED, PT_DIRTY, PT_PAGE_SIZE,
    PT_PRESENT, PT_USER, PT_WRITABLE,
};
use revmap_shadow::vm::ShadowVm;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Guest virtual base of the kernel direct map (Linux's `__PAGE_OFFSET` without KASLR).
pub const DIRECT_MAP: u64 = 0xffff_8880_0000_0000;
/// Frames at the start of RAM reserved for the kernel (its page tables live here).
pub const KERNEL_RESERVED_FRAMES: u64 = 512;
/// INVLPG per page up to this many pages, else a full flush (Linux's
/// `tlb_single_page_flush_ceiling`).
pub const FLUSH_CEILING: usize = 33;

/// Frame of the kernel's direct-map PDPT.
const KERNEL_PDPT: u64 = 1;
/// A user page-table entry pointing to a table (`_PAGE_TABLE`).
const USER_TABLE: u64 = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY;
/// A kernel table entry (`_KERNPG_TABLE`).
const KERNEL_TABLE: u64 = PT_PRESENT | PT_WRITABLE | PT_ACCESSED | PT_DIRTY;
/// Text of a new process.
const TEXT_BASE: u64 = 0x40_0000;
/// Heap of a new process.
const HEAP_BASE: u64 = 0x100_0000;
/// Top of the mmap area (mappings grow down from here).
const MMAP_TOP: u64 = 0x7f00_0000_0000;
/// Top of the stack.
const STACK_TOP: u64 = 0x7ffd_0000_0000;

/// Relative weights of the guest's operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct X86Mix {
    /// A user access (load, store or instruction fetch) to a VMA of the running process.
    pub touch: u32,
    /// A kernel access through the direct map (loads anywhere, stores to its own frames).
    pub kernel_touch: u32,
    /// fork: write-protect the parent, share every frame with the child.
    pub fork: u32,
    /// exec: a new mm, CR3 switch, the old mm torn down.
    pub exec: u32,
    /// exit: switch to another process, tear the exiting one down.
    pub exit: u32,
    /// mmap of an anonymous region (no table change: demand paging).
    pub mmap: u32,
    /// munmap of a region: PTEs cleared, emptied page tables freed, TLB flushed.
    pub munmap: u32,
    /// One PTE changed (MADV_DONTNEED, migration to a new frame, write-protect), INVLPG.
    pub pte_update: u32,
    /// Context switch to another process of the vCPU (a CR3 switch).
    pub switch: u32,
}

impl Default for X86Mix {
    fn default() -> Self {
        Self {
            touch: 800,
            kernel_touch: 100,
            fork: 6,
            exec: 4,
            exit: 5,
            mmap: 10,
            munmap: 8,
            pte_update: 30,
            switch: 20,
        }
    }
}

impl X86Mix {
    fn weights(&self) -> [u32; 9] {
        [
            self.touch,
            self.kernel_touch,
            self.fork,
            self.exec,
            self.exit,
            self.mmap,
            self.munmap,
            self.pte_update,
            self.switch,
        ]
    }
}

/// The x86 guest workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct X86Workload {
    /// Operation weights.
    pub mix: X86Mix,
    /// Processes per vCPU at most (fork is skipped at the limit).
    pub max_processes: usize,
    /// Largest VMA, in 4 KiB pages.
    pub max_vma_pages: u64,
    /// Share of user accesses to writable VMAs that are stores, per mille.
    pub store_per_mille: u32,
    /// Share of user accesses that go to an already-mapped page, per mille (the rest
    /// pick any page of a VMA).
    pub hot_per_mille: u32,
}

impl Default for X86Workload {
    fn default() -> Self {
        Self {
            mix: X86Mix::default(),
            max_processes: 8,
            max_vma_pages: 128,
            store_per_mille: 300,
            hot_per_mille: 600,
        }
    }
}

/// Guest-side counters of one vCPU (summed in reports).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct X86Counters {
    /// User accesses.
    pub accesses: u64,
    /// Kernel accesses through the direct map.
    pub kernel_accesses: u64,
    /// Accesses served by a shadow-table hit.
    pub shadow_hits: u64,
    /// Accesses that took a shadow page fault the MMU fixed (invisible to the guest).
    pub shadow_fixed: u64,
    /// Stores the MMU emulated (a write to a write-protected frame).
    pub emulated_accesses: u64,
    /// #PFs injected into the guest: not present.
    pub pf_not_present: u64,
    /// #PFs injected into the guest: write to a read-only page (copy-on-write).
    pub pf_protection: u64,
    /// Demand-paging faults served.
    pub demand_faults: u64,
    /// Copy-on-write breaks (a new frame, or reuse of an unshared one).
    pub cow_breaks: u64,
    /// forks.
    pub forks: u64,
    /// execs.
    pub execs: u64,
    /// exits.
    pub exits: u64,
    /// mmaps.
    pub mmaps: u64,
    /// munmaps.
    pub munmaps: u64,
    /// Single-PTE updates.
    pub pte_updates: u64,
    /// Page-table stores.
    pub pte_writes: u64,
    /// Page-table stores the MMU emulated (the table was write-protected).
    pub pte_writes_emulated: u64,
    /// INVLPGs.
    pub invlpgs: u64,
    /// CR3 loads of another process's tables.
    pub cr3_switches: u64,
    /// CR3 reloads of the same tables (full TLB flushes).
    pub tlb_flushes: u64,
    /// Page tables allocated.
    pub tables_allocated: u64,
    /// Page tables freed.
    pub tables_freed: u64,
    /// Operations skipped for want of a free frame.
    pub out_of_frames: u64,
    /// Outcomes that disagree with the guest's tables, and MMU errors (must be 0).
    pub mismatches: u64,
    /// The first mismatch.
    pub first_mismatch: Option<String>,
}

impl X86Counters {
    /// Adds `o`'s counts (the first mismatch is kept).
    pub fn merge(&mut self, o: &Self) {
        self.accesses += o.accesses;
        self.kernel_accesses += o.kernel_accesses;
        self.shadow_hits += o.shadow_hits;
        self.shadow_fixed += o.shadow_fixed;
        self.emulated_accesses += o.emulated_accesses;
        self.pf_not_present += o.pf_not_present;
        self.pf_protection += o.pf_protection;
        self.demand_faults += o.demand_faults;
        self.cow_breaks += o.cow_breaks;
        self.forks += o.forks;
        self.execs += o.execs;
        self.exits += o.exits;
        self.mmaps += o.mmaps;
        self.munmaps += o.munmaps;
        self.pte_updates += o.pte_updates;
        self.pte_writes += o.pte_writes;
        self.pte_writes_emulated += o.pte_writes_emulated;
        self.invlpgs += o.invlpgs;
        self.cr3_switches += o.cr3_switches;
        self.tlb_flushes += o.tlb_flushes;
        self.tables_allocated += o.tables_allocated;
        self.tables_freed += o.tables_freed;
        self.out_of_frames += o.out_of_frames;
        self.mismatches += o.mismatches;
        if self.first_mismatch.is_none() {
            self.first_mismatch.clone_from(&o.first_mismatch);
        }
    }
}

/// The kernel's direct map, written into guest memory at boot.
#[derive(Clone, Copy, Debug)]
pub struct KernelMap {
    /// RAM in 4 KiB frames.
    pub frames: u64,
    /// The PML4 entry every process gets at the direct map's index.
    pub pml4e: u64,
    /// Direct-map pages: 1 GiB and 2 MiB.
    pub pages_1g: u64,
    /// 2 MiB pages.
    pub pages_2m: u64,
}

impl KernelMap {
    /// Writes the direct map's tables for `ram_bytes` of RAM (at least 2 MiB) into the
    /// reserved frames.
    pub fn boot(vm: &ShadowVm, ram_bytes: u64) -> Result<Self, ShadowError> {
        let frames = ram_bytes >> 12;
        let gib = ram_bytes >> 30;
        let mut next_pd = KERNEL_PDPT + 1;
        let leaf = PT_PRESENT | PT_WRITABLE | PT_ACCESSED | PT_DIRTY | PT_PAGE_SIZE | PT64_NX;
        let (mut pages_1g, mut pages_2m) = (0, 0);
        for g in 0..ram_bytes.div_ceil(1 << 30) {
            let slot = (KERNEL_PDPT << 12) + 8 * g;
            if g < gib {
                vm.guest_store(slot, g << 30 | leaf)?;
                pages_1g += 1;
                continue;
            }
            let pd = next_pd;
            next_pd += 1;
            let left = (ram_bytes - (g << 30)) >> 21;
            for i in 0..left.min(512) {
                vm.guest_store((pd << 12) + 8 * i, ((g << 30) + (i << 21)) | leaf)?;
                pages_2m += 1;
            }
            vm.guest_store(slot, pd << 12 | KERNEL_TABLE)?;
        }
        Ok(Self {
            frames,
            pml4e: KERNEL_PDPT << 12 | KERNEL_TABLE,
            pages_1g,
            pages_2m,
        })
    }

    /// Index of the direct map in a PML4.
    pub const fn pml4_index() -> u64 {
        (DIRECT_MAP >> 39) & 511
    }
}

/// The control state of a Linux x86-64 vCPU with `cr3` loaded: 4-level paging, WP,
/// NXE, SMEP and SMAP.
pub fn linux_mode(cr3: u64) -> CpuMode {
    let mut m = CpuMode::long4(cr3);
    m.cr4 |= CR4_SMEP | CR4_SMAP;
    m
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Free,
    Data,
    Table,
}

/// One vCPU's share of guest frames: a bump pointer, a free list and a count of the
/// mappings of each frame (copy-on-write sharing).
#[derive(Debug)]
struct Frames {
    base: u64,
    len: u64,
    next: u64,
    free: Vec<u64>,
    refs: Vec<u32>,
    kind: Vec<Kind>,
}

impl Frames {
    fn new(base: u64, len: u64) -> Self {
        let n = usize::try_from(len).unwrap_or(0);
        Self {
            base,
            len,
            next: 0,
            free: Vec::new(),
            refs: vec![0; n],
            kind: vec![Kind::Free; n],
        }
    }

    fn idx(&self, gfn: u64) -> Option<usize> {
        gfn.checked_sub(self.base)
            .filter(|&i| i < self.len)
            .and_then(|i| usize::try_from(i).ok())
    }

    fn alloc(&mut self, kind: Kind) -> Option<u64> {
        let gfn = match self.free.pop() {
            Some(g) => g,
            None if self.next < self.len => {
                self.next += 1;
                self.base + self.next - 1
            }
            None => return None,
        };
        let i = self.idx(gfn)?;
        self.refs[i] = 1;
        self.kind[i] = kind;
        Some(gfn)
    }

    fn get(&mut self, gfn: u64) {
        if let Some(i) = self.idx(gfn) {
            self.refs[i] += 1;
        }
    }

    fn refs(&self, gfn: u64) -> u32 {
        self.idx(gfn).map_or(0, |i| self.refs[i])
    }

    /// Drops one reference; frees the frame at zero.
    fn put(&mut self, gfn: u64) {
        let Some(i) = self.idx(gfn) else { return };
        self.refs[i] = self.refs[i].saturating_sub(1);
        if self.refs[i] == 0 {
            self.kind[i] = Kind::Free;
            self.free.push(gfn);
        }
    }

    fn kind(&self, gfn: u64) -> Kind {
        self.idx(gfn).map_or(Kind::Table, |i| self.kind[i])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VmaKind {
    Text,
    Data,
    Stack,
    Mmap,
}

#[derive(Clone, Copy, Debug)]
struct Vma {
    /// First virtual page number.
    start: u64,
    npages: u64,
    write: bool,
    exec: bool,
    kind: VmaKind,
}

impl Vma {
    fn contains(&self, vpn: u64) -> bool {
        vpn >= self.start && vpn < self.start + self.npages
    }
}

/// A mapped page, as the guest's PTE says.
#[derive(Clone, Copy, Debug)]
struct Page {
    frame: u64,
    writable: bool,
}

/// A process: its PML4, VMAs, mapped pages and page tables (level, va >> level's
/// coverage -> frame; level 3 tables cover 512 GiB, level 2 1 GiB, level 1 2 MiB).
#[derive(Debug)]
struct Process {
    pml4: u64,
    vmas: Vec<Vma>,
    pages: BTreeMap<u64, Page>,
    tables: BTreeMap<(u32, u64), u64>,
    next_mmap: u64,
}

/// What a user or kernel access should do, by the guest's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Completes at this guest-physical address.
    Lands(u64),
    /// #PF: not present.
    NotPresent,
    /// #PF: write to a read-only page.
    ReadOnly,
}

const fn table_shift(level: u32) -> u32 {
    12 + 9 * level
}

/// One vCPU's guest: its processes, frames, random stream and counters.
#[derive(Debug)]
pub struct X86Cpu {
    /// Index of the vCPU in the [`ShadowVm`].
    pub vcpu: usize,
    rng: ChaCha8Rng,
    cfg: X86Workload,
    kernel: KernelMap,
    frames: Frames,
    procs: Vec<Process>,
    current: usize,
    /// Counters.
    pub counters: X86Counters,
    /// Digest of every operation and outcome.
    pub digest: u64,
}

impl X86Cpu {
    /// vCPU `vcpu` of `nvcpus`, with its share of the frames above the kernel's, its
    /// first process built and loaded (the vCPU is added to `vm` in that process's
    /// CR3).
    pub fn new(
        vm: &ShadowVm,
        kernel: KernelMap,
        vcpu_index: usize,
        nvcpus: usize,
        seed: u64,
        cfg: X86Workload,
    ) -> Result<Self, ShadowError> {
        let avail = kernel.frames.saturating_sub(KERNEL_RESERVED_FRAMES);
        let share = avail / nvcpus.max(1) as u64;
        let base = KERNEL_RESERVED_FRAMES + share * vcpu_index as u64;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(0x86_0000 + vcpu_index as u64);
        let mut cpu = Self {
            vcpu: 0,
            rng,
            cfg,
            kernel,
            frames: Frames::new(base, share),
            procs: Vec::new(),
            current: 0,
            counters: X86Counters::default(),
            digest: 0,
        };
        let p = cpu.new_mm(vm)?.ok_or(ShadowError::NoSpace)?;
        cpu.vcpu = vm.add_vcpu(linux_mode(p.pml4 << 12));
        cpu.procs.push(p);
        Ok(cpu)
    }

    /// Processes of this vCPU.
    pub fn processes(&self) -> usize {
        self.procs.len()
    }

    fn mismatch(&mut self, what: String) {
        self.counters.mismatches += 1;
        if self.counters.first_mismatch.is_none() {
            self.counters.first_mismatch = Some(format!("vCPU {}: {what}", self.vcpu));
        }
    }

    fn note(&mut self, x: u64) {
        self.digest = digest_word(self.digest, x);
    }

    /// One guest operation, drawn from the mix.
    pub fn step(&mut self, vm: &ShadowVm) {
        let w = self.cfg.mix.weights();
        let total: u32 = w.iter().sum();
        let mut x = self.rng.gen_range(0..total.max(1));
        let mut op = 0;
        for (i, &wi) in w.iter().enumerate() {
            if x < wi {
                op = i;
                break;
            }
            x -= wi;
        }
        self.note(op as u64);
        let r = match op {
            0 => self.touch(vm),
            1 => self.kernel_touch(vm),
            2 => self.fork(vm),
            3 => self.exec(vm),
            4 => self.exit(vm),
            5 => {
                self.mmap();
                Ok(())
            }
            6 => self.munmap(vm),
            7 => self.pte_update(vm),
            _ => self.switch(vm),
        };
        if let Err(e) = r {
            self.mismatch(format!("shadow MMU error: {e}"));
        }
    }

    // ------------------------------------------------------------ page tables

    fn store(&mut self, vm: &ShadowVm, gpa: u64, val: u64) -> Result<(), ShadowError> {
        self.counters.pte_writes += 1;
        if vm.guest_store(gpa, val)? {
            self.counters.pte_writes_emulated += 1;
        }
        Ok(())
    }

    /// The leaf PTE's guest-physical address for `va`, allocating the tables on the
    /// way when `alloc`. `None`: a table is missing (and not allocated) or no frame.
    fn pte_gpa(
        &mut self,
        vm: &ShadowVm,
        p: usize,
        va: u64,
        alloc: bool,
    ) -> Result<Option<u64>, ShadowError> {
        let Some(mut table) = self.procs.get(p).map(|pr| pr.pml4) else {
            return Ok(None);
        };
        for level in (1..=3u32).rev() {
            let parent_slot = (table << 12) + 8 * ((va >> table_shift(level)) & 511);
            let key = (level, va >> table_shift(level));
            let found = self.procs[p].tables.get(&key).copied();
            table = match found {
                Some(t) => t,
                None if !alloc => return Ok(None),
                None => {
                    let Some(t) = self.frames.alloc(Kind::Table) else {
                        self.counters.out_of_frames += 1;
                        return Ok(None);
                    };
                    self.counters.tables_allocated += 1;
                    self.store(vm, parent_slot, t << 12 | USER_TABLE)?;
                    self.procs[p].tables.insert(key, t);
                    t
                }
            };
        }
        Ok(Some((table << 12) + 8 * ((va >> 12) & 511)))
    }

    fn leaf(frame: u64, writable: bool, exec: bool) -> u64 {
        let mut e = frame << 12 | PT_PRESENT | PT_USER;
        if writable {
            e |= PT_WRITABLE;
        }
        if !exec {
            e |= PT64_NX;
        }
        e
    }

    /// Maps `vpn` of process `p` to `frame` (tables allocated as needed). Returns
    /// false if a table could not be allocated.
    fn map(
        &mut self,
        vm: &ShadowVm,
        p: usize,
        vpn: u64,
        page: Page,
        exec: bool,
    ) -> Result<bool, ShadowError> {
        let Some(pte) = self.pte_gpa(vm, p, vpn << 12, true)? else {
            return Ok(false);
        };
        self.store(vm, pte, Self::leaf(page.frame, page.writable, exec))?;
        self.procs[p].pages.insert(vpn, page);
        Ok(true)
    }

    /// Clears the PTE of `vpn` and drops its frame (no flush).
    fn unmap(&mut self, vm: &ShadowVm, p: usize, vpn: u64) -> Result<(), ShadowError> {
        let Some(page) = self.procs.get_mut(p).and_then(|pr| pr.pages.remove(&vpn)) else {
            return Ok(());
        };
        if let Some(pte) = self.pte_gpa(vm, p, vpn << 12, false)? {
            self.store(vm, pte, 0)?;
        }
        self.frames.put(page.frame);
        Ok(())
    }

    fn invlpg(&mut self, vm: &ShadowVm, va: u64) -> Result<(), ShadowError> {
        self.counters.invlpgs += 1;
        let v = self.vcpu;
        vm.with_mmu(|m| m.invlpg(v, va))
    }

    /// A CR3 load: another process's tables, or a reload (full flush) of the same.
    fn load_cr3(&mut self, vm: &ShadowVm, pml4: u64) -> Result<(), ShadowError> {
        let v = self.vcpu;
        let same = self.procs.get(self.current).is_some_and(|p| p.pml4 == pml4);
        if same {
            self.counters.tlb_flushes += 1;
        } else {
            self.counters.cr3_switches += 1;
        }
        vm.with_mmu(|m| m.load_cr3(v, pml4 << 12))
    }

    /// Flushes the pages `vpns` of the running process: INVLPG each up to the ceiling,
    /// else a CR3 reload.
    fn flush(&mut self, vm: &ShadowVm, vpns: &[u64]) -> Result<(), ShadowError> {
        if vpns.len() <= FLUSH_CEILING {
            for &vpn in vpns {
                self.invlpg(vm, vpn << 12)?;
            }
            Ok(())
        } else {
            let pml4 = self.procs[self.current].pml4;
            self.load_cr3(vm, pml4)
        }
    }

    // ------------------------------------------------------------ processes

    /// A new mm with the kernel half and a fresh set of VMAs (text, data, heap, stack).
    fn new_mm(&mut self, vm: &ShadowVm) -> Result<Option<Process>, ShadowError> {
        let Some(pml4) = self.frames.alloc(Kind::Table) else {
            self.counters.out_of_frames += 1;
            return Ok(None);
        };
        self.counters.tables_allocated += 1;
        let k = self.kernel.pml4e;
        self.store(vm, (pml4 << 12) + 8 * KernelMap::pml4_index(), k)?;
        let max = self.cfg.max_vma_pages.max(4);
        let size = |rng: &mut ChaCha8Rng| rng.gen_range(1..=max);
        let text = size(&mut self.rng);
        let data = size(&mut self.rng);
        let heap = size(&mut self.rng);
        let stack = size(&mut self.rng);
        let vmas = vec![
            Vma {
                start: TEXT_BASE >> 12,
                npages: text,
                write: false,
                exec: true,
                kind: VmaKind::Text,
            },
            Vma {
                start: (TEXT_BASE >> 12) + text.next_multiple_of(512),
                npages: data,
                write: true,
                exec: false,
                kind: VmaKind::Data,
            },
            Vma {
                start: HEAP_BASE >> 12,
                npages: heap,
                write: true,
                exec: false,
                kind: VmaKind::Data,
            },
            Vma {
                start: (STACK_TOP >> 12) - stack,
                npages: stack,
                write: true,
                exec: false,
                kind: VmaKind::Stack,
            },
        ];
        Ok(Some(Process {
            pml4,
            vmas,
            pages: BTreeMap::new(),
            tables: BTreeMap::new(),
            next_mmap: MMAP_TOP >> 12,
        }))
    }

    /// Tears down process `p` (not running): every PTE cleared and frame dropped, then
    /// every table's entry in its parent cleared and the table freed, the PML4 last.
    fn teardown(&mut self, vm: &ShadowVm, p: usize) -> Result<(), ShadowError> {
        let vpns: Vec<u64> = self.procs[p].pages.keys().copied().collect();
        for vpn in vpns {
            self.unmap(vm, p, vpn)?;
        }
        self.free_tables(vm, p, |_| true)?;
        let pml4 = self.procs[p].pml4;
        self.store(vm, (pml4 << 12) + 8 * KernelMap::pml4_index(), 0)?;
        self.frames.put(pml4);
        self.counters.tables_freed += 1;
        Ok(())
    }

    /// Frees the tables of `p` for which `which(key)` holds, children first; their
    /// entries must already be clear. Clears each one's entry in its parent.
    fn free_tables(
        &mut self,
        vm: &ShadowVm,
        p: usize,
        which: impl Fn(&(u32, u64)) -> bool,
    ) -> Result<(), ShadowError> {
        for level in 1..=3u32 {
            let keys: Vec<(u32, u64)> = self.procs[p]
                .tables
                .keys()
                .filter(|k| k.0 == level && which(k))
                .copied()
                .collect();
            for key in keys {
                let va = key.1 << table_shift(level);
                let parent = if level == 3 {
                    Some(self.procs[p].pml4)
                } else {
                    self.procs[p]
                        .tables
                        .get(&(level + 1, va >> table_shift(level + 1)))
                        .copied()
                };
                if let Some(parent) = parent {
                    let slot = (parent << 12) + 8 * ((va >> table_shift(level)) & 511);
                    self.store(vm, slot, 0)?;
                }
                if let Some(t) = self.procs[p].tables.remove(&key) {
                    self.frames.put(t);
                    self.counters.tables_freed += 1;
                }
            }
        }
        Ok(())
    }

    fn fork(&mut self, vm: &ShadowVm) -> Result<(), ShadowError> {
        if self.procs.len() >= self.cfg.max_processes.max(1) {
            return self.switch(vm);
        }
        let Some(mut child) = self.new_mm(vm)? else {
            return Ok(());
        };
        self.counters.forks += 1;
        let cur = self.current;
        child.vmas = self.procs[cur].vmas.clone();
        child.next_mmap = self.procs[cur].next_mmap;
        self.procs.push(child);
        let c = self.procs.len() - 1;
        let pages: Vec<(u64, Page)> = self.procs[cur]
            .pages
            .iter()
            .map(|(&v, &pg)| (v, pg))
            .collect();
        let mut protected = Vec::new();
        for (vpn, page) in pages {
            let exec = self.vma_of(cur, vpn).is_some_and(|v| v.exec);
            if page.writable {
                // copy_present_pte: write-protect the parent's private page.
                if let Some(pte) = self.pte_gpa(vm, cur, vpn << 12, false)? {
                    self.store(vm, pte, Self::leaf(page.frame, false, exec))?;
                }
                if let Some(pg) = self.procs[cur].pages.get_mut(&vpn) {
                    pg.writable = false;
                }
                protected.push(vpn);
            }
            let shared = Page {
                frame: page.frame,
                writable: false,
            };
            if self.map(vm, c, vpn, shared, exec)? {
                self.frames.get(page.frame);
            }
        }
        self.note(protected.len() as u64);
        // flush_tlb_mm of the parent.
        if !protected.is_empty() {
            let pml4 = self.procs[cur].pml4;
            self.load_cr3(vm, pml4)?;
        }
        // The child runs next half of the time.
        if self.rng.gen_bool(0.5) {
            self.switch_to(vm, c)?;
        }
        Ok(())
    }

    fn switch_to(&mut self, vm: &ShadowVm, p: usize) -> Result<(), ShadowError> {
        if p == self.current {
            return Ok(());
        }
        let pml4 = self.procs[p].pml4;
        self.load_cr3(vm, pml4)?;
        self.current = p;
        Ok(())
    }

    fn switch(&mut self, vm: &ShadowVm) -> Result<(), ShadowError> {
        let n = self.procs.len();
        if n < 2 {
            return Ok(());
        }
        let p = self.rng.gen_range(0..n);
        self.note(p as u64);
        self.switch_to(vm, p)
    }

    fn exec(&mut self, vm: &ShadowVm) -> Result<(), ShadowError> {
        let Some(p) = self.new_mm(vm)? else {
            return Ok(());
        };
        self.counters.execs += 1;
        let old = self.current;
        self.procs.push(p);
        let new = self.procs.len() - 1;
        self.switch_to(vm, new)?;
        self.teardown(vm, old)?;
        self.procs.swap_remove(old);
        // The new mm took the old one's place (swap_remove moved the last one there).
        self.current = old;
        Ok(())
    }

    fn exit(&mut self, vm: &ShadowVm) -> Result<(), ShadowError> {
        let n = self.procs.len();
        if n < 2 {
            return self.exec(vm);
        }
        self.counters.exits += 1;
        let old = self.current;
        let mut next = self.rng.gen_range(0..n - 1);
        if next >= old {
            next += 1;
        }
        self.switch_to(vm, next)?;
        self.teardown(vm, old)?;
        self.procs.swap_remove(old);
        if self.current == n - 1 {
            self.current = old;
        }
        Ok(())
    }

    fn mmap(&mut self) {
        let cur = self.current;
        let npages = self.rng.gen_range(1..=self.cfg.max_vma_pages.max(1));
        // A gap of 0..64 MiB below the previous mapping, 2 MiB aligned.
        let gap = self.rng.gen_range(0..32u64) * 512;
        let write = self.rng.gen_ratio(4, 5);
        let Some(p) = self.procs.get_mut(cur) else {
            return;
        };
        let start = p.next_mmap.saturating_sub(npages + gap) & !511;
        p.next_mmap = start;
        p.vmas.push(Vma {
            start,
            npages,
            write,
            exec: false,
            kind: VmaKind::Mmap,
        });
        self.counters.mmaps += 1;
        self.note(start);
    }

    fn munmap(&mut self, vm: &ShadowVm) -> Result<(), ShadowError> {
        let cur = self.current;
        let mmaps: Vec<usize> = self.procs[cur]
            .vmas
            .iter()
            .enumerate()
            .filter(|(_, v)| v.kind == VmaKind::Mmap)
            .map(|(i, _)| i)
            .collect();
        if mmaps.is_empty() {
            self.mmap();
            return Ok(());
        }
        let i = mmaps[self.rng.gen_range(0..mmaps.len())];
        let vma = self.procs[cur].vmas.remove(i);
        self.counters.munmaps += 1;
        self.note(vma.start);
        let vpns: Vec<u64> = self.procs[cur]
            .pages
            .range(vma.start..vma.start + vma.npages)
            .map(|(&v, _)| v)
            .collect();
        for &vpn in &vpns {
            self.unmap(vm, cur, vpn)?;
        }
        // free_pgtables: the level-1 tables whose 2 MiB no VMA touches any more.
        let vmas = self.procs[cur].vmas.clone();
        let first = vma.start >> 9;
        let last = (vma.start + vma.npages - 1) >> 9;
        self.free_tables(vm, cur, |&(level, key)| {
            level == 1
                && (first..=last).contains(&key)
                && !vmas
                    .iter()
                    .any(|v| v.start >> 9 <= key && (v.start + v.npages - 1) >> 9 >= key)
        })?;
        self.flush(vm, &vpns)
    }

    fn pte_update(&mut self, vm: &ShadowVm) -> Result<(), ShadowError> {
        let cur = self.current;
        let n = self.procs[cur].pages.len();
        if n == 0 {
            return Ok(());
        }
        let k = self.rng.gen_range(0..n);
        let Some((&vpn, &page)) = self.procs[cur].pages.iter().nth(k) else {
            return Ok(());
        };
        self.counters.pte_updates += 1;
        let exec = self.vma_of(cur, vpn).is_some_and(|v| v.exec);
        let what = self.rng.gen_range(0..3u32);
        self.note(vpn << 2 | u64::from(what));
        match what {
            // MADV_DONTNEED.
            0 => self.unmap(vm, cur, vpn)?,
            // Migration: a non-present (migration) entry, flush, then the new frame.
            1 if self.frames.refs(page.frame) == 1 => {
                let Some(new) = self.frames.alloc(Kind::Data) else {
                    self.counters.out_of_frames += 1;
                    return Ok(());
                };
                let Some(pte) = self.pte_gpa(vm, cur, vpn << 12, false)? else {
                    return Ok(());
                };
                self.store(vm, pte, 0)?;
                self.invlpg(vm, vpn << 12)?;
                self.store(vm, pte, Self::leaf(new, page.writable, exec))?;
                self.frames.put(page.frame);
                self.procs[cur].pages.insert(
                    vpn,
                    Page {
                        frame: new,
                        writable: page.writable,
                    },
                );
            }
            // Write-protect (as for soft-dirty tracking); the next store breaks it.
            _ if page.writable => {
                if let Some(pte) = self.pte_gpa(vm, cur, vpn << 12, false)? {
                    self.store(vm, pte, Self::leaf(page.frame, false, exec))?;
                }
                if let Some(pg) = self.procs[cur].pages.get_mut(&vpn) {
                    pg.writable = false;
                }
            }
            _ => return Ok(()),
        }
        self.invlpg(vm, vpn << 12)
    }

    fn vma_of(&self, p: usize, vpn: u64) -> Option<Vma> {
        self.procs
            .get(p)?
            .vmas
            .iter()
            .copied()
            .find(|v| v.contains(vpn))
    }

    // ------------------------------------------------------------ accesses

    /// Compares an access's outcome with `expect`; returns the #PF if it was one the
    /// tables imply (to be handled), `None` if the access completed (or mismatched).
    fn judge(
        &mut self,
        what: &str,
        gva: u64,
        access: Access,
        expect: Expect,
        out: AccessOutcome,
    ) -> Option<Expect> {
        let (tag, gpa) = match out {
            AccessOutcome::Hit(g) => (1, g.0),
            AccessOutcome::Fixed(g) => (2, g.0),
            AccessOutcome::WriteProtected(g) => (3, g.0),
            AccessOutcome::Mmio(g) => (4, g.0),
            AccessOutcome::Fault(pf) => (5, u64::from(pf.error_code.bits())),
            AccessOutcome::Retry => (6, 0),
        };
        self.note(tag);
        self.note(gpa);
        match (out, expect) {
            (AccessOutcome::Hit(g), Expect::Lands(want)) if g.0 == want => {
                self.counters.shadow_hits += 1;
                None
            }
            (AccessOutcome::Fixed(g), Expect::Lands(want)) if g.0 == want => {
                self.counters.shadow_fixed += 1;
                None
            }
            (AccessOutcome::WriteProtected(g), Expect::Lands(want))
                if g.0 == want && access.contains(Access::WRITE) =>
            {
                self.counters.emulated_accesses += 1;
                None
            }
            (AccessOutcome::Fault(pf), Expect::NotPresent | Expect::ReadOnly) => {
                let ec = pf.error_code;
                let want_p = expect == Expect::ReadOnly;
                let ok = ec.contains(PfErrorCode::PRESENT) == want_p
                    && ec.contains(PfErrorCode::WRITE) == access.contains(Access::WRITE)
                    && ec.contains(PfErrorCode::USER) == access.contains(Access::USER)
                    && ec.contains(PfErrorCode::FETCH) == access.contains(Access::FETCH)
                    && !ec.intersects(PfErrorCode::RSVD | PfErrorCode::PK);
                if ok {
                    if want_p {
                        self.counters.pf_protection += 1;
                    } else {
                        self.counters.pf_not_present += 1;
                    }
                    Some(expect)
                } else {
                    self.mismatch(format!(
                        "{what} {gva:#x} {access:?}: #PF error code {ec:?}, the tables imply \
                         {expect:?}"
                    ));
                    None
                }
            }
            (o, e) => {
                self.mismatch(format!(
                    "{what} {gva:#x} {access:?}: {o:?}, the tables imply {e:?}"
                ));
                None
            }
        }
    }

    /// What the tables of the running process say about `access` at `vpn`.
    fn expect_user(&self, vpn: u64, off: u64, access: Access) -> Expect {
        match self.procs[self.current].pages.get(&vpn) {
            None => Expect::NotPresent,
            Some(p) if access.contains(Access::WRITE) && !p.writable => Expect::ReadOnly,
            Some(p) => Expect::Lands(p.frame << 12 | off),
        }
    }

    fn touch(&mut self, vm: &ShadowVm) -> Result<(), ShadowError> {
        let cur = self.current;
        let p = &self.procs[cur];
        let hot = !p.pages.is_empty() && self.rng.gen_ratio(self.cfg.hot_per_mille.min(1000), 1000);
        let vpn = if hot {
            let k = self.rng.gen_range(0..p.pages.len());
            p.pages.keys().nth(k).copied()
        } else if p.vmas.is_empty() {
            None
        } else {
            let v = p.vmas[self.rng.gen_range(0..p.vmas.len())];
            Some(v.start + self.rng.gen_range(0..v.npages))
        };
        let Some(vma) = vpn.and_then(|vpn| self.vma_of(cur, vpn)) else {
            return Ok(());
        };
        let vpn = vpn.unwrap_or(vma.start);
        let off = self.rng.gen_range(0..512u64) * 8;
        let mut access = Access::USER;
        if vma.exec {
            access |= Access::FETCH;
        } else if vma.write && self.rng.gen_ratio(self.cfg.store_per_mille.min(1000), 1000) {
            access |= Access::WRITE;
        }
        let gva = vpn << 12 | off;
        self.counters.accesses += 1;
        // The access, then (after the guest's fault handler) at most twice again.
        for _ in 0..3 {
            let expect = self.expect_user(vpn, off, access);
            let out = vm.access(self.vcpu, gva, access)?;
            let Some(fault) = self.judge("user access", gva, access, expect, out) else {
                if let AccessOutcome::WriteProtected(g) = out {
                    // KVM emulates the store (data is all zero in this model).
                    vm.guest_store(g.0 & !7, 0)?;
                }
                return Ok(());
            };
            if !self.handle_fault(vm, vpn, vma, fault)? {
                // Out of frames: Linux would kill the process; this guest gives up the
                // access.
                return Ok(());
            }
        }
        self.mismatch(format!(
            "user access {gva:#x} still faults after its handler"
        ));
        Ok(())
    }

    /// Linux's page-fault handler for a fault the tables imply; false if it could not
    /// map the page (out of frames).
    fn handle_fault(
        &mut self,
        vm: &ShadowVm,
        vpn: u64,
        vma: Vma,
        fault: Expect,
    ) -> Result<bool, ShadowError> {
        let cur = self.current;
        match fault {
            Expect::NotPresent => {
                let Some(frame) = self.frames.alloc(Kind::Data) else {
                    self.counters.out_of_frames += 1;
                    return Ok(false);
                };
                self.counters.demand_faults += 1;
                let page = Page {
                    frame,
                    writable: vma.write,
                };
                let mapped = self.map(vm, cur, vpn, page, vma.exec)?;
                if !mapped {
                    self.frames.put(frame);
                }
                // Not present -> present needs no flush.
                Ok(mapped)
            }
            Expect::ReadOnly => {
                let Some(old) = self.procs[cur].pages.get(&vpn).copied() else {
                    return Ok(false);
                };
                self.counters.cow_breaks += 1;
                let frame = if self.frames.refs(old.frame) == 1 {
                    old.frame
                } else {
                    let Some(f) = self.frames.alloc(Kind::Data) else {
                        self.counters.out_of_frames += 1;
                        return Ok(false);
                    };
                    // The copy: both frames are all zero.
                    self.frames.put(old.frame);
                    f
                };
                let Some(pte) = self.pte_gpa(vm, cur, vpn << 12, false)? else {
                    return Ok(false);
                };
                self.store(vm, pte, Self::leaf(frame, true, vma.exec))?;
                self.procs[cur].pages.insert(
                    vpn,
                    Page {
                        frame,
                        writable: true,
                    },
                );
                // ptep_clear_flush.
                self.invlpg(vm, vpn << 12)?;
                Ok(true)
            }
            Expect::Lands(_) => Ok(true),
        }
    }

    fn kernel_touch(&mut self, vm: &ShadowVm) -> Result<(), ShadowError> {
        let write = self.rng.gen_ratio(self.cfg.store_per_mille.min(1000), 1000);
        let gfn = if write {
            // A store to one of this vCPU's frames that is not a page table.
            let f = &self.frames;
            let g = f.base + self.rng.gen_range(0..f.len.max(1));
            if f.kind(g) == Kind::Table {
                return Ok(());
            }
            g
        } else {
            self.rng.gen_range(0..self.kernel.frames.max(1))
        };
        let off = self.rng.gen_range(0..512u64) * 8;
        let gva = DIRECT_MAP + (gfn << 12 | off);
        let access = if write {
            Access::WRITE
        } else {
            Access::empty()
        };
        self.counters.kernel_accesses += 1;
        let out = vm.access(self.vcpu, gva, access)?;
        let expect = Expect::Lands(gfn << 12 | off);
        if self
            .judge("kernel access", gva, access, expect, out)
            .is_none()
        {
            if let AccessOutcome::WriteProtected(g) = out {
                vm.guest_store(g.0 & !7, 0)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use revmap_host::{Memslot, MemslotFlags};
    use revmap_rmap::{Gfn, Hva, SlotId};

    fn vm(ram_mib: u64) -> (ShadowVm, KernelMap) {
        let vm = ShadowVm::new();
        let slot = Memslot::new(
            SlotId(0),
            Gfn(0),
            ram_mib << 8,
            21,
            MemslotFlags::empty(),
            Hva(0x7f00_0000_0000),
        )
        .unwrap();
        vm.create_memslot(slot).unwrap();
        let k = KernelMap::boot(&vm, ram_mib << 20).unwrap();
        (vm, k)
    }

    #[test]
    fn direct_map_uses_1g_and_2m_pages_and_translates_every_frame() {
        let (vm, k) = vm(1024 + 64);
        assert_eq!((k.pages_1g, k.pages_2m), (1, 32));
        let cpu = X86Cpu::new(&vm, k, 0, 1, 1, X86Workload::default()).unwrap();
        for gfn in [0u64, 0x1234, (1 << 18) - 1, 1 << 18, (1088 << 8) - 1] {
            let gva = DIRECT_MAP + (gfn << 12) + 0x18;
            let out = vm.access(cpu.vcpu, gva, Access::empty()).unwrap();
            assert!(
                matches!(out, AccessOutcome::Fixed(g) if g.0 == gfn << 12 | 0x18),
                "{gfn:#x}: {out:?}"
            );
        }
        // Past the end of RAM nothing is mapped.
        let out = vm
            .access(cpu.vcpu, DIRECT_MAP + (1088 << 20), Access::empty())
            .unwrap();
        assert!(matches!(out, AccessOutcome::Fault(_)), "{out:?}");
        vm.check().unwrap();
    }

    #[test]
    fn fork_shares_then_a_store_breaks_copy_on_write() {
        let (vm, k) = vm(64);
        let mut cpu = X86Cpu::new(&vm, k, 0, 1, 3, X86Workload::default()).unwrap();
        let heap = HEAP_BASE >> 12;
        // Demand-fault a heap page by a store.
        cpu.current = 0;
        let vma = cpu.vma_of(0, heap).unwrap();
        assert!(cpu
            .handle_fault(&vm, heap, vma, Expect::NotPresent)
            .unwrap());
        let frame = cpu.procs[0].pages[&heap].frame;
        let out = vm
            .access(cpu.vcpu, heap << 12, Access::USER | Access::WRITE)
            .unwrap();
        assert!(
            matches!(out, AccessOutcome::Fixed(g) if g.0 >> 12 == frame),
            "{out:?}"
        );
        // fork without switching: the parent's page is now read-only and shared.
        while cpu.procs.len() < 2 {
            cpu.fork(&vm).unwrap();
        }
        cpu.switch_to(&vm, 0).unwrap();
        assert_eq!(cpu.frames.refs(frame), 2);
        let out = vm
            .access(cpu.vcpu, heap << 12, Access::USER | Access::WRITE)
            .unwrap();
        assert!(
            matches!(out, AccessOutcome::Fault(pf) if pf.error_code.contains(PfErrorCode::PRESENT)),
            "{out:?}"
        );
        assert!(cpu.handle_fault(&vm, heap, vma, Expect::ReadOnly).unwrap());
        let new = cpu.procs[0].pages[&heap].frame;
        assert_ne!(new, frame, "a shared frame is copied");
        let out = vm
            .access(cpu.vcpu, heap << 12, Access::USER | Access::WRITE)
            .unwrap();
        assert!(
            matches!(out, AccessOutcome::Fixed(g) | AccessOutcome::Hit(g) if g.0 >> 12 == new),
            "{out:?}"
        );
        // The child still reads the old frame.
        cpu.switch_to(&vm, 1).unwrap();
        let out = vm.access(cpu.vcpu, heap << 12, Access::USER).unwrap();
        assert!(
            matches!(out, AccessOutcome::Fixed(g) | AccessOutcome::Hit(g) if g.0 >> 12 == frame),
            "{out:?}"
        );
        vm.check().unwrap();
        assert_eq!(cpu.counters.mismatches, 0);
    }

    #[test]
    fn many_steps_keep_the_guest_and_the_shadow_mmu_consistent() {
        let (vm, k) = vm(128);
        let mut cpus: Vec<X86Cpu> = (0..2)
            .map(|i| X86Cpu::new(&vm, k, i, 2, 9, X86Workload::default()).unwrap())
            .collect();
        for i in 0..3000 {
            cpus[i % 2].step(&vm);
            if i % 300 == 0 {
                vm.check().unwrap();
            }
        }
        vm.check().unwrap();
        let mut c = X86Counters::default();
        for cpu in &cpus {
            c.merge(&cpu.counters);
        }
        assert_eq!(c.mismatches, 0, "{:?}", c.first_mismatch);
        assert!(
            c.forks > 0 && c.execs + c.exits > 0 && c.munmaps > 0,
            "{c:?}"
        );
        assert!(
            c.pf_not_present > 0 && c.cow_breaks > 0 && c.invlpgs > 0,
            "{c:?}"
        );
        assert!(c.pte_writes_emulated > 0, "{c:?}");
    }

    #[test]
    fn running_out_of_frames_skips_operations_without_a_mismatch() {
        // 16 MiB over 8 vCPUs: 448 frames each, and every touch of a large VMA a first
        // touch: far more than the frames.
        let (vm, k) = vm(16);
        let cfg = X86Workload {
            max_vma_pages: 4096,
            hot_per_mille: 0,
            ..X86Workload::default()
        };
        let mut cpus: Vec<X86Cpu> = (0..8)
            .map(|i| X86Cpu::new(&vm, k, i, 8, 5, cfg).unwrap())
            .collect();
        for i in 0..8000 {
            cpus[i % 8].step(&vm);
        }
        vm.check().unwrap();
        let mut c = X86Counters::default();
        for cpu in &cpus {
            c.merge(&cpu.counters);
        }
        assert!(c.out_of_frames > 0, "{c:?}");
        assert_eq!(c.mismatches, 0, "{:?}", c.first_mismatch);
    }
}
