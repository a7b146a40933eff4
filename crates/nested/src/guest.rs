//! Per-L2 state ([`NestedGuest`], KVM's `struct kvm_nested_guest` without the shadow
//! table) and the registry of an L1's nested guests ([`NestedGuests`]: the idr keyed by
//! l1_lpid, references, creation on first entry, release, and the shadow-LPID allocator).
//!
//! Lifetime (`kvmhv_get_nested` / `kvmhv_put_nested` / `kvmhv_remove_nested`):
//! * [`NestedGuests::get`] looks up an l1_lpid (rejecting LPIDs outside L1's partition
//!   table and LPID 0) and takes a reference; with `create` it makes an absent guest,
//!   allocating its shadow LPID, with two references (the idr's and the caller's).
//!   Creation and lookup happen in one call, so two creators cannot race as in KVM.
//! * [`NestedGuests::put`] drops a reference; at zero the guest is released: its shadow
//!   LPID is freed and returned in [`Released`] so the caller clears the shadow PATE and
//!   frees the shadow table. Nested-rmap entries naming the l1_lpid are left stale.
//! * [`NestedGuests::remove`] takes the guest out of the idr and drops the idr's
//!   reference (RIC = 2 flush finding PATE dw0 = 0, VM teardown).
//!
//! Invariants ([`NestedGuests::check`]): the idr maps an l1_lpid to
//! at most one guest; live shadow LPIDs are unique; refcnt = (1 if in the idr) + holders,
//! so a guest in the idr has refcnt >= 1; a released guest is in no map.
//!
//! This session's model is single-threaded (`&mut self`): the per-L2 `tlb_lock` and
//! `mmu_lock` come with the host layer. The PATE cache changes only through
//! [`NestedGuests::update_ptbl_cache`] (callers hold the L2's tlb_lock in KVM).

use crate::addr::ShadowLpid;
use crate::hcall::{check_enter_nested, HcallError};
use crate::lpid::{LpidError, ShadowLpidAllocator};
use crate::radix::{read_pate, GuestMemory, Pate, PateDw0, PateDw1, Ptcr};
use revmap_rmap::Lpid;
use std::collections::HashMap;

/// A handle on a live nested guest (valid until the guest is released).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestId(u64);

/// Why a nested-guest operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum GuestError {
    /// The l1_lpid is refused (LPID 0, outside the table, PTCR 0).
    #[error(transparent)]
    Hcall(#[from] HcallError),
    /// No hardware LPID is left for a new guest.
    #[error(transparent)]
    Lpid(#[from] LpidError),
    /// The handle names no live guest.
    #[error("no live nested guest {0:?}")]
    NoSuchGuest(GuestId),
    /// Memory for a new guest's registry entries could not be allocated (nothing
    /// changed).
    #[error("no memory for a new nested guest")]
    NoMemory,
}

impl GuestError {
    /// The PAPR code H_ENTER_NESTED returns for this failure (a failed creation is
    /// H_PARAMETER, as in KVM, except that a failed allocation is H_NO_MEM: KVM folds it
    /// into H_PARAMETER, revmap lets L1 tell a transient shortage from a bad LPID).
    pub const fn papr(self) -> i64 {
        match self {
            GuestError::Hcall(e) => e.papr(),
            GuestError::Lpid(_) | GuestError::NoSuchGuest(_) => crate::hcall::H_PARAMETER,
            GuestError::NoMemory => crate::hcall::H_NO_MEM,
        }
    }
}

/// One L2 as L0 tracks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NestedGuest {
    l1_lpid: Lpid,
    shadow_lpid: ShadowLpid,
    pate: Pate,
    refcnt: u32,
    in_idr: bool,
}

impl NestedGuest {
    /// L1's LPID for the L2 (idr key, nested-rmap LPID field).
    pub fn l1_lpid(&self) -> Lpid {
        self.l1_lpid
    }
    /// The hardware LPID L0 runs the L2 with (TLB tag, shadow PATE index).
    pub fn shadow_lpid(&self) -> ShadowLpid {
        self.shadow_lpid
    }
    /// The cached dw0 of L1's PATE (`l1_gr_to_hr`, the root of L1's table for the L2).
    pub fn l1_gr_to_hr(&self) -> PateDw0 {
        self.pate.dw0
    }
    /// The cached dw1 of L1's PATE (`process_table`).
    pub fn process_table(&self) -> PateDw1 {
        self.pate.dw1
    }
    /// The cached PATE.
    pub fn cached_pate(&self) -> Pate {
        self.pate
    }
    /// References held (idr + holders).
    pub fn refcnt(&self) -> u32 {
        self.refcnt
    }
    /// Whether the idr still maps the l1_lpid to this guest.
    pub fn in_idr(&self) -> bool {
        self.in_idr
    }
    /// The shadow PATE L0 writes for this guest given its shadow root.
    pub fn shadow_pate(&self, shadow_root: u64) -> Pate {
        Pate::shadow(shadow_root, self.pate.dw1)
    }
}

/// A guest whose last reference was dropped: the caller clears the shadow PATE of
/// `shadow_lpid` (which flushes it) and frees the shadow table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Released {
    /// The L2's L1 LPID.
    pub l1_lpid: Lpid,
    /// The freed hardware LPID.
    pub shadow_lpid: ShadowLpid,
}

/// The nested guests of one L1.
#[derive(Debug)]
pub struct NestedGuests {
    live: HashMap<GuestId, NestedGuest>,
    /// The idr: (l1_lpid, guest), sorted by l1_lpid, unique keys (a sorted vector so
    /// that its growth can be reserved fallibly, which a `BTreeMap`'s cannot).
    idr: Vec<(u16, GuestId)>,
    lpids: ShadowLpidAllocator,
    next_id: u64,
    created: u64,
    released: u64,
}

impl NestedGuests {
    /// An empty registry drawing shadow LPIDs from `lpids`.
    pub fn new(lpids: ShadowLpidAllocator) -> Self {
        NestedGuests {
            live: HashMap::new(),
            idr: Vec::new(),
            lpids,
            next_id: 1,
            created: 0,
            released: 0,
        }
    }

    /// Looks up `l1_lpid` (checked against `ptcr` as H_ENTER_NESTED does) and takes a
    /// reference; with `create`, makes the guest if absent, with an empty PATE cache.
    /// `Ok(None)`: absent and not created.
    pub fn get(
        &mut self,
        l1_lpid: u64,
        ptcr: Ptcr,
        create: bool,
    ) -> Result<Option<GuestId>, GuestError> {
        let lpid = check_enter_nested(ptcr, l1_lpid)?;
        if let Some(id) = self.lookup(lpid) {
            if let Some(g) = self.live.get_mut(&id) {
                g.refcnt += 1;
                return Ok(Some(id));
            }
        }
        if !create {
            return Ok(None);
        }
        // Room in both maps before anything changes.
        self.live.try_reserve(1).map_err(|_| GuestError::NoMemory)?;
        self.idr.try_reserve(1).map_err(|_| GuestError::NoMemory)?;
        let shadow_lpid = self.lpids.alloc()?;
        let id = GuestId(self.next_id);
        self.next_id += 1;
        self.live.insert(
            id,
            NestedGuest {
                l1_lpid: lpid,
                shadow_lpid,
                pate: Pate::EMPTY,
                refcnt: 2,
                in_idr: true,
            },
        );
        self.idr_set(lpid.0, id);
        self.created += 1;
        Ok(Some(id))
    }

    /// The guest the idr maps `l1_lpid` to, without taking a reference (what rmap
    /// consumers do under `mmu_lock`).
    #[inline]
    pub fn lookup(&self, l1_lpid: Lpid) -> Option<GuestId> {
        self.idr_get(l1_lpid.0)
    }

    #[inline]
    fn idr_get(&self, key: u16) -> Option<GuestId> {
        let i = self.idr.binary_search_by_key(&key, |&(k, _)| k).ok()?;
        self.idr.get(i).map(|&(_, id)| id)
    }

    /// Maps `key` to `id` (capacity reserved by the caller when the key is new).
    fn idr_set(&mut self, key: u16, id: GuestId) {
        match self.idr.binary_search_by_key(&key, |&(k, _)| k) {
            Ok(i) => self.idr[i].1 = id,
            Err(i) => self.idr.insert(i, (key, id)),
        }
    }

    /// Unmaps `key` if it maps to `id`.
    fn idr_remove(&mut self, key: u16, id: GuestId) {
        if let Ok(i) = self.idr.binary_search_by_key(&key, |&(k, _)| k) {
            if self.idr[i].1 == id {
                self.idr.remove(i);
            }
        }
    }

    /// The smallest l1_lpid at or above `from` that the idr maps (a walk over every
    /// L2 that allocates nothing and survives the idr changing between steps).
    pub fn next_in_idr(&self, from: u16) -> Option<Lpid> {
        let i = self.idr.partition_point(|&(k, _)| k < from);
        self.idr.get(i).map(|&(k, _)| Lpid(k))
    }

    /// A live guest.
    pub fn guest(&self, id: GuestId) -> Option<&NestedGuest> {
        self.live.get(&id)
    }

    /// Every guest in the idr, by l1_lpid.
    pub fn ids(&self) -> impl Iterator<Item = GuestId> + '_ {
        self.idr.iter().map(|&(_, id)| id)
    }

    /// Drops a reference; releases the guest at zero.
    pub fn put(&mut self, id: GuestId) -> Result<Option<Released>, GuestError> {
        let g = self.live.get_mut(&id).ok_or(GuestError::NoSuchGuest(id))?;
        g.refcnt -= 1;
        if g.refcnt > 0 {
            return Ok(None);
        }
        self.release(id)
    }

    fn release(&mut self, id: GuestId) -> Result<Option<Released>, GuestError> {
        let g = self.live.remove(&id).ok_or(GuestError::NoSuchGuest(id))?;
        self.idr_remove(g.l1_lpid.0, id);
        self.lpids.free(g.shadow_lpid)?;
        self.released += 1;
        Ok(Some(Released {
            l1_lpid: g.l1_lpid,
            shadow_lpid: g.shadow_lpid,
        }))
    }

    /// Takes `id` out of the idr (if it is still there) and drops the idr's reference.
    pub fn remove(&mut self, id: GuestId) -> Result<Option<Released>, GuestError> {
        let g = self.live.get_mut(&id).ok_or(GuestError::NoSuchGuest(id))?;
        if !g.in_idr {
            return Ok(None);
        }
        g.in_idr = false;
        let key = g.l1_lpid.0;
        self.idr_remove(key, id);
        self.put(id)
    }

    /// Re-reads the guest's PATE from L1 memory through the current `ptcr`
    /// (`kvmhv_update_ptbl_cache`): [`Pate::EMPTY`] if the LPID is outside the table or
    /// the entry is not L1 memory. Returns the new cached PATE.
    pub fn update_ptbl_cache<M: GuestMemory + ?Sized>(
        &mut self,
        id: GuestId,
        mem: &M,
        ptcr: Ptcr,
    ) -> Result<Pate, GuestError> {
        let g = self.live.get_mut(&id).ok_or(GuestError::NoSuchGuest(id))?;
        g.pate = read_pate(mem, ptcr, u64::from(g.l1_lpid.0));
        Ok(g.pate)
    }

    /// Guests created and released so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.created, self.released)
    }

    /// Checks the LPID and reference-count invariants: idr keys match their guests, one guest
    /// per key, unique shadow LPIDs, refcnt >= 1 for idr members. Returns the number of
    /// live guests.
    pub fn check(&self) -> Result<usize, String> {
        let mut shadows = std::collections::HashSet::new();
        if self.idr.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("idr keys not sorted and unique".into());
        }
        for (key, id) in self.idr.iter().copied() {
            let g = self
                .live
                .get(&id)
                .ok_or_else(|| format!("idr {key} names dead {id:?}"))?;
            if g.l1_lpid.0 != key || !g.in_idr {
                return Err(format!("idr {key} maps to {g:?}"));
            }
        }
        for (id, g) in &self.live {
            if !shadows.insert(g.shadow_lpid) {
                return Err(format!("shadow LPID {:?} used twice", g.shadow_lpid));
            }
            if g.refcnt == 0 {
                return Err(format!("{id:?} live with refcnt 0"));
            }
            if g.in_idr && self.idr_get(g.l1_lpid.0) != Some(*id) {
                return Err(format!("{id:?} claims to be in the idr but is not"));
            }
        }
        if self.lpids.live() as usize != self.live.len() {
            return Err(format!(
                "{} shadow LPIDs allocated for {} guests",
                self.lpids.live(),
                self.live.len()
            ));
        }
        Ok(self.live.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::radix::{write_pate, SparseMemory};

    const PTCR: Ptcr = Ptcr(0x10004);

    fn reg() -> NestedGuests {
        NestedGuests::new(ShadowLpidAllocator::new(4096))
    }

    #[test]
    fn creation_on_first_entry_with_two_references() {
        let mut r = reg();
        assert_eq!(r.get(5, PTCR, false), Ok(None));
        let id = r.get(5, PTCR, true).unwrap().unwrap();
        let g = r.guest(id).unwrap();
        assert_eq!((g.l1_lpid(), g.refcnt(), g.in_idr()), (Lpid(5), 2, true));
        assert!(g.l1_gr_to_hr().bits() == 0);
        // A second lookup finds the same guest and takes a reference.
        assert_eq!(r.get(5, PTCR, true).unwrap(), Some(id));
        assert_eq!(r.guest(id).unwrap().refcnt(), 3);
        assert_eq!(r.check(), Ok(1));
        let other = r.get(6, PTCR, true).unwrap().unwrap();
        assert_ne!(
            r.guest(other).unwrap().shadow_lpid(),
            r.guest(id).unwrap().shadow_lpid()
        );
        assert_eq!(r.check(), Ok(2));
    }

    #[test]
    fn lpid_zero_and_out_of_table_are_refused() {
        let mut r = reg();
        assert_eq!(r.get(0, PTCR, true).map_err(GuestError::papr), Err(-4));
        assert_eq!(r.get(4096, PTCR, true).map_err(GuestError::papr), Err(-4));
        assert_eq!(r.get(1, Ptcr(0), true).map_err(GuestError::papr), Err(3));
        assert_eq!(r.check(), Ok(0));
    }

    #[test]
    fn release_only_at_the_last_reference() {
        let mut r = reg();
        let id = r.get(9, PTCR, true).unwrap().unwrap(); // idr + caller
        let shadow = r.guest(id).unwrap().shadow_lpid();
        assert_eq!(r.put(id), Ok(None)); // caller done: idr keeps it
        assert_eq!(r.get(9, PTCR, false).unwrap(), Some(id)); // a holder
        assert_eq!(r.remove(id), Ok(None)); // out of the idr, holder remains
        assert_eq!(r.lookup(Lpid(9)), None);
        assert_eq!(r.remove(id), Ok(None)); // idempotent
                                            // A new guest for the same l1_lpid while the old one is still held.
        let id2 = r.get(9, PTCR, true).unwrap().unwrap();
        assert_ne!(id, id2);
        assert_eq!(r.check(), Ok(2));
        assert_eq!(
            r.put(id),
            Ok(Some(Released {
                l1_lpid: Lpid(9),
                shadow_lpid: shadow
            }))
        );
        assert_eq!(r.put(id), Err(GuestError::NoSuchGuest(id)));
        assert_eq!(r.lookup(Lpid(9)), Some(id2));
        assert_eq!(r.check(), Ok(1));
        assert_eq!(r.counts(), (2, 1));
    }

    #[test]
    fn ptbl_cache_reads_through_the_current_ptcr() {
        let mut mem = SparseMemory::new(1 << 30);
        let pate = Pate {
            dw0: PateDw0(0xc0000000001000ad),
            dw1: PateDw1(0x8000000000110004),
        };
        write_pate(&mut mem, PTCR, 1853, pate).unwrap();
        let mut r = reg();
        let id = r.get(1853, PTCR, true).unwrap().unwrap();
        assert_eq!(r.update_ptbl_cache(id, &mem, PTCR), Ok(pate));
        assert_eq!(r.guest(id).unwrap().shadow_pate(0x70000).dw1, pate.dw1);
        // A smaller table no longer holds LPID 1853: the read gives [0, 0].
        assert_eq!(
            r.update_ptbl_cache(id, &mem, Ptcr(0x10002)),
            Ok(Pate::EMPTY)
        );
        // A table outside L1 memory: [0, 0].
        assert_eq!(
            r.update_ptbl_cache(id, &mem, Ptcr(0x4000_0000 | 4)),
            Ok(Pate::EMPTY)
        );
    }
}
