//! Codepoint classes as llama.cpp's `unicode.cpp` sees them
//! (`unicode_cpt_flags`): one general-category class per codepoint plus the
//! White_Space property.
//!
//! The pinned llama.cpp generated its table (`unicode-data.cpp`) from
//! Unicode 15.1. The `unicode-general-category` crate is pinned to 0.6
//! (Unicode 15.0; 1.0 is already 16.0), and the three blocks Unicode 15.1
//! added are classified here by hand, so that our classes equal bitnet.cpp's
//! for every codepoint. `tests/tokenizer.rs` checks that through both
//! engines' tokenizers.

use unicode_general_category::{get_general_category, GeneralCategory as Gc};

/// The one category class llama.cpp's `codepoint_flags` keeps per codepoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Unassigned (Cn): `codepoint_flags::UNDEFINED`.
    Undefined,
    /// \p{N}
    Number,
    /// \p{L}
    Letter,
    /// \p{Z}
    Separator,
    /// \p{M}
    Mark,
    /// \p{P}
    Punctuation,
    /// \p{S}
    Symbol,
    /// \p{C} other than Cn: Cc, Cf, Cs, Co.
    Control,
}

/// What the splits ask of a codepoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flags {
    pub class: Class,
    pub whitespace: bool,
}

impl Flags {
    pub fn is_letter(self) -> bool {
        self.class == Class::Letter
    }

    pub fn is_number(self) -> bool {
        self.class == Class::Number
    }
}

pub fn flags(c: char) -> Flags {
    Flags {
        class: class(c),
        whitespace: is_whitespace(c),
    }
}

/// The White_Space property: llama.cpp's `unicode_set_whitespace`.
pub fn is_whitespace(c: char) -> bool {
    matches!(
        c,
        '\u{9}'..='\u{D}'
            | ' '
            | '\u{85}'
            | '\u{A0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200A}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}'
    )
}

fn class(c: char) -> Class {
    // Unicode 15.1 additions (unassigned in 15.0): ideographic description
    // characters U+2FFC..U+2FFF and U+31EF (So), CJK Extension I (Lo).
    match c {
        '\u{2FFC}'..='\u{2FFF}' | '\u{31EF}' => return Class::Symbol,
        '\u{2EBF0}'..='\u{2EE5D}' => return Class::Letter,
        _ => {}
    }
    match get_general_category(c) {
        Gc::UppercaseLetter
        | Gc::LowercaseLetter
        | Gc::TitlecaseLetter
        | Gc::ModifierLetter
        | Gc::OtherLetter => Class::Letter,
        Gc::DecimalNumber | Gc::LetterNumber | Gc::OtherNumber => Class::Number,
        Gc::SpaceSeparator | Gc::LineSeparator | Gc::ParagraphSeparator => Class::Separator,
        Gc::NonspacingMark | Gc::SpacingMark | Gc::EnclosingMark => Class::Mark,
        Gc::ConnectorPunctuation
        | Gc::DashPunctuation
        | Gc::OpenPunctuation
        | Gc::ClosePunctuation
        | Gc::InitialPunctuation
        | Gc::FinalPunctuation
        | Gc::OtherPunctuation => Class::Punctuation,
        Gc::MathSymbol | Gc::CurrencySymbol | Gc::ModifierSymbol | Gc::OtherSymbol => Class::Symbol,
        Gc::Control | Gc::Format | Gc::Surrogate | Gc::PrivateUse => Class::Control,
        Gc::Unassigned => Class::Undefined,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_of_known_codepoints() {
        assert_eq!(class('a'), Class::Letter);
        assert_eq!(class('7'), Class::Number);
        assert_eq!(class('½'), Class::Number);
        assert_eq!(class(' '), Class::Separator);
        assert_eq!(class('\u{301}'), Class::Mark);
        assert_eq!(class('!'), Class::Punctuation);
        assert_eq!(class('$'), Class::Symbol);
        assert_eq!(class('\u{200D}'), Class::Control);
        assert_eq!(class('\u{E000}'), Class::Control);
        assert_eq!(class('\u{31E4}'), Class::Undefined); // Unicode 16
        assert_eq!(class('\u{31EF}'), Class::Symbol); // Unicode 15.1
        assert_eq!(class('\u{2EBF0}'), Class::Letter); // Unicode 15.1
        assert!(is_whitespace('\u{3000}') && !is_whitespace('\u{1C}'));
    }
}
