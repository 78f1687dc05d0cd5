//! Tokenizer for the GGUF `llama` (SentencePiece) vocab.
//!
//! Mirrors llama.cpp's `llm_tokenizer_spm` as built into bitnet.cpp, because
//! both engines must see the same token ids: the text gets a leading space
//! (`tokenizer.ggml.add_space_prefix`, default true), spaces become `▁`, the
//! text is split into UTF-8 characters, and the adjacent pair whose
//! concatenation is the highest-scoring token is merged until no pair is a
//! token (ties: leftmost). Symbols that are not tokens fall back to their
//! bytes as `<0xXX>` tokens. Special tokens in the text are not parsed
//! (`parse_special = false`).

use crate::gguf::{GgufError, GgufFile};
use std::collections::{BinaryHeap, HashMap};

const SPACE: &str = "\u{2581}";
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_BYTE: i32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("tokenizer.ggml.model is {0:?}; only the SentencePiece \"llama\" vocab is supported")]
    UnsupportedModel(String),
    #[error("tokenizer.ggml.{key} has {found} entries, tokenizer.ggml.tokens has {expected}")]
    LengthMismatch {
        key: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("tokenizer.ggml.{key} is {id}, outside the vocab of {n_vocab} tokens")]
    IdOutOfRange {
        key: &'static str,
        id: u32,
        n_vocab: usize,
    },
}

pub struct Tokenizer {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    /// Text to id; a repeated text maps to its last id, as in llama.cpp.
    ids: HashMap<String, u32>,
    /// The `<0xXX>` token of every byte, where the vocab has one.
    byte_ids: [Option<u32>; 256],
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_space_prefix: bool,
}

impl Tokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Self, TokenizerError> {
        let model = f.get_str("tokenizer.ggml.model")?;
        if model != "llama" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let tokens: Vec<String> = f
            .get_str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let n = tokens.len();
        let scores = match f.get("tokenizer.ggml.scores") {
            Some(_) => f.get_f32_array("tokenizer.ggml.scores")?,
            None => vec![0.0; n],
        };
        let types = match f.get("tokenizer.ggml.token_type") {
            Some(_) => f.get_i32_array("tokenizer.ggml.token_type")?,
            None => vec![1; n],
        };
        for (key, len) in [("scores", scores.len()), ("token_type", types.len())] {
            if len != n {
                return Err(TokenizerError::LengthMismatch {
                    key,
                    expected: n,
                    found: len,
                });
            }
        }
        let optional_id =
            |key: &'static str, default: Option<u32>| -> Result<Option<u32>, TokenizerError> {
                let full = format!("tokenizer.ggml.{key}");
                let id = match f.get(&full) {
                    Some(_) => Some(f.get_u32(&full)?),
                    None => default,
                };
                match id {
                    Some(id) if id as usize >= n => Err(TokenizerError::IdOutOfRange {
                        key,
                        id,
                        n_vocab: n,
                    }),
                    id => Ok(id),
                }
            };
        // llama.cpp's SPM defaults: unk 0, bos 1, eos 2.
        let unk = optional_id("unknown_token_id", (n > 0).then_some(0))?;
        let bos = optional_id("bos_token_id", (n > 1).then_some(1))?;
        let eos = optional_id("eos_token_id", (n > 2).then_some(2))?;
        let add_space_prefix = match f.get("tokenizer.ggml.add_space_prefix") {
            Some(_) => f.get_bool("tokenizer.ggml.add_space_prefix")?,
            None => true,
        };

        let ids: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied();
        }
        Ok(Tokenizer {
            tokens,
            scores,
            types,
            ids,
            byte_ids,
            bos,
            eos,
            unk,
            add_space_prefix,
        })
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The text of a token, if the id is in the vocab.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Token ids of `text`, as `llama_tokenize(text, add_special = add_bos,
    /// parse_special = false)` returns them for an SPM vocab.
    pub fn encode(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_bos {
            out.extend(self.bos);
        }
        // llama_tokenize_impl: an empty text yields no pieces at all.
        if text.is_empty() {
            return out;
        }
        let mut escaped = String::with_capacity(text.len() + 3);
        if self.add_space_prefix {
            escaped.push_str(SPACE);
        }
        escaped.push_str(&text.replace(' ', SPACE));
        self.spm(&escaped, &mut out);
        out
    }

    /// `llm_tokenizer_spm::tokenize` on already-escaped text.
    fn spm(&self, text: &str, out: &mut Vec<u32>) {
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
            if let Some(&id) = self.ids.get(piece) {
                queue.push(Bigram {
                    score: self.scores[id as usize],
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

        let mut i = (!symbols.is_empty()).then_some(0);
        while let Some(at) = i {
            let s = &symbols[at];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    // Byte fallback (`llama_byte_to_token_impl`); a vocab
                    // without byte tokens gets <unk> instead of an abort.
                    for b in piece.bytes() {
                        out.extend(self.byte_ids[b as usize].or(self.unk));
                    }
                }
            }
            i = s.next;
        }
    }

    /// Text of `ids`: control tokens vanish, byte tokens become their bytes,
    /// `▁` becomes a space, and the space the encoder prepended is removed.
    /// Invalid UTF-8 is replaced, and unknown ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        let mut strip_space = self.add_space_prefix;
        for &id in ids {
            let Some(text) = self.tokens.get(id as usize) else {
                continue;
            };
            let ty = self.types.get(id as usize).copied().unwrap_or(1);
            match ty {
                TYPE_CONTROL => continue,
                TYPE_UNKNOWN => bytes.extend_from_slice("\u{2585}".as_bytes()),
                TYPE_BYTE => match parse_byte_token(text) {
                    Some(b) => bytes.push(b),
                    None => bytes.extend_from_slice(text.as_bytes()),
                },
                _ => {
                    let piece = text.replace(SPACE, " ");
                    let piece = match piece.strip_prefix(' ') {
                        Some(rest) if strip_space => rest.to_string(),
                        _ => piece,
                    };
                    bytes.extend_from_slice(piece.as_bytes());
                }
            }
            strip_space = false;
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// `<0xAB>` → 0xAB.
fn parse_byte_token(text: &str) -> Option<u8> {
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
