//! The strategies the no-panic tests of every format share: near-miss words built from
//! a format's own tokens, lines and whole texts made of them.

use proptest::prelude::*;

/// One word: a token of the format (`token_weight` times as likely as each of the
/// others), printable noise, or arbitrary bytes (lossily decoded).
pub fn word(tokens: Vec<&'static str>, token_weight: u32) -> BoxedStrategy<String> {
    prop_oneof![
        token_weight => proptest::sample::select(tokens).prop_map(str::to_owned),
        1 => "[ -~]{0,12}",
        1 => any::<Vec<u8>>().prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
    .boxed()
}

/// One line of fewer than `words` words (no newline).
pub fn line(word: BoxedStrategy<String>, words: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(word, 0..words).prop_map(|w| w.join(" "))
}

/// A text of fewer than `lines` lines of fewer than `words` words, each line ending in `\n`.
pub fn text(
    word: BoxedStrategy<String>,
    words: usize,
    lines: usize,
) -> impl Strategy<Value = String> {
    proptest::collection::vec(line(word, words), 0..lines)
        .prop_map(|ls| ls.into_iter().map(|l| l + "\n").collect())
}
