//! The f64 oracle: any stage recomputed in f64 from one side's *own* inputs
//! to that stage (its previous stage output at that step, its own K and V
//! history), so that each engine is judged on its local error: what it did
//! wrong at this stage, whatever it was fed. No fault is ever applied.
//!
//! It shares nothing with the candidate that could hide a bug: it reads the
//! model's metadata and tensors from the GGUF bytes itself ([`model`]), and
//! its arithmetic is written here, not borrowed from the engine's ops. An
//! oracle that shared the candidate's loading or rounding code would share
//! its bugs (it once did, and blamed the reference for them). The one thing
//! it does borrow is the integer product of int8 codes and ternary weights,
//! through the engine's kernels, which the property tests prove equal to
//! the scalar specification: an exact sum, not a rounding choice.
//!
//! What is kept from the model's definition: int8 activation codes
//! (quantize_row_i8_s) and ternary weights, so I2_S stages are exact integer
//! products followed by an f64 epilogue ([`ternary`]). Storage precision
//! that both engines share by configuration is kept too: with an F16 KV
//! cache, K and V are rounded to f16 before the f64 products (as the F16
//! mul_mat does), and so are the query and the probabilities of a
//! single-token step, and the normed activations before an F16 logits
//! product of a single token ([`ops`]).
//!
//! Every value comes with its *rounding scale*: how far an honest f32
//! computation of that value may land from the f64 result. The judge
//! (`compare::local`) measures each side's distance to the oracle in those
//! units, so a side is blamed for an error measurably above rounding however
//! small the absolute numbers are.
//!
//! When a side does not emit a stage (an engine that only dumps layer
//! outputs), [`Oracle::inputs_of`] says what the next stage needs and the
//! judge recomputes the missing stages here, from the side's nearest own
//! tensors: the verdict is then at the granularity the side allows.
//!
//! When the reference is blamed for an I2_S stage, [`Oracle::explain_reference`]
//! checks whether a known bug of its mat-vec reproduces its output exactly
//! (`reference_bugs`), and the receipt then names that cause.

pub mod model;
mod ops;
mod reference_bugs;
mod ternary;

pub use model::{FileFacts, OracleError, OracleModel};
pub use ternary::Alternative;

use crate::gguf::GgufFile;
use crate::trace::{Stage, StageKey};
use model::Ternary;
use ops::Attention;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The f32 unit roundoff, 2⁻²⁴.
const U: f64 = f32::EPSILON as f64 / 2.0;

/// One side's tensors, as the oracle needs them.
pub trait OracleInputs {
    /// The current step's tensor of that stage (canonical layout), as this
    /// side computed it (or as the judge recomputed it across a gap).
    fn current(&self, layer: Option<usize>, stage: Stage) -> Option<&[f32]>;
    /// For `Stage::KRope` / `Stage::VProj`: rows for positions
    /// 0..n_past+T, [K, n_embd_kv], as this side's cache holds them.
    fn kv_history(&self, layer: usize, stage: Stage) -> Option<Vec<f32>>;
    /// The step's token ids.
    fn tokens(&self) -> &[u32];
    /// Positions cached before this step.
    fn n_past(&self) -> usize;
}

/// A stage recomputed: f64 values in the canonical layout, and per value
/// the rounding scale of an f32 computation of it.
#[derive(Clone, Debug, PartialEq)]
pub struct OracleStage {
    /// The stage's values.
    pub values: Vec<f64>,
    /// How far an honest f32 computation may be from each value.
    pub rounding: Vec<f64>,
    /// I2_S stages: activation codes whose exact product lies so close to a
    /// .5 boundary that rounding it to f32 first gives the other code.
    pub ties: usize,
    /// The other honest value of a token row for each tie (at most a few
    /// hundred; the judge applies those that bring a side closer).
    pub alternatives: Vec<Alternative>,
}

impl OracleStage {
    fn from_pairs(pairs: Vec<(f64, f64)>) -> OracleStage {
        let (values, rounding) = pairs.into_iter().unzip();
        OracleStage {
            values,
            rounding,
            ties: 0,
            alternatives: vec![],
        }
    }

    /// Values with a rounding scale of `ulps` roundings of each value.
    fn rounded(values: Vec<f64>, ulps: f64) -> OracleStage {
        let rounding = values.iter().map(|v| ulps * U * v.abs()).collect();
        OracleStage {
            values,
            rounding,
            ties: 0,
            alternatives: vec![],
        }
    }

    /// Only the last `n` values (the last row of a [T, D] stage).
    pub fn last_rows(self, n: usize) -> OracleStage {
        let cut = self.values.len().saturating_sub(n);
        OracleStage {
            values: self.values[cut..].to_vec(),
            rounding: self.rounding[cut..].to_vec(),
            ties: self.ties,
            alternatives: vec![],
        }
    }

    /// The values as the f32 a side would carry on to the next stage.
    pub fn as_f32(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }
}

/// A block-aligned repacking of an I2_S tensor and its padded row length.
type Aligned = (Arc<Vec<u8>>, usize);

/// What the oracles of one model share: decoded weights that are costly to
/// make and the same for every side.
#[derive(Default)]
struct Shared {
    /// I2_S tensors whose rows are not whole blocks, repacked block-aligned.
    aligned: Mutex<HashMap<String, Aligned>>,
    /// The logits matrix's largest |w| per row.
    row_max: OnceLock<Vec<f32>>,
    /// The last inputs quantized, one per side (`ternary::linear`).
    products: Mutex<ternary::ProductMemo>,
}

/// The oracle for one model file and one side's KV cache type.
#[derive(Clone)]
pub struct Oracle {
    file: Arc<GgufFile>,
    facts: FileFacts,
    math: model::ArchMath,
    kv_f16: bool,
    shared: Arc<Shared>,
}

impl Oracle {
    /// Reads `file` with the oracle's own code. `kv_f16`: the side's KV cache
    /// stores F16 (it rounds K and V to half).
    pub fn new(file: Arc<GgufFile>, kv_f16: bool) -> Result<Oracle, OracleError> {
        let m = OracleModel::read(&file)?;
        let (facts, math) = (m.facts, m.math);
        Ok(Oracle {
            file,
            facts,
            math,
            kv_f16,
            shared: Arc::default(),
        })
    }

    /// The model as the oracle reads it.
    fn model(&self) -> OracleModel<'_> {
        OracleModel {
            file: &self.file,
            facts: self.facts.clone(),
            math: self.math,
        }
    }

    /// The same oracle with the FFN activation a run forces on both engines
    /// (`--ffn-act`; `None`: the arch's own).
    pub fn with_ffn_act(mut self, act: Option<crate::model::FfnAct>) -> Oracle {
        if let Some(act) = act {
            self.math.squared_relu = act == crate::model::FfnAct::Relu2;
        }
        self
    }

    /// The same oracle for a side with another KV cache type (the decoded
    /// weights are shared).
    pub fn with_kv(&self, kv_f16: bool) -> Oracle {
        Oracle {
            kv_f16,
            ..self.clone()
        }
    }

    /// Whether this oracle rounds K and V to f16.
    pub fn kv_f16(&self) -> bool {
        self.kv_f16
    }

    /// The hyperparameters as the file states them.
    pub fn facts(&self) -> &FileFacts {
        &self.facts
    }

    /// The current step's stages `stage` of `layer` is computed from, in
    /// execution order (the layer input is the previous layer's `l_out`, or
    /// `tok_embd` for layer 0). Attention stages also read the K or V
    /// history ([`Oracle::history_of`]).
    pub fn inputs_of(&self, layer: Option<usize>, stage: Stage) -> Vec<StageKey> {
        let here = |s: Stage| StageKey::new(layer, s);
        let layer_in = |l: usize| {
            if l == 0 {
                StageKey::new(None, Stage::TokEmbd)
            } else {
                StageKey::new(Some(l - 1), Stage::LOut)
            }
        };
        let sub_norms = self.math.sub_norms;
        match (stage, layer) {
            (Stage::TokEmbd, _) => vec![],
            (Stage::ResultNorm, _) => match self.facts.n_layer.checked_sub(1) {
                Some(last) => vec![StageKey::new(Some(last), Stage::LOut)],
                None => vec![],
            },
            (Stage::Logits, _) => vec![StageKey::new(None, Stage::ResultNorm)],
            (_, None) => vec![],
            (s, Some(l)) => match s {
                Stage::AttnNorm => vec![layer_in(l)],
                Stage::QProj | Stage::KProj | Stage::VProj => vec![here(Stage::AttnNorm)],
                Stage::QRope => vec![here(Stage::QProj)],
                Stage::KRope => vec![here(Stage::KProj)],
                // The current step's K (V) rows are part of the history.
                Stage::AttnScores => vec![here(Stage::QRope), here(Stage::KRope)],
                Stage::AttnProbs => vec![here(Stage::AttnScores)],
                Stage::AttnOut => vec![here(Stage::AttnProbs), here(Stage::VProj)],
                Stage::AttnSubNorm => vec![here(Stage::AttnOut)],
                Stage::OProj if sub_norms => vec![here(Stage::AttnSubNorm)],
                Stage::OProj => vec![here(Stage::AttnOut)],
                Stage::FfnInp => vec![layer_in(l), here(Stage::OProj)],
                Stage::FfnNorm => vec![here(Stage::FfnInp)],
                Stage::FfnGate | Stage::FfnUp => vec![here(Stage::FfnNorm)],
                Stage::FfnAct => vec![here(Stage::FfnGate)],
                Stage::FfnMul => vec![here(Stage::FfnAct), here(Stage::FfnUp)],
                Stage::FfnSubNorm => vec![here(Stage::FfnMul)],
                Stage::FfnDown if sub_norms => vec![here(Stage::FfnSubNorm)],
                Stage::FfnDown => vec![here(Stage::FfnMul)],
                Stage::LOut => vec![here(Stage::FfnInp), here(Stage::FfnDown)],
                Stage::TokEmbd | Stage::ResultNorm | Stage::Logits => unreachable!(),
            },
        }
    }

    /// The cached rows an attention stage reads besides the current step's
    /// tensors: `k_rope` for the scores, `v_proj` for the output.
    pub fn history_of(stage: Stage) -> Option<Stage> {
        match stage {
            Stage::AttnScores => Some(Stage::KRope),
            Stage::AttnOut => Some(Stage::VProj),
            _ => None,
        }
    }

    /// The stage's output in f64 from this side's inputs of that stage, or
    /// why it cannot be computed.
    pub fn recompute(
        &self,
        layer: Option<usize>,
        stage: Stage,
        inputs: &dyn OracleInputs,
    ) -> Result<OracleStage, String> {
        let model = self.model();
        let m = &model;
        let f = &m.facts;
        let need = |l: Option<usize>, s: Stage| {
            inputs.current(l, s).ok_or_else(|| {
                let at = l.map_or(String::new(), |l| format!(" of layer {l}"));
                format!("no {s}{at}, an input of {stage}")
            })
        };
        let tensor_missing = |what: &str| format!("the file has no usable {what}");
        let e = f.n_embd;
        let eps = f64::from(f.rms_eps);

        match stage {
            Stage::TokEmbd => {
                let embd = m
                    .dense("token_embd.weight")
                    .ok_or_else(|| tensor_missing("token_embd.weight"))?;
                let mut out = Vec::with_capacity(inputs.tokens().len() * e);
                let mut row = vec![0f64; embd.n_in];
                for &tok in inputs.tokens() {
                    if tok as usize >= embd.rows {
                        return Err(format!("token {tok} is outside the embedding"));
                    }
                    embd.row_into(tok as usize, &mut row);
                    out.extend_from_slice(&row);
                }
                return Ok(OracleStage::rounded(out, 1.0));
            }
            Stage::ResultNorm => {
                let last = f.n_layer.checked_sub(1).ok_or("the model has no layers")?;
                let w = m
                    .vector("output_norm.weight")
                    .ok_or_else(|| tensor_missing("output_norm.weight"))?;
                return Ok(ops::rms_norm(need(Some(last), Stage::LOut)?, e, eps, &w));
            }
            Stage::Logits => {
                let out = m.output().ok_or_else(|| tensor_missing("output matrix"))?;
                let x = need(None, Stage::ResultNorm)?;
                if out.n_in == 0 || !x.len().is_multiple_of(out.n_in) {
                    return Err(format!(
                        "result_norm's {} values do not fill rows of {}",
                        x.len(),
                        out.n_in
                    ));
                }
                let row_max = self.shared.row_max.get_or_init(|| out.row_max());
                let single = x.len() == out.n_in;
                // The step's last position only: the row that chooses the
                // next token. Every row is the same product (the same code
                // path in both engines), and the whole matrix in f64 per
                // prompt row would cost 328 M products a row on the 2B-4T
                // shape; the other rows are compared side against side.
                let last = &x[x.len() - out.n_in..];
                return Ok(ops::dense(&out, row_max, last, single));
            }
            _ => {}
        }

        let l = layer.ok_or_else(|| format!("{stage} needs a layer"))?;
        if l >= f.n_layer {
            return Err(format!(
                "layer {l} is beyond the file's {} layers",
                f.n_layer
            ));
        }
        let layer_in = || {
            if l == 0 {
                need(None, Stage::TokEmbd)
            } else {
                need(Some(l - 1), Stage::LOut)
            }
        };
        let here = |s: Stage| need(Some(l), s);
        let norm = |stem: &str| {
            m.norm(l, stem)
                .ok_or_else(|| tensor_missing(&format!("blk.{l}.{stem}.weight")))
        };
        let proj = |stem: &str, x: &[f32]| -> Result<OracleStage, String> {
            let t = m
                .ternary(l, stem)
                .ok_or_else(|| tensor_missing(&format!("blk.{l}.{stem}.weight (I2_S)")))?;
            let (packed, padded) = self.packed(l, stem, &t);
            ternary::linear(&t, &packed, padded, x, &self.shared.products)
        };
        let attn = Attention {
            n_head: f.n_head,
            n_head_kv: f.n_head_kv,
            head_dim: f.head_dim,
            t: inputs.tokens().len(),
            n_past: inputs.n_past(),
            kv_f16: self.kv_f16,
        };
        let n_past = inputs.n_past();
        let sub_norms = m.math.sub_norms;
        let kv_rows = |s: Stage| {
            inputs
                .kv_history(l, s)
                .ok_or_else(|| format!("the {s} history of layer {l} is incomplete"))
        };

        Ok(match stage {
            Stage::AttnNorm => ops::rms_norm(layer_in()?, e, eps, &norm("attn_norm")?),
            Stage::QProj => proj("attn_q", here(Stage::AttnNorm)?)?,
            Stage::KProj => proj("attn_k", here(Stage::AttnNorm)?)?,
            Stage::VProj => proj("attn_v", here(Stage::AttnNorm)?)?,
            Stage::QRope => ops::rope(here(Stage::QProj)?, f, f.n_head, n_past, m.math.neox),
            Stage::KRope => ops::rope(here(Stage::KProj)?, f, f.n_head_kv, n_past, m.math.neox),
            Stage::AttnScores => attn.scores(here(Stage::QRope)?, &kv_rows(Stage::KRope)?)?,
            Stage::AttnProbs => attn.probs(here(Stage::AttnScores)?)?,
            Stage::AttnOut => attn.apply(here(Stage::AttnProbs)?, &kv_rows(Stage::VProj)?)?,
            Stage::AttnSubNorm if sub_norms => {
                ops::rms_norm(here(Stage::AttnOut)?, e, eps, &norm("attn_sub_norm")?)
            }
            Stage::OProj => {
                let input = if sub_norms {
                    Stage::AttnSubNorm
                } else {
                    Stage::AttnOut
                };
                proj("attn_output", here(input)?)?
            }
            Stage::FfnInp => ops::add(here(Stage::OProj)?, layer_in()?),
            Stage::FfnNorm => ops::rms_norm(here(Stage::FfnInp)?, e, eps, &norm("ffn_norm")?),
            Stage::FfnGate => proj("ffn_gate", here(Stage::FfnNorm)?)?,
            Stage::FfnUp => proj("ffn_up", here(Stage::FfnNorm)?)?,
            Stage::FfnAct => ops::ffn_act(here(Stage::FfnGate)?, m.math.squared_relu),
            Stage::FfnMul => ops::mul(here(Stage::FfnAct)?, here(Stage::FfnUp)?),
            Stage::FfnSubNorm if sub_norms => {
                ops::rms_norm(here(Stage::FfnMul)?, f.n_ff, eps, &norm("ffn_sub_norm")?)
            }
            Stage::FfnDown => {
                let input = if sub_norms {
                    Stage::FfnSubNorm
                } else {
                    Stage::FfnMul
                };
                proj("ffn_down", here(input)?)?
            }
            Stage::LOut => ops::add(here(Stage::FfnDown)?, here(Stage::FfnInp)?),
            Stage::AttnSubNorm | Stage::FfnSubNorm => {
                return Err(format!("arch {} has no {stage}", f.arch))
            }
            Stage::TokEmbd | Stage::ResultNorm | Stage::Logits => unreachable!("handled above"),
        })
    }

    /// The packed codes of a projection with block-aligned rows: the file's
    /// bytes when its rows are whole blocks, else a repacked copy made once.
    fn packed<'t>(&self, l: usize, stem: &str, t: &Ternary<'t>) -> (PackedCodes<'t>, usize) {
        if t.n_in.is_multiple_of(crate::quant::i2s::BLOCK) {
            return (PackedCodes::File(t.codes), t.n_in);
        }
        let key = format!("blk.{l}.{stem}");
        let mut cache = self
            .shared
            .aligned
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (bytes, padded) = cache
            .entry(key)
            .or_insert_with(|| ternary::aligned_codes(t))
            .clone();
        (PackedCodes::Aligned(bytes), padded)
    }
}

/// A projection's codes as the integer product reads them.
enum PackedCodes<'t> {
    File(&'t [u8]),
    Aligned(Arc<Vec<u8>>),
}

impl std::ops::Deref for PackedCodes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            PackedCodes::File(b) => b,
            PackedCodes::Aligned(v) => v,
        }
    }
}
