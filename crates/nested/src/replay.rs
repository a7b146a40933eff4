//! Replay of nested traces (`traces/nested/README.md`) through the real nested MMU
//! ([`NestedVm`]): every record is fed in order, every result compared, the invariant
//! checker run at intervals and at the end.
//!
//! The harness side is the trace's state: the VM is made from the header (L1 RAM,
//! L0 backing page; 64 KiB PAGE_SIZE, dirty logging on). `HOST_UNMAP` is an MMU-notifier
//! invalidation of the whole host pages holding the range, their page-out, and their
//! page-in: the host memory ([`crate::frames::FreshFrames`]) then hands out **new**
//! frames, so a stale shadow PTE would land on a freed frame, which is reported as a
//! mismatch and a violation. `HOST_AGE` reports a gfn young if its L0 leaf was
//! referenced before the range was aged; `HOST_DIRTY_LOG` harvests the slot's dirty log.
//!
//! ```no_run
//! use revmap_nested::replay::{replay_file, ReplayOptions};
//! let r = replay_file("traces/nested/nested-small.txt.gz", ReplayOptions::default())?;
//! assert_eq!((r.mismatched, r.invariant_violations), (0, 0));
//! println!("{} nested faults", r.counters.nested_faults);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::radix::Access;
use crate::vm::{L2Result, NestedCounters, NestedVm, NestedVmConfig, NestedVmError, L1_RAM_HVA};
use revmap_host::HostMmu;
use revmap_rmap::{Gfn, Hva, SlotId, PAGE_SHIFT};
use revmap_trace::nested::{
    AccessKind, AccessOutcome, NestedHeader, NestedReader, NestedRecord, NestedTraceError,
};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

/// A trace gfn is an L1 address >> 16 (L0's PAGE_SIZE).
const TRACE_GFN_SHIFT: u32 = 16;

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The trace could not be read or parsed.
    #[error(transparent)]
    Trace(#[from] NestedTraceError),
    /// The VM could not be built from the header.
    #[error(transparent)]
    Vm(#[from] NestedVmError),
}

/// How to replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayOptions {
    /// Run the invariant checker every this many records (0: only at the end).
    pub check_every: u64,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self { check_every: 5000 }
    }
}

/// What a replay found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplayReport {
    /// The file (or name) replayed.
    pub file: String,
    /// Records fed.
    pub records: u64,
    /// Records that carry a result (`->`).
    pub checked: u64,
    /// Results matched.
    pub matched: u64,
    /// Results that differed.
    pub mismatched: u64,
    /// The first mismatch: line, record, expected and actual.
    pub first_mismatch: Option<String>,
    /// Invariant violations found by the checker (and stale-frame landings).
    pub invariant_violations: u64,
    /// The first of them.
    pub first_violation: Option<String>,
    /// Checker runs.
    pub invariant_checks: u64,
    /// Wall-clock seconds of the replay.
    pub seconds: f64,
    /// The nested MMU's counters at the end.
    pub counters: NestedCounters,
}

impl ReplayReport {
    fn result(&mut self, line: u64, what: &str, ok: bool, detail: impl FnOnce() -> String) {
        self.checked += 1;
        if ok {
            self.matched += 1;
        } else {
            self.mismatched += 1;
            if self.first_mismatch.is_none() {
                self.first_mismatch = Some(format!("{}:{line}: {what}: {}", self.file, detail()));
            }
        }
    }

    fn violation(&mut self, what: String) {
        self.invariant_violations += 1;
        if self.first_violation.is_none() {
            self.first_violation = Some(what);
        }
    }
}

/// Replays the nested trace at `path`.
pub fn replay_file(
    path: impl AsRef<Path>,
    opts: ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    let path = path.as_ref();
    let reader = NestedReader::open(path)?;
    let header = reader.header();
    let mut err = None;
    let records = reader.map_while(|r| match r {
        Ok(rec) => Some(rec),
        Err(e) => {
            err = Some(e);
            None
        }
    });
    let report = replay_records(&path.display().to_string(), header, records, opts)?;
    match err {
        Some(e) => Err(e.into()),
        None => Ok(report),
    }
}

fn access_of(k: AccessKind) -> Access {
    match k {
        AccessKind::Read => Access::Load,
        AccessKind::Write => Access::Store,
        AccessKind::Exec => Access::Fetch,
    }
}

/// The trace's view of an [`L2Result`] (`None`: no valid outcome, always a mismatch).
pub fn outcome_of(r: L2Result) -> Option<AccessOutcome> {
    Some(match r {
        L2Result::Ok { l1gpa, .. } => AccessOutcome::Ok { l1gpa },
        L2Result::Hdsi { cause, asdr } => AccessOutcome::Hdsi { cause, asdr },
        L2Result::Hisi { cause, asdr } => AccessOutcome::Hisi { cause, asdr },
        L2Result::Mmio { l1gpa } => AccessOutcome::Mmio { l1gpa },
        L2Result::Ret(r) => AccessOutcome::Ret(r),
        L2Result::StaleFrame { .. } | L2Result::Livelock => return None,
    })
}

/// Host range of trace gfns `[gfn, gfn + npages)` clipped to L1 RAM and widened to
/// whole host pages of `1 << backing_shift`.
fn host_range(vm: &NestedVm, gfn: u64, npages: u64) -> Option<(Hva, Hva)> {
    let cfg = vm.config();
    let ram = cfg.l1_memory_bytes;
    let a = gfn.checked_shl(TRACE_GFN_SHIFT)?.min(ram);
    let b = gfn
        .saturating_add(npages)
        .checked_shl(TRACE_GFN_SHIFT)
        .unwrap_or(ram)
        .min(ram);
    if a >= b {
        return None;
    }
    let mask = (1u64 << cfg.backing_shift) - 1;
    Some((
        Hva(L1_RAM_HVA + (a & !mask)),
        Hva(L1_RAM_HVA + ((b + mask) & !mask).min(ram)),
    ))
}

/// Frames (4 KiB) of trace gfn `g`.
fn frames_of(g: u64) -> (Gfn, Gfn) {
    let s = TRACE_GFN_SHIFT - PAGE_SHIFT;
    (Gfn(g << s), Gfn((g + 1) << s))
}

/// Feeds `records` (after `header`) through a fresh [`NestedVm`] and compares every
/// result.
pub fn replay_records(
    name: &str,
    header: NestedHeader,
    records: impl Iterator<Item = NestedRecord>,
    opts: ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    let t0 = Instant::now();
    let vm = NestedVm::new(NestedVmConfig::new(
        header.l1_memory_bytes,
        header.l0_page_shift,
    ))?;
    let gfns = header.gfn_count();
    let mut rep = ReplayReport {
        file: name.to_string(),
        ..ReplayReport::default()
    };
    let check = |vm: &NestedVm, rep: &mut ReplayReport| {
        rep.invariant_checks += 1;
        if let Err(v) = vm.check() {
            for x in v {
                rep.violation(x.to_string());
            }
        }
    };
    for rec in records {
        rep.records += 1;
        let line = rec.line();
        match rec {
            NestedRecord::L1Store { gpa, val, .. } => {
                if let Err(e) = vm.l1_store(gpa, val) {
                    rep.violation(format!("{name}:{line}: {e}"));
                }
            }
            NestedRecord::SetPartitionTable { ptcr, ret, .. } => {
                let got = vm.h_set_partition_table(ptcr);
                rep.result(line, "H_SET_PARTITION_TABLE", got == ret, || {
                    format!("got {got}, expected {ret}")
                });
            }
            NestedRecord::TlbInvalidate {
                instr, rs, rb, ret, ..
            } => {
                let got = vm.h_tlb_invalidate(instr, rs, rb);
                rep.result(line, "H_TLB_INVALIDATE", got == ret, || {
                    format!("got {got}, expected {ret}")
                });
            }
            NestedRecord::L2Access {
                lpid,
                gpa,
                acc,
                outcome,
                ..
            } => {
                let got = vm.enter_nested(lpid, gpa, access_of(acc));
                if let L2Result::StaleFrame { hpa } = got {
                    rep.violation(format!(
                        "{name}:{line}: L2 access landed on freed host frame {hpa:#x}"
                    ));
                }
                let g = outcome_of(got);
                rep.result(line, "L2_ACCESS", g == Some(outcome), || {
                    format!("got {got:?}, expected {outcome:?}")
                });
            }
            NestedRecord::HostUnmap { gfn, npages, .. } => {
                if let Some((a, b)) = host_range(&vm, gfn, npages) {
                    vm.invalidate_range_start(a, b);
                    vm.unmap_hva_range(a, b);
                    vm.invalidate_range_end(a, b);
                    vm.host_page_in(a, b);
                }
            }
            NestedRecord::HostAge {
                gfn,
                npages,
                young_must,
                ..
            } => {
                let end = gfn.saturating_add(npages).min(gfns);
                let young: BTreeSet<u64> = (gfn..end)
                    .filter(|&g| {
                        let (lo, hi) = frames_of(g);
                        vm.test_age_gfn(SlotId(0), lo, hi)
                    })
                    .collect();
                if gfn < end {
                    let s = TRACE_GFN_SHIFT - PAGE_SHIFT;
                    vm.age_gfn(SlotId(0), Gfn(gfn << s), Gfn(end << s));
                }
                let missing: Vec<u64> = young_must.gfns().filter(|g| !young.contains(g)).collect();
                rep.result(line, "HOST_AGE", missing.is_empty(), || {
                    format!("not young: {missing:x?}")
                });
            }
            NestedRecord::HostDirtyLog { dirty_must, .. } => match vm.get_dirty_log(SlotId(0)) {
                Ok(bitmap) => {
                    let dirty = |g: u64| {
                        let (lo, hi) = frames_of(g);
                        (lo.0..hi.0).any(|f| {
                            bitmap
                                .get((f / 64) as usize)
                                .is_some_and(|w| w & (1 << (f % 64)) != 0)
                        })
                    };
                    let missing: Vec<u64> = dirty_must.gfns().filter(|&g| !dirty(g)).collect();
                    rep.result(line, "HOST_DIRTY_LOG", missing.is_empty(), || {
                        format!("not dirty: {missing:x?}")
                    });
                }
                Err(e) => rep.result(line, "HOST_DIRTY_LOG", false, || e.to_string()),
            },
            NestedRecord::L1Memory { .. } | NestedRecord::L1BasePage { .. } => {}
        }
        if opts.check_every != 0 && rep.records % opts.check_every == 0 {
            check(&vm, &mut rep);
        }
    }
    check(&vm, &mut rep);
    rep.counters = vm.counters();
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok(rep)
}
