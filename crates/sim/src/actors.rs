//! Host actors: memory pressure, an aging scan and a live-migration loop, each on its
//! own thread, driving a VM's host side ([`HostMmu`]) while vCPUs run.
//!
//! * [`Pressure`] unmaps random, size-aligned host virtual ranges of guest RAM (one page
//!   up to 16 MiB) and later pages them back in (or leaves that to the fault path).
//! * [`Aging`] walks every slot in chunks with `age_gfn`, probing single frames with
//!   `test_age_gfn` in between.
//! * [`Migration`] runs dirty-log rounds: `get_dirty_log` on every slot per round (and
//!   `clear_dirty_log` in chunks when the slot uses manual protection), counting dirty
//!   pages per round.
//!
//! [`HostActors`] spawns the configured actors on scoped threads against one `&H`, can
//! pause them (for the invariant checker at quiescent points), gate them in phases,
//! and stops and joins them, returning the merged [`HostOps`].
//!
//! # Invariants
//!
//! * Determinism: every choice an actor makes (ranges, chunk sizes, probes) comes from its
//!   own ChaCha8 stream seeded with `seed` and the actor's kind, and never from a result
//!   or from timing, so the sequence of operations an actor issues is a pure function of
//!   the seed and the memslot layout ([`Actor::next_op`]).
//! * Every operation stays inside a memslot: ranges are clipped to and aligned within
//!   the slot they were drawn from.
//! * Pausing: when [`HostActors::pause`] returns, no actor is inside an operation and
//!   none starts one until [`HostActors::resume`]. Actors park only between operations.
//! * Phases: with `ops_per_phase = K`, each actor performs exactly `K` operations per
//!   phase; [`HostActors::end_phase`] waits for all live actors to finish theirs before
//!   opening the next phase, so a long replay always interleaves `K` operations per actor
//!   per phase, however fast it runs.
//! * Atomics come from `revmap_rmap::sync`; every ordering is explained where used.

use crate::host::{HostMmu, SlotView};
use crate::scenario::HostSpec;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use revmap_rmap::sync::{thread, Arc, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use revmap_rmap::{Gfn, Hva, SlotId};
use serde::Serialize;
use std::collections::VecDeque;
use std::num::NonZeroU64;

/// Largest memory-pressure region: 2^12 frames = 16 MiB.
pub const PRESSURE_MAX_ORDER: u32 = 12;
/// Largest aging chunk: 2^9 frames = 2 MiB.
pub const AGING_MAX_ORDER: u32 = 9;
/// Largest `clear_dirty_log` chunk: 2^6 bitmap words = 4096 frames.
pub const CLEAR_MAX_WORD_ORDER: u32 = 6;

/// Counts of host operations, per operation (summed over all actors).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostOps {
    /// `unmap_hva_range` calls.
    pub unmap_hva_range: u64,
    /// HPTEs those calls unmapped.
    pub hptes_unmapped: u64,
    /// `host_page_in` calls.
    pub host_page_in: u64,
    /// `age_gfn` calls.
    pub age_gfn: u64,
    /// `age_gfn` calls that found a referenced frame.
    pub age_gfn_young: u64,
    /// `test_age_gfn` calls.
    pub test_age_gfn: u64,
    /// `test_age_gfn` calls that found a referenced frame.
    pub test_age_gfn_young: u64,
    /// `get_dirty_log` calls.
    pub get_dirty_log: u64,
    /// `clear_dirty_log` calls.
    pub clear_dirty_log: u64,
    /// Dirty-log rounds started.
    pub dirty_log_rounds: u64,
    /// Dirty pages harvested, summed over all rounds.
    pub dirty_pages: u64,
    /// The most dirty pages harvested in one round.
    pub max_dirty_pages_per_round: u64,
    /// Dirty-log calls that returned an error.
    pub errors: u64,
}

impl HostOps {
    /// Number of host operations (calls into the VM's host side).
    pub fn total(&self) -> u64 {
        self.unmap_hva_range
            + self.host_page_in
            + self.age_gfn
            + self.test_age_gfn
            + self.get_dirty_log
            + self.clear_dirty_log
    }

    /// The unmap, page-in and aging counts as the human summaries print them, `removed`
    /// naming what the unmaps removed: `unmap_hva_range N (M removed), host_page_in N,
    /// age_gfn N (M young), test_age_gfn N`.
    pub fn unmap_and_aging(&self, removed: &str) -> String {
        format!(
            "unmap_hva_range {} ({} {removed}), host_page_in {}, age_gfn {} ({} young), \
             test_age_gfn {}",
            self.unmap_hva_range,
            self.hptes_unmapped,
            self.host_page_in,
            self.age_gfn,
            self.age_gfn_young,
            self.test_age_gfn
        )
    }

    /// Adds `o`'s counts (maxima are combined by max).
    pub fn merge(&mut self, o: &HostOps) {
        self.unmap_hva_range += o.unmap_hva_range;
        self.hptes_unmapped += o.hptes_unmapped;
        self.host_page_in += o.host_page_in;
        self.age_gfn += o.age_gfn;
        self.age_gfn_young += o.age_gfn_young;
        self.test_age_gfn += o.test_age_gfn;
        self.test_age_gfn_young += o.test_age_gfn_young;
        self.get_dirty_log += o.get_dirty_log;
        self.clear_dirty_log += o.clear_dirty_log;
        self.dirty_log_rounds += o.dirty_log_rounds;
        self.dirty_pages += o.dirty_pages;
        self.max_dirty_pages_per_round = self
            .max_dirty_pages_per_round
            .max(o.max_dirty_pages_per_round);
        self.errors += o.errors;
    }
}

/// One host operation, as chosen by an actor (the dirty-log clear carries only its
/// range: the bits cleared are those the preceding harvest returned there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostOp {
    /// `unmap_hva_range(start, end)`.
    UnmapHva {
        /// Start.
        start: Hva,
        /// End (exclusive).
        end: Hva,
    },
    /// `host_page_in(start, end)`.
    PageIn {
        /// Start.
        start: Hva,
        /// End (exclusive).
        end: Hva,
    },
    /// `age_gfn(slot, start, end)`.
    AgeGfn {
        /// Slot.
        slot: SlotId,
        /// First frame.
        start: Gfn,
        /// End frame (exclusive).
        end: Gfn,
    },
    /// `test_age_gfn(slot, gfn, gfn + 1)`.
    TestAgeGfn {
        /// Slot.
        slot: SlotId,
        /// The frame.
        gfn: Gfn,
    },
    /// `get_dirty_log(slot)`; `round` is the dirty-log round it belongs to (from 1).
    GetDirtyLog {
        /// Slot.
        slot: SlotId,
        /// Round number.
        round: u64,
    },
    /// `clear_dirty_log(slot, first_page, ..)` over `npages` frames.
    ClearDirtyLog {
        /// Slot.
        slot: SlotId,
        /// First frame offset in the slot (a multiple of 64).
        first_page: u64,
        /// Frames covered (a multiple of 64, clipped at the bitmap end).
        npages: u64,
    },
}

fn rng_for(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    r.set_stream(stream);
    r
}

/// The memory-pressure actor.
#[derive(Debug)]
pub struct Pressure {
    rng: ChaCha8Rng,
    slots: Vec<SlotView>,
    outstanding: VecDeque<(Hva, Hva)>,
    max_outstanding: usize,
    page_in: bool,
}

impl Pressure {
    /// A pressure actor over `slots`. At most `max_outstanding` ranges stay unmapped at a
    /// time; with `page_in` false, ranges are never paged back in (the fault path must).
    pub fn new(seed: u64, slots: Vec<SlotView>, max_outstanding: usize, page_in: bool) -> Self {
        Self {
            rng: rng_for(seed, 1),
            slots,
            outstanding: VecDeque::new(),
            max_outstanding: max_outstanding.max(1),
            page_in,
        }
    }

    /// The next operation (`None` if there are no slots).
    pub fn next_op(&mut self) -> Option<HostOp> {
        if self.page_in
            && !self.outstanding.is_empty()
            && (self.outstanding.len() >= self.max_outstanding || self.rng.gen_bool(0.5))
        {
            let (start, end) = self.outstanding.pop_front()?;
            return Some(HostOp::PageIn { start, end });
        }
        if self.slots.is_empty() {
            return None;
        }
        let s = self.slots[self.rng.gen_range(0..self.slots.len())];
        let order = self.rng.gen_range(0..=PRESSURE_MAX_ORDER);
        // The largest power of two not above npages (npages >= 1).
        let fit = 63 - s.npages.leading_zeros();
        let size = 1u64 << order.min(fit);
        let k = self.rng.gen_range(0..s.npages / size);
        let (start, end) = (s.hva_of(k * size), s.hva_of((k + 1) * size));
        if self.page_in {
            self.outstanding.push_back((start, end));
        }
        Some(HostOp::UnmapHva { start, end })
    }
}

/// The aging-scan actor.
#[derive(Debug)]
pub struct Aging {
    rng: ChaCha8Rng,
    slots: Vec<SlotView>,
    slot: usize,
    cursor: u64,
}

impl Aging {
    /// An aging scan over `slots`, in slot order, wrapping around.
    pub fn new(seed: u64, slots: Vec<SlotView>) -> Self {
        Self {
            rng: rng_for(seed, 2),
            slots,
            slot: 0,
            cursor: 0,
        }
    }

    /// The next operation (`None` if there are no slots).
    pub fn next_op(&mut self) -> Option<HostOp> {
        let s = *self.slots.get(self.slot)?;
        if self.rng.gen_ratio(1, 4) {
            let i = self.rng.gen_range(0..s.npages);
            return Some(HostOp::TestAgeGfn {
                slot: s.id,
                gfn: Gfn(s.base_gfn.0 + i),
            });
        }
        let chunk = 1u64 << self.rng.gen_range(0..=AGING_MAX_ORDER);
        let lo = self.cursor;
        let hi = lo.saturating_add(chunk).min(s.npages);
        self.cursor = hi;
        if hi >= s.npages {
            self.cursor = 0;
            self.slot = (self.slot + 1) % self.slots.len();
        }
        Some(HostOp::AgeGfn {
            slot: s.id,
            start: Gfn(s.base_gfn.0 + lo),
            end: Gfn(s.base_gfn.0 + hi),
        })
    }
}

/// What the migration loop reports to an observer.
#[derive(Debug)]
pub enum MigrationEvent<'a> {
    /// A new dirty-log round starts (before its first harvest).
    RoundStart {
        /// Round number, from 1.
        round: u64,
    },
    /// A slot's dirty log was harvested in `round`.
    Log {
        /// Round number.
        round: u64,
        /// The slot.
        slot: SlotView,
        /// Its dirty bitmap (KVM layout).
        bitmap: &'a [u64],
    },
}

/// The live-migration actor: dirty-log rounds over every dirty-logging slot.
#[derive(Debug)]
pub struct Migration {
    rng: ChaCha8Rng,
    slots: Vec<SlotView>,
    /// Round of the last operation chosen.
    round: u64,
    /// Round last reported to an observer.
    reported: u64,
    next_slot: usize,
    round_dirty: u64,
    /// A manual-protect harvest being cleared: slot, bitmap, next word to clear.
    clearing: Option<(SlotView, Vec<u64>, u64)>,
}

impl Migration {
    /// The migration loop of a deterministic run over `slots`, if `host` runs one.
    pub fn stepped(seed: u64, host: &HostSpec, slots: Vec<SlotView>) -> Option<Self> {
        host.migrates().then(|| Self::new(seed, slots))
    }

    /// A migration loop over the dirty-logging slots of `slots`.
    pub fn new(seed: u64, slots: Vec<SlotView>) -> Self {
        Self {
            rng: rng_for(seed, 3),
            slots: slots.into_iter().filter(|s| s.dirty_logging).collect(),
            round: 0,
            reported: 0,
            next_slot: 0,
            round_dirty: 0,
            clearing: None,
        }
    }

    /// The current round (0 before the first).
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Whether the next operation starts a new round.
    pub fn at_round_start(&self) -> bool {
        self.next_slot == 0
            && self
                .clearing
                .as_ref()
                .is_none_or(|(s, _, w)| *w >= s.bitmap_words())
    }

    /// The next operation (`None` if no slot logs dirty pages). The first
    /// `GetDirtyLog` of a round carries the new round number.
    pub fn next_op(&mut self) -> Option<HostOp> {
        if let Some((s, _, word)) = &mut self.clearing {
            let total = s.bitmap_words();
            if *word < total {
                let words =
                    (1u64 << self.rng.gen_range(0..=CLEAR_MAX_WORD_ORDER)).min(total - *word);
                let first_page = *word * 64;
                *word += words;
                return Some(HostOp::ClearDirtyLog {
                    slot: s.id,
                    first_page,
                    npages: words * 64,
                });
            }
            self.clearing = None;
        }
        let s = self.slots.get(self.next_slot)?;
        if self.next_slot == 0 {
            self.round += 1;
        }
        self.next_slot = (self.next_slot + 1) % self.slots.len();
        Some(HostOp::GetDirtyLog {
            slot: s.id,
            round: self.round,
        })
    }

    fn slot(&self, id: SlotId) -> Option<SlotView> {
        self.slots.iter().copied().find(|s| s.id == id)
    }

    /// Performs `op` (from [`Migration::next_op`]) on `host`, telling `observe` about
    /// round starts and harvested logs.
    pub fn execute<H: HostMmu>(
        &mut self,
        op: HostOp,
        host: &H,
        ops: &mut HostOps,
        observe: &mut dyn FnMut(MigrationEvent<'_>),
    ) {
        match op {
            HostOp::GetDirtyLog { slot, round } => {
                if round != self.reported {
                    self.reported = round;
                    self.round_dirty = 0;
                    ops.dirty_log_rounds += 1;
                    observe(MigrationEvent::RoundStart { round });
                }
                ops.get_dirty_log += 1;
                let Some(view) = self.slot(slot) else { return };
                match host.get_dirty_log(slot) {
                    Ok(bitmap) => {
                        let n: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
                        ops.dirty_pages += n;
                        self.round_dirty += n;
                        ops.max_dirty_pages_per_round =
                            ops.max_dirty_pages_per_round.max(self.round_dirty);
                        observe(MigrationEvent::Log {
                            round,
                            slot: view,
                            bitmap: &bitmap,
                        });
                        if view.manual_protect && n != 0 {
                            self.clearing = Some((view, bitmap, 0));
                        }
                    }
                    Err(_) => ops.errors += 1,
                }
            }
            HostOp::ClearDirtyLog {
                slot,
                first_page,
                npages,
            } => {
                ops.clear_dirty_log += 1;
                let Some((_, bitmap, _)) = self.clearing.as_ref().filter(|c| c.0.id == slot) else {
                    return;
                };
                let w0 = usize::try_from(first_page / 64).unwrap_or(usize::MAX);
                let nw = usize::try_from(npages / 64).unwrap_or(usize::MAX);
                let bits = bitmap.get(w0..).unwrap_or(&[]);
                let bits = bits.get(..nw.min(bits.len())).unwrap_or(&[]);
                if host.clear_dirty_log(slot, first_page, bits).is_err() {
                    ops.errors += 1;
                }
            }
            _ => {}
        }
    }

    /// One step: the next operation, performed.
    pub fn step<H: HostMmu>(
        &mut self,
        host: &H,
        ops: &mut HostOps,
        observe: &mut dyn FnMut(MigrationEvent<'_>),
    ) -> Option<HostOp> {
        let op = self.next_op()?;
        self.execute(op, host, ops, observe);
        Some(op)
    }

    /// Runs one whole round (every slot harvested and, with manual protection,
    /// cleared), finishing the current round first if called in the middle of one.
    /// Returns the round number.
    pub fn run_round<H: HostMmu>(
        &mut self,
        host: &H,
        ops: &mut HostOps,
        observe: &mut dyn FnMut(MigrationEvent<'_>),
    ) -> u64 {
        if self.step(host, ops, observe).is_none() {
            return self.round;
        }
        while !self.at_round_start() {
            if self.step(host, ops, observe).is_none() {
                break;
            }
        }
        self.round
    }
}

/// Which actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActorKind {
    /// [`Pressure`].
    MemoryPressure,
    /// [`Aging`].
    Aging,
    /// [`Migration`].
    Migration,
}

/// One actor of any kind.
#[derive(Debug)]
pub enum Actor {
    /// Memory pressure.
    Pressure(Pressure),
    /// Aging scan.
    Aging(Aging),
    /// Migration loop.
    Migration(Migration),
}

impl Actor {
    /// The host actors of a deterministic run, over `slots`, which the scheduler steps
    /// itself (no threads, no phases): those of `host` other than migration.
    pub fn stepped(seed: u64, host: &HostSpec, slots: &[SlotView]) -> Vec<Actor> {
        let cfg = ActorConfig {
            ops_per_phase: None,
            ..ActorConfig::threaded(seed, host, Vec::new())
        };
        host.actor_kinds()
            .into_iter()
            .map(|k| Actor::new(k, &cfg, slots.to_vec()))
            .collect()
    }

    /// Creates the actor `kind` over `slots` with `cfg`.
    pub fn new(kind: ActorKind, cfg: &ActorConfig, slots: Vec<SlotView>) -> Self {
        match kind {
            ActorKind::MemoryPressure => Actor::Pressure(Pressure::new(
                cfg.seed,
                slots,
                cfg.max_outstanding,
                cfg.page_in,
            )),
            ActorKind::Aging => Actor::Aging(Aging::new(cfg.seed, slots)),
            ActorKind::Migration => Actor::Migration(Migration::new(cfg.seed, slots)),
        }
    }

    /// The actor's kind.
    pub fn kind(&self) -> ActorKind {
        match self {
            Actor::Pressure(_) => ActorKind::MemoryPressure,
            Actor::Aging(_) => ActorKind::Aging,
            Actor::Migration(_) => ActorKind::Migration,
        }
    }

    /// The next operation this actor will perform (`None`: it has nothing to do).
    pub fn next_op(&mut self) -> Option<HostOp> {
        match self {
            Actor::Pressure(p) => p.next_op(),
            Actor::Aging(a) => a.next_op(),
            Actor::Migration(m) => m.next_op(),
        }
    }

    /// Performs one operation on `host`, counting it in `ops`. Returns it.
    pub fn step<H: HostMmu>(&mut self, host: &H, ops: &mut HostOps) -> Option<HostOp> {
        let op = self.next_op()?;
        match (self, op) {
            (Actor::Migration(m), op) => m.execute(op, host, ops, &mut |_| {}),
            (_, op) => execute_simple(op, host, ops),
        }
        Some(op)
    }
}

/// Performs a pressure or aging operation.
fn execute_simple<H: HostMmu>(op: HostOp, host: &H, ops: &mut HostOps) {
    match op {
        HostOp::UnmapHva { start, end } => {
            ops.unmap_hva_range += 1;
            ops.hptes_unmapped += host.unmap_hva_range(start, end);
        }
        HostOp::PageIn { start, end } => {
            ops.host_page_in += 1;
            host.host_page_in(start, end);
        }
        HostOp::AgeGfn { slot, start, end } => {
            ops.age_gfn += 1;
            if host.age_gfn(slot, start, end) {
                ops.age_gfn_young += 1;
            }
        }
        HostOp::TestAgeGfn { slot, gfn } => {
            ops.test_age_gfn += 1;
            if host.test_age_gfn(slot, gfn, Gfn(gfn.0 + 1)) {
                ops.test_age_gfn_young += 1;
            }
        }
        HostOp::GetDirtyLog { .. } | HostOp::ClearDirtyLog { .. } => {}
    }
}

/// Configuration of [`HostActors`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActorConfig {
    /// Seed of every actor's random stream.
    pub seed: u64,
    /// The actors to run (one thread each).
    pub kinds: Vec<ActorKind>,
    /// Memory pressure pages its ranges back in (else the fault path must).
    pub page_in: bool,
    /// Memory pressure keeps at most this many ranges unmapped.
    pub max_outstanding: usize,
    /// `None`: actors run freely; `Some(K)`: exactly K operations per actor per phase.
    pub ops_per_phase: Option<NonZeroU64>,
}

impl ActorConfig {
    /// All three actors, paging back in, free-running.
    pub fn all(seed: u64) -> Self {
        Self {
            seed,
            kinds: vec![
                ActorKind::MemoryPressure,
                ActorKind::Aging,
                ActorKind::Migration,
            ],
            page_in: true,
            max_outstanding: 8,
            ops_per_phase: None,
        }
    }

    /// The actors `kinds` of a threaded run of a scenario with host spec `host`:
    /// `host.ops_per_tick` operations per actor per phase (0: free-running).
    pub fn threaded(seed: u64, host: &HostSpec, kinds: Vec<ActorKind>) -> Self {
        Self {
            seed,
            kinds,
            page_in: host.page_in,
            max_outstanding: host.max_outstanding,
            ops_per_phase: NonZeroU64::new(host.ops_per_tick),
        }
    }
}

/// An actor thread panicked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host actor {kind:?} panicked")]
pub struct ActorPanicked {
    /// Which actor.
    pub kind: ActorKind,
}

#[derive(Debug)]
struct ActorState {
    /// Number of phases this actor has completed (budget mode).
    completed: AtomicU64,
    /// The actor has left its loop.
    exited: AtomicBool,
    /// Operations performed so far.
    ops: AtomicU64,
}

/// Shared control block of the actor threads.
#[derive(Debug)]
struct Control {
    stop: AtomicBool,
    pause: AtomicBool,
    /// Actors that may be inside an operation (neither parked nor exited).
    active: AtomicUsize,
    phase: AtomicU64,
    actors: Vec<ActorState>,
    /// Times a parked actor re-checked the pause flag (a progress count for tests).
    park_polls: AtomicU64,
}

fn backoff() {
    thread::yield_now();
}

impl Control {
    fn stopping(&self) -> bool {
        // ORDERING: Acquire: pairs with the Release in `HostActors::stop`; nothing else
        // is published with it, Acquire just keeps the check from being hoisted.
        self.stop.load(Ordering::Acquire)
    }

    fn pausing(&self) -> bool {
        // ORDERING: SeqCst: the actor half of the Dekker pair (`active` RMW, then this
        // load) against the pauser's (`pause` store, then `active` load).
        self.pause.load(Ordering::SeqCst)
    }

    /// Park between operations while a pause is requested.
    fn park(&self) {
        // ORDERING: SeqCst RMW (Dekker pair, see `pausing`); also a release of this
        // actor's completed operations to the pauser that reads `active`.
        self.active.fetch_sub(1, Ordering::SeqCst);
        loop {
            while self.pausing() && !self.stopping() {
                // ORDERING: Relaxed: a statistic (see `HostActors::park_polls`).
                self.park_polls.fetch_add(1, Ordering::Relaxed);
                backoff();
            }
            // ORDERING: SeqCst: announce before re-checking `pause` (Dekker pair).
            self.active.fetch_add(1, Ordering::SeqCst);
            if !self.pausing() || self.stopping() {
                return;
            }
            // ORDERING: SeqCst, as above: a new pause came in; park again.
            self.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Marks an actor exited (also when it unwinds), so that pause and phase waits never
/// wait for it.
struct ExitGuard<'a> {
    control: &'a Control,
    index: usize,
}

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        if let Some(a) = self.control.actors.get(self.index) {
            // ORDERING: Release: the phase waiter that sees it may stop waiting.
            a.exited.store(true, Ordering::Release);
        }
        // ORDERING: SeqCst: the pauser's `active` load must see it (Dekker pair).
        self.control.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn actor_main<H: HostMmu>(
    mut actor: Actor,
    host: &H,
    control: &Control,
    index: usize,
    budget: Option<NonZeroU64>,
) -> HostOps {
    let _guard = ExitGuard { control, index };
    let mut ops = HostOps::default();
    let Some(me) = control.actors.get(index) else {
        return ops;
    };
    let mut my_phase = 0;
    let mut done = 0u64;
    loop {
        if control.stopping() {
            break;
        }
        if control.pausing() {
            control.park();
            continue;
        }
        if let Some(b) = budget {
            // ORDERING: Acquire pairs with the Release in `end_phase`.
            let ph = control.phase.load(Ordering::Acquire);
            if ph != my_phase {
                my_phase = ph;
                done = 0;
            }
            if done >= b.get() {
                backoff();
                continue;
            }
        }
        if actor.step(host, &mut ops).is_none() {
            // Nothing to do (no slots): count the phase as done and idle.
            done = budget.map_or(0, NonZeroU64::get);
            // ORDERING: Release: see below.
            me.completed.store(my_phase + 1, Ordering::Release);
            backoff();
            continue;
        }
        done += 1;
        // ORDERING: Relaxed: a progress statistic.
        me.ops.fetch_add(1, Ordering::Relaxed);
        if budget.is_some_and(|b| done == b.get()) {
            // ORDERING: Release: the operations of this phase happen-before the
            // controller's Acquire load in `end_phase`.
            me.completed.store(my_phase + 1, Ordering::Release);
        }
    }
    ops
}

/// The running host actors (scoped threads sharing one `&H`).
#[derive(Debug)]
pub struct HostActors<'scope> {
    control: Arc<Control>,
    handles: Vec<(ActorKind, thread::ScopedJoinHandle<'scope, HostOps>)>,
    budget: Option<NonZeroU64>,
}

impl<'scope> HostActors<'scope> {
    /// Spawns one thread per configured actor in `scope`, against `host`.
    pub fn spawn<'env, H: HostMmu>(
        scope: &'scope thread::Scope<'scope, 'env>,
        host: &'env H,
        cfg: &ActorConfig,
    ) -> Self {
        let slots = host.memslot_views();
        let control = Arc::new(Control {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            active: AtomicUsize::new(cfg.kinds.len()),
            phase: AtomicU64::new(0),
            park_polls: AtomicU64::new(0),
            actors: cfg
                .kinds
                .iter()
                .map(|_| ActorState {
                    completed: AtomicU64::new(0),
                    exited: AtomicBool::new(false),
                    ops: AtomicU64::new(0),
                })
                .collect(),
        });
        let budget = cfg.ops_per_phase;
        let handles = cfg
            .kinds
            .iter()
            .enumerate()
            .map(|(i, &kind)| {
                let actor = Actor::new(kind, cfg, slots.clone());
                let c = Arc::clone(&control);
                let h = scope.spawn(move || actor_main(actor, host, &c, i, budget));
                (kind, h)
            })
            .collect();
        HostActors {
            control,
            handles,
            budget,
        }
    }

    /// Number of actors.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether no actor runs.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Times parked actors re-checked the pause flag so far: lets a test bound a paused
    /// window by the actors' own progress rather than by time or a count of yields.
    pub fn park_polls(&self) -> u64 {
        // ORDERING: Relaxed: a progress statistic.
        self.control.park_polls.load(Ordering::Relaxed)
    }

    /// Operations performed so far by all actors.
    pub fn ops_so_far(&self) -> u64 {
        self.control
            .actors
            .iter()
            // ORDERING: Relaxed: a progress statistic.
            .map(|a| a.ops.load(Ordering::Relaxed))
            .sum()
    }

    /// Requests a pause and waits until every actor is parked between operations (or
    /// has exited). Call only from the controlling thread.
    pub fn pause(&self) {
        // ORDERING: SeqCst: the pauser half of the Dekker pair (see `Control::pausing`).
        self.control.pause.store(true, Ordering::SeqCst);
        // ORDERING: SeqCst (Dekker pair); seeing 0 also acquires the parked actors'
        // completed operations (their SeqCst RMWs on `active`).
        while self.control.active.load(Ordering::SeqCst) != 0 {
            backoff();
        }
    }

    /// Lets paused actors continue.
    pub fn resume(&self) {
        // ORDERING: SeqCst, as every access to `pause`.
        self.control.pause.store(false, Ordering::SeqCst);
    }

    /// In phase mode, waits until every live actor has performed this phase's
    /// operations, then opens the next phase. A no-op for free-running actors or while
    /// paused. Returns the new phase number.
    pub fn end_phase(&self) -> u64 {
        let c = &*self.control;
        // ORDERING: Relaxed: only this (controlling) thread writes `phase`.
        let ph = c.phase.load(Ordering::Relaxed);
        if self.budget.is_none() {
            return ph;
        }
        if !c.pausing() {
            for a in &c.actors {
                // ORDERING: Acquire pairs with the actors' Release stores.
                while a.completed.load(Ordering::Acquire) <= ph && !a.exited.load(Ordering::Acquire)
                {
                    backoff();
                }
            }
        }
        // ORDERING: Release: pairs with the actors' Acquire load of the phase.
        c.phase.store(ph + 1, Ordering::Release);
        ph + 1
    }

    /// Stops every actor, joins them and returns the merged operation counts.
    pub fn stop(mut self) -> Result<HostOps, ActorPanicked> {
        self.request_stop();
        let mut total = HostOps::default();
        let mut err = None;
        for (kind, h) in core::mem::take(&mut self.handles) {
            match h.join() {
                Ok(o) => total.merge(&o),
                Err(_) => err = err.or(Some(ActorPanicked { kind })),
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    fn request_stop(&self) {
        // ORDERING: Release: pairs with the Acquire in `Control::stopping`.
        self.control.stop.store(true, Ordering::Release);
        self.resume();
    }
}

/// Dropping the runner without [`HostActors::stop`] (e.g. while unwinding from a
/// failed check) still stops the actors, so the enclosing scope can join them.
impl Drop for HostActors<'_> {
    fn drop(&mut self) {
        self.request_stop();
    }
}

#[cfg(test)]
mod tests;
