//! `revmap bench host`: host-side costs against the memory-bandwidth limit.
//!
//! * `unmap_gfn_range` of a fully mapped 1 GiB slot, one HPTE per 4 KiB frame and per
//!   64 KiB page: ns per HPTE (the slot is faulted back in, untimed, between runs).
//! * Dirty-log harvest (KVM_GET_DIRTY_LOG) of a 16 GiB slot with 0, 1 and 4 clean
//!   mappings per frame and 1 dirty mapping per frame: ns per frame, and the ratio to a
//!   raw sequential scan of a written `u64` array as long as the rmap array (written so
//!   its pages are real memory, not the shared zero page).
//!
//! `--quick` uses a 16 MiB unmap slot and a 64 MiB dirty-log slot. Every figure is the
//! median over runs; each harvest is checked against the expected dirty count.

use crate::bench::{median, print_rows, Common, Row};
use anyhow::{bail, Result};
use clap::Args;
use revmap_testkit::host::{raw_scan, DirtyFixture, UnmapFixture};
use serde::Serialize;
use std::hint::black_box;
use std::time::Instant;

/// Arguments of `revmap bench host`.
#[derive(Debug, Args)]
pub struct HostArgs {
    #[command(flatten)]
    common: Common,
}

/// One result row.
#[derive(Debug, Serialize)]
struct HostRow {
    op: &'static str,
    case: String,
    slot_bytes: u64,
    /// Units the per-unit figure divides by (HPTEs unmapped, frames, words).
    units: u64,
    unit: &'static str,
    ms_median: f64,
    ns_per_unit: f64,
    /// `ns_per_unit` over the raw scan's ns per word (dirty-log rows only).
    ratio_to_raw_scan: Option<f64>,
}

impl Row for HostRow {
    const HEADERS: &'static [&'static str] = &[
        "op",
        "case",
        "slot",
        "units",
        "ms (median)",
        "ns/unit",
        "x raw scan",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.op.to_owned(),
            self.case.clone(),
            format!("{} MiB", self.slot_bytes >> 20),
            format!("{} {}s", self.units, self.unit),
            format!("{:.3}", self.ms_median),
            format!("{:.2}", self.ns_per_unit),
            self.ratio_to_raw_scan
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.1}")),
        ]
    }
}

/// Median seconds of `runs` calls of `timed`, each preceded by an untimed `setup`.
fn median_secs(
    runs: u32,
    mut setup: impl FnMut(),
    mut timed: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let mut v = Vec::new();
    for _ in 0..runs {
        setup();
        let t = Instant::now();
        timed()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(&mut v))
}

fn row(
    op: &'static str,
    case: String,
    slot_bytes: u64,
    units: u64,
    unit: &'static str,
    secs: f64,
) -> HostRow {
    HostRow {
        op,
        case,
        slot_bytes,
        units,
        unit,
        ms_median: secs * 1e3,
        ns_per_unit: secs * 1e9 / units.max(1) as f64,
        ratio_to_raw_scan: None,
    }
}

fn unmap_rows(slot: u64, runs: u32) -> Result<Vec<HostRow>> {
    let mut rows = Vec::new();
    for shift in [12u32, 16] {
        let fx = UnmapFixture::new(slot, shift)?;
        let n = fx.mappings();
        let mut first = true;
        let secs = median_secs(
            runs,
            || {
                if !std::mem::take(&mut first) {
                    fx.map_all();
                }
            },
            || {
                let got = black_box(fx.unmap_all());
                if got != n {
                    bail!("unmap_gfn_range unmapped {got} of {n} HPTEs");
                }
                Ok(())
            },
        )?;
        rows.push(row(
            "unmap_gfn_range",
            format!("{}K HPTEs", 1u32 << (shift - 10)),
            slot,
            n,
            "hpte",
            secs,
        ));
    }
    Ok(rows)
}

fn dirty_rows(slot: u64, runs: u32) -> Result<Vec<HostRow>> {
    let frames = slot >> 12;
    // Written, not `vec![0; n]`: untouched zeroed pages all map the shared zero page.
    let words: Vec<u64> = (0..frames).collect();
    let raw = median_secs(
        runs.max(5),
        || {},
        || {
            black_box(raw_scan(black_box(&words)));
            Ok(())
        },
    )?;
    drop(words);
    let raw_row = row(
        "raw_scan",
        "written u64 array".into(),
        slot,
        frames,
        "word",
        raw,
    );
    let raw_ns = raw_row.ns_per_unit;
    let mut rows = vec![raw_row];
    for per_frame in [0u64, 1, 4] {
        let fx = DirtyFixture::new(slot, per_frame)?;
        let mut cases = vec![(false, 0)];
        if per_frame == 1 {
            cases.push((true, frames));
        }
        for (dirty, want) in cases {
            let secs = median_secs(
                runs,
                || {
                    if dirty {
                        fx.dirty_all();
                    }
                },
                || {
                    let got = black_box(fx.harvest()?);
                    if got != want {
                        bail!("dirty-log harvest found {got} dirty frames, expected {want}");
                    }
                    Ok(())
                },
            )?;
            let mut r = row(
                "dirty_log_harvest",
                format!(
                    "{per_frame} {} mapping(s)/frame",
                    if dirty { "dirty" } else { "clean" }
                ),
                slot,
                frames,
                "frame",
                secs,
            );
            r.ratio_to_raw_scan = (raw_ns > 0.0).then(|| r.ns_per_unit / raw_ns);
            rows.push(r);
        }
    }
    Ok(rows)
}

/// Runs `revmap bench host`.
pub fn run(args: &HostArgs) -> Result<()> {
    let (unmap_slot, dirty_slot, runs) = if args.common.quick {
        (16 << 20, 64 << 20, 3)
    } else {
        (1 << 30, 16 << 30, 5)
    };
    let mut rows = unmap_rows(unmap_slot, runs)?;
    rows.extend(dirty_rows(dirty_slot, runs)?);
    print_rows(
        "host side (median of runs; raw scan = sequential read of a written u64 array)",
        &rows,
        args.common.json,
    )
}
