//! Parses both vendored nested traces whole and checks every count of their README
//! (`traces/nested/README.md`, "Per-trace counts"): records by type, hypercall return
//! codes, L2_ACCESS outcomes by cause, must-set sizes and nested-rmap pressure.

use revmap_trace::nested::{AccessOutcome, NestedReader, NestedRecord};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

fn trace(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../traces/nested")
        .join(name)
}

/// Cause names, highest bit first (the README's spelling).
const CAUSES: [(u64, &str); 7] = [
    (0x4000_0000, "NOHPTE"),
    (0x1000_0000, "NOEXEC"),
    (0x0800_0000, "PROTFAULT"),
    (0x0200_0000, "ISSTORE"),
    (0x0008_0000, "UNSUPP_MMU"),
    (0x0004_0000, "SET_RC"),
    (0x0002_0000, "PRTABLE_FAULT"),
];

fn cause_name(cause: u64) -> String {
    let known: u64 = CAUSES.iter().map(|c| c.0).sum();
    assert_eq!(cause & !known, 0, "unknown cause bits {cause:#x}");
    CAUSES
        .iter()
        .filter(|c| cause & c.0 != 0)
        .map(|c| c.1)
        .collect::<Vec<_>>()
        .join("+")
}

#[derive(Default, Debug)]
struct Counts {
    total: u64,
    by_type: BTreeMap<&'static str, u64>,
    outcomes: BTreeMap<String, u64>,
    young_sum: u64,
    dirty_sum: u64,
    max_pairs: usize,
    lpids_in_max: usize,
}

fn counts(name: &str) -> Counts {
    let mut c = Counts::default();
    let r = NestedReader::open(trace(name)).unwrap();
    c.total = 2; // the header
    let mut pairs: HashMap<u64, BTreeSet<(u64, u64)>> = HashMap::new();
    let mut first_seen: Vec<u64> = Vec::new();
    for rec in r {
        let rec = rec.unwrap();
        c.total += 1;
        *c.by_type.entry(rec.name()).or_default() += 1;
        let key = match &rec {
            NestedRecord::SetPartitionTable { ret, .. } => {
                format!("H_SET_PARTITION_TABLE ret={ret}")
            }
            NestedRecord::TlbInvalidate { ret, .. } => format!("H_TLB_INVALIDATE ret={ret}"),
            NestedRecord::L2Access {
                lpid,
                gpa,
                acc,
                outcome,
                ..
            } => match *outcome {
                AccessOutcome::Ok { l1gpa } => {
                    let set = pairs.entry(l1gpa >> 16).or_insert_with(|| {
                        first_seen.push(l1gpa >> 16);
                        BTreeSet::new()
                    });
                    set.insert((*lpid, gpa >> 16));
                    format!("ok acc={}", acc.letter())
                }
                AccessOutcome::Mmio { .. } => format!("mmio acc={}", acc.letter()),
                AccessOutcome::Hdsi { cause, .. } => format!("hdsi {}", cause_name(cause)),
                AccessOutcome::Hisi { cause, .. } => format!("hisi {}", cause_name(cause)),
                AccessOutcome::Ret(r) => format!("enter ret={r}"),
            },
            NestedRecord::HostAge { young_must, .. } => {
                c.young_sum += young_must.gfn_count();
                continue;
            }
            NestedRecord::HostDirtyLog { dirty_must, .. } => {
                c.dirty_sum += dirty_must.gfn_count();
                continue;
            }
            _ => continue,
        };
        *c.outcomes.entry(key).or_default() += 1;
    }
    // The README names the first gfn (in trace order) that reaches the maximum.
    c.max_pairs = pairs.values().map(BTreeSet::len).max().unwrap_or(0);
    if let Some(g) = first_seen.iter().find(|g| pairs[g].len() == c.max_pairs) {
        c.lpids_in_max = pairs[g].iter().map(|p| p.0).collect::<BTreeSet<_>>().len();
    }
    c
}

fn map<const N: usize>(rows: [(&str, u64); N]) -> BTreeMap<String, u64> {
    rows.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

#[test]
fn small_counts_match_readme() {
    let c = counts("nested-small.txt.gz");
    assert_eq!(c.total, 5001);
    let want: BTreeMap<&str, u64> = [
        ("L1_STORE", 1423),
        ("H_SET_PARTITION_TABLE", 26),
        ("H_TLB_INVALIDATE", 261),
        ("L2_ACCESS", 2997),
        ("HOST_UNMAP", 122),
        ("HOST_AGE", 131),
        ("HOST_DIRTY_LOG", 39),
    ]
    .into_iter()
    .collect();
    assert_eq!(c.by_type, want);
    let want = map([
        ("H_SET_PARTITION_TABLE ret=-4", 12),
        ("H_SET_PARTITION_TABLE ret=0", 14),
        ("H_TLB_INVALIDATE ret=-4", 35),
        ("H_TLB_INVALIDATE ret=0", 226),
        ("ok acc=r", 509),
        ("ok acc=w", 1432),
        ("ok acc=x", 148),
        ("hdsi ISSTORE+PRTABLE_FAULT", 2),
        ("hdsi ISSTORE+SET_RC", 60),
        ("hdsi ISSTORE+UNSUPP_MMU", 8),
        ("hdsi NOHPTE", 147),
        ("hdsi NOHPTE+ISSTORE", 457),
        ("hdsi PROTFAULT", 1),
        ("hdsi PROTFAULT+ISSTORE", 133),
        ("hdsi PRTABLE_FAULT", 2),
        ("hdsi SET_RC", 10),
        ("hdsi UNSUPP_MMU", 8),
        ("hisi NOEXEC", 1),
        ("hisi NOHPTE", 48),
        ("hisi PRTABLE_FAULT", 2),
        ("hisi UNSUPP_MMU", 8),
        ("enter ret=-4", 12),
        ("enter ret=3", 7),
        ("mmio acc=r", 1),
        ("mmio acc=w", 1),
    ]);
    assert_eq!(c.outcomes, want);
    assert_eq!((c.young_sum, c.dirty_sum), (1137, 1149));
    assert_eq!((c.max_pairs, c.lpids_in_max), (5, 3));
}

#[test]
fn basic_counts_match_readme() {
    let c = counts("nested-basic.txt.gz");
    assert_eq!(c.total, 150_002);
    let want: BTreeMap<&str, u64> = [
        ("L1_STORE", 43_708),
        ("H_SET_PARTITION_TABLE", 1),
        ("H_TLB_INVALIDATE", 5521),
        ("L2_ACCESS", 94_462),
        ("HOST_UNMAP", 2777),
        ("HOST_AGE", 2570),
        ("HOST_DIRTY_LOG", 961),
    ]
    .into_iter()
    .collect();
    assert_eq!(c.by_type, want);
    let want = map([
        ("H_SET_PARTITION_TABLE ret=0", 1),
        ("H_TLB_INVALIDATE ret=0", 5521),
        ("ok acc=r", 16_763),
        ("ok acc=w", 45_586),
        ("ok acc=x", 4387),
        ("hdsi ISSTORE+SET_RC", 2105),
        ("hdsi NOHPTE", 4903),
        ("hdsi NOHPTE+ISSTORE", 14_235),
        ("hdsi PROTFAULT+ISSTORE", 4684),
        ("hdsi SET_RC", 362),
        ("hisi NOEXEC", 7),
        ("hisi NOHPTE", 1276),
        ("mmio acc=r", 31),
        ("mmio acc=w", 123),
    ]);
    assert_eq!(c.outcomes, want);
    assert_eq!((c.young_sum, c.dirty_sum), (27_872, 31_865));
    assert_eq!((c.max_pairs, c.lpids_in_max), (38, 33));
}

#[test]
fn both_traces_are_detected_as_nested() {
    for name in ["nested-small.txt.gz", "nested-basic.txt.gz"] {
        assert!(NestedReader::detect(trace(name)).unwrap(), "{name}");
    }
    let hpt = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../traces/boot.txt.gz");
    assert!(!NestedReader::detect(hpt).unwrap());
}
