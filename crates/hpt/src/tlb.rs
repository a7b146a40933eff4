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
//!   caller may read dword 1 and harvest final R/C (KVM's "Don't lose hardware R/C bit
//!   updates in H_PROTECT"; R/C are used only once the invalidation completed).
//!
//! The announce/re-read on the vCPU side and the increment/scan on the hypervisor side
//! form a store-buffer (Dekker) pattern; each side puts a `SeqCst` fence between its
//! write and its read, so at least one side sees the other. (Fences, not `SeqCst`
//! accesses: loom models `SeqCst` fences but treats `SeqCst` loads and stores as
//! acquire/release; `tests/loom_tlb.rs` checks the handshake and shows that each
//! fence is needed.) A vCPU that registers concurrently with a tlbie is either seen by
//! the scan or starts after the increment and sees the published HPTE change.
//!
//! # mmu_invalidate_seq
//!
//! [`InvalidateSeq`] (from the host layer, `revmap_host::notifier`) is KVM's
//! `mmu_invalidate_seq` + `mmu_invalidate_in_progress`: a host-side invalidation
//! brackets its work with `begin`/`end`; H_ENTER
//! samples the sequence before translating gfn -> host pfn and checks
//! [`InvalidateSeq::retry`] under the rmap lock, demoting the new HPTE to ABSENT on a
//! race (no HPTE turns VALID after an invalidation it raced).

use crate::error::HptError;
use alloc::boxed::Box;
use revmap_rmap::error::try_boxed_slice;
use revmap_rmap::sync::{fence, spin_loop, AtomicU64, Ordering};

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
        self.tlbie_with::<true>();
    }

    /// Not part of the API: [`tlbie`](Self::tlbie) with the handshake's fence dropped
    /// when `FENCED` is false, so that the loom model can show the fence is needed.
    #[doc(hidden)]
    #[inline]
    pub fn tlbie_with<const FENCED: bool>(&self) {
        // ORDERING: SeqCst RMW, the hypervisor's write of the Dekker handshake; also a
        // release of the HPTE change published before it.
        let new = self.gen.fetch_add(1, Ordering::SeqCst).wrapping_add(1);
        if FENCED {
            // ORDERING: SeqCst fence: orders the increment before the scan against
            // the vCPU's fence in `begin_access` (module docs).
            fence(Ordering::SeqCst);
        }
        // ORDERING: Acquire: a registration seen here is scanned.
        let mut reg = self.registered.load(Ordering::Acquire);
        while reg != 0 {
            let i = reg.trailing_zeros() as usize;
            reg &= reg - 1;
            if let Some(e) = self.epochs.get(i) {
                loop {
                    // ORDERING: Acquire (after the fence above): seeing IDLE or a newer
                    // epoch means the vCPU's R/C fetch_or of its old access happened
                    // before, so our later dword 1 read sees it.
                    let a = e.0.load(Ordering::Acquire);
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
    /// registers concurrently does so with an RMW on `registered` followed by a `SeqCst`
    /// fence, and only then reads dword 0; our change is an RMW followed by a `SeqCst`
    /// fence and a load of `registered`. The two fences are ordered in the single total
    /// order: either our load sees its registration (and we run the full handshake),
    /// or its dword 0 reads come after our fence and see the change (the
    /// store-buffering pattern; `tests/loom_tlb.rs` checks it).
    #[inline]
    pub fn tlbie_after_sc_rmw(&self) {
        self.tlbie_after_sc_rmw_with::<true>();
    }

    /// Not part of the API: [`tlbie_after_sc_rmw`](Self::tlbie_after_sc_rmw) with its
    /// fence dropped when `FENCED` is false (for the loom model only).
    #[doc(hidden)]
    #[inline]
    pub fn tlbie_after_sc_rmw_with<const FENCED: bool>(&self) {
        if FENCED {
            // ORDERING: SeqCst fence: the hypervisor half of the handshake above,
            // between the HPTE change and the load of `registered`.
            fence(Ordering::SeqCst);
        }
        // ORDERING: Acquire, after the fence: reading a mask from which a vCPU has
        // unregistered acquires its `unregister` (a release RMW), so the R/C updates
        // of its last accesses are visible to the caller's harvest. (Relaxed here is
        // wrong: `tests/loom_tlb.rs` finds the lost R bit.)
        if self.registered.load(Ordering::Acquire) == 0 {
            return;
        }
        self.tlbie();
    }

    /// Wait until every registered vCPU is outside an access epoch (a resize commit,
    /// after closing the gate, so that no MMU access uses the table being replaced).
    pub fn wait_all_idle(&self) {
        // ORDERING: SeqCst: the committer half of the gate handshake
        // (`resize::cell`), after its close and SeqCst fence.
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

    /// Attach a vCPU: returns its epoch slot. The vCPU's HPT searches after this call
    /// see every change whose invalidation skipped the shootdown
    /// ([`tlbie_after_sc_rmw`](Self::tlbie_after_sc_rmw)).
    pub fn register(&self) -> Result<usize, HptError> {
        self.register_with::<true>()
    }

    /// Not part of the API: [`register`](Self::register) with its fence dropped when
    /// `FENCED` is false (for the loom model only).
    #[doc(hidden)]
    pub fn register_with<const FENCED: bool>(&self) -> Result<usize, HptError> {
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
                if FENCED {
                    // ORDERING: SeqCst fence: the vCPU half of the
                    // `tlbie_after_sc_rmw` handshake, between the registration and the
                    // first HPT search.
                    fence(Ordering::SeqCst);
                }
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
        self.begin_access_with::<true>(i)
    }

    /// Not part of the API: [`begin_access`](Self::begin_access) with the handshake's
    /// fence dropped when `FENCED` is false (for the loom model only).
    #[doc(hidden)]
    #[inline]
    pub fn begin_access_with<const FENCED: bool>(&self, i: usize) -> u64 {
        let Some(e) = self.epochs.get(i) else {
            return self.generation();
        };
        loop {
            // ORDERING: Acquire: a generation read here acquires the tlbie RMW that
            // made it (and the HPTE change published before it).
            let g = self.gen.load(Ordering::Acquire);
            // ORDERING: Relaxed store, SeqCst fence, re-read: the vCPU half of the
            // Dekker handshake with `tlbie` (module docs).
            e.0.store(g, Ordering::Relaxed);
            if FENCED {
                fence(Ordering::SeqCst);
            }
            // ORDERING: Acquire, as the first read.
            if self.gen.load(Ordering::Acquire) == g {
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

/// KVM's `mmu_invalidate_seq` and `mmu_invalidate_in_progress`: generic, it lives in
/// the host layer.
pub use revmap_host::notifier::InvalidateSeq;

#[cfg(all(test, not(any(loom, shuttle))))]
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

    /// A tlbie issued during an access returns only after the access ended: the R/C
    /// update the access makes at its very end (after the tlbie has started, which we
    /// see by its generation bump, a progress condition rather than a count of yields)
    /// is visible to the hypervisor's harvest right after `tlbie` returns. The
    /// exhaustive version is `tests/loom_tlb.rs`.
    #[test]
    fn tlbie_waits_for_an_access_in_progress() {
        use crate::hpte::HpteR;
        let d = TlbDomain::new().unwrap();
        let i = d.register().unwrap();
        let g = d.begin_access(i);
        let rc = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                d.tlbie();
                rc.load(std::sync::atomic::Ordering::Relaxed)
            });
            while d.generation() == g {
                std::thread::yield_now();
            }
            rc.fetch_or(HpteR::R, std::sync::atomic::Ordering::Relaxed);
            d.end_access(i);
            assert_eq!(
                h.join().unwrap(),
                HpteR::R,
                "tlbie returned during an old access"
            );
        });
    }
}
