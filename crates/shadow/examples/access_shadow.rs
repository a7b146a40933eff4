//! Runs the kvm-unit-tests `x86/access.c` space through the shadow MMU, comparing every
//! case with access.c's expected-result rules and with the reference walker, then the
//! six sub-tests through the shadow MMU. Exit status 0 only if every case matched with
//! no invariant violation; 1 otherwise; 2 on a bad flag.
//!
//! ```text
//! cargo run --release -p revmap-shadow --example access_shadow -- --all
//! cargo run --release -p revmap-shadow --example access_shadow -- --sample 1000000 --seed 1
//!   [--levels 4|5|both] [--maxphyaddr N] [--backing 12|21] [--threads N] [--check-every N]
//! ```
//!
//! The work is split in units (ranges of the flag space for `--all`, blocks of 65 536
//! cases with their own derived seed for `--sample`), run by `--threads` workers (default:
//! the available parallelism), each with its own VM whose tables and shadow pages persist
//! across its cases. The sampled cases depend only on the seed, not on the thread count.

use revmap_rmap::sync::{lock, thread, AtomicU64, Mutex, Ordering};
use revmap_shadow::access_shadow::{
    shadow_sub_tests, space_chunks, space_range, ShadowAccessReport, ShadowAccessRunner,
    DEFAULT_CHECK_EVERY,
};
use revmap_shadow::access_test::{AccessConfig, AccessSpace, SplitMix64};
use std::time::Instant;

const BLOCK: u64 = 65_536;

struct Opts {
    sample: Option<u64>,
    seed: u64,
    levels: Vec<bool>,
    maxphyaddr: u8,
    backing: u32,
    threads: usize,
    check_every: u64,
}

fn usage(msg: &str) -> ! {
    eprintln!("access_shadow: {msg}");
    eprintln!(
        "usage: access_shadow (--all | --sample N [--seed S]) [--levels 4|5|both] \
         [--maxphyaddr N] [--backing 12|21] [--threads N] [--check-every N]"
    );
    std::process::exit(2)
}

fn parse() -> Opts {
    let mut o = Opts {
        sample: None,
        seed: 1,
        levels: vec![false, true],
        maxphyaddr: 40,
        backing: 21,
        threads: thread::available_parallelism().map_or(1, |n| n.get()),
        check_every: DEFAULT_CHECK_EVERY,
    };
    let mut all = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        let num = |name: &str, v: String| -> u64 {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{name}: not a number: {v}")))
        };
        match a.as_str() {
            "--all" => all = true,
            "--sample" => o.sample = Some(num("--sample", val("--sample"))),
            "--seed" => o.seed = num("--seed", val("--seed")),
            "--levels" => {
                o.levels = match val("--levels").as_str() {
                    "4" => vec![false],
                    "5" => vec![true],
                    "both" => vec![false, true],
                    v => usage(&format!("--levels: 4, 5 or both, not {v}")),
                }
            }
            "--maxphyaddr" => {
                o.maxphyaddr = match num("--maxphyaddr", val("--maxphyaddr")) {
                    n @ 32..=52 => n as u8,
                    n => usage(&format!("--maxphyaddr: 32..=52, not {n}")),
                }
            }
            "--backing" => {
                o.backing = match num("--backing", val("--backing")) {
                    12 => 12,
                    21 => 21,
                    n => usage(&format!("--backing: 12 or 21, not {n}")),
                }
            }
            "--threads" => o.threads = num("--threads", val("--threads")).max(1) as usize,
            "--check-every" => o.check_every = num("--check-every", val("--check-every")),
            "-h" | "--help" => usage("help"),
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    if all == o.sample.is_some() {
        usage("give exactly one of --all and --sample N");
    }
    o
}

/// One unit of work: a range of the flag space, or a seeded block of samples.
#[derive(Clone, Copy)]
enum Unit {
    Range(u32, u32),
    Block { seed: u64, n: u64 },
}

fn run_depth(o: &Opts, cfg: AccessConfig) -> (ShadowAccessReport, f64) {
    let units: Vec<Unit> = match o.sample {
        None => space_chunks(&cfg)
            .into_iter()
            .map(|(lo, hi)| Unit::Range(lo, hi))
            .collect(),
        Some(n) => (0..n.div_ceil(BLOCK))
            .map(|b| Unit::Block {
                // Each block's own seed: a SplitMix64 step away from the run's.
                seed: SplitMix64::new(o.seed ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64(),
                n: BLOCK.min(n - b * BLOCK),
            })
            .collect(),
    };
    let total = match o.sample {
        Some(n) => n,
        None => AccessSpace::new(&cfg).count() as u64,
    };
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let report = Mutex::new(ShadowAccessReport::default());
    let t0 = Instant::now();
    thread::scope(|s| {
        for _ in 0..o.threads.min(units.len()) {
            s.spawn(|| {
                let mut runner = match ShadowAccessRunner::with_backing(cfg, o.backing) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("access_shadow: cannot build the VM: {e}");
                        std::process::exit(1);
                    }
                };
                runner.set_check_every(o.check_every);
                loop {
                    // ORDERING: Relaxed: a work counter; the report is merged under a lock.
                    let k = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&u) = units.get(k) else { break };
                    let rep = match u {
                        Unit::Range(lo, hi) => runner.run(space_range(&cfg, lo, hi)),
                        Unit::Block { seed, n } => runner.run_sample(seed, n),
                    };
                    let n = rep.checked;
                    lock(&report).merge(rep);
                    // ORDERING: Relaxed: progress display only.
                    let before = done.fetch_add(n, Ordering::Relaxed);
                    let (a, b) = (before * 20 / total.max(1), (before + n) * 20 / total.max(1));
                    if a != b {
                        eprintln!(
                            "  progress: {} / {} cases ({}%), {:.0} s",
                            before + n,
                            total,
                            (before + n) * 100 / total.max(1),
                            t0.elapsed().as_secs_f64()
                        );
                    }
                }
            });
        }
    });
    let rep = std::mem::take(&mut *lock(&report));
    (rep, t0.elapsed().as_secs_f64())
}

fn main() {
    let o = parse();
    let mut failed = false;
    let what = match o.sample {
        Some(n) => format!("sample of {n}, seed {}", o.seed),
        None => "the whole space".to_string(),
    };
    for &la57 in &o.levels {
        let cfg = AccessConfig {
            maxphyaddr: o.maxphyaddr,
            la57,
            ..AccessConfig::default()
        };
        eprintln!(
            "{}-level maxphyaddr={}: {what}, {} threads, host pages 2^{}",
            if la57 { 5 } else { 4 },
            o.maxphyaddr,
            o.threads,
            o.backing
        );
        let (rep, secs) = run_depth(&o, cfg);
        println!(
            "{}-level maxphyaddr={} ({what}): {} cases, {} matched, {} mismatched \
             (shadow vs rules {}, walker vs rules {}, shadow vs walker {}); {} faults, \
             {} shadow hits, {} shadow faults fixed; {} invariant checks, {} violations; \
             {:.1} s, {:.0} cases/s",
            if la57 { 5 } else { 4 },
            o.maxphyaddr,
            rep.checked,
            rep.matched,
            rep.mismatched,
            rep.shadow_vs_rules,
            rep.walker_vs_rules,
            rep.shadow_vs_walker,
            rep.faults,
            rep.hits,
            rep.fixed,
            rep.invariant_checks,
            rep.invariant_violations,
            secs,
            rep.checked as f64 / secs.max(1e-9)
        );
        if let Some(m) = &rep.first_mismatch {
            println!("first mismatch: {m}");
        }
        if let Some(v) = &rep.first_violation {
            println!("first invariant violation: {v}");
        }
        failed |= !rep.ok();
    }
    for backing in [12, 21] {
        match shadow_sub_tests(backing) {
            Ok(res) => {
                for (name, r) in res {
                    match r {
                        Ok(()) => println!("{name} (shadow MMU, host pages 2^{backing}): ok"),
                        Err(e) => {
                            println!("{name} (shadow MMU, host pages 2^{backing}): FAIL: {e}");
                            failed = true;
                        }
                    }
                }
            }
            Err(e) => {
                println!("sub-tests: cannot build the VM: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
