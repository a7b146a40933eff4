//! The L1 hypervisor model of the nested simulator: one [`L1Cpu`] per L1 vCPU, owning
//! its L2 guests. It keeps L1's partition table and each L2's 52-bit radix tree (64K
//! geometry) in L1 memory through [`NestedVm::l1_store`], runs the L2 workload through
//! [`NestedVm::enter_nested`], handles the exits the way a KVM L1 does, and checks every
//! result against what its own tables say.
//!
//! # L1 memory layout ([`Layout`])
//!
//! * Partition table at [`PATB`] (PATS 4: 4096 entries); `ptcr` = [`PTCR`].
//! * From 1 MiB, 128 KiB of tables per L2 (lpid `l` at `1 MiB + (l - 1) * 128 KiB`): the
//!   root (8192 entries, 64 KiB), one PUD and one PMD (4 KiB each), and up to
//!   [`MAX_PTE_TABLES`] PTE tables of 32 entries (256 B, 2 MiB of L2 memory each).
//!   An L2's memory is below 1 GiB: root entry 0, PUD entry 0, PMD entry `n_gpa >> 21`.
//! * Then, 2 MiB aligned, each L2's kernel linear map: `kernel_2m_leaves` 2 MiB chunks
//!   of L1 memory mapped by PMD leaves when L1 creates the L2.
//! * The rest of L1 RAM is split evenly between the L1 vCPUs: each one's pool of 64 KiB
//!   pages for its L2s' user memory. When its pool is empty L1 reclaims a page of one
//!   of its L2s (unmap + invalidation). The hostile L1 maps only the first page of the
//!   pool region ([`Layout::hostile_target`]).
//!
//! # An L2's user memory
//!
//! L2 page `p` (64 KiB) is at L2 address `kernel_2m_leaves * 2 MiB + p * 64 KiB`. L1
//! maps it on the L2's first touch (the NOHPTE exit) with R, C on a store, and every
//! permission (a KVM L1 instantiates R always and C with a write); a SET_RC exit makes
//! it set R/C, a PROTFAULT on a store after a write-protect makes it restore W. These
//! are the additive changes; the others (remap, write-protect, age, unmap, destroy) are
//! followed by H_TLB_INVALIDATE at once.

use super::{NestedScenario, NestedWorkload};
use crate::report::digest_word;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use revmap_nested::hcall::TlbieInstr;
use revmap_nested::radix::{Access, Exit, FaultCause, PageSize, PateDw0, RadixPde, RadixPte};
use revmap_nested::{L2Result, NGpa, NestedVm};
use serde::Serialize;

/// Base of L1's partition table.
pub const PATB: u64 = 0x1_0000;
/// L1's PTCR: the table at [`PATB`], PATS 4 (4096 entries).
pub const PTCR: u64 = PATB | 4;
/// Most L2 guests a scenario may have.
pub const MAX_L2S: usize = 1024;
/// Most PTE tables (kernel leaves included) of one L2: its memory is at most this many
/// 2 MiB ranges.
pub const MAX_PTE_TABLES: u64 = (REGION - PTES) / PTE_TABLE;

const TABLES: u64 = 0x10_0000;
const REGION: u64 = 0x2_0000;
const PUD: u64 = 0x1_0000;
const PMD: u64 = 0x1_1000;
const PTES: u64 = 0x1_2000;
const PTE_TABLE: u64 = 0x100;
const K64: u64 = 0x1_0000;
const M2: u64 = 0x20_0000;
/// Every permission, R and C.
const FULL: u64 = RadixPte::R | RadixPte::C | RadixPte::EAA_RWX;
/// Distinct L2 addresses of one hostile L2 (512 PMD entries x 32 PTEs).
const HOSTILE_SPAN: u64 = 512 * 32;
/// L2 pages the hostile L1 reaches before it flushes a whole LPID (the others are
/// invalidated one page at a time).
const HOSTILE_FLUSH_EVERY: u64 = 16;

/// Where L1 keeps its tables and memory (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    vcpus: u64,
    kernel_leaves: u64,
    kbase: u64,
    ubase: u64,
    pool_pages: u64,
}

impl Layout {
    /// The layout of `sc` in `ram` bytes of L1 RAM, or why it does not fit.
    pub fn new(sc: &NestedScenario, ram: u64) -> Result<Self, String> {
        let l2s = sc.l2s() as u64;
        let kernel_leaves = sc.l1.kernel_2m_leaves;
        let kbase = (TABLES + l2s * REGION).next_multiple_of(M2);
        let ubase = kbase + l2s * kernel_leaves * M2;
        let vcpus = sc.l1.vcpus.max(1) as u64;
        let pool_pages = ram.saturating_sub(ubase) / K64 / vcpus;
        if pool_pages < 16 {
            return Err(format!(
                "{} MiB of L1 RAM leave {pool_pages} pages per L1 vCPU after the tables and \
                 the L2s' kernel maps ({} MiB); at least 16 are needed",
                ram >> 20,
                ubase >> 20
            ));
        }
        Ok(Self {
            vcpus,
            kernel_leaves,
            kbase,
            ubase,
            pool_pages,
        })
    }

    fn root(self, lpid: u16) -> u64 {
        TABLES + u64::from(lpid - 1) * REGION
    }

    fn pte_table(self, lpid: u16, k: u64) -> u64 {
        self.root(lpid) + PTES + k * PTE_TABLE
    }

    fn kernel_chunk(self, lpid: u16, i: u64) -> u64 {
        self.kbase + (u64::from(lpid - 1) * self.kernel_leaves + i) * M2
    }

    /// The L1 pages of vCPU `v`'s pool.
    fn pool(self, v: u64) -> impl DoubleEndedIterator<Item = u64> {
        let base = self.ubase + v.min(self.vcpus) * self.pool_pages * K64;
        (0..self.pool_pages).map(move |i| base + i * K64)
    }

    /// The L1 page the hostile L1 maps everywhere.
    pub fn hostile_target(self) -> u64 {
        self.ubase
    }
}

/// What L1's vCPU did and saw (summed over vCPUs in the report).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct L1Counters {
    /// L2 accesses (H_ENTER_NESTED calls, L1's retries after an exit included).
    pub accesses: u64,
    /// Accesses that completed.
    pub ok: u64,
    /// HDSI/HISI exits with NOHPTE (L1 faults the page in).
    pub exit_nohpte: u64,
    /// HDSI/HISI exits with SET_RC (L1 sets R/C).
    pub exit_set_rc: u64,
    /// HDSI exits with PROTFAULT on a store (L1 restores W).
    pub exit_protfault: u64,
    /// Results L1's tables do not explain (must be 0).
    pub mismatches: u64,
    /// The first mismatch.
    pub first_mismatch: Option<String>,
    /// L2 pages L1 mapped (fault-in).
    pub maps: u64,
    /// L2 pages moved to another L1 page.
    pub remaps: u64,
    /// L2 pages write-protected (W and C cleared).
    pub protects: u64,
    /// L2 pages aged (R cleared).
    pub ages: u64,
    /// L2 pages unmapped by L1.
    pub unmaps: u64,
    /// L2 pages L1 took back because its pool was empty.
    pub reclaims: u64,
    /// H_TLB_INVALIDATE of one page (IS = 0).
    pub page_invalidations: u64,
    /// H_TLB_INVALIDATE of one LPID (IS = 2, RIC 0 or 2).
    pub lpid_flushes: u64,
    /// L2s L1 created (partition-table entry and tables written).
    pub l2_created: u64,
    /// L2s L1 destroyed.
    pub l2_destroyed: u64,
    /// Hostile L1: distinct (lpid, L2 address) pairs mapped onto the target page.
    pub hostile_pairs: u64,
}

impl L1Counters {
    /// Adds `o`'s counts (keeps the first mismatch already held).
    pub fn merge(&mut self, o: &Self) {
        self.accesses += o.accesses;
        self.ok += o.ok;
        self.exit_nohpte += o.exit_nohpte;
        self.exit_set_rc += o.exit_set_rc;
        self.exit_protfault += o.exit_protfault;
        self.mismatches += o.mismatches;
        if self.first_mismatch.is_none() {
            self.first_mismatch.clone_from(&o.first_mismatch);
        }
        self.maps += o.maps;
        self.remaps += o.remaps;
        self.protects += o.protects;
        self.ages += o.ages;
        self.unmaps += o.unmaps;
        self.reclaims += o.reclaims;
        self.page_invalidations += o.page_invalidations;
        self.lpid_flushes += o.lpid_flushes;
        self.l2_created += o.l2_created;
        self.l2_destroyed += o.l2_destroyed;
        self.hostile_pairs += o.hostile_pairs;
    }
}

/// One mapped L2 user page: its L1 page and the R, C and W bits of its PTE.
#[derive(Clone, Copy, Debug)]
struct Page {
    l1: u64,
    flags: u64,
}

/// L1's view of one of its L2s.
#[derive(Debug)]
struct L2 {
    lpid: u16,
    alive: bool,
    pte_tables: Vec<bool>,
    pages: Vec<Option<Page>>,
    /// Mapped pages, for random picks; `pos[p]` is `p`'s index in it.
    mapped: Vec<u32>,
    pos: Vec<u32>,
    hot_base: u64,
    next_hostile: u64,
}

impl L2 {
    fn set(&mut self, p: u64, page: Option<Page>) -> Option<Page> {
        let i = p as usize;
        let old = self
            .pages
            .get_mut(i)
            .and_then(|s| std::mem::replace(s, page));
        match (old.is_some(), page.is_some()) {
            (false, true) => {
                if let Some(x) = self.pos.get_mut(i) {
                    *x = self.mapped.len() as u32;
                }
                self.mapped.push(p as u32);
            }
            (true, false) => {
                let at = self.pos.get(i).copied().unwrap_or(u32::MAX) as usize;
                if at < self.mapped.len() {
                    self.mapped.swap_remove(at);
                    if let Some(&moved) = self.mapped.get(at) {
                        if let Some(x) = self.pos.get_mut(moved as usize) {
                            *x = at as u32;
                        }
                    }
                }
            }
            _ => {}
        }
        old
    }
}

/// What L1's tables say one access must come to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// Completes at this L1 address.
    Ok(u64),
    /// Exits with this cause (L1 then repairs its table and retries).
    Exit(FaultCause),
}

/// One L1 vCPU and its L2s (module docs).
#[derive(Debug)]
pub struct L1Cpu {
    layout: Layout,
    wl: NestedWorkload,
    hostile: bool,
    kernel_leaves: u64,
    l2_pages: u64,
    rng: ChaCha8Rng,
    l2s: Vec<L2>,
    free: Vec<u64>,
    steps: u64,
    /// What this vCPU did and saw.
    pub counters: L1Counters,
    /// Digest of every result this vCPU saw.
    pub digest: u64,
}

impl L1Cpu {
    /// L1 vCPU `vcpu` of `sc` in `ram` bytes of L1 RAM, owning lpids
    /// `vcpu * l2s_per_vcpu + 1 ..`.
    pub fn new(sc: &NestedScenario, ram: u64, vcpu: usize) -> Result<Self, String> {
        let layout = Layout::new(sc, ram)?;
        let per = sc.l1.l2s_per_vcpu;
        let pages = sc.l1.l2_pages as usize;
        let l2s = (0..per)
            .map(|i| {
                let lpid = u16::try_from(vcpu * per + i + 1).map_err(|_| "lpid past 65535")?;
                Ok(L2 {
                    lpid,
                    alive: false,
                    pte_tables: vec![false; MAX_PTE_TABLES as usize],
                    pages: vec![None; pages],
                    mapped: Vec::new(),
                    pos: vec![u32::MAX; pages],
                    hot_base: 0,
                    next_hostile: 0,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut rng = ChaCha8Rng::seed_from_u64(sc.seed);
        rng.set_stream(0x4c31_0000 + vcpu as u64);
        Ok(Self {
            layout,
            wl: sc.workload,
            hostile: sc.l1.hostile,
            kernel_leaves: sc.l1.kernel_2m_leaves,
            l2_pages: sc.l1.l2_pages,
            rng,
            l2s,
            free: layout.pool(vcpu as u64).rev().collect(),
            steps: 0,
            counters: L1Counters::default(),
            digest: 0,
        })
    }

    fn mismatch(&mut self, what: String) {
        self.counters.mismatches += 1;
        if self.counters.first_mismatch.is_none() {
            self.counters.first_mismatch = Some(what);
        }
    }

    fn store(&mut self, vm: &NestedVm, gpa: u64, val: u64) {
        if let Err(e) = vm.l1_store(gpa, val) {
            self.mismatch(format!("L1 store: {e}"));
        }
    }

    fn hcall_ok(&mut self, what: &str, ret: i64) {
        if ret != 0 {
            self.mismatch(format!("{what} returned {ret}"));
        }
    }

    fn tlbie_page(&mut self, vm: &NestedVm, lpid: u16, n_gpa: u64) {
        self.counters.page_invalidations += 1;
        let rb = (n_gpa & !(K64 - 1)) | (u64::from(PageSize::P64K.ap()) << 5);
        let r = vm.h_tlb_invalidate(TlbieInstr::encode(0, false, true).0, lpid.into(), rb);
        self.hcall_ok("H_TLB_INVALIDATE (page)", r);
    }

    fn tlbie_lpid(&mut self, vm: &NestedVm, lpid: u16, ric: u8) {
        self.counters.lpid_flushes += 1;
        let instr = TlbieInstr::encode(ric, false, true).0;
        let r = vm.h_tlb_invalidate(instr, lpid.into(), 2 << 10);
        self.hcall_ok("H_TLB_INVALIDATE (lpid)", r);
    }

    fn user_gpa(&self, p: u64) -> u64 {
        self.kernel_leaves * M2 + p * K64
    }

    fn pte_addr(&self, lpid: u16, p: u64) -> (u64, u64) {
        let n = self.user_gpa(p);
        let k = (n >> 21) - self.kernel_leaves;
        (k, self.layout.pte_table(lpid, k) + 8 * ((n >> 16) & 31))
    }

    /// L1 writes L2 `i`'s tables and partition-table entry.
    fn create(&mut self, vm: &NestedVm, i: usize) {
        let Some(lpid) = self.l2s.get(i).map(|l| l.lpid) else {
            return;
        };
        let root = self.layout.root(lpid);
        self.store(vm, root, RadixPde::new(root + PUD, 9).bits());
        self.store(vm, root + PUD, RadixPde::new(root + PMD, 9).bits());
        if self.hostile {
            let table = self.layout.pte_table(lpid, 0);
            let target = self.layout.hostile_target();
            for j in 0..512 {
                self.store(vm, root + PMD + 8 * j, RadixPde::new(table, 5).bits());
            }
            for j in 0..32 {
                self.store(vm, table + 8 * j, RadixPte::new(target, FULL).bits());
            }
        } else {
            for j in 0..self.kernel_leaves {
                let chunk = self.layout.kernel_chunk(lpid, j);
                self.store(vm, root + PMD + 8 * j, RadixPte::new(chunk, FULL).bits());
            }
        }
        let pate = PATB + 16 * u64::from(lpid);
        self.store(vm, pate, PateDw0::radix52(root, 13).bits());
        if let Some(l) = self.l2s.get_mut(i) {
            l.alive = true;
        }
        self.counters.l2_created += 1;
    }

    /// L1 destroys L2 `i`: PATE cleared, RIC = 2 flush (L0 drops the L2), then its pages
    /// and tables are freed.
    fn destroy(&mut self, vm: &NestedVm, i: usize) {
        let Some(lpid) = self.l2s.get(i).map(|l| l.lpid) else {
            return;
        };
        self.store(vm, PATB + 16 * u64::from(lpid), 0);
        self.tlbie_lpid(vm, lpid, 2);
        let root = self.layout.root(lpid);
        let Some(l) = self.l2s.get_mut(i) else {
            return;
        };
        l.alive = false;
        let mapped = std::mem::take(&mut l.mapped);
        let tables: Vec<u64> = (0..MAX_PTE_TABLES)
            .filter(|&k| l.pte_tables.get(k as usize).is_some_and(|&b| b))
            .collect();
        l.pte_tables.fill(false);
        let mut freed = Vec::with_capacity(mapped.len());
        for &p in &mapped {
            if let Some(pg) = l.pages.get_mut(p as usize).and_then(Option::take) {
                freed.push((p, pg.l1));
            }
            if let Some(x) = l.pos.get_mut(p as usize) {
                *x = u32::MAX;
            }
        }
        for (p, l1) in freed {
            let (_, pte) = self.pte_addr(lpid, u64::from(p));
            self.store(vm, pte, 0);
            self.free.push(l1);
        }
        let pmd_entries = if self.hostile {
            512
        } else {
            self.kernel_leaves
        };
        for j in 0..pmd_entries {
            self.store(vm, root + PMD + 8 * j, 0);
        }
        for k in tables {
            self.store(vm, root + PMD + 8 * (self.kernel_leaves + k), 0);
        }
        self.store(vm, root + PUD, 0);
        self.store(vm, root, 0);
        self.counters.l2_destroyed += 1;
    }

    /// One operation of this L1 vCPU, chosen by the workload's weights.
    pub fn step(&mut self, vm: &NestedVm) {
        self.steps += 1;
        if self.hostile {
            return self.hostile_step(vm);
        }
        let w = self.wl;
        let weights = [
            w.access,
            w.remap,
            w.protect,
            w.age,
            w.unmap,
            w.flush_lpid,
            w.destroy,
        ];
        let total: u32 = weights.iter().sum();
        let mut x = self.rng.gen_range(0..total.max(1));
        let mut op = 0;
        for (k, &wt) in weights.iter().enumerate() {
            if x < wt {
                op = k;
                break;
            }
            x -= wt;
        }
        let i = self.rng.gen_range(0..self.l2s.len());
        if !self.l2s.get(i).is_some_and(|l| l.alive) {
            self.create(vm, i);
        }
        match op {
            0 => self.access_step(vm, i),
            1..=4 => self.change_page(vm, i, op),
            5 => {
                if let Some(lpid) = self.l2s.get(i).map(|l| l.lpid) {
                    self.tlbie_lpid(vm, lpid, 0);
                }
            }
            _ => self.destroy(vm, i),
        }
    }

    fn pick_access(&mut self) -> Access {
        let x = self.rng.gen_range(0..1000);
        if x < self.wl.store_per_mille {
            Access::Store
        } else if x < self.wl.store_per_mille + self.wl.fetch_per_mille {
            Access::Fetch
        } else {
            Access::Load
        }
    }

    fn access_step(&mut self, vm: &NestedVm, i: usize) {
        let acc = self.pick_access();
        let off = self.rng.gen_range(0..K64 / 8) * 8;
        let n_gpa = if self.kernel_leaves > 0
            && self.rng.gen_range(0..1000) < self.wl.kernel_per_mille
        {
            self.rng.gen_range(0..self.kernel_leaves * M2 / K64) * K64 + off
        } else {
            let hot = self.wl.hot_pages.min(self.l2_pages);
            let Some(l) = self.l2s.get_mut(i) else {
                return;
            };
            if self.rng.gen_ratio(1, 64) {
                l.hot_base = (l.hot_base + self.rng.gen_range(1..=hot.div_ceil(4))) % self.l2_pages;
            }
            let p = if self.rng.gen_ratio(9, 10) {
                (l.hot_base + self.rng.gen_range(0..hot)) % self.l2_pages
            } else {
                self.rng.gen_range(0..self.l2_pages)
            };
            self.user_gpa(p) + off
        };
        self.run_access(vm, i, n_gpa, acc);
    }

    /// What L1's tables say an access to `n_gpa` of L2 `i` comes to.
    fn want(&self, i: usize, n_gpa: u64, acc: Access) -> Want {
        let kernel = self.kernel_leaves * M2;
        if self.hostile {
            return Want::Ok(self.layout.hostile_target() + (n_gpa & (K64 - 1)));
        }
        if n_gpa < kernel {
            let lpid = self.l2s.get(i).map_or(1, |l| l.lpid);
            let chunk = self.layout.kernel_chunk(lpid, n_gpa / M2);
            return Want::Ok(chunk + (n_gpa & (M2 - 1)));
        }
        let p = (n_gpa - kernel) / K64;
        let page = self
            .l2s
            .get(i)
            .and_then(|l| l.pages.get(p as usize).copied().flatten());
        let Some(pg) = page else {
            return Want::Exit(FaultCause::NoTranslation);
        };
        let store = acc == Access::Store;
        if store && pg.flags & RadixPte::EAA_RW == 0 {
            Want::Exit(FaultCause::Protection)
        } else if pg.flags & RadixPte::R == 0 || (store && pg.flags & RadixPte::C == 0) {
            Want::Exit(FaultCause::SetRc)
        } else {
            Want::Ok(pg.l1 + (n_gpa & (K64 - 1)))
        }
    }

    /// Runs one L2 access through H_ENTER_NESTED, handling up to three exits the way a
    /// KVM L1 does (fault-in, set R/C, restore W) and checking every result.
    fn run_access(&mut self, vm: &NestedVm, i: usize, n_gpa: u64, acc: Access) {
        let Some(lpid) = self.l2s.get(i).map(|l| l.lpid) else {
            return;
        };
        let Some(n) = NGpa::new(n_gpa) else {
            return;
        };
        for _ in 0..4 {
            let r = vm.enter_nested(lpid.into(), n_gpa, acc);
            self.counters.accesses += 1;
            self.digest = digest_result(self.digest, &r);
            let want = self.want(i, n_gpa, acc);
            let expected = match want {
                Want::Ok(l1gpa) => {
                    if matches!(r, L2Result::Ok { l1gpa: got, .. } if got == l1gpa) {
                        self.counters.ok += 1;
                        return;
                    }
                    format!("ok l1gpa={l1gpa:#x}")
                }
                Want::Exit(cause) => {
                    if r == L2Result::from(Exit::reflect(cause, acc, n)) {
                        self.handle_exit(vm, i, n_gpa, acc, cause);
                        continue;
                    }
                    format!("{cause:?} exit")
                }
            };
            self.mismatch(format!(
                "lpid {lpid} {acc:?} at {n_gpa:#x}: got {r:?}, L1's tables say {expected}"
            ));
            return;
        }
        self.mismatch(format!(
            "lpid {lpid} {acc:?} at {n_gpa:#x}: still exiting after L1 handled 3 exits"
        ));
    }

    fn handle_exit(&mut self, vm: &NestedVm, i: usize, n_gpa: u64, acc: Access, c: FaultCause) {
        let store = acc == Access::Store;
        let p = (n_gpa - self.kernel_leaves * M2) / K64;
        let old = self
            .l2s
            .get(i)
            .and_then(|l| l.pages.get(p as usize).copied().flatten());
        let flags = match (c, old) {
            (FaultCause::NoTranslation, None) => {
                self.counters.exit_nohpte += 1;
                RadixPte::R | RadixPte::EAA_RW | if store { RadixPte::C } else { 0 }
            }
            (FaultCause::SetRc, Some(pg)) => {
                self.counters.exit_set_rc += 1;
                pg.flags | RadixPte::R | if store { RadixPte::C } else { 0 }
            }
            (FaultCause::Protection, Some(pg)) => {
                self.counters.exit_protfault += 1;
                pg.flags | RadixPte::R | RadixPte::C | RadixPte::EAA_RW
            }
            _ => return,
        };
        let l1 = match old {
            Some(pg) => pg.l1,
            None => match self.alloc(vm) {
                Some(a) => {
                    self.counters.maps += 1;
                    a
                }
                None => return,
            },
        };
        self.map(vm, i, p, Page { l1, flags });
    }

    /// Writes L2 `i`'s PTE of page `p` (its PTE table first if new) and records it.
    fn map(&mut self, vm: &NestedVm, i: usize, p: u64, pg: Page) {
        let Some(lpid) = self.l2s.get(i).map(|l| l.lpid) else {
            return;
        };
        let (k, pte) = self.pte_addr(lpid, p);
        if !self
            .l2s
            .get(i)
            .and_then(|l| l.pte_tables.get(k as usize))
            .is_some_and(|&b| b)
        {
            let pmd = self.layout.root(lpid) + PMD + 8 * (self.kernel_leaves + k);
            let table = self.layout.pte_table(lpid, k);
            self.store(vm, pmd, RadixPde::new(table, 5).bits());
            if let Some(b) = self
                .l2s
                .get_mut(i)
                .and_then(|l| l.pte_tables.get_mut(k as usize))
            {
                *b = true;
            }
        }
        let bits = pg.flags | RadixPte::EAA_READ | RadixPte::EAA_X;
        self.store(vm, pte, RadixPte::new(pg.l1, bits).bits());
        if let Some(l) = self.l2s.get_mut(i) {
            l.set(p, Some(pg));
        }
    }

    /// Unmaps page `p` of L2 `i` (PTE cleared, page invalidation); returns its L1 page.
    fn unmap(&mut self, vm: &NestedVm, i: usize, p: u64) -> Option<u64> {
        let lpid = self.l2s.get(i)?.lpid;
        let pg = self.l2s.get_mut(i)?.set(p, None)?;
        let (_, pte) = self.pte_addr(lpid, p);
        self.store(vm, pte, 0);
        self.tlbie_page(vm, lpid, self.user_gpa(p));
        Some(pg.l1)
    }

    /// A free L1 page, reclaiming one of this vCPU's L2 pages if the pool is empty.
    fn alloc(&mut self, vm: &NestedVm) -> Option<u64> {
        if let Some(a) = self.free.pop() {
            return Some(a);
        }
        let with_pages: Vec<usize> = (0..self.l2s.len())
            .filter(|&i| self.l2s.get(i).is_some_and(|l| !l.mapped.is_empty()))
            .collect();
        let i = *with_pages.get(self.rng.gen_range(0..with_pages.len().max(1)))?;
        let n = self.l2s.get(i)?.mapped.len();
        let p = *self.l2s.get(i)?.mapped.get(self.rng.gen_range(0..n))?;
        self.counters.reclaims += 1;
        self.unmap(vm, i, u64::from(p))
    }

    /// Remap (1), write-protect (2), age (3) or unmap (4) a random mapped page of L2 `i`;
    /// each followed by its page invalidation.
    fn change_page(&mut self, vm: &NestedVm, i: usize, op: usize) {
        let Some(l) = self.l2s.get(i) else {
            return;
        };
        if l.mapped.is_empty() {
            return;
        }
        let Some(&p) = l.mapped.get(self.rng.gen_range(0..l.mapped.len())) else {
            return;
        };
        let lpid = l.lpid;
        let p = u64::from(p);
        let Some(pg) = l.pages.get(p as usize).copied().flatten() else {
            return;
        };
        let changed = match op {
            1 => {
                let Some(new) = self.free.pop() else {
                    return;
                };
                self.free.insert(0, pg.l1);
                self.counters.remaps += 1;
                Page { l1: new, ..pg }
            }
            2 => {
                self.counters.protects += 1;
                Page {
                    flags: pg.flags & !(RadixPte::EAA_RW | RadixPte::C),
                    ..pg
                }
            }
            3 => {
                self.counters.ages += 1;
                Page {
                    flags: pg.flags & !RadixPte::R,
                    ..pg
                }
            }
            _ => {
                if let Some(a) = self.unmap(vm, i, p) {
                    self.counters.unmaps += 1;
                    self.free.insert(0, a);
                }
                return;
            }
        };
        self.map(vm, i, p, changed);
        self.tlbie_page(vm, lpid, self.user_gpa(p));
    }

    /// The hostile L1: the next (lpid, L2 address) pair of its L2s onto the one target
    /// page, accessed once, then invalidated (by page; every
    /// [`HOSTILE_FLUSH_EVERY`]th by LPID). L0 never unmaps the target.
    fn hostile_step(&mut self, vm: &NestedVm) {
        let i = (self.steps % self.l2s.len() as u64) as usize;
        if !self.l2s.get(i).is_some_and(|l| l.alive) {
            self.create(vm, i);
        }
        let Some(l) = self.l2s.get_mut(i) else {
            return;
        };
        let (lpid, k) = (l.lpid, l.next_hostile);
        l.next_hostile += 1;
        let idx = k % HOSTILE_SPAN;
        let n_gpa = ((idx / 32) << 21) | ((idx % 32) << 16) | (self.rng.gen_range(0..K64 / 8) * 8);
        if k < HOSTILE_SPAN {
            self.counters.hostile_pairs += 1;
        }
        let acc = self.pick_access();
        self.run_access(vm, i, n_gpa, acc);
        if k % HOSTILE_FLUSH_EVERY == HOSTILE_FLUSH_EVERY - 1 {
            self.tlbie_lpid(vm, lpid, 0);
        } else {
            self.tlbie_page(vm, lpid, n_gpa);
        }
    }
}

/// Folds one L2 result into a digest.
fn digest_result(d: u64, r: &L2Result) -> u64 {
    let (tag, a, b) = match *r {
        L2Result::Ok { l1gpa, .. } => (1, l1gpa, 0),
        L2Result::Hdsi { cause, asdr } => (2, cause, asdr),
        L2Result::Hisi { cause, asdr } => (3, cause, asdr),
        L2Result::Mmio { l1gpa } => (4, l1gpa, 0),
        L2Result::Ret(r) => (5, r as u64, 0),
        L2Result::StaleFrame { hpa } => (6, hpa, 0),
        L2Result::Livelock => (7, 0, 0),
    };
    digest_word(digest_word(digest_word(d, tag), a), b)
}
