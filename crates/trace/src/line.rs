//! Parsing of one trace line.
//!
//! Invariants:
//! * [`parse_line`] never panics and never allocates on success: it works on the raw
//!   bytes of the line, with hand-rolled hex/decimal parsing.
//! * Every hypercall record must name `cpu=` and every input key of its kind exactly
//!   once, and must carry `-> ret=N`; output keys are optional (the recorder writes them
//!   only on success, except for H_BULK_REMOVE) but each at most once. Unknown keys,
//!   duplicate keys and malformed numbers are errors.
//! * Key → register mapping (the README's table, PAPR ABI, `args[i]`/`outs[i]` = r(4+i)):
//!   inputs in the order the table lists them starting at r4; outputs likewise, except
//!   H_BULK_REMOVE's `rspN`, which the hypervisor writes over the request high word
//!   `tshN`, i.e. register r(4 + 2N).

pub use crate::lex::FieldError;
use crate::lex::{
    lossy, parse_hex, parse_idec, parse_udec, split_kv, trim_line, trim_start, Seen, Trimmed, Words,
};
use crate::record::{Expected, Hcall, HcallKind, HwBit, HwSet, Record};
use thiserror::Error;

/// Why one line failed to parse. Displayed after `file:line: `.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LineError {
    /// The first word is not a record name this parser knows.
    #[error("unknown record `{0}`")]
    UnknownRecord(String),
    /// A hypercall without `-> ret=N`.
    #[error("{record}: missing result (`-> ret=N ...`)")]
    MissingResult {
        /// Record name.
        record: &'static str,
    },
    /// A `key=value` field is wrong.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// The line is longer than the reader accepts.
    #[error("line longer than {0} bytes")]
    TooLong(usize),
}

/// One parsed line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// An empty (or all-blank) line.
    Blank,
    /// `# console: TEXT`: a line of guest console output (TEXT, raw bytes).
    Console(&'a [u8]),
    /// Any other `#` line (text after `#` and leading blanks).
    Comment(&'a [u8]),
    /// A record.
    Record(Record),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Radix {
    Hex,
    Dec,
}

/// One named register of a record.
struct Key {
    name: &'static str,
    reg: u8,
    radix: Radix,
}

const fn hx(name: &'static str, reg: u8) -> Key {
    Key {
        name,
        reg,
        radix: Radix::Hex,
    }
}

const fn dc(name: &'static str, reg: u8) -> Key {
    Key {
        name,
        reg,
        radix: Radix::Dec,
    }
}

const FLAGS_PTEX: [Key; 2] = [hx("flags", 0), hx("ptex", 1)];
const FLAGS_PTEX_AVPN: [Key; 3] = [hx("flags", 0), hx("ptex", 1), hx("avpn", 2)];
const ENTER_IN: [Key; 4] = [hx("flags", 0), hx("ptex", 1), hx("pteh", 2), hx("ptel", 3)];
const ENTER_OUT: [Key; 1] = [hx("idx", 0)];
const REMOVE_OUT: [Key; 2] = [hx("old_pteh", 0), hx("old_ptel", 1)];
const READ_OUT: [Key; 8] = [
    hx("pteh0", 0),
    hx("ptel0", 1),
    hx("pteh1", 2),
    hx("ptel1", 3),
    hx("pteh2", 4),
    hx("ptel2", 5),
    hx("pteh3", 6),
    hx("ptel3", 7),
];
const BULK_IN: [Key; 8] = [
    hx("tsh0", 0),
    hx("tsl0", 1),
    hx("tsh1", 2),
    hx("tsl1", 3),
    hx("tsh2", 4),
    hx("tsl2", 5),
    hx("tsh3", 6),
    hx("tsl3", 7),
];
const BULK_OUT: [Key; 4] = [hx("rsp0", 0), hx("rsp1", 2), hx("rsp2", 4), hx("rsp3", 6)];
const CLEAR_OUT: [Key; 1] = [hx("r4", 0)];
const RESIZE_IN: [Key; 2] = [hx("flags", 0), dc("shift", 1)];
const NO_KEYS: [Key; 0] = [];

/// Input and output keys of a hypercall kind.
fn keys(kind: HcallKind) -> (&'static [Key], &'static [Key]) {
    match kind {
        HcallKind::Enter => (&ENTER_IN, &ENTER_OUT),
        HcallKind::Remove => (&FLAGS_PTEX_AVPN, &REMOVE_OUT),
        HcallKind::Protect => (&FLAGS_PTEX_AVPN, &NO_KEYS),
        HcallKind::Read => (&FLAGS_PTEX, &READ_OUT),
        HcallKind::BulkRemove => (&BULK_IN, &BULK_OUT),
        HcallKind::ClearRef | HcallKind::ClearMod => (&FLAGS_PTEX, &CLEAR_OUT),
        HcallKind::ResizePrepare | HcallKind::ResizeCommit => (&RESIZE_IN, &NO_KEYS),
    }
}

fn kind_by_name(name: &[u8]) -> Option<HcallKind> {
    HcallKind::ALL
        .into_iter()
        .find(|k| k.name().as_bytes() == name)
}

fn parse_u32_dec(v: &[u8]) -> Option<u32> {
    u32::try_from(parse_udec(v)?).ok()
}

fn bad_number(record: &'static str, key: &'static str, v: &[u8], radix: Radix) -> LineError {
    let expected = match radix {
        Radix::Hex => "0x-prefixed hex u64",
        Radix::Dec => "unsigned decimal",
    };
    FieldError::bad_value(record, key, v, expected).into()
}

fn num(record: &'static str, key: &'static str, v: &[u8], radix: Radix) -> Result<u64, LineError> {
    let r = match radix {
        Radix::Hex => parse_hex(v),
        Radix::Dec => parse_udec(v),
    };
    r.ok_or_else(|| bad_number(record, key, v, radix))
}

fn small_dec(record: &'static str, key: &'static str, v: &[u8]) -> Result<u32, LineError> {
    parse_u32_dec(v).ok_or_else(|| bad_number(record, key, v, Radix::Dec))
}

/// Parses one line (with or without its trailing newline). `lineno` is stored in the record.
pub fn parse_line(line: &[u8], lineno: u64) -> Result<Line<'_>, LineError> {
    let line = match trim_line(line) {
        Trimmed::Blank => return Ok(Line::Blank),
        Trimmed::Comment(c) => {
            return Ok(match c.strip_prefix(b" console:") {
                Some(text) => Line::Console(text.strip_prefix(b" ").unwrap_or(text)),
                None => Line::Comment(trim_start(c)),
            })
        }
        Trimmed::Body(line) => line,
    };
    let mut words = Words::new(line);
    let name = words.next().unwrap_or_default();
    if let Some(kind) = kind_by_name(name) {
        return parse_hcall(kind, words, lineno).map(|h| Line::Record(Record::Hcall(h)));
    }
    let rec = match name {
        b"HPT_ALLOC" => {
            let [shift] = simple_fields("HPT_ALLOC", words, ["shift"])?;
            Record::HptAlloc {
                line: lineno,
                shift,
            }
        }
        b"HPT_SHIFT" => {
            let [old, new] = simple_fields("HPT_SHIFT", words, ["old", "new"])?;
            Record::HptShift {
                line: lineno,
                old,
                new,
            }
        }
        b"HW_SET_R" => hw_set("HW_SET_R", HwBit::Reference, words, lineno)?,
        b"HW_SET_C" => hw_set("HW_SET_C", HwBit::Change, words, lineno)?,
        _ => return Err(LineError::UnknownRecord(lossy(name))),
    };
    Ok(Line::Record(rec))
}

/// Records made only of required keys, each parsed by `value` (no result).
fn keyed_fields<T: Copy + Default, const N: usize>(
    record: &'static str,
    words: Words<'_>,
    names: [&'static str; N],
    value: impl Fn(&'static str, &'static str, &[u8]) -> Result<T, LineError>,
) -> Result<[T; N], LineError> {
    let mut vals = [T::default(); N];
    let mut seen = Seen::new(record, names);
    for tok in words {
        if tok == b"->" {
            return Err(LineError::Field(FieldError::UnexpectedResult { record }));
        }
        let (k, v) = split_kv(record, tok)?;
        let i = seen.mark(k)?;
        vals[i] = value(record, names[i], v)?;
    }
    seen.require(N)?;
    Ok(vals)
}

/// Records made only of required small decimal keys.
fn simple_fields<const N: usize>(
    record: &'static str,
    words: Words<'_>,
    names: [&'static str; N],
) -> Result<[u32; N], LineError> {
    keyed_fields(record, words, names, small_dec)
}

fn hw_set(
    record: &'static str,
    bit: HwBit,
    words: Words<'_>,
    line: u64,
) -> Result<Record, LineError> {
    let [ptex, pte1] = keyed_fields(record, words, ["ptex", "pte1"], |r, k, v| {
        num(r, k, v, Radix::Hex)
    })?;
    Ok(Record::HwSet(HwSet {
        line,
        bit,
        ptex,
        pte1,
    }))
}

#[inline]
fn parse_hcall(kind: HcallKind, mut words: Words<'_>, line: u64) -> Result<Hcall, LineError> {
    let record = kind.name();
    let (ins, outs) = keys(kind);
    let mut args = [0u64; 8];
    let mut seen_in = 0u16;
    let mut cpu: Option<u32> = None;
    let mut has_result = false;
    for tok in words.by_ref() {
        if tok == b"->" {
            has_result = true;
            break;
        }
        let (k, v) = split_kv(record, tok)?;
        if k == b"cpu" {
            if cpu.is_some() {
                return Err(LineError::Field(FieldError::DuplicateKey {
                    record,
                    key: "cpu",
                }));
            }
            cpu = Some(small_dec(record, "cpu", v)?);
            continue;
        }
        let Some(i) = ins.iter().position(|key| key.name.as_bytes() == k) else {
            return Err(LineError::Field(FieldError::UnknownKey {
                record,
                key: lossy(k),
            }));
        };
        let key = &ins[i];
        if seen_in & (1 << i) != 0 {
            return Err(LineError::Field(FieldError::DuplicateKey {
                record,
                key: key.name,
            }));
        }
        seen_in |= 1 << i;
        args[usize::from(key.reg)] = num(record, key.name, v, key.radix)?;
    }
    let Some(cpu) = cpu else {
        return Err(LineError::Field(FieldError::MissingKey {
            record,
            key: "cpu",
        }));
    };
    if let Some(i) = (0..ins.len()).find(|&i| seen_in & (1 << i) == 0) {
        return Err(LineError::Field(FieldError::MissingKey {
            record,
            key: ins[i].name,
        }));
    }
    if !has_result {
        return Err(LineError::MissingResult { record });
    }
    let mut expected = Expected::default();
    let mut seen_ret = false;
    for tok in words {
        if tok == b"->" {
            return Err(LineError::Field(FieldError::UnexpectedResult { record }));
        }
        let (k, v) = split_kv(record, tok)?;
        if k == b"ret" {
            if seen_ret {
                return Err(LineError::Field(FieldError::DuplicateKey {
                    record,
                    key: "ret",
                }));
            }
            seen_ret = true;
            expected.ret = parse_idec(v).ok_or_else(|| {
                LineError::Field(FieldError::BadValue {
                    record,
                    key: "ret",
                    value: lossy(v),
                    expected: "signed decimal",
                })
            })?;
            continue;
        }
        let Some(key) = outs.iter().find(|key| key.name.as_bytes() == k) else {
            return Err(LineError::Field(FieldError::UnknownKey {
                record,
                key: lossy(k),
            }));
        };
        let bit = 1u8 << key.reg;
        if expected.present & bit != 0 {
            return Err(LineError::Field(FieldError::DuplicateKey {
                record,
                key: key.name,
            }));
        }
        expected.present |= bit;
        expected.outs[usize::from(key.reg)] = num(record, key.name, v, key.radix)?;
    }
    if !seen_ret {
        return Err(LineError::Field(FieldError::MissingKey {
            record,
            key: "ret",
        }));
    }
    Ok(Hcall {
        line,
        cpu,
        kind,
        args,
        // The tables hold at most 8 keys.
        nargs: ins.len() as u8,
        expected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hcall(s: &str) -> Hcall {
        match parse_line(s.as_bytes(), 7) {
            Ok(Line::Record(Record::Hcall(h))) => h,
            other => panic!("not an hcall: {other:?}"),
        }
    }

    fn err(s: &str) -> LineError {
        match parse_line(s.as_bytes(), 1) {
            Err(e) => e,
            Ok(l) => panic!("parsed: {l:?}"),
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_hex(b"0x0"), Some(0));
        assert_eq!(parse_hex(b"0xffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_hex(b"0x000ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_hex(b"0x1ffffffffffffffff"), None);
        assert_eq!(parse_hex(b"0xAbC"), Some(0xabc));
        assert_eq!(parse_hex(b"0x"), None);
        assert_eq!(parse_hex(b"12"), None);
        assert_eq!(parse_hex(b"0xg"), None);
        assert_eq!(parse_idec(b"-7"), Some(-7));
        assert_eq!(parse_idec(b"9902"), Some(9902));
        assert_eq!(parse_idec(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_idec(b"9223372036854775808"), None);
        assert_eq!(parse_idec(b"-"), None);
        assert_eq!(parse_idec(b"+1"), None);
        assert_eq!(parse_udec(b"18446744073709551616"), None);
    }

    #[test]
    fn h_enter() {
        let h = hcall("H_ENTER cpu=0 flags=0x0 ptex=0x3d3b8 pteh=0x4009287a77000005 ptel=0x11194 -> ret=0 idx=0x3d3b8");
        assert_eq!(h.line, 7);
        assert_eq!(h.kind, HcallKind::Enter);
        assert_eq!(h.opcode(), 0x08);
        assert_eq!(h.args(), &[0, 0x3d3b8, 0x4009287a77000005, 0x11194]);
        assert_eq!(h.expected.ret, 0);
        assert_eq!(h.expected.present, 0b1);
        assert_eq!(h.expected.outs[0], 0x3d3b8);
    }

    #[test]
    fn h_remove_success_and_not_found() {
        let h = hcall("H_REMOVE cpu=0 flags=0x80000000 ptex=0x3d3b8 avpn=0x4009287a77000000 -> ret=0 old_pteh=0x4009287a77000045 old_ptel=0x11194");
        assert_eq!(h.args(), &[0x8000_0000, 0x3d3b8, 0x4009287a77000000]);
        assert_eq!(h.expected.out(0), Some(0x4009287a77000045));
        assert_eq!(h.expected.out(1), Some(0x11194));
        let h =
            hcall("H_REMOVE cpu=1 flags=0x80000000 ptex=0x55369 avpn=0x4002985e84fff480 -> ret=-7");
        assert_eq!(h.cpu, 1);
        assert_eq!(h.expected.ret, -7);
        assert_eq!(h.expected.present, 0);
    }

    #[test]
    fn h_protect() {
        let h = hcall("H_PROTECT cpu=1 flags=0x4 ptex=0x580b8 avpn=0x0 -> ret=0");
        assert_eq!(h.kind, HcallKind::Protect);
        assert_eq!(h.args(), &[4, 0x580b8, 0]);
        assert_eq!(h.expected.present, 0);
    }

    #[test]
    fn h_read_4() {
        let h = hcall("H_READ cpu=0 flags=0x2000000000 ptex=0x580f0 -> ret=0 pteh0=0x400ea1b217000255 ptel0=0x2091190 pteh1=0x40 ptel1=0x0 pteh2=0x41 ptel2=0x2 pteh3=0x43 ptel3=0x4");
        assert_eq!(h.args(), &[0x20_0000_0000, 0x580f0]);
        assert_eq!(h.expected.present, 0xff);
        assert_eq!(
            h.expected.outs,
            [0x400ea1b217000255, 0x2091190, 0x40, 0, 0x41, 2, 0x43, 4]
        );
        let h = hcall("H_READ cpu=0 flags=0x0 ptex=0x5 -> ret=0 pteh0=0x1 ptel0=0x2");
        assert_eq!(h.expected.present, 0b11);
    }

    #[test]
    fn h_bulk_remove_maps_responses_to_tsh_registers() {
        let h = hcall("H_BULK_REMOVE cpu=0 tsh0=0x42000000000576e0 tsl0=0x40046e93b0003d00 tsh1=0x42000000000576e8 tsl1=0x40046e93b0003d01 tsh2=0xc000000000000000 tsl2=0x0 tsh3=0x0 tsl3=0x5 -> ret=0 rsp0=0x820c0000000576e0 rsp1=0x820c0000000576e8 rsp2=0xc000000000000000 rsp3=0x0");
        assert_eq!(h.nargs, 8);
        assert_eq!(
            h.args,
            [
                0x42000000000576e0,
                0x40046e93b0003d00,
                0x42000000000576e8,
                0x40046e93b0003d01,
                0xc000000000000000,
                0,
                0,
                5
            ]
        );
        assert_eq!(h.expected.present, 0b0101_0101);
        assert_eq!(h.expected.out(0), Some(0x820c0000000576e0));
        assert_eq!(h.expected.out(2), Some(0x820c0000000576e8));
        assert_eq!(h.expected.out(4), Some(0xc000000000000000));
        assert_eq!(h.expected.out(6), Some(0));
        assert_eq!(h.expected.out(1), None);
    }

    #[test]
    fn h_clear_ref_mod() {
        let h = hcall("H_CLEAR_REF cpu=0 flags=0x0 ptex=0x10 -> ret=0 r4=0x180");
        assert_eq!(h.kind, HcallKind::ClearRef);
        assert_eq!(h.opcode(), 0x14);
        assert_eq!(h.expected.out(0), Some(0x180));
        let h = hcall("H_CLEAR_MOD cpu=0 flags=0x0 ptex=0x10 -> ret=-2");
        assert_eq!(h.opcode(), 0x10);
        assert_eq!(h.expected.ret, -2);
    }

    #[test]
    fn resize_hcalls_have_decimal_shift() {
        let h = hcall("H_RESIZE_HPT_PREPARE cpu=0 flags=0x0 shift=24 -> ret=9902");
        assert_eq!(h.kind, HcallKind::ResizePrepare);
        assert_eq!(h.args(), &[0, 24]);
        assert_eq!(h.expected.ret, 9902);
        let h = hcall("H_RESIZE_HPT_COMMIT cpu=1 flags=0x0 shift=22 -> ret=-6");
        assert_eq!(h.kind, HcallKind::ResizeCommit);
        assert!(h.kind.is_resize());
        assert_eq!(h.expected.ret, -6);
        assert!(matches!(
            err("H_RESIZE_HPT_COMMIT cpu=1 flags=0x0 shift=0x16 -> ret=0"),
            LineError::Field(FieldError::BadValue { key: "shift", .. })
        ));
    }

    #[test]
    fn non_hcall_records() {
        assert_eq!(
            parse_line(b"HPT_ALLOC shift=23\n", 2),
            Ok(Line::Record(Record::HptAlloc { line: 2, shift: 23 }))
        );
        assert_eq!(
            parse_line(b"HPT_SHIFT old=23 new=24", 3),
            Ok(Line::Record(Record::HptShift {
                line: 3,
                old: 23,
                new: 24
            }))
        );
        let hw: [(&[u8], u64, HwBit, u64, u64); 2] = [
            (
                b"HW_SET_R ptex=0x10 pte1=0x180",
                4,
                HwBit::Reference,
                0x10,
                0x180,
            ),
            (
                b"HW_SET_C pte1=0x80 ptex=0x11\r\n",
                5,
                HwBit::Change,
                0x11,
                0x80,
            ),
        ];
        for (text, line, bit, ptex, pte1) in hw {
            let want = Record::HwSet(HwSet {
                line,
                bit,
                ptex,
                pte1,
            });
            assert_eq!(parse_line(text, line), Ok(Line::Record(want)));
        }
    }

    #[test]
    fn comments_console_blank() {
        assert_eq!(
            parse_line(b"# console: Booting Linux\n", 1),
            Ok(Line::Console(b"Booting Linux"))
        );
        assert_eq!(parse_line(b"# console: ", 1), Ok(Line::Console(b"")));
        assert_eq!(
            parse_line(b"# realtrace v1", 1),
            Ok(Line::Comment(b"realtrace v1"))
        );
        assert_eq!(parse_line(b"  \r\n", 1), Ok(Line::Blank));
        assert_eq!(parse_line(b"", 1), Ok(Line::Blank));
    }

    #[test]
    fn keys_in_any_order() {
        let h = hcall("H_ENTER ptel=0x4 pteh=0x3 ptex=0x2 flags=0x1 cpu=3 -> idx=0x9 ret=0");
        assert_eq!(h.args(), &[1, 2, 3, 4]);
        assert_eq!(h.cpu, 3);
        assert_eq!(h.expected.out(0), Some(9));
    }

    #[test]
    fn errors() {
        assert_eq!(err("H_FOO cpu=0"), LineError::UnknownRecord("H_FOO".into()));
        let elf = "\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x03\0>\0\x01\0\0\0\x10j\0\0\0\0\0\0@\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
        let LineError::UnknownRecord(q) = err(elf) else {
            panic!("not an unknown record");
        };
        assert!(q.starts_with("\\x7fELF\\x02") && q.ends_with("..."), "{q}");
        assert!(
            q.is_ascii() && !q.contains('\0') && q.len() < 4 * crate::lex::EXCERPT_BYTES + 4,
            "{q}"
        );
        crate::lex::table::check(
            err,
            &[
                (
                    "H_ENTER flags=0x0 ptex=0x0 pteh=0x0 ptel=0x0 -> ret=0",
                    "MissingKey",
                    Some("cpu"),
                ),
                (
                    "H_ENTER cpu=0 flags=0x0 ptex=0x0 pteh=0x0 -> ret=0",
                    "MissingKey",
                    Some("ptel"),
                ),
                (
                    "H_ENTER cpu=0 flags=0x0 ptex=0x0 pteh=0x0 ptel=0x0",
                    "MissingResult",
                    None,
                ),
                (
                    "H_ENTER cpu=0 flags=0x0 ptex=0x0 pteh=0x0 ptel=0x0 ->",
                    "MissingKey",
                    Some("ret"),
                ),
                (
                    "H_ENTER cpu=0 flags=0x0 flags=0x0 ptex=0x0 pteh=0x0 ptel=0x0 -> ret=0",
                    "DuplicateKey",
                    Some("flags"),
                ),
                (
                    "H_ENTER cpu=0 cpu=1 flags=0x0 ptex=0x0 pteh=0x0 ptel=0x0 -> ret=0",
                    "DuplicateKey",
                    Some("cpu"),
                ),
                (
                    "H_ENTER cpu=0 flags=0x0 ptex=0x0 pteh=0x0 ptel=0x0 -> ret=0 idx=0x1 idx=0x1",
                    "DuplicateKey",
                    Some("idx"),
                ),
                (
                    "H_ENTER cpu=0 flags=0x0 ptex=0x0 pteh=0x0 ptel=0x0 avpn=0x0 -> ret=0",
                    "UnknownKey",
                    None,
                ),
                (
                    "H_ENTER cpu=0 flags=0x0 ptex=0x0 pteh=0x0 ptel=0x0 -> ret=0 old_pteh=0x1",
                    "UnknownKey",
                    None,
                ),
                (
                    "H_ENTER cpu=0 flags=0 ptex=0x0 pteh=0x0 ptel=0x0 -> ret=0",
                    "BadValue",
                    Some("flags"),
                ),
                (
                    "H_ENTER cpu=0x0 flags=0x0 ptex=0x0 pteh=0x0 ptel=0x0 -> ret=0",
                    "BadValue",
                    Some("cpu"),
                ),
                (
                    "H_ENTER cpu=0 flags=0x0 ptex=0x0 pteh=0x0 ptel=0x0 -> ret=0x0",
                    "BadValue",
                    Some("ret"),
                ),
                (
                    "H_ENTER cpu=0 flags ptex=0x0 pteh=0x0 ptel=0x0 -> ret=0",
                    "BadField",
                    None,
                ),
                (
                    "H_ENTER cpu=0 =0x0 ptex=0x0 pteh=0x0 ptel=0x0 -> ret=0",
                    "BadField",
                    None,
                ),
                (
                    "H_PROTECT cpu=0 flags=0x0 ptex=0x0 avpn=0x0 -> ret=0 -> ret=0",
                    "UnexpectedResult",
                    None,
                ),
                ("HPT_ALLOC shift=23 -> ret=0", "UnexpectedResult", None),
                ("HPT_ALLOC", "MissingKey", Some("shift")),
                ("HPT_ALLOC shift=99999999999", "BadValue", None),
                ("HPT_SHIFT old=1 new=2 new=3", "DuplicateKey", Some("new")),
                ("HW_SET_R ptex=0x1", "MissingKey", Some("pte1")),
                ("HW_SET_C ptex=0x1 pte1=0x2 x=0x3", "UnknownKey", None),
            ],
        );
    }
}
