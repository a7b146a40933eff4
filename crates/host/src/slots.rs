//! The replaceable memslot set of one VM (KVM's SRCU-protected `kvm_memslots`).
//!
//! Readers (hypercalls, vCPU faults, host walkers) call [`SlotSet::load`] and use the
//! snapshot they got for the whole operation; a writer (memslot create/delete/move/flag
//! change, serialised by [`SlotSet::writer`], KVM's `slots_lock`) builds a new
//! [`Memslots`], publishes it with [`SlotsWriter::publish`], which returns only once no
//! reader still holds the previous snapshot (`synchronize_srcu`).
//!
//! # Implementation
//!
//! The set lives in a [`revmap_rmap::sync::ArcCell`] (the workspace's one sync switch
//! point): in production an `arc_swap::ArcSwap`, whose load is a thread-local debt slot
//! write plus a pointer load, so vCPUs do not contend; under loom and shuttle an
//! `RwLock<Arc<Memslots>>`, so every interleaving of publication and readers is
//! explored. `publish` swaps the pointer (every outstanding reader of the old set then
//! holds a counted reference) and waits until the old snapshot's reference count drops
//! to one: from then on no reader uses it.
//!
//! Publication allocates nothing. Stable Rust has no fallible `Arc` allocation, so the
//! set keeps a second, spare `Arc` (allocated with the set, at VM creation) under the
//! writer lock: `publish` moves the next set into the spare and swaps it in; the old
//! `Arc`, unique once the grace period is over, has its set dropped (an empty
//! [`Memslots`] does not allocate) and becomes the spare. So a memslot change can fail
//! only while it builds the next set ([`SlotsWriter::next`], fallible), before anything
//! is published: the old set stays published.
//!
//! # Invariants
//!
//! * A reader never sees a half-built set: snapshots are immutable once published.
//! * After `publish` returns, no reader holds the previous snapshot, so e.g. after the
//!   INVALID step every new reader sees the slot INVALID.
//! * Readers must not hold a snapshot across a call that publishes (self-deadlock: the
//!   grace period would wait for the caller itself).

use crate::{MemslotError, Memslots};
use core::ops::Deref;
use revmap_rmap::sync::{lock, yield_now, Arc, ArcCell, ArcGuard, Mutex, MutexGuard};

/// The published memslot set with its writer lock.
pub struct SlotSet {
    cell: ArcCell<Memslots>,
    /// The writer lock, protecting the spare `Arc` (unique, holding an empty set) that
    /// the next publication fills (module docs: # Implementation).
    writer: Mutex<Option<Arc<Memslots>>>,
}

impl core::fmt::Debug for SlotSet {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SlotSet")
            .field("slots", &*self.load())
            .finish()
    }
}

/// A reader's snapshot of the memslot set (an SRCU read-side critical section): keep it
/// for the whole operation, drop it before anything that publishes.
pub struct SlotsRef(ArcGuard<Memslots>);

impl Deref for SlotsRef {
    type Target = Memslots;
    #[inline(always)]
    fn deref(&self) -> &Memslots {
        &self.0
    }
}

/// The writer lock (`slots_lock`): only its holder may publish.
pub struct SlotsWriter<'a> {
    set: &'a SlotSet,
    spare: MutexGuard<'a, Option<Arc<Memslots>>>,
}

impl SlotSet {
    /// A set publishing `initial` (with the spare `Arc` of later publications).
    pub fn new(initial: Memslots) -> Self {
        Self {
            cell: ArcCell::new(initial),
            writer: Mutex::new(Some(Arc::new(Memslots::new()))),
        }
    }

    /// Load the current snapshot (`srcu_read_lock` + `kvm_memslots`).
    #[inline(always)]
    pub fn load(&self) -> SlotsRef {
        SlotsRef(self.cell.load())
    }

    /// A counted reference to the current snapshot, for readers that keep it across many
    /// operations (a vCPU run handle pins one until it is kicked): the grace period of
    /// [`SlotsWriter::publish`] waits for it to be dropped, so such a reader must be
    /// told to re-pin (see [`SlotsWriter::publish_with`]).
    pub fn load_full(&self) -> Arc<Memslots> {
        self.cell.load_full()
    }

    /// Take the writer lock (serialises lifecycle changes; readers are not blocked).
    pub fn writer(&self) -> SlotsWriter<'_> {
        SlotsWriter {
            set: self,
            spare: lock(&self.writer),
        }
    }
}

impl SlotsWriter<'_> {
    /// The current snapshot. Only writers change it, and we hold the writer lock.
    pub fn current(&self) -> SlotsRef {
        self.set.load()
    }

    /// A fallible copy of the current set to edit into the next one.
    pub fn next(&self) -> Result<Memslots, MemslotError> {
        self.current().try_clone()
    }

    /// Publish `next` and wait until no reader holds the previous snapshot
    /// (`rcu_assign_pointer` + `synchronize_srcu`). The caller must hold no
    /// [`SlotsRef`] of this set.
    pub fn publish(&mut self, next: Memslots) {
        self.publish_with(next, || {});
    }

    /// [`publish`](Self::publish), calling `kick` after the new set is visible and
    /// before the grace period: the hook that tells long-lived readers (pinned with
    /// [`SlotSet::load_full`]) to drop the old snapshot and re-pin.
    ///
    /// Allocates nothing: `next` goes into the spare `Arc`, and the old one, once no
    /// reader holds it, is emptied and kept as the next spare (module docs).
    pub fn publish_with(&mut self, next: Memslots, kick: impl FnOnce()) {
        let next = match self.spare.take() {
            Some(mut spare) => match Arc::get_mut(&mut spare) {
                Some(set) => {
                    *set = next;
                    spare
                }
                // Unreachable: the spare is only ever an `Arc` that no reader holds
                // (the grace period below) and no one downgrades.
                None => Arc::new(next),
            },
            // Unreachable for the same reason (every publication leaves a spare).
            None => Arc::new(next),
        };
        let mut old = self.set.cell.swap(next);
        kick();
        // Grace period: every reader that loaded `old` holds a counted reference to it
        // (arc-swap paid its debts in `swap`); wait for all of them to drop it.
        while Arc::strong_count(&old) > 1 {
            yield_now();
        }
        // No reader left: drop the old set's contents (a deleted slot's arrays are
        // freed here, as before) and keep its `Arc` as the next spare.
        if let Some(set) = Arc::get_mut(&mut old) {
            *set = Memslots::new();
            *self.spare = Some(old);
        }
    }
}

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests {
    use super::*;
    use crate::{Memslot, MemslotFlags};
    use revmap_rmap::{Gfn, Hva, SlotId};
    use std::sync::atomic::{AtomicBool, Ordering};

    fn set_with(n: u16) -> Memslots {
        let mut m = Memslots::new();
        for i in 0..n {
            m.insert(
                Memslot::new(
                    SlotId(i),
                    Gfn(u64::from(i) * 0x100),
                    0x100,
                    12,
                    MemslotFlags::default(),
                    Hva(0x10_0000 * (u64::from(i) + 1)),
                )
                .unwrap(),
            )
            .unwrap();
        }
        m
    }

    #[test]
    fn publish_replaces_and_shares_data() {
        let s = SlotSet::new(set_with(1));
        let before = s.load().get(SlotId(0)).unwrap().clone();
        {
            let mut w = s.writer();
            let mut n = w.next().unwrap();
            let moved = n.remove(SlotId(0)).unwrap().with_base(Gfn(0x1000)).unwrap();
            n.insert(moved).unwrap();
            w.publish(n);
        }
        let now = s.load();
        let after = now.get(SlotId(0)).unwrap();
        assert_eq!(after.base_gfn(), Gfn(0x1000));
        assert!(after.same_data(&before), "move keeps the rmap array");
        assert!(now.lookup(Gfn(0x10)).is_none());
    }

    /// Publication allocates no `Arc`: it alternates between the set's two, and the
    /// one it retires no longer holds the old slots (their data is freed).
    #[test]
    fn publish_alternates_between_two_arcs_and_drops_the_old_set() {
        let s = SlotSet::new(set_with(2));
        let first = Arc::as_ptr(&s.load_full());
        let data0 = s.load().get(SlotId(0)).unwrap().clone();
        {
            let mut w = s.writer();
            let mut n = w.next().unwrap();
            n.remove(SlotId(0)).unwrap();
            w.publish(n);
        }
        let second = Arc::as_ptr(&s.load_full());
        assert_ne!(first, second);
        assert!(s.load().get(SlotId(0)).is_none());
        {
            let w = s.writer();
            let spare = w.spare.as_ref().expect("a spare after publishing");
            assert_eq!(Arc::as_ptr(spare), first, "the retired Arc is the spare");
            assert_eq!(spare.len(), 0, "the retired set was dropped");
        }
        drop(data0);
        {
            let mut w = s.writer();
            let n = w.next().unwrap();
            w.publish(n);
        }
        assert_eq!(Arc::as_ptr(&s.load_full()), first, "the spare was reused");
        assert_eq!(s.load().len(), 1);
    }

    /// The writer's kick hook runs after the swap and before the grace period; the
    /// test holds a reader across it and only then records the release and drops the
    /// reader. A publish that returned before the reader dropped its snapshot would
    /// read `released == false`. (The exhaustive version is `tests/loom_slots.rs`.)
    #[test]
    fn publish_waits_for_readers_of_the_old_snapshot() {
        let s = SlotSet::new(set_with(1));
        let released = AtomicBool::new(false);
        let swapped = std::sync::Barrier::new(2);
        std::thread::scope(|sc| {
            let reader = s.load();
            let writer = sc.spawn(|| {
                let mut w = s.writer();
                let n = w.next().unwrap();
                w.publish_with(n, || {
                    swapped.wait();
                });
                released.load(Ordering::SeqCst)
            });
            swapped.wait();
            assert_eq!(reader.len(), 1, "the old snapshot is still readable");
            released.store(true, Ordering::SeqCst);
            drop(reader);
            assert!(
                writer.join().unwrap(),
                "grace period ended while a reader held the old snapshot"
            );
        });
    }
}
