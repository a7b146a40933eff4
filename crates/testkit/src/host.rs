//! Fixtures for the host-side benchmarks (`benches/host.rs`, and `revmap bench host`):
//! a fully mapped slot to unmap, a slot with k mappings per frame to harvest dirty
//! logs from, and the plain sequential scan they are compared with.
//!
//! Mappings are made with H_ENTER + H_EXACT at consecutive HPTE indices, so the table
//! needs exactly one slot per mapping (no PTEG overflow) and setup is linear. Guest
//! memory is not allocated: the model's host pages are bookkeeping only, so a 16 GiB
//! slot costs its rmap array (8 bytes per 4 KiB frame) and the HPT (32 bytes per slot).
//!
//! Invariants: every fixture keeps the VM consistent (`check_invariants` passes between
//! operations); sizes are validated and errors returned, never panics.

use crate::FixtureError;
use revmap_hpt::hcall::{H_ENTER, H_EXACT, H_SUCCESS};
use revmap_hpt::hpte::{HpteR, HpteV};
use revmap_hpt::mmu::{Access, Fault};
use revmap_hpt::vm::{Vm, VmConfig};
use revmap_hpt::Flavour;
use revmap_rmap::{Gfn, Ptex, RmapError, SlotId, PAGE_SHIFT};

/// Smallest HPT order with at least `n` slots (and at least 18).
fn order_for(n: u64) -> u32 {
    let slots_order = 64 - n.max(1).saturating_sub(1).leading_zeros();
    (slots_order + 4).max(18)
}

/// H_ENTER `count` mappings of pages of `1 << shift` bytes at consecutive indices;
/// mapping `i` maps guest page `i / per_page` (`per_page` mappings per page).
fn enter_all(vm: &Vm, pages: u64, per_page: u64, shift: u32) -> Result<Vec<u32>, FixtureError> {
    let n = pages * per_page;
    let mut ptexes = Vec::new();
    ptexes
        .try_reserve_exact(n as usize)
        .map_err(|_| RmapError::Alloc {
            bytes: (n as usize).saturating_mul(4),
        })?;
    let (large, lp) = match shift {
        16 => (HpteV::LARGE, 0x1000),
        24 => (HpteV::LARGE, 0),
        _ => (0, 0),
    };
    for i in 0..n {
        let page = i / per_page;
        let v = ((i & 0xff_ffff) << HpteV::AVPN_SHIFT) | large | HpteV::VALID;
        let r = (page << shift) | lp | HpteR::M | 2;
        let res = vm.hcall(0, H_ENTER, &[H_EXACT, i, v, r]);
        if res.ret != H_SUCCESS {
            return Err(FixtureError::Enter {
                ptex: i,
                ret: res.ret,
            });
        }
        ptexes.push(res.out[0] as u32);
    }
    Ok(ptexes)
}

/// A slot with every page mapped by one HPTE, to measure `unmap_gfn_range`.
#[derive(Debug)]
pub struct UnmapFixture {
    vm: Vm,
    ptexes: Vec<u32>,
    frames: u64,
}

impl UnmapFixture {
    /// A VM whose RAM slot of `slot_bytes` (backed by 64 KiB host pages) is mapped
    /// entirely by HPTEs of `1 << page_shift` bytes (12 or 16).
    pub fn new(slot_bytes: u64, page_shift: u32) -> Result<Self, FixtureError> {
        if page_shift != 12 && page_shift != 16 {
            return Err(FixtureError::PageShift { shift: page_shift });
        }
        let pages = slot_bytes >> page_shift;
        let vm = Vm::new(VmConfig {
            ram_bytes: slot_bytes,
            hpt_order: order_for(pages),
            flavour: Flavour::Kvm,
            backing_page_shift: 16,
        })?;
        let ptexes = enter_all(&vm, pages, 1, page_shift)?;
        Ok(Self {
            vm,
            ptexes,
            frames: slot_bytes >> PAGE_SHIFT,
        })
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Number of HPTEs mapping the slot.
    pub fn mappings(&self) -> u64 {
        self.ptexes.len() as u64
    }

    /// Unmap the whole slot (`unmap_gfn_range`); returns the HPTEs unmapped.
    pub fn unmap_all(&self) -> u64 {
        self.vm.unmap_gfn_range(SlotId(0), Gfn(0), Gfn(self.frames))
    }

    /// Fault every (paged-out) HPTE back in, as vCPU accesses would.
    pub fn map_all(&self) {
        for &p in &self.ptexes {
            let f = Fault::Absent {
                ptex: Ptex(p),
                mmio: false,
            };
            self.vm.page_fault(0, &f, Access::Load);
        }
    }
}

/// A slot with `per_frame` 4 KiB mappings of every frame, to measure dirty-log harvest.
#[derive(Debug)]
pub struct DirtyFixture {
    vm: Vm,
    ptexes: Vec<u32>,
}

impl DirtyFixture {
    /// A VM whose RAM slot of `slot_bytes` (4 KiB host pages, dirty logging on) has
    /// every frame mapped `per_frame` times (0 = no mapping at all).
    pub fn new(slot_bytes: u64, per_frame: u64) -> Result<Self, FixtureError> {
        let frames = slot_bytes >> PAGE_SHIFT;
        let vm = Vm::new(VmConfig {
            ram_bytes: slot_bytes,
            hpt_order: order_for(frames * per_frame),
            flavour: Flavour::Kvm,
            backing_page_shift: 12,
        })?;
        let ptexes = if per_frame == 0 {
            Vec::new()
        } else {
            enter_all(&vm, frames, per_frame, PAGE_SHIFT)?
        };
        Ok(Self { vm, ptexes })
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Number of HPTEs mapping the slot.
    pub fn mappings(&self) -> u64 {
        self.ptexes.len() as u64
    }

    /// One KVM_GET_DIRTY_LOG of the slot; returns the number of dirty frames.
    pub fn harvest(&self) -> Result<u64, revmap_hpt::HostError> {
        let log = self.vm.get_dirty_log(SlotId(0))?;
        Ok(log.iter().map(|w| u64::from(w.count_ones())).sum())
    }

    /// "Hardware" sets R and C in every mapping (every frame dirty for the next harvest).
    pub fn dirty_all(&self) {
        for &p in &self.ptexes {
            if let Some(s) = self.vm.hpt().slot(Ptex(p)) {
                s.hw_set_rc(HpteR::RC);
            }
        }
    }
}

/// The memory-bandwidth baseline: a plain sequential read of `words` (the length of
/// the rmap array being compared), summed so that it cannot be elided.
#[inline(never)]
pub fn raw_scan(words: &[u64]) -> u64 {
    words.iter().fold(0u64, |a, &w| a.wrapping_add(w))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn fixtures_round_trip_and_stay_consistent() {
        let u = UnmapFixture::new(4 << 20, 12).unwrap();
        assert_eq!(u.mappings(), 1024);
        assert_eq!(u.unmap_all(), 1024);
        u.vm().check_invariants().unwrap();
        u.map_all();
        assert_eq!(u.vm().check_invariants().unwrap().chain_members, 1024);
        let u = UnmapFixture::new(4 << 20, 16).unwrap();
        assert_eq!(u.unmap_all(), 64);

        let d = DirtyFixture::new(4 << 20, 2).unwrap();
        assert_eq!(d.mappings(), 2048);
        assert_eq!(d.harvest().unwrap(), 0);
        d.dirty_all();
        assert_eq!(d.harvest().unwrap(), 1024);
        assert_eq!(d.harvest().unwrap(), 0);
        d.vm().check_invariants().unwrap();
        assert_eq!(raw_scan(&[1, 2, 3]), 6);
        assert_eq!(order_for(1 << 20), 24);
        assert_eq!(order_for(1), 18);
    }
}
