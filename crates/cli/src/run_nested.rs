//! `revmap run --mmu nested`: the nested simulator (`revmap_sim::nested`) with the
//! embedded default scenario, the embedded hostile-L1 scenario (`--scenario hostile`),
//! or a scenario file, and the flags of `revmap run`; a human summary or one JSON
//! object; `--plot DIR` writes the nested plots.
//!
//! Invariants: as `revmap run`'s (the run itself is `run::run_mmu`'s: the `--plot`
//! directory is checked before the run; SIGINT stops the run and still reports, exit
//! 130; exit 1 on invariant violations, 2 on a bad flag, scenario or output
//! directory). With `--deterministic`, a failing run is shrunk and the smallest
//! failing scenario printed as TOML on stderr.

use crate::run::mmu_run;
use revmap_sim::nested::{
    minimise_nested, run_nested, run_nested_deterministic_with, NestedRunError, NestedRunReport,
    NestedScenario,
};
use std::path::Path;

/// The scenario of `--scenario P`: a file, else an embedded name (`nested`, `hostile`).
fn open(p: &Path) -> Result<NestedScenario, String> {
    if p.exists() {
        return NestedScenario::from_file(p).map_err(|e| e.to_string());
    }
    p.to_str()
        .and_then(NestedScenario::embedded)
        .ok_or_else(|| {
            format!(
                "no scenario file {} (embedded nested scenarios: nested, hostile)",
                p.display()
            )
        })
}

mmu_run!(
    NestedScenario,
    NestedRunReport,
    NestedRunError,
    kind: "nested scenario",
    counted: "L2 accesses",
    stop_after: stop_after_accesses,
    open: open,
    threaded: run_nested,
    deterministic: run_nested_deterministic_with,
    minimise: minimise_nested,
    plots: crate::plot::write_nested_plots
);
