//! `revmap replay`: replays trace files and reports, per file, as text or JSON lines.
//!
//! Invariants: one report (or one error) per file, in argument order; every file is
//! attempted even after a failure; the exit code is the worst outcome (0 all passed —
//! a file stopped at a resize record counts as passed; 1 some file mismatched, had
//! violations or hit an unsupported record; 2 some file could not be read or parsed).

use crate::backend::{make_vm, FlavourArg};
use clap::Args;
use revmap_sim::replay::{
    replay_file, FileReport, PreparsedTrace, ReplayError, ReplayOptions, StopReason,
};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `revmap replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Hypervisor flavour to replay on.
    #[arg(long, value_enum, default_value_t = FlavourArg::Kvm)]
    flavour: FlavourArg,
    /// Print one JSON object per file (one per line) instead of the human summary.
    #[arg(long)]
    json: bool,
    /// Run the VM's invariant checker after every N calls and at the end.
    #[arg(long, value_name = "N")]
    check_every: Option<NonZeroU64>,
    /// Parse each whole file first, then time only the replay loop.
    #[arg(long)]
    preparse: bool,
    /// Trace files (gzip or plain text).
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
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
    seconds: f64,
    calls_per_second: f64,
    passed: bool,
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    file: &'a str,
    flavour: String,
    error: String,
}

fn to_json(r: &FileReport, flavour: FlavourArg) -> ReportJson<'_> {
    ReportJson {
        file: &r.file,
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
        seconds: r.seconds,
        calls_per_second: r.calls_per_second(),
        passed: r.passed(),
    }
}

fn human(out: &mut impl Write, r: &FileReport, flavour: FlavourArg) -> std::io::Result<()> {
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

fn replay_one(args: &ReplayArgs, path: &PathBuf) -> Result<FileReport, ReplayError> {
    let opts = ReplayOptions {
        check_every: args.check_every,
    };
    let flavour = args.flavour;
    if args.preparse {
        PreparsedTrace::open(path)?.replay_with(&opts, |spec| make_vm(flavour, spec))
    } else {
        replay_file(path, &opts, |spec| make_vm(flavour, spec))
    }
}

/// Runs `revmap replay`; returns the process exit code.
pub fn run(args: &ReplayArgs) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut worst = 0u8;
    for path in &args.files {
        let name = path.display().to_string();
        let written = match replay_one(args, path) {
            Ok(rep) => {
                if !rep.passed() {
                    worst = worst.max(1);
                }
                if args.json {
                    serde_json::to_string(&to_json(&rep, args.flavour))
                        .map_err(std::io::Error::other)
                        .and_then(|s| writeln!(out, "{s}"))
                } else {
                    human(&mut out, &rep, args.flavour)
                }
            }
            Err(e) => {
                worst = 2;
                eprintln!("revmap replay: error: {e}");
                if args.json {
                    let j = ErrorJson {
                        file: &name,
                        flavour: args.flavour.to_string(),
                        error: e.to_string(),
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
