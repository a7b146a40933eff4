//! `revmap run --mmu nested`: the nested simulator (`revmap_sim::nested`) with the
//! embedded default scenario, the embedded hostile-L1 scenario (`--scenario hostile`),
//! or a scenario file, and the flags of `revmap run`; a human summary or one JSON
//! object; `--plot DIR` writes the nested plots.
//!
//! Invariants: as `revmap run`'s (the run itself goes through `run::execute`: the
//! `--plot` directory is checked before the run; SIGINT stops the run and still
//! reports, exit 130; exit 1 on invariant violations, 2 on a bad flag, scenario or
//! output directory). With `--deterministic`, a failing run is shrunk and the smallest
//! failing scenario printed as TOML on stderr.

use crate::run::{execute, report_minimised, Report, RunArgs};
use revmap_sim::nested::{
    minimise_nested, run_nested, run_nested_deterministic_with, NestedRunReport, NestedScenario,
};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The scenario of `args`: a file, else an embedded name, else the default; the flags
/// override it.
fn load(args: &RunArgs) -> Result<NestedScenario, String> {
    let mut sc = match &args.scenario {
        Some(p) if p.exists() => NestedScenario::from_file(p).map_err(|e| e.to_string())?,
        Some(p) => p
            .to_str()
            .and_then(NestedScenario::embedded)
            .ok_or_else(|| {
                format!(
                    "no scenario file {} (embedded nested scenarios: nested, hostile)",
                    p.display()
                )
            })?,
        None => NestedScenario::default(),
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

impl Report for NestedRunReport {
    const COUNTED: &'static str = "L2 accesses";
    fn human(&self) -> String {
        NestedRunReport::human(self)
    }
    fn interrupted(&self) -> bool {
        self.interrupted
    }
    fn violations(&self) -> u64 {
        self.invariant_violations
    }
    fn write_plots(&self, dir: &Path) -> Result<(Vec<PathBuf>, bool), Box<dyn std::error::Error>> {
        crate::plot::write_nested_plots(self, dir)
    }
}

/// Runs `revmap run --mmu nested`.
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
        format!("until {} L2 accesses", sc.stop_after_accesses)
    } else {
        format!("{} s", sc.duration_secs)
    };
    execute(
        args,
        sc.deterministic.steps,
        format!("nested scenario {:?} ({what})", sc.name),
        |progress| {
            if args.deterministic {
                run_nested_deterministic_with(&sc, progress)
            } else {
                run_nested(&sc, progress)
            }
        },
        |r: &NestedRunReport| {
            if r.failing_step.is_some() {
                report_minimised(
                    minimise_nested(&sc)
                        .map(|m| m.map(|(small, rep)| (small, rep.first_violation))),
                );
            }
        },
    )
}
