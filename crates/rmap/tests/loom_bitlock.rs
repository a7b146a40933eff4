//! loom models of the bit locks (`revmap_rmap::bitlock`).
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p revmap-rmap
//! --release --test loom_bitlock`.
//!
//! * (a) `lock`/`try_lock` + unlock give mutual exclusion, and data written `Relaxed`
//!   under the lock (a loom `AtomicU64`) is visible to the next holder; a counter kept in
//!   the lock word's own bits through the guard is exact.
//! * (b) the read-only unlock must be `Release` (KVM's `kvm_rmap_unlock_readonly` fix): a read-only holder's read
//!   of the protected data must happen before the next holder's write. loom does not model
//!   load buffering (a Relaxed load reading a store that is later in happens-before
//!   order), so a model whose data is an atomic cannot show the bug; the protected data is
//!   therefore a loom-tracked cell (`Tracked`), whose accesses loom checks for causality.
//!   With our `Release` unlock the model passes; `weak_read_only_unlock_is_caught`
//!   replays it with a deliberately `Relaxed` read-only unlock and loom reports the
//!   read/write race (the test is `should_panic`).
//! * The same pair for (a): `weak_acquire_loses_updates` runs the counter model with a
//!   `Relaxed` lock RMW and loom finds the stale read.
//! * The `should_panic` tests name the panic they expect, so they cannot pass by
//!   exceeding loom's branch bound instead (which is how a `fetch_or` spin loop fails
//!   under loom; see `bitlock::lock_bits`).
#![cfg(loom)]

use loom::model::Builder;
use revmap_rmap::bitlock::{lock_bits, try_lock_bits, unlock_store, wait_unlocked, BitLockGuard};
use revmap_rmap::sync::{thread, Arc, AtomicU64, Ordering};

const LOCK: u64 = 1 << 43;

fn builder(preemptions: usize) -> Builder {
    let mut b = Builder::new();
    b.preemption_bound = Some(preemptions);
    b
}

/// A loom-checked stand-in for plain memory protected by a lock: the value lives in an
/// atomic (accessed `Relaxed`), and every access is also announced to loom's causality
/// tracker, which panics if a read and a write (or two writes) are not ordered by
/// happens-before. The tracker's pointer is never dereferenced.
struct Tracked {
    value: AtomicU64,
    tracker: loom::cell::UnsafeCell<()>,
}

// SAFETY: the only non-Sync part is `tracker`, an `UnsafeCell<()>` whose pointer is never
// dereferenced (zero-sized, no data to race on); its accesses only feed loom's causality
// checker, which is itself designed to be shared between loom threads.
unsafe impl Sync for Tracked {}

impl Tracked {
    fn new(v: u64) -> Self {
        Self {
            value: AtomicU64::new(v),
            tracker: loom::cell::UnsafeCell::new(()),
        }
    }
    fn read(&self) -> u64 {
        self.tracker.with(|_| ());
        // ORDERING: Relaxed: the lock under test must provide the ordering.
        self.value.load(Ordering::Relaxed)
    }
    fn write(&self, v: u64) {
        self.tracker.with_mut(|_| ());
        // ORDERING: Relaxed: the lock under test must provide the ordering.
        self.value.store(v, Ordering::Relaxed);
    }
}

/// (a) Two holders increment a counter under the lock: one with the spinning guard, one
/// with try-lock plus read-only waiting (the restart pattern). The counter lives both in
/// a separate `Relaxed` atomic and in the word's own bits (guard `set`).
#[test]
fn lock_gives_mutual_exclusion_and_visibility() {
    builder(3).check(|| {
        let word = Arc::new(AtomicU64::new(0));
        let data = Arc::new(Tracked::new(0));
        let (w2, d2) = (word.clone(), data.clone());
        let t = thread::spawn(move || {
            let mut g = BitLockGuard::lock(&w2, LOCK);
            let v = d2.read();
            d2.write(v + 1);
            let c = g.value();
            g.set(c + 1);
        });
        loop {
            if let Some(mut g) = BitLockGuard::try_lock(&word, LOCK, LOCK) {
                let v = data.read();
                data.write(v + 1);
                let c = g.value();
                g.set(c + 1);
                break;
            }
            wait_unlocked(&word, LOCK);
        }
        t.join().unwrap();
        assert_eq!(data.read(), 2);
        // ORDERING: Relaxed; join ordered everything.
        assert_eq!(
            word.load(Ordering::Relaxed),
            2,
            "lock bit clear, count exact"
        );
    });
}

/// (a) The free-function API: `lock_bits` / `try_lock_bits` / `unlock_store`, with a busy
/// mask that includes a non-lock bit (as `try_lock_hpte` with VALID|ABSENT).
#[test]
fn busy_mask_try_lock_only_takes_free_words() {
    const VALID: u64 = 1;
    builder(3).check(|| {
        let word = Arc::new(AtomicU64::new(0));
        let data = Arc::new(Tracked::new(0));
        let (w2, d2) = (word.clone(), data.clone());
        // A claimer: takes the slot only if free (not VALID), then marks it VALID.
        let t = thread::spawn(move || {
            if let Some(old) = try_lock_bits(&w2, LOCK, LOCK | VALID) {
                d2.write(7);
                unlock_store(&w2, LOCK, old | VALID);
                true
            } else {
                false
            }
        });
        let old = lock_bits(&word, LOCK);
        let seen = data.read();
        if old & VALID != 0 {
            assert_eq!(seen, 7, "VALID published together with the data");
        } else {
            assert_eq!(seen, 0);
        }
        unlock_store(&word, LOCK, old);
        let claimed = t.join().unwrap();
        // ORDERING: Relaxed; join ordered everything.
        let end = word.load(Ordering::Relaxed);
        assert_eq!(end & LOCK, 0);
        assert_eq!(end & VALID != 0, claimed);
    });
}

/// (b) A read-only holder followed or preceded by a writer: the read-only unlock is the
/// guard's `Release` store, so the read happens before the writer's write (or after it).
#[test]
fn read_only_unlock_orders_reads_before_next_writer() {
    builder(3).check(|| {
        let word = Arc::new(AtomicU64::new(0));
        let data = Arc::new(Tracked::new(0));
        let (w2, d2) = (word.clone(), data.clone());
        let reader = thread::spawn(move || {
            let g = BitLockGuard::lock(&w2, LOCK);
            let v = d2.read();
            drop(g); // read-only unlock: the word is stored back unchanged
            v
        });
        {
            let _g = BitLockGuard::lock(&word, LOCK);
            data.write(1);
        }
        let v = reader.join().unwrap();
        assert!(v == 0 || v == 1);
    });
}

/// (b), weak variant: the same model with a `Relaxed` read-only unlock. loom finds the
/// execution where the writer acquires after the reader released, yet the reader's read
/// is not ordered before the writer's write, and reports it as a causality violation.
#[test]
#[should_panic(expected = "Causality violation")]
fn weak_read_only_unlock_is_caught() {
    fn weak_read_only_unlock(word: &AtomicU64, value: u64) {
        // ORDERING: deliberately too weak (Relaxed); the bug KVM's read-only unlock once had.
        word.store(value & !LOCK, Ordering::Relaxed);
    }
    builder(3).check(|| {
        let word = Arc::new(AtomicU64::new(0));
        let data = Arc::new(Tracked::new(0));
        let (w2, d2) = (word.clone(), data.clone());
        let reader = thread::spawn(move || {
            let old = lock_bits(&w2, LOCK);
            let v = d2.read();
            weak_read_only_unlock(&w2, old);
            v
        });
        {
            let _g = BitLockGuard::lock(&word, LOCK);
            data.write(1);
        }
        reader.join().unwrap();
    });
}

/// (a), weak variant: a lock RMW with `Relaxed` instead of `Acquire` loses an update
/// (the second holder reads the counter without seeing the first holder's write).
#[test]
#[should_panic(expected = "lost update")]
fn weak_acquire_loses_updates() {
    fn weak_lock(word: &AtomicU64) -> u64 {
        loop {
            // ORDERING: Relaxed pre-check, as in `try_lock_bits`.
            let old = word.load(Ordering::Relaxed) & !LOCK;
            // ORDERING: deliberately too weak (Relaxed instead of Acquire on success).
            if word
                .compare_exchange(old, old | LOCK, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return old;
            }
            wait_unlocked(word, LOCK);
        }
    }
    builder(3).check(|| {
        let word = Arc::new(AtomicU64::new(0));
        let data = Arc::new(AtomicU64::new(0));
        let (w2, d2) = (word.clone(), data.clone());
        let incr = move |word: &AtomicU64, data: &AtomicU64| {
            let old = weak_lock(word);
            // ORDERING: Relaxed data under the lock, as in the strong model.
            let v = data.load(Ordering::Relaxed);
            // ORDERING: as above.
            data.store(v + 1, Ordering::Relaxed);
            unlock_store(word, LOCK, old);
        };
        let t = thread::spawn(move || incr(&w2, &d2));
        incr(&word, &data);
        t.join().unwrap();
        // ORDERING: Relaxed; join ordered everything.
        assert_eq!(data.load(Ordering::Relaxed), 2, "lost update");
    });
}
