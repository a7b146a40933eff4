//! The host side, part 2: MMU-notifier callbacks on host virtual address ranges and
//! their per-memslot gfn walkers (KVM's `kvm_unmap_gfn_range_hv`, `kvm_unmap_rmapp`,
//! `kvmppc_unmap_hpte`, `kvm_age_rmapp`, under its HPTE-then-rmap lock order).
//!
//! # Protocol
//!
//! * [`Vm::invalidate_range_start`] / [`Vm::invalidate_range_end`] drive the
//!   [`InvalidateSeq`](crate::tlb::InvalidateSeq) (in-progress count, then sequence
//!   bump); start also unmaps the range, as KVM's notifier does. H_ENTER and the fault
//!   path sample the sequence before translating gfn -> host page and re-check it under
//!   the rmap lock, so an inserter racing an invalidation either is seen on the chain by
//!   the walker or backs off (no HPTE turns VALID after an invalidation it raced). For
//!   that the walker **locks every rmap of the range** (no lock-free PRESENT peek: the
//!   peek and the inserter's check would be a store-buffer race).
//! * Unmapping one HPTE (`kvmppc_unmap_hpte`): with the HPTE and rmap locks held and the
//!   entry unlinked, set ABSENT (VALID cleared), tlbie, then read dword 1 (R/C are final
//!   only after the tlbie), clear the storage key (a paged-out entry never looks like
//!   MMIO key 31: KVM's "Clear the key field of HPTE when the page is paged out"),
//!   harvest R/C into the rmap word, C into the dirty bitmap over every 4 KiB frame of
//!   the page (a huge page dirties all its base pages) and new R/C into `guest_rpte`
//!   (no R/C bit is lost).
//! * Large pages are chained at their base frame: a range is widened down to the slot's
//!   largest mappable page so that every HPTE covering a frame of the range is found;
//!   HPTEs based below the range are unmapped only if they cover part of it.
//! * Walkers start from rmaps and so follow the restart rule (`Rmap::drain_locked`,
//!   `Rmap::for_each_locked`, and the covering walker below): they only try-lock HPTEs.
//! * Aging (`kvm_age_rmapp`): REFERENCED in the rmap word is consumed; R is cleared in
//!   every covering VALID HPTE that has it (tlbie after), and kept in `guest_rpte`.

use crate::hpte::{HpteR, HpteV};
use crate::table::{Hpt, HpteGuard};
use crate::vm::Vm;
use revmap_host::slots::SlotsRef;
use revmap_host::Memslot;
use revmap_rmap::{Gfn, HpteLocks, Hva, Ptex, Rmap, RmapGuard, SlotId, Visit, PAGE_SHIFT};

/// Frames `[lo, hi)` of `slot` widened outward to whole host backing pages.
fn widen_to_backing(slot: &Memslot, lo: Gfn, hi: Gfn) -> (Gfn, Gfn) {
    let fpb = 1u64 << (slot.backing_page_shift() - PAGE_SHIFT);
    let lo = Gfn(lo.0 & !(fpb - 1)).max(slot.base_gfn());
    let hi = Gfn(hi.0.div_ceil(fpb).saturating_mul(fpb)).min(slot.end_gfn());
    (lo, hi)
}

/// Widen `[lo, hi)` to whole backing pages ([`widen_to_backing`]) and set the host-present
/// bit of each backing page to `present`; returns the widened range.
fn set_backing_present(slot: &Memslot, lo: Gfn, hi: Gfn, present: bool) -> (Gfn, Gfn) {
    let (lo, hi) = widen_to_backing(slot, lo, hi);
    let step = 1usize << (slot.backing_page_shift() - PAGE_SHIFT);
    for g in (lo.0..hi.0).step_by(step) {
        slot.set_host_present(Gfn(g), present);
    }
    (lo, hi)
}

impl Vm {
    /// MMU-notifier `invalidate_range_start` on host range `[start, end)`: count an
    /// invalidation in progress (inserters back off until the matching end), then unmap
    /// every HPTE of every slot backed by the range.
    pub fn invalidate_range_start(&self, start: Hva, end: Hva) {
        self.invalidate_seq().begin();
        let acc = self.host_access();
        let slots = self.memslots();
        for s in slots.iter() {
            if let Some((lo, hi)) = s.hva_range_to_gfns(start, end) {
                self.unmap_slot_range(acc.hpt(), s, lo, hi);
            }
        }
    }

    /// MMU-notifier `invalidate_range_end`: bump the sequence and drop the in-progress
    /// count (inserters that sampled before the start now retry).
    pub fn invalidate_range_end(&self, start: Hva, end: Hva) {
        let _ = (start, end); // PPC's retry check is VM-wide, not per range.
        self.invalidate_seq().end();
    }

    /// Host reclaim of `[start, end)`, widened to whole host backing pages: start an
    /// invalidation, mark the host pages not present, unmap every HPTE of every slot
    /// backed by them (ABSENT, off-chain, R/C harvested), end. Returns HPTEs unmapped.
    pub fn unmap_hva_range(&self, start: Hva, end: Hva) -> u64 {
        self.invalidate_seq().begin();
        let mut n = 0;
        {
            let acc = self.host_access();
            let slots = self.memslots();
            for s in slots.iter() {
                let Some((lo, hi)) = s.hva_range_to_gfns(start, end) else {
                    continue;
                };
                let (lo, hi) = set_backing_present(s, lo, hi, false);
                n += self.unmap_slot_range(acc.hpt(), s, lo, hi);
            }
        }
        self.invalidate_seq().end();
        n
    }

    /// The host PTE of the page holding `hva` changed (`change_pte`: COW break, page
    /// migration): inside an invalidation, unmap every HPTE of that host page in every
    /// slot backed by it and record whether the host page is now `present`.
    pub fn change_pte(&self, hva: Hva, present: bool) {
        self.invalidate_seq().begin();
        {
            let acc = self.host_access();
            let slots = self.memslots();
            for s in slots.iter() {
                let Some(gfn) = s.hva_to_gfn(hva) else {
                    continue;
                };
                let (lo, hi) = widen_to_backing(s, gfn, Gfn(gfn.0 + 1));
                s.set_host_present(gfn, present);
                self.unmap_slot_range(acc.hpt(), s, lo, hi);
            }
        }
        self.invalidate_seq().end();
    }

    /// The host pages backing `[start, end)` became present again (the host faulted
    /// them in). No invalidation: making a page present never stales a mapping.
    pub fn host_page_in(&self, start: Hva, end: Hva) {
        let slots = self.memslots();
        Self::host_page_in_slots(&slots, start, end);
    }

    pub(crate) fn host_page_in_slots(slots: &SlotsRef, start: Hva, end: Hva) {
        for s in slots.iter() {
            let Some((lo, hi)) = s.hva_range_to_gfns(start, end) else {
                continue;
            };
            set_backing_present(s, lo, hi, true);
        }
    }

    /// `kvm_unmap_gfn_range` for frames `[start, end)` of slot `slot`: every HPTE
    /// covering a frame of the range becomes ABSENT and leaves its chain, R/C harvested.
    /// The arch hook only: callers that take host pages away bracket it with
    /// [`invalidate_range_start`](Self::invalidate_range_start)/`end` (as
    /// [`unmap_hva_range`](Self::unmap_hva_range) does). Returns HPTEs unmapped.
    pub fn unmap_gfn_range(&self, slot: SlotId, start: Gfn, end: Gfn) -> u64 {
        let acc = self.host_access();
        let slots = self.memslots();
        match slots.get(slot) {
            Some(s) => self.unmap_slot_range(acc.hpt(), s, start, end),
            None => 0,
        }
    }

    /// `kvm_age_gfn`: test and clear "referenced" for frames `[start, end)` of `slot`.
    /// True if any frame's rmap word had REFERENCED or any covering VALID HPTE had R.
    pub fn age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool {
        self.age_range(slot, start, end, false)
    }

    /// `kvm_test_age_gfn`: like [`age_gfn`](Self::age_gfn) but changes nothing.
    pub fn test_age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool {
        self.age_range(slot, start, end, true)
    }

    /// Shared body of [`age_gfn`](Self::age_gfn) (clears R; every frame visited) and
    /// [`test_age_gfn`](Self::test_age_gfn) (`test_only`: changes nothing and stops testing
    /// once one frame is young).
    fn age_range(&self, slot: SlotId, start: Gfn, end: Gfn, test_only: bool) -> bool {
        let slots = self.memslots();
        let Some(s) = slots.get(slot) else {
            return false;
        };
        let acc = self.host_access();
        let mut young = false;
        self.for_range(s, start, end, |gfn, rm, from| {
            if test_only {
                young = young || self.test_age_rmap(acc.hpt(), gfn, rm, from);
            } else {
                young |= self.age_rmap(acc.hpt(), gfn, rm, from);
            }
        });
        young
    }

    /// Call `f(gfn, rmap, start)` for every frame of `slot` whose chain may hold an HPTE
    /// covering part of `[start, end)` (the range widened down to the slot's largest
    /// mappable page), in frame order.
    fn for_range(&self, s: &Memslot, start: Gfn, end: Gfn, mut f: impl FnMut(Gfn, &Rmap, Gfn)) {
        let start = start.max(s.base_gfn());
        let end = end.min(s.end_gfn());
        if start >= end {
            return;
        }
        let frames = 1u64 << (s.max_page_shift() - PAGE_SHIFT);
        let lo = Gfn(start.0 & !(frames - 1)).max(s.base_gfn());
        let base = s.base_gfn().0;
        let rmaps = s.rmaps();
        let (a, b) = ((lo.0 - base) as usize, (end.0 - base) as usize);
        if let Some(rs) = rmaps.get(a..b) {
            for (k, rm) in rs.iter().enumerate() {
                f(Gfn(lo.0 + k as u64), rm, start);
            }
        }
    }

    /// Unmap every HPTE covering a frame of `[start, end)` of `s`. Returns the count.
    pub fn unmap_slot_range(&self, hpt: &Hpt, s: &Memslot, start: Gfn, end: Gfn) -> u64 {
        let mut n = 0;
        self.for_range(s, start, end, |gfn, rm, from| {
            n += if gfn >= from {
                self.unmap_rmap(hpt, s, gfn, rm)
            } else {
                self.unmap_rmap_covering(hpt, s, gfn, rm, from)
            };
        });
        n
    }

    /// Unmap every HPTE on the rings of `s`, skipping a ring that a lock-free load finds
    /// empty instead of taking its lock (most rings of a whole slot are empty: the walk
    /// then costs a load per frame). Returns the count.
    ///
    /// Only for a caller that learns by other means of every entry linked after the walk
    /// starts: the pre-copy resize commit, whose change tracking, switched on with the
    /// vCPU gate closed and drained before this walk, marks every entry a hypercall or a
    /// fault makes VALID meanwhile, and whose later rounds unmap those. The drained gate
    /// (its Acquire of every vCPU's Release on leaving) makes every link made before it
    /// visible to the load. A host unmap must use [`unmap_slot_range`](Self::unmap_slot_range):
    /// taking the rmap lock is what orders it against H_ENTER's re-check of the
    /// invalidation under that lock; with a lock-free load an H_ENTER inside its critical
    /// section could link an entry over a page being unmapped.
    pub fn unmap_slot_rings_tracked(&self, hpt: &Hpt, s: &Memslot) -> u64 {
        let base = s.base_gfn().0;
        let mut n = 0;
        for (k, rm) in s.rmaps().iter().enumerate() {
            if rm.load().head().is_some() {
                n += self.unmap_rmap(hpt, s, Gfn(base + k as u64), rm);
            }
        }
        n
    }

    /// `kvm_unmap_rmapp`: unmap every member of frame `gfn`'s chain.
    pub(crate) fn unmap_rmap(&self, hpt: &Hpt, s: &Memslot, gfn: Gfn, rm: &Rmap) -> u64 {
        let rev = hpt.revmap();
        rm.drain_locked(rev, hpt, |g, _p, h| self.unmap_hpte(hpt, s, gfn, g, h)) as u64
    }

    /// Unmap the members of frame `gfn`'s chain (gfn below `from`) whose page reaches
    /// `from`. A selective drain with the restart rule: find a member under the rmap
    /// lock, try-lock it, or drop the rmap lock, wait and start over.
    fn unmap_rmap_covering(&self, hpt: &Hpt, s: &Memslot, gfn: Gfn, rm: &Rmap, from: Gfn) -> u64 {
        let rev = hpt.revmap();
        let mut n = 0;
        loop {
            let mut g = rm.lock();
            let target = rev.iter(&g).find(|&p| self.covers(hpt, p, from));
            let Some(p) = target else {
                return n;
            };
            match hpt.try_lock(Ptex(p), HpteV::HVLOCK) {
                Some(h) => {
                    rev.unlink(&mut g, p);
                    self.unmap_hpte(hpt, s, gfn, &mut g, h);
                    n += 1;
                }
                None => {
                    drop(g);
                    hpt.wait_hpte_unlocked(p);
                }
            }
        }
    }

    /// Whether chain member `p` (read under its rmap lock) maps a page reaching frame
    /// `from` or beyond. Its page size cannot change while it is chained.
    fn covers(&self, hpt: &Hpt, p: u32, from: Gfn) -> bool {
        let v = hpt.slot(Ptex(p)).map_or(0, |e| e.load_v());
        let gr = hpt.revmap().guest_rpte(p);
        self.entry_page(v, gr)
            .is_some_and(|(b, shift)| b.0 + (1u64 << (shift - PAGE_SHIFT)) > from.0)
    }

    /// `kvmppc_unmap_hpte`, with both locks held and the entry already unlinked.
    fn unmap_hpte(
        &self,
        hpt: &Hpt,
        s: &Memslot,
        gfn: Gfn,
        rg: &mut RmapGuard<'_>,
        mut h: HpteGuard<'_>,
    ) {
        let p = h.ptex();
        let v = h.v();
        if v & HpteV::VALID == 0 {
            // Chain members are VALID at rest; nothing to invalidate.
            return;
        }
        let rev = hpt.revmap();
        let gr = rev.guest_rpte(p.0);
        let absent = (v & !HpteV::VALID) | HpteV::ABSENT;
        h.set_v(absent);
        h.publish_v();
        self.tlb().tlbie();
        // Final R/C: read after the tlbie that stabilises them.
        let r = h.r();
        h.set_r(r & !HpteR::KEY);
        let rc = r & HpteR::RC;
        rg.add_rc(rc);
        if rc & HpteR::C != 0 {
            let shift = self.entry_page(v, gr).map_or(PAGE_SHIFT, |(_, sh)| sh);
            s.mark_dirty(gfn, 1 << (shift - PAGE_SHIFT));
        }
        if rc & !gr != 0 {
            rev.set_guest_rpte(p.0, gr | rc);
        }
        h.unlock_with(absent);
    }

    /// `kvm_age_rmapp` for one frame's chain (members based below `from` count only if
    /// they reach it).
    fn age_rmap(&self, hpt: &Hpt, gfn: Gfn, rm: &Rmap, from: Gfn) -> bool {
        let w = rm.load();
        if !w.is_present() && !w.referenced() {
            return false;
        }
        let mut young = false;
        if gfn >= from && w.referenced() {
            young |= rm.lock().take_rc(HpteR::R) != 0;
        }
        if !w.is_present() {
            return young;
        }
        let rev = hpt.revmap();
        rm.for_each_locked(rev, hpt, |_g, p, h| {
            let v = h.v();
            if v & HpteV::VALID == 0 || h.r() & HpteR::R == 0 || !self.covers(hpt, p, from) {
                return Visit::Continue;
            }
            // `kvmppc_clear_ref_hpte`: clear R without losing a concurrent C, flush.
            h.r_fetch_and_not(HpteR::R);
            self.tlb().tlbie();
            let gr = rev.guest_rpte(p);
            rev.set_guest_rpte(p, gr | HpteR::R);
            young = true;
            Visit::Continue
        });
        young
    }

    /// `kvm_test_age_rmapp`: REFERENCED, or any covering VALID chain member with R set
    /// (read without its HPTE lock). Modifies nothing.
    fn test_age_rmap(&self, hpt: &Hpt, gfn: Gfn, rm: &Rmap, from: Gfn) -> bool {
        let w = rm.load();
        if gfn >= from && w.referenced() {
            return true;
        }
        if !w.is_present() {
            return false;
        }
        let g = rm.lock();
        if gfn >= from && g.word().referenced() {
            return true;
        }
        let young = hpt.revmap().iter(&g).any(|p| {
            hpt.slot(Ptex(p))
                .is_some_and(|e| e.load_v() & HpteV::VALID != 0 && e.load_r() & HpteR::R != 0)
                && self.covers(hpt, p, from)
        });
        drop(g);
        young
    }
}
