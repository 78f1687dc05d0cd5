//! The candidate's tokenizer: the GGUF vocabulary turned into token ids
//! exactly as bitnet.cpp's pinned llama.cpp does it (`llama_tokenize`,
//! `llama_token_to_piece`, `llama_detokenize`), because both engines must
//! see the same ids, quirks included.
//!
//! - `spm`: SentencePiece vocabularies (`tokenizer.ggml.model = llama`).
//! - `bpe`: GPT-2 byte-level BPE (`gpt2`), split first by a
//!   [`pretokenize`] regex list chosen by `tokenizer.ggml.pre`.
//! - [`chat`]: `tokenizer.chat_template` rendered as Hugging Face does.
//! - [`hf`]: the vocabulary written as a Hugging Face `tokenizer.json`.
//!
//! Loading mirrors `llm_load_vocab` (`src/llama.cpp`): token types become
//! attributes, "control-looking" texts such as `<|eot_id|>` are forced to
//! control type, the special-token cache is every control, user-defined and
//! unknown token by descending text length, and the BOS/EOS flags come from
//! the model type, the pre-tokenizer and `tokenizer.ggml.add_{bos,eos}_token`.

mod bpe;
pub mod chat;
pub mod hf;
pub mod pretokenize;
mod spm;
pub mod unicode;

use crate::gguf::{GgufError, GgufFile};
pub use pretokenize::PreTokenizer;
use std::collections::HashMap;

pub const KEY_MODEL: &str = "tokenizer.ggml.model";
pub const KEY_PRE: &str = "tokenizer.ggml.pre";
pub const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
pub const KEY_SCORES: &str = "tokenizer.ggml.scores";
pub const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
pub const KEY_MERGES: &str = "tokenizer.ggml.merges";
pub const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
pub const KEY_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
pub const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
pub const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// `llama_token_attr`.
pub mod attr {
    pub const UNDEFINED: u32 = 0;
    pub const UNKNOWN: u32 = 1 << 0;
    pub const UNUSED: u32 = 1 << 1;
    pub const NORMAL: u32 = 1 << 2;
    pub const CONTROL: u32 = 1 << 3;
    pub const USER_DEFINED: u32 = 1 << 4;
    pub const BYTE: u32 = 1 << 5;
    pub const LSTRIP: u32 = 1 << 7;
    pub const RSTRIP: u32 = 1 << 8;
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("tokenizer.ggml.model is {0:?}: the candidate tokenizes \"llama\" (SentencePiece) and \"gpt2\" (byte-level BPE) vocabularies only")]
    UnsupportedModel(String),
    #[error("tokenizer.ggml.model is \"no_vocab\": the file has no vocabulary to tokenize with")]
    NoVocab,
    #[error("tokenizer.ggml.pre is {0:?}, which the pinned llama.cpp does not know either (it refuses to load the file)")]
    UnknownPreTokenizer(String),
    #[error("tokenizer.ggml.pre is {0:?}: bitnet.cpp knows this pre-tokenizer but the candidate does not implement it (implemented: default, llama3/llama-v3/llama-bpe, dbrx, smaug-bpe and the gpt-2 family)")]
    UnsupportedPreTokenizer(String),
    #[error("tokenizer.ggml.{key} has {found} entries, tokenizer.ggml.tokens has {expected}")]
    LengthMismatch {
        key: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("token {0:?} is missing, but llama.cpp sets attributes on it by name for this model (and fails to load without it)")]
    MissingNamedToken(&'static str),
}

/// Which algorithm turns text into ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// SentencePiece merging by score.
    Spm,
    /// GPT-2 byte-level BPE after a pre-tokenizer split.
    Bpe(PreTokenizer),
}

/// A loaded vocabulary and its tokenizer.
pub struct Tokenizer {
    vocab: Vocab,
    model: Model,
    /// `tokenizer.ggml.pre` as the file has it.
    pre_name: Option<String>,
}

enum Model {
    Spm,
    Bpe(bpe::Bpe),
}

/// Everything `llama_vocab` holds that tokenizing needs.
pub(crate) struct Vocab {
    texts: Vec<String>,
    scores: Vec<f32>,
    attrs: Vec<u32>,
    /// Text → id; a repeated text maps to its last id, as in llama.cpp.
    ids: HashMap<String, u32>,
    /// Control, user-defined and unknown tokens, longest text first (ties
    /// by id; llama.cpp's `std::sort` leaves their order unspecified).
    special_cache: Vec<u32>,
    /// `llama_token_to_piece(id, special = true)` of every token.
    pieces: Vec<Vec<u8>>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
    is_bpe: bool,
}

impl Vocab {
    fn id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    fn score(&self, id: u32) -> f32 {
        self.scores[id as usize]
    }

    fn attr(&self, id: u32) -> u32 {
        self.attrs
            .get(id as usize)
            .copied()
            .unwrap_or(attr::UNDEFINED)
    }

    /// `llama_byte_to_token_impl` for SPM: `<0xXX>`, else the byte as a
    /// one-byte token. llama.cpp throws (and aborts through the C API) when
    /// neither exists; we fall back to `<unk>`.
    fn spm_byte_token(&self, b: u8) -> Option<u32> {
        self.id(&format!("<0x{b:02X}>"))
            .or_else(|| std::str::from_utf8(&[b]).ok().and_then(|s| self.id(s)))
            .or(self.unk)
    }

    /// `llama_token_to_piece_impl` without the cache (`special = true`,
    /// `lstrip = 0`), which is how llama.cpp fills its cache.
    fn compute_piece(&self, id: u32) -> Vec<u8> {
        let a = self.attr(id);
        let text = &self.texts[id as usize];
        if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
            return text.as_bytes().to_vec();
        }
        if a & attr::NORMAL != 0 {
            return if self.is_bpe {
                bpe::decode_text(text)
            } else {
                text.replace(spm::SPACE, " ").into_bytes()
            };
        }
        if a & attr::BYTE != 0 && !self.is_bpe {
            // llama_token_to_byte: the two hex digits of `<0xXX>`.
            return spm::parse_byte_token(text)
                .or_else(|| text.get(3..5).and_then(|h| u8::from_str_radix(h, 16).ok()))
                .map(|b| vec![b])
                .unwrap_or_default();
        }
        Vec::new()
    }
}

impl Tokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let model_name = f.get_str(KEY_MODEL)?;
        let pre_name = match f.get(KEY_PRE) {
            Some(_) => Some(f.get_str(KEY_PRE)?.to_string()),
            None => None,
        };
        let is_bpe = match model_name {
            "llama" => false,
            "gpt2" => true,
            "no_vocab" => return Err(TokenizerError::NoVocab),
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };

        // The vocab type's defaults (llm_load_vocab), then the pre-tokenizer's.
        let mut add_bos = !is_bpe;
        let add_eos_default = false;
        let mut ignore_merges = false;
        let mut pre = PreTokenizer::Default;
        if is_bpe {
            match pre_name.as_deref() {
                // Missing: llama.cpp warns "missing pre-tokenizer type,
                // using: 'default'" and goes on.
                None | Some("default") => {}
                Some("llama3" | "llama-v3" | "llama-bpe") => {
                    pre = PreTokenizer::Llama3;
                    ignore_merges = true;
                    add_bos = true;
                }
                // The same regex as llama3, without its flags.
                Some("dbrx" | "smaug-bpe") => pre = PreTokenizer::Llama3,
                Some(
                    "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "jina-v1-en" | "jina-v2-es"
                    | "jina-v2-de" | "jina-v2-code" | "mpt" | "olmo" | "jais",
                ) => pre = PreTokenizer::Gpt2,
                Some(name) if KNOWN_PRE_TOKENIZERS.contains(&name) => {
                    return Err(TokenizerError::UnsupportedPreTokenizer(name.to_string()))
                }
                Some(name) => return Err(TokenizerError::UnknownPreTokenizer(name.to_string())),
            }
        }
        let add_space_prefix = match f.get(KEY_ADD_SPACE_PREFIX) {
            Some(_) => f.get_bool(KEY_ADD_SPACE_PREFIX)?,
            None => !is_bpe,
        };

        let mut texts: Vec<String> = f
            .get_str_array(KEY_TOKENS)?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let n = texts.len();
        let scores = match f.get(KEY_SCORES) {
            Some(_) => f.get_f32_array(KEY_SCORES)?,
            None => vec![0.0; n],
        };
        let types = match f.get(KEY_TOKEN_TYPE) {
            Some(_) => Some(f.get_i32_array(KEY_TOKEN_TYPE)?),
            None => None,
        };
        let n_types = types.as_ref().map_or(n, Vec::len);
        for (key, len) in [("scores", scores.len()), ("token_type", n_types)] {
            if len != n {
                return Err(TokenizerError::LengthMismatch {
                    key,
                    expected: n,
                    found: len,
                });
            }
        }
        // llama.cpp renames empty tokens so that they cannot match.
        for (i, t) in texts.iter_mut().enumerate() {
            if t.is_empty() {
                *t = format!("[EMPTY_{i}]");
            }
        }
        let mut attrs: Vec<u32> = match &types {
            Some(types) => types.iter().map(|&t| attr_of_type(t)).collect(),
            None => vec![attr::NORMAL; n],
        };
        let ids: HashMap<String, u32> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();

        // Special ids: the vocab type's defaults, then the keys; an id
        // outside the vocabulary keeps the default (with a warning in
        // llama.cpp).
        let (bos_default, eos_default, unk_default) = if is_bpe {
            (Some(11), Some(11), None)
        } else {
            (Some(1), Some(2), Some(0))
        };
        let special_id = |key: &str, default: Option<u32>| -> Result<Option<u32>, TokenizerError> {
            let full = format!("tokenizer.ggml.{key}");
            let id = match f.get(&full) {
                Some(_) => Some(f.get_u32(&full)?).filter(|&id| (id as usize) < n),
                None => None,
            };
            Ok(id.or(default).filter(|&id| (id as usize) < n))
        };
        let bos = special_id("bos_token_id", bos_default)?;
        let eos = special_id("eos_token_id", eos_default)?;
        let unk = special_id("unknown_token_id", unk_default)?;
        if f.get(KEY_ADD_BOS).is_some() {
            add_bos = f.get_bool(KEY_ADD_BOS)?;
        }
        let add_eos = match f.get(KEY_ADD_EOS) {
            Some(_) => f.get_bool(KEY_ADD_EOS)?,
            None => add_eos_default,
        };

        // Control-looking texts are forced to control type, for the roles
        // whose id no key set (the EOG list: always).
        for (role_keys, texts_of_role) in CONTROL_LOOKING {
            let set_by_key = role_keys
                .iter()
                .any(|key| special_id(key, None).ok().flatten().is_some());
            if set_by_key {
                continue;
            }
            for text in *texts_of_role {
                force_control(&mut attrs, ids.get(*text));
            }
        }
        for text in EOG_TEXTS {
            force_control(&mut attrs, ids.get(*text));
        }

        let mut special_cache: Vec<u32> = (0..n as u32)
            .filter(|&id| {
                attrs[id as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0
            })
            .collect();
        special_cache.sort_by_key(|&id| std::cmp::Reverse(texts[id as usize].len()));

        // Per-model attributes set by name (after the piece cache, as in
        // llama.cpp; they only change how the text is partitioned).
        let general_name = match f.get("general.name") {
            Some(_) => f.get_str("general.name")?.to_lowercase(),
            None => String::new(),
        };
        let set = |attrs: &mut Vec<u32>, text: &'static str, bit: u32, on: bool| {
            let id = *ids
                .get(text)
                .ok_or(TokenizerError::MissingNamedToken(text))?;
            let a = &mut attrs[id as usize];
            *a = if on { *a | bit } else { *a & !bit };
            Ok::<(), TokenizerError>(())
        };
        let pre_text = pre_name.as_deref().unwrap_or("");
        let mut named_attrs = attrs.clone();
        if ["jina-v2-de", "jina-v2-es", "jina-v2-code"]
            .iter()
            .any(|p| pre_text.contains(p))
        {
            set(&mut named_attrs, "<mask>", attr::LSTRIP, true)?;
        } else if ["phi-3", "phi3"].iter().any(|p| general_name.contains(p)) {
            for &id in &special_cache {
                named_attrs[id as usize] |= attr::RSTRIP;
            }
            set(&mut named_attrs, "</s>", attr::RSTRIP, true)?;
            for text in ["<unk>", "<s>", "<|endoftext|>"] {
                set(&mut named_attrs, text, attr::RSTRIP, false)?;
            }
        }

        let model = if is_bpe {
            let merges = f.get_str_array(KEY_MERGES)?;
            Model::Bpe(bpe::Bpe::new(&merges, pre, ignore_merges))
        } else {
            Model::Spm
        };
        let mut vocab = Vocab {
            texts,
            scores,
            attrs,
            ids,
            special_cache,
            pieces: Vec::new(),
            bos,
            eos,
            unk,
            add_bos,
            add_eos,
            add_space_prefix,
            // tokenizer_clean_spaces: true for the BPE pre-tokenizers we
            // implement, false for SPM.
            clean_spaces: is_bpe,
            is_bpe,
        };
        vocab.pieces = (0..n as u32).map(|id| vocab.compute_piece(id)).collect();
        vocab.attrs = named_attrs;
        Ok(Tokenizer {
            vocab,
            model,
            pre_name,
        })
    }

    pub fn kind(&self) -> TokenizerKind {
        match &self.model {
            Model::Spm => TokenizerKind::Spm,
            Model::Bpe(b) => TokenizerKind::Bpe(b.pre),
        }
    }

    /// `tokenizer.ggml.pre` as the file has it (`None`: missing).
    pub fn pre_name(&self) -> Option<&str> {
        self.pre_name.as_deref()
    }

    /// One line naming the algorithm and where its settings came from, e.g.
    /// `gpt2 byte-level BPE (128256 tokens, 280147 merges), pre-tokenizer
    /// default (tokenizer.ggml.pre missing), BOS 128000 added`.
    pub fn describe(&self) -> String {
        let n = self.vocab_size();
        let bos = match (self.add_bos(), self.bos()) {
            (true, Some(b)) => format!("BOS {b} added"),
            (true, None) => "BOS wanted but none".to_string(),
            (false, _) => "no BOS added".to_string(),
        };
        let eos = match (self.vocab.add_eos, self.eos()) {
            (true, Some(e)) => format!(", EOS {e} added"),
            _ => String::new(),
        };
        match &self.model {
            Model::Spm => format!("llama SentencePiece ({n} tokens), {bos}{eos}"),
            Model::Bpe(b) => {
                let source = match &self.pre_name {
                    None => "tokenizer.ggml.pre missing".to_string(),
                    Some(p) => format!("tokenizer.ggml.pre = {p:?}"),
                };
                format!(
                    "gpt2 byte-level BPE ({n} tokens, {} merges), pre-tokenizer {} ({source}), {bos}{eos}",
                    b.n_merges(),
                    b.pre.name()
                )
            }
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.texts.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.vocab.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.vocab.eos
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS
    /// (`llama_add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.vocab.add_bos
    }

    /// `llama_add_eos_token`.
    pub fn add_eos(&self) -> bool {
        self.vocab.add_eos
    }

    /// The text of a token as the vocabulary stores it.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.texts.get(id as usize).map(String::as_str)
    }

    /// The bytes a token stands for, special tokens as their text:
    /// `llama_token_to_piece(id, lstrip = 0, special = true)`.
    pub fn piece(&self, id: u32) -> Option<&[u8]> {
        self.vocab.pieces.get(id as usize).map(Vec::as_slice)
    }

    /// Whether a token is of control type (after llama.cpp's overrides).
    pub fn is_control(&self, id: u32) -> bool {
        self.vocab.attr(id) & attr::CONTROL != 0
    }

    /// `llama_token_attr` of a token (`attr::*` bits).
    pub fn attr(&self, id: u32) -> u32 {
        self.vocab.attr(id)
    }

    /// Token ids of `text`, exactly as `llama_tokenize(text, add_special,
    /// parse_special)` returns them: with `add_special`, BOS first (EOS
    /// last) when the vocabulary asks for it; with `parse_special`, control
    /// and unknown token texts in `text` become those tokens (user-defined
    /// ones always do).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let v = &self.vocab;
        let fragments = if text.is_empty() {
            Vec::new()
        } else {
            self.partition(text, parse_special)
        };
        let mut out = Vec::new();
        if add_special && v.add_bos {
            out.extend(v.bos);
        }
        match &self.model {
            Model::Spm => {
                // A text fragment gets the space prefix when it starts the
                // text or follows a special token.
                let mut after_special = true;
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(range) => {
                            let mut raw = String::with_capacity(range.len() + 3);
                            if v.add_space_prefix && after_special {
                                raw.push(' ');
                            }
                            raw.push_str(&text[range]);
                            spm::tokenize(v, &raw.replace(' ', spm::SPACE), &mut out);
                            after_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                    }
                }
            }
            Model::Bpe(b) => {
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(range) => b.tokenize(v, &text[range], &mut out),
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
        }
        if add_special && v.add_eos {
            out.extend(v.eos);
        }
        out
    }

    /// `tokenizer_st_partition`: the text split into raw-text fragments and
    /// special tokens found in it, longest special text first.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let v = &self.vocab;
        let mut fragments = vec![Fragment::Text(0..text.len())];
        for &id in &v.special_cache {
            let a = v.attr(id);
            if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let special = v.texts[id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len());
            for fragment in fragments {
                let Fragment::Text(range) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let mut rest = range;
                while let Some(at) = text[rest.clone()].find(special) {
                    let start = rest.start + at;
                    let mut left = rest.start..start;
                    if a & attr::LSTRIP != 0 {
                        while left.end > left.start && is_c_space(text.as_bytes()[left.end - 1]) {
                            left.end -= 1;
                        }
                    }
                    if !left.is_empty() {
                        next.push(Fragment::Text(left));
                    }
                    next.push(Fragment::Token(id));
                    rest = start + special.len()..rest.end;
                    if a & attr::RSTRIP != 0 {
                        while rest.start < rest.end && is_c_space(text.as_bytes()[rest.start]) {
                            rest.start += 1;
                        }
                    }
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Text of `ids` as `llama_detokenize(ids, remove_special = false,
    /// unparse_special = false)` makes it (what llama.cpp's
    /// `common_detokenize(.., special = false)` shows): control and unknown
    /// tokens vanish, the first piece loses one leading space when the
    /// vocabulary adds a space prefix, and BPE vocabularies clean up spaces
    /// before punctuation. Invalid UTF-8 is replaced; ids outside the
    /// vocabulary are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let v = &self.vocab;
        let mut bytes = Vec::new();
        let mut strip_space = v.add_space_prefix;
        for &id in ids {
            let Some(piece) = v.pieces.get(id as usize) else {
                continue;
            };
            if v.attr(id) & (attr::UNKNOWN | attr::CONTROL) == 0 {
                let piece = match piece.strip_prefix(b" ") {
                    Some(rest) if strip_space => rest,
                    _ => piece.as_slice(),
                };
                bytes.extend_from_slice(piece);
            }
            strip_space = false;
        }
        if v.clean_spaces {
            clean_up_spaces(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The chat template the file carries (`tokenizer.chat_template`).
    pub fn chat_template(f: &GgufFile) -> Result<Option<String>, GgufError> {
        match f.get(KEY_CHAT_TEMPLATE) {
            Some(_) => Ok(Some(f.get_str(KEY_CHAT_TEMPLATE)?.to_string())),
            None => Ok(None),
        }
    }

    pub(crate) fn vocab(&self) -> &Vocab {
        &self.vocab
    }
}

enum Fragment {
    Text(std::ops::Range<usize>),
    Token(u32),
}

/// llama.cpp's override of a control-looking token that is not of control
/// type: its attribute *becomes* control (a user-defined one stops being
/// user-defined, so it is no longer found in text without parse_special).
fn force_control(attrs: &mut [u32], id: Option<&u32>) {
    if let Some(&id) = id {
        let a = &mut attrs[id as usize];
        if *a & attr::CONTROL == 0 {
            *a = attr::CONTROL;
        }
    }
}

/// C's `isspace` in the "C" locale.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// `llama_token_type` → `llama_token_attr` (`llm_load_vocab`).
fn attr_of_type(t: i32) -> u32 {
    match t {
        1 => attr::NORMAL,
        2 => attr::UNKNOWN,
        3 => attr::CONTROL,
        4 => attr::USER_DEFINED,
        5 => attr::UNUSED,
        6 => attr::BYTE,
        _ => attr::UNDEFINED,
    }
}

/// The three passes of `llama_detokenize` under `tokenizer_clean_spaces`:
/// drop the space before `? ! . ,`, the spaces around a lone `'`, and the
/// space before `'s 'm 're 've`. Each pass reads its input as llama.cpp's
/// in-place loop does (the second one turns the space it removes after a
/// lone `'` into a NUL that the next comparison sees).
fn clean_up_spaces(text: &mut Vec<u8>) {
    if text.is_empty() {
        return;
    }
    let src = std::mem::take(text);
    let mut out = vec![src[0]];
    for i in 1..src.len() {
        let x = src[i];
        if src[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            out.pop();
        }
        out.push(x);
    }

    let mut src = out;
    let mut out = vec![src[0]];
    let mut i = 1;
    while i < src.len() {
        let x = src[i];
        if x == b'\'' && i + 1 < src.len() && src[i - 1] == b' ' && src[i + 1] == b' ' {
            out.pop();
            i += 1;
            src[i] = 0;
        }
        out.push(x);
        i += 1;
    }

    let src = out;
    let mut out = vec![src[0]];
    for i in 1..src.len() {
        let x = src[i];
        if src[i - 1] == b' ' && x == b'\'' && i + 1 < src.len() {
            let x1 = src[i + 1];
            let x2 = src.get(i + 2).copied();
            if matches!(x1, b's' | b'm')
                || matches!((x1, x2), (b'r', Some(b'e')) | (b'v', Some(b'e')))
            {
                out.pop();
            }
        }
        out.push(x);
    }
    *text = out;
}

/// The pre-tokenizer names the pinned `llm_load_vocab` accepts.
const KNOWN_PRE_TOKENIZERS: &[&str] = &[
    "default",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "deepseek-llm",
    "deepseek-coder",
    "falcon",
    "falcon3",
    "mpt",
    "starcoder",
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "jina-v1-en",
    "jina-v2-es",
    "jina-v2-de",
    "jina-v2-code",
    "refact",
    "command-r",
    "qwen2",
    "stablelm2",
    "olmo",
    "dbrx",
    "smaug-bpe",
    "poro-chat",
    "chatglm-bpe",
    "viking",
    "jais",
    "tekken",
    "smollm",
    "codeshell",
    "bloom",
    "gpt3-finnish",
    "exaone",
    "chameleon",
];

/// Roles whose token llama.cpp finds by text when no key names it, forcing
/// the token to control type: (the keys that set the role, its texts).
/// Where several texts of one role exist, llama.cpp takes whichever its hash
/// map visits first; we force all of them.
const CONTROL_LOOKING: &[(&[&str], &[&str])] = &[
    (&["eot_token_id"], &["<｜end▁of▁sentence｜>"]),
    (
        &["fim_pre_token_id", "prefix_token_id"],
        &["<|fim_prefix|>", "<fim-prefix>", "<｜fim▁begin｜>", "<PRE>"],
    ),
    (
        &["fim_suf_token_id", "suffix_token_id"],
        &["<|fim_suffix|>", "<fim-suffix>", "<｜fim▁hole｜>", "<SUF>"],
    ),
    (
        &["fim_mid_token_id", "middle_token_id"],
        &["<|fim_middle|>", "<fim-middle>", "<｜fim▁end｜>", "<MID>"],
    ),
    (
        &["fim_pad_token_id"],
        &["<|fim_pad|>", "<fim-pad>", "<PAD>"],
    ),
    (
        &["fim_rep_token_id"],
        &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>"],
    ),
    (&["fim_sep_token_id"], &["<|file_sep|>"]),
];

/// End-of-generation texts, always forced to control type.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
];
