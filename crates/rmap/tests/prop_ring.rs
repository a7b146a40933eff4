//! Property tests of the HPT rmap ring (`revmap_rmap::ring`) against a plain model.
//!
//! A state machine drives a set of rmap words sharing one revmap through link, unlink,
//! R/C harvest and clear, iteration, the two walkers, per-word clear and whole reset; the
//! model is `HashMap<gfn, Vec<ptex>>` in ring order plus model R/C bits. After every
//! transition the whole ring set is compared with the model (word bits, ring order, chain
//! length) and `check_rmaps` must pass. A second property corrupts a ring the way a
//! reset-without-rmap-reset bug does (an HPTE still on one chain is linked
//! into another) and requires the checker to notice.
#![cfg(not(loom))]

mod common;

use proptest::prelude::*;
use proptest::strategy::Union;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};
use revmap_rmap::ring::{
    check_rmaps, HpteLockArray, HpteLocks, Revmap, RmapArray, RmapViolation, RmapWord, Visit,
    HPTE_R_C, HPTE_R_R, HPTE_V_HVLOCK, RMAP_PRESENT, RMAP_RC_SHIFT, RMAP_TYPE_HPT,
};
use std::collections::HashMap;

/// HPTE slots of the table under test.
const NPTE: u32 = 24;
/// Guest frames sharing it.
const NFRAMES: u64 = 4;

/// R/C subsets in HPTE dword-1 position.
fn rc_bits() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(HPTE_R_R),
        Just(HPTE_R_C),
        Just(HPTE_R_R | HPTE_R_C)
    ]
}

/// The reference model.
#[derive(Clone, Debug, Default)]
struct Model {
    /// Members of each gfn's chain in ring order from the head (= insertion order; the
    /// head moves to its successor when removed).
    chains: HashMap<u64, Vec<u32>>,
    /// Harvested R/C per gfn, HPTE dword-1 position.
    rc: HashMap<u64, u64>,
    /// gfns whose word got the HPT type byte (kept until clear/reset).
    populated: HashMap<u64, bool>,
    /// HPTEs whose links are stale (their word was cleared without `reset_links`): not on
    /// any chain, but `unlink` must not be asked about them.
    stale: Vec<u32>,
}

impl Model {
    fn owner(&self, p: u32) -> Option<u64> {
        self.chains
            .iter()
            .find(|(_, v)| v.contains(&p))
            .map(|(g, _)| *g)
    }
    fn free(&self) -> Vec<u32> {
        (0..NPTE).filter(|p| self.owner(*p).is_none()).collect()
    }
    fn members(&self) -> Vec<(u64, u32)> {
        let mut v: Vec<_> = self
            .chains
            .iter()
            .flat_map(|(g, c)| c.iter().map(move |p| (*g, *p)))
            .collect();
        v.sort_unstable();
        v
    }
    fn chain(&self, gfn: u64) -> &[u32] {
        self.chains.get(&gfn).map_or(&[], Vec::as_slice)
    }
    /// The word the implementation must hold for `gfn`.
    fn word(&self, gfn: u64) -> u64 {
        let mut w = self.rc.get(&gfn).copied().unwrap_or(0) << RMAP_RC_SHIFT;
        if self.populated.get(&gfn).copied().unwrap_or(false) {
            w |= RMAP_TYPE_HPT;
        }
        if let Some(&head) = self.chain(gfn).first() {
            w |= RMAP_PRESENT | u64::from(head);
        }
        w
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Link a free HPTE into gfn's chain (holding the HPTE lock, as H_ENTER does).
    Link { gfn: u64, ptex: u32 },
    /// Unlink a member (as H_REMOVE does).
    Unlink { gfn: u64, ptex: u32 },
    /// `try_unlink` of an HPTE that is on no chain: must be refused and change nothing.
    UnlinkNonMember { gfn: u64, ptex: u32 },
    /// OR R/C into the word.
    AddRc { gfn: u64, rc: u64 },
    /// Clear R/C and compare what was set.
    TakeRc { gfn: u64, rc: u64 },
    /// Iterate under the lock and compare order and `chain_len`.
    Iterate { gfn: u64 },
    /// `drain_locked`, harvesting `rc` per member.
    Drain { gfn: u64, rc: u64 },
    /// `for_each_locked`, stopping after `stop_after` visits.
    ForEach { gfn: u64, stop_after: usize },
    /// `Rmap::clear` of one word (links of its members go stale).
    ClearWord { gfn: u64 },
    /// Reset every word and every link (HPT reset).
    ResetAll,
}

struct RingMachine;

impl ReferenceStateMachine for RingMachine {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model::default()).boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Op> {
        let gfn = 0..NFRAMES;
        let mut opts: Vec<(u32, BoxedStrategy<Op>)> = vec![
            (
                2,
                (gfn.clone(), rc_bits())
                    .prop_map(|(gfn, rc)| Op::AddRc { gfn, rc })
                    .boxed(),
            ),
            (
                2,
                (gfn.clone(), rc_bits())
                    .prop_map(|(gfn, rc)| Op::TakeRc { gfn, rc })
                    .boxed(),
            ),
            (2, gfn.clone().prop_map(|gfn| Op::Iterate { gfn }).boxed()),
            (
                1,
                (gfn.clone(), rc_bits())
                    .prop_map(|(gfn, rc)| Op::Drain { gfn, rc })
                    .boxed(),
            ),
            (
                2,
                (gfn.clone(), 0..8usize)
                    .prop_map(|(gfn, stop_after)| Op::ForEach { gfn, stop_after })
                    .boxed(),
            ),
            (1, gfn.clone().prop_map(|gfn| Op::ClearWord { gfn }).boxed()),
            (1, Just(Op::ResetAll).boxed()),
        ];
        let free = state.free();
        if !free.is_empty() {
            opts.push((
                12,
                (gfn.clone(), proptest::sample::select(free.clone()))
                    .prop_map(|(gfn, ptex)| Op::Link { gfn, ptex })
                    .boxed(),
            ));
            let clean: Vec<u32> = free
                .into_iter()
                .filter(|p| !state.stale.contains(p))
                .collect();
            if !clean.is_empty() {
                opts.push((
                    1,
                    (gfn, proptest::sample::select(clean))
                        .prop_map(|(gfn, ptex)| Op::UnlinkNonMember { gfn, ptex })
                        .boxed(),
                ));
            }
        }
        let members = state.members();
        if !members.is_empty() {
            opts.push((
                6,
                proptest::sample::select(members)
                    .prop_map(|(gfn, ptex)| Op::Unlink { gfn, ptex })
                    .boxed(),
            ));
        }
        Union::new_weighted(opts).boxed()
    }

    fn preconditions(state: &Model, op: &Op) -> bool {
        // Re-checked while shrinking, when earlier transitions may have been dropped.
        match *op {
            Op::Link { ptex, .. } => state.owner(ptex).is_none(),
            Op::Unlink { gfn, ptex } => state.owner(ptex) == Some(gfn),
            Op::UnlinkNonMember { ptex, .. } => {
                state.owner(ptex).is_none() && !state.stale.contains(&ptex)
            }
            _ => true,
        }
    }

    fn apply(mut state: Model, op: &Op) -> Model {
        match *op {
            Op::Link { gfn, ptex } => {
                state.chains.entry(gfn).or_default().push(ptex);
                state.populated.insert(gfn, true);
                state.stale.retain(|p| *p != ptex);
            }
            Op::Unlink { gfn, ptex } => {
                if let Some(c) = state.chains.get_mut(&gfn) {
                    c.retain(|p| *p != ptex);
                }
            }
            Op::UnlinkNonMember { .. } | Op::Iterate { .. } | Op::ForEach { .. } => {}
            Op::AddRc { gfn, rc } => *state.rc.entry(gfn).or_default() |= rc,
            Op::TakeRc { gfn, rc } => *state.rc.entry(gfn).or_default() &= !rc,
            Op::Drain { gfn, rc } => {
                if !state.chain(gfn).is_empty() {
                    *state.rc.entry(gfn).or_default() |= rc;
                }
                state.chains.remove(&gfn);
            }
            Op::ClearWord { gfn } => {
                if let Some(c) = state.chains.remove(&gfn) {
                    state.stale.extend(c);
                }
                state.rc.remove(&gfn);
                state.populated.remove(&gfn);
            }
            Op::ResetAll => state = Model::default(),
        }
        state
    }
}

/// The system under test: one slot of rmap words, one revmap, a toy HPTE lock table.
struct Sut {
    arr: RmapArray,
    rev: Revmap,
    locks: HpteLockArray,
}

impl Sut {
    fn word(&self, gfn: u64) -> RmapWord {
        self.arr.get(gfn).unwrap().load()
    }
}

impl StateMachineTest for Sut {
    type SystemUnderTest = Sut;
    type Reference = RingMachine;

    fn init_test(_: &Model) -> Sut {
        Sut {
            arr: RmapArray::new(NFRAMES).unwrap(),
            rev: Revmap::new(u64::from(NPTE)).unwrap(),
            locks: HpteLockArray::new(NPTE as usize).unwrap(),
        }
    }

    fn apply(sut: Sut, model: &Model, op: Op) -> Sut {
        // `model` is the state *after* `op`.
        match op {
            Op::Link { gfn, ptex } => {
                let _hpte = sut.locks.lock_hpte(ptex).unwrap();
                let r = sut.arr.get(gfn).unwrap();
                let w = sut.rev.link(r.lock(), ptex);
                assert_eq!(w.bits(), model.word(gfn), "link returns the stored word");
            }
            Op::Unlink { gfn, ptex } => {
                let _hpte = sut.locks.lock_hpte(ptex).unwrap();
                let r = sut.arr.get(gfn).unwrap();
                assert_eq!(sut.rev.try_unlink(&mut r.lock(), ptex), Ok(true));
                assert_eq!((sut.rev.forw(ptex), sut.rev.back(ptex)), (ptex, ptex));
            }
            Op::UnlinkNonMember { gfn, ptex } => {
                let r = sut.arr.get(gfn).unwrap();
                assert_eq!(sut.rev.try_unlink(&mut r.lock(), ptex), Ok(false));
            }
            Op::AddRc { gfn, rc } => sut.arr.get(gfn).unwrap().lock().add_rc(rc),
            Op::TakeRc { gfn, rc } => {
                let before = sut.word(gfn).rc();
                let got = sut.arr.get(gfn).unwrap().lock().take_rc(rc);
                assert_eq!(got, before & rc);
            }
            Op::Iterate { gfn } => {
                let g = sut.arr.get(gfn).unwrap().lock();
                let ring: Vec<u32> = sut.rev.iter(&g).collect();
                assert_eq!(ring, model.chain(gfn));
                assert_eq!(sut.rev.chain_len(&g), model.chain(gfn).len());
            }
            Op::Drain { gfn, rc } => {
                let r = sut.arr.get(gfn).unwrap();
                let expect: Vec<u32> = ring_of(&sut, gfn);
                let mut seen = Vec::new();
                let n = r.drain_locked(&sut.rev, &sut.locks, |g, p, h| {
                    let hv = h.word().load(revmap_rmap::sync::Ordering::Relaxed);
                    assert!(hv & HPTE_V_HVLOCK != 0, "HPTE lock held in the callback");
                    assert_ne!(g.word().head(), Some(p), "unlinked before the callback");
                    g.add_rc(rc);
                    seen.push(p);
                });
                assert_eq!((n, seen), (expect.len(), expect));
            }
            Op::ForEach { gfn, stop_after } => {
                let r = sut.arr.get(gfn).unwrap();
                let mut seen = Vec::new();
                r.for_each_locked(&sut.rev, &sut.locks, |_, p, _| {
                    seen.push(p);
                    if seen.len() > stop_after {
                        Visit::Stop
                    } else {
                        Visit::Continue
                    }
                });
                let chain = model.chain(gfn);
                assert_eq!(seen, &chain[..chain.len().min(stop_after + 1)]);
            }
            Op::ClearWord { gfn } => {
                sut.arr.get(gfn).unwrap().clear();
            }
            Op::ResetAll => {
                sut.arr.reset();
                sut.rev.reset_links();
            }
        }
        sut
    }

    fn check_invariants(sut: &Sut, model: &Model) {
        let stats = check_rmaps(sut.arr.iter(), &sut.rev, |frame, p| {
            if model.chain(frame as u64).contains(&p) {
                Ok(())
            } else {
                Err(RmapViolation::DuplicateMember { ptex: p })
            }
        })
        .unwrap();
        assert_eq!(stats.members, model.members().len());
        for gfn in 0..NFRAMES {
            let w = sut.word(gfn);
            assert_eq!(
                format!("{:#018x}", w.bits()),
                format!("{:#018x}", model.word(gfn)),
                "word of gfn {gfn}: {w:?}"
            );
            assert_eq!(ring_of(sut, gfn), model.chain(gfn), "ring of gfn {gfn}");
        }
        for p in 0..NPTE {
            assert!(
                sut.locks.try_lock_hpte(p).is_some(),
                "HPTE lock {p} left held"
            );
        }
    }
}

/// Ring of `gfn` via the lock-free snapshot and `walk_ring`.
fn ring_of(sut: &Sut, gfn: u64) -> Vec<u32> {
    let mut v = Vec::new();
    sut.rev.walk_ring(sut.word(gfn), |p| v.push(p)).unwrap();
    v
}

prop_state_machine! {
    #![proptest_config(common::config(256))]

    /// Random op sequences keep the rings equal to the model and the checker green.
    #[test]
    fn ring_matches_model(sequential 1..120 => Sut);
}

proptest! {
    #![proptest_config(common::config(256))]

    /// Linking an HPTE that is still on gfn A's chain into gfn B's (what an HPT reset
    /// without an rmap reset does) is caught by the checker.
    #[test]
    fn checker_catches_relinking_a_member(
        assign in proptest::collection::vec((0..NFRAMES, any::<bool>()), NPTE as usize),
        pick in any::<prop::sample::Index>(),
        to in 1..NFRAMES,
    ) {
        let arr = RmapArray::new(NFRAMES).unwrap();
        let rev = Revmap::new(u64::from(NPTE)).unwrap();
        let mut linked = Vec::new();
        for (p, (gfn, on)) in assign.iter().enumerate() {
            if *on {
                rev.link(arr[*gfn as usize].lock(), p as u32);
                linked.push((*gfn, p as u32));
            }
        }
        check_rmaps(arr.iter(), &rev, |_, _| Ok(())).unwrap();
        prop_assume!(!linked.is_empty());
        let (from, p) = *pick.get(&linked);
        let to_gfn = (from + to) % NFRAMES;
        rev.link(arr[to_gfn as usize].lock(), p);
        let err = check_rmaps(arr.iter(), &rev, |_, _| Ok(())).unwrap_err();
        prop_assert!(
            matches!(err, RmapViolation::BrokenLinks { .. } | RmapViolation::DuplicateMember { .. }),
            "{err:?}"
        );
    }

    /// Pointing a word at an HPTE of another chain is caught as a duplicate.
    #[test]
    fn checker_catches_a_word_pointing_into_another_chain(
        n in 1..NPTE, from in 0..NFRAMES, to in 1..NFRAMES, which in any::<prop::sample::Index>(),
    ) {
        let arr = RmapArray::new(NFRAMES).unwrap();
        let rev = Revmap::new(u64::from(NPTE)).unwrap();
        for p in 0..n {
            rev.link(arr[from as usize].lock(), p);
        }
        let victim = which.index(n as usize) as u32;
        let to_gfn = ((from + to) % NFRAMES) as usize;
        arr[to_gfn].lock().set_word(RmapWord(RMAP_TYPE_HPT | RMAP_PRESENT | u64::from(victim)));
        let err = check_rmaps(arr.iter(), &rev, |_, _| Ok(())).unwrap_err();
        prop_assert!(matches!(err, RmapViolation::DuplicateMember { .. }), "{err:?}");
    }
}

/// The memory contract: 8 bytes per guest frame, 16 bytes per HPTE slot, nothing per
/// extra mapping.
#[cfg(not(shuttle))]
#[test]
fn memory_is_exactly_8_per_frame_and_16_per_slot() {
    use revmap_rmap::ring::{RevmapEntry, Rmap};
    assert_eq!(std::mem::size_of::<Rmap>(), 8);
    assert_eq!(std::mem::size_of::<RevmapEntry>(), 16);
    let arr = RmapArray::new(1 << 12).unwrap();
    let rev = Revmap::new(1 << 10).unwrap();
    let before = (arr.bytes(), rev.bytes());
    for p in 0..1 << 10 {
        rev.link(arr[0].lock(), p);
    }
    assert_eq!(before, (8 << 12, 16 << 10));
    assert_eq!(
        (arr.bytes(), rev.bytes()),
        before,
        "links cost nothing extra"
    );
    assert_eq!(
        check_rmaps(arr.iter(), &rev, |_, _| Ok(()))
            .unwrap()
            .longest,
        1 << 10
    );
}
