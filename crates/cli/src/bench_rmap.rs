//! `revmap bench rmap`: the three reverse maps against the baselines of
//! `revmap_rmap::baseline`, on the same operation sequence.
//!
//! Fixture (per design and chain length n): 64 frames; frame 0 holds n entries (n - 1
//! for the pair), every other frame one; HPTE slots = the next power of two at or above
//! twice the entries (an HPT half full). Operations on frame 0:
//!
//! * `link_unlink`: link one more entry at the tail and unlink it again (one H_ENTER +
//!   one H_REMOVE worth of rmap work). The nested rmap has no single-entry removal (KVM
//!   only frees whole lists), so it has no pair row.
//! * `iterate`: visit the n entries under the lock, summing them.
//! * `count`: number of entries.
//!
//! `bytes_per_entry` is the memory the design holds for the fixture with n entries on
//! frame 0, divided by all its entries (n + 63).
//!
//! Invariants: every design sees the same entries in the same order; a design that
//! disagrees with the expected count or sum is an error, not a figure.

use crate::bench::{ns_per_op, print_rows, Common, Row};
use anyhow::{anyhow, bail, Result};
use clap::Args;
use revmap_rmap::baseline::{BaselineRmap, MutexHashMap, RingRmap, SlabList, SmallVecFrames};
use revmap_rmap::nested::{check_nested_rmaps, NestedLimits};
use revmap_rmap::pte_list::{check_pte_lists, DescCache, DescPool, PteListHead, SpteHandle};
use revmap_rmap::{Gpa, Lpid, NestedCache, NestedPool, NestedRmap, NestedRmapEntry};
use serde::Serialize;
use std::cell::RefCell;
use std::hint::black_box;

/// Arguments of `revmap bench rmap`.
#[derive(Debug, Args)]
pub struct RmapArgs {
    #[command(flatten)]
    common: Common,
}

const FRAMES: u64 = 64;
const LENGTHS: [u32; 5] = [1, 2, 14, 100, 1000];

/// One reverse map under test (the entries of a frame are small integers).
trait Design {
    fn link(&self, gfn: u64, e: u32) -> Result<()>;
    /// `None` if the design has no single-entry removal.
    fn unlink(&self, gfn: u64, e: u32) -> Option<Result<bool>>;
    fn count(&self, gfn: u64) -> Result<usize>;
    fn sum(&self, gfn: u64) -> Result<u64>;
    fn bytes(&self) -> Result<usize>;
}

/// A `BaselineRmap` (the ring or a baseline) as a [`Design`].
struct Base<M>(M);

impl<M: BaselineRmap> Design for Base<M> {
    #[inline]
    fn link(&self, gfn: u64, e: u32) -> Result<()> {
        Ok(self.0.link(gfn, e)?)
    }
    #[inline]
    fn unlink(&self, gfn: u64, e: u32) -> Option<Result<bool>> {
        Some(self.0.unlink(gfn, e).map_err(Into::into))
    }
    #[inline]
    fn count(&self, gfn: u64) -> Result<usize> {
        Ok(self.0.count(gfn)?)
    }
    #[inline]
    fn sum(&self, gfn: u64) -> Result<u64> {
        Ok(self.0.sum(gfn)?)
    }
    fn bytes(&self) -> Result<usize> {
        Ok(self.0.bytes())
    }
}

/// The x86 pte_list; entry `e` is the SPTE handle `(e + 1) * 8`.
struct PteList<'p> {
    pool: &'p DescPool,
    /// The vCPU's descriptor cache, kept across operations as KVM's is.
    cache: RefCell<DescCache<'p>>,
    heads: Box<[PteListHead]>,
}

impl PteList<'_> {
    fn head(&self, gfn: u64) -> Result<&PteListHead> {
        self.heads
            .get(gfn as usize)
            .ok_or_else(|| anyhow!("frame {gfn} out of range"))
    }
}

fn spte(e: u32) -> Result<SpteHandle> {
    Ok(SpteHandle::new((u64::from(e) + 1) * SpteHandle::ALIGN)?)
}

impl Design for PteList<'_> {
    #[inline]
    fn link(&self, gfn: u64, e: u32) -> Result<()> {
        // KVM's order: top up the per-vCPU cache, then lock and add.
        let mut c = self.cache.borrow_mut();
        c.reserve(1)?;
        self.head(gfn)?.lock().add(&mut c, spte(e)?)?;
        Ok(())
    }
    #[inline]
    fn unlink(&self, gfn: u64, e: u32) -> Option<Result<bool>> {
        Some((|| {
            self.head(gfn)?.lock().remove(self.pool, spte(e)?)?;
            Ok(true)
        })())
    }
    #[inline]
    fn count(&self, gfn: u64) -> Result<usize> {
        Ok(self.head(gfn)?.lock_readonly().count(self.pool)?)
    }
    #[inline]
    fn sum(&self, gfn: u64) -> Result<u64> {
        let g = self.head(gfn)?.lock_readonly();
        Ok(g.iter(self.pool).map(|s| s.raw() / 8 - 1).sum())
    }
    fn bytes(&self) -> Result<usize> {
        let st = check_pte_lists(&self.heads, self.pool)?;
        Ok(self.heads.len() * 8 + st.descs as usize * 128)
    }
}

/// The nested-guest rmap; entry `e` is (LPID 1, GPA `e` pages).
struct Nested<'p> {
    pool: &'p NestedPool,
    cache: RefCell<NestedCache<'p>>,
    words: Box<[NestedRmap]>,
    limits: NestedLimits,
}

impl Nested<'_> {
    fn word(&self, gfn: u64) -> Result<&NestedRmap> {
        self.words
            .get(gfn as usize)
            .ok_or_else(|| anyhow!("frame {gfn} out of range"))
    }
}

fn nested_entry(e: u32) -> Result<NestedRmapEntry> {
    Ok(NestedRmapEntry::new(Lpid(1), Gpa(u64::from(e) << 12))?)
}

impl Design for Nested<'_> {
    #[inline]
    fn link(&self, gfn: u64, e: u32) -> Result<()> {
        let mut c = self.cache.borrow_mut();
        c.reserve(1)?;
        self.word(gfn)?
            .lock()
            .insert(&mut c, nested_entry(e)?, &self.limits, |_| true)?;
        Ok(())
    }
    fn unlink(&self, _gfn: u64, _e: u32) -> Option<Result<bool>> {
        None
    }
    #[inline]
    fn count(&self, gfn: u64) -> Result<usize> {
        Ok(self.word(gfn)?.lock().len(self.pool))
    }
    #[inline]
    fn sum(&self, gfn: u64) -> Result<u64> {
        let mut s = 0;
        self.word(gfn)?
            .lock()
            .update_all(self.pool, |e| s += e.gpa().raw() >> 12);
        Ok(s)
    }
    fn bytes(&self) -> Result<usize> {
        Ok(check_nested_rmaps(&self.words, self.pool, &self.limits)?.bytes() as usize)
    }
}

const NAMES: [&str; 6] = [
    "ring",
    "pte_list",
    "nested",
    "mutex_hashmap",
    "slab_list",
    "smallvec_frames",
];

/// Runs `f` on a fresh, empty design `name` for `npte` HPTE slots.
fn with_design<T>(name: &str, npte: usize, f: impl FnOnce(&dyn Design) -> Result<T>) -> Result<T> {
    let frames = FRAMES as usize;
    match name {
        "ring" => f(&Base(RingRmap::new(frames, npte)?)),
        "mutex_hashmap" => f(&Base(MutexHashMap::new(frames, npte)?)),
        "slab_list" => f(&Base(SlabList::new(frames, npte)?)),
        "smallvec_frames" => f(&Base(SmallVecFrames::new(frames, npte)?)),
        "pte_list" => {
            let pool = DescPool::new();
            let d = PteList {
                pool: &pool,
                cache: RefCell::new(DescCache::new(&pool)),
                heads: PteListHead::new_array(frames)?,
            };
            f(&d)
        }
        "nested" => {
            let pool = NestedPool::new();
            let d = Nested {
                pool: &pool,
                cache: RefCell::new(NestedCache::new(&pool)),
                words: NestedRmap::new_array(frames)?,
                limits: NestedLimits::new(usize::MAX)?,
            };
            f(&d)
        }
        other => bail!("unknown design {other}"),
    }
}

/// `members` entries (0..members) on frame 0, entry `members + f` on each frame f > 0.
fn populate(d: &dyn Design, members: u32) -> Result<()> {
    for e in 0..members {
        d.link(0, e)?;
    }
    for f in 1..FRAMES {
        d.link(f, members + f as u32)?;
    }
    Ok(())
}

fn npte_for(n: u32) -> usize {
    (2 * (n as usize + FRAMES as usize)).next_power_of_two()
}

/// One result row.
#[derive(Debug, Serialize)]
struct RmapRow {
    design: &'static str,
    baseline: bool,
    op: &'static str,
    chain_len: u32,
    ns_per_op: f64,
    bytes_per_entry: f64,
}

impl Row for RmapRow {
    const HEADERS: &'static [&'static str] =
        &["design", "op", "chain_len", "ns_per_op", "bytes_per_entry"];
    fn cells(&self) -> Vec<String> {
        vec![
            if self.baseline {
                format!("{} (baseline)", self.design)
            } else {
                self.design.to_owned()
            },
            self.op.to_owned(),
            self.chain_len.to_string(),
            format!("{:.1}", self.ns_per_op),
            format!("{:.1}", self.bytes_per_entry),
        ]
    }
}

fn measure(name: &'static str, n: u32, quick: bool) -> Result<Vec<RmapRow>> {
    let (batches, budget) = if quick { (3, 2_000u64) } else { (15, 200_000) };
    let npte = npte_for(n);
    let extra = (npte - 1) as u32;
    let row = |op, ns, bpe| RmapRow {
        design: name,
        baseline: NAMES[3..].contains(&name),
        op,
        chain_len: n,
        ns_per_op: ns,
        bytes_per_entry: bpe,
    };
    let bytes_per_entry = with_design(name, npte, |d| {
        populate(d, n)?;
        Ok(d.bytes()? as f64 / f64::from(n + FRAMES as u32 - 1))
    })?;
    let mut rows = Vec::new();
    // The pair: n - 1 members, link and unlink one more.
    let pair = with_design(name, npte, |d| {
        populate(d, n - 1)?;
        if d.unlink(0, extra).is_none() {
            return Ok(None);
        }
        let mut err = None;
        let ns = ns_per_op(batches, budget / 8, || {
            let r = d.link(black_box(0), black_box(extra)).and_then(|()| {
                d.unlink(black_box(0), black_box(extra))
                    .unwrap_or(Ok(false))
            });
            if let Err(e) = r {
                err.get_or_insert(e);
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        if d.count(0)? != n as usize - 1 {
            bail!("{name}: the link/unlink pair changed the chain length");
        }
        Ok(Some(ns))
    })?;
    if let Some(ns) = pair {
        rows.push(row("link_unlink", ns, bytes_per_entry));
    }
    with_design(name, npte, |d| {
        populate(d, n)?;
        let want = u64::from(n) * u64::from(n - 1) / 2;
        if d.sum(0)? != want || d.count(0)? != n as usize {
            bail!("{name}: wrong contents after populating {n} entries");
        }
        let per_batch = (budget / u64::from(n)).max(4);
        let mut bad = false;
        let ns = ns_per_op(batches, per_batch, || {
            bad |= d.sum(black_box(0)).map_or(true, |s| black_box(s) != want);
        });
        rows.push(row("iterate", ns, bytes_per_entry));
        let ns = ns_per_op(batches, per_batch, || {
            bad |= d
                .count(black_box(0))
                .map_or(true, |c| black_box(c) != n as usize);
        });
        rows.push(row("count", ns, bytes_per_entry));
        if bad {
            bail!("{name}: a timed iterate or count returned a wrong result");
        }
        Ok(())
    })?;
    Ok(rows)
}

/// Runs `revmap bench rmap`.
pub fn run(args: &RmapArgs) -> Result<()> {
    let mut rows = Vec::new();
    for name in NAMES {
        for n in LENGTHS {
            rows.extend(measure(name, n, args.common.quick)?);
        }
    }
    rows.sort_by_key(|r| (r.op, r.chain_len));
    print_rows(
        "rmap structures vs baselines (ns per op, median of timed batches; frame 0 of 64)",
        &rows,
        args.common.json,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_design_holds_the_same_entries() {
        for name in NAMES {
            with_design(name, npte_for(14), |d| {
                populate(d, 14)?;
                assert_eq!(d.count(0)?, 14, "{name}");
                assert_eq!(d.sum(0)?, 91, "{name}");
                assert_eq!(d.count(5)?, 1, "{name}");
                assert!(d.bytes()? > 0, "{name}");
                Ok(())
            })
            .unwrap();
        }
    }

    #[test]
    fn quick_measure_gives_rows() {
        let rows = measure("pte_list", 2, true).unwrap();
        assert_eq!(rows.len(), 3);
        let rows = measure("nested", 2, true).unwrap();
        assert_eq!(rows.len(), 2);
    }
}
