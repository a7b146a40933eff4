//! `revmap run --mmu x86`: the simulator on the x86 shadow MMU (`revmap_sim::x86`) with
//! the embedded default x86 scenario (`scenarios/x86.toml`) or a scenario file, flags
//! overriding it; progress, report (human or `--json`), plots and exit status as for
//! the HPT run (`crate::run`). With `--deterministic`, a failing run is shrunk
//! (`revmap_sim::x86::det::minimise`) and the smallest failing scenario printed.
//!
//! Invariants: the scenario, the flags and the `--plot` directory are checked before the
//! run (exit 2 with one message); `--hcalls` is refused (an x86 guest makes no
//! hypercalls: `--accesses` bounds the run).

use crate::run::{emit, on_sigint, print_minimised, Display, RunArgs};
use revmap_rmap::sync::Ordering;
use revmap_sim::run::Progress;
use revmap_sim::x86::det::{minimise, run_x86_deterministic_with};
use revmap_sim::x86::run::run_x86;
use revmap_sim::x86::X86Scenario;
use std::ops::ControlFlow;
use std::path::Path;
use std::process::ExitCode;

fn load(args: &RunArgs) -> Result<X86Scenario, String> {
    if args.hcalls.is_some() {
        return Err("--hcalls applies to --mmu hpt; an x86 run is bounded by --accesses".into());
    }
    let mut sc = match &args.scenario {
        Some(p) => X86Scenario::from_file(p).map_err(|e| e.to_string())?,
        None => X86Scenario::default(),
    };
    if let Some(d) = args.duration {
        sc.duration_secs = d;
        sc.stop_after_accesses = 0;
    }
    if let Some(n) = args.accesses {
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

/// Runs `revmap run --mmu x86`.
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
    let len = if args.deterministic {
        sc.deterministic.steps
    } else {
        1000
    };
    let mut display = Display::new(args.deterministic, len);
    if !display.is_bar() {
        eprintln!(
            "revmap run: running x86 scenario {:?} ({}); Ctrl-C stops it and still reports",
            sc.name,
            if args.deterministic {
                format!("deterministic, {} steps", sc.deterministic.steps)
            } else if sc.stop_after_accesses > 0 {
                format!("until {} guest accesses", sc.stop_after_accesses)
            } else {
                format!("{} s", sc.duration_secs)
            }
        );
    }
    let mut tick = |p: &Progress| {
        let msg = format!(
            "{} guest accesses, {} host ops, violations {}",
            p.hcalls, p.host_ops, p.violations
        );
        display.show(p, len, msg);
        // ORDERING: Relaxed: see `on_sigint`.
        if stop.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let report = if args.deterministic {
        run_x86_deterministic_with(&sc, &mut tick)
    } else {
        run_x86(&sc, &mut tick)
    };
    display.finish();
    match report {
        Ok(r) => {
            if args.deterministic && r.failing_step.is_some() {
                print_minimised(minimise(&sc).map(|m| m.map(|(s, r)| (s, r.first_violation))));
            }
            emit(
                &r,
                || r.human(),
                args.json,
                args.plot
                    .as_deref()
                    .map(|d| (d, |d: &Path| crate::plot::write_x86_plots(&r, d))),
                r.interrupted,
                r.invariant_violations,
            )
        }
        Err(e) => {
            eprintln!("revmap run: error: {e}");
            ExitCode::from(2)
        }
    }
}
