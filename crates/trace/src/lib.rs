//! Streaming parser for real-guest PAPR HPT hypercall traces.
//!
//! The format is described in `traces/README.md` at the repository root: gzip'd (or
//! plain) text, one record per line, `#` comments and `# console:` lines interleaved.
//! [`TraceReader`] streams a file record by record; [`parse_line`] parses one line;
//! [`for_each_record`] parses an in-memory buffer without copying.
//!
//! Invariants:
//! * Parsing never panics on any input and never allocates per line on success.
//! * Every error names the file and (for malformed lines) the 1-based line number.
//! * Register positions follow the PAPR ABI (`args[i]` / `outs[i]` = r(4 + i)).
//!
//! Three formats share one lexer and one reader core: the PAPR HPT hypercall format
//! (this module's re-exports), the x86 walk format ([`x86`]) and the nested-radix format
//! ([`nested`]). A few lines of each:
//!
//! ```
//! use revmap_trace::nested::{for_each_nested_record, NestedRecord};
//! use revmap_trace::x86::{parse_x86_line, X86Line, X86Record};
//! use revmap_trace::{parse_line, HcallKind, Line, Record, TraceReader};
//!
//! // HPT: one hypercall, its inputs in PAPR register order and the result observed.
//! let l = parse_line(b"H_PROTECT cpu=0 flags=0x4 ptex=0x80 avpn=0x0 -> ret=0", 1)?;
//! let Line::Record(Record::Hcall(h)) = l else { panic!("{l:?}") };
//! assert_eq!(h.kind, HcallKind::Protect);
//! assert_eq!(h.args(), &[0x4, 0x80, 0x0]);
//!
//! // A whole (plain or gzip) text, streamed; comments and console lines are skipped.
//! let text = "# realtrace v1\nHPT_ALLOC shift=23\n# console: hello\nHPT_SHIFT old=23 new=24\n";
//! let recs = TraceReader::from_reader(std::io::Cursor::new(text), "boot.txt")?
//!     .collect::<Result<Vec<_>, _>>()?;
//! assert_eq!(recs[0], Record::HptAlloc { line: 2, shift: 23 });
//!
//! // x86: one INVLPG (the walk records are in the `x86` module docs).
//! let l = parse_x86_line(b"INVLPG cpu=1 va=0x7f0000001000", 9)?;
//! assert!(matches!(l, X86Line::Record(X86Record::Invlpg { line: 9, .. })));
//!
//! // Nested: the two header records, then the body.
//! let text = b"L1_MEMORY bytes=0x100000 l0_page_shift=16\nL1_BASE_PAGE shift=16\n\
//!              L1_STORE gpa=0x1000 val=0xc0000000001000ad\n";
//! let mut body = Vec::new();
//! let (header, n) = for_each_nested_record(text, "l1.txt", |r| body.push(r))?;
//! assert_eq!((header.l1_memory_bytes, n), (0x100000, 3));
//! assert!(matches!(body[0], NestedRecord::L1Store { gpa: 0x1000, .. }));
//!
//! // Every error names the file and the line.
//! let e = TraceReader::new(std::io::Cursor::new("H_ENTER cpu=0\n"), "bad.txt")
//!     .next_record()
//!     .unwrap_err();
//! assert!(e.to_string().starts_with("bad.txt:1: H_ENTER: missing key"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod lex;
pub mod line;
pub mod nested;
pub mod reader;
pub mod record;
pub mod x86;

pub use line::{parse_line, FieldError, Line, LineError};
pub use reader::{for_each_record, DynBufRead, TraceError, TraceReader, MAX_LINE_BYTES};
pub use record::{Expected, Hcall, HcallKind, HwBit, HwSet, Record};
