//! The host side, part 3: dirty logging (KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG) over a
//! memslot's rmap chains (KVM's `kvm_test_clear_dirty_npages`,
//! `kvmppc_hv_get_dirty_log_hpt`).
//!
//! # Algorithm
//!
//! For every frame whose rmap word has PRESENT or CHANGED: consume CHANGED (C harvested
//! earlier by H_REMOVE or an unmap), and for every VALID chain member whose dword 1 has C
//! (peeked under the rmap lock; members with C clear are not locked): try-lock it
//! (restart rule), set ABSENT, tlbie (so the final C is stable and no vCPU TLB still
//! believes C is set), clear C in the HPTE, record C in `guest_rpte`, and mark every
//! 4 KiB frame of the page (the chain is that of the page's base frame: a huge page dirties
//! all its base pages); restore VALID. Then OR in the slot's bitmap, which accumulates C
//! bits recorded at unmap, H_CLEAR_MOD and H_REMOVE, clearing it word by word with an
//! atomic swap.
//!
//! # No lost C bit
//!
//! A C bit leaves an HPTE only under the HPTE lock, after a tlbie, and always lands
//! somewhere the log reads: this scan's result, or the slot bitmap / rmap CHANGED (which
//! this or the next call harvests). Members whose C is clear are skipped without a tlbie:
//! in this model hardware sets C with an atomic OR at the store itself, so a store racing
//! the scan is found by the next round.
//!
//! # Cost (KVM's scan runs over a whole slot without a break; this one does not)
//!
//! No lock is held across frames (each frame's rmap is locked only if its word shows
//! PRESENT or CHANGED), so a scan never blocks vCPUs for the whole slot. The empty case
//! reads the rmap array 64 words at a time and the bitmap only where it is non-zero:
//! close to a plain sequential read of the array (see `benches/host.rs`).

use crate::error::HostError;
use crate::hpte::{HpteR, HpteV};
use crate::table::Hpt;
use crate::vm::Vm;
use alloc::vec::Vec;
use revmap_host::{Memslot, MemslotFlags};
use revmap_rmap::ring::{RMAP_CHANGED, RMAP_PRESENT};
use revmap_rmap::{HpteLocks, Ptex, Rmap, RmapError, RmapWord, SlotId, PAGE_SHIFT};

/// Set bits `[i, i + n)` of a KVM-layout bitmap (clipped to its length).
fn set_bits(map: &mut [u64], i: u64, n: u64) {
    let end = (i + n).min(map.len() as u64 * 64);
    let mut k = i;
    while k < end {
        let lo = k % 64;
        let cnt = (end - k).min(64 - lo);
        let mask = if cnt == 64 {
            !0
        } else {
            ((1u64 << cnt) - 1) << lo
        };
        if let Some(w) = map.get_mut((k / 64) as usize) {
            *w |= mask;
        }
        k += cnt;
    }
}

impl Vm {
    /// KVM_GET_DIRTY_LOG for slot `id`: harvest the C bits of every HPTE of the slot and
    /// the slot's bitmap; return the bitmap in KVM's `u64` layout (bit `i % 64` of word
    /// `i / 64` = frame `base_gfn + i`, the layout Firecracker and Cloud Hypervisor
    /// merge). Without manual protection the bitmap is cleared; with
    /// [`MemslotFlags::DIRTY_LOG_MANUAL_PROTECT`] the harvest is added to it and it is
    /// returned uncleared (clear with [`clear_dirty_log`](Self::clear_dirty_log)).
    pub fn get_dirty_log(&self, id: SlotId) -> Result<Vec<u64>, HostError> {
        let slots = self.memslots();
        let s = slots.get(id).ok_or(HostError::NoSuchSlot { id })?;
        if !s.flags().contains(MemslotFlags::LOG_DIRTY_PAGES) {
            return Err(HostError::DirtyLogDisabled { id });
        }
        let nwords = s.dirty_bitmap().len();
        let mut out = Vec::new();
        out.try_reserve_exact(nwords)
            .map_err(|_| RmapError::Alloc {
                bytes: nwords.saturating_mul(8),
            })?;
        out.resize(nwords, 0u64);
        {
            let acc = self.host_access();
            self.harvest_dirty(acc.hpt(), s, &mut out);
        }
        if s.flags().contains(MemslotFlags::DIRTY_LOG_MANUAL_PROTECT) {
            for (i, w) in out.iter_mut().enumerate() {
                s.or_dirty_word(i, *w);
                *w = s.dirty_word(i);
            }
        } else {
            for (i, w) in out.iter_mut().enumerate() {
                *w |= s.take_dirty_word(i);
            }
        }
        Ok(out)
    }

    /// KVM_CLEAR_DIRTY_LOG (manual protection): clear the bits `bits` (KVM layout) of the
    /// slot's bitmap starting at frame offset `first_page`, which must be a multiple of
    /// 64 and inside the slot. The pages' C bits were already cleared in the HPTEs by
    /// the `get_dirty_log` that reported them, so later stores are caught again.
    pub fn clear_dirty_log(
        &self,
        id: SlotId,
        first_page: u64,
        bits: &[u64],
    ) -> Result<(), HostError> {
        let slots = self.memslots();
        let s = slots.get(id).ok_or(HostError::NoSuchSlot { id })?;
        if !s.flags().contains(MemslotFlags::LOG_DIRTY_PAGES) {
            return Err(HostError::DirtyLogDisabled { id });
        }
        if !s.flags().contains(MemslotFlags::DIRTY_LOG_MANUAL_PROTECT) {
            return Err(HostError::BadFlags {
                flags: s.flags().bits(),
            });
        }
        let bad = HostError::BadDirtyRange {
            first_page,
            len: bits.len(),
        };
        let last = (bits.len() as u64)
            .checked_mul(64)
            .and_then(|n| n.checked_add(first_page))
            .ok_or(bad.clone())?;
        if first_page % 64 != 0 || last > s.npages().div_ceil(64) * 64 {
            return Err(bad);
        }
        let w0 = (first_page / 64) as usize;
        for (k, &m) in bits.iter().enumerate() {
            s.clear_dirty_bits(w0 + k, m);
        }
        Ok(())
    }

    /// Scan every rmap of `s`, OR-ing the dirty frames found into `out` (KVM layout).
    pub(crate) fn harvest_dirty(&self, hpt: &Hpt, s: &Memslot, out: &mut [u64]) {
        const CHUNK: usize = 64;
        const WANT: u64 = RMAP_PRESENT | RMAP_CHANGED;
        for (c, chunk) in s.rmaps().chunks(CHUNK).enumerate() {
            // Lock-free pass with eight independent accumulators (no serial OR chain):
            // most chunks of a big slot are untouched.
            let mut acc = [0u64; 8];
            let mut octs = chunk.chunks_exact(8);
            for q in &mut octs {
                if let [r0, r1, r2, r3, r4, r5, r6, r7] = q {
                    acc[0] |= r0.load().bits();
                    acc[1] |= r1.load().bits();
                    acc[2] |= r2.load().bits();
                    acc[3] |= r3.load().bits();
                    acc[4] |= r4.load().bits();
                    acc[5] |= r5.load().bits();
                    acc[6] |= r6.load().bits();
                    acc[7] |= r7.load().bits();
                }
            }
            for r in octs.remainder() {
                acc[0] |= r.load().bits();
            }
            if acc.iter().fold(0, |a, &b| a | b) & WANT == 0 {
                continue;
            }
            for (k, rm) in chunk.iter().enumerate() {
                let w = rm.load();
                if w.bits() & WANT == 0 {
                    continue;
                }
                let n = self.test_clear_dirty(hpt, rm, w);
                if n > 0 {
                    set_bits(out, (c * CHUNK + k) as u64, n);
                }
            }
        }
    }

    /// `kvm_test_clear_dirty_npages` for one frame whose word looked like `w`: consume
    /// CHANGED, then harvest and clear C of every VALID chain member whose dword 1 shows
    /// C (read under the rmap lock without the HPTE lock, as KVM does; a member whose C
    /// is clear is skipped without locking it). Returns the number of 4 KiB frames dirty
    /// from this frame on (the largest page found dirty).
    fn test_clear_dirty(&self, hpt: &Hpt, rm: &Rmap, w: RmapWord) -> u64 {
        let mut n = 0u64;
        if w.changed() && rm.lock().take_rc(HpteR::C) != 0 {
            n = 1;
        }
        if !w.is_present() {
            return n;
        }
        let rev = hpt.revmap();
        loop {
            let g = rm.lock();
            let dirty = rev.iter(&g).find(|&p| {
                hpt.slot(Ptex(p))
                    .is_some_and(|e| e.load_v() & HpteV::VALID != 0 && e.load_r() & HpteR::C != 0)
            });
            let Some(p) = dirty else {
                return n;
            };
            let Some(mut h) = hpt.try_lock(Ptex(p), HpteV::HVLOCK) else {
                // Restart rule: never spin on an HPTE lock under the rmap lock.
                drop(g);
                hpt.wait_hpte_unlocked(p);
                continue;
            };
            let v = h.v();
            if v & HpteV::VALID == 0 {
                // Being removed by its holder, who harvests its C: wait for the unlink.
                drop(g);
                drop(h);
                hpt.wait_hpte_unlocked(p);
                continue;
            }
            h.set_v((v & !HpteV::VALID) | HpteV::ABSENT);
            h.publish_v();
            self.tlb().tlbie();
            let r = h.r();
            h.set_r(r & !HpteR::C);
            if r & HpteR::C != 0 {
                let gr = rev.guest_rpte(p);
                rev.set_guest_rpte(p, gr | HpteR::C);
                let shift = self.entry_page(v, gr).map_or(PAGE_SHIFT, |(_, sh)| sh);
                n = n.max(1 << (shift - PAGE_SHIFT));
            }
            h.unlock_with(v);
            drop(g);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::set_bits;

    #[test]
    fn set_bits_spans_words_and_clips() {
        let mut m = [0u64; 3];
        set_bits(&mut m, 60, 10);
        assert_eq!(m, [0xf << 60, 0x3f, 0]);
        set_bits(&mut m, 128, 4096);
        assert_eq!(m[2], !0);
        let mut m = [0u64; 1];
        set_bits(&mut m, 0, 64);
        assert_eq!(m, [!0]);
    }
}
