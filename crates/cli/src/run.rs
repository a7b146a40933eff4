//! `revmap run`: the simulator (`revmap_sim::run`) with the embedded default scenario,
//! a scenario file, or flags overriding it; a progress bar on a terminal (progress
//! lines otherwise); a human summary or one JSON object.
//!
//! With `--deterministic`, a run that finds a violation is shrunk
//! (`revmap_sim::det::minimise`) and the smallest failing scenario printed as TOML.
//!
//! Invariants:
//! * Everything that can make the run's results unusable is checked before the run
//!   starts: the scenario and flags, the `--plot` directory (created and written to),
//!   and the host memory the VM's tables need. Each failure is one message and exit 2.
//! * SIGINT (Ctrl-C) stops the run early, not the process: the actors stop, the checker
//!   runs, the partial report is printed (JSON `"interrupted": true`) and plots are
//!   written; the exit code is then 130. A second SIGINT exits at once with 130.
//! * A run that found invariant violations exits 1; otherwise 0. The report goes to
//!   stdout, progress and messages to stderr.

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use revmap_rmap::sync::{thread, Arc, AtomicBool, Ordering};
use revmap_sim::run::{run as run_scenario, Progress, RunReport};
use revmap_sim::scenario::Scenario;
use serde::Serialize;
use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit code of a run stopped by SIGINT (128 + the signal number, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

const RUN_AFTER_HELP: &str = "\
Defaults (the embedded scenario, scenarios/default.toml): 30 s, seed 1, a 4 GiB guest
with 2 vCPUs, memory pressure, aging and migration on the host, an HPT resize that
grows then shrinks the table. --deterministic: 4000 steps on a 64 MiB guest.

With --mmu x86: the x86 shadow MMU (scenarios/x86.toml): a 1.5 GiB Linux-like guest
with 2 vCPUs (direct map on 1 GiB and 2 MiB pages, processes with 4-level tables, fork
with copy-on-write, exec, exit, munmap, INVLPG, CR3 switches), the same host actors;
--accesses N bounds it by guest accesses. --deterministic: 4000 steps on 1088 MiB.

Examples:
  revmap run                                  the default scenario, human report
  revmap run --mmu x86 --accesses 2000000     the x86 shadow MMU, 2 million accesses
  revmap run --duration 10 --json > r.json    10 s, the report as one JSON object
  revmap run --hcalls 2000000 --seed 7        stop after 2 million hypercalls
  revmap run --plot plots/                    also write PNG and SVG plots
  revmap run --scenario my.toml               your scenario (copy scenarios/default.toml)
  revmap run --deterministic --steps 20000 --seed 7
                                              one thread, seeded, checker every step

Ctrl-C stops the run early and still prints the report (JSON: \"interrupted\": true).

Exit status: 0 no invariant violation; 1 invariant violations found; 2 bad flag,
scenario or output directory, or not enough host memory; 130 interrupted (Ctrl-C).";

/// Arguments of `revmap run`.
#[derive(Debug, Args)]
#[command(after_long_help = RUN_AFTER_HELP)]
pub struct RunArgs {
    /// The guest MMU to simulate: the PowerPC hashed page table, the x86 shadow MMU or
    /// the nested-guest MMU.
    #[arg(long, value_enum, default_value_t = Mmu::Hpt)]
    pub(crate) mmu: Mmu,
    /// Scenario file (TOML); default: the embedded default scenario
    /// (scenarios/default.toml; with --mmu x86, scenarios/x86.toml).
    #[arg(long, value_name = "FILE")]
    pub(crate) scenario: Option<PathBuf>,
    /// Run length in seconds [default: the scenario's, 30]. Not with --deterministic
    /// (use --steps) or --hcalls.
    #[arg(
        long,
        value_name = "SECONDS",
        allow_negative_numbers = true,
        value_parser = positive_seconds,
        conflicts_with_all = ["deterministic", "hcalls", "accesses"]
    )]
    pub(crate) duration: Option<f64>,
    /// Stop after this many hypercalls instead of after a duration; resizes happen at
    /// their fraction of this count. Not with --deterministic.
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u64).range(1..),
        conflicts_with = "deterministic"
    )]
    pub(crate) hcalls: Option<u64>,
    /// --mmu x86: stop after this many guest accesses instead of after a duration. Not
    /// with --deterministic.
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u64).range(1..),
        conflicts_with_all = ["deterministic", "hcalls"]
    )]
    pub(crate) accesses: Option<u64>,
    /// Seed of every random stream [default: the scenario's, 1].
    #[arg(long, value_name = "S", allow_negative_numbers = true)]
    pub(crate) seed: Option<u64>,
    /// Print the report as one JSON object instead of the human summary.
    #[arg(long)]
    pub(crate) json: bool,
    /// Run every actor on one thread under a seeded scheduler, checking invariants
    /// after every step; the same seed gives the same event digest.
    #[arg(long)]
    pub(crate) deterministic: bool,
    /// Write PNG and SVG plots (latency per hypercall type, ring lengths, dirty pages
    /// per round, throughput with resizes; --mmu x86: shadow faults and write-protected
    /// frames over time) into DIR (created; checked before the run).
    #[arg(long, value_name = "DIR")]
    pub(crate) plot: Option<PathBuf>,
    /// Scheduler steps in deterministic mode [default: the scenario's, 4000].
    #[arg(
        long,
        value_name = "N",
        requires = "deterministic",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub(crate) steps: Option<u64>,
}

/// `--mmu`: which guest MMU `revmap run` simulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mmu {
    /// The PowerPC Book3S HV hashed page table (the default).
    Hpt,
    /// The x86 shadow MMU on `pte_list` rmaps.
    X86,
    /// The PowerPC nested-guest (radix) MMU.
    Nested,
}

/// `--duration`: a positive, finite number of seconds.
fn positive_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be a positive number of seconds, got {s}"))
    }
}

fn load(args: &RunArgs) -> Result<Scenario, String> {
    let mut sc = match &args.scenario {
        Some(p) => Scenario::from_file(p).map_err(|e| e.to_string())?,
        None => Scenario::default(),
    };
    if let Some(d) = args.duration {
        // A duration on the command line wins over a scenario's hypercall count.
        sc.duration_secs = d;
        sc.stop_after_hcalls = 0;
    }
    if let Some(n) = args.hcalls {
        sc.stop_after_hcalls = n;
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

/// Memory the host has available (`MemAvailable` of `/proc/meminfo`), if known.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Refuses a threaded run whose VM tables would not fit in the host's memory (before
/// allocating them).
fn check_memory(sc: &Scenario) -> Result<(), String> {
    let need = sc.estimated_host_bytes();
    match available_memory() {
        Some(avail) if need > avail => Err(format!(
            "guest.ram_mib = {}: the simulated VM's tables (HPT up to order {}, rmaps, \
             bitmaps) need about {:.1} GiB of host memory, and {:.1} GiB is available; \
             use a smaller guest",
            sc.guest.ram_mib,
            sc.max_hpt_order(),
            need as f64 / (1u64 << 30) as f64,
            avail as f64 / (1u64 << 30) as f64
        )),
        _ => Ok(()),
    }
}

fn print(report: &RunReport, json: bool, plot: Option<&PathBuf>) -> ExitCode {
    emit(
        report,
        || report.human(),
        json,
        plot.map(|d| (d.as_path(), |d: &Path| crate::plot::write_plots(report, d))),
        report.interrupted,
        report.invariant_violations,
    )
}

/// The plot writer of a report kind: files written, and whether PNGs were skipped for
/// want of a font.
pub(crate) type PlotResult = Result<(Vec<PathBuf>, bool), Box<dyn std::error::Error>>;

/// Prints a run report (JSON or `human`), writes its plots into the directory given,
/// and returns the exit status of the module docs.
pub(crate) fn emit<R: Serialize>(
    report: &R,
    human: impl FnOnce() -> String,
    json: bool,
    plot: Option<(&Path, impl FnOnce(&Path) -> PlotResult)>,
    interrupted: bool,
    violations: u64,
) -> ExitCode {
    if json {
        match serde_json::to_string(report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("revmap run: error: cannot serialise the report: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", human());
    }
    if let Some((dir, write_plots)) = plot {
        match write_plots(dir) {
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
    if interrupted {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// A deterministic run failed: shrink it and print the smallest failing scenario (as
/// TOML, to stderr) so it can be re-run with `--deterministic --scenario`.
fn report_minimised(sc: &Scenario) {
    print_minimised(revmap_sim::det::minimise(sc).map(|m| m.map(|(s, r)| (s, r.first_violation))));
}

/// Prints the outcome of a minimisation: the smallest failing scenario (as TOML, to
/// stderr) with its first violation.
pub(crate) fn print_minimised<S: Serialize, E: std::fmt::Display>(
    m: Result<Option<(S, Option<String>)>, E>,
) {
    match m {
        Ok(Some((small, first))) => {
            eprintln!(
                "revmap run: smallest failing scenario found ({}):",
                first.as_deref().unwrap_or("violation")
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

/// Installs the SIGINT handling of the module docs; returns the flag the first SIGINT
/// sets (unset forever if the handler cannot be installed: Ctrl-C then kills).
pub(crate) fn on_sigint() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    match signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT]) {
        Ok(mut signals) => {
            let f = Arc::clone(&flag);
            thread::spawn(move || {
                for _ in signals.forever() {
                    // ORDERING: Relaxed: a lone flag; the run only needs to see it
                    // eventually and publishes nothing through it.
                    if f.swap(true, Ordering::Relaxed) {
                        eprintln!("revmap run: interrupted twice, exiting at once");
                        std::process::exit(i32::from(EXIT_INTERRUPTED));
                    }
                    eprintln!("revmap run: interrupted; stopping and checking (Ctrl-C again exits at once)");
                }
            });
        }
        Err(e) => eprintln!(
            "revmap run: cannot handle Ctrl-C ({e}); it will end the run without a report"
        ),
    }
    flag
}

/// The progress display: a bar on a terminal, else a line per 10% on stderr.
pub(crate) struct Display {
    bar: Option<ProgressBar>,
    next_line: u32,
}

impl Display {
    pub(crate) fn new(deterministic: bool, len: u64) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self {
                bar: None,
                next_line: 1,
            };
        }
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        let template = if deterministic {
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}"
        } else {
            "{spinner} [{elapsed_precise}] {bar:30} {percent:>3}%  {msg}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        Self {
            bar: Some(bar),
            next_line: 1,
        }
    }

    fn update(&mut self, p: &Progress, len: u64) {
        let msg = format!(
            "{} hcalls, {} host ops, HPT order {}, violations {}",
            p.hcalls, p.host_ops, p.hpt_order, p.violations
        );
        self.show(p, len, msg);
    }

    /// Shows progress `p` with the status message `msg`.
    pub(crate) fn show(&mut self, p: &Progress, len: u64, msg: String) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(((p.fraction * len as f64) as u64).min(len));
                bar.set_message(msg);
            }
            None => {
                let pct = (p.fraction * 100.0) as u32;
                if pct >= self.next_line * 10 {
                    self.next_line = pct / 10 + 1;
                    eprintln!("revmap run: {}% ({:.1} s): {msg}", pct.min(100), p.elapsed);
                }
            }
        }
    }

    /// Whether progress goes to a bar (a terminal) rather than lines.
    pub(crate) fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Runs `revmap run`: the MMU `--mmu` names.
pub fn run(args: &RunArgs) -> ExitCode {
    match args.mmu {
        Mmu::Hpt => run_hpt(args),
        Mmu::X86 => crate::run_x86::run(args),
        Mmu::Nested => {
            eprintln!("revmap run: error: --mmu nested is not built yet");
            ExitCode::from(2)
        }
    }
}

/// `revmap run --mmu hpt`.
fn run_hpt(args: &RunArgs) -> ExitCode {
    if args.accesses.is_some() {
        eprintln!("revmap run: error: --accesses applies to --mmu x86 (use --hcalls)");
        return ExitCode::from(2);
    }
    let sc = match load(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("revmap run: error: {e}");
            return ExitCode::from(2);
        }
    };
    if !args.deterministic {
        if let Err(e) = check_memory(&sc) {
            eprintln!("revmap run: error: {e}");
            return ExitCode::from(2);
        }
    }
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
    // ORDERING: Relaxed: see `on_sigint`.
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
            "revmap run: running scenario {:?} ({}); Ctrl-C stops it and still reports",
            sc.name,
            if args.deterministic {
                format!("deterministic, {} steps", sc.deterministic.steps)
            } else if sc.stop_after_hcalls > 0 {
                format!("until {} hypercalls", sc.stop_after_hcalls)
            } else {
                format!("{} s", sc.duration_secs)
            }
        );
    }
    let report = if args.deterministic {
        revmap_sim::det::run_deterministic_with(&sc, |p| {
            display.update(p, len);
            flow(p)
        })
    } else {
        run_scenario(&sc, |p| {
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
            print(&r, args.json, args.plot.as_ref())
        }
        Err(e) => {
            eprintln!("revmap run: error: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_must_be_positive_and_finite() {
        assert_eq!(positive_seconds("2.5"), Ok(2.5));
        for bad in ["0", "-1", "inf", "NaN", "abc", ""] {
            assert!(positive_seconds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_guest_too_big_for_the_host_is_refused_before_allocating() {
        // QEMU's HPT order for 1 TiB (33: an 8 GiB HPT, as much again for the revmap).
        let mut sc = Scenario::default();
        sc.guest.ram_mib = 1 << 20;
        sc.guest.hpt_order = 0;
        let avail = available_memory().expect("/proc/meminfo on Linux");
        assert!(sc.estimated_host_bytes() > avail, "a 1 TiB guest's tables");
        let e = check_memory(&sc).unwrap_err();
        assert!(e.contains("guest.ram_mib"), "{e}");
        sc.guest.ram_mib = 256;
        check_memory(&sc).unwrap();
    }
}
