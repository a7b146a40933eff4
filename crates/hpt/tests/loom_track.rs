//! Loom model of the pre-copy change tracker (`resize::track`): a vCPU changes an
//! entry and then marks it; the committer drains the bitmap and, for every mark it
//! took, looks at the entry. Whatever the interleaving and the weak-memory outcome, a
//! drain that takes a mark sees the change it marks (the mark's `Release` against the
//! drain's `Acquire` load, or `AcqRel` swap, of the word); a mark the drain misses
//! stays for the next drain, which takes it once the vCPU is done.
//!
//! The change is a `Relaxed` store here, so that only the tracker can order it: in the
//! hypervisor it is made under the HPTE lock, which the consumer also takes, but the
//! final stop reads the old table's words without it.
//!
//! The should-fail variant marks with `Relaxed` (the hidden `mark_with::<false>`, never
//! called by production code): loom finds the execution where the drain takes the
//! bit and reads the entry unchanged.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p revmap-hpt
//! --release --test loom_track`.
#![cfg(loom)]

use loom::sync::atomic::{AtomicU64, Ordering};
use revmap_hpt::resize::track::ChangeTracker;
use revmap_rmap::sync::{thread, Arc};

mod common;
use common::loom_model;

/// The entry the vCPU changes (index 5 of the table).
const PTEX: u64 = 5;

fn track_model<const RELEASE: bool>() {
    loom_model(|| {
        let tracker = Arc::new(ChangeTracker::new());
        tracker.alloc(64).expect("bitmap");
        tracker.set_tracking(true);
        let entry = Arc::new(AtomicU64::new(0));
        let vcpu = {
            let (tracker, entry) = (tracker.clone(), entry.clone());
            thread::spawn(move || {
                // ORDERING: Relaxed: the change to be ordered by the mark alone.
                entry.store(1, Ordering::Relaxed);
                tracker.mark_with::<RELEASE>(PTEX);
            })
        };
        let look = |bits: &[u64]| {
            if bits.first().is_some_and(|w| w & (1 << PTEX) != 0) {
                assert_eq!(
                    entry.load(Ordering::Relaxed),
                    1,
                    "the drain took a mark without the change it marks"
                );
                true
            } else {
                false
            }
        };
        let first = look(&tracker.drain().expect("drain"));
        vcpu.join().expect("vcpu");
        // After the vCPU is done (as after the gate's drain) the mark is taken now if
        // the first drain missed it, and exactly once in all.
        let second = look(&tracker.drain().expect("drain"));
        assert!(first ^ second, "the mark was lost or taken twice");
    });
}

#[test]
fn a_drain_that_takes_a_mark_sees_the_change() {
    track_model::<true>();
}

#[test]
#[should_panic(expected = "the drain took a mark without the change it marks")]
fn a_relaxed_mark_lets_the_drain_miss_the_change() {
    track_model::<false>();
}
