//! `revmap replay` of the two non-PPC trace formats: x86 walk traces through the shadow
//! MMU ([`revmap_shadow::replay::ShadowReplayer`]) and nested-radix traces through the
//! nested MMU ([`revmap_nested::replay::replay_file`]).
//!
//! Invariants: a file's format is decided by its content only ([`detect`]), never by its
//! name; a report passes only if every checked record matched, no CPU/INVLPG/FLUSH event
//! failed (x86) and the invariant checker found nothing; an unreadable or malformed file
//! is an error naming `file:line`, never a panic.

use revmap_nested::replay::{
    replay_file as replay_nested, ReplayOptions as NestedOptions, ReplayReport as NestedReport,
};
use revmap_shadow::replay::{ReplayReport as X86Report, ShadowReplayer};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// The invariant-checker interval of an x86 replay without `--check-every` (walks).
pub const X86_DEFAULT_CHECK_EVERY: u64 = 100_000;
/// The invariant-checker interval of a nested replay without `--check-every` (records).
pub const NESTED_DEFAULT_CHECK_EVERY: u64 = 5_000;

/// A trace file's format, recognised from its content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceKind {
    /// A PAPR hypercall trace (or anything unrecognised: the PPC replay reports it).
    Ppc,
    /// An x86 walk trace.
    X86,
    /// A nested-radix trace.
    Nested,
}

impl TraceKind {
    /// The `kind` value of the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            TraceKind::Ppc => "ppc",
            TraceKind::X86 => "x86",
            TraceKind::Nested => "nested",
        }
    }

    /// How the format is named in messages.
    pub fn describe(self) -> &'static str {
        match self {
            TraceKind::Ppc => "a PPC hypercall trace",
            TraceKind::X86 => "an x86 walk trace",
            TraceKind::Nested => "a nested-radix trace",
        }
    }
}

/// Recognises `path`'s format from its first record (gzip or plain). A file that cannot
/// be opened or recognised is [`TraceKind::Ppc`]: the PPC replay then reports the error
/// in its own words (unreadable, empty, binary, unknown record at `file:line`).
pub fn detect(path: &Path) -> TraceKind {
    if matches!(revmap_trace::nested::NestedReader::detect(path), Ok(true)) {
        return TraceKind::Nested;
    }
    match revmap_trace::x86::detect_file(path) {
        Ok(revmap_trace::x86::Kind::X86) => TraceKind::X86,
        _ => TraceKind::Ppc,
    }
}

#[derive(Serialize)]
struct X86MismatchJson<'a> {
    line: u64,
    what: &'a str,
    expected: &'a str,
    got: &'a str,
}

#[derive(Serialize)]
struct ShadowJson {
    page_faults: u64,
    shadow_hits: u64,
    write_protected_gfns: u64,
    shadow_pages: u64,
    shadow_pages_created: u64,
    shadow_pages_zapped: u64,
    rmap_adds: u64,
    rmap_recycled: u64,
    write_protected_faults: u64,
    write_protected_writes: u64,
    guest_stores: u64,
    emulated_stores: u64,
    emulated_writes: u64,
    flooded: u64,
    misaligned: u64,
    unsync: u64,
    synced: u64,
    tlb_flushes: u64,
    evicted: u64,
    prev_root_hits: u64,
    retries: u64,
    huge_sptes: u64,
    mmio: u64,
    cpu_records: u64,
    invlpgs: u64,
    flushes: u64,
    /// Faults reflected to the guest, by #PF error code (hex).
    faults_by_ec: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct X86Json<'a> {
    file: &'a str,
    kind: &'static str,
    checked: u64,
    matched: u64,
    mismatched: u64,
    first_mismatch: Option<X86MismatchJson<'a>>,
    event_errors: u64,
    invariant_checks: u64,
    invariant_violations: u64,
    first_violation: Option<&'a str>,
    shadow: ShadowJson,
    seconds: f64,
    walks_per_second: f64,
    passed: bool,
}

#[derive(Serialize)]
struct NestedStatsJson {
    nested_faults: u64,
    shadow_hits: u64,
    fault_retries: u64,
    rmap_invalidations: u64,
    rmap_stale_skipped: u64,
    rmap_reclaimed: u64,
    rmap_refused: u64,
    rmap_entries_max_per_gfn: u64,
    rmap_bytes_max: u64,
    shadow_flushes: u64,
    l2_created: u64,
    l2_released: u64,
}

#[derive(Serialize)]
struct NestedJson<'a> {
    file: &'a str,
    kind: &'static str,
    records: u64,
    checked: u64,
    matched: u64,
    mismatched: u64,
    first_mismatch: Option<&'a str>,
    invariant_checks: u64,
    invariant_violations: u64,
    first_violation: Option<&'a str>,
    nested: NestedStatsJson,
    seconds: f64,
    records_per_second: f64,
    passed: bool,
}

/// One finished replay of an x86 or nested trace.
pub enum MmuOutcome {
    /// An x86 walk trace's report.
    X86(String, Box<X86Report>),
    /// A nested trace's report.
    Nested(NestedReport),
}

fn per_second(n: u64, s: f64) -> f64 {
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

impl MmuOutcome {
    /// Whether everything matched with no violations.
    pub fn passed(&self) -> bool {
        match self {
            MmuOutcome::X86(_, r) => {
                r.walks.mismatched == 0
                    && r.event_errors == 0
                    && r.invariant_violations == 0
                    && r.walks.matched == r.walks.checked
            }
            MmuOutcome::Nested(r) => {
                r.mismatched == 0 && r.invariant_violations == 0 && r.matched == r.checked
            }
        }
    }

    /// The report as one JSON line.
    pub fn to_json(&self) -> serde_json::Result<String> {
        match self {
            MmuOutcome::X86(file, r) => {
                let s = &r.shadow;
                serde_json::to_string(&X86Json {
                    file,
                    kind: TraceKind::X86.name(),
                    checked: r.walks.checked,
                    matched: r.walks.matched,
                    mismatched: r.walks.mismatched,
                    first_mismatch: r.walks.first_mismatch.as_ref().map(|m| X86MismatchJson {
                        line: m.line,
                        what: &m.what,
                        expected: &m.expected,
                        got: &m.got,
                    }),
                    event_errors: r.event_errors,
                    invariant_checks: r.invariant_checks,
                    invariant_violations: r.invariant_violations,
                    first_violation: r.first_violation.as_deref(),
                    shadow: ShadowJson {
                        page_faults: s.page_faults,
                        shadow_hits: r.shadow_hits,
                        write_protected_gfns: r.write_protected_gfns,
                        shadow_pages: r.shadow_pages,
                        shadow_pages_created: s.sp_created,
                        shadow_pages_zapped: s.sp_zapped,
                        rmap_adds: s.rmap_adds,
                        rmap_recycled: s.rmap_recycled,
                        write_protected_faults: s.write_protected_faults,
                        write_protected_writes: r.write_protected,
                        guest_stores: r.guest_stores,
                        emulated_stores: r.emulated_stores,
                        emulated_writes: s.emulated_writes,
                        flooded: s.flooded,
                        misaligned: s.misaligned,
                        unsync: s.unsync,
                        synced: s.synced,
                        tlb_flushes: s.tlb_flushes,
                        evicted: s.evicted,
                        prev_root_hits: s.prev_root_hits,
                        retries: s.retries,
                        huge_sptes: s.huge_sptes,
                        mmio: r.mmio,
                        cpu_records: r.walks.cpu_records,
                        invlpgs: r.walks.invlpgs,
                        flushes: r.walks.flushes,
                        faults_by_ec: r
                            .faults_by_ec
                            .iter()
                            .map(|(ec, n)| (format!("{ec:#x}"), *n))
                            .collect(),
                    },
                    seconds: r.seconds,
                    walks_per_second: per_second(r.walks.checked, r.seconds),
                    passed: self.passed(),
                })
            }
            MmuOutcome::Nested(r) => serde_json::to_string(&NestedJson {
                file: &r.file,
                kind: TraceKind::Nested.name(),
                records: r.records,
                checked: r.checked,
                matched: r.matched,
                mismatched: r.mismatched,
                first_mismatch: r.first_mismatch.as_deref(),
                invariant_checks: r.invariant_checks,
                invariant_violations: r.invariant_violations,
                first_violation: r.first_violation.as_deref(),
                nested: NestedStatsJson {
                    nested_faults: r.counters.nested_faults,
                    shadow_hits: r.counters.shadow_hits,
                    fault_retries: r.counters.fault_retries,
                    rmap_invalidations: r.counters.rmap_invalidations,
                    rmap_stale_skipped: r.counters.rmap_stale_skipped,
                    rmap_reclaimed: r.counters.rmap_reclaimed,
                    rmap_refused: r.counters.rmap_refused,
                    rmap_entries_max_per_gfn: r.counters.rmap_entries_max_per_gfn,
                    rmap_bytes_max: r.counters.rmap_bytes_max,
                    shadow_flushes: r.counters.shadow_flushes,
                    l2_created: r.counters.l2_created,
                    l2_released: r.counters.l2_released,
                },
                seconds: r.seconds,
                records_per_second: per_second(r.records, r.seconds),
                passed: self.passed(),
            }),
        }
    }

    /// The human summary: what was replayed and how it compared, the checker's
    /// verdict (the same lines for every MMU), the MMU's counters, the speed.
    pub fn human(&self, out: &mut impl Write) -> std::io::Result<()> {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let (mismatch, checks, violations, first_violation) = match self {
            MmuOutcome::X86(file, r) => {
                writeln!(out, "{file} (x86 walk trace, shadow MMU)")?;
                writeln!(
                    out,
                    "  walks {}, matched {}, mismatched {}, event errors {}",
                    r.walks.checked, r.walks.matched, r.walks.mismatched, r.event_errors
                )?;
                let m = r.walks.first_mismatch.as_ref().map(|m| {
                    format!(
                        "{file}:{}: {}: expected {}, got {}",
                        m.line, m.what, m.expected, m.got
                    )
                });
                (
                    m,
                    r.invariant_checks,
                    r.invariant_violations,
                    &r.first_violation,
                )
            }
            MmuOutcome::Nested(r) => {
                writeln!(out, "{} (nested-radix trace, nested MMU)", r.file)?;
                writeln!(
                    out,
                    "  records {}, results checked {}, matched {}, mismatched {}",
                    r.records, r.checked, r.matched, r.mismatched
                )?;
                let m = r.first_mismatch.as_ref().map(ToString::to_string);
                (
                    m,
                    r.invariant_checks,
                    r.invariant_violations,
                    &r.first_violation,
                )
            }
        };
        let mismatch = mismatch.as_deref().unwrap_or("none");
        writeln!(out, "  first mismatch: {mismatch}")?;
        writeln!(out, "  invariant checks {checks}, violations {violations}")?;
        if let Some(v) = first_violation {
            writeln!(out, "  first violation: {v}")?;
        }
        match self {
            MmuOutcome::X86(_, r) => {
                let s = &r.shadow;
                writeln!(
                    out,
                    "  shadow: {} page faults, {} hits, {} shadow pages created, {} zapped, {} in use, {} write-protected gfns",
                    s.page_faults, r.shadow_hits, s.sp_created, s.sp_zapped, r.shadow_pages, r.write_protected_gfns
                )?;
                writeln!(
                    out,
                    "          {} rmap adds, {} guest page-table stores ({} emulated), {} unsync, {} synced, {} flooded",
                    s.rmap_adds, r.guest_stores, r.emulated_stores, s.unsync, s.synced, s.flooded
                )?;
                writeln!(
                    out,
                    "  {:.3} s, {:.0} walks/s",
                    r.seconds,
                    per_second(r.walks.checked, r.seconds)
                )?;
            }
            MmuOutcome::Nested(r) => {
                let c = &r.counters;
                writeln!(
                    out,
                    "  nested: {} nested faults, {} shadow hits, {} rmap invalidations, {} stale skipped, {} reclaimed",
                    c.nested_faults, c.shadow_hits, c.rmap_invalidations, c.rmap_stale_skipped, c.rmap_reclaimed
                )?;
                writeln!(
                    out,
                    "          rmap: at most {} entries per gfn, {} B at most; {} L2s created, {} released",
                    c.rmap_entries_max_per_gfn, c.rmap_bytes_max, c.l2_created, c.l2_released
                )?;
                writeln!(
                    out,
                    "  {:.3} s, {:.0} records/s",
                    r.seconds,
                    per_second(r.records, r.seconds)
                )?;
            }
        }
        writeln!(out, "  result: {verdict}")
    }
}

/// Replays an x86 walk trace; `check_every` walks between checker runs.
pub fn replay_x86(path: &Path, check_every: Option<u64>) -> Result<MmuOutcome, String> {
    let every = check_every.unwrap_or(X86_DEFAULT_CHECK_EVERY);
    ShadowReplayer::replay_file(path, every)
        .map(|r| MmuOutcome::X86(path.display().to_string(), Box::new(r)))
        .map_err(|e| e.to_string())
}

/// Replays a nested trace; `check_every` records between checker runs.
pub fn replay_nested_file(path: &Path, check_every: Option<u64>) -> Result<MmuOutcome, String> {
    let opts = NestedOptions {
        check_every: check_every.unwrap_or(NESTED_DEFAULT_CHECK_EVERY),
    };
    replay_nested(path, opts)
        .map(MmuOutcome::Nested)
        .map_err(|e| e.to_string())
}
