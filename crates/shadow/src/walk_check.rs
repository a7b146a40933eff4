//! Replays a real x86 walk trace (`traces/x86/`) through the reference walker.
//!
//! This is the ground truth the shadow MMU is judged by: the traces' README gives the
//! normative rules, applied here to [`crate::paging::walk`]:
//! * guest memory starts empty; before each WALK every recorded entry whose value the
//!   model does not hold is stored ("synthesized writes": the guest's own page-table
//!   stores, never traced), counted as new or changed, never a mismatch;
//! * the walk runs under the vCPU's last CPU record (per-vCPU state);
//! * compared: every entry address and the number of entries read, every A/D attempt
//!   (address, new value, success), the outcome (pa and page size, or the exact #PF
//!   error code, hardware semantics), and after the walk every recorded entry's value with
//!   the walk's A/D updates applied. QEMU's TLB `prot` is recomputed and compared too
//!   (separately counted: it is a TLB detail, not architecture), as is the trace's
//!   `smap` flag against CR4.SMAP/CPL/EFLAGS.AC;
//! * in a multi-vCPU trace, a walk whose recorded A/D compare-exchange lost (`fail`) is a
//!   cross-vCPU race: counted, its outcome compared, the model resynchronized;
//! * after a mismatch the recorded values (with their A/D updates) are loaded into the
//!   model and the replay continues.
//!
//! Invariants: a trace that cannot be read or parsed is an error (`file:line`), never a
//! panic; every WALK record is counted in exactly one of `matched`/`mismatched`.

use crate::paging::{
    walk, Acc, Access, CpuMode, Gpa, GuestPhysMemory, Gva, PagingMode, SparseMemory, Translation,
    PT_DIRTY,
};
use revmap_trace::x86::{AccessType, CpuRecord, WalkOutcome, WalkRecord, X86Reader, X86Record};
use revmap_trace::TraceError;
use std::collections::{BTreeMap, HashMap, HashSet};

/// The first disagreement of a replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalkMismatch {
    /// 1-based line of the WALK record.
    pub line: u64,
    /// What differed.
    pub what: String,
    /// The trace's side.
    pub expected: String,
    /// The walker's side.
    pub got: String,
}

/// The vCPU state a `CPU` record sets: CR0, CR3, CR4, EFER, PKRU, PKRS, the A20 gate
/// and MAXPHYADDR.
pub fn mode_of(c: &CpuRecord) -> CpuMode {
    let mut mode = CpuMode::new(c.cr0, c.cr3, c.cr4, c.efer);
    mode.pkru = c.pkru as u32;
    mode.pkrs = c.pkrs as u32;
    mode.a20 = c.a20;
    mode.maxphyaddr = c.maxphy;
    mode
}

/// What the entry at `gpa`, read as `val` during walk `w`, holds after it: the value
/// of the walk's last A/D update of it, if one succeeded, else `val`.
pub fn entry_after(w: &WalkRecord, gpa: u64, val: u64) -> u64 {
    w.ad.iter()
        .rev()
        .find(|a| a.gpa == gpa)
        .and_then(|a| a.new)
        .unwrap_or(val)
}

/// The counts every replay of an x86 walk trace keeps, whatever it replays the trace
/// through (the reference walker here, the shadow MMU in [`crate::replay`]): the
/// records applied and the WALK records compared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalkTally {
    /// CPU records.
    pub cpu_records: u64,
    /// INVLPG records.
    pub invlpgs: u64,
    /// FLUSH records.
    pub flushes: u64,
    /// WALK records compared.
    pub checked: u64,
    /// WALK records whose every compared item (outcome, A/D state) agreed.
    pub matched: u64,
    /// WALK records with at least one disagreement.
    pub mismatched: u64,
    /// The first disagreement.
    pub first_mismatch: Option<WalkMismatch>,
}

/// Counts from replaying one trace through the reference walker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalkCheckReport {
    /// Records applied, walks compared.
    pub walks: WalkTally,
    /// Successful walks by page size (log2).
    pub translated_by_psz: BTreeMap<u8, u64>,
    /// Faults by error code.
    pub faults_by_ec: BTreeMap<u64, u64>,
    /// Walks under 5-level paging.
    pub five_level_walks: u64,
    /// Successful A/D compare-exchanges.
    pub ad_writes: u64,
    /// Synthesized stores of entries never seen before.
    pub synthesized_new: u64,
    /// Synthesized stores of entries whose model value differed.
    pub synthesized_changed: u64,
    /// Walks whose recomputed QEMU TLB `prot` differed (not counted as mismatches).
    pub prot_disagreements: u64,
    /// Walks whose `smap` flag disagreed with CR4.SMAP, CPL, EFLAGS.AC and `rcpl`.
    pub smap_flag_disagreements: u64,
    /// Walks of a multi-vCPU trace whose recorded A/D compare-exchange lost to another
    /// vCPU (`ad=GPA:fail`): the allowed exception; only their outcome is compared.
    pub cross_vcpu_races: u64,
}

/// The replay state: guest memory and the per-vCPU control state.
#[derive(Debug, Default)]
pub struct WalkChecker {
    mem: SparseMemory,
    seen: HashSet<u64>,
    cpus: HashMap<u32, CpuMode>,
    /// The counts so far.
    pub report: WalkCheckReport,
}

impl WalkChecker {
    /// An empty model.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replays a whole file (gzip or plain).
    pub fn check_file(path: impl AsRef<std::path::Path>) -> Result<WalkCheckReport, TraceError> {
        let mut c = WalkChecker::new();
        for rec in X86Reader::open(path)? {
            c.record(&rec?);
        }
        Ok(c.report)
    }

    /// Applies one record.
    pub fn record(&mut self, rec: &X86Record) {
        match rec {
            X86Record::Cpu(c) => {
                self.report.walks.cpu_records += 1;
                self.cpus.insert(c.cpu, mode_of(c));
            }
            X86Record::Invlpg { .. } => self.report.walks.invlpgs += 1,
            X86Record::Flush { .. } => self.report.walks.flushes += 1,
            X86Record::Walk(w) => self.walk(w),
        }
    }

    fn mismatch(&mut self, w: &WalkRecord, what: &str, expected: String, got: String) {
        self.report.walks.mismatched += 1;
        if self.report.walks.first_mismatch.is_none() {
            self.report.walks.first_mismatch = Some(WalkMismatch {
                line: w.line,
                what: what.to_owned(),
                expected,
                got,
            });
        }
        // Resynchronize: the recorded values with the recorded A/D updates.
        for p in &w.ptes {
            let _ = self.mem.write_u64(Gpa(p.gpa), p.val);
        }
        for a in &w.ad {
            if let Some(v) = a.new {
                let _ = self.mem.write_u64(Gpa(a.gpa), v);
            }
        }
    }

    fn store(&mut self, mode: &CpuMode, gpa: u64, val: u64) {
        let _ = if mode.paging().has_4_byte_gpte() {
            self.mem.write_u32(Gpa(gpa), val as u32)
        } else {
            self.mem.write_u64(Gpa(gpa), val)
        };
    }

    fn load(&self, mode: &CpuMode, gpa: u64) -> u64 {
        if mode.paging().has_4_byte_gpte() {
            self.mem.read_u32(Gpa(gpa)).map_or(0, u64::from)
        } else {
            self.mem.read_u64(Gpa(gpa)).unwrap_or(0)
        }
    }

    fn walk(&mut self, w: &WalkRecord) {
        self.report.walks.checked += 1;
        let Some(mode) = self.cpus.get(&w.cpu).copied() else {
            return self.mismatch(w, "WALK before any CPU record", "CPU".into(), "none".into());
        };
        if mode.paging() == PagingMode::Long5 {
            self.report.five_level_walks += 1;
        }
        // Rule 1: lazy synthesis of the guest's page-table stores.
        for p in &w.ptes {
            let cur = self.load(&mode, p.gpa);
            if self.seen.insert(p.gpa) {
                self.report.synthesized_new += 1;
                self.store(&mode, p.gpa, p.val);
            } else if cur != p.val {
                self.report.synthesized_changed += 1;
                self.store(&mode, p.gpa, p.val);
            }
        }
        let access = access_of(w);
        let expect_smap = mode.smap() && w.cpl == 0 && (!w.ac || w.implicit_supervisor());
        if expect_smap != w.smap && w.acc != AccessType::Fetch {
            self.report.smap_flag_disagreements += 1;
        }
        let got = match walk(&mut self.mem, &mode, Gva(w.va), access) {
            Ok(g) => g,
            Err(e) => return self.mismatch(w, "walk error", "a walk".into(), e.to_string()),
        };
        if w.ad.iter().any(|a| a.new.is_none()) {
            if self.cpus.len() < 2 {
                return self.mismatch(
                    w,
                    "A/D cmpxchg failure in a 1-vCPU trace",
                    "no race".into(),
                    format!("{:x?}", w.ad),
                );
            }
            // A cross-vCPU race: the recorded entries (synthesized above, last value per
            // address) are the state after it. Compare the outcome, then resynchronize.
            self.report.cross_vcpu_races += 1;
            let same = match (&w.outcome, &got.outcome) {
                (WalkOutcome::Translated { pa, .. }, Ok(t)) => *pa == t.gpa.0,
                (WalkOutcome::PageFault { ec }, Err(pf)) => *ec == u64::from(pf.error_code.bits()),
                _ => false,
            };
            if !same {
                return self.mismatch(
                    w,
                    "outcome after a race",
                    format!("{:x?}", w.outcome),
                    format!("{:x?}", got.outcome),
                );
            }
            for a in &w.ad {
                if let Some(v) = a.new {
                    self.store(&mode, a.gpa, v);
                }
            }
            self.report.walks.matched += 1;
            return;
        }
        // Structure: every entry address, and how many.
        let rec_addrs: Vec<u64> = w.ptes.iter().map(|p| p.gpa).collect();
        let got_addrs: Vec<u64> = got.reads.iter().map(|e| e.gpa.0).collect();
        if rec_addrs != got_addrs {
            return self.mismatch(w, "entries read", hexes(&rec_addrs), hexes(&got_addrs));
        }
        // A/D attempts.
        let rec_ad: Vec<(u64, Option<u64>)> = w.ad.iter().map(|a| (a.gpa, a.new)).collect();
        let got_ad: Vec<(u64, Option<u64>)> = got
            .ad_writes
            .iter()
            .map(|a| (a.gpa.0, a.ok.then_some(a.new)))
            .collect();
        if rec_ad != got_ad {
            return self.mismatch(
                w,
                "A/D updates",
                format!("{rec_ad:x?}"),
                format!("{got_ad:x?}"),
            );
        }
        self.report.ad_writes += got.ad_writes.iter().filter(|a| a.ok).count() as u64;
        // Outcome.
        match (&w.outcome, &got.outcome) {
            (WalkOutcome::Translated { pa, psz, prot }, Ok(t)) => {
                if *pa != t.gpa.0 || *psz != t.page_shift {
                    return self.mismatch(
                        w,
                        "translation",
                        format!("pa={pa:#x} psz={psz}"),
                        format!("pa={:#x} psz={}", t.gpa.0, t.page_shift),
                    );
                }
                let q = qemu_prot(&mode, w, t);
                if q != (prot.read, prot.write, prot.exec) {
                    self.report.prot_disagreements += 1;
                }
                *self.report.translated_by_psz.entry(*psz).or_default() += 1;
            }
            (WalkOutcome::PageFault { ec }, Err(pf)) => {
                if *ec != u64::from(pf.error_code.bits()) {
                    return self.mismatch(
                        w,
                        "#PF error code",
                        format!("{ec:#x}"),
                        format!("{:#x} ({:?})", pf.error_code.bits(), pf.reason),
                    );
                }
                *self.report.faults_by_ec.entry(*ec).or_default() += 1;
            }
            (exp, got) => {
                return self.mismatch(w, "outcome", format!("{exp:x?}"), format!("{got:x?}"));
            }
        }
        // Memory after the walk: recorded values with this walk's A/D updates applied.
        for p in &w.ptes {
            let want = entry_after(w, p.gpa, p.val);
            let have = self.load(&mode, p.gpa);
            if have != want {
                return self.mismatch(
                    w,
                    "entry after the walk",
                    format!("{:#x}={want:#x}", p.gpa),
                    format!("{have:#x}"),
                );
            }
        }
        self.report.walks.matched += 1;
    }
}

/// The access a recorded walk made: its type, CPL 3 as a user access, an implicit
/// supervisor access (descriptor-table reads), and EFLAGS.AC.
pub(crate) fn access_of(w: &WalkRecord) -> Access {
    let mut access = Access::empty();
    match w.acc {
        AccessType::Read => {}
        AccessType::Write => access |= Access::WRITE,
        AccessType::Fetch => access |= Access::FETCH,
    }
    if w.cpl == 3 {
        access |= Access::USER;
    }
    if w.implicit_supervisor() {
        access |= Access::IMPLICIT;
    }
    if w.ac {
        access |= Access::EFLAGS_AC;
    }
    access
}

fn hexes(v: &[u64]) -> String {
    format!("{v:#x?}")
}

/// QEMU's TLB permissions for a successful walk (README "Walk semantics" rule 5 and 6).
fn qemu_prot(mode: &CpuMode, w: &WalkRecord, t: &Translation) -> (bool, bool, bool) {
    let user_page = t.pte_access.contains(Acc::USER);
    let cpl3 = w.cpl == 3;
    let mut r = !w.smap || !user_page;
    let mut wr = r && (t.pte_access.contains(Acc::WRITE) || (!cpl3 && !mode.wp()));
    let x = t.pte_access.contains(Acc::EXEC) && (cpl3 || !(mode.smep() && user_page));
    let reg = if user_page {
        mode.pke().then_some(mode.pkru)
    } else {
        mode.pks().then_some(mode.pkrs)
    };
    if let Some(reg) = reg {
        let bits = (reg >> (2 * u32::from(t.pkey))) & 3;
        if bits & 1 != 0 {
            r = false;
            wr = false;
        } else if bits & 2 != 0 && (cpl3 || mode.wp()) {
            wr = false;
        }
    }
    if w.acc != AccessType::Write && t.leaf & PT_DIRTY == 0 {
        wr = false;
    }
    (r, wr, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use revmap_trace::x86::{parse_x86_line, X86Line};

    fn run(text: &str) -> WalkCheckReport {
        let mut c = WalkChecker::new();
        for (i, l) in text.lines().enumerate() {
            if let X86Line::Record(r) = parse_x86_line(l.as_bytes(), i as u64 + 1).unwrap() {
                c.record(&r);
            }
        }
        c.report
    }

    const CPU: &str =
        "CPU cpu=0 cr0=0x80050033 cr3=0x1000 cr4=0x20 efer=0xd01 pkru=0x0 pkrs=0x0 a20=1 maxphy=40";

    #[test]
    fn matching_walks_and_each_kind_of_mismatch() {
        let ok = "WALK cpu=0 va=0x234 acc=w cpl=3 smap=0 pte=0x1000:0x2067,0x2000:0x3067,0x3000:0x4067,0x4000:0x9007 ad=0x4000:0x9067 -> pa=0x9234 psz=12 prot=rw-";
        let r = run(&format!("{CPU}\n{ok}\n"));
        assert_eq!(
            (
                r.walks.checked,
                r.walks.matched,
                r.walks.mismatched,
                r.ad_writes
            ),
            (1, 1, 0, 1)
        );
        assert_eq!((r.synthesized_new, r.synthesized_changed), (4, 0));
        // The same walk again: D is already set in the model, so no A/D update.
        let again = ok.replace(
            "pte=0x1000:0x2067,0x2000:0x3067,0x3000:0x4067,0x4000:0x9007 ad=0x4000:0x9067",
            "pte=0x1000:0x2067,0x2000:0x3067,0x3000:0x4067,0x4000:0x9067",
        );
        let r = run(&format!("{CPU}\n{ok}\n{again}\n"));
        assert_eq!((r.walks.matched, r.synthesized_changed), (2, 0));
        let cases = [
            // A missing A/D update.
            (ok.replace(" ad=0x4000:0x9067", ""), "A/D updates"),
            // A wrong pa.
            (ok.replace("pa=0x9234", "pa=0x9235"), "translation"),
            // A wrong entry address.
            (ok.replace("0x4000:0x9007", "0x4008:0x9007"), "entries read"),
            // A fault the walker does not see.
            (
                again.replace(" -> pa=0x9234 psz=12 prot=rw-", " -> fault ec=0x7"),
                "outcome",
            ),
        ];
        for (line, what) in cases {
            let r = run(&format!("{CPU}\n{line}\n"));
            assert_eq!((r.walks.checked, r.walks.mismatched), (1, 1), "{line}");
            assert_eq!(r.walks.first_mismatch.unwrap().what, what);
        }
        // A walk before any CPU record of its vCPU.
        let r = run(&format!("{ok}\n"));
        assert_eq!(
            r.walks.first_mismatch.unwrap().what,
            "WALK before any CPU record"
        );
    }

    #[test]
    fn races_are_allowed_only_with_two_vcpus() {
        let racy = "WALK cpu=0 va=0x234 acc=r cpl=3 smap=0 pte=0x1000:0x2067,0x2000:0x3067,0x3000:0x4067,0x4000:0x9005,0x4000:0x9025 ad=0x4000:fail -> pa=0x9234 psz=12 prot=r--";
        let r = run(&format!("{CPU}\n{racy}\n"));
        assert_eq!(r.walks.mismatched, 1);
        let cpu1 = CPU.replace("cpu=0", "cpu=1");
        let r = run(&format!("{CPU}\n{cpu1}\n{racy}\n"));
        assert_eq!((r.walks.matched, r.cross_vcpu_races), (1, 1));
    }
}
