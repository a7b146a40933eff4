//! [`ShadowLpidAllocator`]: L0's allocator of hardware LPIDs for nested guests.
//!
//! Invariants (the nested MMU's LPID invariant): LPID 0 (the host) is never handed out; an
//! LPID claimed for an L1 ([`ShadowLpidAllocator::claim`]) is never handed out as a
//! shadow LPID; a live LPID is handed out once until freed; freeing an LPID that is not
//! allocated is an error, never a silent double free.

use crate::addr::ShadowLpid;
use revmap_rmap::RmapError;

/// Why an LPID operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum LpidError {
    /// Every LPID is in use.
    #[error("no free LPID")]
    Exhausted,
    /// The LPID is not allocated (double free or foreign value).
    #[error("LPID {0} is not allocated")]
    NotAllocated(u32),
    /// The LPID is outside the allocator's range or already in use.
    #[error("LPID {0} is out of range or already in use")]
    Unavailable(u32),
}

/// A bitmap allocator over hardware LPIDs `1..nr_lpids`, lowest free first.
#[derive(Clone, Debug)]
pub struct ShadowLpidAllocator {
    used: Vec<u64>,
    nr: u32,
    live: u32,
}

impl ShadowLpidAllocator {
    /// An allocator for LPIDs `1..nr_lpids` (e.g. 4096 on POWER9, a 12-bit LPIDR).
    /// Aborts if its bitmap cannot be allocated; [`try_new`](Self::try_new) fails
    /// cleanly instead.
    pub fn new(nr_lpids: u32) -> Self {
        let words = nr_lpids.div_ceil(64) as usize;
        let mut used = vec![0u64; words.max(1)];
        used[0] |= 1; // LPID 0 is the host's.
        ShadowLpidAllocator {
            used,
            nr: nr_lpids,
            live: 0,
        }
    }

    /// [`new`](Self::new), reporting a failed allocation of the bitmap as
    /// [`RmapError::Alloc`].
    pub fn try_new(nr_lpids: u32) -> Result<Self, RmapError> {
        let words = (nr_lpids.div_ceil(64) as usize).max(1);
        let mut used = Vec::new();
        used.try_reserve_exact(words)
            .map_err(|_| RmapError::Alloc {
                bytes: words.saturating_mul(8),
            })?;
        used.resize(words, 0u64);
        used[0] |= 1; // LPID 0 is the host's.
        Ok(ShadowLpidAllocator {
            used,
            nr: nr_lpids,
            live: 0,
        })
    }

    fn is_used(&self, lpid: u32) -> bool {
        self.used[(lpid / 64) as usize] & (1 << (lpid % 64)) != 0
    }

    fn set(&mut self, lpid: u32, on: bool) {
        let w = &mut self.used[(lpid / 64) as usize];
        if on {
            *w |= 1 << (lpid % 64);
        } else {
            *w &= !(1 << (lpid % 64));
        }
    }

    /// Marks `lpid` in use for something else (an L1's own LPID).
    pub fn claim(&mut self, lpid: u32) -> Result<(), LpidError> {
        if lpid == 0 || lpid >= self.nr || self.is_used(lpid) {
            return Err(LpidError::Unavailable(lpid));
        }
        self.set(lpid, true);
        self.live += 1;
        Ok(())
    }

    /// The lowest free LPID (KVM's `kvmppc_alloc_lpid`).
    pub fn alloc(&mut self) -> Result<ShadowLpid, LpidError> {
        for (i, w) in self.used.iter().enumerate() {
            if *w != u64::MAX {
                let lpid = i as u32 * 64 + w.trailing_ones();
                if lpid >= self.nr {
                    break;
                }
                self.set(lpid, true);
                self.live += 1;
                return ShadowLpid::new(lpid).ok_or(LpidError::Exhausted);
            }
        }
        Err(LpidError::Exhausted)
    }

    /// Returns `lpid` to the pool (KVM's `kvmppc_free_lpid`).
    pub fn free(&mut self, lpid: ShadowLpid) -> Result<(), LpidError> {
        let raw = lpid.raw();
        if raw >= self.nr || !self.is_used(raw) {
            return Err(LpidError::NotAllocated(raw));
        }
        self.set(raw, false);
        self.live -= 1;
        Ok(())
    }

    /// LPIDs in use (allocated or claimed), not counting the host's.
    pub fn live(&self) -> u32 {
        self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_hands_out_zero_or_a_claimed_lpid() {
        let mut a = ShadowLpidAllocator::new(130);
        a.claim(1).unwrap();
        assert_eq!(a.claim(1), Err(LpidError::Unavailable(1)));
        assert_eq!(a.claim(0), Err(LpidError::Unavailable(0)));
        assert_eq!(a.claim(130), Err(LpidError::Unavailable(130)));
        let mut got = Vec::new();
        while let Ok(l) = a.alloc() {
            got.push(l.raw());
        }
        assert_eq!(got, (2..130).collect::<Vec<_>>());
        assert_eq!(a.live(), 129);
        assert_eq!(a.alloc(), Err(LpidError::Exhausted));
    }

    #[test]
    fn free_reuses_and_rejects_double_free() {
        let mut a = ShadowLpidAllocator::new(4096);
        let x = a.alloc().unwrap();
        let y = a.alloc().unwrap();
        assert_eq!((x.raw(), y.raw()), (1, 2));
        a.free(x).unwrap();
        assert_eq!(a.free(x), Err(LpidError::NotAllocated(1)));
        assert_eq!(a.alloc().unwrap().raw(), 1);
        assert_eq!(
            a.free(ShadowLpid::new(5000).unwrap()),
            Err(LpidError::NotAllocated(5000))
        );
        assert_eq!(a.live(), 2);
    }
}
