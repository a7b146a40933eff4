//! Per-HPTE change tracking of a [`Vm`](crate::Vm)'s current table.
//!
//! A pre-copy resize commit copies the table while vCPUs run and must later re-apply
//! what changed meanwhile. While tracking is on, every hypercall marks, after it ran
//! and still inside the vCPU gate, each HPTE it may have changed (the index H_ENTER
//! returned, the `ptex` of H_REMOVE, H_PROTECT, H_CLEAR_REF/MOD, the four of
//! H_BULK_REMOVE), and the fault path marks the entry it faulted on.
//!
//! # Invariants
//!
//! * The flag changes only with the gate closed and drained, so it is constant during
//!   any hypercall or fault; the hot path reads it with one relaxed load.
//! * A mark is one `fetch_or` on the word of the entry (no lock); the consumer takes
//!   whole words with `swap(0)` ([`ChangeTracker::drain`]), so a mark made after a
//!   word was taken stays for the next drain.
//! * Switching bitmaps allocates nothing: the bitmap itself ([`TrackBitmap`]) is
//!   allocated fallibly by its owner (the resize PREPARE, where a failure is
//!   H_NO_MEM) and handed in with [`ChangeTracker::install`]; the `Arc` that publishes
//!   it to markers is one of two kept for the VM's lifetime (the other is a spare under
//!   a mutex), since stable Rust has no fallible `Arc` allocation. So a commit or a
//!   cancel that installs or frees the bitmap cannot fail on memory.

use crate::hcall::*;
use alloc::boxed::Box;
use alloc::vec::Vec;
use revmap_rmap::error::RmapError;
use revmap_rmap::sync::{lock, yield_now, Arc, ArcCell, AtomicBool, AtomicU64, Mutex, Ordering};
use revmap_rmap::Ptex;

/// A cleared changed-HPTE bitmap for a table of a given size: bit `ptex % 64` of word
/// `ptex / 64` stands for HPTE `ptex`. Allocated fallibly ([`TrackBitmap::new`]) by
/// whoever will track, and handed to [`ChangeTracker::install`].
#[derive(Debug, Default)]
pub struct TrackBitmap(Box<[AtomicU64]>);

impl TrackBitmap {
    /// A cleared bitmap for a table of `npte` entries, allocated fallibly.
    pub fn new(npte: u64) -> Result<Self, RmapError> {
        let words = usize::try_from(npte.div_ceil(64))
            .map_err(|_| RmapError::Alloc { bytes: usize::MAX })?;
        revmap_rmap::error::try_boxed_slice(words, |_| AtomicU64::new(0)).map(Self)
    }

    /// Whether this bitmap has exactly one bit per entry of a table of `npte` entries.
    pub fn fits(&self, npte: u64) -> bool {
        u64::try_from(self.0.len()).is_ok_and(|w| w == npte.div_ceil(64))
    }

    /// Its size in 64-bit words.
    pub fn words(&self) -> usize {
        self.0.len()
    }

    /// Clear every bit.
    fn clear(&self) {
        for w in self.0.iter() {
            // ORDERING: Relaxed: called with tracking off (no marker); the publishing
            // swap that follows orders it before any later mark or drain.
            w.store(0, Ordering::Relaxed);
        }
    }
}

/// The changed-HPTE bitmap of a VM's current table and the switch that turns marking
/// on ([`Vm::change_tracker`](crate::Vm::change_tracker)).
#[derive(Debug)]
pub struct ChangeTracker {
    /// Marking is on (read by every hypercall).
    on: AtomicBool,
    /// HPTE `ptex` changed since the last drain (see [`TrackBitmap`]). Empty when no one
    /// tracks; replaced only by the tracking owner.
    map: ArcCell<TrackBitmap>,
    /// The other `Arc` of `map`'s pair: unique (no marker holds it), holding an empty
    /// bitmap; [`install`](Self::install) and [`free`](Self::free) swap it in and keep
    /// the one they retire (module docs: switching allocates nothing).
    spare: Mutex<Option<Arc<TrackBitmap>>>,
}

impl Default for ChangeTracker {
    fn default() -> Self {
        Self::new()
    }
}

/// Marks an HPTE as changed when dropped ([`ChangeTracker::track_on_exit`]).
#[derive(Debug)]
pub(crate) struct TrackOnExit<'a> {
    tracker: Option<&'a ChangeTracker>,
    ptex: Ptex,
}

impl Drop for TrackOnExit<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.tracker {
            t.mark(u64::from(self.ptex.0));
        }
    }
}

impl ChangeTracker {
    /// Tracking off, no bitmap.
    pub fn new() -> Self {
        Self {
            on: AtomicBool::new(false),
            map: ArcCell::new(TrackBitmap::default()),
            spare: Mutex::new(Some(Arc::new(TrackBitmap::default()))),
        }
    }

    /// Whether changes are being marked (the hypercall hot path's check).
    #[inline(always)]
    pub fn tracking(&self) -> bool {
        // ORDERING: Relaxed: switched only while the gate is closed; every vCPU, fault
        // and walker re-enters the gate with a SeqCst load of the state word that reads
        // the reopening RMW, which orders the switch before this load.
        self.on.load(Ordering::Relaxed)
    }

    /// Record that HPTE `ptex` of the current table changed (inside the gate, after the
    /// change): one `fetch_or` on the word of `ptex`, no lock. Out-of-range indices and
    /// an empty bitmap are ignored.
    #[cold]
    #[inline(never)]
    pub fn mark(&self, ptex: u64) {
        self.mark_with::<true>(ptex);
    }

    /// [`mark`](Self::mark), with the `Release` ordering dropped when `RELEASE` is
    /// false: only for the loom model's should-fail variant (`tests/loom_track.rs`),
    /// never called so by production code.
    #[doc(hidden)]
    #[inline(always)]
    pub fn mark_with<const RELEASE: bool>(&self, ptex: u64) {
        let map = self.map.load();
        if let Some(w) = usize::try_from(ptex / 64).ok().and_then(|i| map.0.get(i)) {
            // ORDERING: Release: the change (made under the HPTE lock, released
            // before this mark) happens-before the drain's Acquire load or AcqRel
            // swap that takes the bit, so the consumer's later look at the entry
            // sees it.
            let order = if RELEASE {
                Ordering::Release
            } else {
                Ordering::Relaxed
            };
            w.fetch_or(1 << (ptex % 64), order);
        }
    }

    /// The fault-path hook: a guard that marks `ptex` when dropped (after the fault
    /// changed the entry, still inside the gate), if tracking.
    #[inline(always)]
    pub(crate) fn track_on_exit(&self, ptex: Ptex) -> TrackOnExit<'_> {
        TrackOnExit {
            tracker: self.tracking().then_some(self),
            ptex,
        }
    }

    /// The hypercall hook, after the call: mark the entries it may have changed
    /// (`args` are the inputs, `out` the outputs, `ret` the return code).
    #[cold]
    #[inline(never)]
    pub(crate) fn mark_hcall(&self, opcode: u64, args: &[u64; 8], out: &[u64; 8], ret: i64) {
        match opcode {
            // H_ENTER changes nothing unless it succeeds, then only the slot it returns.
            H_ENTER if ret == H_SUCCESS => self.mark(out[0]),
            H_REMOVE | H_PROTECT | H_CLEAR_REF | H_CLEAR_MOD => self.mark(args[1]),
            H_BULK_REMOVE => {
                for tsh in [args[0], args[2], args[4], args[6]] {
                    self.mark(tsh & BulkTsh::PTEX);
                }
            }
            _ => {}
        }
    }

    /// Allocate a cleared bitmap for a table of `npte` entries and install it
    /// ([`TrackBitmap::new`] then [`install`](Self::install)).
    pub fn alloc(&self, npte: u64) -> Result<(), RmapError> {
        self.install(TrackBitmap::new(npte)?);
        Ok(())
    }

    /// Make `map` (cleared here) the bitmap that marks go to, with tracking off.
    /// Allocates nothing; the bitmap it replaces is dropped.
    pub fn install(&self, map: TrackBitmap) {
        map.clear();
        drop(self.replace(map));
    }

    /// Put `map` in the spare `Arc`, publish it, wait until no marker still holds the
    /// retired one, and keep that as the spare; returns the retired bitmap.
    fn replace(&self, map: TrackBitmap) -> TrackBitmap {
        let mut spare = lock(&self.spare);
        let next = match spare.take() {
            Some(mut a) => match Arc::get_mut(&mut a) {
                Some(slot) => {
                    *slot = map;
                    a
                }
                // Unreachable: the spare is never shared (see below).
                None => Arc::new(map),
            },
            // Unreachable: every replacement leaves a spare.
            None => Arc::new(map),
        };
        let mut old = self.map.swap(next);
        // A marker that loaded the retired bitmap holds it only for one `fetch_or`
        // (and none runs with tracking off, the caller's precondition).
        while Arc::strong_count(&old) > 1 {
            yield_now();
        }
        let retired = Arc::get_mut(&mut old).map(core::mem::take);
        *spare = Some(old);
        retired.unwrap_or_default()
    }

    /// Switch marking on or off. The caller must have the vCPU gate closed and drained
    /// ([`TableCell::close_and_drain`](super::cell::TableCell::close_and_drain)).
    pub fn set_tracking(&self, on: bool) {
        // ORDERING: Relaxed: see `tracking`.
        self.on.store(on, Ordering::Relaxed);
    }

    /// Take the marks set since the last drain, word by word (`swap(0)`), into a plain
    /// bitmap. Marks made meanwhile stay for the next drain.
    pub fn drain(&self) -> Result<Vec<u64>, RmapError> {
        let map = self.map.load();
        let mut out = Vec::new();
        out.try_reserve_exact(map.0.len())
            .map_err(|_| RmapError::Alloc {
                bytes: map.0.len().saturating_mul(8),
            })?;
        // Most words are 0 (a round or the final stop sees few marks): a plain load
        // skips them without the RMW, which costs the stop of a large table tens of
        // microseconds.
        out.extend(map.0.iter().map(|w| {
            // ORDERING: Acquire, as the swap below: a mark that happened-before the
            // drain (the final stop drains the vCPU gate first, whose Acquire orders
            // every mark made inside it before this load) is seen by coherence; a mark
            // the load misses is concurrent with this drain and stays for the next
            // one, as a mark made just after the swap would.
            if w.load(Ordering::Acquire) == 0 {
                return 0;
            }
            // ORDERING: AcqRel: acquires the marks (see `mark`); the swap leaves the
            // word at 0 for the marks that follow.
            w.swap(0, Ordering::AcqRel)
        }));
        Ok(out)
    }

    /// Take the bitmap out (tracking must be off), leaving none: allocates nothing. The
    /// caller drops it or installs it again later.
    pub fn free(&self) -> TrackBitmap {
        self.replace(TrackBitmap::default())
    }

    /// The installed bitmap's size in 64-bit words (0: none).
    pub fn words(&self) -> usize {
        self.map.load().words()
    }
}

#[cfg(all(test, not(any(loom, shuttle))))]
mod tests {
    use super::*;

    #[test]
    fn install_mark_drain_free_reuses_the_two_arcs() {
        let t = ChangeTracker::new();
        let first = Arc::as_ptr(&t.map.load_full());
        let map = TrackBitmap::new(200).unwrap();
        assert!(map.fits(200) && !map.fits(1000));
        // A dirty bitmap is cleared when installed.
        map.0[1].store(1, Ordering::Relaxed);
        t.install(map);
        assert_eq!(t.words(), 4);
        let second = Arc::as_ptr(&t.map.load_full());
        assert_ne!(first, second);
        t.mark(3);
        t.mark(130);
        t.mark(100_000); // out of range: ignored
        assert_eq!(t.drain().unwrap(), vec![1 << 3, 0, 1 << 2, 0]);
        assert_eq!(t.drain().unwrap(), vec![0; 4]);
        t.mark(64);
        let out = t.free();
        assert_eq!(out.words(), 4);
        assert_eq!(out.0[1].load(Ordering::Relaxed), 1);
        assert_eq!(t.words(), 0);
        // The retired Arc came back as the published one: no third Arc.
        assert_eq!(Arc::as_ptr(&t.map.load_full()), first);
        t.mark(3); // no bitmap: ignored
        assert!(t.drain().unwrap().is_empty());
        t.install(out);
        assert_eq!(Arc::as_ptr(&t.map.load_full()), second);
        assert_eq!(t.drain().unwrap(), vec![0; 4], "install clears");
    }
}
