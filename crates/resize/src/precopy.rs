//! The pre-copy commit ([`ResizeMode::PreCopy`](super::ResizeMode), beyond KVM): the
//! vCPUs are stopped only for what changed since the copy.
//!
//! # Design
//!
//! The committer holds `mmu_setup_lock` throughout (no second commit, no PREPARE can
//! replace the table it fills) and `slots_lock` (no memslot change, so no MMIO
//! reclassification of paged-out entries, until it is over), and runs outside the gate.
//!
//! 0. **Tracking on (gate closed, O(1)).** Close and drain the gate, switch change
//!    tracking on, reopen: no work is done while closed. From then on every hypercall
//!    marks, after it ran and still inside the gate, each HPTE it may have changed
//!    (`Vm::dispatch`: the index H_ENTER returned, the `ptex` of H_REMOVE, H_PROTECT,
//!    H_CLEAR_REF/MOD, the four of H_BULK_REMOVE) and the fault path marks the entry it
//!    faulted on, in a per-HPTE bitmap. The flag only changes with the gate closed, so
//!    it is constant during any call, and a vCPU re-entering the gate after the reopen
//!    (a `SeqCst` load of the state word) sees it set.
//! 1. **Drain (gate open).** Every VALID entry leaves its rmap ring through the host's
//!    own `kvm_unmap_gfn_range` walker over every memslot (ABSENT, tlbie, R/C harvested
//!    into guest_rpte, the rmap word and the dirty bitmap: no R/C bit is lost). A host
//!    page-out may do this at any time, so the guest cannot see it. Rings found empty
//!    by a lock-free load are skipped (`Vm::unmap_slot_rings_tracked`): an entry
//!    linked after the walk looked is marked by the tracking of step 0.
//! 2. **Copy (gate open).** Every bolted, non-VALID entry is snapshotted under its HPTE
//!    lock (dword 0, dword 1, guest_rpte) and written to its rehashed index in the new,
//!    inactive table without taking the new entry's lock (the committer holds that
//!    table `&mut` until the install: `Hpt::place_unshared`), and not yet marked
//!    written in QEMU's pristine bitmap, so a withdrawn copy reads back as never
//!    written; a bolted/bolted collision is only noted.
//!    VALID entries are listed for step 4.
//! 3. **Re-copy rounds (gate open).** Take the bitmap (a fresh one continues
//!    tracking) and bring each marked HPTE up to date: a VALID one is unmapped through
//!    its ring as in step 1 (listed for step 4 if it has none), a changed bolted copy
//!    is withdrawn and placed again. Rounds repeat until one takes at most
//!    `FINAL_ROUND_SLOTS` marked slots (or `MAX_ROUNDS`), like a live migration's
//!    pre-copy. The criterion is the marks, not the slots that had changed: step 4
//!    revisits every slot marked since the last round, changed or not, so the pause
//!    is proportional to the marks the vCPUs made while the last round ran, and a
//!    round converges only once it is short.
//! 4. **Commit (gate closed and drained).** Tracking off; the candidates are the marked
//!    HPTEs of the last window, the listed VALID ones and the copies that could not be
//!    placed. Each is compared with its copy: VALID -> unmapped as in the stop-the-world
//!    transfer; changed -> copy withdrawn, placed again if bolted; a collision that
//!    remains fails the commit with H_PTEG_FULL (the new table is freed, the old one
//!    stays active with the guest-visible contents it had: only ABSENT transitions, as a
//!    host page-out, happened to it: a failed rehash leaves the old table consistent, as
//!    the guest sees it). Then pivot (reopens the gate) and a full tlbie.
//!
//! The pause ([`ResizeCtl::last_pause_ns`](super::ResizeCtl::last_pause_ns)) is the
//! sum of the two gate-closed intervals, steps 0 and 4.
//!
//! # Invariants
//!
//! * Completeness: an HPTE whose words at step 4 differ from its copy (or that is
//!   VALID, or bolted without a copy) is a candidate. Changes before step 0 are seen
//!   by step 2's scan; after it, every change is made by a hypercall or a fault (marked
//!   after the change, inside the gate, so a round that takes the bitmap after the mark
//!   sees the change, and step 4 sees every mark) or by a host walker, which only
//!   touches VALID entries (listed or marked when they became VALID).
//! * At every quiescent point the current table satisfies the whole-VM checker: the new
//!   table is unreachable until the pivot, and the old one is only changed by host
//!   walkers and vCPUs.
//! * After step 4 no old entry is VALID or on a ring, and the new table holds exactly
//!   the bolted entries of the old table at the moment the gate closed, with the words
//!   stop-the-world would have written (`tests/resize_modes.rs`).

use super::rehash::rehash_index;
use super::state::{elapsed_ns, Op, PrecopyHold, Prepared};
use super::ResizeError;
use crate::flavour::ResizeFlavour;
use alloc::vec::Vec;
use revmap_host::Memslots;
use revmap_hpt::hcall::H_SUCCESS;
use revmap_hpt::hpte::{HpteR, HpteV};
use revmap_hpt::table::Hpt;
use revmap_rmap::{Gfn, Ptex, PAGE_SHIFT};

/// A bolted entry copied in step 2.
#[derive(Debug, Clone, Copy)]
struct Copied {
    old: Ptex,
    new: Ptex,
    v: u64,
    r: u64,
    gr: u64,
    /// The snapshot was a bolted entry (false: the entry was removed or changed
    /// into a non-bolted one by a re-copy round; the record keeps its words).
    bolted: bool,
    /// Written to the new table (false: its slot was taken; retried in step 3).
    placed: bool,
}

/// Re-copy rounds at most, before stopping whatever remains.
const MAX_ROUNDS: usize = 16;
/// Stop re-copying once a round took at most this many marked slots.
const FINAL_ROUND_SLOTS: u32 = 256;

/// A bolted entry to place in step 3.
#[derive(Debug, Clone, Copy)]
struct ToPlace {
    old: Ptex,
    /// Was VALID when the gate closed (unmapped by step 3).
    was_valid: bool,
}

impl Op<'_> {
    /// The pre-copy commit of `table` (module docs). Returns the PAPR code.
    pub(super) fn commit_precopy(&self, mut table: Prepared) -> i64 {
        let Some(new) = table.hpt.as_mut() else {
            return ResizeError::Io.papr();
        };
        let tables = self.tables();
        // No memslot change (and so no MMIO reclassification of paged-out entries)
        // until the commit is over: slots_lock is below mmu_setup_lock.
        let writer = self.slot_set().writer();
        let track = self.change_tracker();
        // The bitmap was allocated with the table at PREPARE: nothing to allocate here.
        let Some(map) = table.track.take() else {
            return ResizeError::Io.papr();
        };
        track.install(map);
        // Step 0: switch change tracking on with every vCPU out of the gate.
        let t1 = std::time::Instant::now();
        tables.close_and_drain(self.tlb());
        track.set_tracking(true);
        tables.reopen();
        let pause1 = elapsed_ns(t1);
        // Step 1: drain every ring of the old table while vCPUs run.
        {
            let slots = self.memslots();
            for s in slots.iter() {
                let acc = self.host_access();
                // Tracking is on: an entry linked after this walk looks at its ring
                // is marked, and a round or step 4 unmaps it.
                self.unmap_slot_rings_tracked(acc.hpt(), s);
            }
        }
        // Step 2: copy the bolted entries, note the VALID ones; then re-copy rounds
        // over the groups changed meanwhile, while vCPUs run, until few remain.
        let prepared = self.precopy_bolted(new);
        // From here on the committer only reads the new table through a shared borrow
        // (re-copies and step 3 lock its entries, as the shared re-chain routine does).
        let new = &*new;
        let prepared = prepared.and_then(|(mut copied, mut carry)| {
            self.ctl.precopy_hold_point(PrecopyHold::BeforeRounds);
            for _ in 0..MAX_ROUNDS {
                let groups = track.drain().map_err(|_| ResizeError::NoMem)?;
                self.precopy_round(new, &mut copied, &groups, &mut carry)?;
                let marks: u32 = groups.iter().map(|w| w.count_ones()).sum();
                if marks <= FINAL_ROUND_SLOTS {
                    break;
                }
            }
            Ok((copied, carry))
        });
        self.ctl.precopy_hold_point(PrecopyHold::BeforeStop);
        // Step 3: stop, re-apply what changed, pivot.
        let t0 = std::time::Instant::now();
        tables.close_and_drain(self.tlb());
        track.set_tracking(false);
        let copied = track
            .drain()
            .map_err(|_| ResizeError::NoMem)
            .and_then(|g| prepared.map(|(c, v)| (c, v, g)));
        drop(track.free());
        let ret = match copied
            .and_then(|(c, valid, groups)| self.precopy_finish(new, &c, &valid, &groups))
        {
            Ok(()) => match table.install() {
                Some(hpt) => match tables.pivot(hpt) {
                    Ok(()) => {
                        self.ctl.record_pause(pause1 + elapsed_ns(t0));
                        drop(writer);
                        self.tlb().tlbie();
                        self.bump_mmio_update();
                        return H_SUCCESS;
                    }
                    Err(_unused) => ResizeError::NoMem.papr(),
                },
                None => ResizeError::Io.papr(),
            },
            Err(e) => e.papr(),
        };
        tables.reopen();
        self.ctl.record_pause(pause1 + elapsed_ns(t0));
        drop(writer);
        ret
    }

    /// Step 2 (gate open): snapshot and place every bolted, non-VALID entry.
    #[allow(clippy::type_complexity)]
    fn precopy_bolted(&self, new: &mut Hpt) -> Result<(Vec<Copied>, Vec<u32>), ResizeError> {
        let acc = self.host_access();
        let old = acc.hpt();
        let f = self.flavour();
        let (og, ng, rev) = (old.geometry(), new.geometry(), old.revmap());
        let mut out: Vec<Copied> = Vec::new();
        let mut valid: Vec<u32> = Vec::new();
        for (i, s) in old.slots().iter().enumerate() {
            let v = HpteV(s.load_v());
            if v.is_valid() {
                valid.try_reserve(1).map_err(|_| ResizeError::NoMem)?;
                valid.push(i as u32);
                continue;
            }
            if !v.is_used() || !v.is_bolted() {
                continue;
            }
            let p = Ptex(i as u32);
            let Some(g) = old.lock(p) else { continue };
            let v = g.v();
            let (r, gr) = (g.r(), rev.guest_rpte(p.0));
            drop(g);
            let hv = HpteV(v);
            if hv.is_valid() {
                valid.try_reserve(1).map_err(|_| ResizeError::NoMem)?;
                valid.push(i as u32);
                continue;
            }
            if !hv.is_used() || !hv.is_bolted() {
                continue;
            }
            // Undecodable: left for step 3, which fails the commit as stop-the-world.
            let Some(sh) = f.page_shifts(hv, HpteR(gr)) else {
                valid.try_reserve(1).map_err(|_| ResizeError::NoMem)?;
                valid.push(i as u32);
                continue;
            };
            let n = rehash_index(hv, sh.base, og, p, ng);
            if new.slot(n).is_none() {
                return Err(ResizeError::Io);
            }
            // The new table is ours alone until it is installed (`&mut`): no lock.
            // Not `mark_written` yet: a copy withdrawn in step 3 must read back as never
            // written (QEMU's pristine slots); step 3 marks the kept ones.
            let placed = new.place_unshared(n, v, r, gr);
            out.try_reserve(1).map_err(|_| ResizeError::NoMem)?;
            out.push(Copied {
                old: p,
                new: n,
                v,
                r,
                gr,
                bolted: true,
                placed,
            });
        }
        Ok((out, valid))
    }

    /// A re-copy round (gate open): bring the copies of the slots of `groups` up to
    /// date. VALID entries and new bolted entries without a record go to `carry` for
    /// step 3.
    fn precopy_round(
        &self,
        new: &Hpt,
        copied: &mut [Copied],
        groups: &[u64],
        carry: &mut Vec<u32>,
    ) -> Result<(), ResizeError> {
        let acc = self.host_access();
        let old = acc.hpt();
        let f = self.flavour();
        let (og, ng, rev, new_rev) = (old.geometry(), new.geometry(), old.revmap(), new.revmap());
        let npte = og.npte();
        let slots = self.memslots();
        for (w, &bits) in groups.iter().enumerate() {
            let mut b = bits;
            while b != 0 {
                let i = (w as u64) * 64 + u64::from(b.trailing_zeros());
                b &= b - 1;
                {
                    if i >= npte {
                        break;
                    }
                    let p = Ptex(i as u32);
                    let Some(lk) = old.lock(p) else { continue };
                    let (v, r, gr) = (lk.v(), lk.r(), rev.guest_rpte(p.0));
                    drop(lk);
                    let hv = HpteV(v);
                    let bolted = hv.is_used() && hv.is_bolted();
                    let rec = copied
                        .binary_search_by_key(&p.0, |c| c.old.0)
                        .ok()
                        .and_then(|k| copied.get_mut(k));
                    if hv.is_valid() {
                        // Unmap it now, as step 1 did, through its frame's ring; an
                        // entry on no ring waits for step 3.
                        let frame = self.entry_page(v, gr).and_then(|(gfn, shift)| {
                            slots
                                .lookup(gfn)
                                .map(|s| (s, gfn, 1u64 << (shift - PAGE_SHIFT)))
                        });
                        match frame {
                            Some((s, gfn, n)) => {
                                self.unmap_slot_range(old, s, gfn, Gfn(gfn.0 + n));
                            }
                            None => {
                                carry.try_reserve(1).map_err(|_| ResizeError::NoMem)?;
                                carry.push(p.0);
                            }
                        }
                        if !bolted {
                            continue;
                        }
                        // A bolted entry: bring its copy up to date below, from the
                        // words it has now.
                    }
                    let (v, r, gr) = if hv.is_valid() {
                        let Some(sl) = old.slot(p) else { continue };
                        (sl.load_v(), sl.load_r(), rev.guest_rpte(p.0))
                    } else {
                        (v, r, gr)
                    };
                    let hv = HpteV(v);
                    if hv.is_valid() {
                        // Still VALID (no ring, or re-faulted): step 3.
                        carry.try_reserve(1).map_err(|_| ResizeError::NoMem)?;
                        carry.push(p.0);
                        continue;
                    }
                    let Some(c) = rec else {
                        if bolted {
                            carry.try_reserve(1).map_err(|_| ResizeError::NoMem)?;
                            carry.push(p.0);
                        }
                        continue;
                    };
                    if (c.v, c.r, c.gr) == (v, r, gr) {
                        continue;
                    }
                    if c.placed {
                        if let Some(mut ng_) = new.lock(c.new) {
                            new_rev.set_guest_rpte(c.new.0, 0);
                            ng_.set_r(0);
                            ng_.set_v(0);
                            drop(ng_);
                        }
                        c.placed = false;
                    }
                    (c.v, c.r, c.gr, c.bolted) = (v, r, gr, bolted);
                    if !bolted {
                        continue;
                    }
                    let Some(sh) = f.page_shifts(hv, HpteR(gr)) else {
                        continue;
                    };
                    c.new = rehash_index(hv, sh.base, og, p, ng);
                    let Some(ng_) = new.lock(c.new) else {
                        return Err(ResizeError::Io);
                    };
                    if HpteV(ng_.v()).is_used() {
                        drop(ng_);
                    } else {
                        new_rev.set_guest_rpte(c.new.0, gr);
                        ng_.set_r(r);
                        ng_.unlock_with(v);
                        c.placed = true;
                    }
                }
            }
        }
        Ok(())
    }

    /// Step 3 (gate closed): re-apply what changed since step 2. On `Err` the new
    /// table is to be discarded; the old one has only had entries made ABSENT.
    fn precopy_finish(
        &self,
        new: &Hpt,
        copied: &[Copied],
        valid: &[u32],
        groups: &[u64],
    ) -> Result<(), ResizeError> {
        let f = self.flavour();
        let old = self.hpt();
        let slots = self.memslots();
        let (og, ng, rev, new_rev) = (old.geometry(), new.geometry(), old.revmap(), new.revmap());
        if !self.tables().can_pivot() {
            return Err(ResizeError::NoMem);
        }
        let mut todo: Vec<ToPlace> = Vec::new();
        // Old indices of placed copies withdrawn, ascending.
        let mut withdrawn: Vec<Ptex> = Vec::new();
        // The candidates: every slot of a changed group, every entry VALID at the
        // copy, every copy that could not be placed. Nothing else can differ from
        // its copy (module docs).
        let mut cand: Vec<u32> = Vec::new();
        let npte = old.geometry().npte();
        for (w, &bits) in groups.iter().enumerate() {
            let mut b = bits;
            while b != 0 {
                let i = (w as u64) * 64 + u64::from(b.trailing_zeros());
                b &= b - 1;
                if i < npte {
                    cand.try_reserve(1).map_err(|_| ResizeError::NoMem)?;
                    cand.push(i as u32);
                }
            }
        }
        cand.try_reserve(valid.len())
            .map_err(|_| ResizeError::NoMem)?;
        cand.extend_from_slice(valid);
        for c in copied.iter().filter(|c| c.bolted && !c.placed) {
            cand.try_reserve(1).map_err(|_| ResizeError::NoMem)?;
            cand.push(c.old.0);
        }
        cand.sort_unstable();
        cand.dedup();
        for &i in &cand {
            let p = Ptex(i);
            let Some(s) = old.slot(p) else { continue };
            let rec = copied
                .binary_search_by_key(&p.0, |c| c.old.0)
                .ok()
                .and_then(|k| copied.get(k));
            let v = s.load_v();
            let hv = HpteV(v);
            let bolted = hv.is_used() && hv.is_bolted();
            let changed = if hv.is_valid() {
                true
            } else {
                match rec {
                    None => bolted,
                    Some(c) => (c.v, c.r, c.gr) != (v, s.load_r(), rev.guest_rpte(p.0)),
                }
            };
            if !changed {
                if let Some(c) = rec.filter(|c| c.bolted && !c.placed) {
                    push(&mut todo, c.old, false)?;
                }
                continue;
            }
            if let Some(c) = rec.filter(|c| c.placed) {
                withdrawn.try_reserve(1).map_err(|_| ResizeError::NoMem)?;
                withdrawn.push(c.old);
                // Withdraw the stale copy.
                if let Some(mut g) = new.lock(c.new) {
                    new_rev.set_guest_rpte(c.new.0, 0);
                    g.set_r(0);
                    g.set_v(0);
                    drop(g);
                }
            }
            if hv.is_valid() {
                self.precopy_unmap(old, &slots, p);
            }
            if bolted {
                push(&mut todo, p, hv.is_valid())?;
            }
        }
        if f.resize_table_reads_zero_until_written() {
            let mut withdrawn = withdrawn.iter().peekable();
            for c in copied.iter().filter(|c| c.placed) {
                if withdrawn.next_if(|&&w| w == c.old).is_none() {
                    new.mark_written(c.new);
                }
            }
        }
        let absent = f.resize_bolted_arrive_absent();
        for t in &todo {
            let Some(s) = old.slot(t.old) else { continue };
            let (v, r, gr) = (s.load_v(), s.load_r(), rev.guest_rpte(t.old.0));
            let Some(sh) = f.page_shifts(HpteV(v), HpteR(gr)) else {
                return Err(ResizeError::Io);
            };
            let n = rehash_index(HpteV(v), sh.base, og, t.old, ng);
            let Some(g) = new.lock(n) else {
                return Err(ResizeError::Io);
            };
            if HpteV(g.v()).is_used() {
                drop(g);
                return Err(ResizeError::BoltedCollision);
            }
            // As the stop-the-world transfer: a formerly VALID entry is ABSENT in the
            // old table now.
            let (nv, nr) = match (t.was_valid, absent) {
                (false, _) => (v, r),
                (true, true) => (v, r & !HpteR::KEY),
                (true, false) => ((v & !HpteV::ABSENT) | HpteV::VALID, r),
            };
            new_rev.set_guest_rpte(n.0, gr);
            g.set_r(nr);
            if t.was_valid && !absent {
                self.rechain_bolted(new, &slots, g, nv);
            } else {
                g.unlock_with(nv);
            }
            new.mark_written(n);
        }
        Ok(())
    }

    /// Unmap a VALID old entry with every vCPU stopped (the stop-the-world transfer).
    fn precopy_unmap(&self, old: &Hpt, slots: &Memslots, p: Ptex) {
        let Some(mut g) = old.lock(p) else { return };
        let v = g.v();
        if v & HpteV::VALID == 0 {
            return;
        }
        g.set_v((v & !HpteV::VALID) | HpteV::ABSENT);
        let hw_r = g.r();
        self.remove_revmap_chain(old, slots, p, v, hw_r);
        g.set_r(hw_r & !HpteR::RC);
    }
}

fn push(todo: &mut Vec<ToPlace>, old: Ptex, was_valid: bool) -> Result<(), ResizeError> {
    todo.try_reserve(1).map_err(|_| ResizeError::NoMem)?;
    todo.push(ToPlace { old, was_valid });
    Ok(())
}
