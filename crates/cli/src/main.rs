//! `revmap`: the command-line front end of the revmap workspace.
#![forbid(unsafe_code)]

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
    /// Replay real guest hypercall traces and compare every result (not implemented yet).
    Replay,
    /// Run the benchmarks: rmap, replay, host, resize (not implemented yet).
    Bench,
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
        Command::Run => "run",
        Command::Replay => "replay",
        Command::Bench => "bench",
    };
    eprintln!("revmap {name}: not implemented yet");
    ExitCode::from(2)
}
