//! The MMU-independent memslot lifecycle (KVM's `kvm_set_memory_region` /
//! `kvm_set_memslot`): create, delete, move and flag changes, each published as a new
//! slot-set snapshot, with the INVALID step before a slot's frames go away.
//!
//! The MMU supplies its part through [`MemslotArch`] (KVM's `kvm_arch_*` memory-region
//! hooks): allocating its per-slot state before anything is published, waking pinned
//! readers during a publication, flushing an INVALID slot's translations, and its own
//! work once a change is visible.
//!
//! # Protocol
//!
//! Every change holds the slot-set writer lock (`slots_lock`, [`SlotSet::writer`]) and
//! [`SlotsWriter::publish_with`] returns only when no reader still uses the previous
//! snapshot (SRCU).
//!
//! * **Create**: the new slot is checked against every other slot (frames and id),
//!   [`MemslotArch::prepare_memory_region`] allocates the MMU's part (an error there
//!   changes nothing), the slot is published, then [`MemslotArch::commit_memory_region`]
//!   runs.
//! * **Delete / move**: the slot is published INVALID (from then on no translation of
//!   it can be created), [`MemslotArch::flush_memslot`] removes every translation of it,
//!   then the set without it (delete) or with it at its new base (move, same per-slot
//!   data) is published and the commit hook runs. A move's new range is checked, and
//!   the prepare hook run, before anything changes.
//! * **Flags**: dirty logging on/off clears the bitmap when logging starts (before the
//!   publication) and when it stops (after it); READONLY cannot change (KVM's
//!   `-EINVAL`); INVALID is internal.

use crate::slots::{SlotSet, SlotsWriter};
use crate::{Memslot, MemslotError, MemslotFlags, Memslots};
use revmap_rmap::{Gfn, SlotId};

/// A change, as [`MemslotArch::prepare_memory_region`] (about to be made visible) and
/// [`MemslotArch::commit_memory_region`] (made visible) see it.
#[derive(Debug, Clone, Copy)]
pub enum MemslotChange<'a> {
    /// A slot was created.
    Create(&'a Memslot),
    /// A slot was deleted (its translations were flushed while it was INVALID).
    Delete(&'a Memslot),
    /// A slot was moved; this is its new descriptor.
    Move(&'a Memslot),
}

/// The MMU-specific steps of a memslot change (KVM's `kvm_arch_*` memory-region hooks).
pub trait MemslotArch {
    /// `kvm_arch_prepare_memory_region`: allocate what the MMU needs for `change` (a
    /// created slot, or a slot at its new base) before anything is published, so that
    /// the commit hook allocates nothing. Called under the slot-set writer lock, after
    /// the change was validated; an error fails the change with nothing changed. The
    /// default has nothing to prepare.
    fn prepare_memory_region(&self, change: MemslotChange<'_>) -> Result<(), MemslotError> {
        let _ = change;
        Ok(())
    }

    /// Called while a publication waits for readers: wake readers that pin a snapshot
    /// across operations (for the HPT, vCPU run handles are kicked through their gate
    /// word so that they re-pin).
    fn kick_readers(&self);

    /// `kvm_arch_flush_shadow_memslot`: remove every translation of `slot`, which is
    /// published INVALID (no translation of it can be created any more).
    fn flush_memslot(&self, slot: &Memslot);

    /// `kvm_arch_commit_memory_region`: the change is published and no reader uses the
    /// previous snapshot.
    fn commit_memory_region(&self, change: MemslotChange<'_>);
}

fn publish<A: MemslotArch + ?Sized>(arch: &A, w: &mut SlotsWriter<'_>, next: Memslots) {
    w.publish_with(next, || arch.kick_readers());
}

fn check_user_flags(flags: MemslotFlags) -> Result<(), MemslotError> {
    if flags.difference(MemslotFlags::USER_MASK).is_empty() {
        Ok(())
    } else {
        Err(MemslotError::BadFlags { flags })
    }
}

fn slot_of(w: &SlotsWriter<'_>, id: SlotId) -> Result<Memslot, MemslotError> {
    w.current()
        .get(id)
        .filter(|s| !s.is_invalid())
        .cloned()
        .ok_or(MemslotError::NoSuchSlot { id })
}

/// The INVALID step, the flush of `old`, and the publication of `after` (delete and
/// move). `after` is built by the caller before anything is published: once the
/// INVALID set is visible nothing may fail, or the slot would stay INVALID (and its
/// id unusable) behind an error.
fn invalidate_flush_and_publish<A: MemslotArch + ?Sized>(
    arch: &A,
    w: &mut SlotsWriter<'_>,
    old: &Memslot,
    after: Memslots,
) -> Result<(), MemslotError> {
    let invalid = old.with_flags(old.flags().union(MemslotFlags::INVALID));
    let mut next = w.next()?;
    next.replace(invalid.clone());
    publish(arch, w, next);
    arch.flush_memslot(&invalid);
    publish(arch, w, after);
    Ok(())
}

/// KVM_MR_CREATE: add `slot` (built by [`Memslot::new`] or [`Memslot::with_memory`]).
/// Fails on flags userspace may not set, on overlap with another slot's frames or id,
/// or if memory is short; nothing changes then.
pub fn create_memslot<A: MemslotArch + ?Sized>(
    set: &SlotSet,
    arch: &A,
    slot: Memslot,
) -> Result<(), MemslotError> {
    check_user_flags(slot.flags())?;
    let mut w = set.writer();
    let mut next = w.next()?;
    next.insert(slot.clone())?;
    arch.prepare_memory_region(MemslotChange::Create(&slot))?;
    publish(arch, &mut w, next);
    arch.commit_memory_region(MemslotChange::Create(&slot));
    Ok(())
}

/// KVM_MR_DELETE: the INVALID step, the flush, the removal.
pub fn delete_memslot<A: MemslotArch + ?Sized>(
    set: &SlotSet,
    arch: &A,
    id: SlotId,
) -> Result<(), MemslotError> {
    let mut w = set.writer();
    let old = slot_of(&w, id)?;
    let mut after = w.next()?;
    after.remove(id);
    invalidate_flush_and_publish(arch, &mut w, &old, after)?;
    arch.commit_memory_region(MemslotChange::Delete(&old));
    Ok(())
}

/// KVM_MR_MOVE: move slot `id` to `new_base` with the same per-slot data (rmap words,
/// bitmap, host memory). The new range is checked first; then the INVALID step, the
/// flush, and the re-insertion.
pub fn move_memslot<A: MemslotArch + ?Sized>(
    set: &SlotSet,
    arch: &A,
    id: SlotId,
    new_base: Gfn,
) -> Result<(), MemslotError> {
    let mut w = set.writer();
    let old = slot_of(&w, id)?;
    if new_base == old.base_gfn() {
        return Ok(());
    }
    let moved = old.with_base(new_base)?;
    // The final set, and with it the overlap check against every other slot, before
    // the INVALID step.
    let mut after = w.next()?;
    after.remove(id);
    after.insert(moved.clone())?;
    arch.prepare_memory_region(MemslotChange::Move(&moved))?;
    invalidate_flush_and_publish(arch, &mut w, &old, after)?;
    arch.commit_memory_region(MemslotChange::Move(&moved));
    Ok(())
}

/// KVM_MR_FLAGS_ONLY: dirty logging on/off, manual dirty-log protection. READONLY
/// cannot change and INVALID is internal ([`MemslotError::BadFlags`]).
pub fn set_memslot_flags<A: MemslotArch + ?Sized>(
    set: &SlotSet,
    arch: &A,
    id: SlotId,
    flags: MemslotFlags,
) -> Result<(), MemslotError> {
    let mut w = set.writer();
    let old = slot_of(&w, id)?;
    check_user_flags(flags)?;
    if flags.contains(MemslotFlags::READONLY) != old.flags().contains(MemslotFlags::READONLY) {
        return Err(MemslotError::BadFlags { flags });
    }
    if flags == old.flags() {
        return Ok(());
    }
    let log = MemslotFlags::LOG_DIRTY_PAGES;
    let starts = flags.contains(log) && !old.flags().contains(log);
    let stops = !flags.contains(log) && old.flags().contains(log);
    if starts {
        // Nobody records while logging is off: start from a clean bitmap.
        old.clear_dirty_bitmap();
    }
    let mut next = w.next()?;
    next.replace(old.with_flags(flags));
    publish(arch, &mut w, next);
    if stops {
        // No reader of the logging snapshot is left: drop what it recorded.
        old.clear_dirty_bitmap();
    }
    Ok(())
}

#[cfg(all(test, not(loom), not(shuttle)))]
mod tests {
    use super::*;
    use revmap_rmap::Hva;
    use std::cell::RefCell;
    use std::string::{String, ToString};
    use std::vec::Vec;

    /// Records the hooks it sees, and what the published set looked like at a flush.
    #[derive(Default)]
    struct Rec(RefCell<Vec<String>>);

    impl MemslotArch for Rec {
        fn kick_readers(&self) {}
        fn flush_memslot(&self, slot: &Memslot) {
            self.0.borrow_mut().push(alloc::format!(
                "flush {:?} invalid={}",
                slot.id(),
                slot.is_invalid()
            ));
        }
        fn commit_memory_region(&self, change: MemslotChange<'_>) {
            let what = match change {
                MemslotChange::Create(s) => alloc::format!("create {:?}", s.base_gfn()),
                MemslotChange::Delete(s) => alloc::format!("delete {:?}", s.id()),
                MemslotChange::Move(s) => alloc::format!("move {:?}", s.base_gfn()),
            };
            self.0.borrow_mut().push(what);
        }
    }

    fn slot(id: u16, base: u64, flags: MemslotFlags) -> Memslot {
        Memslot::new(SlotId(id), Gfn(base), 16, 12, flags, Hva(0x10_0000)).unwrap()
    }

    #[test]
    fn lifecycle_calls_the_hooks_in_order_and_checks_first() {
        let set = SlotSet::new(Memslots::new());
        let arch = Rec::default();
        create_memslot(&set, &arch, slot(1, 0, MemslotFlags::empty())).unwrap();
        assert!(matches!(
            create_memslot(&set, &arch, slot(2, 8, MemslotFlags::empty())),
            Err(MemslotError::Overlap { .. })
        ));
        assert!(matches!(
            create_memslot(&set, &arch, slot(3, 64, MemslotFlags::INVALID)),
            Err(MemslotError::BadFlags { .. })
        ));
        create_memslot(&set, &arch, slot(2, 32, MemslotFlags::empty())).unwrap();
        // Moving onto slot 2 fails before the INVALID step: no flush.
        assert!(matches!(
            move_memslot(&set, &arch, SlotId(1), Gfn(40)),
            Err(MemslotError::Overlap { .. })
        ));
        move_memslot(&set, &arch, SlotId(1), Gfn(64)).unwrap();
        delete_memslot(&set, &arch, SlotId(2)).unwrap();
        assert!(matches!(
            delete_memslot(&set, &arch, SlotId(2)),
            Err(MemslotError::NoSuchSlot { .. })
        ));
        let seen: Vec<String> = arch.0.borrow().clone();
        let expect = [
            "create Gfn(0x0)",
            "create Gfn(0x20)",
            "flush SlotId(0x1) invalid=true",
            "move Gfn(0x40)",
            "flush SlotId(0x2) invalid=true",
            "delete SlotId(0x2)",
        ];
        assert_eq!(seen, expect.map(|s| s.to_string()));
        let now = set.load();
        assert_eq!(now.len(), 1);
        assert_eq!(now.get(SlotId(1)).map(Memslot::base_gfn), Some(Gfn(64)));
    }

    #[test]
    fn flag_changes_clear_the_bitmap_and_keep_readonly() {
        let set = SlotSet::new(Memslots::new());
        let arch = Rec::default();
        create_memslot(&set, &arch, slot(1, 0, MemslotFlags::LOG_DIRTY_PAGES)).unwrap();
        let s = set.load().get(SlotId(1)).cloned().unwrap();
        s.mark_dirty(Gfn(3), 2);
        set_memslot_flags(&set, &arch, SlotId(1), MemslotFlags::empty()).unwrap();
        assert_eq!(s.count_dirty(), 0, "logging stopped: bitmap dropped");
        assert!(matches!(
            set_memslot_flags(&set, &arch, SlotId(1), MemslotFlags::READONLY),
            Err(MemslotError::BadFlags { .. })
        ));
        assert!(!set
            .load()
            .get(SlotId(1))
            .unwrap()
            .flags()
            .contains(MemslotFlags::LOG_DIRTY_PAGES));
    }
}
