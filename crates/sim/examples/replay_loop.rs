//! Profiling harness: replays the pre-parsed boot trace `N` times (default 50) on fresh
//! VMs, timing only the replay loop. For `perf record` / `perf stat`:
//! `cargo run --release -p revmap-sim --example replay_loop -- [kvm|qemu] [N]`.

use revmap_sim::replay::{new_vm, replay_preparsed, Flavour, PreparsedTrace, ReplayOptions};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let flavour: Flavour = match args.next().as_deref().unwrap_or("kvm").parse() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let n: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(50);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../traces/boot.txt.gz");
    let trace = match PreparsedTrace::open(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut secs = 0.0;
    let mut calls = 0;
    for _ in 0..n {
        let vm = match new_vm(flavour, trace.vm_spec()) {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        };
        let rep = replay_preparsed(&trace, &vm, &ReplayOptions::default());
        if !rep.passed() {
            eprintln!("mismatch: {:?}", rep.first_mismatch);
            return ExitCode::from(1);
        }
        secs += rep.seconds;
        calls += rep.calls;
    }
    println!(
        "{flavour}: {calls} calls in {secs:.3} s: {:.1} M calls/s ({:.1} ns/call)",
        calls as f64 / secs / 1e6,
        secs * 1e9 / calls as f64
    );
    ExitCode::SUCCESS
}
