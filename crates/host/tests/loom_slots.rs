//! loom model of the memslot set's grace period (`SlotsWriter::publish`,
//! `synchronize_srcu`): whatever the interleaving, `publish` returns only after every
//! reader of the previous snapshot dropped it. Run with
//! `RUSTFLAGS="--cfg loom" cargo test -p revmap-host --release --test loom_slots`.
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, Ordering};
use revmap_host::slots::SlotSet;
use revmap_host::{Memslot, MemslotFlags, Memslots};
use revmap_rmap::sync::{thread, Arc};
use revmap_rmap::{Gfn, Hva, SlotId};

fn one_frame_set() -> Memslots {
    let mut m = Memslots::new();
    m.insert(
        Memslot::new(
            SlotId(0),
            Gfn(0),
            1,
            12,
            MemslotFlags::default(),
            Hva(0x10_0000),
        )
        .expect("slot"),
    )
    .expect("insert");
    m
}

#[test]
fn publish_waits_for_every_reader_of_the_old_snapshot() {
    loom::model(|| {
        let set = Arc::new(SlotSet::new(one_frame_set()));
        // (the reader loaded the old set, the reader is done with it)
        let flags = Arc::new((AtomicBool::new(false), AtomicBool::new(false)));
        let reader = {
            let (set, flags) = (set.clone(), flags.clone());
            thread::spawn(move || {
                let snap = set.load();
                if snap.len() == 1 {
                    flags.0.store(true, Ordering::SeqCst);
                }
                flags.1.store(true, Ordering::SeqCst);
                drop(snap);
            })
        };
        let mut w = set.writer();
        let mut empty = w.next().expect("copy");
        assert!(empty.remove(SlotId(0)).is_some());
        w.publish(empty);
        drop(w);
        // A reader that loaded the old set has dropped it before publish returned.
        if flags.0.load(Ordering::SeqCst) {
            assert!(flags.1.load(Ordering::SeqCst), "grace period ended early");
        }
        assert_eq!(set.load().len(), 0);
        reader.join().expect("reader");
    });
}
