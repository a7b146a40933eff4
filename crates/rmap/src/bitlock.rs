//! Bit locks: one bit of an `AtomicU64` word used as a spin lock over the rest of it.
//!
//! This is the locking discipline of KVM's HPTE lock (`HPTE_V_HVLOCK` in dword 0), of
//! the PPC rmap word (bit 43) and of the x86 pte_list head (bit 1). The protocol:
//!
//! * **Lock** is an atomic read-modify-write that sets the bit with `Acquire` ordering,
//!   so every write published by the previous holder's unlock is visible to us.
//! * **Unlock** is a single `Release` store of the whole word with the lock bit clear.
//!   The store *is* the publication: the other bits of the word are written only while
//!   the lock is held, and the unlock store writes their final value together with the
//!   cleared lock bit (as KVM's `unlock_hpte` writes the new dword 0).
//! * A **read-only** holder (a walker that changed nothing) unlocks with the same
//!   `Release` store. KVM's 2025 review of lockless aging (`kvm_rmap_unlock_readonly`) found that a
//!   relaxed read-only unlock lets the next holder's writes be reordered before our
//!   reads; loom checks this (`tests/loom_bitlock.rs`).
//!
//! Bits other than the lock bit are never modified by anyone who does not hold the lock.
//! Readers that do not take the lock (`load`) see a consistent snapshot of the word but
//! no guarantee about what the word protects.

use crate::sync::{spin_loop, AtomicU64, Ordering};

/// Attempt once to set `lock` in `word`, succeeding only if `(word & busy) == 0`.
///
/// `lock` is included in `busy` whether or not the caller listed it. This is KVM's
/// `try_lock_hpte(hpte, bits)`: passing `HVLOCK | VALID | ABSENT` locks a slot only if it
/// is free. Returns the value of the word before locking (lock bit clear) on success.
///
/// Like KVM's single `ldarx`/`stdcx.` attempt, this can fail spuriously when another
/// thread locked and unlocked the word between our read and our CAS; callers that must
/// make progress fall back to [`wait_unlocked`] and retry.
#[inline]
pub fn try_lock_bits(word: &AtomicU64, lock: u64, busy: u64) -> Option<u64> {
    let busy = busy | lock;
    // ORDERING: Relaxed pre-check; it only decides whether to attempt the CAS.
    let old = word.load(Ordering::Relaxed);
    if old & busy != 0 {
        return None;
    }
    // ORDERING: Acquire on success pairs with the Release store of the previous unlock,
    // so everything the previous holder wrote under the lock is visible to us. Failure
    // takes no lock and reads nothing that needs ordering: Relaxed.
    word.compare_exchange(old, old | lock, Ordering::Acquire, Ordering::Relaxed)
        .ok()
}

/// Spin until `lock` can be set in `word`; return the word's value (lock bit clear).
///
/// `lock` is a single-bit mask.
///
/// KVM's `lock_rmap`: spin reading (no cache-line bouncing while another CPU holds it),
/// then set the bit with one atomic RMW (`test_and_set_bit_lock`). The RMW is a CAS
/// from the value just read rather than an unconditional `fetch_or`: uncontended it costs
/// the same, a failed attempt writes nothing, and it keeps the loop a plain
/// test-and-test-and-set that loom can explore to completion (a `fetch_or` spin, which
/// stores on every failed attempt, exceeds loom's branch bound).
#[inline]
pub fn lock_bits(word: &AtomicU64, lock: u64) -> u64 {
    loop {
        if let Some(old) = try_lock_bits(word, lock, lock) {
            return old;
        }
        wait_unlocked(word, lock);
    }
}

/// Busy-wait, read-only, until `lock` is clear in `word`.
///
/// This is step 2 of KVM's restart rule (as in `kvm_unmap_rmapp` / `kvm_age_rmapp`): a walker that failed a try-lock
/// drops its own lock and waits here without writing the contended cache line.
#[inline]
pub fn wait_unlocked(word: &AtomicU64, lock: u64) {
    // ORDERING: Relaxed: this only waits; whoever proceeds re-takes the lock with an
    // Acquire RMW before touching protected data.
    while word.load(Ordering::Relaxed) & lock != 0 {
        spin_loop();
    }
}

/// Release `lock` by storing `value` (with the lock bit cleared) into `word`.
///
/// The caller must hold the lock.
#[inline]
pub fn unlock_store(word: &AtomicU64, lock: u64, value: u64) {
    // ORDERING: Release publishes every write made under the lock (including writes to
    // other words that the lock protects) to the next Acquire locker. Used for
    // read-only unlocks too (see the module docs).
    word.store(value & !lock, Ordering::Release);
}

/// A held bit lock; unlocking (on drop) stores [`BitLockGuard::value`] with the lock bit
/// clear, with `Release` ordering.
///
/// While the guard lives, the word is owned by its holder: edits go to the guard's
/// cached value with [`set`](Self::set) and become visible to everybody at unlock.
#[must_use = "dropping the guard unlocks immediately"]
#[derive(Debug)]
pub struct BitLockGuard<'a> {
    word: &'a AtomicU64,
    lock: u64,
    value: u64,
}

impl<'a> BitLockGuard<'a> {
    /// Spin until the lock is taken.
    #[inline]
    pub fn lock(word: &'a AtomicU64, lock: u64) -> Self {
        let value = lock_bits(word, lock);
        Self { word, lock, value }
    }

    /// Take the lock if `(word & busy) == 0`, in one attempt.
    #[inline]
    pub fn try_lock(word: &'a AtomicU64, lock: u64, busy: u64) -> Option<Self> {
        try_lock_bits(word, lock, busy).map(|value| Self { word, lock, value })
    }

    /// Take the lock and change the word in one read-modify-write: if the word still
    /// equals `expected` (lock clear), replace it with `new` plus the lock bit.
    ///
    /// The guard's value is `new`. This lets a holder publish a change at the very
    /// moment it locks (the HPT clears VALID while locking for H_REMOVE), saving a
    /// separate publishing store and giving that change a place in the `SeqCst` order.
    #[inline]
    pub fn try_lock_replace(
        word: &'a AtomicU64,
        lock: u64,
        expected: u64,
        new: u64,
    ) -> Option<Self> {
        // ORDERING: SeqCst on success: Acquire for the lock, and a place in the single
        // total order so that callers can run store-buffering handshakes (the change is
        // ordered before their later SeqCst loads). Failure takes nothing: Relaxed.
        word.compare_exchange(
            expected & !lock,
            (new & !lock) | lock,
            Ordering::SeqCst,
            Ordering::Relaxed,
        )
        .ok()
        .map(|_| Self {
            word,
            lock,
            value: new & !lock,
        })
    }

    /// The value the word will have when unlocked (lock bit clear).
    #[inline]
    pub fn value(&self) -> u64 {
        self.value
    }

    /// Replace the value that unlock will store. The lock bit of `value` is ignored.
    #[inline]
    pub fn set(&mut self, value: u64) {
        self.value = value & !self.lock;
    }

    /// Make the cached value visible now while keeping the lock held.
    ///
    /// Lock-free readers (`load` without the lock) see the new value; lock takers still
    /// wait. Use when a value must be observable before the critical section ends.
    #[inline]
    pub fn publish(&self) {
        // ORDERING: Release, so a lock-free reader that sees the new value also sees the
        // writes that precede it; the lock bit stays set.
        self.word.store(self.value | self.lock, Ordering::Release);
    }

    /// The word this guard locks.
    #[inline]
    pub fn word(&self) -> &'a AtomicU64 {
        self.word
    }

    /// Unlock, storing `value` (same as setting it and dropping the guard).
    #[inline]
    pub fn unlock_with(mut self, value: u64) {
        self.set(value);
    }
}

impl Drop for BitLockGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        unlock_store(self.word, self.lock, self.value);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const LOCK: u64 = 1 << 43;

    #[test]
    fn lock_sets_and_drop_clears_the_bit() {
        let w = AtomicU64::new(0x1234);
        {
            let mut g = BitLockGuard::lock(&w, LOCK);
            assert_eq!(g.value(), 0x1234);
            assert_eq!(w.load(Ordering::Relaxed), 0x1234 | LOCK);
            g.set(0x5678 | LOCK);
            assert_eq!(g.value(), 0x5678);
        }
        assert_eq!(w.load(Ordering::Relaxed), 0x5678);
    }

    #[test]
    fn try_lock_respects_busy_mask_and_held_lock() {
        let w = AtomicU64::new(0x1);
        assert!(BitLockGuard::try_lock(&w, 0x40, 0x40 | 0x1).is_none());
        assert_eq!(
            w.load(Ordering::Relaxed),
            0x1,
            "failed try-lock must not write"
        );
        let g = BitLockGuard::try_lock(&w, 0x40, 0x40).expect("free");
        assert!(BitLockGuard::try_lock(&w, 0x40, 0x40).is_none());
        drop(g);
        assert_eq!(w.load(Ordering::Relaxed), 0x1);
    }

    #[test]
    fn try_lock_replace_changes_and_locks_only_from_expected() {
        let w = AtomicU64::new(0x21);
        assert!(BitLockGuard::try_lock_replace(&w, LOCK, 0x20, 0x1).is_none());
        assert_eq!(w.load(Ordering::Relaxed), 0x21, "mismatch must not write");
        let g = BitLockGuard::try_lock_replace(&w, LOCK, 0x21, 0x20).expect("matches");
        assert_eq!(
            w.load(Ordering::Relaxed),
            0x20 | LOCK,
            "change visible while locked"
        );
        assert!(BitLockGuard::try_lock_replace(&w, LOCK, 0x20, 0x0).is_none());
        drop(g);
        assert_eq!(w.load(Ordering::Relaxed), 0x20);
    }

    #[test]
    fn publish_keeps_lock_held() {
        let w = AtomicU64::new(0);
        let mut g = BitLockGuard::lock(&w, LOCK);
        g.set(7);
        g.publish();
        assert_eq!(w.load(Ordering::Relaxed), 7 | LOCK);
        g.unlock_with(9);
        assert_eq!(w.load(Ordering::Relaxed), 9);
    }

    #[cfg(feature = "std")]
    #[test]
    fn counter_under_contention_is_exact() {
        use crate::sync::{thread, Arc};
        let w = Arc::new(AtomicU64::new(0));
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let w = w.clone();
                thread::spawn(move || {
                    for _ in 0..10_000 {
                        let mut g = BitLockGuard::lock(&w, LOCK);
                        let v = g.value();
                        g.set(v + 1);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(w.load(Ordering::Relaxed), 40_000);
    }
}
