//! `revmap`: the command-line front end of the revmap workspace.
//!
//! Exit codes: 0 success; 1 a replay or run found mismatches, invariant violations or
//! an unsupported record; 2 usage error, unreadable or malformed input, an unwritable
//! output; 130 a run stopped by SIGINT (its partial report is still printed). No input
//! makes it panic. Every error message starts `revmap SUBCOMMAND: error: `.
#![forbid(unsafe_code)]

mod backend;
mod bench;
mod bench_host;
mod bench_nested;
mod bench_replay;
mod bench_resize;
mod bench_rmap;
mod bench_scaling;
mod bench_x86;
mod plot;
mod replay;
mod replay_mmu;
mod run;
mod run_nested;
mod run_x86;
mod soak;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Simulate, replay, check and benchmark a hypervisor MMU's reverse maps.
#[derive(Debug, Parser)]
#[command(name = "revmap", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the simulator: vCPU threads with a Linux-like guest workload, host actors
    /// (memory pressure, aging, live migration) and HPT resizes (--mmu x86: the x86
    /// shadow MMU under a Linux-like x86 guest); then a report.
    Run(run::RunArgs),
    /// Replay real guest traces and compare every result: PPC hypercall traces (HPT
    /// MMU), x86 walk traces (shadow MMU) and nested-radix traces (nested MMU),
    /// recognised by content.
    Replay(replay::ReplayArgs),
    /// Run the benchmarks: rmap, replay, host, resize, x86, nested (tables, or JSON lines with
    /// --json; --quick for short runs).
    Bench(bench::BenchArgs),
    /// Soak: the deterministic simulator over many seeds on all cores, the invariant
    /// checker after every step; failing seeds are minimised.
    Soak(soak::SoakArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Replay(args) => replay::run(&args),
        Command::Run(args) => run::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Soak(args) => soak::run(&args),
    }
}
