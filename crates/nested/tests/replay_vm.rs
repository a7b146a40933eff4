//! Replays both vendored nested traces through the real, thread-safe nested MMU
//! (`revmap_nested::vm::NestedVm` on the shared host layer) with the library replay
//! (`revmap_nested::replay`): every result matched, 0 invariant violations, and the
//! nested statistics the issue asks for.

use revmap_nested::replay::{replay_file, ReplayOptions, ReplayReport};
use std::path::PathBuf;

fn trace(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../traces/nested")
        .join(name)
}

fn assert_clean(r: &ReplayReport, checked: u64) {
    println!("{r:#?}");
    assert_eq!(r.first_mismatch, None);
    assert_eq!(r.first_violation, None);
    assert_eq!(
        (r.checked, r.matched, r.mismatched, r.invariant_violations),
        (checked, checked, 0, 0)
    );
    assert!(r.invariant_checks >= 1);
    let c = &r.counters;
    assert!(c.rmap_entries_max_per_gfn <= 64, "{c:#?}");
    assert!(c.nested_faults > 0 && c.shadow_hits > 0, "{c:#?}");
    assert!(c.rmap_invalidations > 0, "{c:#?}");
    assert!(c.rmap_bytes_max > 0, "{c:#?}");
}

#[test]
fn small_trace_replays_through_nested_vm() {
    let r = replay_file(
        trace("nested-small.txt.gz"),
        ReplayOptions { check_every: 50 },
    )
    .unwrap();
    assert_clean(&r, 3454);
}

#[test]
fn basic_trace_replays_through_nested_vm() {
    let r = replay_file(trace("nested-basic.txt.gz"), ReplayOptions::default()).unwrap();
    assert_clean(&r, 1 + 5521 + 94_462 + 2570 + 961);
}

/// The whole format with 2 MiB L0 backing (`l0_page_shift=21`; no such trace is
/// vendored yet): two L2 pages on one 2 MiB host page, aging one gfn, the dirty log,
/// a host unmap of one 64 KiB gfn that takes the whole host page (so the other gfn is
/// re-faulted on a new frame), with must-sets by the README's rules.
#[test]
fn two_mib_backing_trace_replays() {
    use revmap_nested::radix::{PateDw0, RadixPde, RadixPte};
    use revmap_nested::replay::replay_records;
    use revmap_trace::nested::NestedReader;
    let (root, pud, pmd, pte) = (0x10_0000u64, 0x12_0000u64, 0x13_0000u64, 0x14_0000u64);
    let data = 0x1000_0000u64;
    let flags = RadixPte::R | RadixPte::C | RadixPte::EAA_READ | RadixPte::EAA_RW;
    let g = data >> 16;
    let mut t = String::from(
        "L1_MEMORY bytes=0x40000000 l0_page_shift=21\nL1_BASE_PAGE shift=16\n\
         H_SET_PARTITION_TABLE ptcr=0x10004 -> ret=0\n",
    );
    for (a, v) in [
        (0x1_0010, PateDw0::radix52(root, 13).bits()),
        (root, RadixPde::new(pud, 9).bits()),
        (pud, RadixPde::new(pmd, 9).bits()),
        (pmd, RadixPde::new(pte, 5).bits()),
        (pte, RadixPte::new(data, flags).bits()),
        (pte + 8, RadixPte::new(data + 0x1_0000, flags).bits()),
    ] {
        t += &format!("L1_STORE gpa={a:#x} val={v:#x}\n");
    }
    t += &format!(
        "L2_ACCESS lpid=1 gpa=0x18 acc=r -> ok l1gpa={:#x}\n",
        data + 0x18
    );
    t += &format!(
        "L2_ACCESS lpid=1 gpa=0x10020 acc=w -> ok l1gpa={:#x}\n",
        data + 0x1_0020
    );
    t += &format!("HOST_AGE gfn={g:#x} npages=1 -> young_must={g:#x}\n");
    t += &format!("HOST_DIRTY_LOG -> dirty_must={:#x}\n", g + 1);
    t += &format!("HOST_UNMAP gfn={g:#x} npages=1\n");
    t += &format!(
        "L2_ACCESS lpid=1 gpa=0x10028 acc=w -> ok l1gpa={:#x}\n",
        data + 0x1_0028
    );
    t += &format!("HOST_AGE gfn={g:#x} npages=2 -> young_must={:#x}\n", g + 1);
    t += &format!("HOST_DIRTY_LOG -> dirty_must={:#x}\n", g + 1);
    let r = NestedReader::from_reader(std::io::Cursor::new(t.into_bytes()), "2m").unwrap();
    let header = r.header();
    assert_eq!(header.l0_page_shift, 21);
    let rep = replay_records(
        "2m",
        header,
        r.map(Result::unwrap),
        ReplayOptions { check_every: 1 },
    )
    .unwrap();
    println!("{rep:#?}");
    assert_eq!((rep.first_mismatch, rep.first_violation), (None, None));
    assert_eq!((rep.checked, rep.matched), (8, 8));
    // The unmap of gfn g took the L1 page of gfn g + 1 (same host page) with it.
    assert_eq!(rep.counters.rmap_invalidations, 2);
}
