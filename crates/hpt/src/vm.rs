//! The VM: one HPT with its revmap, the memslots with their rmap words, the TLB domain,
//! the invalidation sequence, and the PAPR hypercalls with KVM-HV semantics (KVM's
//! `book3s_hv_rm_mmu.c`: `kvmppc_do_h_enter`, `kvmppc_do_h_remove`, ...) and QEMU's
//! guest-visible behaviour where the flavour says so.
//!
//! # Representation
//!
//! The real HPT is always in KVM's representation: a VALID entry maps a present host
//! page (host RPN in dword 1) and sits on the rmap chain of its base gfn; an ABSENT
//! entry is guest-valid but not in hardware (emulated MMIO with key 31, or a host page
//! that is not present / raced with an invalidation); the guest's own dword 1 lives in
//! the revmap (`guest_rpte`). The guest sees `flavour.present_v(dword0)` and
//! `guest_rpte | hardware R/C`.
//!
//! # Locks and invariants
//!
//! * Lock order HPTE lock -> rmap lock (never the reverse with spinning); H_BULK_REMOVE
//!   spins only for the first HPTE of a batch and try-locks the others.
//! * R/C are read from dword 1 only after the tlbie that stabilises them, so none
//!   set by hardware is lost (KVM's "Don't lose hardware R/C bit updates in H_PROTECT").
//! * Every hypercall validates each guest value with checked arithmetic before use; no
//!   input panics, allocates, or touches memory outside this VM. The hot path takes no
//!   global lock (only HPTE and rmap bit locks); the memslot lookup loads the published
//!   snapshot ([`SlotSet::load`], an SRCU read side) and scans its few slots.
//! * See `check.rs` for the whole-VM invariants, verified by [`Vm::check_invariants`].

use crate::error::{HptError, PaprError};
use crate::flavour::{Flavour, Target, WimgVerdict};
use crate::hcall::*;
use crate::hpte::{HpteR, HpteV};
use crate::resize::cell::{HostAccess, TableCell};
use crate::table::{Hpt, HpteGuard};
use crate::tlb::{InvalidateSeq, TlbDomain};
use revmap_host::slots::{SlotSet, SlotsRef};
use revmap_host::{Memslot, MemslotFlags, Memslots};
use revmap_rmap::sync::{Arc, AtomicU64, Ordering};
use revmap_rmap::{Gfn, HpteLocks, Hva, Ptex, SlotId, VcpuId, PAGE_SHIFT};

/// Host virtual address where guest RAM is "mapped" in the model (also its host
/// physical address; aligned to 16 GiB so every backing page size fits).
pub const RAM_HVA_BASE: u64 = 0x7e00_0000_0000;

/// Configuration of a [`Vm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest RAM in bytes: one memslot at gpa 0 (a multiple of 4 KiB).
    pub ram_bytes: u64,
    /// HPT order, 18..=36.
    pub hpt_order: u32,
    /// Which hypervisor to reproduce.
    pub flavour: Flavour,
    /// Host backing page shift for RAM (12, 16, 24, ...).
    pub backing_page_shift: u32,
}

impl Default for VmConfig {
    /// 1 GiB of RAM, order 23 (QEMU's default for 1 GiB), KVM flavour, 16 MiB backing.
    fn default() -> Self {
        Self {
            ram_bytes: 1 << 30,
            hpt_order: 23,
            flavour: Flavour::Kvm,
            backing_page_shift: 24,
        }
    }
}

pub use revmap_host::port::HcallResult;

/// Whether `opcode` is one of the resize hypercalls (run outside the vCPU gate).
#[inline(always)]
pub(crate) const fn is_resize_opcode(opcode: u64) -> bool {
    opcode == H_RESIZE_HPT_PREPARE || opcode == H_RESIZE_HPT_COMMIT
}

/// The guest's HPTE index `ptex` checked against the table (H_PARAMETER if beyond it).
#[inline(always)]
fn checked_ptex(hpt: &Hpt, ptex: u64) -> Result<Ptex, PaprError> {
    // The slot array's length is npte (`Hpt`'s invariant): comparing with it rather than
    // with the geometry's npte lets the compiler drop the bounds checks of the slot
    // accesses that follow.
    if ptex < hpt.slots().len() as u64 {
        // npte <= 2^32, so the index fits u32.
        Ok(Ptex(ptex as u32))
    } else {
        Err(PaprError::Parameter)
    }
}

/// Lock the guest's HPTE `ptex`, spinning, once checked (H_PARAMETER if beyond the
/// table): the prologue of the hypercalls that edit one entry under its lock.
#[inline(always)]
fn lock_checked(hpt: &Hpt, ptex: u64) -> Result<HpteGuard<'_>, PaprError> {
    hpt.lock(checked_ptex(hpt, ptex)?)
        .ok_or(PaprError::Parameter)
}

/// A guest with a hashed page table. `Send + Sync`: vCPU threads share `&Vm`.
#[derive(Debug)]
pub struct Vm {
    flavour: Flavour,
    /// The current HPT (swapped by a resize commit) and the vCPU gate (`resize::cell`).
    tables: TableCell,
    memslots: SlotSet,
    /// An empty memslot set: what a paused run handle holds instead of a snapshot.
    empty_slots: Arc<Memslots>,
    notifier: InvalidateSeq,
    pub(crate) host: crate::host::HostState,
    tlb: TlbDomain,
    pub(crate) mmio_update: AtomicU64,
    /// Per-HPTE change tracking of the current table (`resize::track`).
    #[cfg(feature = "std")]
    pub(crate) track: crate::resize::track::ChangeTracker,
    /// The resize hypercalls (`None`: H_FUNCTION, see [`Vm::with_resizer`]).
    resizer: Option<alloc::boxed::Box<dyn crate::resize::HptResizer>>,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Vm>();
};

impl Vm {
    /// Create a VM: a zeroed HPT of 2^`hpt_order` bytes and one RAM memslot at gpa 0
    /// with dirty logging on and every host page present.
    pub fn new(cfg: VmConfig) -> Result<Vm, HptError> {
        Self::with_hpt(cfg, Hpt::new(cfg.hpt_order)?)
    }

    /// A VM whose HPT may be smaller than PAPR's minimum (order 8 and up), for loom and
    /// shuttle models that must keep the number of instrumented atomics small.
    #[cfg(any(loom, shuttle))]
    #[doc(hidden)]
    pub fn new_small(cfg: VmConfig) -> Result<Vm, HptError> {
        Self::with_hpt(cfg, Hpt::new_small(cfg.hpt_order)?)
    }

    /// [`Vm::new`] over an already built table (tiny tables for model checking).
    pub(crate) fn with_hpt(cfg: VmConfig, hpt: Hpt) -> Result<Vm, HptError> {
        if cfg.ram_bytes == 0 || cfg.ram_bytes % (1 << PAGE_SHIFT) != 0 {
            return Err(HptError::BadRamSize {
                bytes: cfg.ram_bytes,
            });
        }
        let slot = Memslot::new(
            SlotId(0),
            Gfn(0),
            cfg.ram_bytes >> PAGE_SHIFT,
            cfg.backing_page_shift,
            MemslotFlags::LOG_DIRTY_PAGES,
            Hva(RAM_HVA_BASE),
        )?;
        let mut memslots = Memslots::new();
        memslots.insert(slot)?;
        Ok(Vm {
            flavour: cfg.flavour,
            tables: TableCell::new(hpt)?,
            #[cfg(feature = "std")]
            track: crate::resize::track::ChangeTracker::new(),
            resizer: None,
            memslots: SlotSet::new(memslots),
            empty_slots: Arc::new(Memslots::new()),
            notifier: InvalidateSeq::default(),
            host: crate::host::HostState::new(),
            tlb: TlbDomain::new()?,
            mmio_update: AtomicU64::new(0),
        })
    }

    /// This VM with `resizer` answering H_RESIZE_HPT_PREPARE and H_RESIZE_HPT_COMMIT
    /// (replacing any resizer installed before). Without one, both calls answer
    /// H_FUNCTION (the optional PAPR function set is absent).
    #[must_use]
    pub fn with_resizer(mut self, resizer: alloc::boxed::Box<dyn crate::resize::HptResizer>) -> Vm {
        self.resizer = Some(resizer);
        self
    }

    /// The installed resizer, if any ([`with_resizer`](Self::with_resizer)).
    #[inline]
    pub fn resizer(&self) -> Option<&dyn crate::resize::HptResizer> {
        self.resizer.as_deref()
    }

    /// The per-HPTE change tracking of the current table (used by a pre-copy resize
    /// commit; see [`ChangeTracker`](crate::resize::track::ChangeTracker)).
    #[cfg(feature = "std")]
    #[inline]
    pub fn change_tracker(&self) -> &crate::resize::track::ChangeTracker {
        &self.track
    }

    /// The HPT order.
    #[inline]
    pub fn hpt_order(&self) -> u32 {
        self.hpt().geometry().order()
    }

    /// The flavour.
    #[inline]
    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// The current hashed page table and its revmap, without entering the gate: the
    /// reference stays valid for the life of `&self`, but a concurrent resize commit
    /// may retire it (use at quiescent points, or see [`host_access`](Self::host_access)).
    #[inline(always)]
    pub fn hpt(&self) -> &Hpt {
        self.tables.current()
    }

    /// The table holder and the vCPU gate (resize).
    #[inline]
    pub fn tables(&self) -> &TableCell {
        &self.tables
    }

    /// Enter the gate as a host-side walker: the returned table stays current until
    /// the guard drops (a resize commit waits for it, as in KVM's "Fix exclusion
    /// between HPT resizing and other HPT updates").
    pub fn host_access(&self) -> HostAccess<'_> {
        self.tables.host_enter()
    }

    /// Fault the pages of the VM's tables in for writing without changing them: the
    /// current HPT and its revmap ([`Hpt::populate`]), and each memslot's rmap words
    /// and dirty bitmap. The tables are allocated zeroed (fresh zero pages); without
    /// this their first-touch page faults land in the guest's first hypercalls. A
    /// hypervisor calls it before the vCPUs run, as KVM's HPTs come already mapped from
    /// its CMA pool. Safe at any time (it changes no value); tables allocated later (by
    /// a resize commit) are not covered.
    pub fn populate_tables(&self) {
        let access = self.host_access();
        access.hpt().populate();
        drop(access);
        let slots = self.memslots();
        for s in slots.iter() {
            revmap_rmap::ring::populate_rmaps(s.rmaps());
            for w in s
                .dirty_bitmap()
                .iter()
                .step_by(revmap_rmap::ring::touch_stride::<AtomicU64>())
            {
                revmap_rmap::ring::touch_word(w);
            }
        }
    }

    /// Free the tables retired by resize commits (needs exclusive access).
    pub fn reclaim_retired_tables(&mut self) {
        self.tables.reclaim_retired();
    }

    /// Wait until no resize commit has the gate closed.
    pub fn wait_mmu_ready(&self) {
        self.tables.wait_open();
    }

    /// A snapshot of the memslots (an SRCU read side: drop it before calling a memslot
    /// lifecycle method, which waits for readers).
    #[inline]
    pub fn memslots(&self) -> SlotsRef {
        self.memslots.load()
    }

    /// An empty memslot set (held by paused run handles).
    #[inline]
    pub(crate) fn empty_slots(&self) -> &Arc<Memslots> {
        &self.empty_slots
    }

    /// The published memslot set (lifecycle code).
    #[inline]
    pub fn slot_set(&self) -> &SlotSet {
        &self.memslots
    }

    /// The MMU-notifier invalidation sequence (for the host-side issue).
    #[inline]
    pub fn invalidate_seq(&self) -> &InvalidateSeq {
        &self.notifier
    }

    /// The TLB domain shared with the vCPU MMU models.
    #[inline]
    pub fn tlb(&self) -> &TlbDomain {
        &self.tlb
    }

    /// Generation of emulated-MMIO HPTE removals (`mmio_update`).
    #[inline]
    pub fn mmio_update(&self) -> u64 {
        // ORDERING: Relaxed: a statistic/generation read by per-vCPU caches.
        self.mmio_update.load(Ordering::Relaxed)
    }

    /// One PAPR hypercall from vCPU `vcpu`. `args` = r4.. (missing args read as 0,
    /// extra ignored). Unknown opcodes and non-multiples of 4 return H_FUNCTION, as do
    /// H_CLEAR_REF/H_CLEAR_MOD in the QEMU flavour (and the resize calls without `std`).
    /// A `vcpu` at or past [`MAX_VCPUS`](revmap_rmap::MAX_VCPUS) is answered
    /// H_PARAMETER without touching the VM (ids never wrap onto another vCPU).
    ///
    /// A convenience over [`hcall_regs`](Self::hcall_regs), which is the hot path; the
    /// typed hypercalls ([`h_enter`](Self::h_enter), ...) are the checked API.
    #[inline]
    pub fn hcall(&self, vcpu: usize, opcode: u64, args: &[u64]) -> HcallResult {
        HcallResult::with_args(args, |regs| self.hcall_regs(vcpu, opcode, regs))
    }

    /// One PAPR hypercall with the guest's r4..r11 in `regs`, rewritten in place as the
    /// hardware hypercall ABI does (`gpr[4..]`): inputs are read from `regs`, outputs
    /// written back; registers a call does not write keep their values. Returns r3.
    ///
    /// This is the hot path of trace replay and of the simulator's vCPUs: no copy of
    /// the register block is made, each argument is read individually before any
    /// output is written. A `vcpu` at or past [`MAX_VCPUS`](revmap_rmap::MAX_VCPUS)
    /// returns H_PARAMETER with `regs` untouched.
    #[inline]
    pub fn hcall_regs(&self, vcpu: usize, opcode: u64, regs: &mut [u64; 8]) -> i64 {
        let r = match VcpuId::new(vcpu) {
            Ok(v) => self.call(v, opcode, regs),
            Err(_) => Err(PaprError::Parameter),
        };
        PaprError::code_of(r)
    }

    /// One hypercall of a checked vCPU, typed result: the one entry shared by the
    /// register-level and the typed API.
    #[inline(always)]
    pub(crate) fn call(
        &self,
        vcpu: VcpuId,
        opcode: u64,
        regs: &mut [u64; 8],
    ) -> Result<(), PaprError> {
        if is_resize_opcode(opcode) {
            // Like KVM's ioctls, resizing runs with this vCPU out of the guest.
            return self.resize_hcall(opcode, regs[0], regs[1]);
        }
        // Inside the gate for the whole call: a resize commit cannot pivot meanwhile.
        let in_guest = self.tables.enter_vcpu(vcpu);
        let slots = self.memslots.load();
        self.dispatch(in_guest.hpt(), &slots, opcode, regs)
    }

    /// Run one non-resize hypercall on a pinned table and memslot snapshot (the caller
    /// is inside the gate).
    #[inline(always)]
    pub(crate) fn dispatch(
        &self,
        hpt: &Hpt,
        slots: &Memslots,
        opcode: u64,
        regs: &mut [u64; 8],
    ) -> Result<(), PaprError> {
        // A pre-copy resize commit is tracking changes (`resize::track`): mark the
        // entries this call may have changed, after it ran (the flag cannot change
        // while we are inside the gate).
        #[cfg(feature = "std")]
        if self.track.tracking() {
            let args = *regs;
            let ret = self.dispatch_untracked(hpt, slots, opcode, regs);
            self.track
                .mark_hcall(opcode, &args, regs, PaprError::code_of(ret));
            return ret;
        }
        self.dispatch_untracked(hpt, slots, opcode, regs)
    }

    #[inline(always)]
    fn dispatch_untracked(
        &self,
        hpt: &Hpt,
        slots: &Memslots,
        opcode: u64,
        regs: &mut [u64; 8],
    ) -> Result<(), PaprError> {
        match opcode {
            H_ENTER => self.do_h_enter(hpt, slots, regs),
            H_REMOVE => {
                let (flags, ptex, avpn) = (regs[0], regs[1], regs[2]);
                self.do_h_remove(hpt, slots, flags, ptex, avpn, regs)
            }
            H_READ => {
                let (flags, ptex) = (regs[0], regs[1]);
                self.do_h_read(hpt, flags, ptex, regs)
            }
            H_PROTECT => self.do_h_protect(hpt, slots, regs[0], regs[1], regs[2]),
            H_BULK_REMOVE => self.do_h_bulk_remove(hpt, slots, regs),
            H_CLEAR_REF if self.flavour.has_clear_ref_mod() => {
                let ptex = regs[1];
                self.do_h_clear_rc(hpt, slots, HpteR::R, ptex, regs)
            }
            H_CLEAR_MOD if self.flavour.has_clear_ref_mod() => {
                let ptex = regs[1];
                self.do_h_clear_rc(hpt, slots, HpteR::C, ptex, regs)
            }
            _ => Err(PaprError::Function),
        }
    }

    #[cold]
    #[inline(never)]
    pub(crate) fn resize_hcall(
        &self,
        opcode: u64,
        flags: u64,
        shift: u64,
    ) -> Result<(), PaprError> {
        match &self.resizer {
            // The optional function set is absent: as an unknown hypercall.
            None => Err(PaprError::Function),
            Some(r) if opcode == H_RESIZE_HPT_PREPARE => r.prepare(self, flags, shift),
            Some(r) => r.commit(self, flags, shift),
        }
    }

    /// The memslot and 4K-frame count of the guest page an entry maps, decoded from
    /// dword 0 and the guest view of dword 1 (`revmap_for_hpte`).
    #[inline]
    pub fn entry_page(&self, v: u64, guest_r: u64) -> Option<(Gfn, u32)> {
        let s = self.flavour.page_shifts(HpteV(v), HpteR(guest_r))?;
        Some((
            Gfn(HpteR(guest_r).page_addr(s.actual) >> PAGE_SHIFT),
            s.actual,
        ))
    }

    /// H_ENTER (`kvmppc_do_h_enter`).
    fn do_h_enter(&self, hpt: &Hpt, slots: &Memslots, out: &mut [u64; 8]) -> Result<(), PaprError> {
        let (flags, ptex, pteh, ptel) = (out[0], out[1], out[2], out[3]);
        let f = self.flavour;
        let vin = HpteV(pteh);
        if f.rejects_reserved_segment_size() && vin.segment_size() >= 2 {
            return Err(PaprError::Parameter);
        }
        let Some(shifts) = f.page_shifts(vin, HpteR(ptel)) else {
            return Err(PaprError::Parameter);
        };
        let psize_mask = (1u64 << shifts.actual) - 1;
        let g_ptel = f.guest_rpte_of(ptel);
        let guest_valid = f.forces_valid() || vin.is_valid();
        let pteh = pteh & !(HpteV::HV_SW | HpteV::VALID);
        let seq = self.notifier.sample();
        let gfn = Gfn(HpteR(ptel).page_addr(shifts.actual) >> PAGE_SHIFT);
        let slot = slots
            .lookup(gfn)
            .filter(|s| !s.flags().contains(MemslotFlags::INVALID));

        // Build the real dword 0/1 and find the rmap to chain on (VALID entries only).
        let (mut v, mut r, rmap) = match slot {
            None => {
                if f.check_wimg(Target::Io, HpteR(ptel)) == WimgVerdict::Reject {
                    return Err(PaprError::Parameter);
                }
                if guest_valid {
                    // Emulated MMIO: ABSENT with storage key 31, no rmap.
                    (pteh | HpteV::ABSENT, g_ptel | HpteR::KEY, None)
                } else {
                    (pteh, g_ptel, None)
                }
            }
            Some(s) => {
                // `slot_is_aligned` and the backing page bound in one comparison.
                if shifts.actual > s.max_page_shift() {
                    return Err(PaprError::Parameter);
                }
                let wimg = f.check_wimg(Target::Ram, HpteR(ptel));
                if wimg == WimgVerdict::Reject {
                    return Err(PaprError::Parameter);
                }
                if !guest_valid {
                    (pteh, g_ptel, None)
                } else {
                    let r = g_ptel & (HpteR::KEY | HpteR::PP0 | psize_mask);
                    let pfn = if self.notifier.in_progress() {
                        None
                    } else {
                        s.host_pfn(gfn)
                    };
                    match pfn {
                        Some(pfn) => {
                            let mut r = HpteR(r | (pfn << PAGE_SHIFT));
                            if s.flags().contains(MemslotFlags::READONLY) && r.is_writable() {
                                r = r.make_readonly();
                            }
                            if wimg == WimgVerdict::ForceCacheable {
                                r = HpteR((r.0 & !(HpteR::W | HpteR::I | HpteR::G)) | HpteR::M);
                            }
                            (pteh | HpteV::VALID, r.0, s.rmap(gfn))
                        }
                        None => (pteh | HpteV::ABSENT, r & !HpteR::KEY, None),
                    }
                }
            }
        };

        let p = checked_ptex(hpt, ptex)?;
        let guard = if flags & H_EXACT != 0 {
            self.lock_free_exact(hpt, p)
        } else {
            self.lock_free_in_group(hpt, p)
        };
        let Some(guard) = guard else {
            return Err(PaprError::PtegFull);
        };
        let q = guard.ptex();
        hpt.mark_written(q);
        let rev = hpt.revmap();
        rev.set_guest_rpte(q.0, g_ptel);
        if let Some(rm) = rmap {
            let rg = rm.lock();
            if self.notifier.retry(seq) {
                v = (v & !HpteV::VALID) | HpteV::ABSENT;
                r &= !HpteR::KEY;
                drop(rg);
            } else {
                // Pre-set real R/C only where the rmap already records them (else hardware).
                let rc = rg.word().rc();
                rev.link(rg, q.0);
                r &= rc | !HpteR::RC;
            }
        }
        guard.set_r(r);
        guard.unlock_with(v);
        out[0] = u64::from(q.0);
        Ok(())
    }

    /// H_EXACT slot choice: lock `p` only if free, else H_PTEG_FULL (`None`).
    #[inline]
    fn lock_free_exact<'h>(&self, hpt: &'h Hpt, p: Ptex) -> Option<HpteGuard<'h>> {
        if let Some(g) = hpt.try_lock(p, HpteV::VALID | HpteV::ABSENT) {
            return Some(g);
        }
        let g = hpt.lock(p)?;
        if HpteV(g.v()).is_used() {
            return None;
        }
        Some(g)
    }

    /// Slot choice without H_EXACT: the first free slot of the PTEG of `p`. A first pass
    /// try-locks free-looking slots; if a slot was seen locked or a try-lock failed, a
    /// second pass locks each slot in turn (KVM's two passes). `None` = H_PTEG_FULL.
    #[inline]
    fn lock_free_in_group<'h>(&self, hpt: &'h Hpt, p: Ptex) -> Option<HpteGuard<'h>> {
        let base = p.0 & !7;
        let mut contended = false;
        for i in 0..8 {
            let q = Ptex(base + i);
            let v = hpt.slot(q)?.load_v();
            if v & (HpteV::VALID | HpteV::ABSENT) == 0 {
                match hpt.try_lock(q, HpteV::VALID | HpteV::ABSENT) {
                    Some(g) => return Some(g),
                    None => contended = true,
                }
            } else if v & HpteV::HVLOCK != 0 {
                contended = true;
            }
        }
        if !contended {
            return None;
        }
        for i in 0..8 {
            let g = hpt.lock(Ptex(base + i))?;
            if !HpteV(g.v()).is_used() {
                return Some(g);
            }
        }
        None
    }

    /// The H_REMOVE match test on a locked dword 0 (H_AVPN, H_ANDCOND;
    /// `kvmppc_do_h_remove`).
    #[inline(always)]
    fn remove_matches(&self, v: u64, flags: u64, avpn: u64) -> bool {
        HpteV(v).is_used()
            && (flags & H_AVPN == 0 || v & !HpteV::LOW7 == avpn)
            && (flags & H_ANDCOND == 0 || self.flavour.andcond_view(v) & avpn == 0)
    }

    /// Clear VALID in a locked HPTE and complete a tlbie (`kvmppc_invalidate_hpte`).
    /// `extra` bits (ABSENT) are set in dword 0 at the same time.
    #[inline]
    fn invalidate(&self, g: &mut HpteGuard<'_>, v: u64, extra: u64) {
        g.set_v((v & !HpteV::VALID) | extra);
        g.publish_v();
        self.tlb.tlbie();
    }

    /// `remove_revmap_chain`: merge the final hardware R/C into the guest view, unlink
    /// the entry from its chain, harvest R/C into the rmap word and C into the dirty
    /// bitmap. Caller holds the HPTE lock and has invalidated it. Returns the new guest
    /// view.
    pub fn remove_revmap_chain(
        &self,
        hpt: &Hpt,
        slots: &Memslots,
        p: Ptex,
        v: u64,
        hw_r: u64,
    ) -> u64 {
        let rev = hpt.revmap();
        let rcbits = hw_r & HpteR::RC;
        let gr = rev.guest_rpte(p.0) | rcbits;
        rev.set_guest_rpte(p.0, gr);
        let Some((gfn, shift)) = self.entry_page(v, gr) else {
            return gr;
        };
        let Some(slot) = slots.lookup(gfn) else {
            return gr;
        };
        if let Some(rm) = slot.rmap(gfn) {
            let mut rg = rm.lock();
            rev.unlink(&mut rg, p.0);
            rg.add_rc(rcbits);
            drop(rg);
            if rcbits & HpteR::C != 0 {
                slot.mark_dirty(gfn, 1 << (shift - PAGE_SHIFT));
            }
        }
        gr
    }

    /// Remove a locked, in-use HPTE (the body of `kvmppc_do_h_remove`): invalidate,
    /// unchain and harvest if VALID; zero both dwords; unlock. Returns the presented
    /// (old V, guest-view R).
    fn remove_locked(&self, hpt: &Hpt, slots: &Memslots, mut g: HpteGuard<'_>) -> (u64, u64) {
        let v = g.v();
        if v & HpteV::VALID != 0 {
            self.invalidate(&mut g, v, 0);
        }
        self.remove_invalidated(hpt, slots, g, v)
    }

    /// The rest of a removal once the HPTE is locked and, if it was VALID (`v`, the old
    /// dword 0), its VALID bit is cleared and the invalidation completed: R/C are read
    /// from dword 1 now (after the tlbie, so R/C are final), the entry leaves its chain,
    /// both dwords are zeroed and the lock is released.
    fn remove_invalidated(
        &self,
        hpt: &Hpt,
        slots: &Memslots,
        mut g: HpteGuard<'_>,
        v: u64,
    ) -> (u64, u64) {
        let p = g.ptex();
        let gr = if v & HpteV::VALID != 0 {
            let hw_r = g.r();
            self.remove_revmap_chain(hpt, slots, p, v, hw_r)
        } else {
            if HpteR(g.r()).is_key31() {
                // ORDERING: Relaxed: a generation counter for MMIO caches.
                self.mmio_update.fetch_add(1, Ordering::Relaxed);
            }
            hpt.revmap().guest_rpte(p.0)
        };
        g.set_r(0);
        g.set_v(0);
        drop(g);
        (self.flavour.present_v(v), self.flavour.present_r(gr))
    }

    /// H_REMOVE (`kvmppc_do_h_remove`).
    ///
    /// The match test runs on an unlocked snapshot of dword 0: a mismatch is answered
    /// H_NOT_FOUND without taking the lock (the snapshot was the entry's value at that
    /// instant). A match is locked with one `SeqCst` RMW that also clears VALID, so the
    /// lock, the match and the invalidation are one atomic step; the TLB shootdown then
    /// costs nothing when no vCPU MMU is attached (`tlbie_after_sc_rmw`).
    fn do_h_remove(
        &self,
        hpt: &Hpt,
        slots: &Memslots,
        flags: u64,
        ptex: u64,
        avpn: u64,
        out: &mut [u64; 8],
    ) -> Result<(), PaprError> {
        let p = checked_ptex(hpt, ptex)?;
        let slot = hpt.slot(p).ok_or(PaprError::Parameter)?;
        let (g, v) = loop {
            let v = slot.load_v();
            if v & HpteV::HVLOCK != 0 {
                hpt.wait_hpte_unlocked(p.0);
                continue;
            }
            if !self.remove_matches(v, flags, avpn) {
                return Err(PaprError::NotFound);
            }
            if let Some(g) = hpt.try_lock_replace(p, v, v & !HpteV::VALID) {
                break (g, v);
            }
        };
        if v & HpteV::VALID != 0 {
            self.tlb.tlbie_after_sc_rmw();
        }
        let (v, r) = self.remove_invalidated(hpt, slots, g, v);
        out[0] = v;
        out[1] = r;
        Ok(())
    }

    /// H_BULK_REMOVE (`kvmppc_h_bulk_remove`): up to four requests; VALID
    /// matches are collected locked with VALID cleared, one tlbie completes the batch,
    /// then each is unchained with its final R/C. Only the first lock of a batch spins.
    fn do_h_bulk_remove(
        &self,
        hpt: &Hpt,
        slots: &Memslots,
        out: &mut [u64; 8],
    ) -> Result<(), PaprError> {
        let f = self.flavour;
        let geo = hpt.geometry();
        let mut ret = Ok(());
        let mut i = 0;
        while i < H_BULK_REMOVE_MAX_BATCH && ret.is_ok() {
            let mut batch: [Option<(usize, u64, u64, HpteGuard<'_>)>; H_BULK_REMOVE_MAX_BATCH] =
                [const { None }; H_BULK_REMOVE_MAX_BATCH];
            let mut n = 0;
            while i < H_BULK_REMOVE_MAX_BATCH {
                let j = 2 * i;
                let tsh = BulkTsh(out[j]);
                let tsl = out[j + 1];
                match tsh.kind() {
                    BulkTsh::END => {
                        i = H_BULK_REMOVE_MAX_BATCH;
                        break;
                    }
                    BulkTsh::REQUEST => {}
                    _ => {
                        out[j] = f.bulk_bad_type_response(tsh.0);
                        ret = Err(PaprError::Parameter);
                        break;
                    }
                }
                let resp = BulkTsh::RESPONSE | (tsh.0 & (BulkTsh::FLAGS | BulkTsh::PTEX));
                let p = if tsh.flags() == BulkTsh::FLAGS {
                    None
                } else {
                    geo.ptex(tsh.ptex())
                };
                let Some(p) = p else {
                    out[j] = resp | BulkTsh::CODE_PARM;
                    ret = Err(PaprError::Parameter);
                    break;
                };
                let g = match hpt.try_lock(p, HpteV::HVLOCK) {
                    Some(g) => g,
                    None if n > 0 => break,
                    None => match hpt.lock(p) {
                        Some(g) => g,
                        None => {
                            out[j] = resp | BulkTsh::CODE_PARM;
                            ret = Err(PaprError::Parameter);
                            break;
                        }
                    },
                };
                let v = g.v();
                i += 1;
                if !self.remove_matches(v, tsh.hremove_flags(), tsl) {
                    drop(g);
                    out[j] = resp | BulkTsh::CODE_NOT_FOUND;
                    continue;
                }
                if v & HpteV::VALID == 0 {
                    let (_, gr) = self.remove_locked(hpt, slots, g);
                    out[j] = resp | f.bulk_rc_bits(gr);
                    continue;
                }
                let mut g = g;
                g.set_v(v & !HpteV::VALID);
                g.publish_v();
                if let Some(b) = batch.get_mut(n) {
                    *b = Some((j, resp, v, g));
                }
                n += 1;
            }
            if n == 0 {
                break;
            }
            self.tlb.tlbie();
            for (j, resp, v, g) in batch.iter_mut().filter_map(Option::take) {
                let hw_r = g.r();
                let gr = self.remove_revmap_chain(hpt, slots, g.ptex(), v, hw_r);
                g.set_r(0);
                g.unlock_with(0);
                if let Some(o) = out.get_mut(j) {
                    *o = resp | f.bulk_rc_bits(gr);
                }
            }
        }
        ret
    }

    /// H_PROTECT (`kvmppc_h_protect`).
    fn do_h_protect(
        &self,
        hpt: &Hpt,
        slots: &Memslots,
        flags: u64,
        ptex: u64,
        avpn: u64,
    ) -> Result<(), PaprError> {
        let mut g = lock_checked(hpt, ptex)?;
        let p = g.ptex();
        let v = g.v();
        if !HpteV(v).is_used() || (flags & H_AVPN != 0 && v & !HpteV::LOW7 != avpn) {
            return Err(PaprError::NotFound);
        }
        let bits = ((flags << 55) & HpteR::PP0)
            | ((flags << 48) & HpteR::KEY_HI)
            | (flags & (HpteR::PP | HpteR::N | HpteR::KEY_LO));
        let mask = HpteR::PROTECT_MASK;
        let rev = hpt.revmap();
        let gr = (rev.guest_rpte(p.0) & !mask) | bits;
        rev.set_guest_rpte(p.0, gr);
        let pte_r = g.r();
        if v & HpteV::VALID != 0 {
            let mut r = HpteR((pte_r & !mask) | bits);
            let was_ro = !HpteR(pte_r).is_writable();
            if r.is_writable() && was_ro && self.keeps_readonly(slots, v, gr) {
                r = r.make_readonly();
            }
            if r.0 != pte_r {
                self.invalidate(&mut g, v, HpteV::ABSENT);
                // Don't lose R/C set by hardware before the tlbie completed (KVM's H_PROTECT fix).
                let r = r.0 | (g.r() & HpteR::RC);
                g.set_r(r);
            }
        } else if HpteR(pte_r).is_key31() {
            // ORDERING: Relaxed: a generation counter for MMIO caches.
            self.mmio_update.fetch_add(1, Ordering::Relaxed);
        }
        g.unlock_with(v);
        Ok(())
    }

    /// Whether H_PROTECT must keep a read-only real HPTE read-only: always in the KVM
    /// flavour (the fault path upgrades it), and in the QEMU flavour only when the
    /// host mapping itself is read-only.
    fn keeps_readonly(&self, slots: &Memslots, v: u64, gr: u64) -> bool {
        if self.flavour.protect_keeps_real_readonly() {
            return true;
        }
        self.entry_page(v, gr)
            .and_then(|(gfn, _)| slots.lookup(gfn))
            .is_some_and(|s| s.flags().contains(MemslotFlags::READONLY))
    }

    /// H_READ (`kvmppc_h_read`): a lock-free read of one or (H_READ_4) four entries.
    fn do_h_read(
        &self,
        hpt: &Hpt,
        flags: u64,
        ptex: u64,
        out: &mut [u64; 8],
    ) -> Result<(), PaprError> {
        let f = self.flavour;
        let p = checked_ptex(hpt, ptex)?;
        let (start, n) = if flags & H_READ_4 != 0 {
            (p.0 & !3, 4)
        } else {
            (p.0, 1)
        };
        let rev = hpt.revmap();
        for (k, pair) in out.chunks_exact_mut(2).take(n).enumerate() {
            let q = Ptex(start + k as u32);
            let Some(slot) = hpt.slot(q) else {
                return Err(PaprError::Parameter);
            };
            let v = slot.load_v();
            let mut r = slot.load_r();
            if HpteV(v).is_used() {
                r = f.present_r(rev.guest_rpte(q.0) | (r & HpteR::RC));
            }
            // A never-written slot of a QEMU resize table reads 0, not 0x40.
            pair[0] = if HpteV(v).is_used() || !hpt.is_pristine(q) {
                f.present_v(v)
            } else {
                v
            };
            pair[1] = r;
        }
        Ok(())
    }

    /// H_CLEAR_REF and H_CLEAR_MOD (`kvmppc_h_clear_ref`, `kvmppc_h_clear_mod`, KVM
    /// flavour): clear `bit` (R or C) in the guest view and, for a VALID entry, in the
    /// real HPTE; return the guest view as it was (with the hardware R/C) in r4.
    fn do_h_clear_rc(
        &self,
        hpt: &Hpt,
        slots: &Memslots,
        bit: u64,
        ptex: u64,
        out: &mut [u64; 8],
    ) -> Result<(), PaprError> {
        let mut g = lock_checked(hpt, ptex)?;
        let p = g.ptex();
        let v = g.v();
        if !HpteV(v).is_used() {
            return Err(PaprError::NotFound);
        }
        let rev = hpt.revmap();
        let mut gr = rev.guest_rpte(p.0);
        if gr & bit != 0 {
            rev.set_guest_rpte(p.0, gr & !bit);
        }
        if v & HpteV::VALID != 0 {
            gr = if bit == HpteR::R {
                self.clear_ref_valid(&g, slots, v, gr)
            } else {
                self.clear_mod_valid(&mut g, slots, v, gr)
            };
        }
        out[0] = self.flavour.present_r(gr);
        g.unlock_with(v);
        Ok(())
    }

    /// H_CLEAR_REF on a locked VALID entry: clear R in the real HPTE, keeping the
    /// reference for host aging. Returns `gr` with the final hardware R/C.
    fn clear_ref_valid(&self, g: &HpteGuard<'_>, slots: &Memslots, v: u64, gr: u64) -> u64 {
        let r = g.r();
        let mut gr = gr | (r & HpteR::RC);
        if r & HpteR::R != 0 {
            // Clear R without disturbing a concurrent hardware C update, then flush.
            gr |= g.r_fetch_and_not(HpteR::R) & HpteR::RC;
            self.tlb.tlbie();
            // Keep the reference for host aging (KVMPPC_RMAP_REFERENCED).
            if let Some((gfn, _)) = self.entry_page(v, gr) {
                if let Some(rm) = slots.lookup(gfn).and_then(|s| s.rmap(gfn)) {
                    rm.lock().add_rc(HpteR::R);
                }
            }
        }
        gr
    }

    /// H_CLEAR_MOD on a locked VALID entry: clear C in the real HPTE (made temporarily
    /// absent so that C is stable after the tlbie), moving it to the dirty bitmap.
    /// Returns `gr` with the final hardware R/C.
    fn clear_mod_valid(&self, g: &mut HpteGuard<'_>, slots: &Memslots, v: u64, gr: u64) -> u64 {
        self.invalidate(g, v, HpteV::ABSENT);
        let r = g.r();
        let gr = gr | (r & HpteR::RC);
        if r & HpteR::C != 0 {
            g.set_r(r & !HpteR::C);
            if let Some((gfn, shift)) = self.entry_page(v, gr) {
                if let Some(s) = slots.lookup(gfn) {
                    s.mark_dirty(gfn, 1 << (shift - PAGE_SHIFT));
                }
            }
        }
        gr
    }
}
