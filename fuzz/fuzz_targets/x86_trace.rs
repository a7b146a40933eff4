//! The x86 walk-trace parser: arbitrary bytes through the streaming reader
//! (`X86Reader`, plain and via `from_reader`, which also takes gzip), line by line
//! through `parse_x86_line`, and format detection (`x86::detect`, `nested::looks_nested`).
//!
//! Contract: never a panic; the reader and the line parser give the same records and
//! the same first error; a malformed line's error names the file and a line that exists.
#![no_main]

use libfuzzer_sys::fuzz_target;
use revmap_fuzz::{check_from_reader, drain};
use revmap_trace::x86::{self, parse_x86_line, X86Line, X86Reader, X86Record};
use revmap_trace::TraceError;
use std::io::Cursor;

const FILE: &str = "fuzz.txt";

/// Records until the first error (or the end), and that error.
fn stream<R: std::io::BufRead>(mut r: X86Reader<R>) -> (Vec<X86Record>, Option<TraceError>) {
    drain(|| r.next_record())
}

/// The same text split by hand and parsed line by line.
fn by_line(data: &[u8]) -> (Vec<X86Record>, Option<(u64, String)>) {
    let mut recs = Vec::new();
    let mut rest = data;
    let mut no = 0u64;
    while !rest.is_empty() {
        no += 1;
        let end = rest
            .iter()
            .position(|&c| c == b'\n')
            .map_or(rest.len(), |i| i + 1);
        let (line, tail) = rest.split_at(end);
        rest = tail;
        match parse_x86_line(line, no) {
            Ok(X86Line::Record(r)) => recs.push(r),
            Ok(_) => {}
            Err(e) => return (recs, Some((no, e.to_string()))),
        }
    }
    (recs, None)
}

fuzz_target!(|data: &[u8]| {
    let _ = x86::detect(data);
    let _ = revmap_trace::nested::looks_nested(data);
    let (streamed, err) = stream(X86Reader::new(Cursor::new(data), FILE));
    let (lined, lerr) = by_line(data);
    assert_eq!(streamed, lined, "the reader and the line parser disagree");
    match (&err, &lerr) {
        (None, None) => {}
        (Some(TraceError::Malformed { file, line, kind }), Some((no, msg))) => {
            assert_eq!(file, FILE);
            assert_eq!(line, no);
            assert_eq!(&kind.to_string(), msg);
        }
        _ => panic!("reader error {err:?}, line parser error {lerr:?}"),
    }
    let opened = X86Reader::from_reader(Cursor::new(data.to_vec()), FILE).map(stream);
    check_from_reader(data, FILE, opened, &streamed, err.as_ref());
});
