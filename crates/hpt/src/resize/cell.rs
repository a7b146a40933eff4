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
//!   (cache-padded, written only by that vCPU's thread): entry stores "in" (`SeqCst`)
//!   then loads the gate word (`SeqCst`); exit stores "out" (`Release`). A commit
//!   closes the gate with a `SeqCst` RMW and then waits (`SeqCst` loads) until every
//!   vCPU word reads "out", every host accessor has left and every vCPU MMU access
//!   epoch is idle. This is the store-buffering (Dekker) pattern: in the single total
//!   order of `SeqCst` operations either the committer sees the vCPU's "in" (and waits
//!   for its "out") or the vCPU sees "closed" (and backs off before touching the table).
//!   The vCPU side costs one locked store per hypercall and no shared cache line; the
//!   replay benchmark measures it (see the resize report in DESIGN.md).
//! * **Host walkers** (MMU notifiers, dirty scans, the checker) enter through
//!   [`TableCell::host_enter`], a shared counter with the same handshake; a commit
//!   drains them too, so a walker runs entirely on the old table or entirely on the new
//!   one (reference D7).
//!
//! # Invariants
//!
//! * While the gate is closed no vCPU hypercall, vCPU MMU access or host accessor is
//!   inside the gate, except the committer itself (which runs outside it).
//! * The generation index only grows between reclaims; every generation `<= current`
//!   is initialised.
//! * vCPU ids are reduced modulo [`MAX_VCPUS`]; two threads must not issue hypercalls
//!   with the same vCPU id (mod 64) at the same time, as for real vCPUs.

use crate::table::Hpt;
use crate::tlb::{TlbDomain, MAX_VCPUS};
use alloc::boxed::Box;
use revmap_rmap::error::try_boxed_slice;
use revmap_rmap::sync::{spin_loop, AtomicU64, Ordering};

#[cfg(feature = "std")]
use std::sync::OnceLock;

/// Table generations a `Vm` can install between two [`TableCell::reclaim_retired`].
pub const MAX_GENERATIONS: usize = 64;

/// Gate word bit: the gate is closed (`mmu_ready == 0`).
const CLOSED: u64 = 1;
/// Gate word: the generation index lives above bit 0.
const GEN_SHIFT: u32 = 1;

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
        // the committer's SeqCst (hence acquiring) load that sees "out".
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

    #[inline(always)]
    fn table_of(&self, state: u64) -> &Hpt {
        let gen = (state >> GEN_SHIFT) as usize;
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
        self.state.load(Ordering::Acquire) >> GEN_SHIFT
    }

    /// `mmu_ready`: the gate is open.
    #[inline]
    pub fn mmu_ready(&self) -> bool {
        // ORDERING: SeqCst: the MMU model's half of the handshake (module docs).
        self.state.load(Ordering::SeqCst) & CLOSED == 0
    }

    /// Enter the gate as vCPU `vcpu` (waits while a commit has it closed).
    #[inline(always)]
    pub fn enter_vcpu(&self, vcpu: usize) -> VcpuInGuest<'_> {
        let gate = match self.vcpus.get(vcpu % MAX_VCPUS) {
            Some(g) => &g.0,
            None => &self.host.0, // unreachable: MAX_VCPUS slots
        };
        loop {
            // ORDERING: SeqCst store then SeqCst load: the vCPU half of the Dekker
            // handshake with `close_and_drain` (module docs).
            gate.store(1, Ordering::SeqCst);
            let s = self.state.load(Ordering::SeqCst);
            if s & CLOSED == 0 {
                return VcpuInGuest {
                    gate,
                    hpt: self.table_of(s),
                };
            }
            self.back_off(gate);
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
        while self.state.load(Ordering::Acquire) & CLOSED != 0 {
            spin_loop();
        }
    }

    /// Enter the gate as a host-side accessor (waits while a commit has it closed).
    pub fn host_enter(&self) -> HostAccess<'_> {
        loop {
            // ORDERING: SeqCst RMW then SeqCst load (Dekker with `close_and_drain`).
            self.host.0.fetch_add(1, Ordering::SeqCst);
            let s = self.state.load(Ordering::SeqCst);
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
        // ORDERING: SeqCst RMW: the committer half of the handshake.
        self.state.fetch_or(CLOSED, Ordering::SeqCst);
        for g in self.vcpus.iter() {
            // ORDERING: SeqCst (handshake) and acquiring: the vCPU's table writes
            // happen-before our rehash once we see "out".
            while g.0.load(Ordering::SeqCst) != 0 {
                spin_loop();
            }
        }
        // ORDERING: SeqCst, as above.
        while self.host.0.load(Ordering::SeqCst) != 0 {
            spin_loop();
        }
        tlb.wait_all_idle();
    }

    /// Reopen the gate on the same generation (a failed commit).
    pub fn reopen(&self) {
        // ORDERING: SeqCst: pairs with the vCPUs' SeqCst loads.
        self.state.fetch_and(!CLOSED, Ordering::SeqCst);
    }

    /// Install `new` as the next generation and reopen the gate (the pivot). The gate
    /// must be closed and drained. On failure (generations exhausted, or no std) the
    /// table is handed back and the gate stays closed.
    pub fn pivot(&self, new: Hpt) -> Result<(), Hpt> {
        #[cfg(feature = "std")]
        {
            // ORDERING: Relaxed: we are the only writer (committer, gate closed).
            let gen = (self.state.load(Ordering::Relaxed) >> GEN_SHIFT) as usize;
            let Some(slot) = self.later.get(gen) else {
                return Err(new);
            };
            slot.set(new)?;
            // ORDERING: SeqCst: publishes the new generation (and, by the OnceLock's
            // own release, the table) and opens the gate in one store.
            self.state
                .store(((gen as u64) + 1) << GEN_SHIFT, Ordering::SeqCst);
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
            let gen = (self.state.load(Ordering::Relaxed) >> GEN_SHIFT) as usize;
            gen < self.later.len()
        }
        #[cfg(not(feature = "std"))]
        false
    }

    /// Free every retired table, moving the current one to generation 0.
    pub fn reclaim_retired(&mut self) {
        #[cfg(feature = "std")]
        {
            let gen = (*self.state.get_mut() >> GEN_SHIFT) as usize;
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
            *self.state.get_mut() &= CLOSED;
        }
    }

    /// Retired tables still allocated.
    pub fn retired(&self) -> usize {
        self.generation() as usize
    }
}
