//! [`NestedVm`]: the thread-safe nested-guest MMU of a KVM-HV L0 on the shared host
//! layer: L1 as a radix guest of L0 over `revmap_host` memslots and host memory, the
//! shadow tables of its L2 guests, and the nested rmap at work.
//!
//! # What it holds
//!
//! * **L1's memory**: the memslots of L1 RAM (a [`SlotSet`], KVM's SRCU-protected
//!   `kvm_memslots`) over host memory ([`FreshFrames`] for the slot made by
//!   [`NestedVm::new`]), and L1's *contents* (its partition table and its tables for the
//!   L2s), which L0 reads live ([`SparseMemory`] behind an `RwLock`).
//! * **L0's partition-scoped table for L1** (L1 gpa -> host page), a [`ShadowTable`] in
//!   L0's geometry. Faults instantiate it (`kvmppc_book3s_instantiate_page`): R always,
//!   W and C on a write fault; a 2 MiB leaf when the host page is 2 MiB, the slot is
//!   aligned and not dirty logging, else a PAGE_SIZE leaf.
//! * **Per-L2 state** (KVM's `kvm_nested_guest`): the registry ([`NestedGuests`]: l1_lpid,
//!   shadow LPID, cached PATE, refcount), the shadow table and the per-L2 lock
//!   (`tlb_lock`), which serialises that L2's nested faults and L1's invalidations of it.
//! * **The nested rmap**: one `revmap_rmap::NestedRmap` word per L0 PAGE_SIZE page of
//!   each memslot, holding (l1_lpid, n_gpa) for every shadow leaf derived from it, with
//!   the per-word bound ([`NestedLimits`], 64 entries) and reclaim of stale entries.
//!
//! # Locking (KVM's order: `tlb_lock` -> `mmu_lock`)
//!
//! * `mmu_lock` (a `Mutex`) protects the registry, every shadow table, L0's table for L1
//!   and every nested-rmap mutation. The hardware's shadow lookup also runs under it.
//! * A nested fault holds its L2's `tlb_lock` for the whole fault; it samples the
//!   invalidation sequence ([`InvalidateSeq`]) before asking the host for the page, reserves
//!   the rmap node and allocates the directory tables it will link **before** `mmu_lock`,
//!   and installs the shadow leaf and its rmap entry in one `mmu_lock` section only if no
//!   host invalidation ran since the sample (otherwise it retries).
//!
//! # Allocation
//!
//! Every allocation can fail cleanly, before anything changes: H_ENTER_NESTED returns
//! H_NO_MEM, the other calls [`NestedVmError::Alloc`] ([`NestedVmError::is_no_memory`]).
//! As in KVM, memory is allocated before `mmu_lock` (the nested rmap node, the tables
//! `kvmppc_create_pte` links, a new L2's shadow root); inside it only what was reserved
//! is used, and collections that grow under it (the L2 table, the registry) reserve
//! room first. The host-side callbacks (unmap, aging, dirty harvest, memslot flush)
//! and the invalidations allocate nothing.
//! * Host-side callbacks ([`HostMmu`]) take `mmu_lock` only (never a `tlb_lock`).
//! * L1's memory lock is taken before `mmu_lock` when both are needed, never after.
//!
//! # Divergences from KVM (all deliberate)
//!
//! * LPID 0 is refused by H_ENTER_NESTED (a 0-valued rmap entry would hide a list).
//! * Aging and dirty harvest flush with the **shadow** LPID, and find the entries of a
//!   large L0 leaf from any gfn inside it (KVM uses the aged gfn's word only).
//! * An rmap word at its bound with no stale entry refuses the insert; the access is then
//!   served without installing a shadow leaf (counted as `rmap_refused`).
//! * The nested rmap words live in arrays the VM keeps per memslot (created and freed
//!   by the lifecycle hooks), not in the memslot's `Rmap` words, whose type is the hashed
//!   page table's ring head.
//! * The per-L2 `tlb_lock`s are stripes of a table allocated with the VM (the L2 with
//!   shadow LPID `s` takes stripe `s % 64`): stable Rust has no fallible `Arc::new` for
//!   a lock per L2. Two L2s on one stripe serialise each other's faults and
//!   invalidations; no path holds two stripes, so none can deadlock.
//! * A failed allocation of a new L2 is H_NO_MEM (KVM's `kvmhv_get_nested` returns
//!   NULL and H_ENTER_NESTED H_PARAMETER), and of the fault path H_NO_MEM too (KVM
//!   resumes the L2 to fault again).

use crate::access::{l1_translate, L1Layout, L2Outcome};
use crate::fault::{l0_leaf_for_l1, shadow_leaf, L0Leaf, PMD_SHIFT};
use crate::frames::FreshFrames;
use crate::hcall::{
    check_enter_nested, check_set_partition_table, Ric, TlbInvalidate, H_NO_MEM, H_PARAMETER,
    H_SUCCESS,
};
use crate::radix::{
    walk, Access, Dsisr, Exit, Geometry, MemError, PageSize, Ptcr, RadixPte, SparseMemory,
};
use crate::shadow::{
    Installed as ShadowInstalled, NewTables, ShadowInsertError, ShadowPte, ShadowTable,
    TablesNeeded,
};
use crate::{GuestId, NGpa, NestedGuests, ShadowLpidAllocator};
use revmap_host::lifecycle::{self, MemslotArch, MemslotChange};
use revmap_host::slots::SlotSet;
use revmap_host::{
    HostMmu, InvalidateSeq, Memslot, MemslotError, MemslotFlags, Memslots, SlotView,
};
use revmap_rmap::error::{try_box, try_boxed_slice};
use revmap_rmap::nested::{check_nested_rmap, NestedError};
use revmap_rmap::pool::PoolError;
use revmap_rmap::sync::{lock, read, write, yield_now, AtomicU64, Mutex, Ordering, RwLock};
use revmap_rmap::{
    Gfn, Gpa, Hva, Lpid, NestedCache, NestedLimits, NestedPool, NestedRmap, NestedRmapEntry,
    RmapError, SlotId, PAGE_SHIFT,
};
use std::collections::HashMap;

/// Rounds of the H_ENTER_NESTED loop (shadow lookup, nested fault, resume) before an
/// access is given up as a livelock ([`L2Result::Livelock`]).
pub const MAX_ROUNDS: usize = 16;

/// Fault rounds that backed off because of a host invalidation (the invalidation
/// retry), after which an access is given up as a livelock.
pub const MAX_RETRIES: u64 = 1 << 20;

/// Host virtual address of the L1 RAM slot made by [`NestedVm::new`].
pub const L1_RAM_HVA: u64 = 0x7000_0000_0000;

/// How to build a [`NestedVm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NestedVmConfig {
    /// L1 RAM: guest physical `[0, l1_memory_bytes)`, one memslot; above is MMIO.
    pub l1_memory_bytes: u64,
    /// L0's PAGE_SIZE (the smallest L0 and shadow leaf): 4 KiB or 64 KiB.
    pub page: PageSize,
    /// Shift of the host pages backing L1 RAM (>= the PAGE_SIZE shift; 21 for THP).
    pub backing_shift: u32,
    /// Dirty logging on the L1 RAM slot (forces PAGE_SIZE L0 leaves, as KVM does).
    pub dirty_logging: bool,
    /// Entries per nested rmap word (the bound).
    pub rmap_cap: usize,
}

impl NestedVmConfig {
    /// 64 KiB PAGE_SIZE, host pages of `backing_shift`, dirty logging on, cap 64.
    pub fn new(l1_memory_bytes: u64, backing_shift: u32) -> Self {
        Self {
            l1_memory_bytes,
            page: PageSize::P64K,
            backing_shift,
            dirty_logging: true,
            rmap_cap: revmap_rmap::nested::DEFAULT_NESTED_RMAP_CAP,
        }
    }
}

/// Why a [`NestedVm`] operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NestedVmError {
    /// The configuration is not supported (PAGE_SIZE other than 4K/64K, backing page
    /// smaller than PAGE_SIZE, RAM not a multiple of the backing page, a zero cap).
    #[error("unsupported nested VM configuration: {0}")]
    Config(&'static str),
    /// A memslot could not be made or changed.
    #[error(transparent)]
    Memslot(#[from] MemslotError),
    /// Memory could not be allocated (rmap words, host memory, tables, L1 memory,
    /// the dirty bitmap): the call changed nothing.
    #[error(transparent)]
    Alloc(#[from] revmap_rmap::RmapError),
    /// An L1 store outside L1 RAM or not 8-byte aligned.
    #[error("L1 store at {0:#x} is not an aligned doubleword of L1 RAM")]
    BadStore(u64),
    /// The nested rmap limit is invalid.
    #[error(transparent)]
    Nested(#[from] NestedError),
}

impl NestedVmError {
    /// Whether this is a failed memory allocation (of any layer): the call changed
    /// nothing and may succeed when repeated.
    pub fn is_no_memory(&self) -> bool {
        let rmap = |e: &RmapError| matches!(e, RmapError::Alloc { .. });
        match self {
            NestedVmError::Alloc(e) | NestedVmError::Memslot(MemslotError::Alloc(e)) => rmap(e),
            NestedVmError::Nested(NestedError::Pool(PoolError::Rmap(e))) => rmap(e),
            _ => false,
        }
    }
}

/// A failed allocation of `n` values of `T`.
fn no_mem<T>(n: usize) -> RmapError {
    RmapError::Alloc {
        bytes: n.saturating_mul(core::mem::size_of::<T>()),
    }
}

/// What one L2 access (the memory side of H_ENTER_NESTED) came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Result {
    /// The access completed at L1 address `l1gpa` on host physical address `hpa`.
    Ok {
        /// The L1 address reached (offset included).
        l1gpa: u64,
        /// The host physical address the shadow translation gave.
        hpa: u64,
    },
    /// H_ENTER_NESTED returned 0xE00 with HDSISR `cause` and ASDR `asdr`.
    Hdsi {
        /// HDSISR.
        cause: u64,
        /// ASDR.
        asdr: u64,
    },
    /// H_ENTER_NESTED returned 0xE20 with the SRR1 `cause` bits and ASDR `asdr`.
    Hisi {
        /// SRR1 cause bits.
        cause: u64,
        /// ASDR.
        asdr: u64,
    },
    /// L1's leaf maps the page outside L1 RAM: L0 emulated it as MMIO for the L2.
    Mmio {
        /// The L1 address.
        l1gpa: u64,
    },
    /// H_ENTER_NESTED refused to run the L2 (PAPR return code).
    Ret(i64),
    /// The shadow translation landed on a host frame that backs no L1 page any more (a
    /// stale shadow PTE: an MMU bug, never a valid outcome).
    StaleFrame {
        /// The host physical address reached.
        hpa: u64,
    },
    /// The access neither completed nor exited within [`MAX_ROUNDS`] rounds.
    Livelock,
}

impl From<Exit> for L2Result {
    fn from(e: Exit) -> Self {
        match e {
            Exit::Hdsi { hdsisr, asdr } => L2Result::Hdsi {
                cause: hdsisr.bits(),
                asdr,
            },
            Exit::Hisi { srr1, asdr } => L2Result::Hisi {
                cause: srr1.bits(),
                asdr,
            },
        }
    }
}

/// Counters of the nested MMU (monotonic, or high-water marks); serialised by field
/// name (the `nested` object of the reports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NestedCounters {
    /// Nested page faults handled.
    pub nested_faults: u64,
    /// L2 accesses completed through a shadow leaf.
    pub shadow_hits: u64,
    /// Faults that backed off because a host invalidation ran (the retry sequence).
    pub fault_retries: u64,
    /// Shadow leaves removed through the nested rmap (host unmap, memslot flush).
    pub rmap_invalidations: u64,
    /// Rmap entries found stale (guest gone, no shadow leaf, or another host page).
    pub rmap_stale_skipped: u64,
    /// Stale entries reclaimed at the bound.
    pub rmap_reclaimed: u64,
    /// Inserts refused at the bound (the access was served without a shadow leaf).
    pub rmap_refused: u64,
    /// Longest nested rmap list seen.
    pub rmap_entries_max_per_gfn: u64,
    /// High-water mark of nested rmap memory (8 B per non-empty word, 16 B per node).
    pub rmap_bytes_max: u64,
    /// Shadow TLB flushes issued (each with a shadow LPID).
    pub shadow_flushes: u64,
    /// L2 guests created.
    pub l2_created: u64,
    /// L2 guests released.
    pub l2_released: u64,
}

#[derive(Debug, Default)]
struct Counters {
    nested_faults: AtomicU64,
    shadow_hits: AtomicU64,
    fault_retries: AtomicU64,
    rmap_refused: AtomicU64,
}

fn bump(c: &AtomicU64) {
    // ORDERING: Relaxed: statistics only.
    c.fetch_add(1, Ordering::Relaxed);
}

/// Stripes of the per-L2 locks: the L2 with shadow LPID `s` uses lock
/// `s % TLB_STRIPES` (module docs, divergences).
#[cfg(not(loom))]
const TLB_STRIPES: usize = 64;
#[cfg(loom)]
const TLB_STRIPES: usize = 4;

/// One L2's state besides its registry entry: the shadow table (under `mmu_lock`) and
/// the stripe of its per-L2 lock.
#[derive(Debug)]
struct L2State {
    shadow: ShadowTable,
    tlb_stripe: usize,
}

/// Everything under `mmu_lock`.
#[derive(Debug)]
struct Mmu {
    guests: NestedGuests,
    l2: HashMap<GuestId, L2State>,
    /// L0's partition-scoped table for L1 (L1 gpa -> host page).
    l0: ShadowTable,
    /// Nested rmap words per memslot, one per L0 PAGE_SIZE page.
    rmaps: HashMap<SlotId, Box<[NestedRmap]>>,
    /// Entries over all words, and non-empty words (nodes = entries - words).
    entries: u64,
    words: u64,
    rmap_invalidations: u64,
    rmap_stale_skipped: u64,
    rmap_reclaimed: u64,
    entries_max: u64,
    bytes_max: u64,
    shadow_flushes: u64,
}

impl Mmu {
    fn account(&mut self, before: usize, after: usize) {
        self.entries = self.entries + after as u64 - before as u64;
        self.words = self.words + u64::from(after > 0) - u64::from(before > 0);
        self.entries_max = self.entries_max.max(after as u64);
        let bytes = self.words * 8 + (self.entries - self.words) * 16;
        self.bytes_max = self.bytes_max.max(bytes);
    }
}

/// The live shadow leaf of rmap entry `e` if it still maps host page `hpa` of an L0 leaf
/// of `l0_size` (the consumers' hpa check, `kvmhv_remove_nest_rmap`).
fn entry_live(
    guests: &NestedGuests,
    l2: &HashMap<GuestId, L2State>,
    e: NestedRmapEntry,
    hpa: u64,
    l0_size: PageSize,
) -> Option<(GuestId, ShadowPte)> {
    let id = guests.lookup(e.lpid())?;
    let leaf = l2.get(&id)?.shadow.lookup(NGpa::new(e.gpa().0)?)?;
    (leaf.pte.rpn() & !(l0_size.bytes() - 1) == hpa).then_some((id, leaf))
}

/// What a nested fault decided.
enum Fault {
    /// Re-enter the L2 (retry through the shadow table).
    Resume,
    /// Re-enter the L2 because a host invalidation raced the fault (nothing installed).
    Retry,
    /// Re-enter the L2 because a table changed since the fault allocated what it needed
    /// before `mmu_lock` (KVM's `-EAGAIN` from `kvmppc_create_pte`).
    Again,
    /// H_ENTER_NESTED ends, or the access was served, with this result.
    Done(L2Result),
}

/// The nested-guest MMU of one L1 (module docs).
#[derive(Debug)]
pub struct NestedVm {
    cfg: NestedVmConfig,
    geometry: Geometry,
    slots: SlotSet,
    frames: RwLock<Vec<FreshFrames>>,
    seq: InvalidateSeq,
    ptcr: AtomicU64,
    l1_mem: RwLock<SparseMemory>,
    mmu: Mutex<Mmu>,
    /// The per-L2 locks (`gp->tlb_lock`), striped by shadow LPID.
    tlb_locks: Box<[Mutex<()>]>,
    pool: NestedPool,
    limits: NestedLimits,
    counters: Counters,
    /// Fault injection for the loom models' should-fail variants.
    #[cfg(loom)]
    knobs: LoomKnobs,
}

/// Bugs a loom model may switch on to show that it catches them.
#[cfg(loom)]
#[derive(Debug, Default)]
pub struct LoomKnobs {
    /// The fault ignores the invalidation sequence (installs after a racing unmap).
    pub skip_invalidate_retry: revmap_rmap::sync::AtomicBool,
    /// Reclaim at the bound treats live entries as stale (evicts them).
    pub reclaim_live_entries: revmap_rmap::sync::AtomicBool,
}

impl NestedVm {
    /// The fault-injection switches of the loom models.
    #[cfg(loom)]
    pub fn loom_knobs(&self) -> &LoomKnobs {
        &self.knobs
    }

    #[cfg(loom)]
    fn knob(b: &revmap_rmap::sync::AtomicBool) -> bool {
        // ORDERING: Relaxed: set before the model's threads start.
        b.load(Ordering::Relaxed)
    }

    #[cfg(not(loom))]
    fn skip_retry(&self) -> bool {
        false
    }

    #[cfg(loom)]
    fn skip_retry(&self) -> bool {
        Self::knob(&self.knobs.skip_invalidate_retry)
    }

    #[cfg(not(loom))]
    fn reclaim_live(&self) -> bool {
        false
    }

    #[cfg(loom)]
    fn reclaim_live(&self) -> bool {
        Self::knob(&self.knobs.reclaim_live_entries)
    }

    /// A VM whose L1 RAM is one memslot (id 0, gfn 0) over [`FreshFrames`] at
    /// [`L1_RAM_HVA`].
    pub fn new(cfg: NestedVmConfig) -> Result<Self, NestedVmError> {
        let geometry = match cfg.page {
            PageSize::P4K => Geometry::Base4K,
            PageSize::P64K => Geometry::Base64K,
            _ => return Err(NestedVmError::Config("PAGE_SIZE must be 4 KiB or 64 KiB")),
        };
        if cfg.backing_shift < cfg.page.shift() || cfg.backing_shift > 30 {
            return Err(NestedVmError::Config(
                "backing page outside PAGE_SIZE..=1 GiB",
            ));
        }
        let backing = 1u64 << cfg.backing_shift;
        if cfg.l1_memory_bytes == 0 || cfg.l1_memory_bytes % backing != 0 {
            return Err(NestedVmError::Config(
                "L1 RAM must be a non-zero multiple of the backing page",
            ));
        }
        let limits = NestedLimits::new(cfg.rmap_cap)?;
        // Every allocation of a new VM fails cleanly: its tables, the LPID bitmap, the
        // host memory, the memslot and its nested rmap words are allocated before the
        // slot is published.
        let l0 = ShadowTable::new(geometry)?;
        let lpids = ShadowLpidAllocator::try_new(4096)?;
        let tlb_locks = try_boxed_slice(TLB_STRIPES, |_| Mutex::new(()))?;
        let vm = Self {
            cfg,
            geometry,
            slots: SlotSet::new(Memslots::new()),
            frames: RwLock::new(Vec::new()),
            seq: InvalidateSeq::default(),
            ptcr: AtomicU64::new(0),
            l1_mem: RwLock::new(SparseMemory::new(cfg.l1_memory_bytes)),
            mmu: Mutex::new(Mmu {
                guests: NestedGuests::new(lpids),
                l2: HashMap::new(),
                l0,
                rmaps: HashMap::new(),
                entries: 0,
                words: 0,
                rmap_invalidations: 0,
                rmap_stale_skipped: 0,
                rmap_reclaimed: 0,
                entries_max: 0,
                bytes_max: 0,
                shadow_flushes: 0,
            }),
            tlb_locks,
            pool: NestedPool::new(),
            limits,
            counters: Counters::default(),
            #[cfg(loom)]
            knobs: LoomKnobs::default(),
        };
        let npages = cfg.l1_memory_bytes >> PAGE_SHIFT;
        let mem = FreshFrames::new(Hva(L1_RAM_HVA), npages, cfg.backing_shift)?;
        let flags = if cfg.dirty_logging {
            MemslotFlags::LOG_DIRTY_PAGES
        } else {
            MemslotFlags::empty()
        };
        let slot = Memslot::with_memory(SlotId(0), Gfn(0), npages, flags, try_box(mem.clone())?)?;
        {
            let mut frames = write(&vm.frames);
            frames
                .try_reserve(1)
                .map_err(|_| no_mem::<FreshFrames>(1))?;
            frames.push(mem);
        }
        // The slot's nested rmap words go in before the slot is published (the commit
        // hook finds them there), so publishing it cannot fail for want of them.
        let words = vm.rmap_words(&slot)?;
        {
            let mut m = lock(&vm.mmu);
            m.rmaps
                .try_reserve(1)
                .map_err(|_| no_mem::<NestedRmap>(1))?;
            m.rmaps.insert(slot.id(), words);
        }
        lifecycle::create_memslot(&vm.slots, &vm, slot)?;
        Ok(vm)
    }

    /// The nested rmap words of `slot`: one per L0 PAGE_SIZE page.
    fn rmap_words(&self, slot: &Memslot) -> Result<Box<[NestedRmap]>, RmapError> {
        let n = slot.npages().div_ceil(self.page_frames());
        let n = usize::try_from(n).map_err(|_| RmapError::Alloc { bytes: usize::MAX })?;
        NestedRmap::new_array(n)
    }

    /// The configuration.
    pub fn config(&self) -> NestedVmConfig {
        self.cfg
    }

    /// The published memslots of L1 RAM.
    pub fn slots(&self) -> &SlotSet {
        &self.slots
    }

    /// The MMU-notifier sequence (host actors bracket page-outs with it through
    /// [`HostMmu`]).
    pub fn invalidate_seq(&self) -> &InvalidateSeq {
        &self.seq
    }

    /// L1's current (virtual) PTCR.
    pub fn ptcr(&self) -> Ptcr {
        // ORDERING: Acquire pairs with the Release in h_set_partition_table.
        Ptcr(self.ptcr.load(Ordering::Acquire))
    }

    fn layout(&self) -> L1Layout {
        L1Layout {
            ram_bytes: self.cfg.l1_memory_bytes,
            l0_page_shift: self.cfg.page.shift(),
        }
    }

    /// Frames (4 KiB) per L0 PAGE_SIZE page.
    fn page_frames(&self) -> u64 {
        self.cfg.page.bytes() >> PAGE_SHIFT
    }

    /// Counters so far.
    pub fn counters(&self) -> NestedCounters {
        // ORDERING: Relaxed: statistics.
        let ld = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let m = lock(&self.mmu);
        let (created, released) = m.guests.counts();
        NestedCounters {
            nested_faults: ld(&self.counters.nested_faults),
            shadow_hits: ld(&self.counters.shadow_hits),
            fault_retries: ld(&self.counters.fault_retries),
            rmap_invalidations: m.rmap_invalidations,
            rmap_stale_skipped: m.rmap_stale_skipped,
            rmap_reclaimed: m.rmap_reclaimed,
            rmap_refused: ld(&self.counters.rmap_refused),
            rmap_entries_max_per_gfn: m.entries_max,
            rmap_bytes_max: m.bytes_max,
            shadow_flushes: m.shadow_flushes,
            l2_created: created,
            l2_released: released,
        }
    }

    /// Nested rmap entries and non-empty words now.
    pub fn rmap_totals(&self) -> (u64, u64) {
        let m = lock(&self.mmu);
        (m.entries, m.words)
    }

    /// Shadow leaves of the L2 `l1_lpid` now (0 if it does not exist).
    pub fn shadow_leaves(&self, l1_lpid: u16) -> usize {
        let m = lock(&self.mmu);
        m.guests
            .lookup(Lpid(l1_lpid))
            .and_then(|id| m.l2.get(&id))
            .map_or(0, |s| s.shadow.leaves())
    }

    /// L0's leaf for L1 covering L1 address `gpa` (L0's partition-scoped table).
    pub fn l0_leaf(&self, gpa: u64) -> Option<ShadowPte> {
        let m = lock(&self.mmu);
        m.l0.lookup(NGpa::new(gpa)?)
    }

    /// The shadow leaf of L2 `l1_lpid` covering L2 address `n_gpa`.
    pub fn shadow_leaf(&self, l1_lpid: u16, n_gpa: u64) -> Option<ShadowPte> {
        let m = lock(&self.mmu);
        let id = m.guests.lookup(Lpid(l1_lpid))?;
        m.l2.get(&id)?.shadow.lookup(NGpa::new(n_gpa)?)
    }

    /// Entries of the nested rmap word of L1 address `gpa` (its L0 PAGE_SIZE page).
    pub fn rmap_entries(&self, gpa: u64) -> Vec<NestedRmapEntry> {
        let slots = self.slots.load();
        let m = lock(&self.mmu);
        let Some(s) = slots.lookup(Gfn(gpa >> PAGE_SHIFT)) else {
            return Vec::new();
        };
        self.word_index(s, gpa)
            .and_then(|i| m.rmaps.get(&s.id())?.get(i))
            .map(|w| w.lock().iter(&self.pool).collect())
            .unwrap_or_default()
    }

    // ------------------------------------------------------------------------------
    // L1 side: its stores and hypercalls.
    // ------------------------------------------------------------------------------

    /// L1 writes the big-endian doubleword `val` at L1 address `gpa` (its partition
    /// table, its tables for the L2s). L0 does not write-protect L1's tables.
    pub fn l1_store(&self, gpa: u64, val: u64) -> Result<(), NestedVmError> {
        write(&self.l1_mem)
            .write_be_u64(Gpa(gpa), val)
            .map_err(|e| match e {
                MemError::NoMemory(_) => NestedVmError::Alloc(no_mem::<u64>(1)),
                _ => NestedVmError::BadStore(gpa),
            })
    }

    /// Runs `f` on L1's memory (building L1's tables in tests and scenarios; the same
    /// as a run of [`l1_store`](Self::l1_store)s).
    pub fn with_l1_memory<R>(&self, f: impl FnOnce(&mut SparseMemory) -> R) -> R {
        f(&mut write(&self.l1_mem))
    }

    /// H_SET_PARTITION_TABLE: PATS > 4 or a base outside L1 RAM is H_PARAMETER; else the
    /// PTCR is stored (0 disables nesting). Existing L2s keep their cached PATEs.
    pub fn h_set_partition_table(&self, ptcr: u64) -> i64 {
        let ptcr = Ptcr(ptcr);
        let pages = self.cfg.l1_memory_bytes >> self.cfg.page.shift();
        let shift = self.cfg.page.shift();
        match check_set_partition_table(ptcr, |b| b.0 >> shift < pages) {
            Ok(()) => {
                // ORDERING: Release: pairs with the Acquire in `ptcr`.
                self.ptcr.store(ptcr.0, Ordering::Release);
                H_SUCCESS
            }
            Err(e) => e.papr(),
        }
    }

    /// Takes a reference on L2 `l1_lpid` (creating it with `create`) and returns its id
    /// and per-L2 lock; `Err` holds the PAPR code (H_NO_MEM when a new L2's memory
    /// cannot be allocated: nothing changed then).
    fn get_l2(&self, l1_lpid: u64, create: bool) -> Result<Option<(GuestId, &Mutex<()>)>, i64> {
        let ptcr = self.ptcr();
        let stripe = |i: usize| self.tlb_locks.get(i % self.tlb_locks.len().max(1));
        {
            // An existing L2 costs no allocation: its shadow root was allocated once,
            // when it was created.
            let mut m = lock(&self.mmu);
            match m.guests.get(l1_lpid, ptcr, false) {
                Ok(Some(id)) => {
                    if let Some(t) = m.l2.get(&id).and_then(|st| stripe(st.tlb_stripe)) {
                        return Ok(Some((id, t)));
                    }
                    // Registered without shadow state (not made by this VM): give the
                    // reference back and create the state below.
                    let _ = m.guests.put(id);
                }
                Ok(None) if !create => return Ok(None),
                Ok(None) => {}
                Err(e) => return Err(e.papr()),
            }
        }
        if !create {
            return Ok(None);
        }
        // A new L2: its shadow root is allocated before mmu_lock (KVM allocates the
        // `kvm_nested_guest` and its table outside the lock), and dropped unused if
        // another thread created the L2 meanwhile.
        let shadow = ShadowTable::new(self.geometry).map_err(|_| H_NO_MEM)?;
        let mut m = lock(&self.mmu);
        // Room in the L2 table before the registry changes (the registry reserves its
        // own room before it changes).
        m.l2.try_reserve(1).map_err(|_| H_NO_MEM)?;
        let id = match m.guests.get(l1_lpid, ptcr, true) {
            Ok(Some(id)) => id,
            Ok(None) => return Ok(None),
            Err(e) => return Err(e.papr()),
        };
        let tlb_stripe = m
            .guests
            .guest(id)
            .map_or(0, |g| g.shadow_lpid().raw() as usize);
        let st = m.l2.entry(id).or_insert(L2State { shadow, tlb_stripe });
        match stripe(st.tlb_stripe) {
            Some(t) => Ok(Some((id, t))),
            None => Err(H_NO_MEM),
        }
    }

    /// Drops a reference; a released L2 loses its shadow table (its rmap entries stay,
    /// stale, `kvmhv_release_nested`).
    fn put_l2(&self, id: GuestId) {
        let mut m = lock(&self.mmu);
        if let Ok(Some(_)) = m.guests.put(id) {
            m.l2.remove(&id);
            m.shadow_flushes += 1;
        }
    }

    /// Reloads the PATE cache of `id` if its dw0 is 0 (at entry and in the fault path);
    /// returns the cached dw0. Caller holds the L2's `tlb_lock`.
    fn cached_root(&self, id: GuestId) -> Option<crate::radix::PateDw0> {
        let ptcr = self.ptcr();
        let mem = read(&self.l1_mem);
        let mut m = lock(&self.mmu);
        let root = m.guests.guest(id)?.l1_gr_to_hr();
        if root.bits() != 0 {
            return Some(root);
        }
        m.guests
            .update_ptbl_cache(id, &*mem, ptcr)
            .ok()
            .map(|p| p.dw0)
    }

    /// H_ENTER_NESTED, memory side: L2 `l1_lpid` makes one `access` at L2 real address
    /// `gpa`. The loop of shadow lookup (the hardware), nested fault and resume runs
    /// until the access completes or exits to L1, at most [`MAX_ROUNDS`] rounds.
    pub fn enter_nested(&self, l1_lpid: u64, gpa: u64, access: Access) -> L2Result {
        if let Err(e) = check_enter_nested(self.ptcr(), l1_lpid) {
            return L2Result::Ret(e.papr());
        }
        let Some(n) = NGpa::new(gpa) else {
            return L2Result::Ret(H_PARAMETER);
        };
        let (id, tlb) = match self.get_l2(l1_lpid, true) {
            Ok(Some(x)) => x,
            Ok(None) => return L2Result::Ret(H_PARAMETER),
            Err(r) => return L2Result::Ret(r),
        };
        {
            let _t = lock(tlb);
            self.cached_root(id);
        }
        let out = self.run_l2(id, tlb, n, access);
        self.put_l2(id);
        out
    }

    fn run_l2(&self, id: GuestId, tlb: &Mutex<()>, n: NGpa, access: Access) -> L2Result {
        let (mut rounds, mut retries) = (0, 0u64);
        while rounds < MAX_ROUNDS {
            if let Some(r) = self.shadow_access(id, n, access) {
                bump(&self.counters.shadow_hits);
                return r;
            }
            let f = {
                let _t = lock(tlb);
                self.nested_fault(id, n, access)
            };
            match f {
                Fault::Resume => rounds += 1,
                // A host invalidation ran or is running: KVM re-enters the guest and
                // faults again for as long as it takes; these rounds do not count
                // towards MAX_ROUNDS, only towards the much larger MAX_RETRIES.
                Fault::Retry | Fault::Again => {
                    retries += 1;
                    if retries > MAX_RETRIES {
                        break;
                    }
                    yield_now();
                }
                Fault::Done(r) => return r,
            }
        }
        L2Result::Livelock
    }

    /// The hardware's access through the shadow table, if a leaf permits `access` with
    /// its R/C. It happens under `mmu_lock`, so a host unmap is entirely before or after
    /// it: the frame it reaches is identified while it still backs the L1 page.
    fn shadow_access(&self, id: GuestId, n: NGpa, access: Access) -> Option<L2Result> {
        let m = lock(&self.mmu);
        let leaf = m.l2.get(&id)?.shadow.lookup(n)?;
        if !(leaf.pte.permits(access) && leaf.pte.rc_permits(access)) {
            return None;
        }
        let mask = leaf.size.bytes() - 1;
        let r = self.complete((leaf.pte.rpn() & !mask) | (n.raw() & mask));
        drop(m);
        Some(r)
    }

    /// The L1 address currently backed by host address `hpa`, if any.
    pub fn hpa_to_l1gpa(&self, hpa: u64) -> Option<u64> {
        let hva = read(&self.frames).iter().find_map(|f| f.hpa_to_hva(hpa))?;
        let slots = self.slots.load();
        let (_, gfn) = slots.hva_to_gfn(hva)?;
        Some((gfn.0 << PAGE_SHIFT) | (hpa & ((1 << PAGE_SHIFT) - 1)))
    }

    fn complete(&self, hpa: u64) -> L2Result {
        match self.hpa_to_l1gpa(hpa) {
            Some(l1gpa) => L2Result::Ok { l1gpa, hpa },
            None => L2Result::StaleFrame { hpa },
        }
    }

    /// `__kvmhv_nested_page_fault` (caller holds the L2's `tlb_lock`).
    fn nested_fault(&self, id: GuestId, n: NGpa, access: Access) -> Fault {
        bump(&self.counters.nested_faults);
        let Some(root) = self.cached_root(id) else {
            return Fault::Done(L2Result::Livelock);
        };
        let out = {
            let mem = read(&self.l1_mem);
            l1_translate(&*mem, root, n, access, self.layout())
        };
        let t = match out {
            L2Outcome::Complete(t) => t,
            L2Outcome::Mmio(g) => return Fault::Done(L2Result::Mmio { l1gpa: g.0 }),
            L2Outcome::Exit(e) => {
                // A protection-type fault on a present shadow leaf: it goes first.
                let mut m = lock(&self.mmu);
                if let Some(st) = m.l2.get_mut(&id) {
                    if st.shadow.remove(n).is_some() {
                        m.shadow_flushes += 1;
                    }
                }
                return Fault::Done(e.into());
            }
        };
        let l1gpa = t.raddr.0;
        let store = access == Access::Store;
        let slots = self.slots.load();
        let Some(slot) = slots
            .lookup(Gfn(l1gpa >> PAGE_SHIFT))
            .filter(|s| !s.is_invalid())
        else {
            return Fault::Done(L2Result::Mmio { l1gpa });
        };
        if store && slot.flags().contains(MemslotFlags::READONLY) {
            return Fault::Done(L2Result::Hdsi {
                cause: Dsisr::PROTFAULT | Dsisr::ISSTORE,
                asdr: n.raw() & !0xfff,
            });
        }
        // Sample the invalidation sequence before asking the host for the page.
        let seq = self.seq.sample();
        let size = self.l0_leaf_size(slot, l1gpa);
        let base_gpa = size.align_down(l1gpa);
        let base_gfn = Gfn(base_gpa >> PAGE_SHIFT);
        let Some(pfn) = slot.host_pfn(base_gfn).or_else(|| {
            slot.set_host_present(base_gfn, true)
                .then(|| slot.host_pfn(base_gfn))
                .flatten()
        }) else {
            return Fault::Resume;
        };
        let host_hpa = pfn << PAGE_SHIFT;
        let Some(base) = NGpa::new(base_gpa) else {
            return Fault::Done(L2Result::Livelock);
        };
        // Before mmu_lock, as KVM allocates the nested rmap entry and the page-table
        // pages before taking it: the rmap node, and the directory tables that L0's
        // leaf for L1 and the shadow leaf need as the tables are now. A failed
        // allocation ends the hypercall with H_NO_MEM before anything changed.
        let mut cache = NestedCache::new(&self.pool);
        if cache.reserve(1).is_err() {
            return Fault::Done(L2Result::Ret(H_NO_MEM));
        }
        let (lpid, need_l0, need_shadow) = {
            let m = lock(&self.mmu);
            let Some(lpid) = m.guests.guest(id).map(|g| g.l1_lpid()) else {
                return Fault::Done(L2Result::Livelock);
            };
            let (l0, need_l0) = match m.l0.lookup(base) {
                Some(l) => (l, TablesNeeded::NONE),
                None => (
                    ShadowPte {
                        n_gpa: base,
                        size,
                        pte: l0_leaf_for_l1(host_hpa, store),
                    },
                    m.l0.tables_needed(base, size).unwrap_or_default(),
                ),
            };
            let l0 = L0Leaf {
                pte: l0.pte,
                size: l0.size,
            };
            let need_shadow = shadow_leaf(l0, &t, n, access, self.cfg.page, lpid)
                .ok()
                .and_then(|s| m.l2.get(&id)?.shadow.tables_needed(s.n_gpa, s.size).ok())
                .unwrap_or_default();
            (lpid, need_l0, need_shadow)
        };
        let (Ok(mut l0_tables), Ok(mut shadow_tables)) = (
            NewTables::alloc(self.geometry, need_l0),
            NewTables::alloc(self.geometry, need_shadow),
        ) else {
            return Fault::Done(L2Result::Ret(H_NO_MEM));
        };

        let mut guard = lock(&self.mmu);
        let m = &mut *guard;
        if self.seq.retry(seq) && !self.skip_retry() {
            bump(&self.counters.fault_retries);
            return Fault::Retry;
        }
        // L0's leaf for L1: instantiate, or set R (and W/C on a store) in it.
        let l0 = match m.l0.lookup(base) {
            Some(l) => {
                let set = RadixPte::R
                    | if store {
                        RadixPte::EAA_RW | RadixPte::C
                    } else {
                        0
                    };
                let pte = m.l0.update(l.n_gpa, 0, set).unwrap_or(l.pte);
                ShadowPte { pte, ..l }
            }
            None => {
                let leaf = ShadowPte {
                    n_gpa: base,
                    size,
                    pte: l0_leaf_for_l1(host_hpa, store),
                };
                match m.l0.insert_with(leaf, &mut l0_tables) {
                    Ok(ShadowInstalled::New(displaced)) => {
                        displaced.for_each(|d| {
                            self.unmap_l0_leaf(m, slot, d);
                        });
                    }
                    Ok(_) => {}
                    Err(ShadowInsertError::NeedTable) => return Fault::Again,
                    Err(_) => return Fault::Done(L2Result::Livelock),
                }
                leaf
            }
        };
        let Ok(s) = shadow_leaf(
            L0Leaf {
                pte: l0.pte,
                size: l0.size,
            },
            &t,
            n,
            access,
            self.cfg.page,
            lpid,
        ) else {
            return Fault::Done(
                Exit::reflect(crate::radix::FaultCause::NoTranslation, access, n).into(),
            );
        };
        // The shadow leaf's tables must be at hand before the rmap entry goes in.
        let Some(st) = m.l2.get(&id) else {
            return Fault::Done(L2Result::Livelock);
        };
        match st.shadow.tables_needed(s.n_gpa, s.size) {
            Ok(need) if shadow_tables.covers(need) => {}
            Ok(_) => return Fault::Again,
            Err(_) => return Fault::Done(L2Result::Livelock),
        }
        let l0_hpa = l0.pte.rpn() & !(l0.size.bytes() - 1);
        let Some(word_idx) = self.word_index(slot, s.rmap_base.0) else {
            return Fault::Done(L2Result::Livelock);
        };
        let Mmu {
            guests, l2, rmaps, ..
        } = &mut *m;
        let (guests, l2) = (&*guests, &*l2);
        let Some(word) = rmaps.get(&slot.id()).and_then(|w| w.get(word_idx)) else {
            // The slot's words are not there: it is being created (retry), or memory
            // for them was short when it was.
            return Fault::Done(L2Result::Ret(H_NO_MEM));
        };
        let mut g = word.lock();
        let before = g.len(&self.pool);
        let reclaim_live = self.reclaim_live();
        let res = g.insert(&mut cache, s.rmap_entry, &self.limits, |e| {
            !reclaim_live && entry_live(guests, l2, e, l0_hpa, l0.size).is_some()
        });
        let after = g.len(&self.pool);
        drop(g);
        m.account(before, after);
        match res {
            Ok(o) => m.rmap_reclaimed += o.reclaimed as u64,
            Err(_) => {
                // Refused at the bound: serve the access without a shadow leaf.
                bump(&self.counters.rmap_refused);
                let mask = s.size.bytes() - 1;
                return Fault::Done(self.complete((s.pte.rpn() & !mask) | (n.raw() & mask)));
            }
        }
        let Some(st) = m.l2.get_mut(&id) else {
            return Fault::Done(L2Result::Livelock);
        };
        match st.shadow.insert_with(
            ShadowPte {
                n_gpa: s.n_gpa,
                size: s.size,
                pte: s.pte,
            },
            &mut shadow_tables,
        ) {
            Ok(ShadowInstalled::New(displaced)) if !displaced.is_empty() => {
                m.shadow_flushes += 1;
            }
            Ok(ShadowInstalled::Replaced(_)) => m.shadow_flushes += 1,
            Ok(_) => {}
            Err(_) => return Fault::Done(L2Result::Livelock),
        }
        Fault::Resume
    }

    /// The size of L0's leaf for L1 address `gpa` (`kvmppc_book3s_instantiate_page`):
    /// 2 MiB when the host page is at least that, the slot is aligned for it and is not
    /// dirty logging, and the whole leaf is in the slot; else PAGE_SIZE.
    fn l0_leaf_size(&self, slot: &Memslot, gpa: u64) -> PageSize {
        let pmd = 1u64 << PMD_SHIFT;
        let base = gpa & !(pmd - 1);
        if slot.backing_page_shift() >= PMD_SHIFT
            && self.cfg.page.shift() < PMD_SHIFT
            && !slot.flags().contains(MemslotFlags::LOG_DIRTY_PAGES)
            && slot.is_aligned_for(PMD_SHIFT)
            && slot.contains_range(Gfn(base >> PAGE_SHIFT), pmd >> PAGE_SHIFT)
        {
            PageSize::P2M
        } else {
            self.cfg.page
        }
    }

    /// Index of the rmap word of L1 address `gpa` in its slot's array.
    fn word_index(&self, slot: &Memslot, gpa: u64) -> Option<usize> {
        let off = slot.index_of(Gfn(gpa >> PAGE_SHIFT))? as u64;
        usize::try_from(off / self.page_frames()).ok()
    }

    /// `kvmppc_unmap_pte` with L1's LPID: L0's leaf for L1 goes (C moves to the dirty
    /// bitmap) and, for each PAGE_SIZE page of it, the nested rmap list is detached and
    /// every shadow leaf it still derives removed (`kvmhv_remove_nest_rmap_range`).
    /// Returns the translations removed (the L0 leaf and the shadow leaves).
    fn unmap_l0_leaf(&self, m: &mut Mmu, slot: &Memslot, leaf: ShadowPte) -> u64 {
        let gpa = leaf.n_gpa.raw();
        let frames = leaf.size.bytes() >> PAGE_SHIFT;
        if m.l0.lookup(leaf.n_gpa).map(|l| l.n_gpa) == Some(leaf.n_gpa) {
            m.l0.remove(leaf.n_gpa);
        }
        if leaf.pte.changed() {
            slot.mark_dirty(Gfn(gpa >> PAGE_SHIFT), frames);
        }
        let hpa = leaf.pte.rpn() & !(leaf.size.bytes() - 1);
        let mut removed = 1;
        let pages = (leaf.size.bytes() / self.cfg.page.bytes()).max(1);
        for p in 0..pages {
            let Some(i) = self.word_index(slot, gpa + p * self.cfg.page.bytes()) else {
                continue;
            };
            let Some(word) = m.rmaps.get(&slot.id()).and_then(|w| w.get(i)) else {
                continue;
            };
            // The detached list is walked in place (no copy: a host unmap cannot fail).
            let list = word.detach_all(&self.pool);
            let mut n = 0;
            for e in list.iter() {
                n += 1;
                match entry_live(&m.guests, &m.l2, e, hpa, leaf.size) {
                    Some((id, sl)) => {
                        if let Some(st) = m.l2.get_mut(&id) {
                            st.shadow.remove(sl.n_gpa);
                        }
                        m.rmap_invalidations += 1;
                        m.shadow_flushes += 1;
                        removed += 1;
                    }
                    None => m.rmap_stale_skipped += 1,
                }
            }
            drop(list);
            m.account(n, 0);
        }
        removed
    }

    /// Calls `f` on every L0 leaf for L1 overlapping L1 addresses `[start, end)`, in
    /// address order, allocating nothing (host callbacks cannot fail). `f` may remove or
    /// change the leaf it is given: the walk resumes after that leaf's range.
    fn for_each_l0_leaf(
        &self,
        m: &mut Mmu,
        start: u64,
        end: u64,
        mut f: impl FnMut(&mut Mmu, ShadowPte),
    ) {
        let mut a = start;
        while let Some(l) = m.l0.first_leaf_in(a, end) {
            a = l.n_gpa.raw() + l.size.bytes();
            f(m, l);
        }
    }

    /// Clears `bit` (R or C) in L0's leaf and in every live shadow leaf derived from it,
    /// flushing each with its **shadow** LPID; returns whether L0's leaf had it. A C bit
    /// is recorded in the dirty bitmap for the whole leaf.
    fn harvest(&self, m: &mut Mmu, slot: &Memslot, leaf: ShadowPte, bit: u64) -> bool {
        if leaf.pte.bits() & bit == 0 {
            return false;
        }
        m.l0.update(leaf.n_gpa, bit, 0);
        let gpa = leaf.n_gpa.raw();
        if bit == RadixPte::C {
            slot.mark_dirty(Gfn(gpa >> PAGE_SHIFT), leaf.size.bytes() >> PAGE_SHIFT);
        }
        let hpa = leaf.pte.rpn() & !(leaf.size.bytes() - 1);
        let pages = (leaf.size.bytes() / self.cfg.page.bytes()).max(1);
        let Mmu {
            guests,
            l2,
            rmaps,
            shadow_flushes,
            ..
        } = m;
        for p in 0..pages {
            let Some(i) = self.word_index(slot, gpa + p * self.cfg.page.bytes()) else {
                continue;
            };
            let Some(word) = rmaps.get(&slot.id()).and_then(|w| w.get(i)) else {
                continue;
            };
            // Each live shadow leaf is updated as its entry is visited (no list of
            // them: a host callback cannot fail).
            let g = word.lock();
            g.update_all(&self.pool, |e| {
                if let Some((id, sl)) = entry_live(guests, l2, e, hpa, leaf.size) {
                    if let Some(st) = l2.get_mut(&id) {
                        st.shadow.update(sl.n_gpa, bit, 0);
                        *shadow_flushes += 1;
                    }
                }
            });
        }
        true
    }

    // ------------------------------------------------------------------------------
    // H_TLB_INVALIDATE and L2 lifetime.
    // ------------------------------------------------------------------------------

    /// H_TLB_INVALIDATE (`kvmhv_emulate_priv_tlbie`): an IS = 0 page invalidation, an
    /// IS = 2 LPID flush (RIC 0, 1 or 2) or IS = 3 for every L2; returns the PAPR code.
    /// Shadow leaves go; nested rmap entries stay (stale).
    pub fn h_tlb_invalidate(&self, instr: u64, rs: u64, rb: u64) -> i64 {
        let t = match TlbInvalidate::decode(instr, rs, rb) {
            Ok(t) => t,
            Err(e) => return e.papr(),
        };
        match t {
            TlbInvalidate::Page { lpid, .. } => {
                let Ok(Some((id, tlb))) = self.get_l2(u64::from(lpid), false) else {
                    return H_SUCCESS;
                };
                if let Some((start, size)) = t.page_range() {
                    let _t = lock(tlb);
                    let mut m = lock(&self.mmu);
                    let page = self.cfg.page.bytes();
                    let flushes = if let Some(st) = m.l2.get_mut(&id) {
                        // Step by the shadow leaf found (or PAGE_SIZE) until the AP
                        // size is covered, at least once.
                        let end = start.raw() + size.bytes();
                        let mut a = start.raw();
                        let mut f = 0;
                        loop {
                            a += match NGpa::new(a).and_then(|x| st.shadow.remove(x)) {
                                Some(l) => {
                                    f += 1;
                                    l.size.bytes()
                                }
                                None => page,
                            };
                            if a >= end {
                                break;
                            }
                        }
                        f
                    } else {
                        0
                    };
                    m.shadow_flushes += flushes;
                }
                self.put_l2(id);
            }
            TlbInvalidate::Lpid { lpid, ric } => {
                if let Ok(Some((id, tlb))) = self.get_l2(u64::from(lpid), false) {
                    self.flush_lpid(id, tlb, ric);
                    self.put_l2(id);
                }
            }
            TlbInvalidate::All { ric } => {
                // Every L2 in l1_lpid order, found one at a time under mmu_lock (no list
                // of them: the flush cannot fail).
                let mut from = 0u16;
                loop {
                    let next = lock(&self.mmu).guests.next_in_idr(from);
                    let Some(lpid) = next else {
                        break;
                    };
                    // A reference across the mmu_lock drop (the 2026 use-after-free fix).
                    if let Ok(Some((id, tlb))) = self.get_l2(u64::from(lpid.0), false) {
                        self.flush_lpid(id, tlb, ric);
                        self.put_l2(id);
                    }
                    let Some(f) = lpid.0.checked_add(1) else {
                        break;
                    };
                    from = f;
                }
            }
        }
        H_SUCCESS
    }

    /// An LPID flush of one L2 (rows 8 and 9): RIC 0 frees the shadow table; RIC 2 also
    /// re-reads the PATE and removes the L2 if it is now empty.
    fn flush_lpid(&self, id: GuestId, tlb: &Mutex<()>, ric: Ric) {
        if ric == Ric::Pwc {
            return;
        }
        let _t = lock(tlb);
        let ptcr = self.ptcr();
        let mem = read(&self.l1_mem);
        let mut m = lock(&self.mmu);
        if let Some(st) = m.l2.get_mut(&id) {
            st.shadow.clear();
        }
        m.shadow_flushes += 1;
        if ric == Ric::All {
            let Ok(pate) = m.guests.update_ptbl_cache(id, &*mem, ptcr) else {
                return;
            };
            if pate.is_empty() {
                if let Ok(Some(_)) = m.guests.remove(id) {
                    m.l2.remove(&id);
                }
            }
        }
    }

    /// L1 destroys L2 `l1_lpid` (what its PATE clear plus RIC = 2 flush amounts to): the
    /// L2 leaves the registry and, once unreferenced, its shadow table is freed.
    /// Returns false if there was no such L2.
    pub fn destroy_l2(&self, l1_lpid: u16) -> bool {
        let mut m = lock(&self.mmu);
        let Some(id) = m.guests.lookup(Lpid(l1_lpid)) else {
            return false;
        };
        if let Ok(Some(_)) = m.guests.remove(id) {
            m.l2.remove(&id);
            m.shadow_flushes += 1;
        }
        true
    }

    /// `kvmhv_release_all_nested` + `kvmhv_free_memslot_nest_rmap` (VM teardown, or L1
    /// leaving radix): every L2 removed, every nested rmap word emptied, every node
    /// freed, L0's table for L1 dropped.
    pub fn release_all(&self) {
        let mut m = lock(&self.mmu);
        // Each removal takes the guest out of the idr, so the first one left is next.
        loop {
            let first = m.guests.ids().next();
            let Some(id) = first else {
                break;
            };
            match m.guests.remove(id) {
                Ok(Some(_)) => {
                    m.l2.remove(&id);
                }
                Ok(None) => {}
                // Not live: the checker reports the registry; stop rather than spin.
                Err(_) => break,
            }
        }
        for words in m.rmaps.values() {
            for w in words.iter() {
                // A corrupt list is reported by the checker; the word is empty anyway.
                let _ = w.free(&self.pool);
            }
        }
        m.words = 0;
        m.entries = 0;
        m.l0.clear();
    }

    // ------------------------------------------------------------------------------
    // Memslot lifecycle (delete, move, flags) through the host layer.
    // ------------------------------------------------------------------------------

    /// KVM_MR_DELETE of slot `id` (INVALID step, flush of its translations, removal).
    pub fn delete_memslot(&self, id: SlotId) -> Result<(), NestedVmError> {
        Ok(lifecycle::delete_memslot(&self.slots, self, id)?)
    }

    /// KVM_MR_MOVE of slot `id` to `new_base`.
    pub fn move_memslot(&self, id: SlotId, new_base: Gfn) -> Result<(), NestedVmError> {
        Ok(lifecycle::move_memslot(&self.slots, self, id, new_base)?)
    }

    /// KVM_MR_FLAGS_ONLY on slot `id`. Turning dirty logging on or off flushes the slot's
    /// translations first (row 3: PAGE_SIZE leaves while logging).
    pub fn set_memslot_flags(&self, id: SlotId, flags: MemslotFlags) -> Result<(), NestedVmError> {
        let toggles = self
            .slots
            .load()
            .get(id)
            .map(|s| {
                s.flags().contains(MemslotFlags::LOG_DIRTY_PAGES)
                    != flags.contains(MemslotFlags::LOG_DIRTY_PAGES)
            })
            .unwrap_or(false);
        lifecycle::set_memslot_flags(&self.slots, self, id, flags)?;
        if toggles {
            if let Some(s) = self.slots.load().get(id).cloned() {
                self.flush_memslot(&s);
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------------------
    // The invariant checker.
    // ------------------------------------------------------------------------------

    /// Checks the invariants of the nested MMU (coverage, derivation, no amplification,
    /// unmap completeness, stale entries harmless, encoding, the bound, LPIDs and
    /// references, table shape) at a quiescent point. Returns the number of shadow leaves
    /// checked, or every violation found.
    pub fn check(&self) -> Result<u64, Vec<Violation>> {
        let mut bad = Vec::new();
        let mem = read(&self.l1_mem);
        let m = lock(&self.mmu);
        let slots = self.slots.load();
        if let Err(e) = m.guests.check() {
            bad.push(Violation::Guests(e));
        }
        for s in slots.iter() {
            if let Err(e) = s.check() {
                bad.push(Violation::Memslot(e.to_string()));
            }
        }
        if let Err(e) = m.l0.check() {
            bad.push(Violation::TableShape { lpid: 0, detail: e });
        }
        // Nested rmap words: encoding, duplicates, the bound, the accounting.
        let (mut entries, mut words) = (0u64, 0u64);
        for (sid, ws) in &m.rmaps {
            for (i, w) in ws.iter().enumerate() {
                match check_nested_rmap(w, &self.pool) {
                    Ok(n) => {
                        entries += n as u64;
                        words += u64::from(n > 0);
                        if n > self.limits.cap() {
                            bad.push(Violation::OverCap {
                                slot: *sid,
                                word: i,
                                len: n,
                            });
                        }
                    }
                    Err(e) => bad.push(Violation::Rmap {
                        slot: *sid,
                        word: i,
                        detail: e.to_string(),
                    }),
                }
            }
        }
        if (entries, words) != (m.entries, m.words) {
            bad.push(Violation::Accounting {
                counted: (m.entries, m.words),
                found: (entries, words),
            });
        }
        let mut leaves = 0u64;
        for (id, st) in &m.l2 {
            let Some(g) = m.guests.guest(*id) else {
                bad.push(Violation::Guests(format!(
                    "shadow state of released {id:?}"
                )));
                continue;
            };
            let lpid = g.l1_lpid().0;
            if let Err(e) = st.shadow.check() {
                bad.push(Violation::TableShape { lpid, detail: e });
            }
            let root = g.l1_gr_to_hr();
            for l in st.shadow.leaves_vec() {
                leaves += 1;
                let v = |detail: String| Violation::Shadow {
                    lpid,
                    n_gpa: l.n_gpa.raw(),
                    detail,
                };
                // Unmap completeness: the leaf's host page backs an L1 page now ...
                let hpa = l.pte.rpn();
                let Some(l1gpa) = self.hpa_to_l1gpa(hpa) else {
                    bad.push(v(format!("maps freed host frame {hpa:#x}")));
                    continue;
                };
                // ... and L0's current leaf for that L1 page maps it.
                let Some(l0) = NGpa::new(l1gpa).and_then(|a| m.l0.lookup(a)) else {
                    bad.push(v(format!("L0 has no leaf for L1 {l1gpa:#x}")));
                    continue;
                };
                let l0_hpa = l0.pte.rpn() & !(l0.size.bytes() - 1);
                if hpa & !(l0.size.bytes() - 1) != l0_hpa || l0.size < l.size {
                    bad.push(v(format!("not derived from L0's leaf {l0:?}")));
                }
                // No amplification over L0's leaf.
                let extra =
                    l.pte.bits() & (RadixPte::EAA_RWX | RadixPte::R | RadixPte::C) & !l0.pte.bits();
                if extra != 0 {
                    bad.push(v(format!("grants {extra:#x} beyond L0's leaf")));
                }
                // ... nor over L1's leaf, when L1's table still maps the same page.
                if let Ok(t) = walk(&*mem, root, l.n_gpa) {
                    if t.raddr.0 & !(l.size.bytes() - 1) == l1gpa & !(l.size.bytes() - 1) {
                        let l1 = t.pte;
                        let over = (!l1.may_read() && l.pte.may_read() && !l1.may_write())
                            || (!l1.may_write() && l.pte.may_write())
                            || (!l1.may_execute() && l.pte.may_execute())
                            || (!l1.referenced() && l.pte.referenced())
                            || (!l1.changed() && l.pte.changed())
                            || t.size < l.size;
                        if over {
                            bad.push(v(format!("grants more than L1's leaf {l1:?}")));
                        }
                    }
                }
                // Coverage: an entry (l1_lpid, n_gpa) at the rmap word of L0's leaf base.
                let covered = slots
                    .lookup(Gfn(l0.n_gpa.raw() >> PAGE_SHIFT))
                    .and_then(|s| {
                        let i = self.word_index(s, l0.n_gpa.raw())?;
                        let w = m.rmaps.get(&s.id())?.get(i)?;
                        let e = NestedRmapEntry::new(g.l1_lpid(), Gpa(l.n_gpa.raw())).ok()?;
                        let found = w.lock().iter(&self.pool).any(|x| x.same_mapping(e));
                        Some(found)
                    })
                    .unwrap_or(false);
                if !covered {
                    bad.push(v("no nested rmap entry at L0's leaf base".into()));
                }
            }
        }
        if bad.is_empty() {
            Ok(leaves)
        } else {
            Err(bad)
        }
    }
}

/// An invariant found broken by [`NestedVm::check`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// The registry of L2s (idr, refcounts, shadow LPIDs).
    #[error("nested guests: {0}")]
    Guests(String),
    /// A memslot's own invariants.
    #[error("memslot: {0}")]
    Memslot(String),
    /// A shadow table (or L0's table for L1, lpid 0) is malformed.
    #[error("table of lpid {lpid}: {detail}")]
    TableShape {
        /// The L2's l1_lpid (0: L0's table for L1).
        lpid: u16,
        /// What is wrong.
        detail: String,
    },
    /// A shadow leaf breaks coverage, derivation, no-amplification or unmap
    /// completeness.
    #[error("shadow leaf of lpid {lpid} at {n_gpa:#x}: {detail}")]
    Shadow {
        /// The L2's l1_lpid.
        lpid: u16,
        /// The leaf's L2 base.
        n_gpa: u64,
        /// What is wrong.
        detail: String,
    },
    /// A nested rmap word is malformed.
    #[error("nested rmap word {word} of {slot:?}: {detail}")]
    Rmap {
        /// The slot.
        slot: SlotId,
        /// Word index.
        word: usize,
        /// What is wrong.
        detail: String,
    },
    /// A nested rmap word holds more entries than the bound.
    #[error("nested rmap word {word} of {slot:?} holds {len} entries")]
    OverCap {
        /// The slot.
        slot: SlotId,
        /// Word index.
        word: usize,
        /// Entries.
        len: usize,
    },
    /// The running entry/word counts differ from the words.
    #[error("rmap accounting {counted:?} differs from the words {found:?}")]
    Accounting {
        /// (entries, non-empty words) counted.
        counted: (u64, u64),
        /// (entries, non-empty words) found.
        found: (u64, u64),
    },
}

impl NestedVm {
    /// `unmap_hva_range` inside an invalidation: translations go, then the host pages.
    fn unmap_hva_range_locked(&self, start: Hva, end: Hva) -> u64 {
        let slots = self.slots.load();
        let mut n = 0;
        for s in slots.iter() {
            let shift = s.backing_page_shift();
            let mask = (1u64 << shift) - 1;
            // The host takes whole host pages.
            let (a, b) = (Hva(start.0 & !mask), Hva((end.0 + mask) & !mask));
            let Some((lo, hi)) = s.hva_range_to_gfns(a, b) else {
                continue;
            };
            // Translations go first, then the host frees the pages.
            n += self.unmap_gfn_range(s.id(), lo, hi);
            let mut g = lo.0;
            while g < hi.0 {
                s.set_host_present(Gfn(g), false);
                g += 1 << (shift - PAGE_SHIFT);
            }
        }
        n
    }
}

impl MemslotArch for NestedVm {
    fn kick_readers(&self) {}

    /// `kvmppc_radix_flush_memslot`: every L0 leaf of the slot goes with the shadow
    /// leaves derived from it; the sequence moves so in-flight faults retry.
    fn flush_memslot(&self, slot: &Memslot) {
        self.seq.begin();
        {
            let mut m = lock(&self.mmu);
            let start = slot.base_gfn().0 << PAGE_SHIFT;
            let end = slot.end_gfn().0 << PAGE_SHIFT;
            self.for_each_l0_leaf(&mut m, start, end, |m, l| {
                self.unmap_l0_leaf(m, slot, l);
            });
        }
        self.seq.end();
    }

    fn commit_memory_region(&self, change: MemslotChange<'_>) {
        let mut m = lock(&self.mmu);
        match change {
            MemslotChange::Create(s) => {
                // NestedVm::new put the words in before publishing the slot. A slot made
                // through the lifecycle directly gets them here; if memory is short it
                // has none and its faults return H_NO_MEM.
                if !m.rmaps.contains_key(&s.id()) && m.rmaps.try_reserve(1).is_ok() {
                    if let Ok(words) = self.rmap_words(s) {
                        m.rmaps.insert(s.id(), words);
                    }
                }
            }
            MemslotChange::Delete(s) => {
                if let Some(words) = m.rmaps.remove(&s.id()) {
                    for w in words.iter() {
                        let n = w.free(&self.pool).unwrap_or(0);
                        m.account(n, 0);
                    }
                }
            }
            MemslotChange::Move(_) => {}
        }
    }
}

impl HostMmu for NestedVm {
    type Error = NestedVmError;

    fn memslot_views(&self) -> Vec<SlotView> {
        SlotView::all_usable(&self.slots.load())
    }

    fn invalidate_range_start(&self, start: Hva, end: Hva) {
        self.seq.begin();
        let slots = self.slots.load();
        for s in slots.iter() {
            if let Some((lo, hi)) = s.hva_range_to_gfns(start, end) {
                self.unmap_gfn_range(s.id(), lo, hi);
            }
        }
    }

    fn invalidate_range_end(&self, _start: Hva, _end: Hva) {
        self.seq.end();
    }

    /// Brackets itself with the invalidation sequence (as the HPT VM does), so a nested
    /// fault that looked the page up before the reclaim retries instead of installing
    /// the freed frame, whether or not the caller is inside `invalidate_range_start`.
    fn unmap_hva_range(&self, start: Hva, end: Hva) -> u64 {
        self.seq.begin();
        let n = self.unmap_hva_range_locked(start, end);
        self.seq.end();
        n
    }

    fn host_page_in(&self, start: Hva, end: Hva) {
        let slots = self.slots.load();
        for s in slots.iter() {
            let Some((lo, hi)) = s.hva_range_to_gfns(start, end) else {
                continue;
            };
            let step = 1u64 << (s.backing_page_shift() - PAGE_SHIFT);
            let mut g = lo.0 & !(step - 1);
            while g < hi.0 {
                s.set_host_present(Gfn(g.max(s.base_gfn().0)), true);
                g += step;
            }
        }
    }

    fn unmap_gfn_range(&self, slot: SlotId, start: Gfn, end: Gfn) -> u64 {
        let slots = self.slots.load();
        let Some(s) = slots.get(slot) else {
            return 0;
        };
        let mut m = lock(&self.mmu);
        let mut n = 0;
        self.for_each_l0_leaf(
            &mut m,
            start.0 << PAGE_SHIFT,
            end.0 << PAGE_SHIFT,
            |m, l| {
                n += self.unmap_l0_leaf(m, s, l);
            },
        );
        n
    }

    fn age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool {
        let slots = self.slots.load();
        let Some(s) = slots.get(slot) else {
            return false;
        };
        let mut m = lock(&self.mmu);
        let mut young = false;
        self.for_each_l0_leaf(
            &mut m,
            start.0 << PAGE_SHIFT,
            end.0 << PAGE_SHIFT,
            |m, l| {
                young |= self.harvest(m, s, l, RadixPte::R);
            },
        );
        young
    }

    fn test_age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool {
        let m = lock(&self.mmu);
        if self.slots.load().get(slot).is_none() {
            return false;
        }
        let (mut a, end) = (start.0 << PAGE_SHIFT, end.0 << PAGE_SHIFT);
        while let Some(l) = m.l0.first_leaf_in(a, end) {
            if l.pte.referenced() {
                return true;
            }
            a = l.n_gpa.raw() + l.size.bytes();
        }
        false
    }

    fn get_dirty_log(&self, slot: SlotId) -> Result<Vec<u64>, NestedVmError> {
        let slots = self.slots.load();
        let s = slots
            .get(slot)
            .filter(|s| !s.is_invalid())
            .ok_or(MemslotError::NoSuchSlot { id: slot })?;
        // The bitmap's memory before any C bit moves into it.
        let view = SlotView::of(s);
        let words = view.bitmap_words() as usize;
        let mut out = Vec::new();
        out.try_reserve_exact(words)
            .map_err(|_| no_mem::<u64>(words))?;
        {
            let mut m = lock(&self.mmu);
            let start = s.base_gfn().0 << PAGE_SHIFT;
            let end = s.end_gfn().0 << PAGE_SHIFT;
            self.for_each_l0_leaf(&mut m, start, end, |m, l| {
                self.harvest(m, s, l, RadixPte::C);
            });
        }
        out.extend((0..words).map(|i| {
            if view.manual_protect {
                s.dirty_word(i)
            } else {
                s.take_dirty_word(i)
            }
        }));
        Ok(out)
    }

    fn clear_dirty_log(
        &self,
        slot: SlotId,
        first_page: u64,
        bits: &[u64],
    ) -> Result<(), NestedVmError> {
        let slots = self.slots.load();
        let s = slots
            .get(slot)
            .ok_or(MemslotError::NoSuchSlot { id: slot })?;
        if first_page % 64 != 0 {
            return Err(NestedVmError::Config("first_page must be a multiple of 64"));
        }
        for (k, &b) in bits.iter().enumerate() {
            s.clear_dirty_bits((first_page / 64) as usize + k, b);
        }
        Ok(())
    }
}
