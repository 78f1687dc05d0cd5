//! GPT-2 byte-level BPE (GGUF `tokenizer.ggml.model = gpt2`):
//! `llm_tokenizer_bpe_session::tokenize` of the pinned llama.cpp.
//!
//! Each pre-tokenizer word is byte-encoded (every byte becomes one
//! printable codepoint, GPT-2's `bytes_to_unicode`), split into those
//! codepoints, and the adjacent pair with the lowest merge rank is merged
//! until no pair has a rank (ties: the leftmost). Each final symbol is
//! looked up as a token.

use super::pretokenize::PreTokenizer;
use super::Vocab;
use std::collections::{BinaryHeap, HashMap};

pub(super) struct Bpe {
    /// Merge text `"left right"` → rank (its index in `tokenizer.ggml.merges`).
    ranks: HashMap<String, u32>,
    pub(super) pre: PreTokenizer,
    /// `tokenizer_ignore_merges` (llama3): a word that is a token as a whole
    /// is that token, whatever the merges would make of it.
    pub(super) ignore_merges: bool,
}

impl Bpe {
    /// `merges` as `llm_load_vocab` reads them: split at the first space
    /// after the first byte; a repeated pair keeps its first rank.
    pub(super) fn new(merges: &[&str], pre: PreTokenizer, ignore_merges: bool) -> Bpe {
        let mut ranks = HashMap::with_capacity(merges.len());
        for (rank, merge) in merges.iter().enumerate() {
            // A merge without a separating space is the pair ("", ""),
            // which no lookup ever asks for.
            let has_separator = merge.bytes().skip(1).any(|b| b == b' ');
            let key = if has_separator {
                merge.to_string()
            } else {
                " ".to_string()
            };
            ranks.entry(key).or_insert(rank as u32);
        }
        Bpe {
            ranks,
            pre,
            ignore_merges,
        }
    }

    pub(super) fn n_merges(&self) -> usize {
        self.ranks.len()
    }

    fn rank(&self, left: &str, right: &str, key: &mut String) -> Option<u32> {
        key.clear();
        key.push_str(left);
        key.push(' ');
        key.push_str(right);
        self.ranks.get(key.as_str()).copied()
    }

    /// Appends the ids of one raw-text fragment to `out`.
    pub(super) fn tokenize(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        for range in self.pre.split(text) {
            let word = byte_encode(&text.as_bytes()[range]);
            self.tokenize_word(vocab, &word, out);
        }
    }

    fn tokenize_word(&self, vocab: &Vocab, word: &str, out: &mut Vec<u32>) {
        if self.ignore_merges {
            if let Some(id) = vocab.id(word) {
                out.push(id);
                return;
            }
        }
        struct Symbol {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
        let mut symbols: Vec<Symbol> = Vec::new();
        for (i, (start, c)) in word.char_indices().enumerate() {
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
        }
        let text_of = |s: &Symbol| &word[s.start..s.start + s.len];
        let mut key = String::new();
        let mut queue = BinaryHeap::new();
        let mut try_add = |queue: &mut BinaryHeap<Bigram>,
                           symbols: &[Symbol],
                           left: Option<usize>,
                           right: Option<usize>| {
            let (Some(l), Some(r)) = (left, right) else {
                return;
            };
            let (a, b) = (text_of(&symbols[l]), text_of(&symbols[r]));
            if let Some(rank) = self.rank(a, b, &mut key) {
                queue.push(Bigram {
                    rank,
                    left: l,
                    right: r,
                    text: format!("{a}{b}"),
                });
            }
        };
        for i in 1..symbols.len() {
            try_add(&mut queue, &symbols, Some(i - 1), Some(i));
        }
        while let Some(bigram) = queue.pop() {
            let (l, r) = (bigram.left, bigram.right);
            if symbols[l].len == 0 || symbols[r].len == 0 {
                continue;
            }
            // Outdated: a side grew since this pair was queued.
            let (a, b) = (text_of(&symbols[l]), text_of(&symbols[r]));
            if a.len() + b.len() != bigram.text.len()
                || !bigram.text.starts_with(a)
                || !bigram.text.ends_with(b)
            {
                continue;
            }
            symbols[l].len += symbols[r].len;
            symbols[r].len = 0;
            symbols[l].next = symbols[r].next;
            if let Some(n) = symbols[r].next {
                symbols[n].prev = Some(l);
            }
            let (prev, next) = (symbols[l].prev, symbols[l].next);
            try_add(&mut queue, &symbols, prev, Some(l));
            try_add(&mut queue, &symbols, Some(l), next);
        }

        let mut i = (!symbols.is_empty()).then_some(0);
        while let Some(at) = i {
            let piece = text_of(&symbols[at]);
            match vocab.id(piece) {
                Some(id) => out.push(id),
                // Not a token (a vocabulary whose merges make non-tokens):
                // llama.cpp looks each byte up as a one-byte token and
                // skips the bytes that are not.
                None => {
                    for b in piece.bytes() {
                        if let Some(id) = std::str::from_utf8(&[b]).ok().and_then(|s| vocab.id(s)) {
                            out.push(id);
                        }
                    }
                }
            }
            i = symbols[at].next;
        }
    }
}

/// A candidate merge, ordered as `llm_bigram_bpe::comparator`: the lowest
/// rank first, then the leftmost.
struct Bigram {
    rank: u32,
    left: usize,
    right: usize,
    text: String,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // BinaryHeap pops the greatest: invert both keys.
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// GPT-2's byte → codepoint table (`unicode_byte_to_utf8_map`): printable
/// Latin-1 bytes stand for themselves, the other 68 take U+0100.. in order.
fn byte_char(b: u8) -> char {
    static TABLE: std::sync::OnceLock<[char; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = ['\0'; 256];
        let mut next = 256u32;
        for (byte, slot) in table.iter_mut().enumerate() {
            let printable = matches!(byte, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
            let cp = if printable {
                byte as u32
            } else {
                next += 1;
                next - 1
            };
            *slot = char::from_u32(cp).unwrap_or('\0');
        }
        table
    })[b as usize]
}

/// The byte a codepoint of byte-encoded text stands for
/// (`unicode_utf8_to_byte`), if any.
pub(super) fn char_byte(c: char) -> Option<u8> {
    match c as u32 {
        cp @ (0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF) => Some(cp as u8),
        cp @ 0x100..=0x143 => (0..=255u8).find(|&b| byte_char(b) as u32 == cp),
        _ => None,
    }
}

/// `unicode_byte_encoding_process` of one word.
pub(super) fn byte_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_char(b)).collect()
}

/// `llama_decode_text`: a token's text back to bytes. A codepoint that is
/// not in the byte table becomes `[UNK_BYTE_0x<hex of its UTF-8><the whole
/// token text>]`, as llama.cpp writes it.
pub(super) fn decode_text(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut utf8 = [0u8; 4];
                for b in c.encode_utf8(&mut utf8).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s() {
        assert_eq!(byte_char(b' '), 'Ġ');
        assert_eq!(byte_char(b'\n'), 'Ċ');
        assert_eq!(byte_char(b'a'), 'a');
        assert_eq!(byte_char(0xAD), 'Ń');
        for b in 0..=255u8 {
            assert_eq!(char_byte(byte_char(b)), Some(b));
        }
        assert_eq!(decode_text("ĠhiĊ"), b" hi\n");
        assert_eq!(
            decode_text("a€"),
            b"a[UNK_BYTE_0xe282aca\xe2\x82\xac]".to_vec()
        );
    }
}
