//! Pre-tokenizer splits of a GPT-2 style BPE vocabulary, as the pinned
//! llama.cpp makes them (`unicode_regex_split` in `unicode.cpp`, with the
//! regex lists of `llm_tokenizer_bpe` in `llama-vocab.cpp`).
//!
//! Written by hand rather than with a regex crate, because parity with
//! bitnet.cpp means parity with *its* matcher, which is not a Unicode regex
//! engine:
//! - the GPT-2 and llama3 regexes are matched by hand-written functions
//!   (`unicode_regex_split_custom_gpt2` / `_llama3`) whose edge cases we
//!   mirror step by step;
//! - every other regex goes to `std::regex` over a "collapsed" text in which
//!   each codepoint above U+007F is replaced by one placeholder byte for its
//!   class (letter, number, punctuation, whitespace, anything else) and
//!   `\p{L}`/`\p{N}`/`\p{P}` by those placeholders plus their ASCII members.
//!   So `\p{P}` in the `default` list means "ASCII punctuation, or a
//!   non-ASCII non-whitespace codepoint of class P", and a non-ASCII
//!   whitespace or symbol is never punctuation. A real Unicode regex engine
//!   would agree on ASCII and disagree elsewhere.
//!
//! The `default` list only uses character-class runs there, so each step
//! below is a simple scan.

use super::unicode::{self, Class, Flags};

/// Which regex list splits the text (`llama_vocab_pre_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// `LLAMA_VOCAB_PRE_TYPE_DEFAULT`: the `default:` branch of
    /// `llm_tokenizer_bpe`: `[\p{P}\$\+<=>\^~\|]+`, then the GPT-2 regex,
    /// then `\p{N}+`, then `[0-9][0-9][0-9]`.
    Default,
    /// `LLAMA_VOCAB_PRE_TYPE_LLAMA3`: the llama3 regex
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
    /// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
    Llama3,
    /// `LLAMA_VOCAB_PRE_TYPE_GPT2` (and mpt, olmo, jais): the GPT-2 regex
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`
    /// alone.
    Gpt2,
}

impl PreTokenizer {
    pub fn name(self) -> &'static str {
        match self {
            PreTokenizer::Default => "default",
            PreTokenizer::Llama3 => "llama3",
            PreTokenizer::Gpt2 => "gpt-2",
        }
    }

    /// The words of `text`, as byte ranges, in order; together they cover
    /// the text.
    pub fn split(self, text: &str) -> Vec<std::ops::Range<usize>> {
        let cpts: Vec<char> = text.chars().collect();
        let mut lengths = vec![cpts.len()];
        match self {
            PreTokenizer::Default => {
                lengths = split_class_runs(&cpts, &lengths, is_default_punctuation);
                lengths = split_gpt2(&cpts, &lengths);
                lengths = split_class_runs(&cpts, &lengths, is_collapsed_number);
                lengths = split_ascii_digit_triples(&cpts, &lengths);
            }
            PreTokenizer::Llama3 => lengths = split_llama3(&cpts, &lengths),
            PreTokenizer::Gpt2 => lengths = split_gpt2(&cpts, &lengths),
        }
        // Codepoint counts to byte ranges.
        let mut ranges = Vec::with_capacity(lengths.len());
        let mut chars = text.char_indices().map(|(i, _)| i).chain([text.len()]);
        let mut start = chars.next().unwrap_or(0);
        for len in lengths {
            let end = chars.by_ref().nth(len - 1).unwrap_or(text.len());
            ranges.push(start..end);
            start = end;
        }
        ranges
    }
}

/// `[\p{P}\$\+<=>\^~\|]` on the collapsed text: every ASCII punctuation or
/// symbol character but the backtick, or a non-ASCII codepoint collapsed to
/// the punctuation placeholder.
fn is_default_punctuation(c: char) -> bool {
    match c {
        '\u{21}'..='\u{2F}' | '\u{3A}'..='\u{40}' | '\u{5B}'..='\u{5F}' | '\u{7B}'..='\u{7E}' => {
            true
        }
        c if c.is_ascii() => false,
        c => collapsed_class(c) == Some(Class::Punctuation),
    }
}

/// `\p{N}` on the collapsed text: an ASCII digit, or a non-ASCII codepoint
/// collapsed to the number placeholder.
fn is_collapsed_number(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_digit()
    } else {
        collapsed_class(c) == Some(Class::Number)
    }
}

/// The class a non-ASCII codepoint keeps in the collapsed text: whitespace
/// collapses to a vertical tab (no class), then number, letter and
/// punctuation keep theirs, and everything else becomes one fallback byte.
fn collapsed_class(c: char) -> Option<Class> {
    let f = unicode::flags(c);
    match f.class {
        _ if f.whitespace => None,
        class @ (Class::Number | Class::Letter | Class::Punctuation) => Some(class),
        _ => None,
    }
}

/// A regex `[class]+` over each piece (`unicode_regex_split_stl`): the
/// matches and the gaps between them are the new pieces, which are exactly
/// the maximal runs of `in_class` and of its complement.
fn split_class_runs(cpts: &[char], lengths: &[usize], in_class: fn(char) -> bool) -> Vec<usize> {
    let mut out = Vec::with_capacity(lengths.len());
    let mut start = 0;
    for &len in lengths {
        let piece = &cpts[start..start + len];
        let mut run = 0;
        for (i, &c) in piece.iter().enumerate() {
            if i > 0 && in_class(c) != in_class(piece[i - 1]) {
                out.push(run);
                run = 0;
            }
            run += 1;
        }
        if run > 0 {
            out.push(run);
        }
        start += len;
    }
    out
}

/// The regex `[0-9][0-9][0-9]` (through `std::wregex`, ASCII digits only):
/// leftmost non-overlapping triples, and the gaps between them.
fn split_ascii_digit_triples(cpts: &[char], lengths: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(lengths.len());
    let mut start = 0;
    for &len in lengths {
        let piece = &cpts[start..start + len];
        let mut gap_start = 0;
        let mut pos = 0;
        while pos + 3 <= piece.len() {
            if piece[pos..pos + 3].iter().all(char::is_ascii_digit) {
                if pos > gap_start {
                    out.push(pos - gap_start);
                }
                out.push(3);
                pos += 3;
                gap_start = pos;
            } else {
                pos += 1;
            }
        }
        if piece.len() > gap_start {
            out.push(piece.len() - gap_start);
        }
        start += len;
    }
    out
}

/// One piece of the text being split by a hand-written matcher: positions
/// are indices into the whole text, and outside the piece a codepoint reads
/// as absent (llama.cpp's `OUT_OF_RANGE`, and flags of 0).
struct Piece<'a> {
    cpts: &'a [char],
    start: usize,
    end: usize,
}

impl Piece<'_> {
    fn cpt(&self, pos: usize) -> Option<char> {
        (self.start <= pos && pos < self.end).then(|| self.cpts[pos])
    }

    fn flags(&self, pos: usize) -> Option<Flags> {
        self.cpt(pos).map(unicode::flags)
    }

    fn is_letter(&self, pos: usize) -> bool {
        self.flags(pos).is_some_and(Flags::is_letter)
    }

    fn is_number(&self, pos: usize) -> bool {
        self.flags(pos).is_some_and(Flags::is_number)
    }

    fn is_whitespace(&self, pos: usize) -> bool {
        self.flags(pos).is_some_and(|f| f.whitespace)
    }
}

/// `[^\s\p{L}\p{N}]` of optional flags: absent flags are all false, so an
/// absent codepoint passes this test, and callers check presence where
/// llama.cpp checks `as_uint()`.
fn is_other(f: Option<Flags>) -> bool {
    !f.is_some_and(|f| f.whitespace || f.is_letter() || f.is_number())
}

/// The English contractions `'s 't 're 've 'm 'll 'd` at `pos` (a `'`):
/// their length, case-folded or not. Only ASCII folds to these letters
/// (`unicode_tolower` maps no other codepoint onto s, t, m, d, r, e, v, l).
fn contraction_len(p: &Piece, pos: usize, fold_case: bool) -> Option<usize> {
    if p.cpt(pos) != Some('\'') || pos + 1 >= p.end {
        return None;
    }
    let fold = |c: Option<char>| match c {
        Some(c) if fold_case => Some(c.to_ascii_lowercase()),
        c => c,
    };
    let next = fold(p.cpt(pos + 1));
    if matches!(next, Some('s' | 't' | 'm' | 'd')) {
        return Some(2);
    }
    if pos + 2 < p.end {
        let after = fold(p.cpt(pos + 2));
        if matches!(
            (next, after),
            (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l'))
        ) {
            return Some(3);
        }
    }
    None
}

/// `unicode_regex_split_custom_gpt2`: the regex
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
fn split_gpt2(cpts: &[char], lengths: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(lengths.len());
    let mut start = 0;
    for &len in lengths {
        let p = Piece {
            cpts,
            start,
            end: start + len,
        };
        let mut pos = p.start;
        let mut emit = |from: &mut usize, to: usize| {
            if to > *from {
                out.push(to - *from);
            }
            *from = to;
        };
        let mut token_start = pos;
        while pos < p.end {
            let cpt = cpts[pos];
            if let Some(n) = contraction_len(&p, pos, false) {
                pos += n;
                emit(&mut token_start, pos);
                continue;
            }
            let skip_space = usize::from(cpt == ' ');
            let mut f2 = if cpt == ' ' {
                p.flags(pos + 1)
            } else {
                p.flags(pos)
            };
            // <space>?\p{L}+
            if f2.is_some_and(Flags::is_letter) {
                pos += skip_space;
                while f2.is_some_and(Flags::is_letter) {
                    pos += 1;
                    f2 = p.flags(pos);
                }
                emit(&mut token_start, pos);
                continue;
            }
            // <space>?\p{N}+
            if f2.is_some_and(Flags::is_number) {
                pos += skip_space;
                while f2.is_some_and(Flags::is_number) {
                    pos += 1;
                    f2 = p.flags(pos);
                }
                emit(&mut token_start, pos);
                continue;
            }
            // <space>?[^\s\p{L}\p{N}]+
            if is_other(f2) && f2.is_some() {
                pos += skip_space;
                while is_other(f2) && f2.is_some() {
                    pos += 1;
                    f2 = p.flags(pos);
                }
                emit(&mut token_start, pos);
                continue;
            }
            let mut n_space = 0;
            while p.is_whitespace(pos + n_space) {
                n_space += 1;
            }
            // \s+(?!\S): all but the last whitespace when more text follows.
            if n_space > 1 && p.cpt(pos + n_space).is_some() {
                pos += n_space - 1;
                emit(&mut token_start, pos);
                continue;
            }
            // \s+
            if n_space > 0 {
                pos += n_space;
                emit(&mut token_start, pos);
                continue;
            }
            pos += 1;
            emit(&mut token_start, pos);
        }
        start += len;
    }
    out
}

/// `unicode_regex_split_custom_llama3`: the llama3 regex (see
/// [`PreTokenizer::Llama3`]).
fn split_llama3(cpts: &[char], lengths: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(lengths.len());
    let mut start = 0;
    for &len in lengths {
        let p = Piece {
            cpts,
            start,
            end: start + len,
        };
        let mut pos = p.start;
        let mut emit = |from: &mut usize, to: usize| {
            if to > *from {
                out.push(to - *from);
            }
            *from = to;
        };
        let mut token_start = pos;
        while pos < p.end {
            let cpt = cpts[pos];
            let flags = unicode::flags(cpt);
            // (?i:'s|'t|'re|'ve|'m|'ll|'d)
            if let Some(n) = contraction_len(&p, pos, true) {
                pos += n;
                emit(&mut token_start, pos);
                continue;
            }
            // [^\r\n\p{L}\p{N}]?\p{L}+
            if !(cpt == '\r' || cpt == '\n' || flags.is_number())
                && (flags.is_letter() || p.is_letter(pos + 1))
            {
                pos += 1;
                while p.is_letter(pos) {
                    pos += 1;
                }
                emit(&mut token_start, pos);
                continue;
            }
            // \p{N}{1,3}
            if flags.is_number() {
                let mut run_start = pos;
                while p.is_number(pos) {
                    pos += 1;
                    if pos - run_start >= 3 {
                        emit(&mut token_start, pos);
                        run_start = pos;
                    }
                }
                emit(&mut token_start, pos);
                continue;
            }
            // <space>?[^\s\p{L}\p{N}]+[\r\n]*  (llama.cpp tests the current
            // codepoint's flags for presence, which always holds here)
            let mut f2 = if cpt == ' ' {
                p.flags(pos + 1)
            } else {
                Some(flags)
            };
            if is_other(f2) {
                pos += usize::from(cpt == ' ');
                while is_other(f2) && f2.is_some() {
                    pos += 1;
                    f2 = p.flags(pos);
                }
                while matches!(p.cpt(pos), Some('\r' | '\n')) {
                    pos += 1;
                }
                emit(&mut token_start, pos);
                continue;
            }
            let mut n_space = 0;
            let mut after_last_newline = None;
            while p.is_whitespace(pos + n_space) {
                if matches!(cpts[pos + n_space], '\r' | '\n') {
                    after_last_newline = Some(pos + n_space + 1);
                }
                n_space += 1;
            }
            // \s*[\r\n]+
            if let Some(end) = after_last_newline {
                pos = end;
                emit(&mut token_start, pos);
                continue;
            }
            // \s+(?!\S)
            if n_space > 1 && p.cpt(pos + n_space).is_some() {
                pos += n_space - 1;
                emit(&mut token_start, pos);
                continue;
            }
            // \s+
            if n_space > 0 {
                pos += n_space;
                emit(&mut token_start, pos);
                continue;
            }
            pos += 1;
            emit(&mut token_start, pos);
        }
        start += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: PreTokenizer, text: &str) -> Vec<&str> {
        pre.split(text).into_iter().map(|r| &text[r]).collect()
    }

    #[test]
    fn llama3_split() {
        let w = words(PreTokenizer::Llama3, "Hello, y'all!  1234567 x\n\n  \tok's");
        assert_eq!(
            w,
            [
                "Hello", ",", " y", "'all", "!", " ", " ", "123", "456", "7", " x", "\n\n", "  ",
                "\tok", "'s"
            ]
        );
        assert_eq!(words(PreTokenizer::Llama3, "I'M"), ["I", "'M"]);
        assert!(words(PreTokenizer::Llama3, "").is_empty());
    }

    #[test]
    fn default_split() {
        // Punctuation runs first, then GPT-2, then numbers, then digit triples.
        let w = words(
            PreTokenizer::Default,
            "Hello, y'all!!  1234567 x=>y `a` I'M",
        );
        assert_eq!(
            w,
            [
                "Hello", ",", " y", "'", "all", "!!", " ", " ", "123", "456", "7", " x", "=>", "y",
                " `", "a", "`", " I", "'", "M"
            ]
        );
    }
}
