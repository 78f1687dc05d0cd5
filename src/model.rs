//! The model's vocabulary that every part shares: which arch a file is, its
//! hyperparameters, and the KV cache type a run uses. `trace`, `engine`,
//! `oracle`, `dump` and the public [`Candidate`](crate::candidate::Candidate)
//! trait all speak it; it imports nothing of theirs. Reading a
//! [`ModelConfig`] from a GGUF file is the engine's job
//! (`ModelConfig::from_gguf`), the oracle reads the file a second time on
//! its own.

use serde::{Deserialize, Serialize};

/// The most layers a model (and a receipt's description of one) may have:
/// the deepest real BitNet has 30, the deepest published LLMs about 128.
pub const MAX_LAYERS: usize = 1024;

/// The model families the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Arch {
    /// `bitnet` (bitnet_b1_58-large, -3B): SiLU gated FFN, sub norms, NEOX RoPE.
    #[serde(rename = "bitnet")]
    Bitnet,
    /// `bitnet-b1.58` (BitNet-b1.58-2B-4T): squared-ReLU gated FFN, GQA, sub norms, NEOX RoPE.
    #[serde(rename = "bitnet-b1.58")]
    Bitnet158,
    /// `bitnet-25`: BitNet-b1.58-2B-4T under the name ik_llama.cpp and
    /// other engines give it; computes as `bitnet-b1.58`, its metadata keys
    /// are `bitnet-25.*`.
    #[serde(rename = "bitnet-25")]
    Bitnet25,
    /// `llama` with I2_S projections: SiLU gated FFN, no sub norms, NORM RoPE.
    #[serde(rename = "llama")]
    Llama,
}

impl Arch {
    /// The arch whose `general.architecture` is `name`, if supported.
    pub fn from_name(name: &str) -> Option<Arch> {
        match name {
            "bitnet" => Some(Arch::Bitnet),
            "bitnet-b1.58" => Some(Arch::Bitnet158),
            "bitnet-25" => Some(Arch::Bitnet25),
            "llama" => Some(Arch::Llama),
            _ => None,
        }
    }

    /// `general.architecture` and the prefix of the arch's metadata keys.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Bitnet => "bitnet",
            Arch::Bitnet158 => "bitnet-b1.58",
            Arch::Bitnet25 => "bitnet-25",
            Arch::Llama => "llama",
        }
    }

    /// Whether the arch has attn_sub_norm and ffn_sub_norm.
    pub fn has_sub_norms(self) -> bool {
        !matches!(self, Arch::Llama)
    }

    /// llama.cpp's `llama_rope_type`: NEOX for bitnet, NORM for llama.
    pub fn rope_neox(self) -> bool {
        !matches!(self, Arch::Llama)
    }

    /// The gated FFN's activation: squared ReLU for 2B-4T, SiLU otherwise.
    pub fn ffn_relu2(self) -> bool {
        self.ffn_act() == FfnAct::Relu2
    }

    /// The gated FFN's activation as the arch defines it: squared ReLU for
    /// 2B-4T (`bitnet-b1.58`, `bitnet-25`), SiLU otherwise.
    pub fn ffn_act(self) -> FfnAct {
        match self {
            Arch::Bitnet158 | Arch::Bitnet25 => FfnAct::Relu2,
            Arch::Bitnet | Arch::Llama => FfnAct::Silu,
        }
    }

    /// Whether a run may force another FFN activation on the arch
    /// (`--ffn-act`): the bitnet arches, whose reference graphs take the
    /// switch (our patch 06); `llama` is a control and keeps SiLU.
    pub fn ffn_act_overridable(self) -> bool {
        !matches!(self, Arch::Llama)
    }
}

/// The gated FFN's activation, `act(gate) · up`. A run can force one on
/// both engines and the oracle (`--ffn-act`), or on the reference alone
/// (`--reference-ffn-act silu`, upstream bitnet.cpp's bug for
/// `bitnet-b1.58`, BitNet issues #588, #602).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum FfnAct {
    /// relu(gate)²: BitNet-b1.58-2B-4T's activation.
    #[default]
    Relu2,
    /// silu(gate): bitnet_b1_58-large's and -3B's, and llama's.
    Silu,
}

impl FfnAct {
    /// `relu2` or `silu`, as the command line and receipts spell it.
    pub fn name(self) -> &'static str {
        match self {
            FfnAct::Relu2 => "relu2",
            FfnAct::Silu => "silu",
        }
    }
}

/// A model's hyperparameters, read from its GGUF metadata and checked for
/// consistency ([`ModelConfig::from_gguf`]). Keys are prefixed with the arch
/// name, e.g. `bitnet-b1.58.embedding_length`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The model family, from `general.architecture`.
    pub arch: Arch,
    /// Width of the residual stream (`embedding_length`).
    pub n_embd: usize,
    /// Number of transformer blocks (`block_count`).
    pub n_layer: usize,
    /// Query heads (`attention.head_count`).
    pub n_head: usize,
    /// Key/value heads (`attention.head_count_kv`; `n_head` when absent).
    pub n_head_kv: usize,
    /// Hidden width of the FFN (`feed_forward_length`).
    pub n_ff: usize,
    /// Vocabulary size (`vocab_size`, else the second dimension of `token_embd.weight`).
    pub n_vocab: usize,
    /// Context length the model was trained with (`context_length`).
    pub n_ctx_train: usize,
    /// Width of one head: `n_embd / n_head`, even.
    pub head_dim: usize,
    /// RoPE base frequency (`rope.freq_base`; 10000 when absent).
    pub rope_theta: f32,
    /// The RMSNorm epsilon (`attention.layer_norm_rms_epsilon`).
    pub rms_eps: f32,
    /// No `output.weight`: logits are computed against `token_embd`.
    pub tied_output: bool,
}

impl ModelConfig {
    /// Width of one token's K (or V) row: head_dim × n_head_kv.
    pub fn n_embd_kv(&self) -> usize {
        self.head_dim * self.n_head_kv
    }

    /// Query heads per kv head.
    pub fn gqa_group(&self) -> usize {
        self.n_head / self.n_head_kv
    }
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvType {
    /// The reference's default: K and V rounded to half when cached, and
    /// the attention products take F16 operands.
    #[default]
    F16,
    /// K and V cached in f32 as computed, and the attention products take
    /// f32 operands.
    F32,
}
