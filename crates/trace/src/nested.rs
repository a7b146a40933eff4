//! The nested-radix trace format (`traces/nested/README.md`): what a KVM-HV L0 sees from
//! a radix L1 hypervisor and its L2 guests, plus L0's own memory-management events, with
//! the result L1 or the L2 observed for each.
//!
//! * [`parse_nested_line`] parses one line into a [`NestedLine`] (blank, `#` comment or a
//!   typed [`NestedRecord`]);
//! * [`NestedReader`] streams a file (gzip or plain, detected by the gzip magic), checks
//!   the header ([`NestedHeader`]: `L1_MEMORY` then `L1_BASE_PAGE`, the first two
//!   records) and yields the records after it;
//! * [`for_each_nested_record`] parses an in-memory text without copying;
//! * [`looks_nested`] / [`NestedReader::detect`] tell this format from the HPT format by
//!   content (the first record is `L1_MEMORY`).
//!
//! Invariants:
//! * Parsing never panics on any input; every error names the file and, for a bad line,
//!   the 1-based line number (`file:line: what`).
//! * Every record must carry each of its keys exactly once, in any order; unknown and
//!   duplicate keys are errors. Numbers are `0x` hex except `lpid`, `npages`, `shift`,
//!   `l0_page_shift` (decimal) and `ret` (signed decimal).
//! * A record has a result (` -> ...`) if and only if the format gives it one; gfn lists
//!   are in strictly increasing order.
//! * Only `L1_STORE` is checked against the header (a store inside L1 RAM) and header
//!   records must come first; everything else is left to the replayer.

use crate::lex::{
    lossy, parse_hex, parse_idec, parse_udec, split_kv, trim_line, trim_start, FieldError, Seen,
    Trimmed, Words,
};
use crate::reader::{
    format_error, numbered_lines, open_constructors, open_path, record_iterator, DynBufRead,
    FormatError, Lines, MAX_LINE_BYTES,
};
use std::io::{self, BufRead, Read};
use std::path::Path;
use thiserror::Error;

/// Why one line of a nested trace failed to parse. Displayed after `file:line: `.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NestedLineError {
    /// The first word is not a record name of this format.
    #[error("unknown record `{0}`")]
    UnknownRecord(String),
    /// A record that needs a result has none.
    #[error("{record}: missing result (`-> ...`)")]
    MissingResult {
        /// Record name.
        record: &'static str,
    },
    /// An `L2_ACCESS` result that is none of `ok`, `hdsi`, `hisi`, `mmio`, `ret=N`.
    #[error("L2_ACCESS: unknown result `{0}` (expected ok, hdsi, hisi, mmio or ret=N)")]
    UnknownOutcome(String),
    /// The header records are missing or out of place.
    #[error("{0}")]
    Header(HeaderError),
    /// An address or gfn range outside L1 RAM where the format requires RAM.
    #[error("{record}: {what} {value:#x} is outside L1 RAM ({ram:#x} bytes)")]
    OutsideRam {
        /// Record name.
        record: &'static str,
        /// What is outside.
        what: &'static str,
        /// The value.
        value: u64,
        /// L1 RAM size.
        ram: u64,
    },
    /// A `key=value` field is wrong.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// The line is longer than the reader accepts.
    #[error("line longer than {0} bytes")]
    TooLong(usize),
}

/// What is wrong with the header of a nested trace (its first two records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HeaderError {
    /// The first record is not `L1_MEMORY`.
    #[error("the first record must be L1_MEMORY")]
    NoL1Memory,
    /// The second record is not `L1_BASE_PAGE`.
    #[error("the second record must be L1_BASE_PAGE")]
    NoL1BasePage,
    /// The file ends before both header records.
    #[error("the file ends before its header")]
    Truncated,
    /// A header record after the first two records.
    #[error("header record after the first two records")]
    Repeated,
}

/// An error reading a nested trace.
#[derive(Debug, Error)]
pub enum NestedTraceError {
    /// A line that does not follow the format.
    #[error("{file}:{line}: {kind}")]
    Malformed {
        /// The file name as given.
        file: String,
        /// 1-based line number (0: the file ended before the header).
        line: u64,
        /// What is wrong.
        kind: NestedLineError,
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

/// The kind of an L2 access (`acc=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccessKind {
    /// `r`: a load.
    Read,
    /// `w`: a store.
    Write,
    /// `x`: an instruction fetch.
    Exec,
}

impl AccessKind {
    /// The letter used in traces.
    pub const fn letter(self) -> char {
        match self {
            AccessKind::Read => 'r',
            AccessKind::Write => 'w',
            AccessKind::Exec => 'x',
        }
    }
}

/// What an `L2_ACCESS` led to (the part after ` -> `).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessOutcome {
    /// `ok l1gpa=`: the access completed at this L1 real address (offset included).
    Ok {
        /// The L1 address reached.
        l1gpa: u64,
    },
    /// `hdsi cause= asdr=`: H_ENTER_NESTED returned 0xE00.
    Hdsi {
        /// hv_state.hdsisr.
        cause: u64,
        /// hv_state.asdr.
        asdr: u64,
    },
    /// `hisi cause= asdr=`: H_ENTER_NESTED returned 0xE20.
    Hisi {
        /// The SRR1 cause bits.
        cause: u64,
        /// hv_state.asdr.
        asdr: u64,
    },
    /// `mmio l1gpa=`: L0 emulated the access as MMIO for the L2.
    Mmio {
        /// The L1 address (outside RAM).
        l1gpa: u64,
    },
    /// `ret=N`: H_ENTER_NESTED refused to run the L2.
    Ret(i64),
}

/// An inclusive range of gfns (64 KiB units of L1 memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GfnRange {
    /// First gfn.
    pub first: u64,
    /// Last gfn (inclusive).
    pub last: u64,
}

/// A `young_must=` / `dirty_must=` list: strictly increasing, non-overlapping ranges.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct GfnRanges(Vec<GfnRange>);

impl GfnRanges {
    /// The ranges, in increasing order.
    pub fn ranges(&self) -> &[GfnRange] {
        &self.0
    }
    /// Whether the list is empty (`-`).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Number of gfns in the list (saturating at `u64::MAX`).
    pub fn gfn_count(&self) -> u64 {
        self.0.iter().fold(0u64, |n, r| {
            n.saturating_add((r.last - r.first).saturating_add(1))
        })
    }
    /// Whether `gfn` is in the list (binary search).
    pub fn contains(&self, gfn: u64) -> bool {
        let i = self.0.partition_point(|r| r.last < gfn);
        self.0.get(i).is_some_and(|r| r.first <= gfn)
    }
    /// Every gfn of the list, in order.
    pub fn gfns(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().flat_map(|r| r.first..=r.last)
    }
}

/// The two header records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NestedHeader {
    /// `L1_MEMORY bytes=`: L1 RAM is gpa `[0, bytes)`, one memslot.
    pub l1_memory_bytes: u64,
    /// `L1_MEMORY l0_page_shift=`: L0 backs L1 with 2^shift pages (16 or 21).
    pub l0_page_shift: u32,
    /// `L1_BASE_PAGE shift=`: the generator's L1 base page (16 or 12), informational.
    pub l1_base_page_shift: u32,
}

impl NestedHeader {
    /// log2 of the gfn unit: L0's PAGE_SIZE, always 64 KiB in this format.
    pub const GFN_SHIFT: u32 = 16;

    /// Number of gfns of L1 RAM.
    pub const fn gfn_count(&self) -> u64 {
        self.l1_memory_bytes.div_ceil(1 << Self::GFN_SHIFT)
    }
}

/// One record of a nested trace. `line` is the 1-based line number.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NestedRecord {
    /// `L1_MEMORY bytes=0x.. l0_page_shift=16|21` (header, first record).
    L1Memory {
        /// Line number.
        line: u64,
        /// L1 RAM bytes.
        bytes: u64,
        /// L0 backing page shift.
        l0_page_shift: u32,
    },
    /// `L1_BASE_PAGE shift=16|12` (header, second record).
    L1BasePage {
        /// Line number.
        line: u64,
        /// L1 base page shift.
        shift: u32,
    },
    /// `L1_STORE gpa=0x.. val=0x..`: L1 writes the big-endian doubleword `val` at `gpa`.
    L1Store {
        /// Line number.
        line: u64,
        /// The L1 address (8-aligned).
        gpa: u64,
        /// The architectural value.
        val: u64,
    },
    /// `H_SET_PARTITION_TABLE ptcr=0x.. -> ret=N`.
    SetPartitionTable {
        /// Line number.
        line: u64,
        /// r4, L1's virtual PTCR.
        ptcr: u64,
        /// The return code.
        ret: i64,
    },
    /// `H_TLB_INVALIDATE instr=0x.. rs=0x.. rb=0x.. -> ret=N`.
    TlbInvalidate {
        /// Line number.
        line: u64,
        /// r4, the tlbie instruction image.
        instr: u64,
        /// r5, RS.
        rs: u64,
        /// r6, RB.
        rb: u64,
        /// The return code.
        ret: i64,
    },
    /// `L2_ACCESS lpid=N gpa=0x.. acc=r|w|x -> OUTCOME`.
    L2Access {
        /// Line number.
        line: u64,
        /// The L2's l1_lpid (decimal; may be 0 or out of range, to test refusals).
        lpid: u64,
        /// The L2 real address.
        gpa: u64,
        /// Load, store or fetch.
        acc: AccessKind,
        /// What happened.
        outcome: AccessOutcome,
    },
    /// `HOST_UNMAP gfn=0x.. npages=N`: L0 unmaps L1 gfns `[gfn, gfn + npages)`.
    HostUnmap {
        /// Line number.
        line: u64,
        /// First gfn.
        gfn: u64,
        /// Number of gfns.
        npages: u64,
    },
    /// `HOST_AGE gfn=0x.. npages=N -> young_must=RANGES`.
    HostAge {
        /// Line number.
        line: u64,
        /// First gfn.
        gfn: u64,
        /// Number of gfns.
        npages: u64,
        /// Gfns that must be reported young.
        young_must: GfnRanges,
    },
    /// `HOST_DIRTY_LOG -> dirty_must=RANGES`.
    HostDirtyLog {
        /// Line number.
        line: u64,
        /// Gfns that must be reported dirty.
        dirty_must: GfnRanges,
    },
}

impl NestedRecord {
    /// Every record name, in the README's order.
    pub const NAMES: [&'static str; 9] = [
        "L1_MEMORY",
        "L1_BASE_PAGE",
        "L1_STORE",
        "H_SET_PARTITION_TABLE",
        "H_TLB_INVALIDATE",
        "L2_ACCESS",
        "HOST_UNMAP",
        "HOST_AGE",
        "HOST_DIRTY_LOG",
    ];

    /// The 1-based line number.
    pub fn line(&self) -> u64 {
        match *self {
            NestedRecord::L1Memory { line, .. }
            | NestedRecord::L1BasePage { line, .. }
            | NestedRecord::L1Store { line, .. }
            | NestedRecord::SetPartitionTable { line, .. }
            | NestedRecord::TlbInvalidate { line, .. }
            | NestedRecord::L2Access { line, .. }
            | NestedRecord::HostUnmap { line, .. }
            | NestedRecord::HostAge { line, .. }
            | NestedRecord::HostDirtyLog { line, .. } => line,
        }
    }

    /// The record name as written.
    pub fn name(&self) -> &'static str {
        match self {
            NestedRecord::L1Memory { .. } => "L1_MEMORY",
            NestedRecord::L1BasePage { .. } => "L1_BASE_PAGE",
            NestedRecord::L1Store { .. } => "L1_STORE",
            NestedRecord::SetPartitionTable { .. } => "H_SET_PARTITION_TABLE",
            NestedRecord::TlbInvalidate { .. } => "H_TLB_INVALIDATE",
            NestedRecord::L2Access { .. } => "L2_ACCESS",
            NestedRecord::HostUnmap { .. } => "HOST_UNMAP",
            NestedRecord::HostAge { .. } => "HOST_AGE",
            NestedRecord::HostDirtyLog { .. } => "HOST_DIRTY_LOG",
        }
    }

    /// Whether the record carries a result (` -> `) that a replayer checks.
    pub fn has_result(&self) -> bool {
        matches!(
            self,
            NestedRecord::SetPartitionTable { .. }
                | NestedRecord::TlbInvalidate { .. }
                | NestedRecord::L2Access { .. }
                | NestedRecord::HostAge { .. }
                | NestedRecord::HostDirtyLog { .. }
        )
    }
}

/// One parsed line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NestedLine<'a> {
    /// An empty (or all-blank) line.
    Blank,
    /// A `#` line (text after `#` and leading blanks).
    Comment(&'a [u8]),
    /// A record.
    Record(NestedRecord),
}

#[derive(Clone, Copy)]
enum Kind {
    Hex,
    Dec,
    Signed,
    Acc,
}

struct Key {
    name: &'static str,
    kind: Kind,
}

const fn hx(name: &'static str) -> Key {
    Key {
        name,
        kind: Kind::Hex,
    }
}

const fn dc(name: &'static str) -> Key {
    Key {
        name,
        kind: Kind::Dec,
    }
}

fn value(record: &'static str, key: &Key, v: &[u8]) -> Result<u64, NestedLineError> {
    let (r, expected) = match key.kind {
        Kind::Hex => (parse_hex(v), "0x-prefixed hex u64"),
        Kind::Dec => (parse_udec(v), "unsigned decimal"),
        // Stored as the two's-complement bits; read back with `as i64`.
        Kind::Signed => (parse_idec(v).map(|x| x as u64), "signed decimal"),
        Kind::Acc => (
            match v {
                b"r" => Some(0),
                b"w" => Some(1),
                b"x" => Some(2),
                _ => None,
            },
            "r, w or x",
        ),
    };
    r.ok_or_else(|| FieldError::bad_value(record, key.name, v, expected).into())
}

/// Parses `key=value` words until `->` or the end; every key exactly once.
/// Returns the values in `keys` order and whether `->` was seen.
fn fields<const N: usize>(
    record: &'static str,
    words: &mut Words<'_>,
    keys: &[Key; N],
) -> Result<([u64; N], bool), NestedLineError> {
    let mut vals = [0u64; N];
    let mut seen = Seen::new(record, keys.each_ref().map(|k| k.name));
    let mut arrow = false;
    for tok in words.by_ref() {
        if tok == b"->" {
            arrow = true;
            break;
        }
        let (k, v) = split_kv(record, tok)?;
        let i = seen.mark(k)?;
        vals[i] = value(record, &keys[i], v)?;
    }
    seen.require(N)?;
    Ok((vals, arrow))
}

fn no_result(record: &'static str, arrow: bool) -> Result<(), NestedLineError> {
    if arrow {
        Err(NestedLineError::Field(FieldError::UnexpectedResult {
            record,
        }))
    } else {
        Ok(())
    }
}

fn need_result(record: &'static str, arrow: bool) -> Result<(), NestedLineError> {
    if arrow {
        Ok(())
    } else {
        Err(NestedLineError::MissingResult { record })
    }
}

/// The result keys after `->`, every one exactly once, nothing else, no second `->`.
fn result_fields<const N: usize>(
    record: &'static str,
    words: &mut Words<'_>,
    keys: &[Key; N],
) -> Result<[u64; N], NestedLineError> {
    let (vals, arrow) = fields(record, words, keys)?;
    no_result(record, arrow)?;
    Ok(vals)
}

fn small(
    record: &'static str,
    key: &'static str,
    v: u64,
    ok: &[u32],
    expected: &'static str,
) -> Result<u32, NestedLineError> {
    match u32::try_from(v) {
        Ok(s) if ok.contains(&s) => Ok(s),
        _ => Err(NestedLineError::Field(FieldError::BadValue {
            record,
            key,
            value: v.to_string(),
            expected,
        })),
    }
}

/// `-` or `A[-B],...` with hex gfns, strictly increasing and non-overlapping.
fn parse_ranges(
    record: &'static str,
    key: &'static str,
    v: &[u8],
) -> Result<GfnRanges, NestedLineError> {
    let bad = |expected| NestedLineError::from(FieldError::bad_value(record, key, v, expected));
    if v == b"-" {
        return Ok(GfnRanges::default());
    }
    let mut out = Vec::new();
    let mut prev: Option<u64> = None;
    for item in v.split(|&c| c == b',') {
        let (a, b) = match item.iter().position(|&c| c == b'-') {
            Some(i) => (&item[..i], Some(&item[i + 1..])),
            None => (item, None),
        };
        let first =
            parse_hex(a).ok_or_else(|| bad("`-` or comma-separated hex gfns / A-B ranges"))?;
        let last = match b {
            Some(b) => {
                parse_hex(b).ok_or_else(|| bad("`-` or comma-separated hex gfns / A-B ranges"))?
            }
            None => first,
        };
        if last < first || prev.is_some_and(|p| first <= p) {
            return Err(bad("ranges in strictly increasing order"));
        }
        if out.try_reserve(1).is_err() {
            return Err(bad("a list that fits in memory"));
        }
        out.push(GfnRange { first, last });
        prev = Some(last);
    }
    Ok(GfnRanges(out))
}

fn parse_outcome(words: &mut Words<'_>) -> Result<AccessOutcome, NestedLineError> {
    const R: &str = "L2_ACCESS";
    let Some(first) = words.next() else {
        return Err(NestedLineError::MissingResult { record: R });
    };
    let outcome = match first {
        b"ok" => {
            let [l1gpa] = result_fields(R, words, &[hx("l1gpa")])?;
            AccessOutcome::Ok { l1gpa }
        }
        b"mmio" => {
            let [l1gpa] = result_fields(R, words, &[hx("l1gpa")])?;
            AccessOutcome::Mmio { l1gpa }
        }
        b"hdsi" => {
            let [cause, asdr] = result_fields(R, words, &[hx("cause"), hx("asdr")])?;
            AccessOutcome::Hdsi { cause, asdr }
        }
        b"hisi" => {
            let [cause, asdr] = result_fields(R, words, &[hx("cause"), hx("asdr")])?;
            AccessOutcome::Hisi { cause, asdr }
        }
        tok if tok.starts_with(b"ret=") => {
            let key = Key {
                name: "ret",
                kind: Kind::Signed,
            };
            let ret = value(R, &key, &tok[4..])? as i64;
            result_fields(R, words, &[])?;
            AccessOutcome::Ret(ret)
        }
        other => return Err(NestedLineError::UnknownOutcome(lossy(other))),
    };
    Ok(outcome)
}

fn ret_result(
    record: &'static str,
    words: &mut Words<'_>,
    arrow: bool,
) -> Result<i64, NestedLineError> {
    need_result(record, arrow)?;
    let [ret] = result_fields(
        record,
        words,
        &[Key {
            name: "ret",
            kind: Kind::Signed,
        }],
    )?;
    Ok(ret as i64)
}

fn ranges_result(
    record: &'static str,
    key: &'static str,
    words: &mut Words<'_>,
    arrow: bool,
) -> Result<GfnRanges, NestedLineError> {
    need_result(record, arrow)?;
    let mut ranges = None;
    for tok in words.by_ref() {
        if tok == b"->" {
            return Err(NestedLineError::Field(FieldError::UnexpectedResult {
                record,
            }));
        }
        let (k, v) = split_kv(record, tok)?;
        if k != key.as_bytes() {
            return Err(FieldError::unknown_key(record, k).into());
        }
        if ranges.is_some() {
            return Err(FieldError::DuplicateKey { record, key }.into());
        }
        ranges = Some(parse_ranges(record, key, v)?);
    }
    ranges.ok_or(NestedLineError::Field(FieldError::MissingKey {
        record,
        key,
    }))
}

/// Parses one line of a nested trace (with or without its newline); `lineno` is stored
/// in the record.
pub fn parse_nested_line(line: &[u8], lineno: u64) -> Result<NestedLine<'_>, NestedLineError> {
    let line = match trim_line(line) {
        Trimmed::Blank => return Ok(NestedLine::Blank),
        Trimmed::Comment(c) => return Ok(NestedLine::Comment(trim_start(c))),
        Trimmed::Body(line) => line,
    };
    let mut words = Words::new(line);
    let name = words.next().unwrap_or_default();
    let w = &mut words;
    let rec = match name {
        b"L1_STORE" => {
            const R: &str = "L1_STORE";
            let ([gpa, val], arrow) = fields(R, w, &[hx("gpa"), hx("val")])?;
            no_result(R, arrow)?;
            if gpa & 7 != 0 {
                return Err(NestedLineError::Field(FieldError::BadValue {
                    record: R,
                    key: "gpa",
                    value: format!("{gpa:#x}"),
                    expected: "an 8-byte aligned address",
                }));
            }
            NestedRecord::L1Store {
                line: lineno,
                gpa,
                val,
            }
        }
        b"L2_ACCESS" => {
            const R: &str = "L2_ACCESS";
            let acc_key = Key {
                name: "acc",
                kind: Kind::Acc,
            };
            let ([lpid, gpa, acc], arrow) = fields(R, w, &[dc("lpid"), hx("gpa"), acc_key])?;
            need_result(R, arrow)?;
            let acc = match acc {
                0 => AccessKind::Read,
                1 => AccessKind::Write,
                _ => AccessKind::Exec,
            };
            NestedRecord::L2Access {
                line: lineno,
                lpid,
                gpa,
                acc,
                outcome: parse_outcome(w)?,
            }
        }
        b"H_TLB_INVALIDATE" => {
            const R: &str = "H_TLB_INVALIDATE";
            let ([instr, rs, rb], arrow) = fields(R, w, &[hx("instr"), hx("rs"), hx("rb")])?;
            NestedRecord::TlbInvalidate {
                line: lineno,
                instr,
                rs,
                rb,
                ret: ret_result(R, w, arrow)?,
            }
        }
        b"H_SET_PARTITION_TABLE" => {
            const R: &str = "H_SET_PARTITION_TABLE";
            let ([ptcr], arrow) = fields(R, w, &[hx("ptcr")])?;
            NestedRecord::SetPartitionTable {
                line: lineno,
                ptcr,
                ret: ret_result(R, w, arrow)?,
            }
        }
        b"HOST_UNMAP" => {
            const R: &str = "HOST_UNMAP";
            let ([gfn, npages], arrow) = fields(R, w, &[hx("gfn"), dc("npages")])?;
            no_result(R, arrow)?;
            NestedRecord::HostUnmap {
                line: lineno,
                gfn,
                npages,
            }
        }
        b"HOST_AGE" => {
            const R: &str = "HOST_AGE";
            let ([gfn, npages], arrow) = fields(R, w, &[hx("gfn"), dc("npages")])?;
            NestedRecord::HostAge {
                line: lineno,
                gfn,
                npages,
                young_must: ranges_result(R, "young_must", w, arrow)?,
            }
        }
        b"HOST_DIRTY_LOG" => {
            const R: &str = "HOST_DIRTY_LOG";
            let ([], arrow) = fields(R, w, &[])?;
            NestedRecord::HostDirtyLog {
                line: lineno,
                dirty_must: ranges_result(R, "dirty_must", w, arrow)?,
            }
        }
        b"L1_MEMORY" => {
            const R: &str = "L1_MEMORY";
            let ([bytes, shift], arrow) = fields(R, w, &[hx("bytes"), dc("l0_page_shift")])?;
            no_result(R, arrow)?;
            NestedRecord::L1Memory {
                line: lineno,
                bytes,
                l0_page_shift: small(R, "l0_page_shift", shift, &[16, 21], "16 or 21")?,
            }
        }
        b"L1_BASE_PAGE" => {
            const R: &str = "L1_BASE_PAGE";
            let ([shift], arrow) = fields(R, w, &[dc("shift")])?;
            no_result(R, arrow)?;
            NestedRecord::L1BasePage {
                line: lineno,
                shift: small(R, "shift", shift, &[16, 12], "16 or 12")?,
            }
        }
        other => return Err(NestedLineError::UnknownRecord(lossy(other))),
    };
    Ok(NestedLine::Record(rec))
}

/// Whether `text` (the start of a decompressed trace) is in this format: its first
/// line that is not blank or a comment starts with `L1_MEMORY`.
pub fn looks_nested(text: &[u8]) -> bool {
    text.split(|&c| c == b'\n')
        .find_map(|l| match trim_line(l) {
            Trimmed::Body(b) => Some(b),
            _ => None,
        })
        .is_some_and(|l| l.starts_with(b"L1_MEMORY ") || l == b"L1_MEMORY")
}

/// Checks a body record against the header: stores inside L1 RAM, no header record out
/// of place. (Host ranges are not checked: a notifier range may extend past the slot.)
fn check_body(h: &NestedHeader, r: &NestedRecord) -> Result<(), NestedLineError> {
    match *r {
        NestedRecord::L1Memory { .. } | NestedRecord::L1BasePage { .. } => {
            Err(NestedLineError::Header(HeaderError::Repeated))
        }
        NestedRecord::L1Store { gpa, .. }
            if gpa.checked_add(8).is_none_or(|e| e > h.l1_memory_bytes) =>
        {
            Err(NestedLineError::OutsideRam {
                record: "L1_STORE",
                what: "gpa",
                value: gpa,
                ram: h.l1_memory_bytes,
            })
        }
        _ => Ok(()),
    }
}

/// Streams a nested trace: header first, then one record at a time.
pub struct NestedReader<R> {
    lines: Lines<R>,
    header: NestedHeader,
}

format_error!(NestedTraceError, NestedLineError);

// `open` and `from_reader` also read (and check) the header.
open_constructors!(NestedReader, NestedTraceError, NestedReader::new);

impl NestedReader<DynBufRead> {
    /// Whether the file at `path` is a nested trace (by content, gzip or plain).
    pub fn detect(path: impl AsRef<Path>) -> Result<bool, NestedTraceError> {
        let (mut inner, name) = open_path::<NestedTraceError>(path.as_ref())?;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut inner)
                .take(MAX_LINE_BYTES as u64)
                .read_until(b'\n', &mut line)
                .map_err(|source| NestedTraceError::Io {
                    file: name.clone(),
                    source,
                })?;
            if n == 0 {
                return Ok(false);
            }
            if let Trimmed::Body(t) = trim_line(&line) {
                return Ok(looks_nested(t));
            }
        }
    }
}

impl<R: BufRead> NestedReader<R> {
    /// Reads plain text from `inner` (`file` names it in errors) and its header.
    pub fn new(inner: R, file: impl Into<String>) -> Result<Self, NestedTraceError> {
        let mut r = NestedReader {
            lines: Lines::new(inner, file.into(), 512),
            header: NestedHeader {
                l1_memory_bytes: 0,
                l0_page_shift: 0,
                l1_base_page_shift: 0,
            },
        };
        let (bytes, l0_page_shift) = match r.next_raw()? {
            Some(NestedRecord::L1Memory {
                bytes,
                l0_page_shift,
                ..
            }) => (bytes, l0_page_shift),
            _ => {
                return Err(r
                    .lines
                    .malformed(NestedLineError::Header(HeaderError::NoL1Memory)))
            }
        };
        let l1_base_page_shift = match r.next_raw()? {
            Some(NestedRecord::L1BasePage { shift, .. }) => shift,
            _ => {
                return Err(r
                    .lines
                    .malformed(NestedLineError::Header(HeaderError::NoL1BasePage)))
            }
        };
        r.header = NestedHeader {
            l1_memory_bytes: bytes,
            l0_page_shift,
            l1_base_page_shift,
        };
        Ok(r)
    }

    /// The header.
    pub fn header(&self) -> NestedHeader {
        self.header
    }

    /// The file name used in errors.
    pub fn file(&self) -> &str {
        self.lines.file()
    }

    /// The 1-based number of the line last read.
    pub fn line_number(&self) -> u64 {
        self.lines.line_number()
    }

    /// The next record, header included, unchecked against the header.
    fn next_raw(&mut self) -> Result<Option<NestedRecord>, NestedTraceError> {
        loop {
            match self.lines.next_parsed(parse_nested_line)? {
                None => return Ok(None),
                Some(NestedLine::Record(r)) => return Ok(Some(r)),
                Some(_) => {}
            }
        }
    }

    /// The next record after the header; `None` at the end.
    pub fn next_record(&mut self) -> Result<Option<NestedRecord>, NestedTraceError> {
        let Some(r) = self.next_raw()? else {
            return Ok(None);
        };
        check_body(&self.header, &r).map_err(|k| self.lines.malformed(k))?;
        Ok(Some(r))
    }
}

record_iterator!(NestedReader, NestedRecord, NestedTraceError);

/// Parses a whole in-memory text (already decompressed): checks the header, then calls
/// `f` on every record after it. Returns the header and the number of records (header
/// included).
pub fn for_each_nested_record(
    text: &[u8],
    file: &str,
    mut f: impl FnMut(NestedRecord),
) -> Result<(NestedHeader, u64), NestedTraceError> {
    let mut lineno = 0u64;
    let mut n = 0u64;
    let mut bytes = None;
    let mut header = None;
    let err = |line, kind| NestedTraceError::malformed(file.to_owned(), line, kind);
    for (no, line) in numbered_lines(text) {
        lineno = no;
        let rec = match parse_nested_line(line, lineno) {
            Ok(NestedLine::Record(r)) => r,
            Ok(_) => continue,
            Err(kind) => return Err(err(lineno, kind)),
        };
        n += 1;
        match (&header, bytes, rec) {
            (Some(h), _, r) => {
                check_body(h, &r).map_err(|k| err(lineno, k))?;
                f(r);
            }
            (
                None,
                None,
                NestedRecord::L1Memory {
                    bytes: b,
                    l0_page_shift,
                    ..
                },
            ) => {
                bytes = Some((b, l0_page_shift));
            }
            (None, None, _) => {
                return Err(err(
                    lineno,
                    NestedLineError::Header(HeaderError::NoL1Memory),
                ))
            }
            (None, Some((b, s)), NestedRecord::L1BasePage { shift, .. }) => {
                header = Some(NestedHeader {
                    l1_memory_bytes: b,
                    l0_page_shift: s,
                    l1_base_page_shift: shift,
                });
            }
            (None, Some(_), _) => {
                return Err(err(
                    lineno,
                    NestedLineError::Header(HeaderError::NoL1BasePage),
                ))
            }
        }
    }
    match header {
        Some(h) => Ok((h, n)),
        None => Err(err(lineno, NestedLineError::Header(HeaderError::Truncated))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(s: &str) -> NestedRecord {
        match parse_nested_line(s.as_bytes(), 9) {
            Ok(NestedLine::Record(r)) => r,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn err(s: &str) -> NestedLineError {
        match parse_nested_line(s.as_bytes(), 1) {
            Err(e) => e,
            Ok(l) => panic!("parsed: {l:?}"),
        }
    }

    const HEAD: &str = "# nested-radix trace v1\nL1_MEMORY bytes=0xc00000000 l0_page_shift=16\nL1_BASE_PAGE shift=16\n";

    #[test]
    fn every_record_kind() {
        assert_eq!(
            rec("L1_MEMORY bytes=0xc00000000 l0_page_shift=21"),
            NestedRecord::L1Memory {
                line: 9,
                bytes: 0xc_0000_0000,
                l0_page_shift: 21
            }
        );
        assert_eq!(
            rec("L1_BASE_PAGE shift=12"),
            NestedRecord::L1BasePage { line: 9, shift: 12 }
        );
        assert_eq!(
            rec("L1_STORE gpa=0x173d0 val=0xc0000000001000ad"),
            NestedRecord::L1Store {
                line: 9,
                gpa: 0x173d0,
                val: 0xc0000000001000ad
            }
        );
        assert_eq!(
            rec("H_SET_PARTITION_TABLE ptcr=0x10005 -> ret=-4"),
            NestedRecord::SetPartitionTable {
                line: 9,
                ptcr: 0x10005,
                ret: -4
            }
        );
        assert_eq!(
            rec("H_TLB_INVALIDATE instr=0x90000 rs=0x73d rb=0x800 -> ret=0"),
            NestedRecord::TlbInvalidate {
                line: 9,
                instr: 0x90000,
                rs: 0x73d,
                rb: 0x800,
                ret: 0
            }
        );
        assert_eq!(
            rec("HOST_UNMAP gfn=0x30023 npages=2"),
            NestedRecord::HostUnmap {
                line: 9,
                gfn: 0x30023,
                npages: 2
            }
        );
        let NestedRecord::HostAge {
            gfn,
            npages,
            young_must,
            ..
        } = rec("HOST_AGE gfn=0xfff7 npages=32 -> young_must=0x10000-0x10001,0x10003-0x10006")
        else {
            panic!()
        };
        assert_eq!((gfn, npages), (0xfff7, 32));
        assert_eq!(young_must.gfn_count(), 6);
        assert!(young_must.contains(0x10001) && !young_must.contains(0x10002));
        assert!(young_must.contains(0x10006) && !young_must.contains(0x10007));
        assert_eq!(
            young_must.gfns().collect::<Vec<_>>(),
            [0x10000, 0x10001, 0x10003, 0x10004, 0x10005, 0x10006]
        );
        let NestedRecord::HostDirtyLog { dirty_must, .. } = rec("HOST_DIRTY_LOG -> dirty_must=-")
        else {
            panic!()
        };
        assert!(dirty_must.is_empty());
        let NestedRecord::HostDirtyLog { dirty_must, .. } =
            rec("HOST_DIRTY_LOG -> dirty_must=0x0-0xffffffffffffffff")
        else {
            panic!()
        };
        assert_eq!(dirty_must.gfn_count(), u64::MAX);
        assert!(dirty_must.contains(u64::MAX));
        let NestedRecord::HostDirtyLog { dirty_must, .. } =
            rec("HOST_DIRTY_LOG -> dirty_must=0x5,0x7-0x9")
        else {
            panic!()
        };
        assert_eq!(
            dirty_must.ranges(),
            &[
                GfnRange { first: 5, last: 5 },
                GfnRange { first: 7, last: 9 }
            ]
        );
    }

    #[test]
    fn every_access_outcome() {
        let out = |s: &str| match rec(s) {
            NestedRecord::L2Access {
                outcome,
                acc,
                lpid,
                gpa,
                ..
            } => (lpid, gpa, acc, outcome),
            r => panic!("{r:?}"),
        };
        assert_eq!(
            out("L2_ACCESS lpid=1853 gpa=0x3b9a6000 acc=r -> ok l1gpa=0x100006000"),
            (
                1853,
                0x3b9a6000,
                AccessKind::Read,
                AccessOutcome::Ok {
                    l1gpa: 0x1_0000_6000
                }
            )
        );
        assert_eq!(
            out("L2_ACCESS lpid=1 gpa=0x0 acc=w -> hdsi cause=0x2080000 asdr=0x3b9a6000").3,
            AccessOutcome::Hdsi {
                cause: 0x2080000,
                asdr: 0x3b9a6000
            }
        );
        assert_eq!(
            out("L2_ACCESS lpid=1 gpa=0x0 acc=x -> hisi asdr=0x1000 cause=0x80000").3,
            AccessOutcome::Hisi {
                cause: 0x80000,
                asdr: 0x1000
            }
        );
        assert_eq!(
            out("L2_ACCESS lpid=1 gpa=0x0 acc=w -> mmio l1gpa=0xd00000000").3,
            AccessOutcome::Mmio {
                l1gpa: 0xd_0000_0000
            }
        );
        assert_eq!(
            out("L2_ACCESS lpid=0 gpa=0x10000 acc=r -> ret=-4").3,
            AccessOutcome::Ret(-4)
        );
        assert_eq!(
            out("L2_ACCESS gpa=0x10000 acc=x lpid=1 -> ret=3").2,
            AccessKind::Exec
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            err("L2_ACCES lpid=1"),
            NestedLineError::UnknownRecord("L2_ACCES".into())
        );
        crate::lex::table::check(
            err,
            &[
                (
                    "L2_ACCESS lpid=1 gpa=0x0 acc=q -> ret=0",
                    "BadValue",
                    Some("acc"),
                ),
                (
                    "L2_ACCESS lpid=0x1 gpa=0x0 acc=r -> ret=0",
                    "BadValue",
                    Some("lpid"),
                ),
                ("L2_ACCESS lpid=1 gpa=0x0 acc=r", "MissingResult", None),
                ("L2_ACCESS lpid=1 gpa=0x0 acc=r ->", "MissingResult", None),
                (
                    "L2_ACCESS lpid=1 gpa=0x0 acc=r -> fault",
                    "UnknownOutcome",
                    None,
                ),
                (
                    "L2_ACCESS lpid=1 gpa=0x0 acc=r -> ok",
                    "MissingKey",
                    Some("l1gpa"),
                ),
                (
                    "L2_ACCESS lpid=1 gpa=0x0 acc=r -> ok l1gpa=0x1 l1gpa=0x1",
                    "DuplicateKey",
                    Some("l1gpa"),
                ),
                (
                    "L2_ACCESS lpid=1 gpa=0x0 acc=r -> hdsi cause=0x1 asdr=0x0 x=0x1",
                    "UnknownKey",
                    None,
                ),
                (
                    "L2_ACCESS lpid=1 gpa=0x0 acc=r -> ret=0 -> ret=0",
                    "UnexpectedResult",
                    None,
                ),
                (
                    "L2_ACCESS lpid=1 lpid=1 gpa=0x0 acc=r -> ret=0",
                    "DuplicateKey",
                    Some("lpid"),
                ),
                ("L1_STORE gpa=0x4 val=0x0", "BadValue", Some("gpa")),
                (
                    "L1_STORE gpa=0x8 val=0x0 -> ret=0",
                    "UnexpectedResult",
                    None,
                ),
                ("L1_STORE gpa=0x8", "MissingKey", Some("val")),
                ("L1_STORE gpa=0x8 val", "BadField", None),
                ("H_SET_PARTITION_TABLE ptcr=0x1", "MissingResult", None),
                (
                    "H_SET_PARTITION_TABLE ptcr=0x1 -> ret=0x0",
                    "BadValue",
                    Some("ret"),
                ),
                (
                    "H_TLB_INVALIDATE instr=0x1 rs=0x1 -> ret=0",
                    "MissingKey",
                    Some("rb"),
                ),
                ("HOST_AGE gfn=0x1 npages=2", "MissingResult", None),
                (
                    "HOST_AGE gfn=0x1 npages=2 -> dirty_must=-",
                    "UnknownKey",
                    None,
                ),
                (
                    "HOST_AGE gfn=0x1 npages=2 -> young_must=0x3,0x2",
                    "BadValue",
                    None,
                ),
                (
                    "HOST_AGE gfn=0x1 npages=2 -> young_must=0x3-0x4,0x4",
                    "BadValue",
                    None,
                ),
                (
                    "HOST_AGE gfn=0x1 npages=2 -> young_must=0x5-0x4",
                    "BadValue",
                    None,
                ),
                ("HOST_AGE gfn=0x1 npages=2 -> young_must=", "BadValue", None),
                (
                    "HOST_AGE gfn=0x1 npages=2 -> young_must=0x1,",
                    "BadValue",
                    None,
                ),
                (
                    "HOST_AGE gfn=0x1 npages=2 -> young_must=- young_must=-",
                    "DuplicateKey",
                    None,
                ),
                ("HOST_DIRTY_LOG", "MissingResult", None),
                ("HOST_DIRTY_LOG x=0x1 -> dirty_must=-", "UnknownKey", None),
                ("HOST_UNMAP gfn=0x1 npages=0x2", "BadValue", Some("npages")),
                ("L1_MEMORY bytes=0x1000 l0_page_shift=12", "BadValue", None),
                ("L1_BASE_PAGE shift=21", "BadValue", None),
                ("L1_BASE_PAGE shift=99999999999999", "BadValue", None),
            ],
        );
        let e = err("H_SET_PARTITION_TABLE ptcr=0x1 -> ret=-99999999999999999999");
        assert!(
            matches!(
                e,
                NestedLineError::Field(FieldError::BadValue { key: "ret", .. })
            ),
            "{e}"
        );
    }

    #[test]
    fn reader_checks_the_header_and_ram() {
        let text = format!("{HEAD}L1_STORE gpa=0x10 val=0x1\n\n# c\nHOST_UNMAP gfn=0x0 npages=1\n");
        let mut r = NestedReader::new(io::Cursor::new(text.clone()), "t").unwrap();
        assert_eq!(
            r.header(),
            NestedHeader {
                l1_memory_bytes: 0xc_0000_0000,
                l0_page_shift: 16,
                l1_base_page_shift: 16
            }
        );
        assert_eq!(r.header().gfn_count(), 0xc0000);
        let recs: Vec<_> = r.by_ref().collect::<Result<_, _>>().unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].line(), 4);
        assert_eq!(recs[1].line(), 7);
        let (h, n) = for_each_nested_record(text.as_bytes(), "t", |_| ()).unwrap();
        assert_eq!((h.l0_page_shift, n), (16, 4));

        for (body, msg) in [
            (
                "L1_STORE gpa=0xbfffffff8 val=0x1\nL1_STORE gpa=0xc00000000 val=0x1\n",
                "t:5: L1_STORE: gpa 0xc00000000 is outside L1 RAM",
            ),
            ("L1_BASE_PAGE shift=16\n", "t:4: header record after"),
        ] {
            let text = format!("{HEAD}{body}");
            let e = NestedReader::new(io::Cursor::new(text.clone()), "t")
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap_err();
            assert!(e.to_string().starts_with(msg), "{e}");
            let e = for_each_nested_record(text.as_bytes(), "t", |_| ()).unwrap_err();
            assert!(e.to_string().starts_with(msg), "{e}");
        }
        for (text, msg) in [
            ("", "t:0: the file ends before"),
            ("# only a comment\n", "t:1: the file ends before"),
            (
                "L1_BASE_PAGE shift=16\n",
                "t:1: the first record must be L1_MEMORY",
            ),
            (
                "L1_MEMORY bytes=0x1000 l0_page_shift=16\nL1_STORE gpa=0x0 val=0x0\n",
                "t:2: the second record",
            ),
        ] {
            let e = for_each_nested_record(text.as_bytes(), "t", |_| ()).unwrap_err();
            assert!(e.to_string().starts_with(msg), "{e}");
            assert!(NestedReader::new(io::Cursor::new(text), "t").is_err());
        }
    }

    #[test]
    fn format_detection_and_gzip() {
        assert!(looks_nested(HEAD.as_bytes()));
        assert!(!looks_nested(b"# realtrace v1\nHPT_ALLOC shift=23\n"));
        assert!(!looks_nested(b""));
        use flate2::write::GzEncoder;
        use std::io::Write;
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(format!("{HEAD}HOST_DIRTY_LOG -> dirty_must=0x1\n").as_bytes())
            .unwrap();
        let gz = enc.finish().unwrap();
        let r = NestedReader::from_reader(io::Cursor::new(gz), "t.gz").unwrap();
        let recs: Vec<_> = r.collect::<Result<_, _>>().unwrap();
        assert_eq!(recs.len(), 1);
        assert!(recs[0].has_result());
        assert_eq!(recs[0].name(), "HOST_DIRTY_LOG");
    }
}
