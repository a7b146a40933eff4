//! `revmap run --mmu x86`: the simulator on the x86 shadow MMU (`revmap_sim::x86`) with
//! the embedded default x86 scenario (`scenarios/x86.toml`) or a scenario file, flags
//! overriding it; progress, report (human or `--json`), plots and exit status as for
//! the HPT run (the run itself goes through `run::execute`). With `--deterministic`, a
//! failing run is shrunk (`revmap_sim::x86::det::minimise`) and the smallest failing
//! scenario printed.
//!
//! Invariants: the scenario, the flags and the `--plot` directory are checked before the
//! run (exit 2 with one message); `--hcalls` is refused (an x86 guest makes no
//! hypercalls: `--accesses` bounds the run).

use crate::run::{execute, report_minimised, Report, RunArgs};
use revmap_sim::x86::det::{minimise, run_x86_deterministic_with};
use revmap_sim::x86::run::run_x86;
use revmap_sim::x86::{X86Report, X86Scenario};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn load(args: &RunArgs) -> Result<X86Scenario, String> {
    let mut sc = match &args.scenario {
        Some(p) => X86Scenario::from_file(p).map_err(|e| e.to_string())?,
        None => X86Scenario::default(),
    };
    args.override_scenario(
        &mut sc.duration_secs,
        &mut sc.stop_after_accesses,
        &mut sc.seed,
        &mut sc.deterministic.steps,
    )?;
    sc.validate().map_err(|e| e.to_string())?;
    Ok(sc)
}

impl Report for X86Report {
    const COUNTED: &'static str = "guest accesses";
    fn human(&self) -> String {
        X86Report::human(self)
    }
    fn interrupted(&self) -> bool {
        self.interrupted
    }
    fn violations(&self) -> u64 {
        self.invariant_violations
    }
    fn write_plots(&self, dir: &Path) -> Result<(Vec<PathBuf>, bool), Box<dyn std::error::Error>> {
        crate::plot::write_x86_plots(self, dir)
    }
}

/// Runs `revmap run --mmu x86`.
pub fn run(args: &RunArgs) -> ExitCode {
    let sc = match load(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("revmap run: error: {e}");
            return ExitCode::from(2);
        }
    };
    let what = if args.deterministic {
        format!("deterministic, {} steps", sc.deterministic.steps)
    } else if sc.stop_after_accesses > 0 {
        format!("until {} guest accesses", sc.stop_after_accesses)
    } else {
        format!("{} s", sc.duration_secs)
    };
    execute(
        args,
        sc.deterministic.steps,
        format!("x86 scenario {:?} ({what})", sc.name),
        |progress| {
            if args.deterministic {
                run_x86_deterministic_with(&sc, progress)
            } else {
                run_x86(&sc, progress)
            }
        },
        |r: &X86Report| {
            if r.failing_step.is_some() {
                report_minimised(
                    minimise(&sc).map(|m| m.map(|(small, rep)| (small, rep.first_violation))),
                );
            }
        },
    )
}
