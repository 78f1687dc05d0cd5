//! Deterministic synthetic BitNet models.
//!
//! Real BitNet checkpoints cannot be downloaded on the machines that run our
//! tests, so the project makes its own: GGUF files with exactly the tensor
//! names, shapes, types and metadata bitnet.cpp expects, filled from a seed.
//! The same config and seed always give the same bytes.
//!
//! The weights are meant to behave like a model, not to be noise for its own
//! sake: ternary projections with about a third zeros and an absmean-like
//! scale of `1/sqrt(2/3 · n_in)` (so a projection keeps the RMS of its input),
//! norm weights around 1 (or 0.01..0.05 for the attention norms, as in the
//! real 2B-4T), and embeddings whose rows have norm about 4. Activations then
//! stay O(1) through every layer and every comparison is meaningful.
//!
//! Vocab and metadata per arch ([`VocabKind`]): `bitnet-b1.58` files (and
//! `bitnet-25` ones, the same model under another engines' arch name, keys
//! `bitnet-25.*`) follow the published BitNet-b1.58-2B-4T layout (its 24 keys in its order, a
//! byte-level BPE `gpt2` vocab from [`byte_bpe`] with llama3's special
//! tokens and a llama3-style chat template, no `tokenizer.ggml.pre`); `bitnet`
//! and `llama` files carry the SentencePiece `llama` vocab of [`vocab`] (their
//! bytes, and so the receipts made from them, are what they always were).
//! Any arch can take another file's tokenizer instead ([`CopiedVocab`]).

pub mod byte_bpe;
mod rng;
pub mod vocab;

pub use rng::SplitMix64;

use crate::gguf::{GgmlType, GgufFile, GgufWriter, MetaArray, MetaValue};
use crate::quant::i2s;
use rayon::prelude::*;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// Bytes of I2_S codes (or F16 values) generated per parallel work item.
/// Chunks have their own PRNG streams, so bytes do not depend on threads.
const CHUNK_BYTES: usize = 1 << 20;

/// Limits on a synthetic model's shape: far above every real BitNet shape
/// (2B-4T: n_embd 2560, n_ff 6912, 30 layers, 128256 tokens), far below
/// what exhausts a machine.
pub mod limits {
    /// Widest `n_embd` (and most heads).
    pub const N_EMBD: usize = 1 << 16;
    /// Widest `n_ff`.
    pub const N_FF: usize = 1 << 18;
    /// Largest vocabulary.
    pub const N_VOCAB: usize = 1 << 22;
    /// Longest context.
    pub const N_CTX: usize = 1 << 20;
    /// The most tensor bytes one model may hold (the 2B-4T holds 1.2 GB).
    pub const MODEL_BYTES: u64 = 16 << 30;
}

/// Named model shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Preset {
    /// 2 layers, 256 wide, GQA; well under 1 MB.
    #[value(name = "tiny")]
    Tiny,
    /// 4 layers, 512 wide, GQA; a few MB.
    #[value(name = "small")]
    Small,
    /// The shape of 1bitLLM/bitnet_b1_58-large (0.7B).
    #[value(name = "bitnet_b1_58-large")]
    BitnetLarge,
    /// The shape of 1bitLLM/bitnet_b1_58-3B. Its n_ff of 8640 is not a
    /// multiple of 128: the tensors still pack (I2_S blocks the flattened
    /// tensor), but bitnet.cpp computes ffn_down wrong: each row loses its
    /// last 64 values, and odd rows, which start inside a block, are read
    /// as if they started one (`oracle::reference_bugs`). Kept, because it
    /// is the real shape: `find` blames the reference there, with the cause.
    #[value(name = "bitnet_b1_58-3B")]
    Bitnet3B,
    /// The shape of microsoft/BitNet-b1.58-2B-4T (about 1.2 GB here).
    #[value(name = "BitNet-b1.58-2B-4T")]
    Bitnet2B4T,
}

impl Preset {
    pub const ALL: [Preset; 5] = [
        Preset::Tiny,
        Preset::Small,
        Preset::BitnetLarge,
        Preset::Bitnet3B,
        Preset::Bitnet2B4T,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::BitnetLarge => "bitnet_b1_58-large",
            Preset::Bitnet3B => "bitnet_b1_58-3B",
            Preset::Bitnet2B4T => "BitNet-b1.58-2B-4T",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = SynthError;
    fn from_str(s: &str) -> Result<Self, SynthError> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| SynthError::UnknownPreset(s.to_string()))
    }
}

/// What can be wrong with a synthetic model request.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown preset {0:?} (known: tiny, small, bitnet_b1_58-large, bitnet_b1_58-3B, BitNet-b1.58-2B-4T)")]
    UnknownPreset(String),
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("cannot take the vocab from {path}: {reason}")]
    Vocab { path: String, reason: String },
    #[error("cannot write {path}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Everything that shapes a synthetic model. Plain data: start from
/// [`SynthConfig::preset`] and override any field. Every file made from it
/// carries it as JSON under [`RECIPE_KEY`], so a receipt can name the recipe
/// and `divergence verify` can make the same bytes again on a fresh clone.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SynthConfig {
    /// `bitnet`, `bitnet-b1.58`, `bitnet-25` or `llama` (the metadata key prefix too).
    pub arch: String,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// Type of `token_embd.weight`: F16 or F32.
    #[serde(with = "embd_type_name")]
    pub embd_type: GgmlType,
    /// Write `blk.N.<proj>.scale` F32 `[1]` tensors; the I2_S inline scales are then 1.0.
    pub scale_tensors: bool,
    /// attn_norm weights in 0.01..0.05, as in the real 2B-4T.
    pub tiny_attn_norm: bool,
    /// Write a separate F16 `output.weight` (untied logits). Not for arch
    /// `bitnet`, whose reference graph always uses `token_embd`.
    pub untied_output: bool,
    pub seed: u64,
    /// `general.name`; `None` writes a description of the synthetic model.
    pub name: Option<String>,
    /// Another file's tokenizer to write instead of the synthetic one
    /// (`gen-model --vocab`); `n_vocab` must be its token count. Not part of
    /// the recipe JSON (280k merges would be): [`SynthConfig::vocab_source`]
    /// names the file instead.
    #[serde(skip)]
    pub vocab: Option<CopiedVocab>,
    /// Where `vocab` came from: the file and its sha256, so the recipe can
    /// be made again where that file is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_source: Option<VocabSource>,
}

/// The file a copied tokenizer came from.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VocabSource {
    /// The GGUF path as given.
    pub path: String,
    /// Its sha256.
    pub sha256: String,
}

/// The `tokenizer.*` metadata of another GGUF file (e.g. llama.cpp's
/// vocab-only `ggml-vocab-llama-bpe.gguf`), copied into a synthetic model.
#[derive(Clone, Debug, PartialEq)]
pub struct CopiedVocab {
    /// Where it came from (for messages).
    pub source: String,
    /// Every `tokenizer.*` key of the source, in its order.
    pub keys: Vec<(String, MetaValue)>,
}

impl CopiedVocab {
    pub fn from_gguf(path: &Path) -> Result<CopiedVocab, SynthError> {
        let source = path.display().to_string();
        let bad = |reason: String| SynthError::Vocab {
            path: source.clone(),
            reason,
        };
        let file = GgufFile::open(path).map_err(|e| {
            // The reader's message and its cause (`cannot read X: a FIFO, ...`).
            let cause = std::error::Error::source(&e).map(|c| format!(": {c}"));
            bad(format!("{e}{}", cause.unwrap_or_default()))
        })?;
        let keys: Vec<(String, MetaValue)> = file
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .cloned()
            .collect();
        let vocab = CopiedVocab {
            source: source.clone(),
            keys,
        };
        if vocab.get(KEY_TOKENIZER_MODEL).is_none() {
            return Err(bad(format!("it has no {KEY_TOKENIZER_MODEL}")));
        }
        if vocab.n_tokens().is_none() {
            return Err(bad(format!("it has no {KEY_TOKENS} string array")));
        }
        Ok(vocab)
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.keys.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The number of tokens (the model's n_vocab).
    pub fn n_tokens(&self) -> Option<usize> {
        match self.get(KEY_TOKENS)? {
            MetaValue::Array(MetaArray::String(t)) => Some(t.len()),
            _ => None,
        }
    }
}

const KEY_TOKENIZER_MODEL: &str = "tokenizer.ggml.model";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// Which synthetic vocab an arch gets (when no `--vocab` is given):
/// `bitnet-b1.58` and `bitnet-25` the byte-level BPE one its published file has
/// ([`byte_bpe`]), the others SentencePiece `llama` ([`vocab`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    SentencePiece,
    ByteBpe,
}

impl VocabKind {
    pub fn of_arch(arch: &str) -> VocabKind {
        if published_2b4t_layout(arch) {
            VocabKind::ByteBpe
        } else {
            VocabKind::SentencePiece
        }
    }

    /// Fewest tokens the synthetic vocab of this kind has.
    pub fn min_vocab(self) -> usize {
        match self {
            VocabKind::SentencePiece => vocab::base_tokens().len(),
            VocabKind::ByteBpe => byte_bpe::min_vocab(),
        }
    }
}

/// The arches whose synthetic files follow the published 2B-4T layout:
/// its own name, and the one ik_llama.cpp and others give it.
fn published_2b4t_layout(arch: &str) -> bool {
    matches!(arch, "bitnet-b1.58" | "bitnet-25")
}

pub const ARCHES: [&str; 4] = ["bitnet", "bitnet-b1.58", "bitnet-25", "llama"];

/// The metadata key holding a synthetic model's [`SynthConfig`] as JSON.
pub const RECIPE_KEY: &str = "divergence.synth.recipe";

/// `embd_type` as its ggml name ("f16", "f32") in a recipe.
mod embd_type_name {
    use crate::gguf::GgmlType;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &GgmlType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(t.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<GgmlType, D::Error> {
        let name = String::deserialize(d)?;
        GgmlType::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown tensor type {name:?}")))
    }
}

/// The recipe a synthetic model file carries, if it has one.
pub fn recipe_of(file: &crate::gguf::GgufFile) -> Option<SynthConfig> {
    serde_json::from_str(file.get_str(RECIPE_KEY).ok()?).ok()
}

impl SynthConfig {
    pub fn preset(p: Preset) -> Self {
        let base = SynthConfig {
            arch: "bitnet".into(),
            n_embd: 256,
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 512,
            n_vocab: 512,
            n_ctx: 256,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            embd_type: GgmlType::F16,
            scale_tensors: false,
            tiny_attn_norm: false,
            untied_output: false,
            seed: 0,
            name: None,
            vocab: None,
            vocab_source: None,
        };
        match p {
            Preset::Tiny => base,
            Preset::Small => SynthConfig {
                n_embd: 512,
                n_layer: 4,
                n_head: 8,
                n_head_kv: 4,
                n_ff: 1536,
                n_vocab: 1024,
                n_ctx: 512,
                ..base
            },
            Preset::BitnetLarge => SynthConfig {
                n_embd: 1536,
                n_layer: 24,
                n_head: 16,
                n_head_kv: 16,
                n_ff: 4096,
                n_vocab: 32002,
                n_ctx: 2048,
                ..base
            },
            // n_ff 8640 is not a multiple of 128: bitnet.cpp misreads ffn_down
            // (see `Preset::Bitnet3B`). Kept: it is the real shape.
            Preset::Bitnet3B => SynthConfig {
                n_embd: 3200,
                n_layer: 26,
                n_head: 32,
                n_head_kv: 32,
                n_ff: 8640,
                n_vocab: 32002,
                n_ctx: 2048,
                ..base
            },
            Preset::Bitnet2B4T => SynthConfig {
                arch: "bitnet-b1.58".into(),
                n_embd: 2560,
                n_layer: 30,
                n_head: 20,
                n_head_kv: 5,
                n_ff: 6912,
                n_vocab: 128_256,
                n_ctx: 4096,
                rope_theta: 500_000.0,
                tiny_attn_norm: true,
                // The published file's general.name.
                name: Some("bitnet2b".into()),
                ..base
            },
        }
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// The bytes of the tensors this config makes (the file adds its
    /// metadata): what [`generate`] holds in memory. Saturating, so a
    /// hostile config cannot overflow it.
    pub fn tensor_bytes(&self) -> u64 {
        let n = |v: usize| v as u64;
        let i2s = |a: usize, b: usize| n(a).saturating_mul(n(b)) / 4 + 32;
        let kv = n(self.head_dim()).saturating_mul(n(self.n_head_kv)) as usize;
        let embd = if self.embd_type == GgmlType::F32 {
            4
        } else {
            2
        };
        let per_layer = i2s(self.n_embd, self.n_embd)
            .saturating_mul(2)
            .saturating_add(i2s(self.n_embd, kv).saturating_mul(2))
            .saturating_add(i2s(self.n_embd, self.n_ff).saturating_mul(3))
            .saturating_add(n(self.n_embd).saturating_mul(12))
            .saturating_add(n(self.n_ff).saturating_mul(4));
        let tables = if self.untied_output { 2 } else { 1 };
        n(self.n_vocab)
            .saturating_mul(n(self.n_embd))
            .saturating_mul(embd)
            .saturating_mul(tables)
            .saturating_add(per_layer.saturating_mul(n(self.n_layer)))
    }

    /// Checks that the shapes make a model both engines can run, within
    /// limits that every real BitNet shape is far below (checked before
    /// anything is allocated: the model is built in memory).
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |msg: String| Err(SynthError::InvalidConfig(msg));
        if !ARCHES.contains(&self.arch.as_str()) {
            return bad(format!("arch {:?} is not one of {ARCHES:?}", self.arch));
        }
        for (name, v, max) in [
            ("n_embd", self.n_embd, limits::N_EMBD),
            ("n_layer", self.n_layer, crate::model::MAX_LAYERS),
            ("n_head", self.n_head, limits::N_EMBD),
            ("n_head_kv", self.n_head_kv, limits::N_EMBD),
            ("n_ff", self.n_ff, limits::N_FF),
            ("n_vocab", self.n_vocab, limits::N_VOCAB),
            ("n_ctx", self.n_ctx, limits::N_CTX),
        ] {
            if v > max {
                return bad(format!("{name} {v} is too large: at most {max}"));
            }
        }
        let bytes = self.tensor_bytes();
        if bytes > limits::MODEL_BYTES {
            return bad(format!(
                "the model would hold {:.1} GiB of tensors: at most {} GiB (it is built in memory)",
                bytes as f64 / (1u64 << 30) as f64,
                limits::MODEL_BYTES >> 30
            ));
        }
        for (name, v) in [
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_head_kv", self.n_head_kv),
            ("n_ff", self.n_ff),
            ("n_ctx", self.n_ctx),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_head {} does not divide n_embd {}",
                self.n_head, self.n_embd
            ));
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return bad(format!(
                "n_head_kv {} does not divide n_head {}",
                self.n_head_kv, self.n_head
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        // Every I2_S projection has n_embd as one of its dims, so this makes
        // every tensor a whole number of 128-value blocks. n_ff may break rows
        // (the real 3B does); see `Preset::Bitnet3B`.
        if !self.n_embd.is_multiple_of(i2s::BLOCK) {
            return bad(format!(
                "n_embd {} must be a multiple of {} (I2_S blocks)",
                self.n_embd,
                i2s::BLOCK
            ));
        }
        match &self.vocab {
            Some(v) => {
                if v.n_tokens() != Some(self.n_vocab) {
                    return bad(format!(
                        "n_vocab {} is not the {} tokens of the vocab from {}",
                        self.n_vocab,
                        v.n_tokens().unwrap_or(0),
                        v.source
                    ));
                }
            }
            None => {
                let min_vocab = VocabKind::of_arch(&self.arch).min_vocab();
                if self.n_vocab < min_vocab {
                    return bad(format!(
                        "n_vocab {} is below the {min_vocab} tokens of the base vocab",
                        self.n_vocab
                    ));
                }
            }
        }
        if u32::try_from(self.n_vocab).is_err() || u32::try_from(self.n_ctx).is_err() {
            return bad("n_vocab and n_ctx must fit in u32".into());
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta {} must be positive", self.rope_theta));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return bad(format!("rms_eps {} must be positive", self.rms_eps));
        }
        if self.untied_output && self.arch == "bitnet" {
            return bad(
                "arch bitnet ties its logits to token_embd: bitnet.cpp refuses an output.weight"
                    .into(),
            );
        }
        if !matches!(self.embd_type, GgmlType::F16 | GgmlType::F32) {
            return bad(format!("embd_type {} must be f16 or f32", self.embd_type));
        }
        Ok(())
    }

    fn has_sub_norms(&self) -> bool {
        self.arch != "llama"
    }
}

/// Builds the whole model in memory.
pub fn generate(cfg: &SynthConfig) -> Result<GgufWriter, SynthError> {
    cfg.validate()?;
    let mut w = GgufWriter::new();
    write_metadata(&mut w, cfg);
    w.set(
        RECIPE_KEY,
        MetaValue::String(serde_json::to_string(cfg).expect("recipes serialize")),
    );

    let (e, ff, kv) = (
        cfg.n_embd as u64,
        cfg.n_ff as u64,
        (cfg.n_head_kv * cfg.head_dim()) as u64,
    );
    let v = cfg.n_vocab as u64;
    let seed = cfg.seed;

    w.add_tensor("token_embd.weight", &[e, v], cfg.embd_type, embedding(cfg));

    for l in 0..cfg.n_layer {
        let blk = |t: &str| format!("blk.{l}.{t}");
        let (lo, hi) = if cfg.tiny_attn_norm {
            (0.01, 0.05)
        } else {
            (0.8, 1.2)
        };
        let name = blk("attn_norm.weight");
        w.add_tensor(
            &name,
            &[e],
            GgmlType::F32,
            uniform_f32(seed, &name, cfg.n_embd, lo, hi),
        );
        let projections: [(&str, [u64; 2]); 7] = [
            ("attn_q", [e, e]),
            ("attn_k", [e, kv]),
            ("attn_v", [e, kv]),
            ("attn_output", [e, e]),
            ("ffn_gate", [e, ff]),
            ("ffn_up", [e, ff]),
            ("ffn_down", [ff, e]),
        ];
        for (proj, dims) in projections {
            if proj == "attn_output" && cfg.has_sub_norms() {
                let name = blk("attn_sub_norm.weight");
                w.add_tensor(
                    &name,
                    &[e],
                    GgmlType::F32,
                    norm_weight(seed, &name, cfg.n_embd),
                );
            }
            if proj == "ffn_gate" {
                let name = blk("ffn_norm.weight");
                w.add_tensor(
                    &name,
                    &[e],
                    GgmlType::F32,
                    norm_weight(seed, &name, cfg.n_embd),
                );
            }
            if proj == "ffn_down" && cfg.has_sub_norms() {
                let name = blk("ffn_sub_norm.weight");
                w.add_tensor(
                    &name,
                    &[ff],
                    GgmlType::F32,
                    norm_weight(seed, &name, cfg.n_ff),
                );
            }
            let name = blk(&format!("{proj}.weight"));
            let scale = projection_scale(seed, &name, dims[0]);
            let inline = if cfg.scale_tensors { 1.0 } else { scale };
            w.add_tensor(
                &name,
                &dims,
                GgmlType::I2S,
                ternary_i2s(seed, &name, dims[0] * dims[1], inline),
            );
            if cfg.scale_tensors {
                w.add_tensor(
                    &blk(&format!("{proj}.scale")),
                    &[1],
                    GgmlType::F32,
                    scale.to_le_bytes().to_vec(),
                );
            }
        }
    }

    let name = "output_norm.weight";
    w.add_tensor(
        name,
        &[e],
        GgmlType::F32,
        norm_weight(seed, name, cfg.n_embd),
    );
    if cfg.untied_output {
        let out = SynthConfig {
            embd_type: GgmlType::F16,
            ..cfg.clone()
        };
        w.add_tensor(
            "output.weight",
            &[e, v],
            GgmlType::F16,
            dense_rows(&out, "output.weight"),
        );
    }
    Ok(w)
}

/// Generates the model and writes it atomically to `path`.
pub fn write_model(cfg: &SynthConfig, path: &Path) -> Result<(), SynthError> {
    generate(cfg)?
        .write_to(path)
        .map_err(|source| SynthError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// Makes a recorded model again (`verify`, from a receipt's recipe): written
/// to `path` only when its bytes hash to `sha256`; on a mismatch nothing is
/// left there.
pub fn remake(cfg: &SynthConfig, path: &Path, sha256: &str) -> Result<(), SynthError> {
    generate(cfg)?
        .write_to_verified(path, sha256)
        .map_err(|source| SynthError::Io {
            path: path.to_path_buf(),
            source,
        })
}

fn write_metadata(w: &mut GgufWriter, cfg: &SynthConfig) {
    if published_2b4t_layout(&cfg.arch) {
        return write_published_b158_metadata(w, cfg);
    }
    let arch = cfg.arch.as_str();
    let key = |k: &str| format!("{arch}.{k}");
    let u32_of = |n: usize| MetaValue::U32(n as u32);
    w.set("general.architecture", MetaValue::String(arch.into()));
    w.set(
        "general.name",
        MetaValue::String(format!(
            "divergence synthetic {arch} {}x{} seed {}",
            cfg.n_embd, cfg.n_layer, cfg.seed
        )),
    );
    w.set_alignment(crate::gguf::DEFAULT_ALIGNMENT);
    w.set(&key("context_length"), u32_of(cfg.n_ctx));
    w.set(&key("embedding_length"), u32_of(cfg.n_embd));
    w.set(&key("block_count"), u32_of(cfg.n_layer));
    w.set(&key("feed_forward_length"), u32_of(cfg.n_ff));
    w.set(&key("attention.head_count"), u32_of(cfg.n_head));
    w.set(&key("attention.head_count_kv"), u32_of(cfg.n_head_kv));
    w.set(
        &key("attention.layer_norm_rms_epsilon"),
        MetaValue::F32(cfg.rms_eps),
    );
    w.set(&key("rope.freq_base"), MetaValue::F32(cfg.rope_theta));
    w.set(&key("rope.dimension_count"), u32_of(cfg.head_dim()));
    w.set(&key("vocab_size"), u32_of(cfg.n_vocab));

    if let Some(v) = &cfg.vocab {
        for (k, value) in &v.keys {
            w.set(k, value.clone());
        }
        return;
    }
    // validate() checked n_vocab against the base vocab.
    let tokens = vocab::tokens(cfg.n_vocab).unwrap_or_default();
    w.set("tokenizer.ggml.model", MetaValue::String("llama".into()));
    w.set(
        "tokenizer.ggml.tokens",
        MetaValue::Array(MetaArray::String(
            tokens.iter().map(|t| t.text.clone()).collect(),
        )),
    );
    w.set(
        "tokenizer.ggml.scores",
        MetaValue::Array(MetaArray::F32(tokens.iter().map(|t| t.score).collect())),
    );
    w.set(
        "tokenizer.ggml.token_type",
        MetaValue::Array(MetaArray::I32(tokens.iter().map(|t| t.ty).collect())),
    );
    w.set("tokenizer.ggml.bos_token_id", MetaValue::U32(vocab::BOS_ID));
    w.set("tokenizer.ggml.eos_token_id", MetaValue::U32(vocab::EOS_ID));
    w.set(
        "tokenizer.ggml.unknown_token_id",
        MetaValue::U32(vocab::UNK_ID),
    );
    w.set("tokenizer.ggml.add_bos_token", MetaValue::Bool(true));
}

/// The tokenizer keys of the published 2B-4T file after `general.file_type`, in its order.
const PUBLISHED_TOKENIZER_KEYS: [&str; 9] = [
    KEY_TOKENIZER_MODEL,
    KEY_TOKENS,
    KEY_SCORES,
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    KEY_EOS,
    KEY_PADDING,
    KEY_CHAT_TEMPLATE,
];
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_PADDING: &str = "tokenizer.ggml.padding_token_id";

/// `general.file_type` of an I2_S model (`LLAMA_FTYPE_MOSTLY_I2_S`).
const FILE_TYPE_I2_S: u32 = 40;

/// The metadata of arch `bitnet-b1.58` (or `bitnet-25`) as the published
/// `ggml-model-i2_s.gguf` has it: its 24 keys in its order (loader dump in
/// BitNet issue #373; ik_llama.cpp issue #365 shows the tokenizer keys):
/// no `general.alignment` (the default 32 applies) and no
/// `tokenizer.ggml.pre` (bitnet.cpp then uses its `default` pre-tokenizer).
/// With a copied vocab its `tokenizer.*` keys replace the synthetic ones,
/// except `tokenizer.ggml.pre`, which the published layout does not have;
/// published keys the source lacks are written as the published file has
/// them (llama.cpp's ggml-vocab-llama-bpe.gguf has no scores, padding id or
/// chat template).
fn write_published_b158_metadata(w: &mut GgufWriter, cfg: &SynthConfig) {
    let arch = cfg.arch.as_str();
    let key = |k: &str| format!("{arch}.{k}");
    let u32_of = |n: usize| MetaValue::U32(n as u32);
    w.set("general.architecture", MetaValue::String(arch.into()));
    let name = cfg.name.clone().unwrap_or_else(|| {
        format!(
            "divergence synthetic {arch} {}x{} seed {}",
            cfg.n_embd, cfg.n_layer, cfg.seed
        )
    });
    w.set("general.name", MetaValue::String(name));
    w.set(&key("vocab_size"), u32_of(cfg.n_vocab));
    w.set(&key("context_length"), u32_of(cfg.n_ctx));
    w.set(&key("embedding_length"), u32_of(cfg.n_embd));
    w.set(&key("block_count"), u32_of(cfg.n_layer));
    w.set(&key("feed_forward_length"), u32_of(cfg.n_ff));
    w.set(&key("rope.dimension_count"), u32_of(cfg.head_dim()));
    w.set(&key("attention.head_count"), u32_of(cfg.n_head));
    w.set(&key("attention.head_count_kv"), u32_of(cfg.n_head_kv));
    let add_bos = cfg
        .vocab
        .as_ref()
        .and_then(|v| v.get(KEY_ADD_BOS).cloned())
        .unwrap_or(MetaValue::Bool(true));
    w.set(KEY_ADD_BOS, add_bos);
    w.set(
        &key("attention.layer_norm_rms_epsilon"),
        MetaValue::F32(cfg.rms_eps),
    );
    w.set(&key("rope.freq_base"), MetaValue::F32(cfg.rope_theta));
    w.set("general.file_type", MetaValue::U32(FILE_TYPE_I2_S));
    match &cfg.vocab {
        Some(v) => {
            // The published tokenizer keys in the published order, from the
            // source where it has them, else as the published file has them
            // (scores all 0, padding = EOS, our llama3-style template); then
            // any other tokenizer key of the source.
            let n = v.n_tokens().unwrap_or(0);
            let fill = |k: &str| -> Option<MetaValue> {
                match k {
                    KEY_SCORES => Some(MetaValue::Array(MetaArray::F32(vec![0.0; n]))),
                    KEY_PADDING => v.get(KEY_EOS).cloned(),
                    KEY_CHAT_TEMPLATE => Some(MetaValue::String(byte_bpe::CHAT_TEMPLATE.into())),
                    _ => None,
                }
            };
            for k in PUBLISHED_TOKENIZER_KEYS {
                if let Some(value) = v.get(k).cloned().or_else(|| fill(k)) {
                    w.set(k, value);
                }
            }
            for (k, value) in &v.keys {
                if !(PUBLISHED_TOKENIZER_KEYS.contains(&k.as_str())
                    || k == KEY_PRE
                    || k == KEY_ADD_BOS)
                {
                    w.set(k, value.clone());
                }
            }
        }
        None => {
            // validate() checked n_vocab against the base vocab.
            let Some(v) = byte_bpe::vocab(cfg.n_vocab) else {
                return;
            };
            w.set(KEY_TOKENIZER_MODEL, MetaValue::String("gpt2".into()));
            w.set(
                KEY_TOKENS,
                MetaValue::Array(MetaArray::String(v.tokens.clone())),
            );
            w.set(
                "tokenizer.ggml.scores",
                MetaValue::Array(MetaArray::F32(vec![0.0; v.tokens.len()])),
            );
            w.set(
                "tokenizer.ggml.token_type",
                MetaValue::Array(MetaArray::I32(v.types)),
            );
            w.set(
                "tokenizer.ggml.merges",
                MetaValue::Array(MetaArray::String(v.merges)),
            );
            w.set("tokenizer.ggml.bos_token_id", MetaValue::U32(v.bos));
            w.set("tokenizer.ggml.eos_token_id", MetaValue::U32(v.eos));
            // The published file pads with EOS.
            w.set("tokenizer.ggml.padding_token_id", MetaValue::U32(v.eos));
            w.set(
                KEY_CHAT_TEMPLATE,
                MetaValue::String(byte_bpe::CHAT_TEMPLATE.into()),
            );
        }
    }
    w.set("general.quantization_version", MetaValue::U32(2));
}

/// Absmean-style tensor scale: `1/sqrt(2/3 · n_in)` keeps the output RMS of
/// a ternary projection (two thirds of the weights nonzero) equal to its
/// input RMS; a ±10% per-tensor jitter keeps tensors distinguishable.
fn projection_scale(seed: u64, name: &str, n_in: u64) -> f32 {
    let jitter = SplitMix64::stream(seed, &format!("{name}#scale"), 0).uniform(0.9, 1.1);
    jitter / (n_in as f32 * 2.0 / 3.0).sqrt()
}

/// Packed bytes of 4 codes for every index 0..81 (four base-3 digits).
const TRIT_BYTES: [u8; 81] = {
    let mut t = [0u8; 81];
    let mut i = 0;
    while i < 81 {
        let (d0, d1, d2, d3) = (i % 3, (i / 3) % 3, (i / 9) % 3, (i / 27) % 3);
        t[i] = ((d0 << 6) | (d1 << 4) | (d2 << 2) | d3) as u8;
        i += 1;
    }
    t
};

/// A random ternary tensor of `n` values (a multiple of 128), packed as I2_S.
///
/// Values are i.i.d. uniform over {-1, 0, +1}, so filling the packed bytes
/// directly with four independent codes each is the same distribution as
/// packing random values, and much faster.
fn ternary_i2s(seed: u64, name: &str, n: u64, scale: f32) -> Vec<u8> {
    let n = n as usize;
    let mut out = vec![0u8; i2s::packed_len(n)];
    let (codes, trailer) = out.split_at_mut(n / 4);
    codes
        .par_chunks_mut(CHUNK_BYTES)
        .enumerate()
        .for_each(|(chunk, bytes)| {
            let mut rng = SplitMix64::stream(seed, name, chunk as u64);
            for quad in bytes.chunks_mut(4) {
                let x = rng.next_u64();
                for (k, b) in quad.iter_mut().enumerate() {
                    // 16 random bits mapped onto 0..81 (bias below 2^-9).
                    let r = (x >> (16 * k)) & 0xffff;
                    *b = TRIT_BYTES[((r * 81) >> 16) as usize];
                }
            }
        });
    trailer[..4].copy_from_slice(&scale.to_le_bytes());
    out
}

fn uniform_f32(seed: u64, name: &str, n: usize, lo: f32, hi: f32) -> Vec<u8> {
    let mut rng = SplitMix64::stream(seed, name, 0);
    (0..n)
        .flat_map(|_| rng.uniform(lo, hi).to_le_bytes())
        .collect()
}

fn norm_weight(seed: u64, name: &str, n: usize) -> Vec<u8> {
    uniform_f32(seed, name, n, 0.8, 1.2)
}

/// Rows of norm about 4: element std `4/sqrt(n_embd)`, so tied-embedding
/// logits of a normalized hidden state have std about 4.
fn embedding(cfg: &SynthConfig) -> Vec<u8> {
    dense_rows(cfg, "token_embd.weight")
}

/// [n_vocab, n_embd] rows of norm about 4 in `cfg.embd_type`, from the
/// stream of `name`.
fn dense_rows(cfg: &SynthConfig, name: &str) -> Vec<u8> {
    let std = 4.0 / (cfg.n_embd as f32).sqrt();
    let n = cfg.n_embd * cfg.n_vocab;
    let width = match cfg.embd_type {
        GgmlType::F32 => 4,
        _ => 2,
    };
    let mut out = vec![0u8; n * width];
    out.par_chunks_mut(CHUNK_BYTES)
        .enumerate()
        .for_each(|(chunk, bytes)| {
            let mut rng = SplitMix64::stream(cfg.seed, name, chunk as u64);
            for v in bytes.chunks_exact_mut(width) {
                let x = rng.normal() * std;
                if width == 4 {
                    v.copy_from_slice(&x.to_le_bytes());
                } else {
                    v.copy_from_slice(&half::f16::from_f32(x).to_le_bytes());
                }
            }
        });
    out
}
