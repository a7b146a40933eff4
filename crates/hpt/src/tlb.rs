//! TLB invalidation ("tlbie") between the hypervisor and the vCPU MMU models, and the
//! MMU-notifier invalidation sequence (`mmu_invalidate_seq`).
//!
//! # The tlbie handshake
//!
//! The VM keeps one TLB generation `gen`. A vCPU access runs inside an *access epoch*:
//! it announces the generation it saw in its own cache-padded epoch word, re-reads
//! `gen` (retrying if it moved), uses only TLB entries tagged with that generation, and
//! stores `IDLE` when the access (including any hardware R/C `fetch_or`) is complete.
//!
//! A hypervisor invalidation ([`TlbDomain::tlbie`]) happens after the HPTE change it
//! stabilises has been published (VALID cleared, or R cleared); it increments `gen` and
//! then waits until every registered vCPU is idle or has announced the new generation.
//! When it returns:
//! * no vCPU uses a TLB entry from before the change (their generation is stale), and
//! * every hardware R/C update made through the old translation has completed, so the
//!   caller may read dword 1 and harvest final R/C (reference D5/D6, invariant 11).
//!
//! The announce/re-read on the vCPU side and the increment/scan on the hypervisor side
//! form a store-buffer (Dekker) pattern; all four accesses are `SeqCst`, so at least
//! one side sees the other. A vCPU that registers concurrently with a tlbie is either
//! seen by the scan or starts after the increment and sees the published HPTE change.
//!
//! # mmu_invalidate_seq
//!
//! [`InvalidateSeq`] is KVM's `mmu_invalidate_seq` + `mmu_invalidate_in_progress`: a
//! host-side invalidation (later issue) brackets its work with `begin`/`end`; H_ENTER
//! samples the sequence before translating gfn -> host pfn and checks
//! [`InvalidateSeq::retry`] under the rmap lock, demoting the new HPTE to ABSENT on a
//! race (invariant 15).

use crate::error::HptError;
use alloc::boxed::Box;
use revmap_rmap::error::try_boxed_slice;
use revmap_rmap::sync::{spin_loop, AtomicU64, Ordering};

/// Maximum number of vCPU MMU models attached to one VM (the supported vCPU count,
/// [`revmap_rmap::MAX_VCPUS`]).
pub use revmap_rmap::MAX_VCPUS;

/// Epoch word value of a vCPU not inside an access.
const IDLE: u64 = u64::MAX;

#[derive(Debug)]
#[repr(align(128))]
struct Epoch(AtomicU64);

/// The TLB generation and the per-vCPU access epochs of one VM.
#[derive(Debug)]
pub struct TlbDomain {
    gen: AtomicU64,
    registered: AtomicU64,
    epochs: Box<[Epoch]>,
}

impl TlbDomain {
    /// A domain with no vCPU attached.
    pub fn new() -> Result<Self, HptError> {
        Ok(Self {
            gen: AtomicU64::new(0),
            registered: AtomicU64::new(0),
            epochs: try_boxed_slice(MAX_VCPUS, |_| Epoch(AtomicU64::new(IDLE)))?,
        })
    }

    /// Current generation.
    #[inline]
    pub fn generation(&self) -> u64 {
        // ORDERING: SeqCst: part of the announce/re-read handshake (module docs).
        self.gen.load(Ordering::SeqCst)
    }

    /// Invalidate every vCPU's TLB and wait until no access that may have used an old
    /// translation is still running (global `tlbie` + `tlbsync` + `ptesync`).
    #[inline]
    pub fn tlbie(&self) {
        // ORDERING: SeqCst RMW, the hypervisor half of the Dekker handshake; also a
        // release of the HPTE change published before it.
        let new = self.gen.fetch_add(1, Ordering::SeqCst).wrapping_add(1);
        // ORDERING: SeqCst so the scan is ordered after the increment (module docs).
        let mut reg = self.registered.load(Ordering::SeqCst);
        while reg != 0 {
            let i = reg.trailing_zeros() as usize;
            reg &= reg - 1;
            if let Some(e) = self.epochs.get(i) {
                loop {
                    // ORDERING: SeqCst (handshake) and acquire: seeing IDLE or a newer
                    // epoch means the vCPU's R/C fetch_or of its old access happened
                    // before, so our later dword 1 read sees it.
                    let a = e.0.load(Ordering::SeqCst);
                    if a == IDLE || a >= new {
                        break;
                    }
                    spin_loop();
                }
            }
        }
    }

    /// Complete an invalidation whose HPTE change was published by a `SeqCst`
    /// read-modify-write (see [`Hpt::try_lock_replace`](crate::table::Hpt::try_lock_replace)):
    /// like [`tlbie`](Self::tlbie), but free when no vCPU MMU is attached.
    ///
    /// With no vCPU registered nobody holds a translation to shoot down. A vCPU that
    /// registers concurrently does so with a `SeqCst` RMW on `registered` and then reads
    /// dword 0 with `SeqCst` loads; our change is a `SeqCst` RMW followed by a `SeqCst`
    /// load of `registered`. In the single total order either our load sees its
    /// registration (and we run the full handshake), or its registration comes after
    /// our load and hence after our change, so its first HPT search sees the change
    /// (the store-buffering pattern with every access sequentially consistent).
    #[inline]
    pub fn tlbie_after_sc_rmw(&self) {
        // ORDERING: SeqCst, the hypervisor half of the handshake described above.
        if self.registered.load(Ordering::SeqCst) == 0 {
            return;
        }
        self.tlbie();
    }

    /// Wait until every registered vCPU is outside an access epoch (a resize commit,
    /// after closing the gate, so that no MMU access uses the table being replaced).
    pub fn wait_all_idle(&self) {
        // ORDERING: SeqCst: the committer half of the gate handshake
        // (`resize::cell`), ordered after its SeqCst close.
        let mut reg = self.registered.load(Ordering::SeqCst);
        while reg != 0 {
            let i = reg.trailing_zeros() as usize;
            reg &= reg - 1;
            if let Some(e) = self.epochs.get(i) {
                // ORDERING: SeqCst (handshake) and acquiring the access's R/C updates.
                while e.0.load(Ordering::SeqCst) != IDLE {
                    spin_loop();
                }
            }
        }
    }

    /// Attach a vCPU: returns its epoch slot.
    pub fn register(&self) -> Result<usize, HptError> {
        loop {
            // ORDERING: SeqCst, ordered with the tlbie scan (module docs).
            let cur = self.registered.load(Ordering::SeqCst);
            if cur == u64::MAX {
                return Err(HptError::TooManyVcpus { max: MAX_VCPUS });
            }
            let i = (!cur).trailing_zeros();
            if self
                .registered
                // ORDERING: SeqCst for the same reason; failure just retries.
                .compare_exchange(cur, cur | (1 << i), Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            {
                return Ok(i as usize);
            }
        }
    }

    /// Detach vCPU slot `i` (it must be idle).
    pub fn unregister(&self, i: usize) {
        if i < MAX_VCPUS {
            // ORDERING: SeqCst, ordered with the tlbie scan.
            self.registered.fetch_and(!(1u64 << i), Ordering::SeqCst);
        }
    }

    /// Enter an access epoch for vCPU slot `i`; returns the generation whose TLB
    /// entries may be used until [`end_access`](Self::end_access).
    #[inline]
    pub fn begin_access(&self, i: usize) -> u64 {
        let Some(e) = self.epochs.get(i) else {
            return self.generation();
        };
        loop {
            let g = self.generation();
            // ORDERING: SeqCst, the vCPU half of the Dekker handshake.
            e.0.store(g, Ordering::SeqCst);
            if self.generation() == g {
                return g;
            }
        }
    }

    /// Leave the access epoch of vCPU slot `i`.
    #[inline]
    pub fn end_access(&self, i: usize) {
        if let Some(e) = self.epochs.get(i) {
            // ORDERING: Release: the access's R/C updates happen-before a tlbie that
            // observes IDLE.
            e.0.store(IDLE, Ordering::Release);
        }
    }
}

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
    fn register_unregister_and_limits() {
        let d = TlbDomain::new().unwrap();
        let ids: Vec<_> = (0..MAX_VCPUS).map(|_| d.register().unwrap()).collect();
        assert_eq!(ids, (0..MAX_VCPUS).collect::<Vec<_>>());
        assert!(matches!(d.register(), Err(HptError::TooManyVcpus { .. })));
        d.unregister(5);
        assert_eq!(d.register().unwrap(), 5);
    }

    #[test]
    fn tlbie_bumps_generation_and_passes_idle_vcpus() {
        let d = TlbDomain::new().unwrap();
        let i = d.register().unwrap();
        let g = d.begin_access(i);
        d.end_access(i);
        d.tlbie();
        assert_eq!(d.generation(), g + 1);
        assert_eq!(d.begin_access(i), g + 1);
        d.end_access(i);
    }

    #[test]
    fn tlbie_waits_for_an_access_in_progress() {
        use revmap_rmap::sync::{thread, Arc, AtomicBool};
        let d = Arc::new(TlbDomain::new().unwrap());
        let i = d.register().unwrap();
        d.begin_access(i);
        let done = Arc::new(AtomicBool::new(false));
        let h = {
            let (d, done) = (d.clone(), done.clone());
            thread::spawn(move || {
                d.tlbie();
                done.store(true, Ordering::SeqCst);
            })
        };
        for _ in 0..1000 {
            thread::yield_now();
        }
        assert!(
            !done.load(Ordering::SeqCst),
            "tlbie returned during an old access"
        );
        d.end_access(i);
        h.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
    }

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
