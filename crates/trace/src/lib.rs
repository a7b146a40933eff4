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
//! ```
//! use revmap_trace::{parse_line, HcallKind, Line, Record};
//! let l = parse_line(b"H_PROTECT cpu=0 flags=0x4 ptex=0x80 avpn=0x0 -> ret=0", 1).unwrap();
//! let Line::Record(Record::Hcall(h)) = l else { panic!() };
//! assert_eq!(h.kind, HcallKind::Protect);
//! assert_eq!(h.args(), &[0x4, 0x80, 0x0]);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod lex;
pub mod line;
pub mod nested;
pub mod reader;
pub mod record;
pub mod x86;

pub use line::{parse_line, Line, LineError};
pub use reader::{for_each_record, DynBufRead, TraceError, TraceReader, MAX_LINE_BYTES};
pub use record::{Expected, Hcall, HcallKind, HwBit, Record};
