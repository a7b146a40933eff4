//! `revmap bench replay [FILE...]`: replay throughput of pre-parsed real traces and the
//! streaming parser's throughput.
//!
//! Per file: the file is decompressed to memory first (decompression is not timed);
//! the streaming parser then builds a [`PreparsedTrace`] from the in-memory text, timed
//! (`parse_mb_per_s`, MB = 10^6 bytes of decompressed text, median over parses). Per
//! flavour: `--runs` replays, each on a fresh VM. What is timed:
//!
//! * **The table pool** (not timed): HPT arrays come from the process's table pool
//!   ([`revmap_hpt::pool`], capacity [`POOL_BYTES`] here), as KVM takes its HPTs from an
//!   already-mapped CMA area. One untimed warm-up replay per trace and flavour fills
//!   it with the tables the trace makes (the boot table and one per resize), so the
//!   timed runs take theirs from the pool, zeroed, without page faults.
//! * **Setup** (`setup_ms_median`, not in the rate): creating the VM (the HPT and its
//!   revmap from the pool, the memslot's rmap words from the host layer's rmap pool,
//!   with the same capacity, [`revmap_hpt::pool::set_vm_pools_capacity`]) and faulting
//!   every page of those tables in
//!   ([`Vm::populate_tables`](revmap_hpt::Vm::populate_tables)), as a hypervisor's
//!   tables are mapped before its guest runs. The tables the previous run retired are
//!   scrubbed here too ([`TablePool::scrub_all`](revmap_hpt::pool::TablePool::scrub_all),
//!   which also waits for the new VM's resize worker if it started on them), so that
//!   no scrubbing of theirs runs during the timed loop.
//! * **Replay** (`hcalls_per_s_median`, the steady-state rate): the loop over the
//!   pre-parsed records, from the first call to the last, with the comparison of every
//!   result. Resize preparations and commits inside the trace are timed: a recorded
//!   PREPARE success waits for the worker to have its table from the pool (zeroing it
//!   unless the worker scrubbed one of that order while idle), and the commit copies and
//!   rehashes in this loop (the C reference fills its new table there). The page faults
//!   taken during it are reported (`replay_minor_faults_median`, Linux).
//!
//! The rates are medians over the runs. A replay that mismatches or finds an invariant
//! violation is an error, not a figure.
//!
//! With no FILE the vendored `traces/*.gz` are used: `$REVMAP_TRACES` if set, else the
//! first `traces/` directory holding `*.gz` files found in the current directory or one
//! of its parents, or beside the `revmap` binary or one of its parents (so a binary
//! under `target/` finds the repository's; nothing is baked in at compile time).

use crate::backend::{make_vm, FlavourArg};
use crate::bench::{median, print_rows, Common, Row};
use anyhow::{bail, Context, Result};
use clap::Args;
use revmap_sim::replay::{replay_preparsed, PreparsedTrace, ReplayOptions};
use revmap_trace::TraceReader;
use serde::Serialize;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Capacity of the table pool during the benchmark: enough for every table the
/// vendored traces make in one replay (the resize trace: ~60 MB).
pub const POOL_BYTES: usize = 1 << 30;

/// Arguments of `revmap bench replay`.
#[derive(Debug, Args)]
pub struct ReplayBenchArgs {
    #[command(flatten)]
    common: Common,
    /// Flavours to replay on (repeatable; default: kvm and qemu).
    #[arg(long, value_enum, value_name = "FLAVOUR")]
    flavour: Vec<FlavourArg>,
    /// Fresh-VM replays per trace and flavour (default 10, 2 with --quick).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    runs: Option<u32>,
    /// Trace files (gzip or plain text); default: the vendored traces/*.gz.
    #[arg(value_name = "FILE")]
    files: Vec<PathBuf>,
}

/// One result row.
#[derive(Debug, Serialize)]
struct ReplayRow {
    file: String,
    flavour: String,
    calls: u64,
    runs: u32,
    hcalls_per_s_median: f64,
    ns_per_call_median: f64,
    setup_ms_median: f64,
    replay_minor_faults_median: f64,
    text_bytes: u64,
    parse_mb_per_s: f64,
}

impl Row for ReplayRow {
    const HEADERS: &'static [&'static str] = &[
        "file",
        "flavour",
        "calls",
        "runs",
        "Mcalls/s (median)",
        "ns/call",
        "setup ms",
        "faults",
        "text MB",
        "parse MB/s",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.file.clone(),
            self.flavour.clone(),
            self.calls.to_string(),
            self.runs.to_string(),
            format!("{:.2}", self.hcalls_per_s_median / 1e6),
            format!("{:.1}", self.ns_per_call_median),
            format!("{:.2}", self.setup_ms_median),
            format!("{:.0}", self.replay_minor_faults_median),
            format!("{:.1}", self.text_bytes as f64 / 1e6),
            format!("{:.1}", self.parse_mb_per_s),
        ]
    }
}

/// Whether `dir` holds a `*.gz` file.
fn has_traces(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut it| {
        it.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "gz")))
    })
}

/// The vendored traces directory (module docs).
fn traces_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("REVMAP_TRACES") {
        let d = PathBuf::from(d);
        if has_traces(&d) {
            return Ok(d);
        }
        bail!("REVMAP_TRACES={}: no *.gz trace there", d.display());
    }
    if has_traces(Path::new("traces")) {
        return Ok(PathBuf::from("traces"));
    }
    let starts = [
        std::env::current_dir().ok(),
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf)),
    ];
    for start in starts.iter().flatten() {
        for dir in start.ancestors() {
            let c = dir.join("traces");
            if has_traces(&c) {
                return Ok(c);
            }
        }
    }
    bail!(
        "no FILE given and no traces/ directory with *.gz files in the current directory, \
         beside the revmap binary or in their parents; name trace files or set REVMAP_TRACES"
    )
}

fn default_files() -> Result<Vec<PathBuf>> {
    let dir = traces_dir()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gz"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *.gz trace in {}", dir.display());
    }
    Ok(files)
}

/// The file's text, decompressed if it starts with the gzip magic.
fn read_text(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut text = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut text)
            .with_context(|| format!("decompressing {}", path.display()))?;
        Ok(text)
    } else {
        Ok(raw)
    }
}

/// Minor page faults of this process so far (`minflt` of `/proc/self/stat`; 0 where
/// that is unreadable).
fn minor_faults() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name: state is field 3, minflt 10.
            let rest = s.rsplit_once(')')?.1;
            rest.split_whitespace().nth(7)?.parse().ok()
        })
        .unwrap_or(0)
}

/// Parses `text`; errors already name the file (and line).
fn parse(text: &[u8], name: &str) -> Result<PreparsedTrace> {
    let mut reader = TraceReader::new(text, name);
    Ok(PreparsedTrace::from_reader(&mut reader)?)
}

fn bench_file(
    path: &Path,
    flavours: &[FlavourArg],
    runs: u32,
    quick: bool,
) -> Result<Vec<ReplayRow>> {
    let name = path.display().to_string();
    let text = read_text(path)?;
    let parses = if quick { 1 } else { 3 };
    let mut mbps = Vec::new();
    let mut trace = None;
    for _ in 0..parses {
        let t = Instant::now();
        let parsed = parse(&text, &name)?;
        let secs = t.elapsed().as_secs_f64();
        mbps.push(if secs > 0.0 {
            text.len() as f64 / secs / 1e6
        } else {
            0.0
        });
        trace = Some(parsed);
    }
    let Some(trace) = trace else {
        bail!("{name}: not parsed");
    };
    let parse_mb_per_s = median(&mut mbps);
    let mut rows = Vec::new();
    for &flavour in flavours {
        let (mut rates, mut setups, mut faults) = (Vec::new(), Vec::new(), Vec::new());
        // Run 0 is the untimed warm-up that fills the table pool.
        for run in 0..=runs {
            let t = Instant::now();
            // First the tables the previous run retired (so that nothing scrubs them
            // during the timed loop), then this run's VM and its tables, which are
            // the last memory the set-up touches, as the C reference's fill is.
            revmap_hpt::pool::global().scrub_all();
            let vm = trace
                .make_vm(|spec| make_vm(flavour, spec))
                .with_context(|| format!("{name}: cannot create the VM"))?;
            vm.populate_tables();
            setups.push(t.elapsed().as_secs_f64() * 1e3);
            let faults_before = minor_faults();
            let rep = replay_preparsed(&trace, &vm, &ReplayOptions::default());
            faults.push(minor_faults().saturating_sub(faults_before) as f64);
            if !rep.passed() {
                bail!(
                    "{name} ({flavour}): the replay did not pass ({} mismatched, {} invariant violations)",
                    rep.mismatched,
                    rep.invariant_violations
                );
            }
            if run > 0 {
                rates.push(rep.calls_per_second());
            } else {
                setups.clear();
                faults.clear();
            }
        }
        let rate = median(&mut rates);
        rows.push(ReplayRow {
            file: name.clone(),
            flavour: flavour.to_string(),
            calls: trace.calls(),
            runs,
            hcalls_per_s_median: rate,
            ns_per_call_median: if rate > 0.0 { 1e9 / rate } else { 0.0 },
            setup_ms_median: median(&mut setups),
            replay_minor_faults_median: median(&mut faults),
            text_bytes: text.len() as u64,
            parse_mb_per_s,
        });
    }
    Ok(rows)
}

/// Runs `revmap bench replay`.
pub fn run(args: &ReplayBenchArgs) -> Result<()> {
    let files = if args.files.is_empty() {
        default_files()?
    } else {
        args.files.clone()
    };
    let flavours = if args.flavour.is_empty() {
        vec![FlavourArg::Kvm, FlavourArg::Qemu]
    } else {
        args.flavour.clone()
    };
    let runs = args.runs.unwrap_or(if args.common.quick { 2 } else { 10 });
    revmap_hpt::pool::set_vm_pools_capacity(POOL_BYTES);
    let mut rows = Vec::new();
    for f in &files {
        rows.extend(bench_file(f, &flavours, runs, args.common.quick)?);
    }
    print_rows(
        "pre-parsed trace replay, steady state (fresh VM per run after an untimed warm-up run, \
         HPTs from the table pool, tables populated before the clock starts: setup ms; faults = page faults during the replay; parse = streaming \
         parser on decompressed text)",
        &rows,
        args.common.json,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn read_text_decompresses_gzip_and_passes_plain_text() {
        let dir = std::env::temp_dir().join(format!("revmap-bench-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("t.txt");
        std::fs::write(&plain, b"HPT_ALLOC 18\n").unwrap();
        assert_eq!(read_text(&plain).unwrap(), b"HPT_ALLOC 18\n");
        let gz = dir.join("t.txt.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(b"some text\n").unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        assert_eq!(read_text(&gz).unwrap(), b"some text\n");
        assert!(read_text(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_vendored_traces_are_found() {
        let files = default_files().unwrap();
        assert!(
            files.iter().any(|f| f.ends_with("boot.txt.gz")),
            "{files:?}"
        );
    }

    #[test]
    fn a_text_without_hpt_alloc_is_an_error() {
        assert!(parse(b"", "empty").is_err());
    }
}
