//! Parses the vendored real traces and checks the per-hcall counts the README states.

use revmap_trace::{HcallKind, Record, TraceReader};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn trace(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../traces")
        .join(name)
}

type Counts = (
    BTreeMap<HcallKind, u64>,
    BTreeMap<(HcallKind, i64), u64>,
    u64,
);

fn counts(name: &str) -> Counts {
    let mut by_kind = BTreeMap::new();
    let mut by_ret = BTreeMap::new();
    let mut other = 0;
    for r in TraceReader::open(trace(name)).unwrap() {
        match r.unwrap() {
            Record::Hcall(h) => {
                *by_kind.entry(h.kind).or_insert(0) += 1;
                *by_ret.entry((h.kind, h.expected.ret)).or_insert(0) += 1;
            }
            _ => other += 1,
        }
    }
    (by_kind, by_ret, other)
}

#[test]
fn boot_counts_match_readme() {
    let (k, r, other) = counts("boot.txt.gz");
    assert_eq!(k[&HcallKind::Enter], 50_903);
    assert_eq!(k[&HcallKind::Remove], 34_078);
    assert_eq!(k[&HcallKind::BulkRemove], 101);
    assert_eq!(k[&HcallKind::Protect], 655);
    assert_eq!(r[&(HcallKind::Protect, -7)], 40);
    assert_eq!(k[&HcallKind::Read], 590);
    assert_eq!(k.values().sum::<u64>() + other, 86_327 + 1);
    assert_eq!(other, 1); // HPT_ALLOC
}

#[test]
fn resize_counts_match_readme() {
    let (k, r, other) = counts("resize.txt.gz");
    assert_eq!(k[&HcallKind::Enter], 231_293);
    assert_eq!(k[&HcallKind::Remove], 85_936);
    assert_eq!(r[&(HcallKind::Remove, -7)], 290);
    assert_eq!(k[&HcallKind::BulkRemove], 36_820);
    assert_eq!(k[&HcallKind::Protect], 19_282);
    assert_eq!(r[&(HcallKind::Protect, -7)], 11_060);
    assert_eq!(k[&HcallKind::Read], 590);
    assert_eq!(k[&HcallKind::ResizePrepare], 13);
    assert_eq!(r[&(HcallKind::ResizePrepare, 9902)], 6);
    assert_eq!(r[&(HcallKind::ResizePrepare, -16)], 1);
    assert_eq!(k[&HcallKind::ResizeCommit], 6);
    assert_eq!(r[&(HcallKind::ResizeCommit, -6)], 3);
    assert_eq!(other, 1 + 3); // HPT_ALLOC + 3 HPT_SHIFT
}
