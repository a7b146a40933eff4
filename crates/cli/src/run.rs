//! `revmap run`: the simulator (`revmap_sim::run`) with the embedded default scenario,
//! a scenario file, or flags overriding it; a progress bar on a terminal; a human
//! summary or one JSON object.
//!
//! With `--deterministic`, a run that finds a violation is shrunk
//! (`revmap_sim::det::minimise`) and the smallest failing scenario printed as TOML.
//!
//! Invariants: a bad scenario file or flag value prints one clear message and exits 2;
//! a run that found invariant violations exits 1; otherwise 0. The progress bar is drawn
//! on stderr only when stderr is a terminal (indicatif hides it otherwise), so stdout
//! carries only the report.

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use revmap_sim::run::{run as run_scenario, Progress, RunReport};
use revmap_sim::scenario::Scenario;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `revmap run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Scenario file (TOML); default: the embedded default scenario
    /// (scenarios/default.toml).
    #[arg(long, value_name = "FILE")]
    scenario: Option<PathBuf>,
    /// Run length in seconds (overrides the scenario's).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Seed of every random stream (overrides the scenario's).
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Print the report as one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
    /// Run every actor on one thread under a seeded scheduler, checking invariants
    /// after every step; the same seed gives the same event digest.
    #[arg(long)]
    deterministic: bool,
    /// Write PNG and SVG plots (latency, ring lengths, dirty pages per round,
    /// throughput with resizes) into DIR.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Scheduler steps in deterministic mode (overrides the scenario's).
    #[arg(long, value_name = "N", requires = "deterministic")]
    steps: Option<u64>,
}

fn load(args: &RunArgs) -> Result<Scenario, String> {
    let mut sc = match &args.scenario {
        Some(p) => Scenario::from_file(p).map_err(|e| e.to_string())?,
        None => Scenario::default(),
    };
    if let Some(d) = args.duration {
        sc.duration_secs = d;
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

fn print(report: &RunReport, json: bool, plot: Option<&PathBuf>) -> ExitCode {
    if let Some(dir) = plot {
        match crate::plot::write_plots(report, dir) {
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
                eprintln!("revmap run: cannot write plots to {}: {e}", dir.display());
                return ExitCode::from(2);
            }
        }
    }
    if json {
        match serde_json::to_string(report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("revmap run: cannot serialise the report: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", report.human());
    }
    if report.invariant_violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// A deterministic run failed: shrink it and print the smallest failing scenario (as
/// TOML, to stderr) so it can be re-run with `--deterministic --scenario`.
fn report_minimised(sc: &Scenario) {
    match revmap_sim::det::minimise(sc) {
        Ok(Some((small, rep))) => {
            eprintln!(
                "revmap run: smallest failing scenario found ({}):",
                rep.first_violation.as_deref().unwrap_or("violation")
            );
            match toml::to_string(&small) {
                Ok(t) => eprintln!("{t}"),
                Err(e) => eprintln!("revmap run: cannot print it: {e}"),
            }
        }
        Ok(None) => eprintln!("revmap run: the failure did not reproduce when re-run"),
        Err(e) => eprintln!("revmap run: cannot minimise: {e}"),
    }
}

/// Runs `revmap run`.
pub fn run(args: &RunArgs) -> ExitCode {
    let sc = match load(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("revmap run: {e}");
            return ExitCode::from(2);
        }
    };
    if args.deterministic {
        return match revmap_sim::det::run_deterministic(&sc) {
            Ok(r) => {
                if r.failing_step.is_some() {
                    report_minimised(&sc);
                }
                print(&r, args.json, args.plot.as_ref())
            }
            Err(e) => {
                eprintln!("revmap run: {e}");
                ExitCode::from(2)
            }
        };
    }
    let bar = ProgressBar::with_draw_target(
        Some((sc.duration_secs * 10.0).ceil() as u64),
        ProgressDrawTarget::stderr(),
    );
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {percent:>3}%  {msg}")
    {
        bar.set_style(style);
    }
    let report = run_scenario(&sc, |p: &Progress| {
        bar.set_position((p.elapsed * 10.0) as u64);
        bar.set_message(format!(
            "{} hcalls, {} host ops, HPT order {}, violations {}",
            p.hcalls, p.host_ops, p.hpt_order, p.violations
        ));
    });
    bar.finish_and_clear();
    match report {
        Ok(r) => print(&r, args.json, args.plot.as_ref()),
        Err(e) => {
            eprintln!("revmap run: {e}");
            ExitCode::from(2)
        }
    }
}
