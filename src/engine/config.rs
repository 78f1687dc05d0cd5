//! The one place that knows GGUF metadata keys and tensor names per arch.

use super::faults::{Fault, FaultSet};
use super::EngineError;
use crate::gguf::GgufFile;
pub use crate::model::{Arch, ModelConfig};

impl ModelConfig {
    /// Read and check the hyperparameters of `file`.
    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig, EngineError> {
        Self::from_gguf_with(file, FaultSet::default())
    }

    /// [`ModelConfig::from_gguf`] with the loading faults of the bug zoo.
    pub fn from_gguf_with(file: &GgufFile, faults: FaultSet) -> Result<ModelConfig, EngineError> {
        let arch_name = meta(file, KEY_ARCH, |k| file.get_str(k))?
            .ok_or_else(|| EngineError::MissingKey(KEY_ARCH.to_string()))?;
        let arch = Arch::from_name(arch_name)
            .ok_or_else(|| EngineError::UnknownArch(arch_name.to_string()))?;
        let p = arch.name();
        let opt_int = |suffix: &str| meta(file, &format!("{p}.{suffix}"), |k| file.get_u32(k));
        let int = |suffix: &str| -> Result<usize, EngineError> {
            opt_int(suffix)?
                .map(|v| v as usize)
                .ok_or_else(|| EngineError::MissingKey(format!("{p}.{suffix}")))
        };
        let opt_float = |suffix: &str| meta(file, &format!("{p}.{suffix}"), |k| file.get_f32(k));

        let n_embd = int("embedding_length")?;
        let n_layer = int("block_count")?;
        let n_ff = int("feed_forward_length")?;
        let n_head = int("attention.head_count")?;
        let n_head_kv = opt_int("attention.head_count_kv")?.map_or(n_head, |v| v as usize);
        let rms_eps = opt_float("attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
            EngineError::MissingKey(format!("{p}.attention.layer_norm_rms_epsilon"))
        })?;
        let theta_key = if faults.has(Fault::ThetaWrongKey) {
            "rope.theta" // the bug: no such key, so the default wins
        } else {
            "rope.freq_base"
        };
        let rope_theta = opt_float(theta_key)?.unwrap_or(10000.0);
        let n_ctx_train = int("context_length")?;
        let embd = file
            .tensor(TOKEN_EMBD)
            .ok_or_else(|| EngineError::MissingTensor(TOKEN_EMBD.to_string()))?;
        let n_vocab = match opt_int("vocab_size")? {
            Some(v) => v as usize,
            None => *embd.dims.get(1).ok_or_else(|| EngineError::Shape {
                tensor: TOKEN_EMBD.to_string(),
                expected: "[n_embd, n_vocab]".to_string(),
                found: embd.dims.clone(),
            })? as usize,
        };
        let tied_output = file.tensor(OUTPUT).is_none();

        let bad = |what: String| Err(EngineError::BadHyperparameters(what));
        if n_embd == 0 || n_layer == 0 || n_ff == 0 || n_vocab == 0 {
            return bad(format!(
                "zero size: n_embd {n_embd}, n_layer {n_layer}, n_ff {n_ff}, n_vocab {n_vocab}"
            ));
        }
        if n_layer > crate::model::MAX_LAYERS {
            return bad(format!(
                "{p}.block_count {n_layer}: at most {}",
                crate::model::MAX_LAYERS
            ));
        }
        if n_head == 0 || n_head_kv == 0 || n_embd % n_head != 0 {
            return bad(format!(
                "{p}.attention.head_count {n_head} does not divide n_embd {n_embd}"
            ));
        }
        if n_head % n_head_kv != 0 {
            return bad(format!(
                "{p}.attention.head_count_kv {n_head_kv} does not divide head_count {n_head}"
            ));
        }
        let head_dim = n_embd / n_head;
        if head_dim % 2 != 0 {
            return bad(format!("head_dim {head_dim} is odd: RoPE needs pairs"));
        }
        // Both engines rotate whole heads: llama.cpp refuses n_rot != head_dim.
        if let Some(n_rot) = opt_int("rope.dimension_count")? {
            if n_rot as usize != head_dim {
                return bad(format!(
                    "{p}.rope.dimension_count {n_rot} is not head_dim {head_dim} (n_embd {n_embd} / head_count {n_head})"
                ));
            }
        }
        // llama.cpp takes n_vocab from the token list: it must match.
        if file.get("tokenizer.ggml.tokens").is_some() {
            let n_tokens = file.get_str_array("tokenizer.ggml.tokens")?.len();
            if n_tokens != n_vocab {
                return bad(format!(
                    "tokenizer.ggml.tokens has {n_tokens} tokens, the model has n_vocab {n_vocab}"
                ));
            }
        }
        let positive = |v: f32| v > 0.0 && v.is_finite();
        if !positive(rms_eps) || !positive(rope_theta) {
            return bad(format!(
                "rms_eps {rms_eps} or rope theta {rope_theta} not positive"
            ));
        }
        Ok(ModelConfig {
            arch,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            n_ff,
            n_vocab,
            n_ctx_train,
            head_dim,
            rope_theta,
            rms_eps,
            tied_output,
        })
    }
}

/// An optional metadata value: absent is `None`, present with the wrong
/// type is an error naming the key.
fn meta<T>(
    file: &GgufFile,
    key: &str,
    get: impl FnOnce(&str) -> Result<T, crate::gguf::GgufError>,
) -> Result<Option<T>, EngineError> {
    if file.get(key).is_none() {
        return Ok(None);
    }
    Ok(Some(get(key)?))
}

pub const KEY_ARCH: &str = "general.architecture";
pub const TOKEN_EMBD: &str = "token_embd.weight";
pub const OUTPUT: &str = "output.weight";
pub const OUTPUT_NORM: &str = "output_norm.weight";

/// The I2_S projections of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    fn stem(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        }
    }

    pub fn weight_name(self, layer: usize) -> String {
        format!("blk.{layer}.{}.weight", self.stem())
    }

    /// The optional per-tensor scale multiplied after the matmul (ggml_mul).
    pub fn scale_name(self, layer: usize) -> String {
        format!("blk.{layer}.{}.scale", self.stem())
    }

    /// (n_in, n_out) of the projection.
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        match self {
            Proj::Q | Proj::O => (c.n_embd, c.n_embd),
            Proj::K | Proj::V => (c.n_embd, c.n_embd_kv()),
            Proj::Gate | Proj::Up => (c.n_embd, c.n_ff),
            Proj::Down => (c.n_ff, c.n_embd),
        }
    }
}

/// The F32 norm weights of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    Attn,
    AttnSub,
    Ffn,
    FfnSub,
}

impl Norm {
    pub fn name(self, layer: usize) -> String {
        let stem = match self {
            Norm::Attn => "attn_norm",
            Norm::AttnSub => "attn_sub_norm",
            Norm::Ffn => "ffn_norm",
            Norm::FfnSub => "ffn_sub_norm",
        };
        format!("blk.{layer}.{stem}.weight")
    }

    pub fn len(self, c: &ModelConfig) -> usize {
        match self {
            Norm::FfnSub => c.n_ff,
            _ => c.n_embd,
        }
    }
}
