//! SentencePiece (GGUF `tokenizer.ggml.model = llama`) merging:
//! `llm_tokenizer_spm_session::tokenize` of the pinned llama.cpp.
//!
//! The text (already escaped: spaces are `▁`) is split into UTF-8
//! characters, and the adjacent pair whose concatenation is the
//! highest-scoring token is merged until no pair is a token (ties: the
//! leftmost). Symbols that are not tokens fall back to their bytes as
//! `<0xXX>` tokens.

use super::Vocab;
use std::collections::BinaryHeap;

/// `llama_escape_whitespace`.
pub(super) const SPACE: &str = "\u{2581}";

/// Appends the ids of escaped `text` to `out`.
pub(super) fn tokenize(vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
    // Symbols are byte ranges of `text` in a doubly linked list.
    struct Symbol {
        start: usize,
        len: usize,
        prev: Option<usize>,
        next: Option<usize>,
    }
    let mut symbols: Vec<Symbol> = Vec::new();
    for (i, (start, c)) in text.char_indices().enumerate() {
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

    let mut queue = BinaryHeap::new();
    let try_add = |queue: &mut BinaryHeap<Bigram>,
                   symbols: &[Symbol],
                   left: Option<usize>,
                   right: Option<usize>| {
        let (Some(l), Some(r)) = (left, right) else {
            return;
        };
        let (a, b) = (&symbols[l], &symbols[r]);
        let piece = &text[a.start..b.start + b.len];
        if let Some(id) = vocab.id(piece) {
            queue.push(Bigram {
                score: vocab.score(id),
                left: l,
                right: r,
                size: piece.len(),
            });
        }
    };
    for i in 1..symbols.len() {
        try_add(&mut queue, &symbols, Some(i - 1), Some(i));
    }
    while let Some(bigram) = queue.pop() {
        let (l, r) = (bigram.left, bigram.right);
        // Stale: one side was merged away since this pair was queued.
        if symbols[l].len == 0
            || symbols[r].len == 0
            || symbols[l].len + symbols[r].len != bigram.size
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

    // A merged symbol is a token by construction, so `resegment` only ever
    // falls back to bytes for single characters that are not tokens.
    let mut i = (!symbols.is_empty()).then_some(0);
    while let Some(at) = i {
        let s = &symbols[at];
        let piece = &text[s.start..s.start + s.len];
        match vocab.id(piece) {
            Some(id) => out.push(id),
            None => {
                for b in piece.bytes() {
                    out.extend(vocab.spm_byte_token(b));
                }
            }
        }
        i = s.next;
    }
}

/// `<0xAB>` → 0xAB (`llama_token_to_byte`).
pub(super) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

/// A candidate merge, ordered as llama.cpp's `llm_bigram_spm::comparator`:
/// higher score first, then the leftmost.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
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
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}
