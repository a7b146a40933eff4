//! A VM running the shadow MMU: the shared host layer's published memslots
//! ([`SlotSet`]) and lifecycle hooks ([`MemslotArch`]), `mmu_lock` as an `RwLock` from
//! `revmap_rmap::sync`, and the host-side interface [`HostMmu`].
//!
//! # Locking
//!
//! * `mmu_lock` (an `RwLock<ShadowMmu>`) is taken **for write** by every modification:
//!   vCPU accesses that fault, guest page-table stores, INVLPG, CR3 switches, zaps,
//!   unmap, dirty logging. Aging (`age_gfn`/`test_age_gfn`) takes it **for read** only,
//!   and changes SPTEs with atomic RMWs under each rmap head's read-only bit lock, as
//!   KVM's lockless aging does; it never races with a writer of the same SPTE because
//!   writers hold the lock exclusively.
//! * MMU-notifier invalidations bracket their unmap with `InvalidateSeq::begin`/`end`;
//!   a fault samples the sequence before resolving the host page and re-checks it (and
//!   the in-progress count) before installing the SPTE, retrying on a change.
//! * Order: the slot-set writer lock (lifecycle) -> `mmu_lock` -> rmap bit locks.

use crate::mmu::{AccessOutcome, ShadowError, ShadowMmu, SlotArch, FAULT_DESC_TOPUP};
use crate::paging::{Access, CpuMode};
use revmap_host::lifecycle::{self, MemslotArch, MemslotChange};
use revmap_host::slots::SlotSet;
use revmap_host::{HostMmu, Memslot, MemslotError, MemslotFlags, Memslots, SlotView};
use revmap_rmap::pte_list::DescCache;
use revmap_rmap::sync::{lock, read, write, yield_now, Mutex, RwLock};
use revmap_rmap::{Gfn, Hva, RmapError, SlotId, PAGE_SHIFT};

/// A VM on the shadow MMU.
#[derive(Debug)]
pub struct ShadowVm {
    slots: SlotSet,
    mmu_lock: RwLock<ShadowMmu>,
    /// The x86 arrays of the slot being created or moved, allocated by the prepare
    /// hook (`kvm_arch_prepare_memory_region`) before the host layer publishes it, and
    /// installed by the commit hook (which cannot fail).
    prepared: Mutex<Option<SlotArch>>,
}

impl Default for ShadowVm {
    fn default() -> Self {
        Self::new()
    }
}

impl ShadowVm {
    /// A VM with no memslots and no vCPUs.
    pub fn new() -> Self {
        Self::with_state(ShadowMmu::new())
    }

    /// [`new`](Self::new) with the MMU's allocations fallible (`KVM_CREATE_VM` failing
    /// with `-ENOMEM`).
    pub fn try_new() -> Result<Self, ShadowError> {
        Ok(Self::with_state(ShadowMmu::try_new()?))
    }

    fn with_state(mmu: ShadowMmu) -> Self {
        Self {
            slots: SlotSet::new(Memslots::new()),
            mmu_lock: RwLock::new(mmu),
            prepared: Mutex::new(None),
        }
    }

    /// Runs `f` with `mmu_lock` held for write.
    pub fn with_mmu<R>(&self, f: impl FnOnce(&mut ShadowMmu) -> R) -> R {
        f(&mut write(&self.mmu_lock))
    }

    /// Runs `f` with `mmu_lock` held for read.
    pub fn with_mmu_read<R>(&self, f: impl FnOnce(&ShadowMmu) -> R) -> R {
        f(&read(&self.mmu_lock))
    }

    /// Adds a vCPU.
    pub fn add_vcpu(&self, mode: CpuMode) -> usize {
        self.with_mmu(|m| m.add_vcpu(mode))
    }

    /// [`add_vcpu`](Self::add_vcpu) with its allocations fallible.
    pub fn try_add_vcpu(&self, mode: CpuMode) -> Result<usize, ShadowError> {
        self.with_mmu(|m| m.try_add_vcpu(mode))
    }

    /// A guest access by vCPU `v` (a shadow hit or a shadow page fault).
    /// A shadow hit is served under the read lock (the hardware's walk of the shadow
    /// table); a miss tops up the rmap descriptor cache *before* taking `mmu_lock` for
    /// write (`mmu_topup_memory_caches`), then faults; the fault tops up the per-VM
    /// shadow-page caches before it changes anything
    /// ([`ShadowMmu::mmu_topup_memory_caches`]). Out of memory is
    /// [`ShadowError::NoMemory`] with nothing changed (KVM's `-ENOMEM`: the vCPU exits).
    ///
    /// A fault that must back off ([`AccessOutcome::Retry`], e.g. during an
    /// MMU-notifier invalidation) drops the lock, yields and re-executes, as the guest
    /// would.
    pub fn access(&self, v: usize, gva: u64, access: Access) -> Result<AccessOutcome, ShadowError> {
        loop {
            let pool = {
                let m = read(&self.mmu_lock);
                if let Some(gpa) = m.translate(v, gva, access)? {
                    return Ok(AccessOutcome::Hit(gpa));
                }
                m.pool_arc()
            };
            let mut cache = DescCache::new(&pool);
            cache.reserve(FAULT_DESC_TOPUP)?;
            match self.with_mmu(|m| m.access_with_cache(&mut cache, v, gva, access))? {
                AccessOutcome::Retry => yield_now(),
                o => return Ok(o),
            }
        }
    }

    /// A guest 8-byte store, routed by the SPTEs (see [`ShadowMmu::guest_store`]).
    pub fn guest_store(&self, gpa: u64, val: u64) -> Result<bool, ShadowError> {
        self.with_mmu(|m| m.guest_store(gpa, val))
    }

    /// The section-8 invariant checker, under the read lock.
    pub fn check(&self) -> Result<u64, crate::mmu::Violation> {
        self.with_mmu_read(|m| m.check())
    }

    /// KVM_MR_CREATE through the host layer's lifecycle. The slot's x86 arrays are
    /// allocated before anything is published (`kvm_arch_prepare_memory_region`): out
    /// of memory is [`MemslotError::Alloc`] with nothing changed.
    pub fn create_memslot(&self, slot: Memslot) -> Result<(), MemslotError> {
        let r = lifecycle::create_memslot(&self.slots, self, slot);
        // Unused if a later step refused the slot.
        lock(&self.prepared).take();
        r
    }

    /// KVM_MR_DELETE.
    pub fn delete_memslot(&self, id: SlotId) -> Result<(), MemslotError> {
        lifecycle::delete_memslot(&self.slots, self, id)
    }

    /// KVM_MR_MOVE. x86 keeps per-slot arrays sized and aligned by the base frame
    /// (rmaps per level, huge-page disallow counts): the moved slot's are allocated
    /// before anything is published, as for a creation.
    pub fn move_memslot(&self, id: SlotId, new_base: Gfn) -> Result<(), MemslotError> {
        let r = lifecycle::move_memslot(&self.slots, self, id, new_base);
        lock(&self.prepared).take();
        r
    }

    /// KVM_MR_FLAGS_ONLY; starting dirty logging write-protects the slot
    /// (`kvm_mmu_slot_remove_write_access`).
    pub fn set_memslot_flags(&self, id: SlotId, flags: MemslotFlags) -> Result<(), MemslotError> {
        lifecycle::set_memslot_flags(&self.slots, self, id, flags)?;
        if let Some(s) = self.slots.load().get(id).cloned() {
            let log = s.flags().contains(MemslotFlags::LOG_DIRTY_PAGES);
            self.with_mmu(|m| {
                m.update_memslot(s);
                if log {
                    let _ = m.slot_remove_write_access(id);
                }
            });
        }
        Ok(())
    }

    fn for_each_slot_range(&self, start: Hva, end: Hva, mut f: impl FnMut(&Memslot, Gfn, Gfn)) {
        let slots = self.slots.load();
        for s in slots.iter().filter(|s| !s.is_invalid()) {
            if let Some((lo, hi)) = s.hva_range_to_gfns(start, end) {
                // Whole host pages go away.
                let frames = 1u64 << (s.backing_page_shift() - PAGE_SHIFT);
                let base = s.base_gfn().0;
                let lo = Gfn(base + ((lo.0 - base) & !(frames - 1)));
                let hi = Gfn((base + (hi.0 - base).next_multiple_of(frames)).min(s.end_gfn().0));
                f(s, lo, hi);
            }
        }
    }
}

impl MemslotArch for ShadowVm {
    fn prepare_memory_region(&self, change: MemslotChange<'_>) -> Result<(), MemslotError> {
        let (MemslotChange::Create(s) | MemslotChange::Move(s)) = change else {
            return Ok(());
        };
        let arch = self
            .with_mmu(|m| m.prepare_memslot(s.clone()))
            .map_err(|e| match e {
                ShadowError::Pool(r) => MemslotError::Alloc(r),
                _ => MemslotError::Alloc(RmapError::Alloc { bytes: 0 }),
            })?;
        *lock(&self.prepared) = Some(arch);
        Ok(())
    }

    fn kick_readers(&self) {}

    fn flush_memslot(&self, slot: &Memslot) {
        self.with_mmu(|m| {
            // From now on faults see the INVALID slot and retry.
            m.update_memslot(slot.clone());
            let _ = m.flush_memslot(slot.id());
        });
    }

    fn commit_memory_region(&self, change: MemslotChange<'_>) {
        self.with_mmu(|m| {
            // The arrays the prepare hook made for this very slot (same data, same
            // base; the writer lock is held from prepare to commit, so they are).
            let prepared = |s: &Memslot| {
                lock(&self.prepared)
                    .take()
                    .filter(|a| a.slot.same_data(s) && a.slot.base_gfn() == s.base_gfn())
            };
            let _ = match change {
                MemslotChange::Create(s) => match prepared(s) {
                    Some(mut a) => {
                        a.slot = s.clone();
                        m.add_prepared_memslot(a)
                    }
                    None => m.add_memslot(s.clone()),
                },
                MemslotChange::Delete(s) => m.remove_memslot(s.id()).map(|_| ()),
                // x86 reallocates the arch arrays for a moved slot (prepared above).
                MemslotChange::Move(s) => {
                    let a = prepared(s);
                    m.remove_memslot(s.id()).and_then(|_| match a {
                        Some(mut a) => {
                            a.slot = s.clone();
                            m.add_prepared_memslot(a)
                        }
                        None => m.add_memslot(s.clone()),
                    })
                }
            };
        });
    }
}

impl HostMmu for ShadowVm {
    type Error = ShadowError;

    fn memslot_views(&self) -> Vec<SlotView> {
        SlotView::all_usable(&self.slots.load())
    }

    fn invalidate_range_start(&self, start: Hva, end: Hva) {
        self.with_mmu(|m| {
            m.invalidate.begin();
            self.for_each_slot_range(start, end, |s, lo, hi| {
                let _ = m.unmap_gfn_range(s.id(), lo.0, hi.0);
            });
        });
    }

    fn invalidate_range_end(&self, _start: Hva, _end: Hva) {
        self.with_mmu_read(|m| m.invalidate.end());
    }

    fn unmap_hva_range(&self, start: Hva, end: Hva) -> u64 {
        self.with_mmu(|m| {
            m.invalidate.begin();
            let mut n = 0;
            self.for_each_slot_range(start, end, |s, lo, hi| {
                let step = 1usize << (s.backing_page_shift() - PAGE_SHIFT);
                for g in (lo.0..hi.0).step_by(step) {
                    s.set_host_present(Gfn(g), false);
                }
                n += m.unmap_gfn_range(s.id(), lo.0, hi.0).unwrap_or(0);
            });
            m.invalidate.end();
            n
        })
    }

    fn host_page_in(&self, start: Hva, end: Hva) {
        self.for_each_slot_range(start, end, |s, lo, hi| {
            let step = 1usize << (s.backing_page_shift() - PAGE_SHIFT);
            for g in (lo.0..hi.0).step_by(step) {
                s.set_host_present(Gfn(g), true);
            }
        });
    }

    fn unmap_gfn_range(&self, slot: SlotId, start: Gfn, end: Gfn) -> u64 {
        self.with_mmu(|m| m.unmap_gfn_range(slot, start.0, end.0).unwrap_or(0))
    }

    fn age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool {
        self.with_mmu_read(|m| m.age_gfn(slot, start.0, end.0))
    }

    fn test_age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool {
        self.with_mmu_read(|m| m.test_age_gfn(slot, start.0, end.0))
    }

    fn get_dirty_log(&self, slot: SlotId) -> Result<Vec<u64>, ShadowError> {
        let manual = self
            .slots
            .load()
            .get(slot)
            .is_some_and(|s| s.flags().contains(MemslotFlags::DIRTY_LOG_MANUAL_PROTECT));
        self.with_mmu(|m| {
            if manual {
                let s = m
                    .memslots()
                    .find(|s| s.id() == slot)
                    .cloned()
                    .ok_or(ShadowError::NoSlot(u64::from(slot.0)))?;
                let words = s.npages().div_ceil(64) as usize;
                let mut out = Vec::new();
                out.try_reserve_exact(words)
                    .map_err(|_| ShadowError::NoMemory)?;
                out.extend((0..words).map(|w| s.dirty_word(w)));
                Ok(out)
            } else {
                m.get_dirty_log(slot)
            }
        })
    }

    fn clear_dirty_log(
        &self,
        slot: SlotId,
        first_page: u64,
        bits: &[u64],
    ) -> Result<(), ShadowError> {
        self.with_mmu(|m| m.clear_dirty_log(slot, first_page, bits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::{Gpa, PT_ACCESSED, PT_DIRTY, PT_PRESENT, PT_USER, PT_WRITABLE};
    use revmap_rmap::sync::{thread, Arc};

    const E: u64 = PT_PRESENT | PT_WRITABLE | PT_USER | PT_ACCESSED | PT_DIRTY;
    const HVA: u64 = 0x7f00_0000_0000;

    fn vm() -> (ShadowVm, usize) {
        let vm = ShadowVm::new();
        let slot =
            Memslot::new(SlotId(1), Gfn(0), 4096, 12, MemslotFlags::empty(), Hva(HVA)).unwrap();
        vm.create_memslot(slot).unwrap();
        vm.with_mmu(|m| {
            for (a, v) in [(0x1000, 0x2000), (0x2000, 0x3000), (0x3000, 0x4000)] {
                m.mem.write_u64(Gpa(a), v | E).unwrap();
            }
            for i in 0..64u64 {
                m.mem
                    .write_u64(Gpa(0x4000 + 8 * i), (0x100 + i) << 12 | E)
                    .unwrap();
            }
        });
        let v = vm.add_vcpu(CpuMode::long4(0x1000));
        (vm, v)
    }

    #[test]
    fn host_mmu_unmap_age_dirty_and_lifecycle() {
        let (vm, v) = vm();
        assert!(
            matches!(vm.access(v, 0x5000, Access::WRITE).unwrap(), AccessOutcome::Fixed(g) if g.0 == 0x105000)
        );
        assert!(vm.test_age_gfn(SlotId(1), Gfn(0x105), Gfn(0x106)));
        assert!(vm.age_gfn(SlotId(1), Gfn(0x105), Gfn(0x106)));
        assert!(!vm.test_age_gfn(SlotId(1), Gfn(0x105), Gfn(0x106)));
        // Host reclaim of the page: the SPTE goes, the next access faults it back in.
        assert_eq!(
            vm.unmap_hva_range(Hva(HVA + 0x105000), Hva(HVA + 0x106000)),
            1
        );
        vm.check().unwrap();
        assert!(matches!(
            vm.access(v, 0x5000, Access::empty()).unwrap(),
            AccessOutcome::Fixed(_)
        ));
        vm.check().unwrap();
        // Dirty logging through the lifecycle: enabling write-protects; a write dirties.
        vm.set_memslot_flags(SlotId(1), MemslotFlags::LOG_DIRTY_PAGES)
            .unwrap();
        vm.access(v, 0x6000, Access::WRITE).unwrap();
        let log = vm.get_dirty_log(SlotId(1)).unwrap();
        assert_eq!(log[0x106 / 64], 1 << (0x106 % 64));
        vm.check().unwrap();
        // Moving the slot flushes every translation and shadow page in it.
        vm.move_memslot(SlotId(1), Gfn(0x10_0000)).unwrap();
        vm.with_mmu_read(|m| assert_eq!(m.used_mmu_pages(), 0));
        vm.check().unwrap();
        vm.delete_memslot(SlotId(1)).unwrap();
        assert!(vm.memslot_views().is_empty());
        vm.check().unwrap();
    }

    #[test]
    fn vcpu_threads_fault_while_host_threads_age_and_unmap() {
        let (vm, v0) = vm();
        let v1 = vm.add_vcpu(CpuMode::long4(0x1000));
        let vm = Arc::new(vm);
        let mut hs = Vec::new();
        for (k, v) in [v0, v1].into_iter().enumerate() {
            let vm = vm.clone();
            hs.push(thread::spawn(move || {
                for i in 0..400u64 {
                    let gva = ((i * 7 + k as u64) % 64) << 12;
                    let acc = if i % 3 == 0 {
                        Access::WRITE
                    } else {
                        Access::empty()
                    };
                    match vm.access(v, gva, acc).unwrap() {
                        AccessOutcome::Hit(g) | AccessOutcome::Fixed(g) => {
                            assert_eq!(g.0, gva + 0x100000)
                        }
                        o => panic!("{o:?}"),
                    }
                }
            }));
        }
        let host = vm.clone();
        hs.push(thread::spawn(move || {
            for i in 0..200u64 {
                let g = 0x100 + (i % 64);
                host.age_gfn(SlotId(1), Gfn(g), Gfn(g + 1));
                if i % 5 == 0 {
                    host.unmap_hva_range(Hva(HVA + (g << 12)), Hva(HVA + ((g + 1) << 12)));
                }
            }
        }));
        for h in hs {
            h.join().unwrap();
        }
        vm.check().unwrap();
    }

    #[test]
    fn fault_waits_out_an_open_invalidation() {
        let (vm, v) = vm();
        let vm = Arc::new(vm);
        vm.invalidate_range_start(Hva(HVA + 0x105000), Hva(HVA + 0x106000));
        let t = {
            let vm = vm.clone();
            thread::spawn(move || vm.access(v, 0x5000, Access::empty()).unwrap())
        };
        // While the invalidation is open nothing maps the page.
        for _ in 0..100 {
            assert!(vm.with_mmu_read(|m| m.rmap_entries(0x105, 1).unwrap().is_empty()));
            yield_now();
        }
        vm.invalidate_range_end(Hva(HVA + 0x105000), Hva(HVA + 0x106000));
        assert!(matches!(t.join().unwrap(), AccessOutcome::Fixed(g) if g.0 == 0x105000));
        vm.check().unwrap();
    }

    #[test]
    fn four_vcpus_with_guest_stores_against_host_unmap_age_and_dirty_log() {
        let (vm, v0) = vm();
        let vcpus: Vec<usize> = std::iter::once(v0)
            .chain((0..3).map(|_| vm.add_vcpu(CpuMode::long4(0x1000))))
            .collect();
        let vm = Arc::new(vm);
        let mut hs = Vec::new();
        for (k, v) in vcpus.into_iter().enumerate() {
            let vm = vm.clone();
            hs.push(thread::spawn(move || {
                for i in 0..300u64 {
                    let idx = (i * 13 + 5 * k as u64) % 64;
                    if k == 3 && i % 10 == 0 {
                        // This vCPU's guest repoints a PTE (the PT is a level-1 table).
                        let target = 0x100 + (idx + i) % 64;
                        vm.guest_store(0x4000 + 8 * idx, target << 12 | E).unwrap();
                        continue;
                    }
                    let acc = if i % 4 == 0 {
                        Access::WRITE
                    } else {
                        Access::empty()
                    };
                    let o = vm.access(v, idx << 12, acc).unwrap();
                    assert!(
                        matches!(o, AccessOutcome::Hit(_) | AccessOutcome::Fixed(_)),
                        "{o:?}"
                    );
                }
            }));
        }
        let host = vm.clone();
        hs.push(thread::spawn(move || {
            for i in 0..150u64 {
                let g = 0x100 + (i * 7) % 64;
                host.age_gfn(SlotId(1), Gfn(g), Gfn(g + 8));
                host.unmap_hva_range(Hva(HVA + (g << 12)), Hva(HVA + ((g + 2) << 12)));
            }
        }));
        let host = vm.clone();
        hs.push(thread::spawn(move || {
            host.set_memslot_flags(SlotId(1), MemslotFlags::LOG_DIRTY_PAGES)
                .unwrap();
            for _ in 0..50 {
                host.get_dirty_log(SlotId(1)).unwrap();
                host.check().unwrap();
            }
        }));
        for h in hs {
            h.join().unwrap();
        }
        vm.check().unwrap();
    }
}
