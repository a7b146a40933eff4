//! `revmap bench nested`: the nested MMU's costs, on [`revmap_nested::fixture`].
//!
//! * `fault`: ns per nested page fault (L1's table walked, L0's table for L1 made sure
//!   of, shadow PTE and nested rmap entry inserted), first loads of every L2 page of a
//!   fresh VM (set up untimed).
//! * `translate`: `shadow_ns` (the shadow table's leaf for an L2 address) and
//!   `walk_2d_ns` (L1's table walked with every entry read through L0's table for L1,
//!   and the result translated by it, as QEMU must without a shadow table), same run.
//! * `unmap`: a host unmap of all of L1's data pages, ns per shadow PTE removed through
//!   the nested rmap (the VM faulted back in, untimed, between runs).
//! * `memory`: the nested rmap's high-water bytes per entry against KVM's 16-byte
//!   `rmap_nested` node.
//!
//! `--quick` shrinks the VM and repetitions only.

use crate::bench::{median_secs, median_secs_fresh, ns_per_op, print_rows, Common, MmuRow};
use anyhow::{bail, Result};
use clap::Args;
use revmap_nested::fixture::{NestedFixture, LPID, PAGE};
use std::hint::black_box;

/// Arguments of `revmap bench nested`.
#[derive(Debug, Args)]
pub struct NestedArgs {
    #[command(flatten)]
    common: Common,
}

fn nested_rows(quick: bool) -> Result<Vec<MmuRow>> {
    let (pages, runs) = if quick { (1024, 3) } else { (16 * 1024, 7) };
    let mut rows = Vec::new();

    let mut done = 0;
    let s = median_secs_fresh(
        runs,
        || Ok(NestedFixture::new(pages)?),
        |f| {
            done = f.touch_all();
            Ok(())
        },
    )?;
    if done != pages {
        bail!("{done} of {pages} L2 loads completed");
    }
    rows.push(MmuRow::timed(
        "fault",
        "64 KiB L2 loads, fresh VM",
        pages,
        "fault",
        s,
        None,
    ));

    let tp = 512;
    let f = NestedFixture::new(tp)?;
    if f.touch_all() != tp {
        bail!("translate fixture: not every L2 page completed");
    }
    let lpid = LPID as u16;
    for k in [0, tp - 1] {
        let (Some(s), Some((l1, _))) = (f.vm.shadow_leaf(lpid, k * PAGE), f.walk_2d(k * PAGE))
        else {
            bail!("L2 page {k}: no shadow leaf or no two-level translation");
        };
        black_box((s, l1));
    }
    let (batches, per) = if quick { (5, 20_000) } else { (15, 200_000) };
    let mut i = 0u64;
    let shadow_ns = ns_per_op(batches, per, || {
        i = (i + 1) % tp;
        black_box(f.vm.shadow_leaf(lpid, black_box(i * PAGE)));
    });
    let walk_2d_ns = ns_per_op(batches, per, || {
        i = (i + 1) % tp;
        black_box(f.walk_2d(black_box(i * PAGE)));
    });
    rows.push(MmuRow::translate(
        "L2 address, 64 KiB pages",
        shadow_ns,
        walk_2d_ns,
    ));

    let mut f = NestedFixture::new(pages)?;
    let mut removed = Vec::new();
    let s = median_secs(
        runs,
        &mut f,
        |f| {
            f.touch_all();
            Ok(())
        },
        |f| {
            let before = f.vm.counters().rmap_invalidations;
            black_box(f.host_unmap_all());
            removed.push(f.vm.counters().rmap_invalidations - before);
            Ok(())
        },
    )?;
    let n = removed.iter().copied().min().unwrap_or(0);
    if n < pages {
        bail!("host unmap removed {n} shadow PTEs of {pages}");
    }
    rows.push(MmuRow::timed(
        "unmap",
        format!("host unmap of {} MiB of L1", (pages * PAGE) >> 20),
        n,
        "entry",
        s,
        None,
    ));

    f.touch_all();
    let (entries, _words) = f.vm.rmap_totals();
    let bytes = f.vm.counters().rmap_bytes_max;
    if entries == 0 {
        bail!("no nested rmap entries after faulting every page");
    }
    rows.push(MmuRow::new(
        "memory",
        "nested rmap, 1 entry per L1 page",
        entries,
        "entry",
        bytes as f64 / entries as f64,
        Some((16.0, "KVM node")),
    ));
    Ok(rows)
}

/// Runs `revmap bench nested`.
pub fn run(a: &NestedArgs) -> Result<()> {
    let rows = nested_rows(a.common.quick)?;
    print_rows("nested MMU", &rows, a.common.json)
}
