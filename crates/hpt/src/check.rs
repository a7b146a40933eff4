//! The whole-VM invariant checker: HPT + revmap + rmap words + dirty bitmap.
//!
//! Run at a quiescent point (no hypercall or vCPU access in flight). Checks the
//! invariants of KVM's hash-MMU rmap that are decidable from a snapshot:
//!
//! * rmap words and rings (`revmap_rmap::ring::check_rmaps`);
//! * chain membership iff VALID: every chain member is VALID and maps the chain's frame;
//!   every VALID memslot-backed HPTE is on exactly one chain (counts must match);
//! * HVLOCK clear at rest, never VALID and ABSENT together;
//! * ABSENT + key 31 (MMIO) never inside a memslot (a slot created over MMIO entries
//!   turns them into paged-out entries); VALID never outside memslots. A non-key-31
//!   ABSENT entry outside every slot is legal: its slot was deleted or moved away, and a
//!   fault on it is MMIO, as in KVM;
//! * guest_rpte has no `HPTE_GR_RESERVED` bit (KVM flavour);
//! * a VALID page is no larger than its backing page, its slot is aligned for it,
//!   and its real RPN is the host page of its guest frame;
//! * free slots are all-zero in the KVM flavour; memslot dirty-bitmap shape, and no
//!   dirty bit recorded in a slot whose dirty logging is off;
//! * at rest no HPTE lock (HVLOCK) and no rmap lock (bit 43) is held;
//! * no vCPU fault is in flight at a quiescent point (so with `mmu_ready` clear no
//!   fault can be about to turn an entry VALID);
//! * slot flush: no VALID HPTE maps a frame of an INVALID slot and no rmap word of an
//!   INVALID slot has PRESENT (a flushed slot; [`Vm::check_slot_flushed`] checks a
//!   range);
//! * after an HPT reset every rmap word is 0 — this model has no HPT reset yet
//!   (the resize issue), so there is nothing to check.
//!
//! No lost R/C bit, R/C read only after the tlbie, R/C pre-set only from the rmap, and
//! no VALID entry after a raced invalidation are properties of histories, checked by
//! the tests that drive hardware R/C and invalidations. Cost: O(npte + guest frames).

use crate::error::Violation;
use crate::flavour::Flavour;
use crate::hpte::{HpteR, HpteV};
use crate::vm::Vm;
use alloc::vec;
use revmap_rmap::ring::{check_rmaps, RmapViolation};
use revmap_rmap::{Gfn, Ptex, PAGE_SHIFT};

/// Counts gathered by a successful [`Vm::check_invariants`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// VALID HPTEs.
    pub valid: usize,
    /// ABSENT HPTEs (MMIO and not-present).
    pub absent: usize,
    /// ABSENT HPTEs with key 31 (emulated MMIO).
    pub mmio: usize,
    /// Non-empty rmap chains.
    pub chains: usize,
    /// Sum of chain lengths (= VALID memslot-backed HPTEs).
    pub chain_members: usize,
    /// Longest chain.
    pub longest_chain: usize,
    /// 4 KiB frames marked dirty.
    pub dirty_frames: u64,
}

impl Vm {
    /// Check every snapshot-decidable invariant (module docs); return counts or the
    /// first violation.
    pub fn check_invariants(&self) -> Result<CheckReport, Violation> {
        let f = self.flavour();
        // Inside the gate: a resize commit cannot pivot under the checker.
        let acc = self.host_access();
        let hpt = acc.hpt();
        let rev = hpt.revmap();
        let npte = hpt.slots().len();
        let mut rep = CheckReport::default();
        let mut backed = vec![0u64; npte.div_ceil(64)];
        let mut nbacked = 0usize;
        let slots = self.memslots();
        if self.faults_in_flight() != 0 {
            return Err(Violation::FaultInFlight);
        }

        for (i, s) in hpt.slots().iter().enumerate() {
            let p = i as u32;
            let v = s.load_v();
            let r = s.load_r();
            if v | r == 0 {
                // An all-zero slot is free and clean in both flavours: nothing below
                // applies to it. Most of a table is free, so this is the checker's
                // common case.
                continue;
            }
            if v & HpteV::HVLOCK != 0 || (v & HpteV::VALID != 0 && v & HpteV::ABSENT != 0) {
                return Err(Violation::BadSoftwareBits { ptex: Ptex(p), v });
            }
            if !HpteV(v).is_used() {
                if f == Flavour::Kvm && (v != 0 || r != 0) {
                    return Err(Violation::DirtyFreeSlot {
                        ptex: Ptex(p),
                        v,
                        r,
                    });
                }
                continue;
            }
            let gr = rev.guest_rpte(p);
            if f.guest_rpte_of(gr) != gr {
                return Err(Violation::GuestReserved {
                    ptex: Ptex(p),
                    rpte: gr,
                });
            }
            let Some(shifts) = f.page_shifts(HpteV(v), HpteR(gr)) else {
                return Err(Violation::BadPageSize { ptex: Ptex(p) });
            };
            let gfn = Gfn(HpteR(gr).page_addr(shifts.actual) >> PAGE_SHIFT);
            let slot = slots.lookup(gfn);
            if v & HpteV::ABSENT != 0 {
                rep.absent += 1;
                let key31 = HpteR(r).is_key31();
                if key31 {
                    rep.mmio += 1;
                }
                if key31 && slot.is_some_and(|s| !s.is_invalid()) {
                    return Err(Violation::Key31InRam {
                        ptex: Ptex(p),
                        gfn: gfn.0,
                    });
                }
                continue;
            }
            rep.valid += 1;
            let Some(s) = slot else {
                return Err(Violation::BadMapping {
                    ptex: Ptex(p),
                    why: "VALID entry outside every memslot (MMIO must be ABSENT)",
                });
            };
            if s.is_invalid() {
                return Err(Violation::BadMapping {
                    ptex: Ptex(p),
                    why: "VALID entry maps a frame of an INVALID (flushed) memslot",
                });
            }
            if shifts.actual > s.backing_page_shift() || !s.is_aligned_for(shifts.actual) {
                return Err(Violation::BadMapping {
                    ptex: Ptex(p),
                    why: "page larger than its backing page or slot misaligned",
                });
            }
            let Some(pfn) = s.host_pfn(gfn) else {
                return Err(Violation::BadMapping {
                    ptex: Ptex(p),
                    why: "VALID entry maps a host page that is not present",
                });
            };
            if pfn << PAGE_SHIFT != HpteR(r).page_addr(shifts.actual) {
                return Err(Violation::BadMapping {
                    ptex: Ptex(p),
                    why: "real RPN is not the host page of the guest frame",
                });
            }
            backed[i / 64] |= 1 << (i % 64);
            nbacked += 1;
        }

        let mut chained = vec![0u64; npte.div_ceil(64)];
        let mut first_err: Option<Violation> = None;
        for s in slots.iter() {
            s.check().map_err(Violation::Memslot)?;
            if s.is_invalid() {
                if let Some(i) = s.rmaps().iter().position(|r| r.load().is_present()) {
                    return Err(Violation::NotFlushed {
                        gfn: s.base_gfn().0 + i as u64,
                    });
                }
            }
            rep.dirty_frames += s.count_dirty();
            let base = s.base_gfn().0;
            let stats = check_rmaps(s.rmaps(), rev, |frame, p| {
                let v = hpt.slot(Ptex(p)).map_or(0, |e| e.load_v());
                let err = if v & HpteV::VALID == 0 {
                    Some(Violation::ChainedNotValid { ptex: Ptex(p), v })
                } else {
                    let gr = rev.guest_rpte(p);
                    match self.entry_page(v, gr) {
                        Some((g, _)) if g.0 == base + frame as u64 => None,
                        Some((g, _)) => Some(Violation::WrongChain {
                            ptex: Ptex(p),
                            gfn: g.0,
                            frame: base + frame as u64,
                        }),
                        None => Some(Violation::BadPageSize { ptex: Ptex(p) }),
                    }
                };
                if let Some(e) = err {
                    first_err.get_or_insert(e);
                    // Stop the walk; the real violation is reported from first_err.
                    return Err(RmapViolation::DuplicateMember { ptex: p });
                }
                chained[p as usize / 64] |= 1 << (p % 64);
                Ok(())
            });
            if let Some(e) = first_err.take() {
                return Err(e);
            }
            let stats = stats?;
            rep.chains += stats.chains;
            rep.chain_members += stats.members;
            rep.longest_chain = rep.longest_chain.max(stats.longest);
        }
        if rep.chain_members != nbacked || backed != chained {
            let first = backed
                .iter()
                .zip(&chained)
                .enumerate()
                .find(|(_, (b, c))| *b & !*c != 0)
                .map(|(w, (b, c))| Ptex((w * 64) as u32 + (b & !c).trailing_zeros()));
            return Err(Violation::ChainCount {
                valid: nbacked,
                chained: rep.chain_members,
                first,
            });
        }
        Ok(rep)
    }
}

impl Vm {
    /// The slot-flush invariant (no VALID HPTE maps a flushed frame) for a range that no
    /// longer belongs to a slot (after a delete or a move away): no VALID HPTE maps a
    /// frame of `[lo, hi)`. O(npte).
    pub fn check_slot_flushed(&self, lo: Gfn, hi: Gfn) -> Result<(), Violation> {
        let rev = self.hpt().revmap();
        for (i, s) in self.hpt().slots().iter().enumerate() {
            let v = s.load_v();
            if v & HpteV::VALID == 0 {
                continue;
            }
            let gr = rev.guest_rpte(i as u32);
            if let Some((g, shift)) = self.entry_page(v, gr) {
                let end = g.0 + (1u64 << (shift - PAGE_SHIFT));
                if g.0 < hi.0 && lo.0 < end {
                    return Err(Violation::NotFlushed { gfn: g.0 });
                }
            }
        }
        Ok(())
    }
}
