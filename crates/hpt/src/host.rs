//! The host side of a VM, part 1: memslot lifecycle (KVM_SET_USER_MEMORY_REGION) with the
//! INVALID step, `mmu_ready`, the per-VM host state, and the VM's implementation of the
//! host layer's [`HostMmu`] trait.
//!
//! # Lifecycle
//!
//! The MMU-independent protocol (writer lock, snapshot publication with SRCU-like grace
//! periods, the INVALID step, overlap checks, dirty-bitmap clearing on flag changes) is
//! `revmap_host::lifecycle`; this module supplies the HPT's hooks:
//!
//! * publication kicks vCPU run handles pinned on the old snapshot;
//! * the flush of an INVALID slot is `kvmppc_core_flush_memslot_hv`: every chained HPTE
//!   unmapped, ABSENT and off-chain, R/C harvested;
//! * after a create or move, every emulated-MMIO HPTE (ABSENT, key 31) whose frame the
//!   slot now backs becomes a paged-out entry (key cleared) and `mmio_update` is bumped
//!   (KVM invalidates MMIO caches), so that key 31 never marks RAM; after a
//!   delete `mmio_update` is bumped.
//!
//! # Invariants
//!
//! * After delete/move returns, no rmap word of the old range has PRESENT set and no
//!   VALID HPTE maps a frame of it (17), checked by `check_invariants` and the tests.
//! * `mmu_ready == false` and no fault in flight once [`Vm::set_mmu_ready`]`(false)`
//!   returns (16): faults register in `faults_in_flight` before checking the flag.

use crate::error::HostError;
use crate::hpte::{HpteR, HpteV};
use crate::vm::Vm;
use alloc::boxed::Box;
use alloc::vec::Vec;
use revmap_host::lifecycle::{self, MemslotArch, MemslotChange};
use revmap_host::{HostMemory, HostMmu, Memslot, MemslotError, MemslotFlags, SlotView};
use revmap_rmap::sync::{spin_loop, AtomicBool, AtomicU64, Ordering};
use revmap_rmap::{Gfn, Hva, Ptex, SlotId};

/// A memslot as userspace describes it (`struct kvm_userspace_memory_region` plus the
/// model's host backing page size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemslotSpec {
    /// Slot id.
    pub id: SlotId,
    /// First guest frame.
    pub base_gfn: Gfn,
    /// Number of 4 KiB frames.
    pub npages: u64,
    /// Host virtual address of the first frame.
    pub userspace_addr: Hva,
    /// Host backing page shift (12, 16, 24, 34).
    pub backing_page_shift: u32,
    /// Flags (never INVALID).
    pub flags: MemslotFlags,
}

impl MemslotSpec {
    fn of(s: &Memslot) -> Self {
        Self {
            id: s.id(),
            base_gfn: s.base_gfn(),
            npages: s.npages(),
            userspace_addr: s.userspace_addr(),
            backing_page_shift: s.backing_page_shift(),
            flags: s.flags().difference(MemslotFlags::INVALID),
        }
    }
}

/// The lifecycle's errors as the VM reports them.
fn host_error(e: MemslotError) -> HostError {
    match e {
        MemslotError::NoSuchSlot { id } => HostError::NoSuchSlot { id },
        MemslotError::BadFlags { flags } => HostError::BadFlags {
            flags: flags.bits(),
        },
        e => HostError::Memslot(e),
    }
}

/// The HPT's memory-region hooks for the generic lifecycle (`revmap_host::lifecycle`).
struct HptArch<'a>(&'a Vm);

impl MemslotArch for HptArch<'_> {
    /// vCPU run handles pinned on the old snapshot are kicked through the gate word
    /// (`resize::cell`) so that they re-pin at their next hypercall, one mechanism for
    /// both stop-the-world kinds.
    fn kick_readers(&self) {
        self.0.tables().kick();
    }

    fn flush_memslot(&self, slot: &Memslot) {
        self.0.flush_memslot(slot);
    }

    /// Create and move turn the emulated-MMIO HPTEs of the new range into paged-out
    /// entries (key 31 never marks RAM); every change invalidates MMIO caches.
    fn commit_memory_region(&self, change: MemslotChange<'_>) {
        match change {
            MemslotChange::Create(s) | MemslotChange::Move(s) => {
                self.0.reclassify_mmio(s.base_gfn(), s.end_gfn())
            }
            MemslotChange::Delete(_) => self.0.bump_mmio_update(),
        }
    }
}

/// Per-VM host state beside the HPT: `mmu_ready` and the count of vCPU faults in
/// flight (so that clearing `mmu_ready` can wait for them).
#[derive(Debug)]
pub(crate) struct HostState {
    mmu_ready: AtomicBool,
    faults_in_flight: AtomicU64,
}

impl HostState {
    pub(crate) fn new() -> Self {
        Self {
            mmu_ready: AtomicBool::new(true),
            faults_in_flight: AtomicU64::new(0),
        }
    }
}

/// A registered fault; dropping it deregisters.
pub(crate) struct FaultTicket<'a>(&'a HostState);

impl Drop for FaultTicket<'_> {
    fn drop(&mut self) {
        // ORDERING: SeqCst, the fault half of the mmu_ready handshake (see
        // `enter_fault`); also releases everything the fault wrote.
        self.0.faults_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Vm {
    /// Set `mmu_ready` (KVM's `kvm->arch.mmu_ready`). Clearing it waits until no fault
    /// that could have seen it set is still running, so afterwards no fault turns an
    /// HPTE VALID until it is set again.
    pub fn set_mmu_ready(&self, ready: bool) {
        // ORDERING: SeqCst store, then (when clearing) SeqCst loads of the in-flight
        // count: a store-buffer handshake with `enter_fault` (increment, then load the
        // flag), so either the fault sees `false` or we see its increment.
        self.host.mmu_ready.store(ready, Ordering::SeqCst);
        if !ready {
            // ORDERING: SeqCst, see above.
            while self.host.faults_in_flight.load(Ordering::SeqCst) != 0 {
                spin_loop();
            }
        }
    }

    /// `mmu_ready`: set by [`set_mmu_ready`](Self::set_mmu_ready) and no resize commit
    /// has the vCPU gate closed.
    #[inline]
    pub fn mmu_ready(&self) -> bool {
        // ORDERING: SeqCst, see `set_mmu_ready`.
        self.host.mmu_ready.load(Ordering::SeqCst) && self.tables().mmu_ready()
    }

    /// The host's own `mmu_ready` flag (without the resize gate): what the fault path
    /// checks, from inside the gate, under the HPTE lock.
    #[inline]
    pub(crate) fn host_mmu_ready(&self) -> bool {
        // ORDERING: SeqCst, see `set_mmu_ready`.
        self.host.mmu_ready.load(Ordering::SeqCst)
    }

    /// Number of vCPU faults currently in the fault path.
    pub(crate) fn faults_in_flight(&self) -> u64 {
        // ORDERING: SeqCst, see `set_mmu_ready`.
        self.host.faults_in_flight.load(Ordering::SeqCst)
    }

    /// Register a fault; `None` if the MMU is not ready.
    pub(crate) fn enter_fault(&self) -> Option<FaultTicket<'_>> {
        // ORDERING: SeqCst increment before the SeqCst flag load (see `set_mmu_ready`).
        self.host.faults_in_flight.fetch_add(1, Ordering::SeqCst);
        let t = FaultTicket(&self.host);
        if self.host_mmu_ready() {
            Some(t)
        } else {
            None
        }
    }

    /// Create a memslot (KVM_MR_CREATE) over simulated host memory
    /// ([`SimHostMemory`](revmap_host::SimHostMemory)) at `spec.userspace_addr`. Fails on
    /// bad flags, size, alignment, overlap with another slot's frames or id, or if the
    /// rmap array cannot be allocated (a clean error, nothing else changes). Host
    /// ranges may alias.
    pub fn create_memslot(&self, spec: MemslotSpec) -> Result<(), HostError> {
        Self::check_user_flags(spec.flags)?;
        let slot = Memslot::new(
            spec.id,
            spec.base_gfn,
            spec.npages,
            spec.backing_page_shift,
            spec.flags,
            spec.userspace_addr,
        )?;
        lifecycle::create_memslot(self.slot_set(), &HptArch(self), slot).map_err(host_error)
    }

    /// Create a memslot (KVM_MR_CREATE) of `npages` frames from `base_gfn` over the host
    /// memory `memory`: its host range starts at `memory.hva_range().0` and its backing
    /// page shift is `memory.page_shift()`. Fails as
    /// [`create_memslot`](Self::create_memslot) does, or if `memory` covers fewer than
    /// `npages` frames.
    pub fn create_memslot_with_memory(
        &self,
        id: SlotId,
        base_gfn: Gfn,
        npages: u64,
        flags: MemslotFlags,
        memory: Box<dyn HostMemory>,
    ) -> Result<(), HostError> {
        Self::check_user_flags(flags)?;
        let slot = Memslot::with_memory(id, base_gfn, npages, flags, memory)?;
        lifecycle::create_memslot(self.slot_set(), &HptArch(self), slot).map_err(host_error)
    }

    fn check_user_flags(flags: MemslotFlags) -> Result<(), HostError> {
        if flags.difference(MemslotFlags::USER_MASK) != MemslotFlags::default() {
            return Err(HostError::BadFlags {
                flags: flags.bits(),
            });
        }
        Ok(())
    }

    /// Delete a memslot (KVM_MR_DELETE): INVALID step, flush, removal (afterwards no rmap
    /// word of the slot is PRESENT and no VALID HPTE maps its frames).
    pub fn delete_memslot(&self, id: SlotId) -> Result<(), HostError> {
        lifecycle::delete_memslot(self.slot_set(), &HptArch(self), id).map_err(host_error)
    }

    /// Move a memslot to `new_base` (KVM_MR_MOVE): INVALID step, flush, re-insert at the
    /// new base with the same rmap array. The new range is checked before anything
    /// changes.
    pub fn move_memslot(&self, id: SlotId, new_base: Gfn) -> Result<(), HostError> {
        lifecycle::move_memslot(self.slot_set(), &HptArch(self), id, new_base).map_err(host_error)
    }

    /// Change a memslot's flags (KVM_MR_FLAGS_ONLY): dirty logging on/off, manual
    /// dirty-log protection. READONLY cannot change; INVALID is internal.
    pub fn set_memslot_flags(&self, id: SlotId, flags: MemslotFlags) -> Result<(), HostError> {
        lifecycle::set_memslot_flags(self.slot_set(), &HptArch(self), id, flags).map_err(host_error)
    }

    /// The slot and frame backed by host address `hva` (first non-INVALID slot in gfn
    /// order if several alias it).
    pub fn hva_to_gfn(&self, hva: Hva) -> Option<(SlotId, Gfn)> {
        self.memslots().hva_to_gfn(hva).map(|(s, g)| (s.id(), g))
    }

    /// Ids of the current (non-INVALID) memslots, in gfn order.
    pub fn memslot_ids(&self) -> Vec<SlotId> {
        self.memslots()
            .iter()
            .filter(|s| !s.is_invalid())
            .map(Memslot::id)
            .collect()
    }

    /// Description of memslot `id`.
    pub fn memslot_info(&self, id: SlotId) -> Option<MemslotSpec> {
        self.memslots()
            .get(id)
            .filter(|s| !s.is_invalid())
            .map(MemslotSpec::of)
    }

    /// `kvmppc_core_flush_memslot_hv`: unmap every HPTE chained on the slot. PRESENT is
    /// tested without the lock: the slot is INVALID and published, so no chain of it can
    /// gain a member. Returns the number of HPTEs unmapped.
    pub(crate) fn flush_memslot(&self, slot: &Memslot) -> u64 {
        let acc = self.host_access();
        let hpt = acc.hpt();
        let base = slot.base_gfn().0;
        let mut n = 0;
        for (i, rm) in slot.rmaps().iter().enumerate() {
            if rm.load().is_present() {
                n += self.unmap_rmap(hpt, slot, Gfn(base + i as u64), rm);
            }
        }
        n
    }

    /// Turn emulated-MMIO HPTEs (ABSENT, key 31) whose guest frame lies in `[lo, hi)`
    /// into paged-out entries (key cleared, as H_ENTER would have made them had the slot
    /// existed), and bump `mmio_update`. Runs after the new slot set is published, so no
    /// new MMIO entry for the range can appear.
    pub(crate) fn reclassify_mmio(&self, lo: Gfn, hi: Gfn) {
        let acc = self.host_access();
        let hpt = acc.hpt();
        let rev = hpt.revmap();
        for (i, s) in hpt.slots().iter().enumerate() {
            if s.load_v() & HpteV::ABSENT == 0 {
                continue;
            }
            let Some(g) = hpt.lock(Ptex(i as u32)) else {
                continue;
            };
            let v = g.v();
            let r = g.r();
            if v & HpteV::ABSENT == 0 || !HpteR(r).is_key31() {
                continue;
            }
            let gr = rev.guest_rpte(i as u32);
            let Some((gfn, shift)) = self.entry_page(v, gr) else {
                continue;
            };
            if gfn < lo || gfn >= hi {
                continue;
            }
            let psize_mask = (1u64 << shift) - 1;
            g.set_r(gr & (HpteR::PP0 | psize_mask) & !HpteR::KEY);
            drop(g);
        }
        self.bump_mmio_update();
    }
}

impl Vm {
    /// Invalidate per-vCPU MMIO translation caches (`mmio_update`).
    pub fn bump_mmio_update(&self) {
        // ORDERING: Relaxed: a generation counter for MMIO caches.
        self.mmio_update.fetch_add(1, Ordering::Relaxed);
    }
}

/// The host-side interface of the generic host layer, forwarded to the methods above
/// and to those of [`notifier`](crate::notifier) and [`dirty`](crate::dirty).
///
/// Host code written against [`HostMmu`] drives this VM, and any other MMU, alike:
///
/// ```
/// use revmap_hpt::{HostMmu, MemslotFlags, Vm, VmConfig};
///
/// /// Generic host code: reclaim the first 64 KiB of every slot.
/// fn reclaim_head<H: HostMmu>(host: &H) -> u64 {
///     host.memslot_views()
///         .iter()
///         .map(|s| host.unmap_hva_range(s.userspace_addr, s.hva_of(16)))
///         .sum()
/// }
///
/// let vm = Vm::new(VmConfig { ram_bytes: 64 << 20, hpt_order: 18, ..VmConfig::default() })?;
/// assert_eq!(reclaim_head(&vm), 0, "nothing is mapped yet");
/// let ram = vm.memslot_views()[0];
/// vm.set_memslot_flags(ram.id, MemslotFlags::LOG_DIRTY_PAGES)?;
/// let log = HostMmu::get_dirty_log(&vm, ram.id)?;
/// assert_eq!(log.len() as u64, ram.bitmap_words());
/// assert!(log.iter().all(|w| *w == 0));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
impl HostMmu for Vm {
    type Error = HostError;

    fn memslot_views(&self) -> Vec<SlotView> {
        self.memslots()
            .iter()
            .filter(|s| !s.is_invalid())
            .map(SlotView::of)
            .collect()
    }

    fn invalidate_range_start(&self, start: Hva, end: Hva) {
        Vm::invalidate_range_start(self, start, end)
    }

    fn invalidate_range_end(&self, start: Hva, end: Hva) {
        Vm::invalidate_range_end(self, start, end)
    }

    fn unmap_hva_range(&self, start: Hva, end: Hva) -> u64 {
        Vm::unmap_hva_range(self, start, end)
    }

    fn host_page_in(&self, start: Hva, end: Hva) {
        Vm::host_page_in(self, start, end)
    }

    fn unmap_gfn_range(&self, slot: SlotId, start: Gfn, end: Gfn) -> u64 {
        Vm::unmap_gfn_range(self, slot, start, end)
    }

    fn age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool {
        Vm::age_gfn(self, slot, start, end)
    }

    fn test_age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool {
        Vm::test_age_gfn(self, slot, start, end)
    }

    fn get_dirty_log(&self, slot: SlotId) -> Result<Vec<u64>, HostError> {
        Vm::get_dirty_log(self, slot)
    }

    fn clear_dirty_log(
        &self,
        slot: SlotId,
        first_page: u64,
        bits: &[u64],
    ) -> Result<(), HostError> {
        Vm::clear_dirty_log(self, slot, first_page, bits)
    }
}
