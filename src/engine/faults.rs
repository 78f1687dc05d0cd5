//! Test-only fault injection for the bug zoo (issue 7). Each fault is one
//! real bug class, switched on by name; the forward pass checks it with a
//! single obvious branch at the place the bug would live. Off by default.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// RoPE rotates adjacent pairs (2i, 2i+1) instead of NEOX halves (for
    /// llama, whose RoPE is NORM, the reverse).
    RopeInterleaved,
    /// Query head h reads kv head h % n_head_kv instead of h / (n_head / n_head_kv).
    GqaModulo,
    /// Activation quantization rounds half away from zero instead of to even.
    ActRoundHalfAway,
    /// Activation scale 128 / max instead of 127 / max.
    ActScale128,
    /// The I2_S output omits the −Σq offset term.
    MissingRowSum,
    /// RMSNorm uses a hard-coded eps (1e-5; 1e-6 if the model's is 1e-5).
    EpsHardcoded,
    /// The attn_sub_norm is skipped (its input passes through).
    SkipAttnSubNorm,
    /// SiLU where the arch wants squared ReLU, and the reverse.
    WrongFfnAct,
    /// Attention scale 1/head_dim instead of 1/sqrt(head_dim).
    AttnScaleInvHeadDim,
    /// Softmax over every cached key, future ones included.
    NoCausalMask,
    /// The I2_S output is divided by the weight scale instead of multiplied.
    WeightScaleDivide,
    /// Codes decode as code − 2 instead of code − 1 (mapping shifted by one).
    I2sCodeOffByOne,
    /// Loading: RoPE theta read from a wrong key (`rope.theta`, absent), so
    /// the default 10000 is used whatever the file says.
    ThetaWrongKey,
    /// Loading: `ffn_gate` and `ffn_up` swapped when the weights are mapped.
    SwapGateUp,
    /// Loading: F16 embedding rows read with a stride one element short.
    F16RowStride,
    /// RMSNorm as `x / (sqrt(mean) + eps)` instead of `x / sqrt(mean + eps)`.
    RmsNormEpsOutsideSqrt,
    /// Activation scales taken over the whole batch instead of per token.
    ActScalePerBatch,
    /// The final norm reads the last layer's `ffn_norm` weights.
    FinalNormWrongWeight,
    /// Logits against `token_embd` although the file has `output.weight`.
    LogitsWrongMatrix,
    /// The optional `*.scale` tensors are ignored.
    ScaleTensorIgnored,
    /// Decode steps rotate at position + 1 (the prefill is right).
    RopeDecodeOffByOne,
    /// Decode steps write K and V one cache slot too far.
    KvSlotDecodeOffByOne,
    /// Layers ≥ 1 use the previous layer's `attn_output` weights.
    OProjPreviousLayer,
    /// The engine panics computing `ffn_up` of layer 0 (a crash, not a
    /// numeric bug: the harness must still write a receipt).
    PanicAtFfnUp,
}

impl Fault {
    pub const ALL: [Fault; 24] = [
        Fault::RopeInterleaved,
        Fault::GqaModulo,
        Fault::ActRoundHalfAway,
        Fault::ActScale128,
        Fault::MissingRowSum,
        Fault::EpsHardcoded,
        Fault::SkipAttnSubNorm,
        Fault::WrongFfnAct,
        Fault::AttnScaleInvHeadDim,
        Fault::NoCausalMask,
        Fault::WeightScaleDivide,
        Fault::I2sCodeOffByOne,
        Fault::ThetaWrongKey,
        Fault::SwapGateUp,
        Fault::F16RowStride,
        Fault::RmsNormEpsOutsideSqrt,
        Fault::ActScalePerBatch,
        Fault::FinalNormWrongWeight,
        Fault::LogitsWrongMatrix,
        Fault::ScaleTensorIgnored,
        Fault::RopeDecodeOffByOne,
        Fault::KvSlotDecodeOffByOne,
        Fault::OProjPreviousLayer,
        Fault::PanicAtFfnUp,
    ];

    /// The kebab-case name (as in serde and on the command line).
    pub fn name(self) -> &'static str {
        match self {
            Fault::RopeInterleaved => "rope-interleaved",
            Fault::GqaModulo => "gqa-modulo",
            Fault::ActRoundHalfAway => "act-round-half-away",
            Fault::ActScale128 => "act-scale128",
            Fault::MissingRowSum => "missing-row-sum",
            Fault::EpsHardcoded => "eps-hardcoded",
            Fault::SkipAttnSubNorm => "skip-attn-sub-norm",
            Fault::WrongFfnAct => "wrong-ffn-act",
            Fault::AttnScaleInvHeadDim => "attn-scale-inv-head-dim",
            Fault::NoCausalMask => "no-causal-mask",
            Fault::WeightScaleDivide => "weight-scale-divide",
            Fault::I2sCodeOffByOne => "i2s-code-off-by-one",
            Fault::ThetaWrongKey => "theta-wrong-key",
            Fault::SwapGateUp => "swap-gate-up",
            Fault::F16RowStride => "f16-row-stride",
            Fault::RmsNormEpsOutsideSqrt => "rms-norm-eps-outside-sqrt",
            Fault::ActScalePerBatch => "act-scale-per-batch",
            Fault::FinalNormWrongWeight => "final-norm-wrong-weight",
            Fault::LogitsWrongMatrix => "logits-wrong-matrix",
            Fault::ScaleTensorIgnored => "scale-tensor-ignored",
            Fault::RopeDecodeOffByOne => "rope-decode-off-by-one",
            Fault::KvSlotDecodeOffByOne => "kv-slot-decode-off-by-one",
            Fault::OProjPreviousLayer => "o-proj-previous-layer",
            Fault::PanicAtFfnUp => "panic-at-ffn-up",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown fault `{0}` (known: {known})", known = Fault::ALL.map(|f| f.name()).join(", "))]
pub struct UnknownFault(pub String);

impl FromStr for Fault {
    type Err = UnknownFault;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| UnknownFault(s.to_string()))
    }
}

/// The set of active faults, as flags the forward pass can test cheaply,
/// and the one layer they act in when a layer was chosen
/// (`find --inject-layer`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultSet {
    bits: u32,
    /// `Some(l)`: the faults act only in layer l (its forward pass and its
    /// weights); everything outside the layers (config, embeddings, final
    /// norm, logits) runs clean.
    layer: Option<usize>,
}

impl FaultSet {
    pub fn new(faults: &[Fault]) -> Self {
        FaultSet {
            bits: faults.iter().fold(0, |acc, f| acc | (1 << *f as u32)),
            layer: None,
        }
    }

    /// The same faults, acting only in layer `layer` (`None`: everywhere).
    pub fn only_in_layer(self, layer: Option<usize>) -> Self {
        FaultSet { layer, ..self }
    }

    /// The faults that act in layer `l`.
    pub fn in_layer(self, l: usize) -> Self {
        match self.layer {
            Some(only) if only != l => FaultSet::default(),
            _ => self,
        }
    }

    /// The faults that act outside the layers.
    pub fn outside_layers(self) -> Self {
        match self.layer {
            Some(_) => FaultSet::default(),
            None => self,
        }
    }

    #[inline(always)]
    pub fn has(self, fault: Fault) -> bool {
        self.bits & (1 << fault as u32) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_and_from_str() {
        for f in Fault::ALL {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.name()));
            assert_eq!(f.name().parse::<Fault>().unwrap(), f);
        }
    }

    #[test]
    fn a_chosen_layer_confines_the_faults() {
        let all = FaultSet::new(&[Fault::MissingRowSum]);
        assert!(all.in_layer(5).has(Fault::MissingRowSum));
        assert!(all.outside_layers().has(Fault::MissingRowSum));
        let at3 = all.only_in_layer(Some(3));
        assert!(at3.in_layer(3).has(Fault::MissingRowSum));
        assert!(!at3.in_layer(2).has(Fault::MissingRowSum));
        assert!(!at3.outside_layers().has(Fault::MissingRowSum));
    }
}
