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
  revmap run --mmu nested                     L1 vCPUs running L2 guests (nested MMU)
  revmap run --mmu nested --scenario hostile  a hostile L1 against the nested rmap bound

Ctrl-C stops the run early and still prints the report (JSON: \"interrupted\": true).

Exit status: 0 no invariant violation; 1 invariant violations found; 2 bad flag,
scenario or output directory, or not enough host memory; 130 interrupted (Ctrl-C).";

/// Which guest MMU `revmap run` simulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mmu {
    /// The PowerPC Book3S HV hashed page table (the default).
    Hpt,
    /// The x86 shadow MMU on `pte_list` rmaps.
    X86,
    /// The PowerPC nested-guest (radix) MMU: L1 hypervisor vCPUs running L2 guests.
    Nested,
}

/// Arguments of `revmap run`.
#[derive(Debug, Args)]
#[command(after_long_help = RUN_AFTER_HELP)]
pub struct RunArgs {
    /// The guest MMU to simulate: the PowerPC hashed page table, the x86 shadow MMU or
    /// the nested-guest MMU.
    #[arg(long, value_enum, default_value_t = Mmu::Hpt)]
    pub(crate) mmu: Mmu,
    /// Scenario file (TOML); default: the embedded default scenario
    /// (scenarios/default.toml; with --mmu x86, scenarios/x86.toml; with --mmu nested,
    /// scenarios/nested.toml, and the embedded name `hostile` selects
    /// scenarios/nested-hostile.toml).
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
    /// Stop after this many hypercalls (--mmu nested: L2 accesses) instead of after a
    /// duration; resizes happen at their fraction of this count. Not with
    /// --deterministic, nor with --mmu x86 (use --accesses).
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u64).range(1..),
        conflicts_with = "deterministic"
    )]
    pub(crate) hcalls: Option<u64>,
    /// --mmu x86 or nested: stop after this many guest (L2) accesses instead of after a
    /// duration. Not with --deterministic.
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

impl RunArgs {
    /// Applies `--duration`, the stop count, `--seed` and `--steps` to a scenario's
    /// fields. The stop count (`stop_after`) is `--hcalls` for the HPT MMU
    /// (hypercalls), `--accesses` for the x86 MMU (guest accesses), and either for the
    /// nested MMU (L2 accesses); the flag that does not apply is refused.
    pub(crate) fn override_scenario(
        &self,
        duration_secs: &mut f64,
        stop_after: &mut u64,
        seed: &mut u64,
        steps: &mut u64,
    ) -> Result<(), String> {
        let count =
            match self.mmu {
                Mmu::Hpt if self.accesses.is_some() => {
                    return Err("--accesses applies to --mmu x86 and nested (use --hcalls)".into())
                }
                Mmu::X86 if self.hcalls.is_some() => return Err(
                    "--hcalls applies to --mmu hpt and nested; an x86 run is bounded by --accesses"
                        .into(),
                ),
                Mmu::Hpt | Mmu::X86 | Mmu::Nested => self.hcalls.or(self.accesses),
            };
        if let Some(d) = self.duration {
            // A duration on the command line wins over a scenario's stop count.
            *duration_secs = d;
            *stop_after = 0;
        }
        if let Some(n) = count {
            *stop_after = n;
        }
        if let Some(s) = self.seed {
            *seed = s;
        }
        if let Some(n) = self.steps {
            *steps = n;
        }
        Ok(())
    }
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

/// What `revmap run` prints and plots, whatever the MMU simulated.
pub(crate) trait Report: Serialize {
    /// What the progress count (`Progress::hcalls`) and a scenario's stop count count.
    const COUNTED: &'static str;
    /// The human summary.
    fn human(&self) -> String;
    /// Stopped early by SIGINT.
    fn interrupted(&self) -> bool;
    /// Invariant violations found.
    fn violations(&self) -> u64;
    /// The step after which a deterministic run found its first violation.
    fn failing_step(&self) -> Option<u64>;
    /// Writes the plots into `dir`: the files, and whether PNGs were skipped (no font).
    fn write_plots(&self, dir: &Path) -> Result<(Vec<PathBuf>, bool), Box<dyn std::error::Error>>;
}

/// A scenario `revmap run` simulates (one per MMU): how it is read, the fields the
/// flags override, its threaded and deterministic runs and its minimiser.
pub(crate) trait RunScenario: Sized + Serialize {
    /// The report of a run.
    type Report: Report;
    /// Why a run could not complete.
    type Error: std::fmt::Display;
    /// The kind of scenario, as the run is announced (`x86 scenario`).
    const KIND: &'static str;
    /// The scenario without `--scenario`.
    fn embedded_default() -> Self;
    /// The scenario of `--scenario PATH`.
    fn open(path: &Path) -> Result<Self, String>;
    /// The scenario's name.
    fn name(&self) -> &str;
    /// The fields the flags override: the duration, the stop count, the seed and the
    /// deterministic step count.
    fn knobs(&mut self) -> (&mut f64, &mut u64, &mut u64, &mut u64);
    /// Checks every value.
    fn check(&self) -> Result<(), String>;
    /// Checks made before a threaded run only (the host's memory); none by default.
    fn check_host(&self) -> Result<(), String> {
        Ok(())
    }
    /// The threaded run.
    fn run_threaded(
        &self,
        progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<Self::Report, Self::Error>;
    /// The deterministic run.
    fn run_deterministic(
        &self,
        progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<Self::Report, Self::Error>;
    /// Shrinks a failing deterministic run: the smallest failing scenario found, with
    /// its first violation.
    fn minimise(&self) -> Result<Option<(Self, Option<String>)>, String>;
}

/// Implements [`RunScenario`] for a scenario type and [`Report`] for its report type:
/// the scenario has `name`, `duration_secs`, the stop count field `stop_after`, `seed`
/// and `deterministic.steps` and a `validate` method; the report has `human`,
/// `interrupted` and a `verdict` (`revmap_sim::report::Verdict`).
macro_rules! mmu_run {
    (
        $sc:ty, $rep:ty, $err:ty,
        kind: $kind:literal,
        counted: $counted:literal,
        stop_after: $stop:ident,
        open: $open:expr,
        threaded: $threaded:path,
        deterministic: $det:path,
        minimise: $min:path,
        plots: $plots:path
        $(, check_host: $host:path)?
    ) => {
        impl $crate::run::RunScenario for $sc {
            type Report = $rep;
            type Error = $err;
            const KIND: &'static str = $kind;
            fn embedded_default() -> Self {
                <$sc>::default()
            }
            fn open(path: &std::path::Path) -> Result<Self, String> {
                ($open)(path)
            }
            fn name(&self) -> &str {
                &self.name
            }
            fn knobs(&mut self) -> (&mut f64, &mut u64, &mut u64, &mut u64) {
                (
                    &mut self.duration_secs,
                    &mut self.$stop,
                    &mut self.seed,
                    &mut self.deterministic.steps,
                )
            }
            fn check(&self) -> Result<(), String> {
                self.validate().map_err(|e| e.to_string())
            }
            $(
                fn check_host(&self) -> Result<(), String> {
                    $host(self)
                }
            )?
            fn run_threaded(
                &self,
                progress: &mut dyn FnMut(
                    &revmap_sim::run::Progress,
                ) -> std::ops::ControlFlow<()>,
            ) -> Result<$rep, $err> {
                $threaded(self, progress)
            }
            fn run_deterministic(
                &self,
                progress: &mut dyn FnMut(
                    &revmap_sim::run::Progress,
                ) -> std::ops::ControlFlow<()>,
            ) -> Result<$rep, $err> {
                $det(self, progress)
            }
            fn minimise(&self) -> Result<Option<(Self, Option<String>)>, String> {
                $min(self)
                    .map(|m| m.map(|(small, rep)| (small, rep.verdict.first_violation)))
                    .map_err(|e| e.to_string())
            }
        }

        impl $crate::run::Report for $rep {
            const COUNTED: &'static str = $counted;
            fn human(&self) -> String {
                <$rep>::human(self)
            }
            fn interrupted(&self) -> bool {
                self.interrupted
            }
            fn violations(&self) -> u64 {
                self.verdict.invariant_violations
            }
            fn failing_step(&self) -> Option<u64> {
                self.verdict.failing_step
            }
            fn write_plots(
                &self,
                dir: &std::path::Path,
            ) -> Result<(Vec<std::path::PathBuf>, bool), Box<dyn std::error::Error>> {
                $plots(self, dir)
            }
        }
    };
}
pub(crate) use mmu_run;

mmu_run!(
    Scenario,
    RunReport,
    revmap_sim::run::RunError,
    kind: "scenario",
    counted: "hcalls",
    stop_after: stop_after_hcalls,
    open: |p: &Path| Scenario::from_file(p).map_err(|e| e.to_string()),
    threaded: run_scenario,
    deterministic: revmap_sim::det::run_deterministic_with,
    minimise: revmap_sim::det::minimise,
    plots: crate::plot::write_plots,
    check_host: check_memory
);

fn print(report: &impl Report, json: bool, plot: Option<&PathBuf>) -> ExitCode {
    if json {
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
    if let Some(dir) = plot {
        match report.write_plots(dir) {
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
    if report.interrupted() {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if report.violations() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// A deterministic run failed and was shrunk: print the smallest failing scenario
/// (TOML, to stderr, with its first violation) so it can be re-run with
/// `--deterministic --scenario`.
pub(crate) fn report_minimised<S: Serialize, E: std::fmt::Display>(
    shrunk: Result<Option<(S, Option<String>)>, E>,
) {
    match shrunk {
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

    /// Shows `p`, whose count (`hcalls`) is of `counted`; a run without an HPT (order 0)
    /// shows no HPT order.
    fn update(&mut self, p: &Progress, len: u64, counted: &str) {
        let msg = if p.hpt_order == 0 {
            format!(
                "{} {counted}, {} host ops, violations {}",
                p.hcalls, p.host_ops, p.violations
            )
        } else {
            format!(
                "{} {counted}, {} host ops, HPT order {}, violations {}",
                p.hcalls, p.host_ops, p.hpt_order, p.violations
            )
        };
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

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Runs `revmap run`: the MMU `--mmu` names.
pub fn run(args: &RunArgs) -> ExitCode {
    match args.mmu {
        Mmu::Hpt => run_mmu::<Scenario>(args),
        Mmu::X86 => run_mmu::<revmap_sim::x86::X86Scenario>(args),
        Mmu::Nested => run_mmu::<revmap_sim::nested::NestedScenario>(args),
    }
}

/// The scenario of `args` (`--scenario`, else the embedded default), the flags applied,
/// checked (and, for a threaded run, the host checked).
fn load<S: RunScenario>(args: &RunArgs) -> Result<S, String> {
    let mut sc = match &args.scenario {
        Some(p) => S::open(p)?,
        None => S::embedded_default(),
    };
    let (duration, stop_after, seed, steps) = sc.knobs();
    args.override_scenario(duration, stop_after, seed, steps)?;
    sc.check()?;
    if !args.deterministic {
        sc.check_host()?;
    }
    Ok(sc)
}

/// The run of any MMU: loads its scenario, checks the `--plot` directory, installs the
/// SIGINT handling, announces the run and shows its progress, runs it (threaded or
/// deterministic), shrinks a failing deterministic run, and prints the report.
fn run_mmu<S: RunScenario>(args: &RunArgs) -> ExitCode {
    let mut sc = match load::<S>(args) {
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
    let (&mut duration, &mut stop_after, _, &mut steps) = sc.knobs();
    let stop = on_sigint();
    let len = if args.deterministic { steps } else { 1000 };
    let mut display = Display::new(args.deterministic, len);
    if display.bar.is_none() {
        let what = if args.deterministic {
            format!("deterministic, {steps} steps")
        } else if stop_after > 0 {
            format!("until {stop_after} {}", S::Report::COUNTED)
        } else {
            format!("{duration} s")
        };
        eprintln!(
            "revmap run: running {} {:?} ({what}); Ctrl-C stops it and still reports",
            S::KIND,
            sc.name()
        );
    }
    let mut progress = |p: &Progress| {
        display.update(p, len, S::Report::COUNTED);
        // ORDERING: Relaxed: see `on_sigint`.
        if stop.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let report = if args.deterministic {
        sc.run_deterministic(&mut progress)
    } else {
        sc.run_threaded(&mut progress)
    };
    display.finish();
    match report {
        Ok(r) => {
            if args.deterministic && r.failing_step().is_some() {
                report_minimised(sc.minimise());
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
