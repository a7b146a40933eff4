//! Arbitrary input never makes the parser panic: it yields a line or an error.

mod common;

use proptest::prelude::*;
use revmap_trace::{parse_line, HcallKind, TraceReader};

const WORDS: &[&str] = &[
    "HPT_ALLOC",
    "HPT_SHIFT",
    "HW_SET_R",
    "->",
    "cpu=0",
    "ret=-7",
    "ret=0",
    "flags=0x0",
    "ptex=0x10",
    "pteh=0x4000000000000001",
    "ptel=0x190",
    "avpn=0x0",
    "idx=0x10",
    "shift=23",
    "old=23",
    "new=24",
    "tsh0=0x4000000000000000",
    "rsp0=0x8",
    "pteh0=0x40",
    "=",
    "0x",
    "cpu=",
    "ret=-",
    "ret=99999999999999999999",
    "#",
    "# console:",
    "pte1=0xffffffffffffffffff",
    "\t",
    "\r",
    "ptex=0x-1",
];

fn tokens() -> Vec<&'static str> {
    HcallKind::ALL
        .iter()
        .map(|k| k.name())
        .chain(WORDS.iter().copied())
        .collect()
}

fn word() -> BoxedStrategy<String> {
    common::word(tokens(), 1)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in any::<Vec<u8>>()) {
        let _ = parse_line(&bytes, 1);
    }

    #[test]
    fn near_miss_lines_never_panic(line in common::line(word(), 12)) {
        let _ = parse_line(line.as_bytes(), 1);
    }

    #[test]
    fn arbitrary_files_never_panic(text in common::text(word(), 8, 8)) {
        for r in TraceReader::new(std::io::Cursor::new(text), "p") {
            if r.is_err() { break; }
        }
    }
}
