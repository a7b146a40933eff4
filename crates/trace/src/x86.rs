//! The x86 walk-trace format: real guest page-table walks (QEMU 7.2 TCG, `traces/x86/`).
//!
//! The format is described in `traces/x86/README.md`: gzip'd (or plain) text, one record
//! per line: `CPU` (a vCPU's control state), `WALK` (one page-table walk: every entry
//! read, every A/D update, and the translation or #PF), `INVLPG`, `FLUSH`, `#` comments
//! and `# console:` lines (which carry the `@@RT …@@` markers, see [`marker`]).
//!
//! Invariants:
//! * [`parse_x86_line`] never panics on any bytes; it allocates only the entry lists of a
//!   `WALK` record.
//! * Every record names each of its required keys exactly once; optional keys at most
//!   once; unknown keys, malformed numbers and unknown record names or flush reasons are
//!   errors, and every reader error names the file and the 1-based line.
//! * Numbers are `0x` hex except `cpu`, `cpl`, `smap`, `rcpl`, `a20`, `maxphy`, `psz`
//!   (decimal) and the flags `m32`, `ac`, `probe`, `trunc` (`0`/`1`); `exc=` takes either.
//! * Compression and format are detected from content ([`detect`]), never from the name.
//!
//! ```
//! use revmap_trace::x86::{parse_x86_line, AccessType, X86Line, X86Record, WalkOutcome};
//! let l = parse_x86_line(
//!     b"WALK cpu=0 va=0x1000 acc=w cpl=3 smap=0 pte=0x2000:0x3067,0x3008:0x5007 \
//!       ad=0x3008:0x5067 -> pa=0x5000 psz=12 prot=rw-", 7).unwrap();
//! let X86Line::Record(X86Record::Walk(w)) = l else { panic!() };
//! assert_eq!((w.line, w.acc, w.cpl), (7, AccessType::Write, 3));
//! assert_eq!(w.ptes.len(), 2);
//! assert_eq!(w.ad[0].new, Some(0x5067));
//! assert!(matches!(w.outcome, WalkOutcome::Translated { pa: 0x5000, psz: 12, .. }));
//! ```

use crate::lex::{lossy, parse_hex, parse_udec, split_kv, FieldError, Seen, Words};
use crate::line::LineError;
use crate::reader::{open_constructors, open_source, record_iterator, Lines, TraceError};
use std::fs::File;
use std::io::{BufRead, Read};
use std::path::Path;

/// Which trace format a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The x86 walk-trace format (this module).
    X86,
    /// The PAPR HPT hypercall format ([`crate::parse_line`]).
    Hpt,
    /// Neither could be recognised from the first bytes.
    Unknown,
}

/// Recognises the format from the first bytes of a (decompressed) trace: the first
/// record line decides (`CPU`/`WALK`/`INVLPG`/`FLUSH` → x86, `H_*`/`HPT_*`/`HW_SET_*` →
/// HPT); before any record, a header comment `x86 walk log` also means x86.
pub fn detect(head: &[u8]) -> Kind {
    for line in head.split(|&c| c == b'\n') {
        let t = line.trim_ascii();
        if let Some(c) = t.strip_prefix(b"#") {
            if c.windows(12).any(|w| w == b"x86 walk log") {
                return Kind::X86;
            }
            continue;
        }
        let word = t
            .split(|&c| c == b' ' || c == b'\t')
            .next()
            .unwrap_or_default();
        match word {
            b"" => continue,
            b"CPU" | b"WALK" | b"INVLPG" | b"FLUSH" => return Kind::X86,
            w if w.starts_with(b"H_") || w.starts_with(b"HPT_") || w.starts_with(b"HW_SET_") => {
                return Kind::Hpt
            }
            _ => return Kind::Unknown,
        }
    }
    Kind::Unknown
}

/// [`detect`] on a file, decompressing its head if it starts with the gzip magic.
pub fn detect_file(path: impl AsRef<Path>) -> Result<Kind, TraceError> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let io_err = |source| TraceError::Io {
        file: file.clone(),
        source,
    };
    let f = File::open(path).map_err(io_err)?;
    let mut src = open_source(f).map_err(io_err)?;
    let mut head = Vec::with_capacity(1 << 16);
    // A truncated or corrupt stream still lets the bytes read so far decide.
    let _ = src.by_ref().take(1 << 16).read_to_end(&mut head);
    Ok(detect(&head))
}

/// A `CPU` record: the vCPU's control state for its following records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CpuRecord {
    /// 1-based line number.
    pub line: u64,
    /// vCPU index.
    pub cpu: u32,
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER (LMA included).
    pub efer: u64,
    /// PKRU.
    pub pkru: u64,
    /// IA32_PKRS.
    pub pkrs: u64,
    /// The A20 gate is enabled (else bit 20 of the final pa is masked).
    pub a20: bool,
    /// The CPU's physical-address width (bits at or above are reserved).
    pub maxphy: u8,
}

/// The access type of a walk (`acc=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessType {
    /// `r`: a data read.
    Read,
    /// `w`: a data write.
    Write,
    /// `x`: an instruction fetch.
    Fetch,
}

/// One paging-structure entry a walk read (`pte=GPA:VAL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PteRead {
    /// The entry's guest-physical address.
    pub gpa: u64,
    /// Its 64-bit value as read, before this walk's A/D update.
    pub val: u64,
}

/// One A/D update a walk attempted (`ad=GPA:NEWVAL` or `ad=GPA:fail`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AdUpdate {
    /// The entry's guest-physical address.
    pub gpa: u64,
    /// The full value after the successful compare-exchange; `None` if it lost (`fail`).
    pub new: Option<u64>,
}

/// The permissions QEMU entered into its TLB (`prot=`): a TLB detail, not architectural.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Prot {
    /// `r`.
    pub read: bool,
    /// `w`.
    pub write: bool,
    /// `x`.
    pub exec: bool,
}

/// How a walk ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WalkOutcome {
    /// `pa=… psz=… prot=…`.
    Translated {
        /// The guest-physical address of `va`.
        pa: u64,
        /// log2 of the size of the page the leaf maps (12, 21 or 30).
        psz: u8,
        /// QEMU's TLB permissions.
        prot: Prot,
    },
    /// `fault ec=…`: a #PF with this error code (CR2 = va).
    PageFault {
        /// The error code as pushed for the guest.
        ec: u64,
    },
    /// `exc=N ec=…`: another exception from the walker.
    Exception {
        /// The vector.
        vector: u64,
        /// Its error code.
        ec: u64,
    },
}

/// A `WALK` record: one translation that missed QEMU's TLB.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WalkRecord {
    /// 1-based line number.
    pub line: u64,
    /// vCPU index.
    pub cpu: u32,
    /// The linear address walked.
    pub va: u64,
    /// Read, write or fetch.
    pub acc: AccessType,
    /// The privilege the permission checks use (0 or 3).
    pub cpl: u8,
    /// The mmu index is a "KSMAP" one: user pages neither readable nor writable.
    pub smap: bool,
    /// `m32=1`: a 32-bit mmu index (va truncated to 32 bits).
    pub m32: bool,
    /// `rcpl=N`: the real CPL when it differs from `cpl` (implicit supervisor access).
    pub rcpl: Option<u8>,
    /// `ac=1`: EFLAGS.AC was set.
    pub ac: bool,
    /// `probe=1`: a non-faulting probe.
    pub probe: bool,
    /// `trunc=1`: more than 64 reads or A/D attempts (lists truncated).
    pub trunc: bool,
    /// Every entry read, top level first, in read order.
    pub ptes: Vec<PteRead>,
    /// Every A/D update attempted, in order.
    pub ad: Vec<AdUpdate>,
    /// The translation, #PF or other exception.
    pub outcome: WalkOutcome,
}

impl WalkRecord {
    /// `rcpl=3 cpl=0`: an implicit supervisor access from user mode.
    pub fn implicit_supervisor(&self) -> bool {
        self.rcpl.is_some_and(|r| r == 3) && self.cpl == 0
    }
}

/// Why QEMU flushed a vCPU's whole TLB (`FLUSH cpu=N REASON`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlushReason {
    /// `cr0`: PG, WP or PE changed.
    Cr0,
    /// `cr3`: any CR3 write while PG=1.
    Cr3,
    /// `cr4`: PGE, PAE, PSE, SMEP, SMAP or LA57 changed.
    Cr4,
    /// `a20`: the A20 gate changed.
    A20,
    /// `wrpkru`.
    Wrpkru,
    /// `xrstor-pkru`.
    XrstorPkru,
    /// `pkrs`.
    Pkrs,
}

impl FlushReason {
    /// Every reason, in README order.
    pub const ALL: [FlushReason; 7] = [
        FlushReason::Cr0,
        FlushReason::Cr3,
        FlushReason::Cr4,
        FlushReason::A20,
        FlushReason::Wrpkru,
        FlushReason::XrstorPkru,
        FlushReason::Pkrs,
    ];

    /// The name in the trace.
    pub const fn name(self) -> &'static str {
        match self {
            FlushReason::Cr0 => "cr0",
            FlushReason::Cr3 => "cr3",
            FlushReason::Cr4 => "cr4",
            FlushReason::A20 => "a20",
            FlushReason::Wrpkru => "wrpkru",
            FlushReason::XrstorPkru => "xrstor-pkru",
            FlushReason::Pkrs => "pkrs",
        }
    }
}

/// One x86 trace record.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum X86Record {
    /// `CPU …`.
    Cpu(CpuRecord),
    /// `WALK …`.
    Walk(WalkRecord),
    /// `INVLPG cpu=N va=…`.
    Invlpg {
        /// 1-based line number.
        line: u64,
        /// vCPU index.
        cpu: u32,
        /// The invalidated linear address.
        va: u64,
    },
    /// `FLUSH cpu=N REASON`.
    Flush {
        /// 1-based line number.
        line: u64,
        /// vCPU index.
        cpu: u32,
        /// Why.
        reason: FlushReason,
    },
}

impl X86Record {
    /// The 1-based line number.
    pub fn line(&self) -> u64 {
        match self {
            X86Record::Cpu(c) => c.line,
            X86Record::Walk(w) => w.line,
            X86Record::Invlpg { line, .. } | X86Record::Flush { line, .. } => *line,
        }
    }

    /// The vCPU.
    pub fn cpu(&self) -> u32 {
        match self {
            X86Record::Cpu(c) => c.cpu,
            X86Record::Walk(w) => w.cpu,
            X86Record::Invlpg { cpu, .. } | X86Record::Flush { cpu, .. } => *cpu,
        }
    }
}

/// One parsed line of an x86 trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum X86Line<'a> {
    /// An empty (or all-blank) line.
    Blank,
    /// `# console: TEXT`: one line of guest serial output.
    Console(&'a [u8]),
    /// Any other `#` line (text after `#` and leading blanks).
    Comment(&'a [u8]),
    /// A record.
    Record(X86Record),
}

/// An `@@RT NAME ARGS@@` marker in a console line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtMarker<'a> {
    /// `INIT-REACHED`, `INFO`, `WORKLOAD-BEGIN`, `PHASE`, `WORKLOAD-END`, `POWEROFF`, ….
    pub name: &'a [u8],
    /// The rest before the closing `@@` (trimmed; may be empty).
    pub args: &'a [u8],
}

/// The `@@RT …@@` marker in a console line's text, if any.
pub fn marker(console: &[u8]) -> Option<RtMarker<'_>> {
    let start = console.windows(5).position(|w| w == b"@@RT ")? + 5;
    let rest = &console[start..];
    let end = rest.windows(2).position(|w| w == b"@@")?;
    let body = rest[..end].trim_ascii();
    let split = body.iter().position(|&c| c == b' ').unwrap_or(body.len());
    Some(RtMarker {
        name: &body[..split],
        args: body[split..].trim_ascii(),
    })
}

fn bad(record: &'static str, key: &'static str, v: &[u8], expected: &'static str) -> LineError {
    FieldError::bad_value(record, key, v, expected).into()
}

fn hex(record: &'static str, key: &'static str, v: &[u8]) -> Result<u64, LineError> {
    parse_hex(v).ok_or_else(|| bad(record, key, v, "0x-prefixed hex u64"))
}

fn dec<T: TryFrom<u64>>(record: &'static str, key: &'static str, v: &[u8]) -> Result<T, LineError> {
    parse_udec(v)
        .and_then(|x| T::try_from(x).ok())
        .ok_or_else(|| bad(record, key, v, "unsigned decimal"))
}

fn flag(record: &'static str, key: &'static str, v: &[u8]) -> Result<bool, LineError> {
    match v {
        b"0" => Ok(false),
        b"1" => Ok(true),
        _ => Err(bad(record, key, v, "0 or 1")),
    }
}

/// Parses one line of an x86 trace (with or without its newline); `lineno` is stored in
/// the record.
pub fn parse_x86_line(line: &[u8], lineno: u64) -> Result<X86Line<'_>, LineError> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return Ok(X86Line::Blank);
    }
    if let Some(c) = line.strip_prefix(b"#") {
        if let Some(text) = c.strip_prefix(b" console:") {
            return Ok(X86Line::Console(text.strip_prefix(b" ").unwrap_or(text)));
        }
        return Ok(X86Line::Comment(c.trim_ascii_start()));
    }
    let mut w = Words::new(line);
    let name = w.next().unwrap_or_default();
    let rec = match name {
        b"CPU" => X86Record::Cpu(parse_cpu(w, lineno)?),
        b"WALK" => X86Record::Walk(parse_walk(w, lineno)?),
        b"INVLPG" => {
            let r = "INVLPG";
            let mut seen = Seen::new(r, ["cpu", "va"]);
            let (mut cpu, mut va) = (0, 0);
            for tok in w {
                if tok == b"->" {
                    return Err(LineError::Field(FieldError::UnexpectedResult { record: r }));
                }
                let (k, v) = split_kv(r, tok)?;
                match seen.mark(k)? {
                    0 => cpu = dec(r, "cpu", v)?,
                    _ => va = hex(r, "va", v)?,
                }
            }
            seen.require(2)?;
            X86Record::Invlpg {
                line: lineno,
                cpu,
                va,
            }
        }
        b"FLUSH" => {
            let r = "FLUSH";
            let mut seen = Seen::new(r, ["cpu"]);
            let mut cpu = 0;
            let mut reason = None;
            for tok in w {
                if tok == b"->" {
                    return Err(LineError::Field(FieldError::UnexpectedResult { record: r }));
                }
                if !tok.contains(&b'=') {
                    let found = FlushReason::ALL
                        .into_iter()
                        .find(|f| f.name().as_bytes() == tok);
                    match (found, reason) {
                        (Some(f), None) => reason = Some(f),
                        _ => {
                            return Err(LineError::Field(FieldError::BadField {
                                record: r,
                                token: lossy(tok),
                            }))
                        }
                    }
                    continue;
                }
                let (k, v) = split_kv(r, tok)?;
                seen.mark(k)?;
                cpu = dec(r, "cpu", v)?;
            }
            seen.require(1)?;
            let reason = reason.ok_or(LineError::Field(FieldError::MissingKey {
                record: r,
                key: "REASON",
            }))?;
            X86Record::Flush {
                line: lineno,
                cpu,
                reason,
            }
        }
        _ => return Err(LineError::UnknownRecord(lossy(name))),
    };
    Ok(X86Line::Record(rec))
}

fn parse_cpu<'a>(w: impl Iterator<Item = &'a [u8]>, line: u64) -> Result<CpuRecord, LineError> {
    let r = "CPU";
    let mut seen = Seen::new(
        r,
        [
            "cpu", "cr0", "cr3", "cr4", "efer", "pkru", "pkrs", "a20", "maxphy",
        ],
    );
    let mut c = CpuRecord {
        line,
        cpu: 0,
        cr0: 0,
        cr3: 0,
        cr4: 0,
        efer: 0,
        pkru: 0,
        pkrs: 0,
        a20: false,
        maxphy: 0,
    };
    for tok in w {
        if tok == b"->" {
            return Err(LineError::Field(FieldError::UnexpectedResult { record: r }));
        }
        let (k, v) = split_kv(r, tok)?;
        match seen.mark(k)? {
            0 => c.cpu = dec(r, "cpu", v)?,
            1 => c.cr0 = hex(r, "cr0", v)?,
            2 => c.cr3 = hex(r, "cr3", v)?,
            3 => c.cr4 = hex(r, "cr4", v)?,
            4 => c.efer = hex(r, "efer", v)?,
            5 => c.pkru = hex(r, "pkru", v)?,
            6 => c.pkrs = hex(r, "pkrs", v)?,
            7 => c.a20 = flag(r, "a20", v)?,
            _ => c.maxphy = dec(r, "maxphy", v)?,
        }
    }
    seen.require(9)?;
    Ok(c)
}

/// Parses `GPA:VAL,GPA:VAL,...` (`fail` allowed as VAL when `allow_fail`).
fn parse_pairs(
    r: &'static str,
    key: &'static str,
    v: &[u8],
    allow_fail: bool,
    mut push: impl FnMut(u64, Option<u64>),
) -> Result<(), LineError> {
    if v.is_empty() {
        return Err(bad(r, key, v, "GPA:VALUE list"));
    }
    for item in v.split(|&c| c == b',') {
        let mut parts = item.splitn(2, |&c| c == b':');
        let gpa = parts.next().and_then(parse_hex);
        let val = parts.next();
        let (Some(gpa), Some(val)) = (gpa, val) else {
            return Err(bad(r, key, item, "GPA:VALUE list"));
        };
        if allow_fail && val == b"fail" {
            push(gpa, None);
        } else {
            let Some(val) = parse_hex(val) else {
                return Err(bad(r, key, item, "GPA:VALUE list"));
            };
            push(gpa, Some(val));
        }
    }
    Ok(())
}

fn parse_walk<'a>(
    mut w: impl Iterator<Item = &'a [u8]>,
    line: u64,
) -> Result<WalkRecord, LineError> {
    let r = "WALK";
    let mut seen = Seen::new(
        r,
        [
            "cpu", "va", "acc", "cpl", "smap", "pte", "m32", "rcpl", "ac", "probe", "ad", "trunc",
        ],
    );
    let mut rec = WalkRecord {
        line,
        cpu: 0,
        va: 0,
        acc: AccessType::Read,
        cpl: 0,
        smap: false,
        m32: false,
        rcpl: None,
        ac: false,
        probe: false,
        trunc: false,
        ptes: Vec::new(),
        ad: Vec::new(),
        outcome: WalkOutcome::PageFault { ec: 0 },
    };
    let mut arrow = false;
    for tok in w.by_ref() {
        if tok == b"->" {
            arrow = true;
            break;
        }
        let (k, v) = split_kv(r, tok)?;
        match seen.mark(k)? {
            0 => rec.cpu = dec(r, "cpu", v)?,
            1 => rec.va = hex(r, "va", v)?,
            2 => {
                rec.acc = match v {
                    b"r" => AccessType::Read,
                    b"w" => AccessType::Write,
                    b"x" => AccessType::Fetch,
                    _ => return Err(bad(r, "acc", v, "r, w or x")),
                }
            }
            3 => rec.cpl = dec(r, "cpl", v)?,
            4 => rec.smap = flag(r, "smap", v)?,
            5 => parse_pairs(r, "pte", v, false, |gpa, val| {
                rec.ptes.push(PteRead {
                    gpa,
                    val: val.unwrap_or_default(),
                })
            })?,
            6 => rec.m32 = flag(r, "m32", v)?,
            7 => rec.rcpl = Some(dec(r, "rcpl", v)?),
            8 => rec.ac = flag(r, "ac", v)?,
            9 => rec.probe = flag(r, "probe", v)?,
            10 => parse_pairs(r, "ad", v, true, |gpa, new| {
                rec.ad.push(AdUpdate { gpa, new })
            })?,
            _ => rec.trunc = flag(r, "trunc", v)?,
        }
    }
    seen.require(6)?;
    if !arrow {
        return Err(LineError::MissingResult { record: r });
    }
    rec.outcome = parse_outcome(w)?;
    Ok(rec)
}

fn parse_outcome<'a>(mut w: impl Iterator<Item = &'a [u8]>) -> Result<WalkOutcome, LineError> {
    let r = "WALK";
    let first = w.next().ok_or(LineError::MissingResult { record: r })?;
    if first == b"fault" {
        let mut seen = Seen::new(r, ["ec"]);
        let mut ec = 0;
        for tok in w {
            let (k, v) = split_kv(r, tok)?;
            seen.mark(k)?;
            ec = hex(r, "ec", v)?;
        }
        seen.require(1)?;
        return Ok(WalkOutcome::PageFault { ec });
    }
    let rest = core::iter::once(first).chain(w);
    if first.starts_with(b"exc=") {
        let mut seen = Seen::new(r, ["exc", "ec"]);
        let (mut vector, mut ec) = (0, 0);
        for tok in rest {
            let (k, v) = split_kv(r, tok)?;
            match seen.mark(k)? {
                0 => {
                    vector = parse_hex(v)
                        .or_else(|| parse_udec(v))
                        .ok_or_else(|| bad(r, "exc", v, "vector"))?
                }
                _ => ec = hex(r, "ec", v)?,
            }
        }
        seen.require(2)?;
        return Ok(WalkOutcome::Exception { vector, ec });
    }
    let mut seen = Seen::new(r, ["pa", "psz", "prot"]);
    let (mut pa, mut psz, mut prot) = (0, 0, Prot::default());
    for tok in rest {
        let (k, v) = split_kv(r, tok)?;
        match seen.mark(k)? {
            0 => pa = hex(r, "pa", v)?,
            1 => psz = dec(r, "psz", v)?,
            _ => {
                prot = match v {
                    [a, b, c]
                        if matches!(a, b'r' | b'-')
                            && matches!(b, b'w' | b'-')
                            && matches!(c, b'x' | b'-') =>
                    {
                        Prot {
                            read: *a == b'r',
                            write: *b == b'w',
                            exec: *c == b'x',
                        }
                    }
                    _ => return Err(bad(r, "prot", v, "[r-][w-][x-]")),
                }
            }
        }
    }
    seen.require(3)?;
    Ok(WalkOutcome::Translated { pa, psz, prot })
}

/// Reads an x86 trace line by line, gzip or plain (detected by magic).
pub struct X86Reader<R> {
    lines: Lines<R>,
}

open_constructors!(X86Reader, TraceError, |src, file| Ok::<_, TraceError>(
    X86Reader::new(src, file)
));

impl<R: BufRead> X86Reader<R> {
    /// Reads plain text from `inner`; `file` names it in errors.
    pub fn new(inner: R, file: impl Into<String>) -> Self {
        X86Reader {
            lines: Lines::new(inner, file.into(), 1024),
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
    pub fn next_line(&mut self) -> Result<Option<X86Line<'_>>, TraceError> {
        self.lines.next_parsed(parse_x86_line)
    }

    /// The next record, skipping comments, console lines and blanks; `None` at end.
    pub fn next_record(&mut self) -> Result<Option<X86Record>, TraceError> {
        loop {
            match self.next_line()? {
                None => return Ok(None),
                Some(X86Line::Record(r)) => return Ok(Some(r)),
                Some(_) => {}
            }
        }
    }
}

record_iterator!(X86Reader, X86Record, TraceError);

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::{self, Write};

    const TEXT: &str = "# x86 walk log v1\n\
CPU cpu=0 cr0=0x80050033 cr3=0x100070000 cr4=0x751ef0 efer=0xd01 pkru=0x55555554 pkrs=0x0 a20=1 maxphy=40\n\
# console: @@RT INIT-REACHED@@\n\
WALK cpu=0 va=0xfffffe0000003004 acc=r cpl=0 smap=1 rcpl=3 pte=0x100070ff8:0x2a14067,0x2a14fe0:0x13fdcc067 -> pa=0x13ba06004 psz=12 prot=r--\n\
WALK cpu=0 va=0x00007ffe10d84728 acc=w cpl=3 smap=0 ac=1 pte=0x487c7f8:0x6204067 ad=0x487c7f8:fail,0x487c7f8:0x6204067 -> fault ec=0x7\n\
WALK cpu=1 va=0x0 acc=x cpl=0 smap=0 m32=1 probe=1 trunc=1 pte=0x0:0x0 -> exc=13 ec=0x0\n\
INVLPG cpu=0 va=0x00007ffe10d84000\n\
\n\
FLUSH cpu=0 xrstor-pkru\n";

    #[test]
    fn plain_and_gzip_parse_every_record_type() {
        let plain: Vec<_> = X86Reader::from_reader(io::Cursor::new(TEXT), "t")
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(TEXT.as_bytes()).unwrap();
        let gz: Vec<_> = X86Reader::from_reader(io::Cursor::new(enc.finish().unwrap()), "t.gz")
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(plain, gz);
        assert_eq!(plain.len(), 6);
        let X86Record::Cpu(c) = &plain[0] else {
            panic!()
        };
        assert_eq!(
            (c.cr3, c.efer, c.pkru, c.a20, c.maxphy),
            (0x1_0007_0000, 0xd01, 0x5555_5554, true, 40)
        );
        let X86Record::Walk(w) = &plain[1] else {
            panic!()
        };
        assert!(w.smap && w.implicit_supervisor() && !w.ac);
        assert_eq!(
            w.ptes[1],
            PteRead {
                gpa: 0x2a14fe0,
                val: 0x13fdcc067
            }
        );
        assert_eq!(
            w.outcome,
            WalkOutcome::Translated {
                pa: 0x13ba06004,
                psz: 12,
                prot: Prot {
                    read: true,
                    write: false,
                    exec: false
                }
            }
        );
        let X86Record::Walk(w) = &plain[2] else {
            panic!()
        };
        assert_eq!(
            (w.line, w.acc, w.cpl, w.ac),
            (5, AccessType::Write, 3, true)
        );
        assert_eq!(
            w.ad,
            vec![
                AdUpdate {
                    gpa: 0x487c7f8,
                    new: None
                },
                AdUpdate {
                    gpa: 0x487c7f8,
                    new: Some(0x6204067)
                }
            ]
        );
        assert_eq!(w.outcome, WalkOutcome::PageFault { ec: 7 });
        let X86Record::Walk(w) = &plain[3] else {
            panic!()
        };
        assert!(w.m32 && w.probe && w.trunc);
        assert_eq!(w.outcome, WalkOutcome::Exception { vector: 13, ec: 0 });
        assert_eq!(
            plain[4],
            X86Record::Invlpg {
                line: 7,
                cpu: 0,
                va: 0x7ffe10d84000
            }
        );
        assert_eq!(
            plain[5],
            X86Record::Flush {
                line: 9,
                cpu: 0,
                reason: FlushReason::XrstorPkru
            }
        );
    }

    #[test]
    fn console_markers() {
        let mut r = X86Reader::new(io::Cursor::new(TEXT), "t");
        assert_eq!(
            r.next_line().unwrap(),
            Some(X86Line::Comment(b"x86 walk log v1"))
        );
        r.next_line().unwrap();
        let Some(X86Line::Console(text)) = r.next_line().unwrap() else {
            panic!()
        };
        let m = marker(text).unwrap();
        assert_eq!((m.name, m.args), (&b"INIT-REACHED"[..], &b""[..]));
        let m = marker(b"x @@RT PHASE w1 fork-exec@@ y").unwrap();
        assert_eq!((m.name, m.args), (&b"PHASE"[..], &b"w1 fork-exec"[..]));
        assert_eq!(marker(b"@@RT unterminated"), None);
    }

    #[test]
    fn detect_by_content() {
        assert_eq!(detect(TEXT.as_bytes()), Kind::X86);
        assert_eq!(detect(b"# realtrace v1\nHPT_ALLOC shift=23\n"), Kind::Hpt);
        assert_eq!(detect(b"\nH_ENTER cpu=0"), Kind::Hpt);
        assert_eq!(detect(b"# hello\nWALK cpu=0"), Kind::X86);
        assert_eq!(detect(b"garbage"), Kind::Unknown);
        assert_eq!(detect(b""), Kind::Unknown);
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        let cases: [(&str, &str); 10] = [
            (
                "WALK cpu=0 va=0x1 acc=r cpl=0 smap=0 pte=0x0:0x1",
                "missing result",
            ),
            (
                "WALK cpu=0 va=0x1 acc=q cpl=0 smap=0 pte=0x0:0x1 -> fault ec=0x0",
                "bad value `q`",
            ),
            (
                "WALK cpu=0 va=0x1 acc=r cpl=0 smap=0 -> fault ec=0x0",
                "missing key `pte`",
            ),
            (
                "WALK cpu=0 va=0x1 acc=r cpl=0 smap=0 pte=0x0:0x1 -> pa=0x1 psz=12",
                "missing key `prot`",
            ),
            (
                "WALK cpu=0 va=0x1 acc=r cpl=0 smap=0 pte=0x0:zz -> fault ec=0x0",
                "bad value `0x0:zz`",
            ),
            ("WALK cpu=0 cpu=0 va=0x1", "duplicate key `cpu`"),
            ("CPU cpu=0 cr0=0x0", "missing key `cr3`"),
            ("FLUSH cpu=0 tlb", "malformed field `tlb`"),
            ("INVLPG cpu=0 va=0x1 extra=1", "unexpected key `extra`"),
            ("NOPE cpu=0", "unknown record `NOPE`"),
        ];
        for (line, want) in cases {
            let text = format!("FLUSH cpu=0 cr3\n{line}\n");
            let mut r = X86Reader::new(io::Cursor::new(text), "bad.txt");
            assert!(r.next_record().unwrap().is_some());
            let e = r.next_record().unwrap_err().to_string();
            assert!(e.starts_with("bad.txt:2: "), "{e}");
            assert!(e.contains(want), "{line}: {e}");
        }
    }
}
