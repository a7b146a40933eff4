//! Streaming trace reader: gzip or plain text, one line at a time.
//!
//! Invariants:
//! * Compression is detected from the first two bytes (gzip magic `1f 8b`), never from
//!   the file name.
//! * One line buffer is reused for the whole file: reading a record does not allocate
//!   once the buffer has grown to the longest line. Lines longer than
//!   [`MAX_LINE_BYTES`] are an error, so a corrupt file cannot exhaust memory.
//! * Every error names the file, and parse errors also the 1-based line number.

use crate::line::{parse_line, Line, LineError};
use crate::record::Record;
use flate2::bufread::MultiGzDecoder;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use thiserror::Error;

/// The longest line accepted (console output can be long; records are ~300 bytes).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// An error reading a trace.
#[derive(Debug, Error)]
pub enum TraceError {
    /// A line that does not follow the format.
    #[error("{file}:{line}: {kind}")]
    Malformed {
        /// The file name as given.
        file: String,
        /// 1-based line number.
        line: u64,
        /// What is wrong with it.
        kind: LineError,
    },
    /// The file could not be opened, read or decompressed.
    #[error("{file}: {source}")]
    Io {
        /// The file name as given.
        file: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// A boxed line source (plain or gzip-decoding).
pub type DynBufRead = Box<dyn BufRead + Send>;

/// The error type of one trace format, as the shared reader core builds it.
pub(crate) trait FormatError: Sized {
    /// What is wrong with one line.
    type Line;
    /// The file could not be opened, read or decompressed.
    fn io(file: String, source: io::Error) -> Self;
    /// Line `line` of `file` does not follow the format.
    fn malformed(file: String, line: u64, kind: Self::Line) -> Self;
    /// The line-error kind for a line over [`MAX_LINE_BYTES`].
    fn too_long() -> Self::Line;
}

/// Implements [`FormatError`] for a format's error enum with `Io { file, source }` and
/// `Malformed { file, line, kind }` variants and a line error with `TooLong(usize)`.
macro_rules! format_error {
    ($err:ident, $line:ident) => {
        impl $crate::reader::FormatError for $err {
            type Line = $line;

            fn io(file: String, source: std::io::Error) -> Self {
                $err::Io { file, source }
            }

            fn malformed(file: String, line: u64, kind: $line) -> Self {
                $err::Malformed { file, line, kind }
            }

            fn too_long() -> $line {
                $line::TooLong($crate::reader::MAX_LINE_BYTES)
            }
        }
    };
}
pub(crate) use format_error;

format_error!(TraceError, LineError);

/// Wraps `r` in a gzip decoder if it starts with the gzip magic.
pub(crate) fn open_source<R: Read + Send + 'static>(r: R) -> io::Result<DynBufRead> {
    let mut br = BufReader::with_capacity(1 << 16, r);
    let gz = loop {
        match br.fill_buf() {
            Ok(b) => break b.starts_with(&[0x1f, 0x8b]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    Ok(if gz {
        Box::new(BufReader::with_capacity(1 << 16, MultiGzDecoder::new(br)))
    } else {
        Box::new(br)
    })
}

/// [`open_source`] on `r`, naming `file` in the error.
pub(crate) fn open_named<E: FormatError, R: Read + Send + 'static>(
    r: R,
    file: &str,
) -> Result<DynBufRead, E> {
    open_source(r).map_err(|source| E::io(file.to_owned(), source))
}

/// Opens the file at `path` (gzip or plain); the source and the name errors use.
pub(crate) fn open_path<E: FormatError>(path: &Path) -> Result<(DynBufRead, String), E> {
    let name = path.display().to_string();
    match File::open(path) {
        Ok(f) => Ok((open_named(f, &name)?, name)),
        Err(source) => Err(E::io(name, source)),
    }
}

/// The reader core every format shares: one reused line buffer, the 1-based line
/// number and the `file:line` wrapping of errors.
pub(crate) struct Lines<R> {
    inner: R,
    file: String,
    buf: Vec<u8>,
    line: u64,
}

impl<R: BufRead> Lines<R> {
    /// Lines of `inner`, named `file` in errors; `cap` is the line buffer's first size.
    pub(crate) fn new(inner: R, file: String, cap: usize) -> Self {
        Lines {
            inner,
            file,
            buf: Vec::with_capacity(cap),
            line: 0,
        }
    }

    /// The file name used in errors.
    pub(crate) fn file(&self) -> &str {
        &self.file
    }

    /// The 1-based number of the line last read (0 before the first).
    pub(crate) fn line_number(&self) -> u64 {
        self.line
    }

    /// `kind` at the line last read.
    pub(crate) fn malformed<E: FormatError>(&self, kind: E::Line) -> E {
        E::malformed(self.file.clone(), self.line, kind)
    }

    /// Reads the next raw line into the buffer; `false` at end of file.
    fn fill<E: FormatError>(&mut self) -> Result<bool, E> {
        self.buf.clear();
        loop {
            let avail = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(E::io(self.file.clone(), source)),
            };
            if avail.is_empty() {
                if self.buf.is_empty() {
                    return Ok(false);
                }
                break;
            }
            let (take, done) = match memchr::memchr(b'\n', avail) {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            };
            if self.buf.len() + take > MAX_LINE_BYTES {
                self.line += 1;
                return Err(self.malformed(E::too_long()));
            }
            if self.buf.try_reserve(take).is_err() {
                let source = io::Error::from(io::ErrorKind::OutOfMemory);
                return Err(E::io(self.file.clone(), source));
            }
            self.buf.extend_from_slice(&avail[..take]);
            self.inner.consume(take);
            if done {
                break;
            }
        }
        self.line += 1;
        Ok(true)
    }

    /// The next line, parsed by `parse` (given the line and its number); `None` at end.
    #[inline]
    pub(crate) fn next_parsed<'s, E: FormatError, T>(
        &'s mut self,
        parse: impl FnOnce(&'s [u8], u64) -> Result<T, E::Line>,
    ) -> Result<Option<T>, E> {
        if !self.fill()? {
            return Ok(None);
        }
        let Lines {
            buf, file, line, ..
        } = self;
        parse(buf, *line)
            .map(Some)
            .map_err(|kind| E::malformed(file.clone(), *line, kind))
    }
}

/// The lines of an in-memory text with their 1-based numbers (each line keeps its
/// newline); splits with `memchr` and copies nothing.
#[inline]
pub(crate) fn numbered_lines(text: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let mut rest = text;
    let mut lineno = 0u64;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        lineno += 1;
        let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        let (line, tail) = rest.split_at(end);
        rest = tail;
        Some((lineno, line))
    })
}

/// Implements `open(path)` and `from_reader(r, file)` on `$reader<DynBufRead>` (gzip
/// or plain, detected by the magic): `$make(source, file)` builds the reader.
macro_rules! open_constructors {
    ($reader:ident, $err:ty, $make:expr) => {
        impl $reader<$crate::reader::DynBufRead> {
            /// Opens `path`, decompressing if it starts with the gzip magic.
            pub fn open(path: impl AsRef<std::path::Path>) -> Result<Self, $err> {
                let (inner, name) = $crate::reader::open_path(path.as_ref())?;
                $make(inner, name)
            }

            /// Wraps any byte source, decompressing if it starts with the gzip magic.
            pub fn from_reader<R: std::io::Read + Send + 'static>(
                r: R,
                file: impl Into<String>,
            ) -> Result<Self, $err> {
                let file = file.into();
                $make($crate::reader::open_named(r, &file)?, file)
            }
        }
    };
}
pub(crate) use open_constructors;

/// Makes `$reader<R>` an iterator over `next_record()`'s records.
macro_rules! record_iterator {
    ($reader:ident, $record:ty, $err:ty) => {
        impl<R: std::io::BufRead> Iterator for $reader<R> {
            type Item = Result<$record, $err>;

            fn next(&mut self) -> Option<Self::Item> {
                self.next_record().transpose()
            }
        }
    };
}
pub(crate) use record_iterator;

/// Reads a trace line by line and parses each line.
pub struct TraceReader<R> {
    lines: Lines<R>,
}

open_constructors!(TraceReader, TraceError, |src, file| Ok::<_, TraceError>(
    TraceReader::new(src, file)
));

impl<R: BufRead> TraceReader<R> {
    /// Reads plain (already decompressed) text from `inner`; `file` names it in errors.
    pub fn new(inner: R, file: impl Into<String>) -> Self {
        TraceReader {
            lines: Lines::new(inner, file.into(), 512),
        }
    }

    /// The file name used in errors.
    pub fn file(&self) -> &str {
        self.lines.file()
    }

    /// The 1-based number of the line last returned (0 before the first).
    pub fn line_number(&self) -> u64 {
        self.lines.line_number()
    }

    /// The next line, parsed (records, comments, console lines, blanks); `None` at end.
    pub fn next_line(&mut self) -> Result<Option<Line<'_>>, TraceError> {
        self.lines.next_parsed(parse_line)
    }

    /// The next record, skipping comments, console lines and blanks; `None` at end.
    pub fn next_record(&mut self) -> Result<Option<Record>, TraceError> {
        loop {
            match self.next_line()? {
                None => return Ok(None),
                Some(Line::Record(r)) => return Ok(Some(r)),
                Some(_) => {}
            }
        }
    }
}

record_iterator!(TraceReader, Record, TraceError);

/// Parses a whole in-memory text (already decompressed), calling `f` on every record.
/// Splits lines with `memchr` and copies nothing; the fastest way to parse a buffer.
pub fn for_each_record(
    text: &[u8],
    file: &str,
    mut f: impl FnMut(Record),
) -> Result<u64, TraceError> {
    let mut n = 0u64;
    for (lineno, line) in numbered_lines(text) {
        match parse_line(line, lineno) {
            Ok(Line::Record(r)) => {
                n += 1;
                f(r);
            }
            Ok(_) => {}
            Err(kind) => return Err(TraceError::malformed(file.to_owned(), lineno, kind)),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::HcallKind;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::Write;

    const TEXT: &str = "# realtrace v1\nHPT_ALLOC shift=23\n# console: hello\n\nH_PROTECT cpu=1 flags=0x4 ptex=0x580b8 avpn=0x0 -> ret=0\nHPT_SHIFT old=23 new=24\n";

    fn collect(r: TraceReader<DynBufRead>) -> Vec<Record> {
        r.collect::<Result<Vec<_>, _>>().unwrap()
    }

    #[test]
    fn plain_and_gzip_give_the_same_records() {
        let plain = collect(TraceReader::from_reader(io::Cursor::new(TEXT), "t").unwrap());
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(TEXT.as_bytes()).unwrap();
        let gz = enc.finish().unwrap();
        let unzipped = collect(TraceReader::from_reader(io::Cursor::new(gz), "t.gz").unwrap());
        assert_eq!(plain, unzipped);
        assert_eq!(plain.len(), 3);
        assert_eq!(plain[0], Record::HptAlloc { line: 2, shift: 23 });
        match plain[1] {
            Record::Hcall(h) => {
                assert_eq!(h.line, 5);
                assert_eq!(h.kind, HcallKind::Protect);
            }
            r => panic!("{r:?}"),
        }
        assert_eq!(plain[2].line(), 6);
        let mut n = 0;
        for_each_record(TEXT.as_bytes(), "t", |_| n += 1).unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn lines_expose_console_text() {
        let mut r = TraceReader::new(io::Cursor::new(TEXT), "t");
        assert_eq!(r.next_line().unwrap(), Some(Line::Comment(b"realtrace v1")));
        assert!(matches!(r.next_line().unwrap(), Some(Line::Record(_))));
        assert_eq!(r.next_line().unwrap(), Some(Line::Console(b"hello")));
        assert_eq!(r.line_number(), 3);
    }

    #[test]
    fn errors_name_file_and_line() {
        let text = "HPT_ALLOC shift=23\nH_ENTER cpu=0 flags=0x0\n";
        let mut r = TraceReader::from_reader(io::Cursor::new(text), "bad.txt").unwrap();
        assert!(r.next_record().unwrap().is_some());
        let e = r.next_record().unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("bad.txt:2: H_ENTER: missing key"), "{msg}");
        let e = for_each_record(text.as_bytes(), "bad.txt", |_| ()).unwrap_err();
        assert!(e.to_string().starts_with("bad.txt:2:"), "{e}");
    }

    #[test]
    fn missing_file_and_corrupt_gzip_are_io_errors() {
        let e = TraceReader::open("/nonexistent/trace.txt.gz")
            .err()
            .unwrap();
        assert!(matches!(e, TraceError::Io { .. }));
        assert!(e.to_string().starts_with("/nonexistent/trace.txt.gz: "));
        let mut r =
            TraceReader::from_reader(io::Cursor::new(vec![0x1f, 0x8b, 0x08, 0, 1, 2, 3]), "c.gz")
                .unwrap();
        assert!(matches!(r.next_record(), Err(TraceError::Io { .. })));
    }

    #[test]
    fn last_line_without_newline_and_crlf() {
        let r = TraceReader::new(
            io::Cursor::new("HPT_ALLOC shift=20\r\nHPT_ALLOC shift=21"),
            "t",
        );
        let recs: Vec<_> = r.collect::<Result<_, _>>().unwrap();
        assert_eq!(
            recs,
            vec![
                Record::HptAlloc { line: 1, shift: 20 },
                Record::HptAlloc { line: 2, shift: 21 }
            ]
        );
    }

    #[test]
    fn overlong_line_is_an_error() {
        let long = vec![b'#'; MAX_LINE_BYTES + 10];
        let mut r = TraceReader::new(io::Cursor::new(long), "t");
        assert!(matches!(
            r.next_record(),
            Err(TraceError::Malformed {
                line: 1,
                kind: LineError::TooLong(_),
                ..
            })
        ));
    }
}
