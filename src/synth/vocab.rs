//! The synthetic `llama` (SentencePiece) vocab.
//!
//! Layout, as real SPM vocabs have it: `<unk>`, `<s>`, `</s>`, the 256 byte
//! tokens `<0x00>`..`<0xFF>`, the single characters, then merged pieces with
//! `▁` for a space, then unique filler tokens up to the requested size.
//! SentencePiece merging only ever joins two existing symbols, so every
//! merged piece here is the concatenation of two earlier tokens; printable
//! ASCII is present so that English prompts tokenize without byte fallback.

/// SentencePiece's visible space.
pub const SPACE: char = '\u{2581}';

pub const TYPE_NORMAL: i32 = 1;
pub const TYPE_UNKNOWN: i32 = 2;
pub const TYPE_CONTROL: i32 = 3;
pub const TYPE_BYTE: i32 = 6;

pub const UNK_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;

/// Merges in priority order, written with ' ' for the space; each is a pair
/// of earlier tokens.
const MERGES: &[(&str, &str)] = &[
    (" ", "t"),
    ("h", "e"),
    (" t", "he"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    (" ", "a"),
    ("o", "n"),
    ("r", "e"),
    ("a", "t"),
    ("e", "n"),
    ("n", "d"),
    (" ", "s"),
    ("o", "u"),
    ("i", "s"),
    (" ", "w"),
    (" ", "o"),
    ("o", "r"),
    ("in", "g"),
    (" t", "h"),
    ("e", "s"),
    (" ", "c"),
    (" ", "b"),
    ("e", "d"),
    (" ", "f"),
    ("i", "t"),
    (" ", "i"),
    ("a", "r"),
    (" ", "m"),
    (" ", "p"),
    ("l", "l"),
    (" a", "nd"),
    (" o", "f"),
    (" t", "o"),
    (" i", "n"),
    (" i", "s"),
    (" ", "d"),
    (" ", "h"),
    ("l", "e"),
    ("o", "m"),
    ("s", "t"),
    (" ", "l"),
    (" ", "n"),
    ("a", "l"),
    ("i", "on"),
    ("t", "ion"),
    (" w", "h"),
    (" c", "on"),
    (" ", "T"),
    (" T", "he"),
    (" th", "at"),
    (" w", "as"),
    ("a", "s"),
    (" f", "or"),
    (" h", "e"),
    (" w", "ith"),
    ("i", "th"),
    ("t", "h"),
    (" ", "y"),
    (" y", "ou"),
    (" ", "e"),
    (" ", "g"),
    (" ", "r"),
    ("o", "w"),
    (" ", "u"),
    ("l", "y"),
    ("e", "l"),
    (" b", "e"),
    (" h", "ello"),
    ("el", "lo"),
    ("l", "o"),
    (" w", "or"),
    (" wor", "ld"),
    ("l", "d"),
    (" ", "1"),
    ("0", "0"),
    (" ", "B"),
    (" B", "it"),
    (" Bit", "Net"),
    ("N", "et"),
    ("e", "t"),
];

/// Printable ASCII apart from the space (which is `▁`), plus a few common
/// non-ASCII letters so multi-byte characters are exercised both ways.
fn single_chars() -> Vec<String> {
    let mut out = vec![SPACE.to_string()];
    out.extend((b'!'..=b'~').map(|b| (b as char).to_string()));
    out.extend(["é", "ü", "ß", "—"].iter().map(|s| s.to_string()));
    out
}

/// One vocab entry.
pub struct Token {
    pub text: String,
    pub score: f32,
    pub ty: i32,
}

/// The tokens that every synthetic vocab has, before filler.
pub fn base_tokens() -> Vec<Token> {
    let mut out = vec![
        Token {
            text: "<unk>".into(),
            score: 0.0,
            ty: TYPE_UNKNOWN,
        },
        Token {
            text: "<s>".into(),
            score: 0.0,
            ty: TYPE_CONTROL,
        },
        Token {
            text: "</s>".into(),
            score: 0.0,
            ty: TYPE_CONTROL,
        },
    ];
    out.extend((0..=255u8).map(|b| Token {
        text: format!("<0x{b:02X}>"),
        score: 0.0,
        ty: TYPE_BYTE,
    }));
    // Single characters never win a merge by score (merges only look up
    // pieces of two or more characters), but they must exist.
    for (i, c) in single_chars().into_iter().enumerate() {
        out.push(Token {
            text: c,
            score: -1000.0 - i as f32,
            ty: TYPE_NORMAL,
        });
    }
    // Earlier merges score higher, as in a trained SentencePiece model.
    for (i, (a, b)) in MERGES.iter().enumerate() {
        let piece = format!("{a}{b}").replace(' ', &SPACE.to_string());
        out.push(Token {
            text: piece,
            score: -(i as f32) - 1.0,
            ty: TYPE_NORMAL,
        });
    }
    out
}

/// The full vocab of `n_vocab` tokens, or `None` if `n_vocab` is smaller
/// than the base vocab.
pub fn tokens(n_vocab: usize) -> Option<Vec<Token>> {
    let mut out = base_tokens();
    if n_vocab < out.len() {
        return None;
    }
    let first_filler = out.len();
    // Fillers cannot be reached by merging: "<u" is not a token.
    out.extend((first_filler..n_vocab).map(|i| Token {
        text: format!("<unused{i}>"),
        score: -1_000_000.0,
        ty: TYPE_NORMAL,
    }));
    Some(out)
}
