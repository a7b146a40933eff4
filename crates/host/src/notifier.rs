//! The MMU-notifier invalidation sequence (KVM's `mmu_invalidate_seq` and
//! `mmu_invalidate_in_progress`), shared by every MMU that maps host pages.
//!
//! # Protocol
//!
//! A host-side invalidation (reclaim, `change_pte`, an explicit
//! `invalidate_range_start`/`end` pair) brackets its work with [`InvalidateSeq::begin`]
//! and [`InvalidateSeq::end`]. An inserter (H_ENTER, a page fault) samples the sequence
//! with [`InvalidateSeq::sample`] before translating gfn -> host page, and checks
//! [`InvalidateSeq::retry`] under the rmap lock before making the new mapping visible:
//! if an invalidation ran or is running, it backs off (the HPT demotes the new entry to
//! ABSENT). Because the invalidation's walker takes the same rmap locks, either the
//! walker sees the new mapping on the chain or the inserter sees the invalidation.

use revmap_rmap::sync::{AtomicU64, Ordering};

/// KVM's `mmu_invalidate_seq` and `mmu_invalidate_in_progress`.
#[derive(Debug, Default)]
pub struct InvalidateSeq {
    seq: AtomicU64,
    in_progress: AtomicU64,
}

impl InvalidateSeq {
    /// Sample the sequence before a gfn -> host translation (`mmu_invalidate_seq` read
    /// followed by `smp_rmb`).
    #[inline(always)]
    pub fn sample(&self) -> u64 {
        // ORDERING: Acquire: the later host-presence reads must not be hoisted above it.
        self.seq.load(Ordering::Acquire)
    }

    /// True if an invalidation is running now.
    #[inline(always)]
    pub fn in_progress(&self) -> bool {
        // ORDERING: Acquire, pairs with the Release in `begin`.
        self.in_progress.load(Ordering::Acquire) != 0
    }

    /// `mmu_invalidate_retry`: must be called with the rmap lock held. True if an
    /// invalidation is running or completed since `sampled`.
    #[inline(always)]
    pub fn retry(&self, sampled: u64) -> bool {
        if self.in_progress() {
            return true;
        }
        // ORDERING: Acquire (smp_rmb between the two reads).
        self.seq.load(Ordering::Acquire) != sampled
    }

    /// Start a host-side invalidation (`mmu_invalidate_begin`).
    pub fn begin(&self) {
        // ORDERING: SeqCst so that it is ordered before the invalidation's rmap walk
        // and visible to any inserter that takes an rmap lock after it.
        self.in_progress.fetch_add(1, Ordering::SeqCst);
    }

    /// End a host-side invalidation (`mmu_invalidate_end`): bump the sequence, then
    /// drop the in-progress count.
    pub fn end(&self) {
        // ORDERING: SeqCst: the sequence bump is visible before the count drops.
        self.seq.fetch_add(1, Ordering::SeqCst);
        self.in_progress.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn invalidate_seq_retry() {
        let s = InvalidateSeq::default();
        let t = s.sample();
        assert!(!s.retry(t));
        s.begin();
        assert!(s.retry(t) && s.in_progress());
        s.end();
        assert!(s.retry(t), "sequence moved");
        assert!(!s.retry(s.sample()));
    }
}
