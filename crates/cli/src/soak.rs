//! `revmap soak`: the deterministic simulator of each MMU over many seeds on all cores,
//! with the invariant checker after every step (`revmap_sim::soak`).
//!
//! Exit status: 0 if every seed ran clean, 1 if a seed failed (each failing seed is
//! minimised and its reproducer printed), 2 on bad arguments.

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use revmap_sim::nested::{NestedScenario, NestedSoak};
use revmap_sim::scenario::{Scenario, DEFAULT_SCENARIO_TOML};
use revmap_sim::soak::{soak, HptSoak, SoakOptions, SoakReport, SoakTarget};
use revmap_sim::x86::det::X86Soak;
use revmap_sim::x86::X86Scenario;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// The MMUs `revmap soak` can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SoakMmu {
    /// The PowerPC HPT MMU with resizing (`revmap run --deterministic`).
    Hpt,
    /// The x86 shadow MMU (`revmap run --mmu x86 --deterministic`).
    X86,
    /// The PowerPC nested-guest MMU (`revmap run --mmu nested --deterministic`).
    Nested,
    /// Every MMU above, in turn.
    All,
}

/// `revmap soak` arguments.
#[derive(Debug, Args)]
#[command(after_help = "\
Each seed is one `revmap run --mmu MMU --deterministic` run of STEPS scheduler steps \
with the checker after every step; a failing seed is shrunk and printed as a scenario \
to re-run. --scenario applies to one MMU (its scenario file); the others use their \
embedded default scenarios.

Examples:
  revmap soak --seeds 64 --steps 10000
  revmap soak --mmu hpt,x86,nested --seeds 16 --steps 2000
  revmap soak --mmu all --seeds 1000 --steps 100000 --json")]
pub struct SoakArgs {
    /// MMUs to soak, each over the same seeds (repeat or comma-separate; `all`: hpt,
    /// x86 and nested).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "hpt")]
    mmu: Vec<SoakMmu>,
    /// Number of seeds per MMU.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Scheduler steps per seed.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// Worker threads [default: one per core].
    #[arg(long, default_value_t = 0)]
    jobs: usize,
    /// Scenario file (TOML) of the one MMU soaked [default: the MMU's embedded default
    /// scenario].
    #[arg(long, value_name = "FILE")]
    scenario: Option<PathBuf>,
    /// Print one JSON object per MMU instead of the human summary.
    #[arg(long)]
    json: bool,
}

fn target(mmu: SoakMmu, args: &SoakArgs) -> Result<Box<dyn SoakTarget>, String> {
    let file = args.scenario.as_deref();
    let e = |e: revmap_sim::scenario::ScenarioError| e.to_string();
    Ok(match mmu {
        SoakMmu::Hpt => Box::new(HptSoak::new(match file {
            Some(p) => Scenario::from_file(p).map_err(e)?,
            None => Scenario::from_toml(DEFAULT_SCENARIO_TOML).map_err(e)?,
        })),
        SoakMmu::X86 => Box::new(X86Soak::new(match file {
            Some(p) => X86Scenario::from_file(p).map_err(e)?,
            None => X86Scenario::default(),
        })),
        SoakMmu::Nested => Box::new(NestedSoak::new(match file {
            Some(p) => NestedScenario::from_file(p).map_err(e)?,
            None => NestedScenario::default(),
        })),
        SoakMmu::All => return Err("`all` is expanded before the targets are built".into()),
    })
}

/// The MMUs of `--mmu`, `all` expanded, each once, in order.
fn mmus(args: &SoakArgs) -> Vec<SoakMmu> {
    let mut out = Vec::new();
    for &m in &args.mmu {
        let each = match m {
            SoakMmu::All => vec![SoakMmu::Hpt, SoakMmu::X86, SoakMmu::Nested],
            m => vec![m],
        };
        for m in each {
            if !out.contains(&m) {
                out.push(m);
            }
        }
    }
    out
}

fn bar(name: &str, seeds: u64) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(seeds), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{spinner}} [{{elapsed_precise}}] {name} {{bar:30}} {{pos}}/{{len}} seeds"
    )) {
        bar.set_style(style);
    }
    Some(bar)
}

fn human(r: &SoakReport) -> String {
    let mut o = format!(
        "revmap soak: {}: {} seeds ({}..{}), {} steps, {} checks, {} violations, {} errors, \
         {:.1} s on {} threads ({:.0} steps/s)\n",
        r.mmu,
        r.seeds,
        r.first_seed,
        r.first_seed + r.seeds - 1,
        r.steps,
        r.checks,
        r.failures.len(),
        r.errors.len(),
        r.elapsed_s,
        r.jobs,
        r.steps_per_s
    );
    for f in &r.failures {
        o.push_str(&format!(
            "  seed {} failed after step {}: {}\n  smallest failing case: {}\n",
            f.seed, f.failure.step, f.failure.violation, f.reproducer
        ));
    }
    for (seed, e) in &r.errors {
        o.push_str(&format!("  seed {seed}: error: {e}\n"));
    }
    o
}

/// Runs `revmap soak`.
pub fn run(args: &SoakArgs) -> ExitCode {
    let opts = SoakOptions {
        first_seed: args.first_seed,
        seeds: args.seeds,
        steps: args.steps,
        jobs: args.jobs,
    };
    if args.first_seed.checked_add(args.seeds).is_none() {
        eprintln!("revmap soak: error: --first-seed + --seeds overflows");
        return ExitCode::from(2);
    }
    let mmus = mmus(args);
    if args.scenario.is_some() && mmus.len() > 1 {
        eprintln!("revmap soak: error: --scenario applies to one MMU at a time");
        return ExitCode::from(2);
    }
    let mut passed = true;
    for mmu in mmus {
        let t = match target(mmu, args) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("revmap soak: error: {e}");
                return ExitCode::from(2);
            }
        };
        let pb = if args.json {
            None
        } else {
            bar(t.name(), args.seeds)
        };
        let r = soak(t.as_ref(), &opts, |n| {
            if let Some(b) = &pb {
                b.set_position(n);
            }
        });
        if let Some(b) = &pb {
            b.finish_and_clear();
        }
        passed &= r.passed();
        if args.json {
            match serde_json::to_string(&r) {
                Ok(j) => println!("{j}"),
                Err(e) => {
                    eprintln!("revmap soak: error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        } else {
            print!("{}", human(&r));
        }
    }
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
