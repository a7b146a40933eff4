//! `revmap run --mmu nested`: the nested simulator (`revmap_sim::nested`) with the
//! embedded default scenario, the embedded hostile-L1 scenario (`--scenario hostile`),
//! or a scenario file, and the flags of `revmap run`; a human summary or one JSON
//! object; `--plot DIR` writes the nested plots.
//!
//! Invariants: as `revmap run`'s (everything that can make the results unusable is
//! checked before the run; SIGINT stops the run and still reports, exit 130; exit 1 on
//! invariant violations, 2 on a bad flag, scenario or output directory). With
//! `--deterministic`, a failing run is shrunk and the smallest failing scenario printed
//! as TOML on stderr.

use crate::run::{on_sigint, Display, RunArgs, EXIT_INTERRUPTED};
use revmap_rmap::sync::Ordering;
use revmap_sim::nested::{
    minimise_nested, run_nested, run_nested_deterministic_with, NestedRunReport, NestedScenario,
};
use revmap_sim::run::Progress;
use std::ops::ControlFlow;
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
    if let Some(d) = args.duration {
        sc.duration_secs = d;
        sc.stop_after_accesses = 0;
    }
    if let Some(n) = args.hcalls {
        sc.stop_after_accesses = n;
    }
    if let Some(s) = args.seed {
        sc.seed = s;
    }
    if let Some(n) = args.steps {
        sc.deterministic.steps = n;
    }
    sc.validate().map_err(|e| e.to_string())?;
    Ok(sc)
}

fn print(report: &NestedRunReport, args: &RunArgs) -> ExitCode {
    if args.json {
        match serde_json::to_string(report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("revmap run: error: cannot serialise the report: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", report.human());
    }
    if let Some(dir) = &args.plot {
        match crate::plot::write_nested_plots(report, dir) {
            Ok((files, no_font)) => {
                if no_font {
                    eprintln!("revmap run: no TrueType font found; wrote SVG plots only");
                }
                eprintln!(
                    "revmap run: wrote {} plot files to {}",
                    files.len(),
                    dir.display()
                );
            }
            Err(e) => {
                eprintln!(
                    "revmap run: error: cannot write plots to {}: {e}",
                    dir.display()
                );
                return ExitCode::from(2);
            }
        }
    }
    if report.interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if report.invariant_violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// A deterministic run failed: shrink it and print the smallest failing scenario.
fn report_minimised(sc: &NestedScenario) {
    match minimise_nested(sc) {
        Ok(Some((small, rep))) => {
            eprintln!(
                "revmap run: smallest failing scenario found ({}):",
                rep.first_violation.as_deref().unwrap_or("violation")
            );
            match toml::to_string(&small) {
                Ok(t) => eprintln!("{t}"),
                Err(e) => eprintln!("revmap run: error: cannot print it: {e}"),
            }
        }
        Ok(None) => eprintln!("revmap run: the failure did not reproduce when re-run"),
        Err(e) => eprintln!("revmap run: error: cannot minimise: {e}"),
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
    if let Some(dir) = &args.plot {
        if let Err(e) = crate::plot::check_dir(dir) {
            eprintln!(
                "revmap run: error: cannot write plots to {}: {e}",
                dir.display()
            );
            return ExitCode::from(2);
        }
    }
    let stop = on_sigint();
    // ORDERING: Relaxed: a lone flag (see `on_sigint`).
    let flow = |_: &Progress| {
        if stop.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let len = if args.deterministic {
        sc.deterministic.steps
    } else {
        1000
    };
    let mut display = Display::new(args.deterministic, len);
    if display.bar.is_none() {
        eprintln!(
            "revmap run: running nested scenario {:?} ({}); Ctrl-C stops it and still reports",
            sc.name,
            if args.deterministic {
                format!("deterministic, {} steps", sc.deterministic.steps)
            } else if sc.stop_after_accesses > 0 {
                format!("until {} L2 accesses", sc.stop_after_accesses)
            } else {
                format!("{} s", sc.duration_secs)
            }
        );
    }
    let report = if args.deterministic {
        run_nested_deterministic_with(&sc, |p| {
            display.update(p, len);
            flow(p)
        })
    } else {
        run_nested(&sc, |p| {
            display.update(p, len);
            flow(p)
        })
    };
    display.finish();
    match report {
        Ok(r) => {
            if args.deterministic && r.failing_step.is_some() {
                report_minimised(&sc);
            }
            print(&r, args)
        }
        Err(e) => {
            eprintln!("revmap run: error: {e}");
            ExitCode::from(2)
        }
    }
}
