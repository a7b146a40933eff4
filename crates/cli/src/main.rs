//! `revmap`: the command-line front end of the revmap workspace.
//!
//! Exit codes: 0 success; 1 a replay found mismatches, invariant violations or an
//! unsupported record; 2 usage error, unreadable or malformed input, or a subcommand
//! that is not implemented yet. No input makes it panic.
#![forbid(unsafe_code)]

mod backend;
mod bench_resize;
mod replay;

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
    /// Run the simulator: vCPUs, host actors and an HPT resize (not implemented yet).
    Run,
    /// Replay real guest hypercall traces and compare every result.
    Replay(replay::ReplayArgs),
    /// Run the benchmarks (so far: `bench resize`).
    Bench(bench_resize::BenchArgs),
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
    let name = match cli.command {
        Command::Replay(args) => return replay::run(&args),
        Command::Run => "run",
        Command::Bench(args) => return bench_resize::run(&args),
    };
    eprintln!("revmap {name}: not implemented yet");
    ExitCode::from(2)
}
