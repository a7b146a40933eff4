//! A seeded model of a Linux pseries guest driving the HPT hypercalls (as Linux's
//! pseries `lpar.c` does): one [`GuestCpu`] per vCPU.
//!
//! * Boot ([`GuestCpu::boot`]): the bolted kernel linear map, one HPTE per 16M (or 64K)
//!   page of RAM in a 1T kernel segment, inserted into the primary group (evicting a
//!   non-bolted entry when full, then trying the secondary group).
//! * Steady state ([`GuestCpu::step`]): processes with per-process VSIDs and three 256M
//!   user segments (4K, 64K and 16M pages) touch random pages through the vCPU's
//!   [`VcpuMmu`]. A translation miss is Linux's hash fault: if the Linux PTE remembers
//!   an HPTE slot, `updatepp` (H_PROTECT with H_AVPN) first; then H_ENTER into the
//!   primary group, the secondary group, and when both are full a random non-bolted
//!   eviction (H_REMOVE with H_ANDCOND avpn=BOLTED from a random slot) and a retry. A
//!   store to a clean (read-only) page is a protection fault: H_PROTECT to RW with
//!   H_AVPN, re-inserting on H_NOT_FOUND. munmap of one page is H_REMOVE with H_AVPN;
//!   of a range and exit/exec, H_BULK_REMOVE in batches of 4 with an END tail; fork
//!   write-protects the parent's pages (H_PROTECT) and shares them with the child.
//!
//! # Invariants
//!
//! * Every choice comes from the cpu's own ChaCha8 stream (seed, vCPU id), never from
//!   timing; iteration orders are deterministic (no hashed maps), so on one thread the
//!   sequence of hypercalls is a pure function of the seed and the results.
//! * VSIDs are unique per (vCPU, process, segment), so one VA is only ever inserted by
//!   the vCPU that owns it, and only after its MMU found no HPTE for it.
//! * H_ENTER never uses H_EXACT and always targets a PTEG base; bolted entries are
//!   never evicted (H_ANDCOND with BOLTED).

use crate::report::HcallStats;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use revmap_hpt::hash::{hpt_hash, primary_pteg, secondary_pteg, HptGeometry, Segment, SegmentSize};
use revmap_hpt::hcall::*;
use revmap_hpt::hpte::{encode_avpn, HpteR, HpteV};
use revmap_hpt::mmu::{Access, AccessOutcome, Fault, VcpuMmu};
use revmap_hpt::{HcallResult, HypercallPort, VcpuId, Vm};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

/// VSID of the kernel's 1T linear-map segment.
pub const KERNEL_VSID: u64 = 0x0c_0000;
/// Effective-address offset of user segment `i` (256M each).
const SEG_SHIFT: u32 = 28;
/// Frames below this guest physical address hold the kernel (never user pages).
const KERNEL_RESERVED: u64 = 64 << 20;
/// Size of the pool of "page cache" frames shared between processes (4K frames).
const SHARED_POOL_4K: u64 = 4096;

/// Relative weights of the guest's steady-state operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadMix {
    /// Touch a random page of a process (load or store through the MMU).
    pub touch: u32,
    /// munmap of one page: H_REMOVE with H_AVPN.
    pub munmap_page: u32,
    /// munmap of a range: H_BULK_REMOVE batches.
    pub munmap_range: u32,
    /// mprotect of a few pages to read-only: H_PROTECT with H_AVPN.
    pub mprotect: u32,
    /// fork: child shares pages, parent's are write-protected.
    pub fork: u32,
    /// exec: drop every mapping (bulk), new VSIDs.
    pub exec: u32,
    /// exit: drop every mapping (bulk), the process goes away.
    pub exit: u32,
}

impl Default for WorkloadMix {
    fn default() -> Self {
        Self {
            touch: 1000,
            munmap_page: 450,
            munmap_range: 6,
            mprotect: 12,
            fork: 2,
            exec: 1,
            exit: 1,
        }
    }
}

/// Configuration of the guest workload.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Page shift of the bolted kernel linear map: 24 (16M) or 16 (64K).
    pub linear_page_shift: u32,
    /// Processes per vCPU (fork keeps at least one; exit never goes below one).
    pub max_processes: usize,
    /// Pages of each user segment a process may touch (16M segments: 1/64 of it).
    pub pages_per_segment: u64,
    /// Relative weights of 4K, 64K and 16M pages among touches.
    pub page_size_weights: [u32; 3],
    /// Fraction (per mille) of new user pages backed by the shared page-cache pool.
    pub shared_per_mille: u32,
    /// Fraction (per mille) of touches that are stores.
    pub store_per_mille: u32,
    /// Operation weights.
    pub mix: WorkloadMix,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            linear_page_shift: 24,
            max_processes: 16,
            pages_per_segment: 4096,
            page_size_weights: [80, 18, 2],
            shared_per_mille: 200,
            store_per_mille: 300,
            mix: WorkloadMix::default(),
        }
    }
}

/// One user page size of a process's segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PageKind {
    K4,
    K64,
    M16,
}

impl PageKind {
    const ALL: [PageKind; 3] = [PageKind::K4, PageKind::K64, PageKind::M16];
    fn shift(self) -> u32 {
        match self {
            PageKind::K4 => 12,
            PageKind::K64 => 16,
            PageKind::M16 => 24,
        }
    }
    fn seg_index(self) -> u64 {
        match self {
            PageKind::K4 => 0,
            PageKind::K64 => 1,
            PageKind::M16 => 2,
        }
    }
    /// R bits (LP) and V bits (LARGE) encoding this page size (KVM's decoder).
    fn encode(self) -> (u64, u64) {
        match self {
            PageKind::K4 => (0, 0),
            PageKind::K64 => (HpteV::LARGE, 1 << 12),
            PageKind::M16 => (HpteV::LARGE, 0),
        }
    }
}

/// A Linux PTE of a user page.
#[derive(Clone, Copy, Debug)]
struct Pte {
    kind: PageKind,
    pageno: u64,
    gpa: u64,
    /// Writable (else clean / write-protected: pp = 3).
    writable: bool,
    /// Linux's "hidx": the slot in the group (bits 0-2) and the secondary bit (3) of
    /// the HPTE it inserted; the PTEG is recomputed from the hash and the current HPT
    /// size, so it survives a resize. May be stale (the entry was evicted).
    hidx: Option<u64>,
}

/// A fault the guest's MMU handler services (see `GuestCpu::handle_fault`).
#[derive(Clone, Copy, Debug)]
enum GuestFault {
    /// No HPTE for the page (`__hash_page`); `store`: the access was a store.
    Hash { store: bool },
    /// A store to a clean or write-protected page.
    Protection,
}

#[derive(Debug, Default)]
struct Process {
    ctx: u64,
    pages: Vec<Pte>,
    index: BTreeMap<(PageKind, u64), usize>,
}

impl Process {
    fn remove_at(&mut self, i: usize) -> Option<Pte> {
        if i >= self.pages.len() {
            return None;
        }
        let p = self.pages.swap_remove(i);
        self.index.remove(&(p.kind, p.pageno));
        if let Some(moved) = self.pages.get(i) {
            self.index.insert((moved.kind, moved.pageno), i);
        }
        Some(p)
    }
}

/// One guest vCPU: its processes, Linux PTEs and statistics.
#[derive(Debug)]
pub struct GuestCpu {
    vcpu: VcpuId,
    cfg: WorkloadConfig,
    ram_bytes: u64,
    rng: ChaCha8Rng,
    /// The HPT geometry as the guest knows it (refreshed at every operation; a resize
    /// commit happens between operations).
    geo: Option<HptGeometry>,
    procs: Vec<Process>,
    next_ctx: u64,
    /// Hypercall counts, results and latencies.
    pub stats: HcallStats,
}

fn user_seg(vcpu: usize, ctx: u64, kind: PageKind) -> Segment {
    Segment {
        vsid: ((vcpu as u64 + 1) << 36) | (ctx << 4) | kind.seg_index(),
        ssize: SegmentSize::S256M,
        base_shift: kind.shift(),
    }
}

fn kernel_seg(shift: u32) -> Segment {
    Segment {
        vsid: KERNEL_VSID,
        ssize: SegmentSize::S1T,
        base_shift: shift,
    }
}

impl GuestCpu {
    /// A guest cpu `vcpu` of a guest with `ram_bytes` of RAM.
    pub fn new(
        vcpu: VcpuId,
        seed: u64,
        ram_bytes: u64,
        cfg: WorkloadConfig,
    ) -> Result<Self, hdrhistogram::CreationError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(0x100 + vcpu.index() as u64);
        let mut g = Self {
            vcpu,
            cfg,
            ram_bytes,
            rng,
            geo: None,
            procs: Vec::new(),
            next_ctx: 1,
            stats: HcallStats::new()?,
        };
        let ctx = g.new_ctx();
        g.procs.push(Process {
            ctx,
            ..Process::default()
        });
        Ok(g)
    }

    /// The vCPU id.
    pub fn vcpu(&self) -> VcpuId {
        self.vcpu
    }

    /// Number of live processes.
    pub fn processes(&self) -> usize {
        self.procs.len()
    }

    fn new_ctx(&mut self) -> u64 {
        let c = self.next_ctx;
        self.next_ctx += 1;
        c
    }

    fn hcall(&mut self, port: &mut impl HypercallPort, op: u64, args: &[u64]) -> HcallResult {
        let t = Instant::now();
        let r = port.hcall(self.vcpu, op, args);
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.record(self.vcpu.index(), op, args, &r, ns);
        r
    }

    /// Boot: insert the bolted kernel linear map covering RAM (`htab_bolt_mapping`).
    /// Only the boot cpu does this.
    pub fn boot(&mut self, vm: &Vm, port: &mut impl HypercallPort) {
        let shift = if self.cfg.linear_page_shift == 16 {
            16
        } else {
            24
        };
        let (large, lp) = if shift == 16 {
            (HpteV::LARGE, 1u64 << 12)
        } else {
            (HpteV::LARGE, 0)
        };
        let seg = kernel_seg(shift);
        let mut off = 0u64;
        while off < self.ram_bytes {
            let pteh = encode_avpn(seg.va(off), shift, true) | HpteV::BOLTED | HpteV::VALID | large;
            // Kernel RW: pp = 0; R and C preset; coherent memory.
            let ptel = off | lp | HpteR::M | HpteR::R | HpteR::C;
            let geo = vm.hpt().geometry();
            let hash = hpt_hash(&seg, off);
            let mut done = false;
            for (pteg, h) in [
                (primary_pteg(geo, hash), 0),
                (secondary_pteg(geo, hash), HpteV::SECONDARY),
            ] {
                for _attempt in 0..2 {
                    let r = self.hcall(port, H_ENTER, &[0, pteg * 8, pteh | h, ptel]);
                    if r.ret == H_SUCCESS {
                        done = true;
                        break;
                    }
                    if r.ret != H_PTEG_FULL || !self.evict(port, pteg * 8) {
                        break;
                    }
                }
                if done {
                    break;
                }
            }
            off += 1 << shift;
        }
    }

    /// One guest operation, chosen by the mix.
    pub fn step(&mut self, vm: &Vm, mmu: &mut VcpuMmu<'_>, port: &mut impl HypercallPort) {
        self.geo = Some(vm.hpt().geometry());
        let m = self.cfg.mix;
        let weights = [
            m.touch,
            m.munmap_page,
            m.munmap_range,
            m.mprotect,
            m.fork,
            m.exec,
            m.exit,
        ];
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        if total == 0 {
            return;
        }
        let mut x = self.rng.gen_range(0..total);
        let mut op = 0;
        for (i, &w) in weights.iter().enumerate() {
            if x < u64::from(w) {
                op = i;
                break;
            }
            x -= u64::from(w);
        }
        let p = self.rng.gen_range(0..self.procs.len());
        match op {
            0 => self.touch(vm, mmu, port, p),
            1 => self.munmap_page(port, p),
            2 => self.munmap_range(port, p),
            3 => self.mprotect(port, p),
            4 => self.fork(port, p),
            5 => self.exec(port, p),
            _ => self.exit(port, p),
        }
    }

    fn pick_kind(&mut self) -> PageKind {
        let w = self.cfg.page_size_weights;
        let total: u32 = w.iter().sum();
        if total == 0 {
            return PageKind::K4;
        }
        let mut x = self.rng.gen_range(0..total);
        for (k, &wk) in PageKind::ALL.iter().zip(w.iter()) {
            if x < wk {
                return *k;
            }
            x -= wk;
        }
        PageKind::K4
    }

    fn alloc_gpa(&mut self, kind: PageKind) -> u64 {
        let shift = kind.shift();
        let size = 1u64 << shift;
        let lo = KERNEL_RESERVED.min(self.ram_bytes / 4).div_ceil(size);
        let hi = (self.ram_bytes / size).max(lo + 1);
        if kind == PageKind::K4 && self.rng.gen_range(0..1000) < self.cfg.shared_per_mille {
            let pool = SHARED_POOL_4K.min(hi - lo);
            return (lo + self.rng.gen_range(0..pool)) << shift;
        }
        self.rng.gen_range(lo..hi) << shift
    }

    fn seg_of(&self, p: usize, kind: PageKind) -> Segment {
        let ctx = self.procs.get(p).map_or(0, |pr| pr.ctx);
        user_seg(self.vcpu.index(), ctx, kind)
    }

    fn ea_of(kind: PageKind, pageno: u64) -> u64 {
        (kind.seg_index() << SEG_SHIFT) | (pageno << kind.shift())
    }

    /// The HPTE index a Linux hidx designates for `ea` in `seg`.
    fn ptex_of(&self, seg: &Segment, ea: u64, hidx: u64) -> u64 {
        let Some(geo) = self.geo else { return hidx & 7 };
        let hash = hpt_hash(seg, ea);
        let g = if hidx & 8 != 0 {
            secondary_pteg(geo, hash)
        } else {
            primary_pteg(geo, hash)
        };
        g * 8 + (hidx & 7)
    }

    fn avpn_of(seg: &Segment, kind: PageKind, ea: u64) -> u64 {
        encode_avpn(seg.va(ea), kind.shift(), false)
    }

    fn touch(&mut self, vm: &Vm, mmu: &mut VcpuMmu<'_>, port: &mut impl HypercallPort, p: usize) {
        let kind = self.pick_kind();
        let npages = match kind {
            PageKind::M16 => (self.cfg.pages_per_segment / 64).clamp(1, 16),
            _ => self.cfg.pages_per_segment.clamp(1, 1 << 12),
        };
        let pageno = self.rng.gen_range(0..npages);
        let store = self.rng.gen_range(0..1000) < self.cfg.store_per_mille;
        let Some(proc_) = self.procs.get(p) else {
            return;
        };
        let i = match proc_.index.get(&(kind, pageno)) {
            Some(&i) => i,
            None => {
                let gpa = self.alloc_gpa(kind);
                let Some(proc_) = self.procs.get_mut(p) else {
                    return;
                };
                proc_.pages.push(Pte {
                    kind,
                    pageno,
                    gpa,
                    writable: true,
                    hidx: None,
                });
                let i = proc_.pages.len() - 1;
                proc_.index.insert((kind, pageno), i);
                i
            }
        };
        let seg = self.seg_of(p, kind);
        let ea = Self::ea_of(kind, pageno) | (self.rng.gen_range(0..1u64 << kind.shift()) & !7);
        let acc = if store { Access::Store } else { Access::Load };
        for _ in 0..4 {
            match mmu.access(&seg, ea, acc) {
                AccessOutcome::Done(_) => {
                    self.stats.guest.touches += 1;
                    return;
                }
                AccessOutcome::GuestFault(Fault::NoHpte) => {
                    self.stats.guest.hash_faults += 1;
                    self.handle_fault(vm, port, p, i, &seg, ea, GuestFault::Hash { store });
                }
                AccessOutcome::GuestFault(Fault::Protection { .. }) => {
                    self.stats.guest.protection_faults += 1;
                    self.handle_fault(vm, port, p, i, &seg, ea, GuestFault::Protection);
                }
                _ => {
                    self.stats.guest.other_faults += 1;
                    return;
                }
            }
        }
    }

    /// The guest's handling of a fault on page `i` of process `p`: `__hash_page` for a
    /// hash fault, or making a clean or write-protected page writable for a protection
    /// fault on a store. Either is `updatepp` (H_PROTECT with H_AVPN) on the slot Linux
    /// remembers, else (or on not-found) an insert, whose slot is remembered.
    #[allow(clippy::too_many_arguments)]
    fn handle_fault(
        &mut self,
        vm: &Vm,
        port: &mut impl HypercallPort,
        p: usize,
        i: usize,
        seg: &Segment,
        ea: u64,
        fault: GuestFault,
    ) {
        let Some(pte) = self.procs.get_mut(p).and_then(|pr| pr.pages.get_mut(i)) else {
            return;
        };
        // (pp, insert with C set)
        let (pp, dirty) = match fault {
            GuestFault::Hash { store } if pte.writable => (2, store),
            GuestFault::Hash { .. } => (3, false),
            GuestFault::Protection => {
                pte.writable = true;
                (2, true)
            }
        };
        let pte = *pte;
        if let Some(h) = pte.hidx {
            let avpn = Self::avpn_of(seg, pte.kind, ea);
            let ptex = self.ptex_of(seg, ea, h);
            let r = self.hcall(port, H_PROTECT, &[pp | H_AVPN, ptex, avpn]);
            if r.ret == H_SUCCESS {
                return;
            }
        }
        let hidx = self.insert(vm, port, seg, pte, ea, pp, dirty);
        if let Some(x) = self.procs.get_mut(p).and_then(|pr| pr.pages.get_mut(i)) {
            x.hidx = hidx;
        }
    }

    /// `hpte_insert_repeating`: primary, secondary, evict from a random one of them,
    /// retry. Returns the slot used.
    #[allow(clippy::too_many_arguments)]
    fn insert(
        &mut self,
        vm: &Vm,
        port: &mut impl HypercallPort,
        seg: &Segment,
        pte: Pte,
        ea: u64,
        pp: u64,
        dirty: bool,
    ) -> Option<u64> {
        let (vl, lp) = pte.kind.encode();
        let pteh = Self::avpn_of(seg, pte.kind, ea) | HpteV::VALID | vl;
        let ptel =
            pte.gpa | lp | HpteR::M | HpteR::R | HpteR::N | pp | if dirty { HpteR::C } else { 0 };
        for _ in 0..4 {
            let geo = vm.hpt().geometry();
            let hash = hpt_hash(seg, ea);
            let groups = [primary_pteg(geo, hash), secondary_pteg(geo, hash)];
            for ((g, h), sec) in groups.iter().zip([0, HpteV::SECONDARY]).zip([0, 8]) {
                let r = self.hcall(port, H_ENTER, &[0, g * 8, pteh | h, ptel]);
                if r.ret == H_SUCCESS {
                    return Some((r.out[0] & 7) | sec);
                }
                if r.ret != H_PTEG_FULL {
                    self.stats.guest.enter_errors += 1;
                    return None;
                }
            }
            let victim = groups[usize::from(self.rng.gen_bool(0.5))];
            self.evict(port, victim * 8);
        }
        None
    }

    /// `pSeries_lpar_hpte_remove`: H_REMOVE with H_ANDCOND avpn=BOLTED from a random
    /// slot of the group until one succeeds.
    fn evict(&mut self, port: &mut impl HypercallPort, base: u64) -> bool {
        let start = self.rng.gen_range(0..8u64);
        for k in 0..8 {
            let ptex = base + (start + k) % 8;
            let r = self.hcall(port, H_REMOVE, &[H_ANDCOND, ptex, HpteV::BOLTED]);
            if r.ret == H_SUCCESS {
                self.stats.guest.evictions += 1;
                return true;
            }
        }
        false
    }

    fn munmap_page(&mut self, port: &mut impl HypercallPort, p: usize) {
        let n = self.procs.get(p).map_or(0, |pr| pr.pages.len());
        if n == 0 {
            return;
        }
        let i = self.rng.gen_range(0..n);
        let Some(pte) = self.procs.get_mut(p).and_then(|pr| pr.remove_at(i)) else {
            return;
        };
        if let Some(h) = pte.hidx {
            let seg = self.seg_of(p, pte.kind);
            let ea = Self::ea_of(pte.kind, pte.pageno);
            let avpn = Self::avpn_of(&seg, pte.kind, ea);
            let ptex = self.ptex_of(&seg, ea, h);
            self.hcall(port, H_REMOVE, &[H_AVPN, ptex, avpn]);
        }
    }

    fn munmap_range(&mut self, port: &mut impl HypercallPort, p: usize) {
        let n = self.procs.get(p).map_or(0, |pr| pr.pages.len());
        if n == 0 {
            return;
        }
        let k = self.rng.gen_range(1..=12usize).min(n);
        let start = self.rng.gen_range(0..n);
        let mut gone = Vec::with_capacity(k);
        for _ in 0..k {
            let len = self.procs.get(p).map_or(0, |pr| pr.pages.len());
            if len == 0 {
                break;
            }
            if let Some(pte) = self
                .procs
                .get_mut(p)
                .and_then(|pr| pr.remove_at(start % len))
            {
                gone.push(pte);
            }
        }
        self.flush_range(port, p, &gone);
    }

    /// `pSeries_lpar_flush_hash_range` with BULK_REMOVE: (REQUEST|AVPN|ptex, avpn)
    /// pairs, four per call, a partial last batch terminated by END.
    fn flush_range(&mut self, port: &mut impl HypercallPort, p: usize, ptes: &[Pte]) {
        let mut batch: Vec<u64> = Vec::with_capacity(8);
        for pte in ptes {
            let Some(h) = pte.hidx else { continue };
            let seg = self.seg_of(p, pte.kind);
            let ea = Self::ea_of(pte.kind, pte.pageno);
            batch.push(BulkTsh::REQUEST | BulkTsh::AVPN | self.ptex_of(&seg, ea, h));
            batch.push(Self::avpn_of(&seg, pte.kind, ea));
            if batch.len() == 8 {
                self.hcall(port, H_BULK_REMOVE, &batch);
                batch.clear();
            }
        }
        if !batch.is_empty() {
            batch.push(BulkTsh::END);
            batch.push(0);
            self.hcall(port, H_BULK_REMOVE, &batch);
        }
    }

    fn mprotect(&mut self, port: &mut impl HypercallPort, p: usize) {
        let n = self.procs.get(p).map_or(0, |pr| pr.pages.len());
        if n == 0 {
            return;
        }
        for _ in 0..self.rng.gen_range(1..=4) {
            let i = self.rng.gen_range(0..n);
            self.write_protect(port, p, i);
        }
    }

    fn write_protect(&mut self, port: &mut impl HypercallPort, p: usize, i: usize) {
        let Some(pte) = self.procs.get_mut(p).and_then(|pr| pr.pages.get_mut(i)) else {
            return;
        };
        pte.writable = false;
        let pte = *pte;
        let Some(h) = pte.hidx else { return };
        let seg = self.seg_of(p, pte.kind);
        let ea = Self::ea_of(pte.kind, pte.pageno);
        let avpn = Self::avpn_of(&seg, pte.kind, ea);
        let ptex = self.ptex_of(&seg, ea, h);
        let r = self.hcall(port, H_PROTECT, &[3 | H_AVPN, ptex, avpn]);
        if r.ret == H_NOT_FOUND {
            if let Some(x) = self.procs.get_mut(p).and_then(|pr| pr.pages.get_mut(i)) {
                x.hidx = None;
            }
        }
    }

    fn fork(&mut self, port: &mut impl HypercallPort, p: usize) {
        if self.procs.len() >= self.cfg.max_processes.max(1) {
            return self.exit(port, p);
        }
        let n = self.procs.get(p).map_or(0, |pr| pr.pages.len());
        let mut child = Process {
            ctx: self.new_ctx(),
            ..Process::default()
        };
        for _ in 0..n.min(32) {
            let i = self.rng.gen_range(0..n);
            let Some(pte) = self.procs.get(p).and_then(|pr| pr.pages.get(i)).copied() else {
                continue;
            };
            if child.index.contains_key(&(pte.kind, pte.pageno)) {
                continue;
            }
            child
                .index
                .insert((pte.kind, pte.pageno), child.pages.len());
            child.pages.push(Pte {
                writable: false,
                hidx: None,
                ..pte
            });
            if pte.writable {
                self.write_protect(port, p, i);
            }
        }
        self.procs.push(child);
        self.stats.guest.forks += 1;
    }

    fn exec(&mut self, port: &mut impl HypercallPort, p: usize) {
        let Some(pr) = self.procs.get_mut(p) else {
            return;
        };
        let pages = core::mem::take(&mut pr.pages);
        pr.index.clear();
        self.flush_range(port, p, &pages);
        let ctx = self.new_ctx();
        if let Some(pr) = self.procs.get_mut(p) {
            pr.ctx = ctx;
        }
        self.stats.guest.execs += 1;
    }

    fn exit(&mut self, port: &mut impl HypercallPort, p: usize) {
        if self.procs.len() <= 1 {
            return self.exec(port, p);
        }
        let Some(pr) = self.procs.get_mut(p) else {
            return;
        };
        let pages = core::mem::take(&mut pr.pages);
        self.flush_range(port, p, &pages);
        if p < self.procs.len() {
            self.procs.swap_remove(p);
        }
        self.stats.guest.exits += 1;
    }
}
