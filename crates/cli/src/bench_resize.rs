//! `revmap bench resize [--json] [--quick]`: the HPT resize commit pause,
//! stop-the-world vs pre-copy, for HPT orders 20..=26 (20..=22 with `--quick`), the
//! median of 3 commits per order and mode (1 with `--quick`); see
//! `revmap_testkit::resize`.
//!
//! Invariants: bad arguments are clap errors (exit 2); a failed measurement is an error
//! (exit 2); `--json` prints one JSON object per line with `order`,
//! `stop_the_world_pause_us`, `precopy_pause_us` and `ratio` (plus context fields).

use crate::bench::{print_rows, Common, Row};
use anyhow::{bail, Result};
use clap::Args;
use revmap_hpt::Flavour;
use revmap_testkit::resize::{run_resize_bench, ResizeBenchConfig, ResizeBenchRow};
use serde::Serialize;

/// Options of `revmap bench resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    #[command(flatten)]
    common: Common,
    /// Smallest HPT order measured (grows to order + 1) [default: 20; 20 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(18..=35))]
    min_order: Option<u32>,
    /// Largest HPT order measured [default: 26; 22 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u32).range(18..=35))]
    max_order: Option<u32>,
    /// Commits per order and mode; the median is reported (one commit is noisy: a
    /// single slow commit can swing the ratio several-fold) [default: 3; 1 with
    /// --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100))]
    repeats: Option<u64>,
    /// Percent of HPTE slots filled before PREPARE.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100))]
    occupancy: u64,
    /// Percent of the entries that are bolted.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=100))]
    bolted: u64,
    /// vCPU threads making hypercalls during PREPARE and COMMIT.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=8))]
    vcpus: u64,
    /// Hypercall flavour: kvm or qemu.
    #[arg(long, default_value = "kvm", value_parser = ["kvm", "qemu"])]
    flavour: String,
}

/// One result row (the JSON keys are the field names).
#[derive(Debug, Serialize)]
struct ResizeRow {
    order: u32,
    stop_the_world_pause_us: f64,
    precopy_pause_us: f64,
    ratio: f64,
    entries: u64,
    bolted: u64,
    vcpu_hcalls_during_precopy: u64,
    repeats: u64,
}

impl ResizeRow {
    fn new(r: &ResizeBenchRow, repeats: u64) -> Self {
        Self {
            order: r.order,
            stop_the_world_pause_us: r.stop_the_world_pause_us,
            precopy_pause_us: r.precopy_pause_us,
            ratio: r.ratio,
            entries: r.entries,
            bolted: r.bolted,
            vcpu_hcalls_during_precopy: r.vcpu_hcalls_during_precopy,
            repeats,
        }
    }
}

impl Row for ResizeRow {
    const HEADERS: &'static [&'static str] = &[
        "order",
        "entries",
        "bolted",
        "stop-the-world pause (us)",
        "pre-copy pause (us)",
        "ratio",
        "vCPU hcalls during pre-copy",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.order.to_string(),
            self.entries.to_string(),
            self.bolted.to_string(),
            format!("{:.1}", self.stop_the_world_pause_us),
            format!("{:.1}", self.precopy_pause_us),
            format!("{:.1}", self.ratio),
            self.vcpu_hcalls_during_precopy.to_string(),
        ]
    }
}

/// Runs `revmap bench resize`.
pub fn run(a: &ResizeArgs) -> Result<()> {
    let quick = a.common.quick;
    let min_order = a.min_order.unwrap_or(20);
    let max_order = a.max_order.unwrap_or(if quick { 22 } else { 26 });
    let repeats = a.repeats.unwrap_or(if quick { 1 } else { 3 });
    if min_order > max_order {
        bail!("--min-order {min_order} is above --max-order {max_order}");
    }
    let cfg = ResizeBenchConfig {
        orders: min_order..=max_order,
        occupancy_pct: a.occupancy,
        bolted_pct: a.bolted,
        vcpus: a.vcpus as usize,
        repeats: repeats as usize,
        flavour: if a.flavour == "qemu" {
            Flavour::Qemu
        } else {
            Flavour::Kvm
        },
        ..ResizeBenchConfig::default()
    };
    let rows: Vec<ResizeRow> = run_resize_bench(&cfg, |_| {})?
        .iter()
        .map(|r| ResizeRow::new(r, repeats))
        .collect();
    print_rows(
        &format!(
            "HPT resize commit pause, vCPUs stopped to running: stop-the-world vs pre-copy \
             (ratio = stop-the-world / pre-copy; median of {repeats} commit(s) per order and \
             mode; {}% of the slots filled, {} vCPUs calling)",
            a.occupancy, a.vcpus
        ),
        &rows,
        a.common.json,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_rows_have_the_documented_keys() {
        let r = ResizeBenchRow {
            order: 24,
            entries: 10,
            bolted: 1,
            stop_the_world_pause_us: 100.0,
            precopy_pause_us: 10.0,
            ratio: 10.0,
            vcpu_hcalls_during_precopy: 5,
        };
        let v = serde_json::to_value(ResizeRow::new(&r, 3)).unwrap();
        for k in [
            "order",
            "stop_the_world_pause_us",
            "precopy_pause_us",
            "ratio",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["order"], 24);
        assert_eq!(v["ratio"], 10.0);
        assert_eq!(v["repeats"], 3);
        assert_eq!(
            ResizeRow::new(&r, 3).cells().len(),
            ResizeRow::HEADERS.len()
        );
    }
}
