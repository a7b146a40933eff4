//! Replays the vendored nested traces against the L1-side semantics this crate models
//! on its own (no shadow tables yet): L1 memory from `L1_STORE`, PTCR through
//! `check_set_partition_table`, nested guests and their PATE cache through
//! `NestedGuests`, H_TLB_INVALIDATE through `TlbInvalidate::decode`, and every
//! `L2_ACCESS` through `access::l1_translate` (the radix walk plus KVM L0's rules).
//! Every recorded result must be reproduced exactly. For every completed access the
//! shadow leaf `fault::shadow_leaf` derives (over an L0 that backs each L1 gfn with a
//! 64 KiB host frame, a new one after every `HOST_UNMAP`) must land on the current frame
//! and grant no more than L1's and L0's leaves. The host must-sets are checked
//! against the README's rules computed from the completed accesses (exact equality: the
//! must-sets are the truth, and this harness is the ground truth for the shadow MMU's
//! replay). The registry's invariants are checked after every record.

mod common;

use common::{trace, Tally};
use revmap_nested::access::{l1_translate, L1Layout, L2Outcome};
use revmap_nested::fault::{l0_leaf_for_l1, shadow_leaf, L0Leaf};
use revmap_nested::hcall::{check_set_partition_table, Ric, TlbInvalidate};
use revmap_nested::radix::{Access, Exit, Ptcr, SparseMemory};
use revmap_nested::radix::{PageSize, RadixPte};
use revmap_nested::{GuestId, NGpa, NestedGuests, ShadowLpidAllocator};
use revmap_rmap::Gpa;
use revmap_rmap::Lpid;
use revmap_trace::nested::{AccessKind, AccessOutcome, NestedHeader, NestedReader, NestedRecord};
use std::collections::BTreeSet;
use std::collections::HashMap;

struct L1Side {
    header: NestedHeader,
    mem: SparseMemory,
    ptcr: Ptcr,
    guests: NestedGuests,
    young: BTreeSet<u64>,
    dirty: BTreeSet<u64>,
    /// L0 backing: L1 gfn → host frame (64 KiB), a new frame after every unmap.
    frames: HashMap<u64, u64>,
    next_frame: u64,
    shadow_checked: u64,
}

#[derive(Default, Debug)]
struct Report {
    tally: Tally,
    completed: u64,
    shadow_checked: u64,
    exits: u64,
    guests_created: u64,
}

impl L1Side {
    fn new(header: NestedHeader) -> Self {
        L1Side {
            header,
            mem: SparseMemory::new(header.l1_memory_bytes),
            ptcr: Ptcr(0),
            guests: NestedGuests::new(ShadowLpidAllocator::new(4096)),
            young: BTreeSet::new(),
            dirty: BTreeSet::new(),
            frames: HashMap::new(),
            next_frame: 1,
            shadow_checked: 0,
        }
    }

    fn layout(&self) -> L1Layout {
        L1Layout {
            ram_bytes: self.header.l1_memory_bytes,
            l0_page_shift: NestedHeader::GFN_SHIFT,
        }
    }

    /// kvmhv_flush_nested: re-read the PATE; destroy the guest if dw0 reads 0.
    fn flush_ric2(&mut self, id: GuestId) {
        let pate = self
            .guests
            .update_ptbl_cache(id, &self.mem, self.ptcr)
            .unwrap();
        if pate.is_empty() {
            self.guests.remove(id).unwrap();
        }
    }

    fn l2_access(&mut self, lpid: u64, gpa: u64, acc: AccessKind) -> AccessOutcome {
        let id = match common::enter_l2(&mut self.guests, self.ptcr, lpid) {
            Ok(id) => id,
            Err(out) => return out,
        };
        let mut root = self.guests.guest(id).unwrap().l1_gr_to_hr();
        if root.bits() == 0 {
            root = self
                .guests
                .update_ptbl_cache(id, &self.mem, self.ptcr)
                .unwrap()
                .dw0;
        }
        let access = match acc {
            AccessKind::Read => Access::Load,
            AccessKind::Write => Access::Store,
            AccessKind::Exec => Access::Fetch,
        };
        let n_gpa = NGpa::new(gpa).expect("the format keeps L2 addresses below 2^52");
        let out = match l1_translate(&self.mem, root, n_gpa, access, self.layout()) {
            L2Outcome::Complete(t) => {
                let gfn = t.raddr.0 >> NestedHeader::GFN_SHIFT;
                self.check_shadow(lpid, n_gpa, access, &t);
                self.young.insert(gfn);
                if access == Access::Store {
                    self.dirty.insert(gfn);
                }
                AccessOutcome::Ok { l1gpa: t.raddr.0 }
            }
            L2Outcome::Mmio(g) => AccessOutcome::Mmio { l1gpa: g.0 },
            L2Outcome::Exit(Exit::Hdsi { hdsisr, asdr }) => AccessOutcome::Hdsi {
                cause: hdsisr.bits(),
                asdr,
            },
            L2Outcome::Exit(Exit::Hisi { srr1, asdr }) => AccessOutcome::Hisi {
                cause: srr1.bits(),
                asdr,
            },
        };
        // The entry's reference ends with the exit.
        self.guests.put(id).unwrap();
        out
    }

    fn tlb_invalidate(&mut self, instr: u64, rs: u64, rb: u64) -> i64 {
        let t = match TlbInvalidate::decode(instr, rs, rb) {
            Ok(t) => t,
            Err(e) => return e.papr(),
        };
        match t {
            TlbInvalidate::Lpid {
                lpid,
                ric: Ric::All,
            } => {
                if let Ok(Some(id)) = self.guests.get(u64::from(lpid), self.ptcr, false) {
                    self.flush_ric2(id);
                    self.guests.put(id).unwrap();
                }
            }
            TlbInvalidate::All { ric: Ric::All } => {
                for id in self.guests.ids().collect::<Vec<_>>() {
                    self.flush_ric2(id);
                }
            }
            // No shadow translations in this model: nothing else to drop.
            _ => {}
        }
        0
    }

    /// Derives the shadow leaf L0 would install for a completed access (L0 backing the
    /// L1 page with a 64 KiB leaf on a fresh or current host frame) and checks that it
    /// lands on that frame and grants no more than L1's and L0's leaves.
    fn check_shadow(
        &mut self,
        lpid: u64,
        n_gpa: NGpa,
        access: Access,
        t: &revmap_nested::radix::Translation,
    ) {
        let gfn = t.raddr.0 >> NestedHeader::GFN_SHIFT;
        let next = &mut self.next_frame;
        let frame = *self.frames.entry(gfn).or_insert_with(|| {
            *next += 1;
            *next
        });
        let hpa = frame << NestedHeader::GFN_SHIFT;
        let l0 = L0Leaf {
            pte: l0_leaf_for_l1(hpa, access == Access::Store),
            size: PageSize::P64K,
        };
        let s = shadow_leaf(l0, t, n_gpa, access, PageSize::P64K, Lpid(lpid as u16))
            .expect("a completed access has a shadow leaf");
        let mask = s.size.bytes() - 1;
        let landed = (s.pte.rpn() & !mask) | (n_gpa.raw() & mask);
        assert_eq!(
            landed,
            hpa | (t.raddr.0 & 0xffff),
            "shadow leaf lands on the current frame"
        );
        for bit in [
            RadixPte::EAA_READ,
            RadixPte::EAA_RW,
            RadixPte::EAA_X,
            RadixPte::R,
            RadixPte::C,
        ] {
            if s.pte.bits() & bit != 0 {
                assert!(t.pte.bits() & bit != 0 || (bit == RadixPte::EAA_READ && t.pte.may_read()));
                assert!(l0.pte.bits() & bit != 0);
            }
        }
        assert!(
            s.pte.permits(access) && s.pte.rc_permits(access),
            "the access completes through it"
        );
        assert_eq!(s.rmap_base.0 >> NestedHeader::GFN_SHIFT, gfn);
        self.shadow_checked += 1;
    }

    /// The gfns of the L0 backing pages overlapping [gfn, gfn + npages).
    fn backing_span(&self, gfn: u64, npages: u64) -> std::ops::Range<u64> {
        let per = 1u64 << (self.header.l0_page_shift - NestedHeader::GFN_SHIFT);
        let start = gfn / per * per;
        let end = gfn.saturating_add(npages).div_ceil(per).saturating_mul(per);
        start..end
    }
}

fn replay(name: &str) -> Report {
    let r = NestedReader::open(trace(name)).unwrap();
    let mut l1 = L1Side::new(r.header());
    let mut rep = Report::default();
    let check = |rep: &mut Report, line: u64, what: &str, ok: bool, detail: String| {
        rep.tally.check(name, line, what, ok, detail)
    };
    for rec in r {
        let rec = rec.unwrap();
        let line = rec.line();
        match rec {
            NestedRecord::L1Store { gpa, val, .. } => l1.mem.write_be_u64(Gpa(gpa), val).unwrap(),
            NestedRecord::SetPartitionTable { ptcr, ret, .. } => {
                let ptcr = Ptcr(ptcr);
                let ram = l1.header.gfn_count();
                let got = match check_set_partition_table(ptcr, |b| b.0 >> 16 < ram) {
                    Ok(()) => {
                        l1.ptcr = ptcr;
                        0
                    }
                    Err(e) => e.papr(),
                };
                rep.tally.ret(name, line, "H_SET_PARTITION_TABLE", got, ret);
            }
            NestedRecord::TlbInvalidate {
                instr, rs, rb, ret, ..
            } => {
                let got = l1.tlb_invalidate(instr, rs, rb);
                rep.tally.ret(name, line, "H_TLB_INVALIDATE", got, ret);
            }
            NestedRecord::L2Access {
                lpid,
                gpa,
                acc,
                outcome,
                ..
            } => {
                let got = l1.l2_access(lpid, gpa, acc);
                match got {
                    AccessOutcome::Ok { .. } => rep.completed += 1,
                    AccessOutcome::Hdsi { .. } | AccessOutcome::Hisi { .. } => rep.exits += 1,
                    _ => {}
                }
                check(
                    &mut rep,
                    line,
                    "L2_ACCESS",
                    got == outcome,
                    format!("{got:?}, want {outcome:?}"),
                );
            }
            NestedRecord::HostUnmap { gfn, npages, .. } => {
                let span = l1.backing_span(gfn, npages);
                l1.young.retain(|g| !span.contains(g));
                l1.frames.retain(|g, _| !span.contains(g));
            }
            NestedRecord::HostAge {
                gfn,
                npages,
                young_must,
                ..
            } => {
                let own = gfn..gfn.saturating_add(npages);
                let got: Vec<u64> = l1
                    .young
                    .iter()
                    .copied()
                    .filter(|g| own.contains(g))
                    .collect();
                let want: Vec<u64> = young_must.gfns().collect();
                let span = l1.backing_span(gfn, npages);
                l1.young.retain(|g| !span.contains(g));
                check(
                    &mut rep,
                    line,
                    "HOST_AGE",
                    got == want,
                    format!("young {got:x?}, want {want:x?}"),
                );
            }
            NestedRecord::HostDirtyLog { dirty_must, .. } => {
                let got: Vec<u64> = std::mem::take(&mut l1.dirty).into_iter().collect();
                let want: Vec<u64> = dirty_must.gfns().collect();
                check(
                    &mut rep,
                    line,
                    "HOST_DIRTY_LOG",
                    got == want,
                    format!("dirty {got:x?}, want {want:x?}"),
                );
            }
            NestedRecord::L1Memory { .. } | NestedRecord::L1BasePage { .. } => {
                unreachable!("the reader returns the header separately")
            }
        }
        if let Err(e) = l1.guests.check() {
            panic!("{name}:{line}: registry invariant: {e}");
        }
    }
    rep.guests_created = l1.guests.counts().0;
    rep.shadow_checked = l1.shadow_checked;
    rep
}

#[test]
fn small_trace_l1_side_results_reproduced() {
    let rep = replay("nested-small.txt.gz");
    assert_eq!(rep.tally.first_mismatch, None, "{rep:?}");
    // Every record with a result: 26 + 261 + 2997 + 131 + 39.
    assert_eq!(rep.tally.checked, 3454);
    assert_eq!(rep.tally.matched, rep.tally.checked);
    assert_eq!(rep.completed, 509 + 1432 + 148);
    assert_eq!(rep.shadow_checked, rep.completed);
    assert!(rep.guests_created >= 16, "{rep:?}");
}

#[test]
fn basic_trace_l1_side_results_reproduced() {
    let rep = replay("nested-basic.txt.gz");
    assert_eq!(rep.tally.first_mismatch, None, "{rep:?}");
    assert_eq!(rep.tally.checked, 1 + 5521 + 94_462 + 2570 + 961);
    assert_eq!(rep.tally.matched, rep.tally.checked);
    assert_eq!(rep.completed, 16_763 + 45_586 + 4387);
    assert_eq!(rep.shadow_checked, rep.completed);
}
