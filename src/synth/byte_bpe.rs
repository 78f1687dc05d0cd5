//! The synthetic GPT-2-style byte-level BPE vocab (`tokenizer.ggml.model =
//! gpt2`), the kind the published BitNet-b1.58-2B-4T file carries (its real
//! vocab is llama3's: 128256 tokens, 280147 merges).
//!
//! Layout, as GPT-2 and llama3 have it:
//! - ids 0..256: the 256 byte tokens, each the one character GPT-2's
//!   byte-to-unicode table gives that byte (printable Latin-1 bytes stand for
//!   themselves, the others become U+0100.. in byte order), in the table's
//!   order, so id 0 is `!` as in the real files;
//! - then one token per merge, in merge (rank) order: each merge `a b` joins
//!   two tokens that already exist into a token that exists (English pieces,
//!   `Ġ` being the byte-level space);
//! - then filler tokens nothing merges into, up to the special block;
//! - the last block: llama3's special tokens (`<|begin_of_text|>` BOS,
//!   `<|end_of_text|>` EOS, `<|start_header_id|>`, `<|end_header_id|>`,
//!   `<|eot_id|>`, reserved ones), control-typed, 256 of them when the vocab
//!   has room (then BOS is n_vocab − 256: 128000 at the 2B-4T size), else
//!   the [`NAMED_SPECIALS`] alone.
//!
//! bitnet.cpp needs every byte token (its BPE falls back to bytes for any
//! symbol that is not a token, with `token_to_id.at`) and reads merges as
//! `"a b"` strings.

use super::vocab::{TYPE_CONTROL, TYPE_NORMAL};

/// The byte-level space (byte 0x20 in GPT-2's table).
pub const SPACE: char = '\u{0120}';

/// Special tokens at the start of the special block, at llama3's offsets
/// from `<|begin_of_text|>` (128000 in llama3).
pub const NAMED_SPECIALS: [&str; 10] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
];

/// The special block's size when the vocab has room (llama3's).
pub const SPECIAL_BLOCK: usize = 256;

/// Merges in rank order, written with ' ' for the byte-level space.
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
    ("a", "s"),
    (" w", "as"),
    ("o", "r"),
    (" f", "or"),
    (" h", "e"),
    ("t", "h"),
    ("i", "th"),
    (" w", "ith"),
    (" ", "y"),
    ("o", "u"),
    (" y", "ou"),
    (" ", "e"),
    (" ", "g"),
    (" ", "r"),
    ("o", "w"),
    (" ", "u"),
    ("l", "y"),
    ("e", "l"),
    (" b", "e"),
    ("l", "o"),
    ("el", "lo"),
    (" h", "ello"),
    ("l", "d"),
    (" w", "or"),
    (" wor", "ld"),
    (" ", "1"),
    ("0", "0"),
    (" ", "B"),
    ("i", "t"),
    (" B", "it"),
    ("e", "t"),
    ("N", "et"),
    (" Bit", "Net"),
    ("W", "h"),
    ("Wh", "at"),
    (" ", "q"),
    (" q", "u"),
    ("i", "c"),
    ("ic", "k"),
    (" qu", "ick"),
    (" b", "r"),
    ("w", "n"),
    ("o", "wn"),
    (" br", "own"),
    (" f", "o"),
    (" fo", "x"),
];

/// GPT-2's byte-to-unicode table: the character that stands for each byte
/// in byte-level BPE tokens (`bytes_to_unicode` in GPT-2's encoder).
pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("U+0100.. are chars");
            next += 1;
            c
        };
    }
    table
}

/// The bytes in the table's token order: the printable ones first (their
/// own characters), then the others (U+0100.. in byte order).
fn byte_token_order() -> Vec<u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut order: Vec<u8> = (0..=255u8).filter(|&b| printable(b)).collect();
    order.extend((0..=255u8).filter(|&b| !printable(b)));
    order
}

/// A complete vocab: tokens (with types) in id order, merges in rank order.
pub struct BpeVocab {
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    /// `"a b"`, as `tokenizer.ggml.merges` stores them.
    pub merges: Vec<String>,
    pub bos: u32,
    pub eos: u32,
}

/// The text of a merge result or part, in byte-level characters.
fn byte_level(s: &str) -> String {
    s.replace(' ', &SPACE.to_string())
}

/// The merges that produce a new token (a pair listed twice merges once),
/// in rank order, as (left, right, result).
fn effective_merges() -> Vec<(String, String, String)> {
    let mut seen = std::collections::HashSet::new();
    MERGES
        .iter()
        .map(|(a, b)| (byte_level(a), byte_level(b)))
        .filter(|(a, b)| seen.insert(format!("{a}{b}")))
        .map(|(a, b)| {
            let joined = format!("{a}{b}");
            (a, b, joined)
        })
        .collect()
}

/// Fewest tokens a synthetic BPE vocab can have: bytes, merges, named specials.
pub fn min_vocab() -> usize {
    256 + effective_merges().len() + NAMED_SPECIALS.len()
}

/// The vocab of `n_vocab` tokens, or `None` below [`min_vocab`].
pub fn vocab(n_vocab: usize) -> Option<BpeVocab> {
    let merges = effective_merges();
    let base = 256 + merges.len();
    if n_vocab < base + NAMED_SPECIALS.len() {
        return None;
    }
    let chars = byte_to_char();
    let mut tokens: Vec<String> = byte_token_order()
        .into_iter()
        .map(|b| chars[b as usize].to_string())
        .collect();
    tokens.extend(merges.iter().map(|(_, _, joined)| joined.clone()));
    let specials = SPECIAL_BLOCK.min(n_vocab - base);
    let first_special = n_vocab - specials;
    // Fillers: no merge produces `<`-led text, so BPE never reaches them.
    tokens.extend((base..first_special).map(|i| format!("<filler_{i}>")));
    let mut types = vec![TYPE_NORMAL; first_special];
    for k in 0..specials {
        tokens.push(match NAMED_SPECIALS.get(k) {
            Some(name) => name.to_string(),
            None => format!("<|reserved_special_token_{}|>", k - 5),
        });
        types.push(TYPE_CONTROL);
    }
    Some(BpeVocab {
        tokens,
        types,
        merges: merges.iter().map(|(a, b, _)| format!("{a} {b}")).collect(),
        bos: first_special as u32,
        eos: first_special as u32 + 1,
    })
}

/// The llama3-style chat template the synthetic `bitnet-b1.58` models carry.
/// Like a Hugging Face template it writes `{{ bos_token }}` itself, so a
/// prompt rendered from it and tokenized with `add_bos_token` starts with a
/// duplicated BOS. (`\n` here is the two characters a Jinja string literal
/// reads as a newline, as in the published templates.)
pub const CHAT_TEMPLATE: &str = r"{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
