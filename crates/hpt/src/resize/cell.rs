//! How a [`Vm`](crate::Vm) holds its hashed page table so that a resize commit can pivot
//! to a new one: the table generations and the "vCPUs in guest" gate (KVM's
//! `mmu_ready` plus the IPI that makes running vCPUs exit).
//!
//! # Design
//!
//! * **Generations.** The boot table is generation 0, stored inline; each successful
//!   commit installs the next generation in a write-once slot (`OnceLock`). The current
//!   generation is an index in the gate word. Readers get a plain `&Hpt` with the
//!   lifetime of `&Vm`: a retired table is never freed while the `Vm` is shared, only
//!   by [`TableCell::reclaim_retired`] (`&mut`) or when the `Vm` is dropped. So there is
//!   no `unsafe`, no reference count and no read-side read-modify-write: looking up the
//!   table is one load of the gate word plus a predictable branch. At most
//!   [`MAX_GENERATIONS`] commits may happen between two reclaims; a commit beyond that
//!   fails with H_NO_MEM and leaves the old table active.
//! * **The gate** (`mmu_ready`). Each hypercall runs inside a per-vCPU gate word
//!   (cache-padded, written only by that vCPU's thread): entry stores "in", issues a
//!   `SeqCst` fence, then loads the state word (`Acquire`); exit stores "out"
//!   (`Release`). A commit closes the gate with an RMW, issues a `SeqCst` fence and then
//!   waits (`Acquire` loads) until every vCPU word reads "out", every host accessor has
//!   left and every vCPU MMU access epoch is idle. This is the store-buffering (Dekker)
//!   pattern: the two fences are ordered in the single total order of `SeqCst`
//!   operations, so either the committer sees the vCPU's "in" (and waits for its "out")
//!   or the vCPU sees "closed" (and backs off before touching the table). Fences rather
//!   than `SeqCst` accesses, because loom models `SeqCst` fences but treats `SeqCst`
//!   loads and stores as acquire/release: `tests/loom_gate.rs` checks this handshake
//!   and shows that dropping the vCPU's fence lets a commit run under a vCPU. The vCPU
//!   side costs one fence per hypercall and no shared cache line; the replay benchmark
//!   measures it (see the resize report in DESIGN.md).
//! * **Host walkers** (MMU notifiers, dirty scans, the checker) enter through
//!   [`TableCell::host_enter`], a shared counter with the same handshake; a commit
//!   drains them too, so a walker runs entirely on the old table or entirely on the new
//!   one (KVM's "Fix exclusion between HPT resizing and other HPT updates").
//!
//! # Invariants
//!
//! * While the gate is closed no vCPU hypercall, vCPU MMU access or host accessor is
//!   inside the gate, except the committer itself (which runs outside it).
//! * The generation index only grows between reclaims; every generation `<= current`
//!   is initialised.
//! * vCPU ids are checked [`VcpuId`]s (below [`MAX_VCPUS`]), one gate word each; two
//!   threads must not issue hypercalls with the same vCPU id at the same time, as for
//!   real vCPUs.

use crate::table::Hpt;
use crate::tlb::{TlbDomain, MAX_VCPUS};
use alloc::boxed::Box;
use revmap_rmap::error::try_boxed_slice;
use revmap_rmap::sync::{fence, spin_loop, AtomicU64, Ordering};
use revmap_rmap::VcpuId;

#[cfg(feature = "std")]
use revmap_rmap::sync::{yield_now, OnceLock};

/// Table generations a `Vm` can install between two [`TableCell::reclaim_retired`].
pub const MAX_GENERATIONS: usize = 64;

/// State word bit 0: the gate is closed (`mmu_ready == 0`).
const CLOSED: u64 = 1;
/// State word bits 1..=7: the table generation index (0..=[`MAX_GENERATIONS`]).
const GEN_SHIFT: u32 = 1;
/// Mask of the generation field once shifted down.
const GEN_MASK: u64 = 0x7f;
/// State word bits 8..=63: the kick count, bumped by every memslot publication so that
/// vCPU run handles re-pin their memslot snapshot.
const KICK_SHIFT: u32 = 8;
/// The kick field in place.
const KICK_MASK: u64 = !((1 << KICK_SHIFT) - 1);
/// A pinned-state value no state word ever holds (a run handle outside the gate): the
/// kick field would have to wrap 2^56 times.
pub(crate) const OUT_OF_GATE: u64 = u64::MAX;

const _: () = {
    assert!(MAX_GENERATIONS as u64 <= GEN_MASK);
    assert!((GEN_MASK << GEN_SHIFT) & KICK_MASK == 0);
    assert!((GEN_MASK << GEN_SHIFT) & CLOSED == 0);
};

/// One step of a gate wait: spin briefly, then yield the CPU (std builds) so that on an
/// oversubscribed host the thread being waited for gets to run. Under loom and shuttle
/// `spin_loop` already yields to the model's scheduler.
#[inline]
fn backoff(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    #[cfg(feature = "std")]
    if *spins > 64 {
        yield_now();
        return;
    }
    spin_loop();
}

#[derive(Debug)]
#[repr(align(128))]
struct VcpuGate(AtomicU64);

/// The VM's table(s) and the gate (module docs).
#[derive(Debug)]
pub struct TableCell {
    first: Hpt,
    #[cfg(feature = "std")]
    later: Box<[OnceLock<Hpt>]>,
    /// `generation << 1 | CLOSED`.
    state: AtomicU64,
    vcpus: Box<[VcpuGate]>,
    host: VcpuGate,
}

/// A vCPU inside the gate; leaves it on drop.
#[must_use = "dropping the guard leaves the gate"]
#[derive(Debug)]
pub struct VcpuInGuest<'a> {
    gate: &'a AtomicU64,
    hpt: &'a Hpt,
}

impl<'a> VcpuInGuest<'a> {
    /// The table this vCPU runs on (current until the guard drops).
    #[inline(always)]
    pub fn hpt(&self) -> &'a Hpt {
        self.hpt
    }
}

impl Drop for VcpuInGuest<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        // ORDERING: Release: everything this hypercall did to the table happens-before
        // the committer's Acquire load that sees "out".
        self.gate.store(0, Ordering::Release);
    }
}

/// A host-side accessor inside the gate (a walker that must not straddle a pivot).
#[must_use = "dropping the guard leaves the gate"]
#[derive(Debug)]
pub struct HostAccess<'a> {
    cell: &'a TableCell,
    hpt: &'a Hpt,
}

impl HostAccess<'_> {
    /// The current table, stable until the guard drops.
    #[inline]
    pub fn hpt(&self) -> &Hpt {
        self.hpt
    }
}

impl Drop for HostAccess<'_> {
    fn drop(&mut self) {
        // ORDERING: Release, as for a vCPU leaving the gate.
        self.cell.host.0.fetch_sub(1, Ordering::Release);
    }
}

impl TableCell {
    /// A cell holding `first` as generation 0, gate open.
    pub fn new(first: Hpt) -> Result<Self, crate::HptError> {
        Ok(Self {
            first,
            #[cfg(feature = "std")]
            later: try_boxed_slice(MAX_GENERATIONS, |_| OnceLock::new())?,
            state: AtomicU64::new(0),
            vcpus: try_boxed_slice(MAX_VCPUS, |_| VcpuGate(AtomicU64::new(0)))?,
            host: VcpuGate(AtomicU64::new(0)),
        })
    }

    /// The table of generation field of `state`.
    #[inline(always)]
    pub(crate) fn table_of(&self, state: u64) -> &Hpt {
        let gen = ((state >> GEN_SHIFT) & GEN_MASK) as usize;
        if gen == 0 {
            return &self.first;
        }
        #[cfg(feature = "std")]
        if let Some(t) = self.later.get(gen - 1).and_then(OnceLock::get) {
            return t;
        }
        // Unreachable by construction (every generation <= current is initialised).
        &self.first
    }

    /// The current table, without entering the gate. The reference stays valid for
    /// the life of `&self`, but after a concurrent commit it is a retired table: use it
    /// only at quiescent points (checkers, single-threaded tests).
    #[inline(always)]
    pub fn current(&self) -> &Hpt {
        // ORDERING: Acquire pairs with the Release/SeqCst store that installed the
        // generation, so the new table's contents are visible.
        self.table_of(self.state.load(Ordering::Acquire))
    }

    /// The current generation (0 = boot table).
    pub fn generation(&self) -> u64 {
        // ORDERING: Acquire, as `current`.
        (self.state.load(Ordering::Acquire) >> GEN_SHIFT) & GEN_MASK
    }

    /// Kick vCPU run handles (`kvm_make_all_cpus_request`): every run handle sees a
    /// changed state word at its next hypercall and re-pins (leaves and re-enters the
    /// gate, reloading table and memslot snapshot). Used after a memslot publication.
    pub fn kick(&self) {
        // ORDERING: SeqCst RMW: ordered after the caller's publication (the memslot
        // pointer swap), so a run handle that reads the new kick count in its Acquire
        // re-entry then loads the new snapshot.
        self.state.fetch_add(1 << KICK_SHIFT, Ordering::SeqCst);
    }

    /// The gate word of vCPU `vcpu`.
    #[inline(always)]
    pub(crate) fn vcpu_gate(&self, vcpu: VcpuId) -> &AtomicU64 {
        match self.vcpus.get(vcpu.index()) {
            Some(g) => &g.0,
            None => &self.host.0, // unreachable: MAX_VCPUS slots
        }
    }

    /// The pinned-state check of a run handle: one `Relaxed` load of the state word.
    /// A run handle's gate word stays "in" while pinned, so a committer waits for it
    /// whatever this load returns; a stale value only delays the re-pin (coherence
    /// makes the change visible eventually), it never lets a pivot happen under it.
    #[inline(always)]
    pub(crate) fn state_relaxed(&self) -> u64 {
        // ORDERING: Relaxed: see the doc comment; re-pinning re-enters the gate.
        self.state.load(Ordering::Relaxed)
    }

    /// Enter the gate through `gate` (waits while a commit has it closed); returns the
    /// state word seen, whose generation is the table to use until leaving.
    #[inline(always)]
    pub(crate) fn enter_gate(&self, gate: &AtomicU64) -> u64 {
        self.enter_gate_with::<true>(gate)
    }

    /// [`enter_gate`](Self::enter_gate); `FENCED = false` drops the handshake's fence
    /// (only for the loom model that shows the fence is needed).
    #[inline(always)]
    fn enter_gate_with<const FENCED: bool>(&self, gate: &AtomicU64) -> u64 {
        loop {
            // ORDERING: Relaxed store, SeqCst fence, then the load: the vCPU half of
            // the store-buffering handshake with `close_and_drain` (module docs). The
            // fence orders the "in" store before the state load against the
            // committer's fence.
            gate.store(1, Ordering::Relaxed);
            if FENCED {
                fence(Ordering::SeqCst);
            }
            // ORDERING: Acquire: an open state word with generation N acquires the
            // pivot's RMW that published table N.
            let s = self.state.load(Ordering::Acquire);
            if s & CLOSED == 0 {
                return s;
            }
            self.back_off(gate);
        }
    }

    /// Leave the gate through `gate`.
    #[inline(always)]
    pub(crate) fn leave_gate(gate: &AtomicU64) {
        // ORDERING: Release: everything done inside happens-before the committer's
        // Acquire load that sees "out".
        gate.store(0, Ordering::Release);
    }

    /// `mmu_ready`: the gate is open.
    #[inline]
    pub fn mmu_ready(&self) -> bool {
        // ORDERING: SeqCst: the MMU model's half of the handshake (module docs); the
        // MMU model reads it after `TlbDomain::begin_access`, whose SeqCst fence
        // orders its epoch store before this load.
        self.state.load(Ordering::SeqCst) & CLOSED == 0
    }

    /// Enter the gate as vCPU `vcpu` (waits while a commit has it closed).
    #[inline(always)]
    pub fn enter_vcpu(&self, vcpu: VcpuId) -> VcpuInGuest<'_> {
        self.enter_vcpu_with::<true>(vcpu)
    }

    /// Not part of the API: [`enter_vcpu`](Self::enter_vcpu) with the handshake's
    /// fence dropped when `FENCED` is false, so that the loom model can show the fence
    /// is needed. Production code calls only `enter_vcpu`.
    #[doc(hidden)]
    #[inline(always)]
    pub fn enter_vcpu_with<const FENCED: bool>(&self, vcpu: VcpuId) -> VcpuInGuest<'_> {
        let gate = self.vcpu_gate(vcpu);
        let s = self.enter_gate_with::<FENCED>(gate);
        VcpuInGuest {
            gate,
            hpt: self.table_of(s),
        }
    }

    #[cold]
    #[inline(never)]
    fn back_off(&self, gate: &AtomicU64) {
        // ORDERING: Release: nothing was done inside; the committer may proceed.
        gate.store(0, Ordering::Release);
        self.wait_open();
    }

    /// Wait until the gate is open.
    pub fn wait_open(&self) {
        // ORDERING: Acquire: seeing "open" acquires the pivot's table installation.
        let mut spins = 0;
        while self.state.load(Ordering::Acquire) & CLOSED != 0 {
            backoff(&mut spins);
        }
    }

    /// Enter the gate as a host-side accessor (waits while a commit has it closed).
    pub fn host_enter(&self) -> HostAccess<'_> {
        loop {
            // ORDERING: Relaxed RMW, SeqCst fence, Acquire load: the store-buffering
            // handshake with `close_and_drain`, as a vCPU's (`enter_gate`).
            self.host.0.fetch_add(1, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            let s = self.state.load(Ordering::Acquire);
            if s & CLOSED == 0 {
                return HostAccess {
                    cell: self,
                    hpt: self.table_of(s),
                };
            }
            // ORDERING: Release: nothing was done inside.
            self.host.0.fetch_sub(1, Ordering::Release);
            self.wait_open();
        }
    }

    /// Close the gate (`mmu_ready = 0`) and wait until no vCPU hypercall, host
    /// accessor or vCPU MMU access (`tlb`'s epochs) is inside. The caller must be
    /// outside the gate and must be the only committer (it holds `mmu_setup_lock`).
    pub fn close_and_drain(&self, tlb: &TlbDomain) {
        // ORDERING: SeqCst RMW then SeqCst fence: the committer half of the
        // store-buffering handshake (module docs); the fence orders the close before
        // the gate loads against each entering vCPU's fence.
        self.state.fetch_or(CLOSED, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let mut spins = 0;
        for g in self.vcpus.iter() {
            // ORDERING: Acquire: seeing the vCPU's Release "out" makes its table writes
            // happen-before our rehash.
            while g.0.load(Ordering::Acquire) != 0 {
                backoff(&mut spins);
            }
        }
        // ORDERING: Acquire, as above (the accessors' Release decrement).
        while self.host.0.load(Ordering::Acquire) != 0 {
            backoff(&mut spins);
        }
        tlb.wait_all_idle();
    }

    /// Reopen the gate on the same generation (a failed commit).
    pub fn reopen(&self) {
        // ORDERING: SeqCst RMW (a release): waiting vCPUs acquire it in `wait_open`.
        self.state.fetch_and(!CLOSED, Ordering::SeqCst);
    }

    /// Install `new` as the next generation and reopen the gate (the pivot). The gate
    /// must be closed and drained. On failure (generations exhausted, or no std) the
    /// table is handed back and the gate stays closed.
    pub fn pivot(&self, new: Hpt) -> Result<(), Hpt> {
        #[cfg(feature = "std")]
        {
            // ORDERING: Relaxed: we are the only writer of the generation (committer,
            // gate closed); kicks may add concurrently, hence the RMW below.
            let s = self.state.load(Ordering::Relaxed);
            let gen = ((s >> GEN_SHIFT) & GEN_MASK) as usize;
            let Some(slot) = self.later.get(gen) else {
                return Err(new);
            };
            slot.set(new)?;
            let delta = (1u64 << GEN_SHIFT).wrapping_sub(CLOSED);
            // ORDERING: SeqCst RMW: publishes the new generation (and, by the
            // OnceLock's own release, the table) and opens the gate in one step,
            // keeping concurrent kicks (gen + 1 and CLOSED cleared: + 2 - 1).
            self.state.fetch_add(delta, Ordering::SeqCst);
            Ok(())
        }
        #[cfg(not(feature = "std"))]
        Err(new)
    }

    /// Whether a [`pivot`](Self::pivot) would find a free generation slot.
    pub fn can_pivot(&self) -> bool {
        #[cfg(feature = "std")]
        {
            // ORDERING: Relaxed: only the committer changes the generation.
            let gen = ((self.state.load(Ordering::Relaxed) >> GEN_SHIFT) & GEN_MASK) as usize;
            gen < self.later.len()
        }
        #[cfg(not(feature = "std"))]
        false
    }

    /// Free every retired table, moving the current one to generation 0.
    pub fn reclaim_retired(&mut self) {
        #[cfg(feature = "std")]
        {
            // ORDERING: Relaxed: `&mut self`, no other thread can access the cell (a
            // load instead of `get_mut`, which loom's atomics lack).
            let state = self.state.load(Ordering::Relaxed);
            let gen = ((state >> GEN_SHIFT) & GEN_MASK) as usize;
            if gen == 0 {
                return;
            }
            let cur = self.later.get_mut(gen - 1).and_then(OnceLock::take);
            for s in self.later.iter_mut() {
                let _ = s.take();
            }
            if let Some(t) = cur {
                self.first = t;
            }
            // ORDERING: Relaxed: `&mut self`, see above.
            self.state
                .store(state & (CLOSED | KICK_MASK), Ordering::Relaxed);
        }
    }

    /// Retired tables still allocated.
    pub fn retired(&self) -> usize {
        self.generation() as usize
    }
}
