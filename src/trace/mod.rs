//! The canonical stage vocabulary shared by both engines.
//!
//! Every intermediate tensor either engine produces is named by a [`Stage`]
//! and (for per-layer stages) a layer index, and is laid out in the one
//! logical layout that [`Stage::layout`] documents. The reference's graph
//! nodes are mapped onto these stages in [`reference_map`]; the candidate
//! emits them directly through a [`TraceSink`]. The comparator only ever sees
//! stage-keyed, canonically laid out f32 data.

pub mod reference_map;

use serde::{Deserialize, Serialize};
use std::fmt;

/// One point of the forward pass, in execution order. The stage list, each
/// stage's logical layout ([`Stage::layout`]) and the arches that have it
/// ([`Stage::in_arch`]) are the contract between the harness and an engine,
/// written out in `docs/candidate-api.md` (a test checks the two agree).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The rows of `token_embd` for the step's tokens.
    TokEmbd,
    /// RMSNorm of the layer input, times `attn_norm`.
    AttnNorm,
    /// Query projection of `attn_norm` (int8 activations × ternary weights, scaled).
    QProj,
    /// Key projection, before RoPE.
    KProj,
    /// Value projection: the V rows the KV cache stores.
    VProj,
    /// Queries after RoPE.
    QRope,
    /// Keys after RoPE: the K rows the KV cache stores.
    KRope,
    /// Raw q·k for each head, query and key, before the 1/sqrt(head_dim)
    /// scale; 0 for future keys.
    AttnScores,
    /// Softmax of the scaled scores over each query's visible keys; 0 for
    /// future keys.
    AttnProbs,
    /// Probabilities times V, heads concatenated.
    AttnOut,
    /// RMSNorm of `attn_out`, times `attn_sub_norm` (not in `llama`).
    AttnSubNorm,
    /// Output projection of `attn_sub_norm` (of `attn_out` in `llama`).
    OProj,
    /// First residual: the layer input plus `o_proj`.
    FfnInp,
    /// RMSNorm of `ffn_inp`, times `ffn_norm`.
    FfnNorm,
    /// Gate projection of `ffn_norm`.
    FfnGate,
    /// Activation of `ffn_gate`: squared ReLU on `bitnet-b1.58`, SiLU otherwise.
    FfnAct,
    /// Up projection of `ffn_norm`.
    FfnUp,
    /// `ffn_act` times `ffn_up`, element-wise.
    FfnMul,
    /// RMSNorm of `ffn_mul`, times `ffn_sub_norm` (not in `llama`).
    FfnSubNorm,
    /// Down projection of `ffn_sub_norm` (of `ffn_mul` in `llama`).
    FfnDown,
    /// Layer output: `ffn_inp` plus `ffn_down`.
    LOut,
    /// RMSNorm of the last layer's output, times `output_norm`.
    ResultNorm,
    /// `result_norm` projected onto the vocabulary by `output` (or the tied
    /// `token_embd`).
    Logits,
}

impl Stage {
    /// All stages in execution order.
    pub const ALL: [Stage; 23] = [
        Stage::TokEmbd,
        Stage::AttnNorm,
        Stage::QProj,
        Stage::KProj,
        Stage::VProj,
        Stage::QRope,
        Stage::KRope,
        Stage::AttnScores,
        Stage::AttnProbs,
        Stage::AttnOut,
        Stage::AttnSubNorm,
        Stage::OProj,
        Stage::FfnInp,
        Stage::FfnNorm,
        Stage::FfnGate,
        Stage::FfnAct,
        Stage::FfnUp,
        Stage::FfnMul,
        Stage::FfnSubNorm,
        Stage::FfnDown,
        Stage::LOut,
        Stage::ResultNorm,
        Stage::Logits,
    ];

    /// The per-layer stages, in execution order.
    pub fn per_layer() -> impl Iterator<Item = Stage> {
        Self::ALL.into_iter().filter(|s| s.is_per_layer())
    }

    /// Whether the stage occurs once per layer (all but `tok_embd`,
    /// `result_norm` and `logits`).
    pub fn is_per_layer(self) -> bool {
        !matches!(self, Stage::TokEmbd | Stage::ResultNorm | Stage::Logits)
    }

    /// The canonical name, as printed in receipts.
    pub fn name(self) -> &'static str {
        match self {
            Stage::TokEmbd => "tok_embd",
            Stage::AttnNorm => "attn_norm",
            Stage::QProj => "q_proj",
            Stage::KProj => "k_proj",
            Stage::VProj => "v_proj",
            Stage::QRope => "q_rope",
            Stage::KRope => "k_rope",
            Stage::AttnScores => "attn_scores",
            Stage::AttnProbs => "attn_probs",
            Stage::AttnOut => "attn_out",
            Stage::AttnSubNorm => "attn_sub_norm",
            Stage::OProj => "o_proj",
            Stage::FfnInp => "ffn_inp",
            Stage::FfnNorm => "ffn_norm",
            Stage::FfnGate => "ffn_gate",
            Stage::FfnAct => "ffn_act",
            Stage::FfnUp => "ffn_up",
            Stage::FfnMul => "ffn_mul",
            Stage::FfnSubNorm => "ffn_sub_norm",
            Stage::FfnDown => "ffn_down",
            Stage::LOut => "l_out",
            Stage::ResultNorm => "result_norm",
            Stage::Logits => "logits",
        }
    }

    /// The stage with this canonical name, if any.
    pub fn from_name(name: &str) -> Option<Stage> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The canonical logical layout, row-major, outermost first: `T` tokens
    /// in the step's batch, `E` n_embd, `Ekv` head_dim × n_head_kv, `F`
    /// n_ff, `H` n_head, `K` keys visible to the step (n_past + T), `V` the
    /// vocabulary.
    pub fn layout(self) -> &'static str {
        match self {
            Stage::KProj | Stage::VProj | Stage::KRope => "[T, Ekv]",
            Stage::AttnScores | Stage::AttnProbs => "[H, T, K]",
            Stage::FfnGate | Stage::FfnAct | Stage::FfnUp | Stage::FfnMul | Stage::FfnSubNorm => {
                "[T, F]"
            }
            Stage::Logits => "[T, V]",
            _ => "[T, E]",
        }
    }

    /// Whether an arch's forward pass has this stage (`llama` has no sub norms).
    pub fn in_arch(self, arch: crate::model::Arch) -> bool {
        arch.has_sub_norms() || !matches!(self, Stage::AttnSubNorm | Stage::FfnSubNorm)
    }

    /// Attention score-like stages carry a [H, T, K] layout with a causal mask.
    pub fn is_attention_matrix(self) -> bool {
        matches!(self, Stage::AttnScores | Stage::AttnProbs)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a traced tensor sits: the layer (None for the model-level stages
/// `tok_embd`, `result_norm`, `logits`) and the stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StageKey {
    /// Layer index, from 0; `None` for the model-level stages.
    pub layer: Option<usize>,
    /// The stage.
    pub stage: Stage,
}

impl StageKey {
    /// The key of `stage` in `layer`.
    pub fn new(layer: Option<usize>, stage: Stage) -> Self {
        StageKey { layer, stage }
    }

    /// Execution order within one forward pass: model-level input first,
    /// then layers in order, then the output stages.
    pub fn order(&self) -> (usize, usize, usize) {
        let idx = Stage::ALL
            .iter()
            .position(|s| *s == self.stage)
            .unwrap_or(0);
        match (self.stage, self.layer) {
            (Stage::TokEmbd, _) => (0, 0, idx),
            (_, Some(l)) => (1, l, idx),
            (_, None) => (2, 0, idx),
        }
    }
}

impl fmt::Display for StageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.layer {
            Some(l) => write!(f, "{}[{}]", self.stage, l),
            None => write!(f, "{}", self.stage),
        }
    }
}

/// A tensor in canonical layout: f32 data, row-major, with its logical shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    /// Logical shape, outermost axis first (see [`Stage::layout`]).
    pub shape: Vec<usize>,
    /// The elements, row-major; as many as the product of `shape`.
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor of `shape` holding `data` (checked to match in debug builds).
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data }
    }
}

/// Receives every stage of the candidate's forward pass.
///
/// `data` is the candidate's tensor in canonical layout (`shape` as in the
/// [`Stage`] table). A sink may overwrite `data` (resync): the engine then
/// continues from the overwritten values, so the next stage is judged on its
/// own error. The engine calls `stage` for K and V *before* writing them to
/// its KV cache, so a resynced value reaches the cache.
pub trait TraceSink {
    /// False for the no-op sink: the engine may skip building tensors that
    /// only exist for tracing (attention matrices).
    fn enabled(&self) -> bool {
        true
    }

    /// Receives `stage` of `layer` (`None` for model-level stages), `data`
    /// in canonical layout with logical `shape`.
    fn stage(&mut self, layer: Option<usize>, stage: Stage, shape: &[usize], data: &mut [f32]);
}

/// Tracing off: every call inlines to nothing.
pub struct NoTrace;

impl TraceSink for NoTrace {
    #[inline(always)]
    fn enabled(&self) -> bool {
        false
    }

    #[inline(always)]
    fn stage(&mut self, _: Option<usize>, _: Stage, _: &[usize], _: &mut [f32]) {}
}

/// Tracing off, but the wall time from one stage to the next is charged to
/// the later stage (the work that produced it): where a forward pass spends
/// its time, by stage, with the untraced code path (`divergence bench --stages`).
#[derive(Debug, Clone)]
pub struct StageClock {
    last: std::time::Instant,
    /// Seconds per stage, indexed like [`Stage::ALL`].
    pub seconds: [f64; Stage::ALL.len()],
}

impl Default for StageClock {
    fn default() -> Self {
        StageClock {
            last: std::time::Instant::now(),
            seconds: [0.0; Stage::ALL.len()],
        }
    }
}

impl StageClock {
    /// Start the clock for the next forward pass (time before this is not charged).
    pub fn restart(&mut self) {
        self.last = std::time::Instant::now();
    }

    /// Stages with their seconds, in execution order.
    pub fn by_stage(&self) -> impl Iterator<Item = (Stage, f64)> + '_ {
        Stage::ALL.iter().copied().zip(self.seconds.iter().copied())
    }
}

impl TraceSink for StageClock {
    fn enabled(&self) -> bool {
        false
    }

    fn stage(&mut self, _: Option<usize>, stage: Stage, _: &[usize], _: &mut [f32]) {
        let now = std::time::Instant::now();
        let i = Stage::ALL.iter().position(|&s| s == stage).unwrap_or(0);
        self.seconds[i] += (now - self.last).as_secs_f64();
        self.last = now;
    }
}

/// Records every stage it sees (one forward pass).
#[derive(Default, Debug, Clone)]
pub struct Recorder {
    /// Every stage received, in the order received.
    pub stages: Vec<(StageKey, Tensor)>,
}

impl Recorder {
    /// The first recorded tensor of `stage` in `layer`, if any.
    pub fn get(&self, layer: Option<usize>, stage: Stage) -> Option<&Tensor> {
        let key = StageKey::new(layer, stage);
        self.stages.iter().find(|(k, _)| *k == key).map(|(_, t)| t)
    }
}

impl TraceSink for Recorder {
    fn stage(&mut self, layer: Option<usize>, stage: Stage, shape: &[usize], data: &mut [f32]) {
        self.stages.push((
            StageKey::new(layer, stage),
            Tensor::new(shape.to_vec(), data.to_vec()),
        ));
    }
}
