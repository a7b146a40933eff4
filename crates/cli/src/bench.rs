//! `revmap bench`: the benchmarks behind one command, each printing a table or, with
//! `--json`, one JSON object per row on its own line.
//!
//! Subcommands: `rmap` ([`crate::bench_rmap`]), `replay` ([`crate::bench_replay`]),
//! `host` ([`crate::bench_host`]), `resize` ([`crate::bench_resize`]), `scaling` ([`crate::bench_scaling`]), `x86` ([`crate::bench_x86`]), `nested` ([`crate::bench_nested`]). Each prints a
//! title line and an aligned table ([`print_rows`]), or JSON lines.
//!
//! Invariants: every figure is the median over repeated timed batches
//! (`std::time::Instant`, results through `black_box`); `--quick` only shrinks sizes and
//! repetitions, never changes what is measured; errors go to stderr with exit code 2.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde::Serialize;
use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

/// Options every benchmark takes.
#[derive(Debug, Clone, Copy, Args)]
pub struct Common {
    /// Print one JSON object per row (one per line) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Short runs with smaller sizes (for tests and CI; figures are rough).
    #[arg(long)]
    pub quick: bool,
}

/// Arguments of `revmap bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// The three reverse maps (HPT ring, pte_list, nested) against the baselines
    /// (mutex-guarded HashMap, slab list, per-frame SmallVec): ns per op and bytes per entry.
    Rmap(crate::bench_rmap::RmapArgs),
    /// Pre-parsed real traces: hypercalls per second (median over fresh-VM replays) and
    /// streaming-parser throughput.
    Replay(crate::bench_replay::ReplayBenchArgs),
    /// unmap_gfn_range and dirty-log harvest against a raw sequential scan.
    Host(crate::bench_host::HostArgs),
    /// The HPT resize commit pause (vCPUs stopped to running), stop-the-world vs pre-copy,
    /// for HPT orders 20..=26 (median of 3 commits per order and mode).
    Resize(crate::bench_resize::ResizeArgs),
    /// N vCPU threads (1, 2, .. the available cores) making H_ENTER+H_REMOVE on
    /// disjoint PTEGs of one VM: hypercalls per second and the ratio to one thread.
    Scaling(crate::bench_scaling::ScalingArgs),
    /// The x86 shadow MMU: shadow fault, translation against the two-dimensional walk,
    /// dirty-log write protection, unmap and aging per SPTE against a raw scan, memory
    /// per shadow page and rmap entry against KVM's.
    X86(crate::bench_x86::X86Args),
    /// The nested MMU: nested fault, translation against L1's table walked through
    /// L0's, host unmap per nested rmap entry, memory per entry against KVM's 16 B.
    Nested(crate::bench_nested::NestedArgs),
}

/// Runs `revmap bench`.
pub fn run(args: &BenchArgs) -> ExitCode {
    let (name, res) = match &args.which {
        BenchCommand::Rmap(a) => ("rmap", crate::bench_rmap::run(a)),
        BenchCommand::Replay(a) => ("replay", crate::bench_replay::run(a)),
        BenchCommand::Host(a) => ("host", crate::bench_host::run(a)),
        BenchCommand::Resize(a) => ("resize", crate::bench_resize::run(a)),
        BenchCommand::Scaling(a) => ("scaling", crate::bench_scaling::run(a)),
        BenchCommand::X86(a) => ("x86", crate::bench_x86::run(a)),
        BenchCommand::Nested(a) => ("nested", crate::bench_nested::run(a)),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): nothing left to report.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("revmap bench {name}: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Median of `v` (NaN-free input; 0 for an empty slice).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Nanoseconds per call of `op`: one untimed warm-up batch, then the median over
/// `batches` timed batches of `per_batch` calls.
pub fn ns_per_op(batches: usize, per_batch: u64, mut op: impl FnMut()) -> f64 {
    let per_batch = per_batch.max(1);
    for _ in 0..per_batch {
        op();
    }
    let mut v: Vec<f64> = (0..batches.max(1))
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                op();
            }
            t.elapsed().as_nanos() as f64 / per_batch as f64
        })
        .collect();
    median(&mut v)
}

/// A row printable both as a table line and as JSON.
pub trait Row: Serialize {
    /// Column headers.
    const HEADERS: &'static [&'static str];
    /// The row's cells, in header order.
    fn cells(&self) -> Vec<String>;
}

/// Prints `rows` as JSON lines or as an aligned table under `title`.
pub fn print_rows<R: Row>(title: &str, rows: &[R], json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        for r in rows {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
        return Ok(out.flush()?);
    }
    let cells: Vec<Vec<String>> = rows.iter().map(Row::cells).collect();
    let mut table = format!("{title}\n");
    revmap_sim::run::write_table(&mut table, R::HEADERS, &cells);
    out.write_all(table.as_bytes())?;
    Ok(out.flush()?)
}

/// One result row of the MMU benchmarks (`revmap bench x86` and `revmap bench nested`).
#[derive(Debug, Default, Serialize)]
pub struct MmuRow {
    /// What is measured (`fault`, `translate`, `write_protect`, `unmap`, `age`, `memory`).
    pub bench: &'static str,
    /// The case.
    pub case: String,
    /// Units the per-unit figure divides by.
    pub units: u64,
    /// What a unit is.
    pub unit: &'static str,
    /// The figure: ns per unit, or bytes per unit for `memory`.
    pub value: f64,
    /// The baseline's figure (raw scan, two-dimensional walk, KVM's bytes).
    pub baseline: Option<f64>,
    /// What the baseline is.
    pub baseline_is: &'static str,
    /// `value / baseline`.
    pub ratio: Option<f64>,
    /// `translate` rows: ns through the shadow table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow_ns: Option<f64>,
    /// `translate` rows: ns of the two-dimensional walk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub walk_2d_ns: Option<f64>,
}

impl MmuRow {
    /// A row with `value` against `baseline`.
    pub fn new(
        bench: &'static str,
        case: impl Into<String>,
        units: u64,
        unit: &'static str,
        value: f64,
        baseline: Option<(f64, &'static str)>,
    ) -> Self {
        MmuRow {
            bench,
            case: case.into(),
            units,
            unit,
            value,
            baseline: baseline.map(|b| b.0),
            baseline_is: baseline.map_or("-", |b| b.1),
            ratio: baseline.and_then(|(b, _)| (b > 0.0).then(|| value / b)),
            ..MmuRow::default()
        }
    }

    /// A row of ns per unit from `secs` seconds spent on `units` units, against
    /// `baseline` (ns per unit).
    pub fn timed(
        bench: &'static str,
        case: impl Into<String>,
        units: u64,
        unit: &'static str,
        secs: f64,
        baseline: Option<(f64, &'static str)>,
    ) -> Self {
        Self::new(
            bench,
            case,
            units,
            unit,
            secs * 1e9 / units.max(1) as f64,
            baseline,
        )
    }

    /// The `translate` row: ns per translation through the shadow table against the
    /// two-dimensional walk, both figures also in their own fields.
    pub fn translate(case: impl Into<String>, shadow_ns: f64, walk_2d_ns: f64) -> Self {
        MmuRow {
            shadow_ns: Some(shadow_ns),
            walk_2d_ns: Some(walk_2d_ns),
            ..Self::new(
                "translate",
                case,
                1,
                "translation",
                shadow_ns,
                Some((walk_2d_ns, "walk_2d")),
            )
        }
    }
}

impl Row for MmuRow {
    const HEADERS: &'static [&'static str] = &[
        "bench",
        "case",
        "units",
        "value",
        "baseline",
        "",
        "x baseline",
    ];
    fn cells(&self) -> Vec<String> {
        let per = if self.bench == "memory" { "B" } else { "ns" };
        vec![
            self.bench.to_owned(),
            self.case.clone(),
            format!("{} x {}", self.units, self.unit),
            format!("{:.2} {per}/{}", self.value, self.unit),
            self.baseline
                .map_or_else(|| "-".to_owned(), |b| format!("{b:.2}")),
            self.baseline_is.to_owned(),
            self.ratio
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
        ]
    }
}

/// Median seconds of `runs` calls of `timed` on `st`, each after an untimed `setup`.
pub fn median_secs<T>(
    runs: u32,
    st: &mut T,
    mut setup: impl FnMut(&mut T) -> Result<()>,
    mut timed: impl FnMut(&mut T) -> Result<()>,
) -> Result<f64> {
    let mut v = Vec::new();
    for _ in 0..runs.max(1) {
        setup(st)?;
        let t = Instant::now();
        timed(st)?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(&mut v))
}

/// Median seconds of `runs` calls of `timed`, each on a fresh state from `make`
/// (made, and the previous one dropped, untimed).
pub fn median_secs_fresh<T>(
    runs: u32,
    mut make: impl FnMut() -> Result<T>,
    mut timed: impl FnMut(&mut T) -> Result<()>,
) -> Result<f64> {
    median_secs(
        runs,
        &mut None,
        |st| {
            *st = None;
            *st = Some(make()?);
            Ok(())
        },
        |st| st.as_mut().map_or(Ok(()), &mut timed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn timed_rows_divide_by_their_units() {
        let r = MmuRow::timed("unmap", "case", 4, "SPTE", 2e-6, Some((250.0, "raw scan")));
        assert_eq!(r.value, 500.0);
        assert_eq!(
            (r.baseline, r.baseline_is, r.ratio),
            (Some(250.0), "raw scan", Some(2.0))
        );
        let r = MmuRow::timed("fault", "case", 0, "fault", 1e-9, None);
        assert_eq!((r.value, r.baseline_is, r.ratio), (1.0, "-", None));
    }

    #[test]
    fn translate_row_carries_both_walks() {
        let r = MmuRow::translate("4-level", 3.0, 12.0);
        assert_eq!((r.bench, r.unit, r.units), ("translate", "translation", 1));
        assert_eq!(
            (r.value, r.shadow_ns, r.walk_2d_ns),
            (3.0, Some(3.0), Some(12.0))
        );
        assert_eq!((r.baseline_is, r.ratio), ("walk_2d", Some(0.25)));
    }

    #[test]
    fn ns_per_op_runs_the_op() {
        let mut n = 0u64;
        let ns = ns_per_op(3, 10, || n += 1);
        assert_eq!(n, 40);
        assert!(ns >= 0.0);
    }
}
