//! A GGUF vocabulary written as a Hugging Face `tokenizer.json`, so that
//! the `tokenizers` crate (what most Rust and Python engines tokenize with)
//! can be compared with bitnet.cpp without a downloaded tokenizer.json.
//!
//! For `gpt2` vocabularies: a byte-level BPE model with the GGUF's vocab and
//! merges, every control, user-defined and unknown token as an added token,
//! a post-processor adding BOS/EOS as the GGUF asks, and the pre-tokenizer
//! the GGUF names:
//! - llama3 (`llama-bpe`, ...): one `Split` on the llama3 regex, as Meta's
//!   own tokenizer.json has it;
//! - `default` (also `tokenizer.ggml.pre` missing): the four regexes of
//!   llama.cpp's `default:` list as four `Split`s in order, each isolating
//!   its matches. Under a Unicode regex engine `\p{P}` and `\p{N}` match
//!   what llama.cpp's collapsed-text `std::regex` matches (no whitespace is
//!   P or N), so this is the closest a tokenizer.json can come to what
//!   bitnet.cpp does with a file lacking the key; what remains are Unicode
//!   table versions and the regex engines themselves;
//! - the gpt-2 family: one `Split` on the GPT-2 regex.
//!
//! SentencePiece vocabularies carry scores, not merges, and are refused
//! with a clear error rather than approximated.

use super::{attr, PreTokenizer, Tokenizer, TokenizerError, TokenizerKind, KEY_MERGES};
use crate::gguf::GgufFile;
use serde_json::{json, Map, Value};

pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
pub const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// llama.cpp's `default:` list (`llm_tokenizer_bpe`), in order.
pub const DEFAULT_REGEXES: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    GPT2_REGEX,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error("exporting a SentencePiece (tokenizer.ggml.model = \"llama\") vocabulary to tokenizer.json is not supported: the GGUF has scores, not the merges a tokenizer.json BPE model needs")]
    SentencePiece,
}

/// The tokenizer.json of the file's vocabulary.
pub fn tokenizer_json(f: &GgufFile) -> Result<Value, ExportError> {
    let tok = Tokenizer::from_gguf(f)?;
    let TokenizerKind::Bpe(pre) = tok.kind() else {
        return Err(ExportError::SentencePiece);
    };
    let merges: Vec<&str> = f.get_str_array(KEY_MERGES)?;
    let v = tok.vocab();

    let mut vocab = Map::new();
    for (id, text) in v.texts.iter().enumerate() {
        vocab.insert(text.clone(), json!(id));
    }
    let mut specials: Vec<u32> = v.special_cache.clone();
    specials.sort_unstable();
    let added_tokens: Vec<Value> = specials
        .iter()
        .map(|&id| {
            let a = v.attr(id);
            json!({
                "id": id,
                "content": v.texts[id as usize],
                "single_word": false,
                "lstrip": a & attr::LSTRIP != 0,
                "rstrip": a & attr::RSTRIP != 0,
                "normalized": false,
                "special": a & (attr::CONTROL | attr::UNKNOWN) != 0,
            })
        })
        .collect();

    let split = |regex: &str| {
        json!({
            "type": "Split",
            "pattern": { "Regex": regex },
            "behavior": "Isolated",
            "invert": false,
        })
    };
    let mut pretokenizers: Vec<Value> = match pre {
        PreTokenizer::Llama3 => vec![split(LLAMA3_REGEX)],
        PreTokenizer::Gpt2 => vec![split(GPT2_REGEX)],
        PreTokenizer::Default => DEFAULT_REGEXES.iter().map(|r| split(r)).collect(),
    };
    pretokenizers.push(json!({
        "type": "ByteLevel",
        "add_prefix_space": false,
        "trim_offsets": true,
        "use_regex": false,
    }));

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": { "type": "Sequence", "pretokenizers": pretokenizers },
        "post_processor": post_processor(&tok),
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": matches!(tok.pre_name(), Some("llama3" | "llama-v3" | "llama-bpe")),
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// BOS first and EOS last, as far as the GGUF asks for them
/// (`add_special_tokens = true` in `tokenizers` is `add_special` here).
fn post_processor(tok: &Tokenizer) -> Value {
    let special = |id: u32| {
        let text = tok.token_text(id).unwrap_or_default().to_string();
        (
            text.clone(),
            json!({ "id": text, "ids": [id], "tokens": [text] }),
        )
    };
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut map = Map::new();
    let bos = tok.bos().filter(|_| tok.add_bos()).map(special);
    let eos = tok.eos().filter(|_| tok.add_eos()).map(special);
    let seq = |id: &str, type_id: u32| json!({ "Sequence": { "id": id, "type_id": type_id } });
    let tok_item =
        |text: &str, type_id: u32| json!({ "SpecialToken": { "id": text, "type_id": type_id } });
    for (sequence, type_id) in [("A", 0), ("B", 1)] {
        if let Some((text, _)) = &bos {
            pair.push(tok_item(text, type_id));
            if sequence == "A" {
                single.push(tok_item(text, type_id));
            }
        }
        pair.push(seq(sequence, type_id));
        if sequence == "A" {
            single.push(seq(sequence, type_id));
        }
        if let Some((text, _)) = &eos {
            pair.push(tok_item(text, type_id));
            if sequence == "A" {
                single.push(tok_item(text, type_id));
            }
        }
    }
    for (text, value) in bos.into_iter().chain(eos) {
        map.insert(text, value);
    }
    json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": map,
    })
}
