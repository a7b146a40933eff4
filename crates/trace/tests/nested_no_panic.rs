//! Arbitrary input never makes the nested-trace parser panic: it yields a line or an
//! error, line by line, through the reader and through the slice parser.

mod common;

use proptest::prelude::*;
use revmap_trace::nested::{for_each_nested_record, parse_nested_line, NestedReader, NestedRecord};

const WORDS: &[&str] = &[
    "->",
    "ok",
    "hdsi",
    "hisi",
    "mmio",
    "ret=-4",
    "ret=",
    "ret=-",
    "ret=99999999999999999999",
    "bytes=0xc00000000",
    "bytes=0x10",
    "l0_page_shift=16",
    "l0_page_shift=21",
    "shift=12",
    "gpa=0x173d0",
    "gpa=0xfffffffffffffff8",
    "val=0xc0000000001000ad",
    "ptcr=0x10004",
    "instr=0x90000",
    "rs=0x73d",
    "rb=0x800",
    "lpid=1853",
    "lpid=",
    "acc=r",
    "acc=w",
    "acc=x",
    "acc=",
    "l1gpa=0x100006000",
    "cause=0x2080000",
    "asdr=0x3b9a6000",
    "gfn=0xfff7",
    "gfn=0xffffffffffffffff",
    "npages=32",
    "npages=18446744073709551615",
    "young_must=0x10000-0x10001,0x10003-0x10006",
    "young_must=-",
    "dirty_must=0x1,0x0",
    "dirty_must=0x1-",
    "dirty_must=-0x1",
    "dirty_must=,",
    "dirty_must=0x0-0xffffffffffffffff",
    "=",
    "0x",
    "#",
    "\t",
    "\r",
];

fn tokens() -> Vec<&'static str> {
    NestedRecord::NAMES
        .iter()
        .copied()
        .chain(WORDS.iter().copied())
        .collect()
}

fn word() -> BoxedStrategy<String> {
    common::word(tokens(), 4)
}

fn header() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("L1_MEMORY bytes=0x100000 l0_page_shift=16\nL1_BASE_PAGE shift=16\n".to_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in any::<Vec<u8>>()) {
        let _ = parse_nested_line(&bytes, 1);
        let _ = for_each_nested_record(&bytes, "p", |_| ());
    }

    #[test]
    fn near_miss_lines_never_panic(line in common::line(word(), 12)) {
        let _ = parse_nested_line(line.as_bytes(), 1);
    }

    #[test]
    fn arbitrary_files_never_panic(
        head in header(),
        body in common::text(word(), 8, 8),
    ) {
        let text = head + &body;
        let _ = for_each_nested_record(text.as_bytes(), "p", |_| ());
        if let Ok(r) = NestedReader::new(std::io::Cursor::new(text.clone()), "p") {
            for rec in r {
                match rec {
                    Ok(NestedRecord::HostAge { young_must: g, .. })
                    | Ok(NestedRecord::HostDirtyLog { dirty_must: g, .. }) => {
                        let _ = (g.gfn_count(), g.contains(u64::MAX), g.contains(0));
                    }
                    Ok(r) => {
                        let _ = (r.line(), r.name(), r.has_result());
                    }
                    Err(_) => break,
                }
            }
        }
        // Also through the gzip-sniffing constructor (plain text here).
        let _ = NestedReader::from_reader(std::io::Cursor::new(text.into_bytes()), "p");
    }
}
