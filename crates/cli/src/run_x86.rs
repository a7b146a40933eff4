//! `revmap run --mmu x86`: the simulator on the x86 shadow MMU (`revmap_sim::x86`) with
//! the embedded default x86 scenario (`scenarios/x86.toml`) or a scenario file, flags
//! overriding it; progress, report (human or `--json`), plots and exit status as for
//! the HPT run (the run itself is `run::run_mmu`'s). With `--deterministic`, a failing
//! run is shrunk (`revmap_sim::x86::det::minimise`) and the smallest failing scenario
//! printed.
//!
//! Invariants: the scenario, the flags and the `--plot` directory are checked before the
//! run (exit 2 with one message); `--hcalls` is refused (an x86 guest makes no
//! hypercalls: `--accesses` bounds the run).

use crate::run::mmu_run;
use revmap_sim::x86::det::{minimise, run_x86_deterministic_with};
use revmap_sim::x86::run::run_x86;
use revmap_sim::x86::{X86Report, X86RunError, X86Scenario};
use std::path::Path;

mmu_run!(
    X86Scenario,
    X86Report,
    X86RunError,
    kind: "x86 scenario",
    counted: "guest accesses",
    stop_after: stop_after_accesses,
    open: |p: &Path| X86Scenario::from_file(p).map_err(|e| e.to_string()),
    threaded: run_x86,
    deterministic: run_x86_deterministic_with,
    minimise: minimise,
    plots: crate::plot::write_x86_plots
);
