//! Arbitrary input never makes the parser panic: it yields a line or an error.

use proptest::prelude::*;
use revmap_trace::{parse_line, TraceReader};

const WORDS: &[&str] = &[
    "H_ENTER",
    "H_REMOVE",
    "H_PROTECT",
    "H_READ",
    "H_BULK_REMOVE",
    "H_CLEAR_REF",
    "H_RESIZE_HPT_PREPARE",
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

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(WORDS).prop_map(str::to_owned),
        "[ -~]{0,12}",
        any::<Vec<u8>>().prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in any::<Vec<u8>>()) {
        let _ = parse_line(&bytes, 1);
    }

    #[test]
    fn near_miss_lines_never_panic(words in proptest::collection::vec(word(), 0..12)) {
        let line = words.join(" ");
        let _ = parse_line(line.as_bytes(), 1);
    }

    #[test]
    fn arbitrary_files_never_panic(lines in proptest::collection::vec(
        proptest::collection::vec(word(), 0..8), 0..8)) {
        let text: String = lines.iter().map(|l| l.join(" ") + "\n").collect();
        for r in TraceReader::new(std::io::Cursor::new(text), "p") {
            if r.is_err() { break; }
        }
    }
}
