//! `revmap replay`: replays trace files and reports, per file, as text or JSON lines.
//!
//! Invariants: one report (or one error) per file, in argument order; every file is
//! attempted even after a failure; the exit code is the worst outcome (0 all passed —
//! a file stopped at a resize record counts as passed; 1 some file mismatched, had
//! violations or hit an unsupported record; 2 some file could not be read or parsed, or
//! a host actor failed).
//!
//! With `--host-interference` each file is pre-parsed and replayed on one vCPU thread
//! while the host actors (memory pressure, aging, migration; seeded with `--seed`) run
//! on other threads against the same VM; the checker runs with the actors paused every
//! `--check-every` calls (default 4096) and at the end, and the report gains the host
//! operation counts.

use crate::backend::{make_vm, FlavourArg};
use crate::replay_mmu::{detect, replay_nested_file, replay_x86, MmuOutcome, TraceKind};
use clap::Args;
use revmap_sim::actors::HostOps;
use revmap_sim::interference::{
    replay_file_with_interference, InterferenceError, InterferenceOptions,
};
use revmap_sim::replay::{replay_file, FileReport, PreparsedTrace, ReplayOptions, StopReason};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `revmap replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Hypervisor flavour to replay PPC hypercall traces on (default kvm). An error on
    /// an x86 or nested trace, as are --preparse and --host-interference: those formats
    /// have one MMU each.
    #[arg(long, value_enum)]
    flavour: Option<FlavourArg>,
    /// Print one JSON object per file (one per line) instead of the human summary.
    #[arg(long)]
    json: bool,
    /// Run the VM's invariant checker after every N calls (PPC), WALK records (x86) or
    /// records (nested) and at the end (defaults: PPC only at the end, x86 100000,
    /// nested 5000).
    #[arg(long, value_name = "N")]
    check_every: Option<NonZeroU64>,
    /// Parse each whole file first, then time only the replay loop.
    #[arg(long)]
    preparse: bool,
    /// Run the host actors (memory pressure, aging, live migration) concurrently with
    /// the replay against the same VM; every result must still match. Implies
    /// --preparse; the checker runs (actors paused) every --check-every calls, 4096 by
    /// default.
    #[arg(long)]
    host_interference: bool,
    /// Seed of the host actors. The seed fixes what each actor does (which ranges it
    /// unmaps, ages and harvests, and how many operations per phase), not what it finds
    /// there: the actors run concurrently with the replay, so `hptes_unmapped`, the
    /// young counts and the dirty pages vary between runs of one seed. Aging finds
    /// nothing young under replay: KVM's H_ENTER keeps R clear in the real HPTE, only an
    /// MMU access sets it, and a replay makes no accesses (`revmap run` does).
    #[arg(
        long,
        value_name = "S",
        default_value_t = 1,
        requires = "host_interference"
    )]
    seed: u64,
    /// Replay calls per interference phase (default 256).
    #[arg(long, value_name = "N", requires = "host_interference")]
    host_phase: Option<NonZeroU64>,
    /// Host operations each actor performs per phase (default 4).
    #[arg(long, value_name = "K", requires = "host_interference")]
    host_ops: Option<NonZeroU64>,
    /// Trace files (gzip or plain text): PPC hypercall traces, x86 walk traces and
    /// nested-radix traces, recognised by content, mixed in any order.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

impl ReplayArgs {
    fn flavour(&self) -> FlavourArg {
        self.flavour.unwrap_or(FlavourArg::Kvm)
    }

    /// The PPC-only flags given, by name.
    fn ppc_only_flags(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.flavour.is_some() {
            v.push("--flavour");
        }
        if self.preparse {
            v.push("--preparse");
        }
        if self.host_interference {
            v.push("--host-interference");
        }
        v
    }
}

#[derive(Serialize)]
struct MismatchJson {
    line: u64,
    hcall: &'static str,
    field: String,
    expected: String,
    got: String,
}

#[derive(Serialize)]
struct StopJson {
    line: u64,
    record: &'static str,
    reason: &'static str,
    message: String,
}

#[derive(Serialize)]
struct ReportJson<'a> {
    file: &'a str,
    kind: &'static str,
    flavour: String,
    hpt_order: u32,
    calls: u64,
    matched: u64,
    mismatched: u64,
    first_mismatch: Option<MismatchJson>,
    masks_applied: BTreeMap<&'static str, u64>,
    checks: u64,
    invariant_violations: u64,
    first_violation: Option<&'a str>,
    stopped_at: Option<StopJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host_ops: Option<HostOps>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a HostJson>,
    seconds: f64,
    calls_per_second: f64,
    passed: bool,
}

#[derive(Serialize)]
struct HostJson {
    seed: u64,
    phases: u64,
    host_ops_total: u64,
}

/// A replay's report and, under interference, the host side's figures.
struct Outcome {
    report: FileReport,
    host: Option<(HostOps, HostJson)>,
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    file: &'a str,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    flavour: Option<String>,
    error: String,
}

fn to_json(o: &Outcome, flavour: FlavourArg) -> ReportJson<'_> {
    let r = &o.report;
    ReportJson {
        file: &r.file,
        kind: "ppc",
        flavour: flavour.to_string(),
        hpt_order: r.hpt_order,
        calls: r.calls,
        matched: r.matched,
        mismatched: r.mismatched,
        first_mismatch: r.first_mismatch.map(|m| MismatchJson {
            line: m.line,
            hcall: m.hcall_name(),
            field: m.field.to_string(),
            expected: m.expected_str(),
            got: m.got_str(),
        }),
        masks_applied: r.masks_applied.iter().collect(),
        checks: r.checks,
        invariant_violations: r.invariant_violations,
        first_violation: r.first_violation.as_deref(),
        stopped_at: r.stopped_at.map(|s| StopJson {
            line: s.line,
            record: s.record,
            reason: match s.reason {
                StopReason::Resize => "resize",
                StopReason::HwSet => "hw-set",
            },
            message: s.to_string(),
        }),
        host_ops: o.host.as_ref().map(|h| h.0),
        host: o.host.as_ref().map(|h| &h.1),
        seconds: r.seconds,
        calls_per_second: r.calls_per_second(),
        passed: r.passed(),
    }
}

fn human(out: &mut impl Write, o: &Outcome, flavour: FlavourArg) -> std::io::Result<()> {
    let r = &o.report;
    writeln!(
        out,
        "{} (flavour {flavour}, HPT order {})",
        r.file, r.hpt_order
    )?;
    writeln!(
        out,
        "  calls {}, matched {}, mismatched {}",
        r.calls, r.matched, r.mismatched
    )?;
    match &r.first_mismatch {
        Some(m) => writeln!(out, "  first mismatch: {m}")?,
        None => writeln!(out, "  first mismatch: none")?,
    }
    if r.masks_applied.is_empty() {
        writeln!(out, "  masks applied: none")?;
    } else {
        let list: Vec<String> = r
            .masks_applied
            .iter()
            .map(|(n, c)| format!("{n} x{c}"))
            .collect();
        writeln!(out, "  masks applied: {}", list.join(", "))?;
    }
    writeln!(
        out,
        "  invariant checks {}, violations {}",
        r.checks, r.invariant_violations
    )?;
    if let Some(v) = &r.first_violation {
        writeln!(out, "  first violation: {v}")?;
    }
    if let Some((ops, h)) = &o.host {
        writeln!(
            out,
            "  host interference: seed {}, {} phases, {} host operations",
            h.seed, h.phases, h.host_ops_total
        )?;
        writeln!(
            out,
            "    unmap_hva_range {} ({} HPTEs unmapped), host_page_in {}",
            ops.unmap_hva_range, ops.hptes_unmapped, ops.host_page_in
        )?;
        writeln!(
            out,
            "    age_gfn {} ({} young), test_age_gfn {} ({} young)",
            ops.age_gfn, ops.age_gfn_young, ops.test_age_gfn, ops.test_age_gfn_young
        )?;
        writeln!(
            out,
            "    get_dirty_log {} in {} rounds ({} dirty pages, max {}/round), clear_dirty_log {}, errors {}",
            ops.get_dirty_log,
            ops.dirty_log_rounds,
            ops.dirty_pages,
            ops.max_dirty_pages_per_round,
            ops.clear_dirty_log,
            ops.errors
        )?;
    }
    if let Some(s) = &r.stopped_at {
        writeln!(out, "  STOPPED EARLY: {s}")?;
        writeln!(
            out,
            "  (the figures above cover only the {} calls before it)",
            r.calls
        )?;
    }
    writeln!(
        out,
        "  {:.3} s, {:.0} calls/s",
        r.seconds,
        r.calls_per_second()
    )?;
    let verdict = match (&r.stopped_at, r.passed()) {
        (Some(_), true) => "PASS (up to the resize record)",
        (None, true) => "PASS",
        (_, false) => "FAIL",
    };
    writeln!(out, "  result: {verdict}")
}

fn replay_one(args: &ReplayArgs, path: &PathBuf) -> Result<Outcome, InterferenceError> {
    let opts = ReplayOptions {
        check_every: args.check_every,
    };
    let flavour = args.flavour();
    if args.host_interference {
        let mut io = InterferenceOptions::new(args.seed);
        if let Some(n) = args.check_every {
            io.check_every = n;
        }
        if let Some(n) = args.host_phase {
            io.phase_calls = n;
        }
        if args.host_ops.is_some() {
            io.actors.ops_per_phase = args.host_ops;
        }
        let rep = replay_file_with_interference(path, &io, |spec| make_vm(flavour, spec))?;
        let h = HostJson {
            seed: rep.seed,
            phases: rep.phases,
            host_ops_total: rep.host_ops.total(),
        };
        return Ok(Outcome {
            report: rep.replay,
            host: Some((rep.host_ops, h)),
        });
    }
    let report = if args.preparse {
        PreparsedTrace::open(path)?.replay_with(&opts, |spec| make_vm(flavour, spec))
    } else {
        replay_file(path, &opts, |spec| make_vm(flavour, spec))
    }?;
    Ok(Outcome { report, host: None })
}

/// A file's replay: a PPC report, an x86/nested report, or why there is none.
enum FileOutcome {
    Ppc(Result<Outcome, InterferenceError>),
    Mmu(Result<MmuOutcome, String>),
}

fn replay_any(args: &ReplayArgs, path: &PathBuf, kind: TraceKind) -> FileOutcome {
    let check_every = args.check_every.map(NonZeroU64::get);
    if kind != TraceKind::Ppc {
        let flags = args.ppc_only_flags();
        if !flags.is_empty() {
            return FileOutcome::Mmu(Err(format!(
                "{}: {} applies only to PPC hypercall traces; this is {}",
                path.display(),
                flags.join(", "),
                kind.describe()
            )));
        }
    }
    match kind {
        TraceKind::Ppc => FileOutcome::Ppc(replay_one(args, path)),
        TraceKind::X86 => FileOutcome::Mmu(replay_x86(path, check_every)),
        TraceKind::Nested => FileOutcome::Mmu(replay_nested_file(path, check_every)),
    }
}

/// Runs `revmap replay`; returns the process exit code.
pub fn run(args: &ReplayArgs) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut worst = 0u8;
    let flavour = args.flavour();
    for path in &args.files {
        let name = path.display().to_string();
        let kind = detect(path);
        let result = match replay_any(args, path, kind) {
            FileOutcome::Ppc(Ok(rep)) => Ok((
                rep.report.passed(),
                if args.json {
                    serde_json::to_string(&to_json(&rep, flavour)).map_err(std::io::Error::other)
                } else {
                    let mut v = Vec::new();
                    human(&mut v, &rep, flavour).map(|()| String::from_utf8_lossy(&v).into_owned())
                },
            )),
            FileOutcome::Mmu(Ok(rep)) => Ok((
                rep.passed(),
                if args.json {
                    rep.to_json().map_err(std::io::Error::other)
                } else {
                    let mut v = Vec::new();
                    rep.human(&mut v)
                        .map(|()| String::from_utf8_lossy(&v).into_owned())
                },
            )),
            FileOutcome::Ppc(Err(e)) => Err(e.to_string()),
            FileOutcome::Mmu(Err(e)) => Err(e),
        };
        let written = match result {
            Ok((passed, text)) => {
                if !passed {
                    worst = worst.max(1);
                }
                text.and_then(|s| {
                    if args.json {
                        writeln!(out, "{s}")
                    } else {
                        write!(out, "{s}")
                    }
                })
            }
            Err(e) => {
                worst = 2;
                eprintln!("revmap replay: error: {e}");
                if args.json {
                    let j = ErrorJson {
                        file: &name,
                        kind: kind.name(),
                        flavour: (kind == TraceKind::Ppc).then(|| flavour.to_string()),
                        error: e,
                    };
                    serde_json::to_string(&j)
                        .map_err(std::io::Error::other)
                        .and_then(|s| writeln!(out, "{s}"))
                } else {
                    Ok(())
                }
            }
        };
        if written.and_then(|()| out.flush()).is_err() {
            // stdout closed (e.g. a pipe to `head`): nothing more to say.
            return ExitCode::from(worst.max(2));
        }
    }
    ExitCode::from(worst)
}
