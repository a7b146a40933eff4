//! The lexical rules every trace format shares: numbers, words, `key=value` fields and
//! the field errors built from them.
//!
//! Invariants:
//! * Nothing here panics or allocates on success; errors copy the offending bytes.
//! * Hex numbers are `0x`-prefixed with 1 to 16 significant digits (leading zeros
//!   allowed, either case); decimals are unsigned (or signed with a leading `-`) and must
//!   fit their type.

use thiserror::Error;

/// The marker in [`HEX`] for a byte that is not a hex digit.
const BAD: u8 = 0xff;

/// Hex digit value by byte ([`BAD`] for non-digits).
const HEX: [u8; 256] = {
    let mut t = [BAD; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// `0x`-prefixed hex, 1 to 16 significant digits (leading zeros allowed).
#[inline]
pub(crate) fn parse_hex(v: &[u8]) -> Option<u64> {
    let d = v.strip_prefix(b"0x")?;
    if d.is_empty() {
        return None;
    }
    let first = d.iter().position(|&c| c != b'0').unwrap_or(d.len());
    let sig = &d[first..];
    if sig.len() > 16 {
        return None;
    }
    let mut x = 0u64;
    for &c in sig {
        let n = HEX[usize::from(c)];
        if n == BAD {
            return None;
        }
        x = (x << 4) | u64::from(n);
    }
    Some(x)
}

/// Unsigned decimal, no sign, fits in u64.
#[inline]
pub(crate) fn parse_udec(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 {
        return None;
    }
    let mut x = 0u64;
    for &c in v {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        x = x.checked_mul(10)?.checked_add(u64::from(d))?;
    }
    Some(x)
}

/// Signed decimal (optional leading `-`), fits in i64.
#[inline]
pub(crate) fn parse_idec(v: &[u8]) -> Option<i64> {
    match v.strip_prefix(b"-") {
        Some(m) => {
            let u = parse_udec(m)?;
            if u <= 1 << 63 {
                Some(0i64.wrapping_sub_unsigned(u))
            } else {
                None
            }
        }
        None => i64::try_from(parse_udec(v)?).ok(),
    }
}

/// How much of a bad token an error quotes.
pub(crate) const EXCERPT_BYTES: usize = 40;

/// A bad token as quoted in an error: at most [`EXCERPT_BYTES`] bytes, escaped
/// (control characters, NULs and non-ASCII as `\n`, `\x00`...), "..." if cut, so that
/// a binary file's bytes never reach the terminal raw.
pub(crate) fn lossy(b: &[u8]) -> String {
    let cut = b.len() > EXCERPT_BYTES;
    let mut s = b
        .get(..EXCERPT_BYTES)
        .unwrap_or(b)
        .escape_ascii()
        .to_string();
    if cut {
        s.push_str("...");
    }
    s
}

/// Splits a line into words separated by ASCII spaces/tabs.
pub(crate) struct Words<'a> {
    rest: &'a [u8],
}

impl<'a> Words<'a> {
    /// The words of `line`.
    #[inline]
    pub(crate) fn new(line: &'a [u8]) -> Self {
        Words { rest: line }
    }
}

impl<'a> Iterator for Words<'a> {
    type Item = &'a [u8];

    #[inline]
    fn next(&mut self) -> Option<&'a [u8]> {
        let start = self.rest.iter().position(|&c| c != b' ' && c != b'\t')?;
        let r = &self.rest[start..];
        let end = r
            .iter()
            .position(|&c| c == b' ' || c == b'\t')
            .unwrap_or(r.len());
        self.rest = &r[end..];
        Some(&r[..end])
    }
}

/// Strips a trailing `\n`, `\r\n` and trailing blanks.
#[inline]
pub(crate) fn trim_end(mut line: &[u8]) -> &[u8] {
    while let [rest @ .., last] = line {
        if matches!(last, b'\n' | b'\r' | b' ' | b'\t') {
            line = rest;
        } else {
            break;
        }
    }
    line
}

/// Strips leading blanks (spaces and tabs).
#[inline]
pub(crate) fn trim_start(line: &[u8]) -> &[u8] {
    let s = line
        .iter()
        .position(|&c| c != b' ' && c != b'\t')
        .unwrap_or(line.len());
    &line[s..]
}

/// A line with its blanks and newline trimmed, sorted by its first character.
pub(crate) enum Trimmed<'a> {
    /// Nothing but blanks.
    Blank,
    /// A `#` line: the text after `#` (not trimmed).
    Comment(&'a [u8]),
    /// Anything else: a record's words.
    Body(&'a [u8]),
}

/// Trims `line` at both ends and tells blanks, comments and records apart.
#[inline]
pub(crate) fn trim_line(line: &[u8]) -> Trimmed<'_> {
    let line = trim_start(trim_end(line));
    if line.is_empty() {
        Trimmed::Blank
    } else if let Some(c) = line.strip_prefix(b"#") {
        Trimmed::Comment(c)
    } else {
        Trimmed::Body(line)
    }
}

/// What is wrong with the `key=value` fields of a record, in any trace format.
/// Displayed after `file:line: `.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FieldError {
    /// A required key is missing.
    #[error("{record}: missing key `{key}`")]
    MissingKey {
        /// Record name.
        record: &'static str,
        /// The missing key.
        key: &'static str,
    },
    /// A key this record (or this result) does not have.
    #[error("{record}: unexpected key `{key}`")]
    UnknownKey {
        /// Record name.
        record: &'static str,
        /// The key as written.
        key: String,
    },
    /// A key given twice.
    #[error("{record}: duplicate key `{key}`")]
    DuplicateKey {
        /// Record name.
        record: &'static str,
        /// The repeated key.
        key: &'static str,
    },
    /// A value that is not of the required form.
    #[error("{record}: bad value `{value}` for `{key}` (expected {expected})")]
    BadValue {
        /// Record name.
        record: &'static str,
        /// The key.
        key: &'static str,
        /// The value as written.
        value: String,
        /// What was expected ("0x-prefixed hex u64", ...).
        expected: &'static str,
    },
    /// A word that is not `key=value` where one is required.
    #[error("{record}: malformed field `{token}` (expected key=value)")]
    BadField {
        /// Record name.
        record: &'static str,
        /// The word as written.
        token: String,
    },
    /// `->` on a record without a result, or given twice.
    #[error("{record}: unexpected `->`")]
    UnexpectedResult {
        /// Record name.
        record: &'static str,
    },
}

impl FieldError {
    /// A value `v` of `key` that is not of the form `expected` describes.
    pub(crate) fn bad_value(
        record: &'static str,
        key: &'static str,
        v: &[u8],
        expected: &'static str,
    ) -> Self {
        FieldError::BadValue {
            record,
            key,
            value: lossy(v),
            expected,
        }
    }

    /// A key `key` this record does not have.
    pub(crate) fn unknown_key(record: &'static str, key: &[u8]) -> Self {
        FieldError::UnknownKey {
            record,
            key: lossy(key),
        }
    }
}

/// Splits `key=value` (the key non-empty) at the first `=`.
#[inline]
pub(crate) fn split_kv<'a>(
    record: &'static str,
    tok: &'a [u8],
) -> Result<(&'a [u8], &'a [u8]), FieldError> {
    match tok.iter().position(|&c| c == b'=') {
        Some(i) if i > 0 => Ok((&tok[..i], &tok[i + 1..])),
        _ => Err(FieldError::BadField {
            record,
            token: lossy(tok),
        }),
    }
}

/// Tracks which keys of a record were seen.
pub(crate) struct Seen<const N: usize> {
    record: &'static str,
    keys: [&'static str; N],
    seen: [bool; N],
}

impl<const N: usize> Seen<N> {
    /// No key of `keys` seen yet.
    pub(crate) fn new(record: &'static str, keys: [&'static str; N]) -> Self {
        Seen {
            record,
            keys,
            seen: [false; N],
        }
    }

    /// Marks `k` seen; its index, or an unknown/duplicate-key error.
    pub(crate) fn mark(&mut self, k: &[u8]) -> Result<usize, FieldError> {
        let Some(i) = self.keys.iter().position(|n| n.as_bytes() == k) else {
            return Err(FieldError::unknown_key(self.record, k));
        };
        if self.seen[i] {
            return Err(FieldError::DuplicateKey {
                record: self.record,
                key: self.keys[i],
            });
        }
        self.seen[i] = true;
        Ok(i)
    }

    /// Errors if any of the first `required` keys is missing.
    pub(crate) fn require(&self, required: usize) -> Result<(), FieldError> {
        match (0..required.min(N)).find(|&i| !self.seen[i]) {
            Some(i) => Err(FieldError::MissingKey {
                record: self.record,
                key: self.keys[i],
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_follow_the_shared_rules() {
        let hex: [(&[u8], Option<u64>); 8] = [
            (b"0x0", Some(0)),
            (b"0xAbC", Some(0xabc)),
            (b"0x00000000000000000ffffffffffffffff", Some(u64::MAX)),
            (b"0x1ffffffffffffffff", None),
            (b"0x", None),
            (b"12", None),
            (b"0xg", None),
            (b"0X1", None),
        ];
        for (v, want) in hex {
            assert_eq!(parse_hex(v), want, "{}", lossy(v));
        }
        assert_eq!(parse_udec(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_udec(b"18446744073709551616"), None);
        assert_eq!(parse_udec(b"-1"), None);
        assert_eq!(parse_idec(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_idec(b"-9223372036854775809"), None);
        assert_eq!(parse_idec(b"9223372036854775808"), None);
        assert_eq!(parse_idec(b"-0"), Some(0));
    }

    #[test]
    fn words_and_trims() {
        let w: Vec<_> = Words::new(b" \ta  b\tc ").collect();
        assert_eq!(w, [&b"a"[..], b"b", b"c"]);
        assert_eq!(trim_end(b"x y \t\r\n"), b"x y");
        assert_eq!(trim_start(b" \t x "), b"x ");
    }
}

/// What the error-case tables of every format's unit tests share.
#[cfg(test)]
pub(crate) mod table {
    use core::fmt::Debug;

    /// One error case: the line, the error variant it must give, and the key that
    /// variant must name (`None`: any or none).
    pub(crate) type Case = (&'static str, &'static str, Option<&'static str>);

    /// The variant name and the `key` field (if any) of an error, read from its `Debug`.
    fn variant_and_key(e: &impl Debug) -> (String, Option<String>) {
        let d = format!("{e:?}");
        // The shared field errors are wrapped: `Field(MissingKey { .. })`.
        let d = d.strip_prefix("Field(").unwrap_or(&d);
        let variant = d
            .split(|c: char| !c.is_ascii_alphanumeric())
            .next()
            .unwrap_or_default()
            .to_owned();
        let key = d
            .split_once("key: \"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(k, _)| k.to_owned());
        (variant, key)
    }

    /// Checks every case of `table` against `err` (which must fail to parse the line).
    pub(crate) fn check<E: Debug>(err: impl Fn(&str) -> E, table: &[Case]) {
        for &(line, variant, key) in table {
            let e = err(line);
            let (got, got_key) = variant_and_key(&e);
            assert_eq!(got, variant, "{line}: {e:?}");
            if let Some(k) = key {
                assert_eq!(got_key.as_deref(), Some(k), "{line}: {e:?}");
            }
        }
    }
}
