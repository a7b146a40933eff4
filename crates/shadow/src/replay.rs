//! Replay of real x86 walk traces (`traces/x86/`) through the shadow MMU, by the
//! "Replaying through a shadow MMU" rules of the traces' README:
//!
//! 1. before each WALK, every recorded entry whose value differs from guest memory is
//!    delivered as the guest's own store, routed by the shadow MMU's SPTEs
//!    ([`ShadowMmu::guest_store`]: plain through a writable SPTE or to an unshadowed
//!    gfn, unsync for level-1 tables, emulated with write tracking otherwise);
//! 2. the walk's `va` is re-validated as an INVLPG would ([`ShadowMmu::invlpg`]);
//! 3. the access goes through the shadow MMU ([`ShadowMmu::access`]): a shadow hit or a
//!    shadow page fault; a write landing in a write-tracked table succeeds with the
//!    walked address and runs the write-tracking path on that 8-byte offset;
//! 4. compared: the guest-physical address or the exact #PF error code, and every
//!    recorded entry's value in guest memory with the walk's A/D updates applied;
//! 5. CPU, INVLPG and FLUSH records become the guest events (mode changes and CR3
//!    switches, INVLPG, guest TLB flushes).
//!
//! The invariant checker runs every [`ShadowReplayer::check_every`] walks and at the end.
//! Invariants: every WALK is counted in exactly one of `matched`/`mismatched`; a trace
//! that cannot be read is an error, never a panic.

use crate::mmu::{AccessOutcome, ShadowMmu, ShadowStats};
use crate::paging::{Gpa, GuestPhysMemory};
use crate::walk_check::{access_of, entry_after, mode_of, WalkMismatch, WalkTally};
use revmap_host::{Memslot, MemslotFlags};
use revmap_rmap::{Gfn, Hva, SlotId};
use revmap_trace::x86::{WalkOutcome, WalkRecord, X86Reader, X86Record};
use revmap_trace::TraceError;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// Guest RAM the replayer's single memslot covers: 8 GiB from gfn 0 (the traces' guests
/// have at most 4 GiB, placed up to 5 GiB), backed by 1 GiB host pages so that huge
/// SPTEs are possible wherever the guest and `disallow_lpage` allow.
pub const REPLAY_SLOT_PAGES: u64 = 8 << 18;

/// Why a replay could not run (mismatches are counted, not errors).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The trace could not be read or parsed.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// The shadow MMU could not be set up.
    #[error(transparent)]
    Shadow(#[from] crate::mmu::ShadowError),
}

/// Counts from replaying one trace through the shadow MMU.
#[derive(Clone, Debug, Default)]
pub struct ReplayReport {
    /// Records applied, walks compared.
    pub walks: WalkTally,
    /// CPU, INVLPG and FLUSH records the shadow MMU could not apply (first in
    /// `walks.first_mismatch` if no walk mismatched before).
    pub event_errors: u64,
    /// Faults by error code.
    pub faults_by_ec: BTreeMap<u64, u64>,
    /// Guest page-table stores delivered (rule 1).
    pub guest_stores: u64,
    /// Of which emulated (write-tracked or refused unsync).
    pub emulated_stores: u64,
    /// Accesses answered by a shadow hit.
    pub shadow_hits: u64,
    /// Writes to write-tracked tables (rule 3's emulated path).
    pub write_protected: u64,
    /// Accesses outside every memslot (MMIO).
    pub mmio: u64,
    /// Invariant-checker runs.
    pub invariant_checks: u64,
    /// Invariant violations (the first one's text in `first_violation`).
    pub invariant_violations: u64,
    /// The first violation.
    pub first_violation: Option<String>,
    /// Shadow MMU statistics at the end.
    pub shadow: ShadowStats,
    /// Shadow pages in use at the end.
    pub shadow_pages: u64,
    /// Write-protected guest frames at the end.
    pub write_protected_gfns: u64,
    /// Seconds spent.
    pub seconds: f64,
}

/// The replayer: a shadow MMU with one memslot and one vCPU per trace vCPU.
#[derive(Debug)]
pub struct ShadowReplayer {
    mmu: ShadowMmu,
    cpus: HashMap<u32, usize>,
    /// Walks between invariant-checker runs (0: only at the end).
    pub check_every: u64,
    /// The counts so far.
    pub report: ReplayReport,
}

impl ShadowReplayer {
    /// A replayer with the default slot and a checker run every `check_every` walks.
    pub fn new(check_every: u64) -> Result<Self, crate::mmu::ShadowError> {
        let mut mmu = ShadowMmu::new();
        let slot = Memslot::new(
            SlotId(0),
            Gfn(0),
            REPLAY_SLOT_PAGES,
            30,
            MemslotFlags::empty(),
            Hva(0x7f00_0000_0000),
        )
        .map_err(|_| crate::mmu::ShadowError::NoSlot(0))?;
        mmu.add_memslot(slot)?;
        Ok(Self {
            mmu,
            cpus: HashMap::new(),
            check_every,
            report: ReplayReport::default(),
        })
    }

    /// Sets the shadow-page limit (`KVM_SET_NR_MMU_PAGES`; `None`: memslot pages / 50).
    pub fn set_max_mmu_pages(&mut self, n: Option<u64>) {
        self.mmu.set_max_mmu_pages(n);
    }

    /// The shadow MMU.
    pub fn mmu(&self) -> &ShadowMmu {
        &self.mmu
    }

    /// Replays a whole file (gzip or plain).
    pub fn replay_file(
        path: impl AsRef<std::path::Path>,
        check_every: u64,
    ) -> Result<ReplayReport, ReplayError> {
        Self::replay_file_with(path, check_every, None)
    }

    /// [`replay_file`](Self::replay_file) with a shadow-page limit.
    pub fn replay_file_with(
        path: impl AsRef<std::path::Path>,
        check_every: u64,
        max_mmu_pages: Option<u64>,
    ) -> Result<ReplayReport, ReplayError> {
        let t0 = Instant::now();
        let mut r = Self::new(check_every)?;
        r.set_max_mmu_pages(max_mmu_pages);
        for rec in X86Reader::open(path)? {
            r.record(&rec?);
        }
        r.finish();
        r.report.seconds = t0.elapsed().as_secs_f64();
        Ok(r.report)
    }

    /// Runs the checker a last time and fills the end statistics.
    pub fn finish(&mut self) {
        self.run_check();
        self.report.shadow = self.mmu.stats.clone();
        self.report.shadow_pages = self.mmu.used_mmu_pages();
        self.report.write_protected_gfns = self.mmu.write_protected_gfns();
    }

    fn run_check(&mut self) {
        self.report.invariant_checks += 1;
        if let Err(v) = self.mmu.check() {
            self.report.invariant_violations += 1;
            if self.report.first_violation.is_none() {
                self.report.first_violation = Some(v.to_string());
            }
        }
    }

    fn fail(&mut self, line: u64, what: &str, expected: String, got: String) {
        self.report.walks.mismatched += 1;
        self.note(line, what, expected, got);
    }

    fn event_error(&mut self, line: u64, what: &str, got: String) {
        self.report.event_errors += 1;
        self.note(line, what, "ok".into(), got);
    }

    fn note(&mut self, line: u64, what: &str, expected: String, got: String) {
        if self.report.walks.first_mismatch.is_none() {
            self.report.walks.first_mismatch = Some(WalkMismatch {
                line,
                what: what.to_owned(),
                expected,
                got,
            });
        }
    }

    /// Applies one record.
    pub fn record(&mut self, rec: &X86Record) {
        match rec {
            X86Record::Cpu(c) => {
                self.report.walks.cpu_records += 1;
                let mode = mode_of(c);
                let r = match self.cpus.get(&c.cpu) {
                    Some(&v) => self.mmu.set_mode(v, mode),
                    None => {
                        let v = self.mmu.add_vcpu(mode);
                        self.cpus.insert(c.cpu, v);
                        Ok(())
                    }
                };
                if let Err(e) = r {
                    self.event_error(c.line, "CPU record", e.to_string());
                }
            }
            X86Record::Invlpg { line, cpu, va } => {
                self.report.walks.invlpgs += 1;
                if let Some(&v) = self.cpus.get(cpu) {
                    if let Err(e) = self.mmu.invlpg(v, *va) {
                        self.event_error(*line, "INVLPG", e.to_string());
                    }
                }
            }
            X86Record::Flush { line, cpu, .. } => {
                self.report.walks.flushes += 1;
                if let Some(&v) = self.cpus.get(cpu) {
                    if let Err(e) = self.mmu.flush_tlb_guest(v) {
                        self.event_error(*line, "FLUSH", e.to_string());
                    }
                }
            }
            X86Record::Walk(w) => {
                self.report.walks.checked += 1;
                self.walk(w);
                if self.check_every > 0 && self.report.walks.checked % self.check_every == 0 {
                    self.run_check();
                }
            }
        }
    }

    fn walk(&mut self, w: &WalkRecord) {
        let Some(&v) = self.cpus.get(&w.cpu) else {
            return self.fail(
                w.line,
                "WALK before any CPU record",
                "CPU".into(),
                "none".into(),
            );
        };
        // Rule 1: the guest's page-table stores.
        for p in &w.ptes {
            let cur = self.mmu.mem.read_u64(Gpa(p.gpa)).unwrap_or(0);
            if cur != p.val {
                self.report.guest_stores += 1;
                match self.mmu.guest_store(p.gpa, p.val) {
                    Ok(true) => self.report.emulated_stores += 1,
                    Ok(false) => {}
                    Err(e) => return self.fail(w.line, "guest store", "ok".into(), e.to_string()),
                }
            }
        }
        // Rule 2: no cached translation of va survives the miss.
        if let Err(e) = self.mmu.invlpg(v, w.va) {
            return self.fail(w.line, "re-validation", "ok".into(), e.to_string());
        }
        // Rule 3: the access.
        let access = access_of(w);
        let got = match self.mmu.access(v, w.va, access) {
            Ok(o) => o,
            Err(e) => return self.fail(w.line, "shadow access", "ok".into(), e.to_string()),
        };
        let got: Result<u64, u64> = match got {
            AccessOutcome::Hit(g) => {
                self.report.shadow_hits += 1;
                Ok(g.0)
            }
            AccessOutcome::Fixed(g) => Ok(g.0),
            AccessOutcome::Mmio(g) => {
                self.report.mmio += 1;
                Ok(g.0)
            }
            AccessOutcome::WriteProtected(g) => {
                self.report.write_protected += 1;
                if let Err(e) = self.mmu.track_write(g.0 & !7, 8) {
                    return self.fail(w.line, "track_write", "ok".into(), e.to_string());
                }
                Ok(g.0)
            }
            AccessOutcome::Fault(pf) => Err(u64::from(pf.error_code.bits())),
            AccessOutcome::Retry => {
                return self.fail(w.line, "shadow access", "a result".into(), "retry".into())
            }
        };
        // Rule 4: compare.
        let race = w.ad.iter().any(|a| a.new.is_none());
        match (&w.outcome, got) {
            (WalkOutcome::Translated { pa, .. }, Ok(g)) if *pa == g => {}
            (WalkOutcome::PageFault { ec }, Err(e)) if *ec == e => {
                *self.report.faults_by_ec.entry(e).or_default() += 1;
            }
            (exp, got) => {
                return self.fail(w.line, "outcome", format!("{exp:x?}"), format!("{got:x?}"));
            }
        }
        if !race {
            for p in &w.ptes {
                let want = entry_after(w, p.gpa, p.val);
                let have = self.mmu.mem.read_u64(Gpa(p.gpa)).unwrap_or(0);
                if have != want {
                    let r = self.mmu.guest_store(p.gpa, want);
                    let _ = r;
                    return self.fail(
                        w.line,
                        "entry value after the access (A/D)",
                        format!("{:#x}={want:#x}", p.gpa),
                        format!("{have:#x}"),
                    );
                }
            }
        } else {
            for a in &w.ad {
                if let Some(val) = a.new {
                    let _ = self.mmu.guest_store(a.gpa, val);
                }
            }
        }
        self.report.walks.matched += 1;
    }
}
