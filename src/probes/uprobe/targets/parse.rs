//! The text form of a uprobe target, `FILE:PLACE`, and its typed errors.

use core::fmt;

use super::TargetPlace;

/// What is wrong with the text of a uprobe target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ParseTargetErrorKind {
    /// No lone `:` separates the file from the place (`libz.so.1`).
    MissingColon,
    /// Nothing before the `:`.
    EmptyFile,
    /// Nothing after the `:` (or before a `+`).
    EmptySymbol,
    /// A NUL byte (no path or symbol holds one).
    Nul,
    /// Whitespace in the symbol.
    Whitespace,
    /// A `+` in the symbol itself (`f++1`): `+` only starts the offset.
    PlusInSymbol,
    /// `0x` not followed by hex digits only, or a number past `u64`.
    BadFileOffset,
    /// A number without `0x` where a symbol was expected: file offsets are
    /// written in hex (`app:0x1a2b`).
    DecimalFileOffset,
    /// What follows a `+` is not a number (decimal, or hex with `0x`), or
    /// is past `u64`.
    BadOffset,
}

/// Why a text is not a uprobe target: the text and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ParseTargetError {
    text: String,
    kind: ParseTargetErrorKind,
}

impl ParseTargetError {
    /// What is wrong.
    pub fn kind(&self) -> ParseTargetErrorKind {
        self.kind
    }

    /// The refused text.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for ParseTargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.kind {
            ParseTargetErrorKind::MissingColon => "no `:` separates the file from the place",
            ParseTargetErrorKind::EmptyFile => "the file before the `:` is empty",
            ParseTargetErrorKind::EmptySymbol => "the symbol is empty",
            ParseTargetErrorKind::Nul => "it contains a NUL byte",
            ParseTargetErrorKind::Whitespace => "the symbol contains whitespace",
            ParseTargetErrorKind::PlusInSymbol => "the symbol contains a `+` of its own",
            ParseTargetErrorKind::BadFileOffset => {
                "a file offset is `0x` and hex digits, at most 64 bits"
            }
            ParseTargetErrorKind::DecimalFileOffset => {
                "a file offset is written in hex with `0x` (a symbol starts with no digit)"
            }
            ParseTargetErrorKind::BadOffset => {
                "the offset after `+` is not a number (decimal, or hex with `0x`) of at most 64 bits"
            }
        };
        write!(
            f,
            "`{}` is not a uprobe target (FILE:SYMBOL, FILE:SYMBOL+OFFSET or FILE:0xOFFSET): {why}",
            self.text
        )
    }
}

impl std::error::Error for ParseTargetError {}

/// The byte index of the last lone `:` of `s` (not part of a `::`).
fn last_lone_colon(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    (0..b.len())
        .rev()
        .find(|&i| b[i] == b':' && (i == 0 || b[i - 1] != b':') && b.get(i + 1) != Some(&b':'))
}

/// A number: decimal, or hex after `0x`/`0X`.
fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => hex_u64(hex),
        None if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) => s.parse().ok(),
        None => None,
    }
}

/// Hex digits only (no sign, no prefix), at most 64 bits.
fn hex_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Splits and checks `text`: the file and the place.
pub(super) fn parse(text: &str) -> Result<(&str, TargetPlace), ParseTargetError> {
    let fail = |kind| ParseTargetError {
        text: text.to_string(),
        kind,
    };
    if text.contains('\0') {
        return Err(fail(ParseTargetErrorKind::Nul));
    }
    let colon = last_lone_colon(text).ok_or_else(|| fail(ParseTargetErrorKind::MissingColon))?;
    let (file, place) = (&text[..colon], &text[colon + 1..]);
    if file.is_empty() {
        return Err(fail(ParseTargetErrorKind::EmptyFile));
    }
    if let Some(hex) = place
        .strip_prefix("0x")
        .or_else(|| place.strip_prefix("0X"))
    {
        let off = hex_u64(hex).ok_or_else(|| fail(ParseTargetErrorKind::BadFileOffset))?;
        return Ok((file, TargetPlace::FileOffset(off)));
    }
    let (name, offset) = match place.rfind('+') {
        Some(plus) => {
            let off =
                number(&place[plus + 1..]).ok_or_else(|| fail(ParseTargetErrorKind::BadOffset))?;
            (&place[..plus], off)
        }
        None => (place, 0),
    };
    if name.is_empty() {
        return Err(fail(ParseTargetErrorKind::EmptySymbol));
    }
    if name.chars().any(char::is_whitespace) {
        return Err(fail(ParseTargetErrorKind::Whitespace));
    }
    if name.contains('+') {
        return Err(fail(ParseTargetErrorKind::PlusInSymbol));
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(fail(ParseTargetErrorKind::DecimalFileOffset));
    }
    Ok((
        file,
        TargetPlace::Symbol {
            name: name.to_string(),
            offset,
        },
    ))
}
