//! `revmap bench resize [--json]`: the HPT resize commit pause, stop-the-world vs
//! pre-copy, for HPT orders 20..=26 (see `revmap_testkit::resize`).
//!
//! Invariants: bad arguments are clap errors (exit 2); a failed measurement prints a
//! message and exits 2; `--json` prints one JSON object per line with `order`,
//! `stop_the_world_pause_us`, `precopy_pause_us` and `ratio` (plus context fields).

use clap::Args;
use revmap_hpt::Flavour;
use revmap_testkit::resize::{run_resize_bench, ResizeBenchConfig, ResizeBenchRow};
use std::process::ExitCode;

/// Options of `revmap bench resize`.
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// One JSON object per order instead of a table.
    #[arg(long)]
    json: bool,
    /// Smallest HPT order measured (grows to order + 1).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(18..=35))]
    min_order: u32,
    /// Largest HPT order measured.
    #[arg(long, default_value_t = 26, value_parser = clap::value_parser!(u32).range(18..=35))]
    max_order: u32,
    /// Commits per order and mode (median reported).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    repeats: u64,
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

fn json_row(r: &ResizeBenchRow) -> serde_json::Value {
    serde_json::json!({
        "order": r.order,
        "stop_the_world_pause_us": r.stop_the_world_pause_us,
        "precopy_pause_us": r.precopy_pause_us,
        "ratio": r.ratio,
        "entries": r.entries,
        "bolted": r.bolted,
        "vcpu_hcalls_during_precopy": r.vcpu_hcalls_during_precopy,
    })
}

/// Runs `revmap bench resize`.
pub fn resize(a: &ResizeArgs) -> ExitCode {
    if a.min_order > a.max_order {
        eprintln!("revmap bench resize: --min-order is above --max-order");
        return ExitCode::from(2);
    }
    let cfg = ResizeBenchConfig {
        orders: a.min_order..=a.max_order,
        occupancy_pct: a.occupancy,
        bolted_pct: a.bolted,
        vcpus: a.vcpus as usize,
        repeats: a.repeats as usize,
        flavour: if a.flavour == "qemu" {
            Flavour::Qemu
        } else {
            Flavour::Kvm
        },
        ..ResizeBenchConfig::default()
    };
    if !a.json {
        println!(
            "{:>5} {:>10} {:>8} {:>16} {:>12} {:>8}",
            "order", "entries", "bolted", "stop-world (us)", "pre-copy (us)", "ratio"
        );
    }
    let res = run_resize_bench(&cfg, |r| {
        if a.json {
            println!("{}", json_row(r));
        } else {
            println!(
                "{:>5} {:>10} {:>8} {:>16.1} {:>12.1} {:>8.1}",
                r.order,
                r.entries,
                r.bolted,
                r.stop_the_world_pause_us,
                r.precopy_pause_us,
                r.ratio
            );
        }
    });
    match res {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("revmap bench resize: {e}");
            ExitCode::from(2)
        }
    }
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
        let v = json_row(&r);
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
    }
}
