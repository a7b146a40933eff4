//! The PAPR HPT trace parser: arbitrary bytes through the streaming reader
//! (`TraceReader`, plain and via `from_reader`, which also takes gzip), the in-memory
//! parser (`for_each_record`) and format detection (`x86::detect`).
//!
//! Contract: never a panic; the two parsers give the same records and agree on
//! success; a malformed line's error names the file and a line that exists.
#![no_main]

use libfuzzer_sys::fuzz_target;
use revmap_fuzz::{check_from_reader, drain};
use revmap_trace::{for_each_record, x86, Record, TraceError, TraceReader};
use std::io::Cursor;

const FILE: &str = "fuzz.txt";

/// Records until the first error (or the end), and that error.
fn stream<R: std::io::BufRead>(mut r: TraceReader<R>) -> (Vec<Record>, Option<TraceError>) {
    drain(|| r.next_record())
}

fn lines_in(data: &[u8]) -> u64 {
    data.split(|&c| c == b'\n').count() as u64
}

fuzz_target!(|data: &[u8]| {
    let _ = x86::detect(data);
    let mut mem = Vec::new();
    let whole = for_each_record(data, FILE, |r| mem.push(r));
    let (streamed, err) = stream(TraceReader::new(Cursor::new(data), FILE));
    assert_eq!(
        mem, streamed,
        "the in-memory and streaming parsers disagree"
    );
    match (&whole, &err) {
        (Ok(n), None) => assert_eq!(*n, mem.len() as u64),
        (Err(a), Some(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("one parser failed, the other did not: {whole:?} / {err:?}"),
    }
    if let Some(TraceError::Malformed { file, line, .. }) = &err {
        assert_eq!(file, FILE);
        assert!(
            *line >= 1 && *line <= lines_in(data),
            "line {line} out of range"
        );
    }
    // `from_reader` decompresses gzip input; plain input must parse as above.
    let opened = TraceReader::from_reader(Cursor::new(data.to_vec()), FILE).map(stream);
    check_from_reader(data, FILE, opened, &streamed, err.as_ref());
});
