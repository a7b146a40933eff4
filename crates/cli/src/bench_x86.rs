//! `revmap bench x86`: the x86 shadow MMU's costs, on [`revmap_shadow::fixture`] (the
//! guest and MMU `benches/shadow.rs` also measures).
//!
//! * `fault`: ns per shadow page fault (guest walk, shadow pages, SPTE, `rmap_add`),
//!   first faults of every page of a fresh MMU (set up untimed).
//! * `translate`: `shadow_ns` (the shadow table) and `walk_2d_ns` (guest tables plus a
//!   memslot lookup per level), same guest, same run.
//! * `write_protect` (dirty logging, `kvm_mmu_slot_remove_write_access`), `unmap`
//!   (`kvm_unmap_gfn_range`) and `age` (`kvm_age_gfn`) of a fully mapped slot: ns per
//!   SPTE against a raw scan of as many words; plus write-protecting an empty 16 GiB
//!   slot against a raw scan of its rmap heads (one word per gfn per level).
//! * `memory`: bytes per shadow page and per rmap entry against KVM's (a 4 KiB table
//!   plus a 4 KiB translation array, header not counted; 8 B heads, 128-byte
//!   descriptors of 14 entries).
//!
//! `--quick` shrinks the slots and repetitions only.

use crate::bench::{median_secs, median_secs_fresh, ns_per_op, print_rows, Common, MmuRow};
use anyhow::{bail, Result};
use clap::Args;
use revmap_rmap::pte_list::{PteListDesc, PteListHead, PTE_LIST_EXT};
use revmap_shadow::fixture::{ShadowFixture, TwoD, DATA_GFN, SLOT};
use revmap_shadow::mmu::{ShadowMmu, ShadowPage};
use revmap_shadow::paging::{walk, Access, Gva};
use revmap_testkit::host::raw_scan;
use std::hint::black_box;

/// Arguments of `revmap bench x86`.
#[derive(Debug, Args)]
pub struct X86Args {
    #[command(flatten)]
    common: Common,
}

/// ns per word of a raw sequential scan of `words` words (median of `runs`).
pub fn raw_scan_ns(words: u64, runs: u32) -> Result<f64> {
    // Written, so that its pages are real memory and not the shared zero page.
    let v: Vec<u64> = (0..words).collect();
    let s = median_secs(
        runs,
        &mut (),
        |_| Ok(()),
        |_| {
            black_box(raw_scan(black_box(&v)));
            Ok(())
        },
    )?;
    Ok(s * 1e9 / words.max(1) as f64)
}

fn x86_rows(quick: bool) -> Result<Vec<MmuRow>> {
    let (pages, runs) = if quick { (4096, 3) } else { (1 << 16, 7) };
    let mut rows = Vec::new();

    // The fault path: first faults of every page of a fresh MMU.
    let s = median_secs_fresh(
        runs,
        || Ok(ShadowFixture::new(pages)?),
        |f| {
            f.touch_all(Access::empty())?;
            Ok(())
        },
    )?;
    rows.push(MmuRow::timed(
        "fault",
        "4 KiB read faults, fresh MMU",
        pages,
        "fault",
        s,
        None,
    ));

    // Translation: shadow table against the two-dimensional walk, same run.
    let tp = 512;
    let mut f = ShadowFixture::new(tp)?;
    f.touch_all(Access::empty())?;
    let (batches, per) = if quick { (5, 20_000) } else { (15, 200_000) };
    let mut i = 0u64;
    let mut err = None;
    let shadow_ns = ns_per_op(batches, per, || {
        i = (i + 1) % tp;
        match f.mmu.translate(f.vcpu, black_box(i << 12), Access::empty()) {
            Ok(Some(g)) => {
                black_box(g);
            }
            r => err = Some(format!("translate of {:#x}: {r:?}", i << 12)),
        }
    });
    let (slots, mut mem, mode) = ShadowFixture::two_d(tp)?;
    let walk_2d_ns = ns_per_op(batches, per, || {
        i = (i + 1) % tp;
        let mut t = TwoD {
            slots: &slots,
            mem: &mut mem,
        };
        black_box(walk(&mut t, black_box(&mode), Gva(i << 12), Access::empty()).map(|w| w.outcome))
            .ok();
    });
    if let Some(e) = err {
        bail!("{e}");
    }
    rows.push(MmuRow::translate(
        "4-level, 4 KiB pages",
        shadow_ns,
        walk_2d_ns,
    ));

    // Host-side walkers over a fully mapped slot (writable SPTEs, faulted untimed).
    let raw = raw_scan_ns(pages, runs)?;
    let mut f = ShadowFixture::new(pages)?;
    f.touch_all(Access::WRITE)?;
    let s = median_secs(
        runs,
        &mut f,
        |f| {
            f.touch_all(Access::WRITE)?;
            Ok(())
        },
        |f| {
            if !f.mmu.slot_remove_write_access(SLOT)? {
                bail!("write-protect of a mapped slot found nothing writable");
            }
            Ok(())
        },
    )?;
    let per_spte =
        |bench, case, n, s| MmuRow::timed(bench, case, n, "SPTE", s, Some((raw, "raw scan")));
    rows.push(per_spte(
        "write_protect",
        format!("dirty log, {} MiB slot mapped", pages >> 8),
        pages,
        s,
    ));
    let mut unmapped = 0;
    let s = median_secs(
        runs,
        &mut f,
        |f| {
            f.touch_all(Access::empty())?;
            Ok(())
        },
        |f| {
            unmapped = f.mmu.unmap_gfn_range(SLOT, DATA_GFN, DATA_GFN + pages)?;
            Ok(())
        },
    )?;
    if unmapped < pages {
        bail!("unmap removed {unmapped} SPTEs of {pages}");
    }
    rows.push(per_spte(
        "unmap",
        format!("{} MiB slot mapped", pages >> 8),
        unmapped,
        s,
    ));
    f.touch_all(Access::empty())?;
    let s = median_secs(
        runs,
        &mut f,
        |_| Ok(()),
        |f| {
            black_box(f.mmu.age_gfn(SLOT, DATA_GFN, DATA_GFN + pages));
            Ok(())
        },
    )?;
    rows.push(per_spte(
        "age",
        format!("{} MiB slot mapped", pages >> 8),
        pages,
        s,
    ));

    // Write-protecting an empty slot against a raw scan of its rmap heads.
    let big = if quick { 1u64 << 18 } else { 1u64 << 22 };
    let heads = big + big / 512 + big / (512 * 512);
    let mut m = ShadowMmu::new();
    m.add_memslot(revmap_shadow::fixture::slot(big - DATA_GFN)?)?;
    let s = median_secs(
        runs,
        &mut m,
        |_| Ok(()),
        |m| {
            black_box(m.slot_remove_write_access(SLOT)?);
            Ok(())
        },
    )?;
    let raw_heads = raw_scan_ns(heads, runs)?;
    rows.push(MmuRow::timed(
        "write_protect",
        format!("dirty log, empty {} GiB slot", big >> 18),
        heads,
        "rmap head",
        s,
        Some((raw_heads, "raw scan")),
    ));

    // Memory.
    let sp = std::mem::size_of::<ShadowPage>() as f64 + 2.0 * 4096.0;
    rows.push(MmuRow::new(
        "memory",
        "shadow page (ours: header + table + translations)",
        1,
        "shadow page",
        sp,
        Some((8192.0, "KVM w/o header")),
    ));
    let head = std::mem::size_of::<PteListHead>() as f64;
    rows.push(MmuRow::new(
        "memory",
        "rmap head (per gfn per level)",
        1,
        "entry",
        head,
        Some((8.0, "KVM")),
    ));
    let desc = std::mem::size_of::<PteListDesc>() as f64 / PTE_LIST_EXT as f64;
    rows.push(MmuRow::new(
        "memory",
        "rmap extra entry, full descriptors",
        1,
        "entry",
        desc,
        Some((128.0 / 14.0, "KVM")),
    ));
    Ok(rows)
}

/// Runs `revmap bench x86`.
pub fn run(a: &X86Args) -> Result<()> {
    let rows = x86_rows(a.common.quick)?;
    print_rows("x86 shadow MMU", &rows, a.common.json)
}
