//! `revmap bench scaling`: hypercall throughput of N vCPU threads on one VM.
//!
//! One VM (1 GiB of RAM, an order-23 HPT, the chosen flavour), its tables populated
//! before any clock starts ([`Vm::populate_tables`]). Thread `t` is vCPU `t` with its
//! own run handle ([`Vm::vcpu_run`]) and works on its own PTEGs and its own guest
//! frames, disjoint from every other thread's (their HPTEs, revmap entries and rmap
//! words lie on different cache lines): each step is an H_ENTER of a 4 KiB page into
//! one of its PTEGs followed by the H_REMOVE of that entry, both checked (a failed
//! hypercall is an error, not a figure). So nothing is shared between the threads but
//! what every hypercall of the VM reads (the gate, the memslot snapshot, the TLB
//! domain): the figure shows what those shared reads cost.
//!
//! For N = 1, 2, ... up to the available cores (at least 2), `--runs` runs each start
//! the N threads together and time from the start to the last thread's end:
//! `hcalls_per_s_median` is N x calls per thread over that time (median over the runs),
//! `ratio_to_1` its ratio to the one-thread figure of the same invocation. The rows
//! also give `nproc` and the 1-minute load average at the start (the machine is
//! shared: a ratio measured under load understates the scaling).

use crate::backend::{make_vm, FlavourArg};
use crate::bench::{median, print_rows, Common, Row};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use revmap_hpt::hcall::{H_ENTER, H_REMOVE, H_SUCCESS};
use revmap_hpt::{VcpuId, Vm};
use revmap_rmap::sync::{thread, AtomicBool, Ordering};
use revmap_sim::replay::VmSpec;
use serde::Serialize;
use std::time::Instant;

/// Arguments of `revmap bench scaling`.
#[derive(Debug, Args)]
pub struct ScalingArgs {
    #[command(flatten)]
    common: Common,
    /// Flavour of the VM.
    #[arg(long, value_enum, default_value_t = FlavourArg::Kvm)]
    flavour: FlavourArg,
    /// Timed runs per thread count (default 5, 2 with --quick).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    runs: Option<u32>,
    /// Largest thread count (default: the available cores, at least 2).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    max_threads: Option<u32>,
}

/// One result row.
#[derive(Debug, Serialize)]
struct ScalingRow {
    bench: &'static str,
    flavour: String,
    threads: u32,
    hcalls_per_thread: u64,
    runs: u32,
    hcalls_per_s_median: f64,
    ratio_to_1: f64,
    nproc: usize,
    loadavg_1m: Option<f64>,
}

impl Row for ScalingRow {
    const HEADERS: &'static [&'static str] = &[
        "bench",
        "flavour",
        "threads",
        "hcalls/thread",
        "runs",
        "Mcalls/s (median)",
        "x 1 thread",
        "nproc",
        "load 1m",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.bench.to_owned(),
            self.flavour.clone(),
            self.threads.to_string(),
            self.hcalls_per_thread.to_string(),
            self.runs.to_string(),
            format!("{:.2}", self.hcalls_per_s_median / 1e6),
            format!("{:.2}", self.ratio_to_1),
            self.nproc.to_string(),
            self.loadavg_1m
                .map_or_else(|| "-".into(), |l| format!("{l:.2}")),
        ]
    }
}

/// HPT order of the benchmark VM (8 MiB: 2^16 PTEGs).
const HPT_ORDER: u32 = 23;
/// Guest RAM of the benchmark VM.
const RAM_BYTES: u64 = 1 << 30;
/// PTEGs (and guest frames) each thread cycles over.
const PER_THREAD: u64 = 1024;

/// The 1-minute load average (`/proc/loadavg`; `None` where unreadable).
fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One thread's work: `pairs` H_ENTER + H_REMOVE pairs as vCPU `t` on its own PTEGs
/// and frames (module docs). The region of thread `t` starts `t` regions of
/// `stride` PTEGs (and frames) in.
fn vcpu_thread(vm: &Vm, t: u32, stride: u64, pairs: u64, go: &AtomicBool) -> Result<()> {
    let vcpu = VcpuId::new(t as usize).map_err(|e| anyhow!("vCPU {t}: {e}"))?;
    let mut run = vm.vcpu_run(vcpu);
    let pteg0 = u64::from(t) * stride;
    let gfn0 = u64::from(t) * stride;
    // A bolted-free 4 KiB entry in a 1 TiB segment, AVPN varying per thread.
    let pteh = 0x4000_0000_0000_0001 | (u64::from(t) << 12);
    // ORDERING: Acquire pairs with the starter's Release: every thread starts together.
    while !go.load(Ordering::Acquire) {
        revmap_rmap::sync::spin_loop();
    }
    let mut i = 0u64;
    for _ in 0..pairs {
        let ptex = (pteg0 + i) * 8;
        let ptel = ((gfn0 + i) << 12) | 0x190;
        let mut regs = [0, ptex, pteh, ptel, 0, 0, 0, 0];
        let ret = run.hcall_regs(H_ENTER, &mut regs);
        if ret != H_SUCCESS {
            bail!("vCPU {t}: H_ENTER at PTEG {} returned {ret}", pteg0 + i);
        }
        let mut regs = [0, regs[0], 0, 0, 0, 0, 0, 0];
        let ret = run.hcall_regs(H_REMOVE, &mut regs);
        if ret != H_SUCCESS || regs[0] & !0x7f != pteh & !0x7f {
            bail!("vCPU {t}: H_REMOVE at PTEG {} returned {ret}", pteg0 + i);
        }
        i += 1;
        if i == PER_THREAD {
            i = 0;
        }
    }
    Ok(())
}

/// One timed run of `n` threads; hypercalls per second over all of them.
fn timed_run(vm: &Vm, n: u32, stride: u64, pairs: u64) -> Result<f64> {
    let go = AtomicBool::new(false);
    let (secs, results) = thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|t| {
                let go = &go;
                s.spawn(move || vcpu_thread(vm, t, stride, pairs, go))
            })
            .collect();
        let start = Instant::now();
        // ORDERING: Release pairs with the threads' Acquire.
        go.store(true, Ordering::Release);
        let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        (start.elapsed().as_secs_f64(), results)
    });
    for r in results {
        r.map_err(|_| anyhow!("a vCPU thread panicked"))??;
    }
    Ok((2 * pairs * u64::from(n)) as f64 / secs.max(1e-9))
}

/// Runs `revmap bench scaling`.
pub fn run(args: &ScalingArgs) -> Result<()> {
    let nproc = thread::available_parallelism().map_or(1, |n| n.get());
    let max = args
        .max_threads
        .unwrap_or_else(|| u32::try_from(nproc.max(2)).unwrap_or(2));
    let runs = args.runs.unwrap_or(if args.common.quick { 2 } else { 5 });
    let pairs: u64 = if args.common.quick { 20_000 } else { 1_000_000 };
    let spec = VmSpec {
        ram_bytes: RAM_BYTES,
        hpt_order: HPT_ORDER,
    };
    let vm = make_vm(args.flavour, spec).context("cannot create the VM")?;
    vm.populate_tables();
    // Regions as far apart as the table and the RAM allow, each PER_THREAD long.
    let npteg = 1u64 << (HPT_ORDER - 7);
    let stride = (npteg / u64::from(max)).min((RAM_BYTES >> 12) / u64::from(max));
    if stride < PER_THREAD {
        bail!("{max} threads do not fit {PER_THREAD} PTEGs each in the benchmark VM");
    }
    let load = loadavg();
    let mut rows: Vec<ScalingRow> = Vec::new();
    let mut one = 0.0;
    for n in 1..=max {
        // One untimed warm-up run (thread start-up, caches).
        timed_run(&vm, n, stride, pairs.min(PER_THREAD))?;
        let mut rates = (0..runs)
            .map(|_| timed_run(&vm, n, stride, pairs))
            .collect::<Result<Vec<f64>>>()?;
        let rate = median(&mut rates);
        if n == 1 {
            one = rate;
        }
        rows.push(ScalingRow {
            bench: "scaling",
            flavour: args.flavour.to_string(),
            threads: n,
            hcalls_per_thread: 2 * pairs,
            runs,
            hcalls_per_s_median: rate,
            ratio_to_1: if one > 0.0 { rate / one } else { 0.0 },
            nproc,
            loadavg_1m: load,
        });
    }
    print_rows(
        "vCPU scaling: N threads of H_ENTER+H_REMOVE on disjoint PTEGs and frames of one VM",
        &rows,
        args.common.json,
    )
}
