//! Arbitrary input never makes the x86 walk-trace parser panic: it yields a line or an error.

mod common;

use proptest::prelude::*;
use revmap_trace::x86::{detect, marker, parse_x86_line, X86Reader};

const WORDS: &[&str] = &[
    "CPU",
    "WALK",
    "INVLPG",
    "FLUSH",
    "->",
    "fault",
    "cpu=0",
    "cpu=18446744073709551616",
    "va=0x7ffe10d84728",
    "acc=r",
    "acc=w",
    "acc=x",
    "acc=",
    "cpl=3",
    "cpl=300",
    "smap=1",
    "smap=2",
    "m32=1",
    "rcpl=3",
    "ac=1",
    "probe=1",
    "trunc=1",
    "pte=0x1000:0x2067",
    "pte=0x1000:0x2067,0x2000:0x3067",
    "pte=",
    "pte=,",
    "pte=0x1000",
    "pte=0x1000:",
    "pte=:",
    "ad=0x1000:fail",
    "ad=0x1000:0x2067",
    "ad=fail",
    "pa=0x1000",
    "psz=12",
    "psz=999",
    "prot=rw-",
    "prot=rwxx",
    "prot=",
    "ec=0x7",
    "exc=13",
    "exc=0xd",
    "cr0=0x80050033",
    "cr3=0x0",
    "cr4=0x751ef0",
    "efer=0xd01",
    "pkru=0x0",
    "pkrs=0x0",
    "a20=1",
    "maxphy=40",
    "maxphy=256",
    "cr3",
    "cr0",
    "xrstor-pkru",
    "=",
    "0x",
    "0xfffffffffffffffff",
    "#",
    "# console:",
    "@@RT",
    "@@RT PHASE w1@@",
    "@@",
    "\t",
    "\r",
];

fn word() -> BoxedStrategy<String> {
    common::word(WORDS.to_vec(), 1)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in any::<Vec<u8>>()) {
        let _ = parse_x86_line(&bytes, 1);
        let _ = detect(&bytes);
        let _ = marker(&bytes);
    }

    #[test]
    fn near_miss_lines_never_panic(line in common::line(word(), 14)) {
        let _ = parse_x86_line(line.as_bytes(), 1);
        let _ = marker(line.as_bytes());
    }

    #[test]
    fn arbitrary_files_never_panic(text in common::text(word(), 10, 8), gz_magic in any::<bool>()) {
        let mut text = text.into_bytes();
        if gz_magic {
            text.splice(0..0, [0x1f, 0x8b]);
        }
        let _ = detect(&text);
        if let Ok(r) = X86Reader::from_reader(std::io::Cursor::new(text), "p") {
            for rec in r {
                if rec.is_err() { break; }
            }
        }
    }
}
