//! The host side, part 4: the hypervisor fault path for vCPU translations that hit an
//! ABSENT entry (page-in) or a store to a read-only real mapping the guest may write
//! (write upgrade): KVM's `kvmppc_book3s_hv_page_fault`, with the fixes "Clear the key
//! field of HPTE when the page is paged out" and "Fix exclusion between HPT resizing and
//! other HPT updates".
//!
//! # Page-in of an ABSENT entry
//!
//! 1. Register the fault (`mmu_ready` handshake) and load the memslot snapshot for the
//!    whole fault (SRCU read side).
//! 2. Lock the HPTE, snapshot (dword 0, dword 1, `guest_rpte`), unlock. Not ABSENT any
//!    more: raced, retry the access.
//! 3. The guest frame has no memslot, or an INVALID one: emulated MMIO (never paged in; a
//!    paged-out entry's key was cleared). A paged-out entry of guest key 31 is RAM: the
//!    decision is the memslot's, and the key of paged-out entries is cleared anyway.
//! 4. Sample the invalidation sequence, make the host page present (`host_page_in`),
//!    translate gfn -> host page (none while an invalidation runs: retry).
//! 5. Build the real dword 1 exactly as H_ENTER does (guest bits below the page size,
//!    key, PP0, host address; WIMG and read-only host rules).
//! 6. Lock the HPTE: `mmu_ready` cleared -> not ready; entry changed -> retry. Lock the
//!    rmap of the page's base frame: invalidation raced -> retry. Pre-set R/C only where
//!    the rmap word has them (else hardware sets them), link (unlocks the rmap), write
//!    dword 1, unlock the HPTE writing VALID.
//!
//! # Write upgrade
//!
//! The KVM flavour's H_PROTECT never makes a real HPTE writable; a store through such an
//! entry faults, and if the guest's own view allows the write (and the slot is not
//! read-only) the entry is made writable: set ABSENT, tlbie, carry hardware R/C, write
//! the guest's PP, unlock VALID. The entry stays on its chain.

use crate::flavour::{Target, WimgVerdict};
use crate::hpte::{HpteR, HpteV};
use crate::mmu::{Access, Fault};
use crate::vm::Vm;
use revmap_host::MemslotFlags;
use revmap_rmap::{Gpa, Hva, Ptex, PAGE_SHIFT};

/// What the hypervisor's fault path decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// Resolved, or raced with another change: retry the access.
    Retry,
    /// Emulated MMIO at this guest physical address (the page base).
    Mmio {
        /// Guest physical address of the page.
        gpa: Gpa,
    },
    /// The guest must handle it (DSI/ISI reflected): no mapping, or the guest's own
    /// permissions deny the access.
    NoMapping,
    /// `mmu_ready` is clear (resize, reset): the vCPU cannot run now.
    NotReady,
}

impl Vm {
    /// The hypervisor fault path for a failed translation of vCPU `vcpu`: page in an
    /// ABSENT entry, upgrade a guest-writable read-only mapping on a store, report MMIO
    /// or reflect the fault to the guest. See the module docs for the protocol.
    pub fn page_fault(&self, vcpu: usize, fault: &Fault, access: Access) -> FaultOutcome {
        let _ = vcpu; // the per-vCPU MMIO cache is not modelled
        match *fault {
            Fault::NoHpte => FaultOutcome::NoMapping,
            Fault::Absent { ptex, .. } => self.fault_page_in(ptex),
            Fault::Protection { ptex } if access == Access::Store => self.fault_write_upgrade(ptex),
            Fault::Protection { .. } => FaultOutcome::NoMapping,
        }
    }

    /// What a host-side fault holds for its whole run, or `None` while the host MMU
    /// is not ready (the fault is refused).
    fn fault_scope(&self, p: Ptex) -> Option<FaultScope<'_>> {
        let ticket = self.enter_fault()?;
        #[cfg(not(feature = "std"))]
        let _ = p;
        Some(FaultScope {
            #[cfg(feature = "std")]
            _track: self.track.track_on_exit(p),
            // Inside the gate for the whole fault: it runs on one table.
            acc: self.host_access(),
            _ticket: ticket,
        })
    }

    fn fault_page_in(&self, p: Ptex) -> FaultOutcome {
        let Some(scope) = self.fault_scope(p) else {
            return FaultOutcome::NotReady;
        };
        let hpt = scope.acc.hpt();
        let slots = self.memslots();
        let rev = hpt.revmap();
        let Some(g) = hpt.lock(p) else {
            return FaultOutcome::NoMapping;
        };
        let (v, r, gr) = (g.v(), g.r(), rev.guest_rpte(p.0));
        drop(g);
        if v & HpteV::ABSENT == 0 {
            return FaultOutcome::Retry;
        }
        let Some((gfn, shift)) = self.entry_page(v, gr) else {
            return FaultOutcome::NoMapping;
        };
        let Some(s) = slots.lookup(gfn).filter(|s| !s.is_invalid()) else {
            return FaultOutcome::Mmio { gpa: gfn.gpa() };
        };
        if shift > s.backing_page_shift() || !s.is_aligned_for(shift) {
            return FaultOutcome::NoMapping;
        }
        let wimg = self.flavour().check_wimg(Target::Ram, HpteR(gr));
        if wimg == WimgVerdict::Reject {
            return FaultOutcome::NoMapping;
        }
        let seq = self.invalidate_seq().sample();
        if !s.is_host_present(gfn) {
            if let Some(hva) = s.gfn_to_hva(gfn) {
                let end = Hva(hva.0 + (1 << PAGE_SHIFT));
                Self::host_page_in_slots(&slots, hva, end);
            }
        }
        let pfn = if self.invalidate_seq().in_progress() {
            None
        } else {
            s.host_pfn(gfn)
        };
        let Some(pfn) = pfn else {
            return FaultOutcome::Retry;
        };
        let psize_mask = (1u64 << shift) - 1;
        let mut nr = HpteR((gr & (HpteR::KEY | HpteR::PP0 | psize_mask)) | (pfn << PAGE_SHIFT));
        if s.flags().contains(MemslotFlags::READONLY) && nr.is_writable() {
            nr = nr.make_readonly();
        }
        if wimg == WimgVerdict::ForceCacheable {
            nr = HpteR((nr.0 & !(HpteR::W | HpteR::I | HpteR::G)) | HpteR::M);
        }
        let Some(rm) = s.rmap(gfn) else {
            return FaultOutcome::NoMapping;
        };

        let Some(g) = hpt.lock(p) else {
            return FaultOutcome::NoMapping;
        };
        if !self.host_mmu_ready() {
            return FaultOutcome::NotReady;
        }
        if g.v() != v || g.r() != r || rev.guest_rpte(p.0) != gr {
            return FaultOutcome::Retry;
        }
        let rg = rm.lock();
        if self.invalidate_seq().retry(seq) {
            return FaultOutcome::Retry;
        }
        let rc = rg.word().rc();
        rev.link(rg, p.0);
        g.set_r(nr.0 & (rc | !HpteR::RC));
        g.unlock_with((v & !HpteV::ABSENT) | HpteV::VALID);
        FaultOutcome::Retry
    }

    fn fault_write_upgrade(&self, p: Ptex) -> FaultOutcome {
        let Some(scope) = self.fault_scope(p) else {
            return FaultOutcome::NotReady;
        };
        let hpt = scope.acc.hpt();
        let slots = self.memslots();
        let rev = hpt.revmap();
        let seq = self.invalidate_seq().sample();
        let Some(mut g) = hpt.lock(p) else {
            return FaultOutcome::NoMapping;
        };
        let v = g.v();
        if v & HpteV::VALID == 0 || HpteR(g.r()).is_writable() {
            // Removed, paged out or already upgraded: retry the access.
            return FaultOutcome::Retry;
        }
        let gr = rev.guest_rpte(p.0);
        if !HpteR(gr).is_writable() {
            return FaultOutcome::NoMapping;
        }
        let Some((gfn, _)) = self.entry_page(v, gr) else {
            return FaultOutcome::NoMapping;
        };
        let Some(s) = slots.lookup(gfn) else {
            return FaultOutcome::NoMapping;
        };
        if s.flags().contains(MemslotFlags::READONLY) {
            // A store to a read-only memslot exits to userspace as MMIO (KVM).
            return FaultOutcome::Mmio { gpa: gfn.gpa() };
        }
        if !self.host_mmu_ready() {
            return FaultOutcome::NotReady;
        }
        if let Some(rm) = s.rmap(gfn) {
            let rg = rm.lock();
            let raced = self.invalidate_seq().retry(seq);
            drop(rg);
            if raced {
                return FaultOutcome::Retry;
            }
        }
        g.set_v((v & !HpteV::VALID) | HpteV::ABSENT);
        g.publish_v();
        self.tlb().tlbie();
        let hw = g.r();
        let pp = HpteR::PP0 | HpteR::PP;
        g.set_r((hw & !pp) | (gr & pp));
        g.unlock_with(v);
        FaultOutcome::Retry
    }
}

/// The guards of one host-side fault, dropped in field order: the pre-copy tracking of
/// the entry records the change while the fault is still inside the table gate, then
/// the gate is left, then the fault ticket of the `mmu_ready` handshake is returned
/// (releasing everything the fault wrote).
struct FaultScope<'a> {
    #[cfg(feature = "std")]
    _track: crate::resize::track::TrackOnExit<'a>,
    acc: crate::resize::cell::HostAccess<'a>,
    _ticket: crate::host::FaultTicket<'a>,
}
