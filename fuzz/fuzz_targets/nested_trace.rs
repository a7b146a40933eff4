//! The nested-radix trace parser: arbitrary bytes through the streaming reader
//! (`NestedReader`, plain and via `from_reader`, which also takes gzip), the in-memory
//! parser (`for_each_nested_record`) and detection (`looks_nested`).
//!
//! Contract: never a panic; the two parsers give the same header and records and
//! agree on success; every error names the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use revmap_trace::nested::{
    for_each_nested_record, looks_nested, NestedHeader, NestedReader, NestedRecord,
    NestedTraceError,
};
use std::io::Cursor;

const FILE: &str = "fuzz.txt";

type Streamed = (
    Option<NestedHeader>,
    Vec<NestedRecord>,
    Option<NestedTraceError>,
);

fn stream<R: std::io::BufRead>(r: Result<NestedReader<R>, NestedTraceError>) -> Streamed {
    let mut r = match r {
        Ok(r) => r,
        Err(e) => return (None, Vec::new(), Some(e)),
    };
    let mut recs = Vec::new();
    loop {
        match r.next_record() {
            Ok(Some(rec)) => recs.push(rec),
            Ok(None) => return (Some(r.header()), recs, None),
            Err(e) => return (Some(r.header()), recs, Some(e)),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = looks_nested(data);
    let mut mem = Vec::new();
    let whole = for_each_nested_record(data, FILE, |r| mem.push(r));
    let (header, streamed, err) = stream(NestedReader::new(Cursor::new(data), FILE));
    assert_eq!(
        mem, streamed,
        "the in-memory and streaming parsers disagree"
    );
    match (&whole, &err) {
        (Ok((h, n)), None) => {
            assert_eq!(Some(*h), header);
            assert_eq!(*n, mem.len() as u64 + 2, "records counted with the header");
        }
        (Err(_), Some(_)) => {}
        _ => panic!("one parser failed, the other did not: {whole:?} / {err:?}"),
    }
    for e in whole.err().iter().chain(err.iter()) {
        assert!(
            e.to_string().starts_with(FILE),
            "error without the file: {e}"
        );
    }
    let (h2, recs, e2) = stream(NestedReader::from_reader(Cursor::new(data.to_vec()), FILE));
    if !data.starts_with(&[0x1f, 0x8b]) {
        assert_eq!((h2, recs), (header, streamed));
        assert_eq!(e2.is_some(), err.is_some());
    }
});
