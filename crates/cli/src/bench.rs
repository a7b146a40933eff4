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
    let mut width: Vec<usize> = R::HEADERS.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    writeln!(out, "{title}")?;
    let mut line = |row: &[String]| {
        let parts: Vec<String> = row
            .iter()
            .zip(&width)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        writeln!(out, "  {}", parts.join("  "))
    };
    let headers: Vec<String> = R::HEADERS.iter().map(|h| (*h).to_owned()).collect();
    line(&headers)?;
    for row in &cells {
        line(row)?;
    }
    Ok(out.flush()?)
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
    fn ns_per_op_runs_the_op() {
        let mut n = 0u64;
        let ns = ns_per_op(3, 10, || n += 1);
        assert_eq!(n, 40);
        assert!(ns >= 0.0);
    }
}
