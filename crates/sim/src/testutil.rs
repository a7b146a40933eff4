//! Test helpers: [`FakeHost`], a plain model of a VM's host side that records every
//! operation, checks its arguments, and can tell whether an operation is in progress.
//!
//! Invariants: the fake never panics on bad arguments; it records them as violations
//! (so a test can assert there were none). Frames are tracked per slot: present,
//! referenced and dirty flags; dirty frames are harvested by `get_dirty_log`.
#![allow(clippy::unwrap_used)]

use crate::host::{HostMmu, SlotView};
use crate::replay::{ReplayTarget, ResultMask};
use revmap_hpt::VcpuId;
use revmap_rmap::sync::{spin_loop, thread, AtomicU64, AtomicUsize, Mutex, Ordering};
use revmap_rmap::{Gfn, Hva, SlotId, PAGE_SHIFT};
use revmap_testkit::port::SharedHcalls;

/// A recorded host operation (as seen by the host, with results).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    Unmap(Hva, Hva),
    InvalidateStart(Hva, Hva),
    InvalidateEnd(Hva, Hva),
    UnmapGfn(SlotId, Gfn, Gfn),
    PageIn(Hva, Hva),
    Age(SlotId, Gfn, Gfn),
    TestAge(SlotId, Gfn, Gfn),
    GetLog(SlotId),
    Clear(SlotId, u64, usize),
}

#[derive(Debug, Default)]
struct Frames {
    present: Vec<bool>,
    referenced: Vec<bool>,
    dirty: Vec<bool>,
}

impl Frames {
    /// Unmap frames `[lo, hi)`; returns how many were present.
    fn unmap(&mut self, lo: usize, hi: usize) -> u64 {
        let mut unmapped = 0;
        for i in lo..hi {
            if self.present[i] {
                unmapped += 1;
                self.present[i] = false;
                self.referenced[i] = false;
            }
        }
        unmapped
    }
}

#[derive(Debug, Default)]
struct State {
    seen: Vec<Seen>,
    frames: Vec<Frames>,
    violations: Vec<String>,
}

/// The fake host.
#[derive(Debug)]
pub(crate) struct FakeHost {
    slots: Vec<SlotView>,
    state: Mutex<State>,
    in_op: AtomicUsize,
    /// Operations started while `in_op` was observed non-zero by a check.
    pub(crate) checks_during_op: AtomicU64,
    pub(crate) checks: AtomicU64,
}

/// A one-slot RAM layout like the replay VM's: `npages` frames at gpa 0.
pub(crate) fn ram_slot(npages: u64, manual_protect: bool) -> SlotView {
    SlotView {
        id: SlotId(0),
        base_gfn: Gfn(0),
        npages,
        userspace_addr: Hva(0x7e00_0000_0000),
        backing_page_shift: 24,
        dirty_logging: true,
        manual_protect,
    }
}

impl FakeHost {
    pub(crate) fn new(slots: Vec<SlotView>) -> Self {
        let frames = slots
            .iter()
            .map(|s| {
                let n = s.npages as usize;
                Frames {
                    present: vec![true; n],
                    referenced: vec![false; n],
                    dirty: vec![false; n],
                }
            })
            .collect();
        FakeHost {
            slots,
            state: Mutex::new(State {
                frames,
                ..State::default()
            }),
            in_op: AtomicUsize::new(0),
            checks_during_op: AtomicU64::new(0),
            checks: AtomicU64::new(0),
        }
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    pub(crate) fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }

    /// The guest touches frame `i` of slot `s` (a store if `dirty`).
    pub(crate) fn touch(&self, s: usize, i: usize, dirty: bool) {
        let mut st = self.state.lock().unwrap();
        let f = &mut st.frames[s];
        f.referenced[i] = true;
        if dirty {
            f.dirty[i] = true;
        }
    }

    /// Whether some operation is running now.
    pub(crate) fn busy(&self) -> bool {
        // ORDERING: SeqCst: test code; the simplest total order for the probe.
        self.in_op.load(Ordering::SeqCst) != 0
    }

    fn op<R>(&self, f: impl FnOnce(&mut State, &[SlotView]) -> R) -> R {
        // ORDERING: SeqCst: test code, ordered with `busy` probes.
        self.in_op.fetch_add(1, Ordering::SeqCst);
        // Widen the window in which an operation is in progress.
        for _ in 0..50 {
            spin_loop();
        }
        let r = {
            let mut st = self.state.lock().unwrap();
            f(&mut st, &self.slots)
        };
        thread::yield_now();
        // ORDERING: SeqCst: as above.
        self.in_op.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

fn hva_range(slots: &[SlotView], start: Hva, end: Hva) -> Option<(usize, usize, usize)> {
    slots.iter().enumerate().find_map(|(k, s)| {
        let lo = start.0.checked_sub(s.userspace_addr.0)? >> PAGE_SHIFT;
        let hi = end.0.checked_sub(s.userspace_addr.0)? >> PAGE_SHIFT;
        (lo < hi && hi <= s.npages).then_some((k, lo as usize, hi as usize))
    })
}

fn gfn_range(
    slots: &[SlotView],
    id: SlotId,
    start: Gfn,
    end: Gfn,
) -> Option<(usize, usize, usize)> {
    let k = slots.iter().position(|s| s.id == id)?;
    let s = slots[k];
    let lo = start.0.checked_sub(s.base_gfn.0)?;
    let hi = end.0.checked_sub(s.base_gfn.0)?;
    (lo < hi && hi <= s.npages).then_some((k, lo as usize, hi as usize))
}

impl HostMmu for FakeHost {
    type Error = String;

    fn memslot_views(&self) -> Vec<SlotView> {
        self.slots.clone()
    }

    fn unmap_hva_range(&self, start: Hva, end: Hva) -> u64 {
        self.op(|st, slots| {
            st.seen.push(Seen::Unmap(start, end));
            let Some((k, lo, hi)) = hva_range(slots, start, end) else {
                st.violations
                    .push(format!("unmap outside RAM {start}..{end}"));
                return 0;
            };
            let n = hi - lo;
            if !n.is_power_of_two() || lo % n != 0 || n > 4096 {
                st.violations.push(format!(
                    "unmap range {lo}..{hi} not an aligned power of two"
                ));
            }
            st.frames[k].unmap(lo, hi)
        })
    }

    fn invalidate_range_start(&self, start: Hva, end: Hva) {
        self.op(|st, slots| {
            st.seen.push(Seen::InvalidateStart(start, end));
            match hva_range(slots, start, end) {
                Some((k, lo, hi)) => {
                    let f = &mut st.frames[k];
                    f.present[lo..hi].fill(false);
                    f.referenced[lo..hi].fill(false);
                }
                None => st
                    .violations
                    .push(format!("invalidate outside RAM {start}..{end}")),
            }
        })
    }

    fn invalidate_range_end(&self, start: Hva, end: Hva) {
        self.op(|st, _| st.seen.push(Seen::InvalidateEnd(start, end)))
    }

    fn unmap_gfn_range(&self, slot: SlotId, start: Gfn, end: Gfn) -> u64 {
        self.op(|st, slots| {
            st.seen.push(Seen::UnmapGfn(slot, start, end));
            let Some((k, lo, hi)) = gfn_range(slots, slot, start, end) else {
                st.violations
                    .push(format!("unmap_gfn_range outside slot {start}..{end}"));
                return 0;
            };
            st.frames[k].unmap(lo, hi)
        })
    }

    fn host_page_in(&self, start: Hva, end: Hva) {
        self.op(|st, slots| {
            st.seen.push(Seen::PageIn(start, end));
            match hva_range(slots, start, end) {
                Some((k, lo, hi)) => st.frames[k].present[lo..hi].fill(true),
                None => st
                    .violations
                    .push(format!("page-in outside RAM {start}..{end}")),
            }
        })
    }

    fn age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool {
        self.op(|st, slots| {
            st.seen.push(Seen::Age(slot, start, end));
            let Some((k, lo, hi)) = gfn_range(slots, slot, start, end) else {
                st.violations
                    .push(format!("age outside slot {start}..{end}"));
                return false;
            };
            let r = &mut st.frames[k].referenced[lo..hi];
            let young = r.iter().any(|b| *b);
            r.fill(false);
            young
        })
    }

    fn test_age_gfn(&self, slot: SlotId, start: Gfn, end: Gfn) -> bool {
        self.op(|st, slots| {
            st.seen.push(Seen::TestAge(slot, start, end));
            match gfn_range(slots, slot, start, end) {
                Some((k, lo, hi)) if hi == lo + 1 => st.frames[k].referenced[lo],
                _ => {
                    st.violations
                        .push(format!("test_age not a single frame {start}..{end}"));
                    false
                }
            }
        })
    }

    fn get_dirty_log(&self, slot: SlotId) -> Result<Vec<u64>, String> {
        self.op(|st, slots| {
            st.seen.push(Seen::GetLog(slot));
            let Some(k) = slots.iter().position(|s| s.id == slot) else {
                return Err(format!("no slot {slot:?}"));
            };
            let manual = slots[k].manual_protect;
            let d = &mut st.frames[k].dirty;
            let mut map = vec![0u64; d.len().div_ceil(64)];
            for (i, b) in d.iter_mut().enumerate() {
                if *b {
                    map[i / 64] |= 1 << (i % 64);
                    if !manual {
                        *b = false;
                    }
                }
            }
            Ok(map)
        })
    }

    fn clear_dirty_log(&self, slot: SlotId, first_page: u64, bits: &[u64]) -> Result<(), String> {
        self.op(|st, slots| {
            st.seen.push(Seen::Clear(slot, first_page, bits.len()));
            let Some(k) = slots.iter().position(|s| s.id == slot) else {
                return Err(format!("no slot {slot:?}"));
            };
            if first_page % 64 != 0
                || first_page + 64 * bits.len() as u64 > slots[k].npages.next_multiple_of(64)
            {
                st.violations
                    .push(format!("clear {first_page}+{} out of range", bits.len()));
                return Err("bad range".into());
            }
            let d = &mut st.frames[k].dirty;
            for (w, word) in bits.iter().enumerate() {
                for b in 0..64 {
                    let i = first_page as usize + w * 64 + b;
                    if word & (1 << b) != 0 && i < d.len() {
                        d[i] = false;
                    }
                }
            }
            Ok(())
        })
    }
}

/// As a replay target: every hypercall succeeds with zero outputs.
impl SharedHcalls for FakeHost {
    fn answer(&self, _vcpu: VcpuId, _opcode: u64, regs: &mut [u64; 8]) -> i64 {
        *regs = [0; 8];
        0
    }
}

revmap_testkit::shared_hypercall_port!(FakeHost);

/// The checker fails if a host operation is in progress (the quiescence property).
impl ReplayTarget for FakeHost {
    type Violation = String;

    fn check_invariants(&self) -> Result<(), String> {
        // ORDERING: SeqCst: test statistics.
        self.checks.fetch_add(1, Ordering::SeqCst);
        // Give a running operation time to show itself.
        for _ in 0..20 {
            if self.busy() {
                // ORDERING: SeqCst: test statistics.
                self.checks_during_op.fetch_add(1, Ordering::SeqCst);
                return Err("host operation in progress at a quiescent point".into());
            }
            thread::yield_now();
        }
        Ok(())
    }

    fn result_masks(&self, _opcode: u64, _out_index: usize) -> &'static [ResultMask] {
        &[]
    }
}
