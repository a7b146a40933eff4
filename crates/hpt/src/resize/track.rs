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

use crate::hcall::*;
use alloc::boxed::Box;
use alloc::vec::Vec;
use revmap_rmap::error::RmapError;
use revmap_rmap::sync::{ArcCell, AtomicBool, AtomicU64, Ordering};
use revmap_rmap::Ptex;

/// The changed-HPTE bitmap of a VM's current table and the switch that turns marking
/// on ([`Vm::change_tracker`](crate::Vm::change_tracker)).
#[derive(Debug)]
pub struct ChangeTracker {
    /// Marking is on (read by every hypercall).
    on: AtomicBool,
    /// Bit `ptex % 64` of word `ptex / 64`: HPTE `ptex` changed since the last drain.
    /// Empty when no one tracks; replaced only by the tracking owner.
    map: ArcCell<Box<[AtomicU64]>>,
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
            map: ArcCell::new(Box::default()),
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
        let map = self.map.load();
        if let Some(w) = usize::try_from(ptex / 64).ok().and_then(|i| map.get(i)) {
            // ORDERING: Release: the change (made under the HPTE lock, released
            // before this mark) happens-before the drain's AcqRel swap that takes the
            // bit, so the consumer's later look at the entry sees it.
            w.fetch_or(1 << (ptex % 64), Ordering::Release);
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

    /// Allocate a cleared bitmap for a table of `npte` entries (marking itself is
    /// switched on with [`set_tracking`](Self::set_tracking)).
    pub fn alloc(&self, npte: u64) -> Result<(), RmapError> {
        let words = usize::try_from(npte.div_ceil(64))
            .map_err(|_| RmapError::Alloc { bytes: usize::MAX })?;
        let map = revmap_rmap::error::try_boxed_slice(words, |_| AtomicU64::new(0))?;
        drop(self.map.swap(revmap_rmap::sync::Arc::new(map)));
        Ok(())
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
        out.try_reserve_exact(map.len())
            .map_err(|_| RmapError::Alloc {
                bytes: map.len().saturating_mul(8),
            })?;
        // ORDERING: AcqRel: acquires the marks (see `mark`); the swap leaves the word
        // at 0 for the marks that follow.
        out.extend(map.iter().map(|w| w.swap(0, Ordering::AcqRel)));
        Ok(out)
    }

    /// Free the bitmap (tracking must be off).
    pub fn free(&self) {
        drop(self.map.swap(revmap_rmap::sync::Arc::new(Box::default())));
    }
}
