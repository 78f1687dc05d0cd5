//! What bitnet.cpp's `llm_load_vocab` (`3rdparty/llama.cpp/src/llama.cpp`)
//! makes of a file's tokenizer keys: the vocab type from
//! `tokenizer.ggml.model`, and the pre-tokenizer (the regexes that split text
//! before BPE) from `tokenizer.ggml.pre`. Plain data, no FFI: `inspect`
//! prints it so a user sees, before running anything, that a gpt2 vocab
//! without `tokenizer.ggml.pre` (the published 2B-4T file) is split with the
//! `default` regexes, not llama3's.

/// How the pinned bitnet.cpp will read a vocab.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VocabReading {
    /// `llama_vocab_type`: SPM, BPE, WPM, UGM, RWKV or none (`no_vocab`).
    pub vocab_type: &'static str,
    /// The `LLAMA_VOCAB_PRE_TYPE_*` it splits text with, in lower case
    /// (`default`, `llama3`, `gpt2`, ...).
    pub pre_tokenizer: &'static str,
    /// `tokenizer.ggml.pre` is absent from a BPE vocab: bitnet.cpp logs
    /// "missing pre-tokenizer type, using: 'default'".
    pub pre_missing: bool,
}

/// Mirrors `llm_load_vocab`: Err is the message bitnet.cpp's load fails with.
pub fn reading(model: &str, pre: Option<&str>) -> Result<VocabReading, String> {
    let vocab_type = match model {
        "no_vocab" => "none",
        "llama" => "SPM",
        "bert" => "WPM",
        "gpt2" => "BPE",
        "t5" => "UGM",
        "rwkv" => "RWKV",
        other => return Err(format!("unknown tokenizer: '{other}'")),
    };
    // Only BPE vocabs have pre-tokenizers; the others split as `default`.
    if vocab_type != "BPE" {
        return Ok(VocabReading {
            vocab_type,
            pre_tokenizer: "default",
            pre_missing: false,
        });
    }
    let Some(pre) = pre.filter(|p| !p.is_empty()) else {
        return Ok(VocabReading {
            vocab_type,
            pre_tokenizer: "default",
            pre_missing: true,
        });
    };
    let pre_tokenizer = match pre {
        "default" => "default",
        "llama3" | "llama-v3" | "llama-bpe" => "llama3",
        "deepseek-llm" => "deepseek-llm",
        "deepseek-coder" => "deepseek-coder",
        "falcon" => "falcon",
        "falcon3" => "falcon3",
        "mpt" => "mpt",
        "starcoder" => "starcoder",
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "jina-v1-en" | "jina-v2-es" | "jina-v2-de"
        | "jina-v2-code" => "gpt2",
        "refact" => "refact",
        "command-r" => "command-r",
        "qwen2" => "qwen2",
        "stablelm2" => "stablelm2",
        "olmo" => "olmo",
        "dbrx" => "dbrx",
        "smaug-bpe" => "smaug",
        "poro-chat" => "poro",
        "chatglm-bpe" => "chatglm4",
        "viking" => "viking",
        "jais" => "jais",
        "tekken" => "tekken",
        "smollm" => "smollm",
        "codeshell" => "codeshell",
        "bloom" => "bloom",
        "gpt3-finnish" => "gpt3-finnish",
        "exaone" => "exaone",
        "chameleon" => "chameleon",
        other => return Err(format!("unknown pre-tokenizer type: '{other}'")),
    };
    Ok(VocabReading {
        vocab_type,
        pre_tokenizer,
        pre_missing: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpt2_vocab_without_pre_is_split_as_default() {
        let r = reading("gpt2", None).unwrap();
        assert_eq!(
            (r.vocab_type, r.pre_tokenizer, r.pre_missing),
            ("BPE", "default", true)
        );
        assert_eq!(
            reading("gpt2", Some("llama-bpe")).unwrap().pre_tokenizer,
            "llama3"
        );
        assert!(!reading("gpt2", Some("llama-bpe")).unwrap().pre_missing);
        assert!(reading("gpt2", Some("nonsense")).is_err());
        let spm = reading("llama", Some("llama-bpe")).unwrap();
        assert_eq!((spm.vocab_type, spm.pre_tokenizer), ("SPM", "default"));
        assert!(reading("sentencepiece", None).is_err());
    }
}
