//! The f64 oracle: each stage recomputed in f64 from the reference's own
//! inputs to that stage, so that a divergence can be blamed on the side that
//! is wrong. Slow and simple on purpose; no fault is ever applied.
//!
//! It shares nothing with the candidate: it reads the model's metadata and
//! tensors from the GGUF bytes itself ([`model`]), and its arithmetic is
//! written here, not borrowed from the engine's ops or kernels. An oracle
//! that shared the candidate's loading or rounding code would share its bugs
//! (it once did, and blamed the reference for them).
//!
//! What is kept from the model's definition (not a rounding choice): int8
//! activation codes (quantize_row_i8_s) and ternary weights, so I2_S stages
//! are exact integer dot products followed by an f64 epilogue. Storage
//! precision that both engines share by configuration is kept too: with an
//! F16 KV cache, K, V and the query are rounded to f16 before the f64
//! products (as the F16 mul_mat does), and so are the probabilities of a
//! single-token step; with an F16 output matrix, the normed activations of
//! a single-token step are rounded to f16 before the logits (multi-token
//! steps go through tinyBLAS on f32 operands in the reference).
//!
//! Every value comes with its *rounding scale*: how far an honest f32
//! computation of that value may land from the f64 result (one rounding per
//! op, `√n` growth for sums of n terms, RoPE's angle accumulated over the
//! pairs). Blame compares each side's distance to the oracle with that scale
//! (`compare::blame`), so a side is blamed for an error measurably above
//! rounding however small the absolute numbers are.
//!
//! When the reference is blamed for an I2_S stage, [`Oracle::explain_reference`]
//! checks whether a known bug of its mat-vec reproduces its output exactly
//! (`reference_bugs`), and the receipt then names that cause.

pub mod model;
mod reference_bugs;

pub use model::{FileFacts, OracleError, OracleModel};

use crate::gguf::GgufFile;
use crate::trace::Stage;
use model::{Dense, Ternary};

/// The f32 unit roundoff, 2⁻²⁴.
const U: f64 = f32::EPSILON as f64 / 2.0;

/// The reference's tensors, as the oracle needs them.
pub trait OracleInputs {
    /// The current step's tensor of that stage (canonical layout), as the
    /// reference computed it.
    fn current(&self, layer: Option<usize>, stage: Stage) -> Option<&[f32]>;
    /// For `Stage::KRope` / `Stage::VProj`: rows for positions
    /// 0..n_past+T, [K, n_embd_kv].
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
}

impl OracleStage {
    fn from_pairs(pairs: Vec<(f64, f64)>) -> OracleStage {
        let (values, rounding) = pairs.into_iter().unzip();
        OracleStage { values, rounding }
    }

    /// Values with a rounding scale of `ulps` roundings of each value.
    fn rounded(values: Vec<f64>, ulps: f64) -> OracleStage {
        let rounding = values.iter().map(|v| ulps * U * v.abs()).collect();
        OracleStage { values, rounding }
    }
}

/// The oracle for one model file and one KV cache type.
pub struct Oracle<'f> {
    model: OracleModel<'f>,
    kv_f16: bool,
}

impl<'f> Oracle<'f> {
    /// Reads `file` with the oracle's own code. `kv_f16`: the run's KV cache
    /// stores F16 (both engines round K, V and the query to half).
    pub fn new(file: &'f GgufFile, kv_f16: bool) -> Result<Oracle<'f>, OracleError> {
        Ok(Oracle {
            model: OracleModel::read(file)?,
            kv_f16,
        })
    }

    /// The hyperparameters as the file states them.
    pub fn facts(&self) -> &FileFacts {
        &self.model.facts
    }

    /// The stage's output in f64 from the reference's inputs of that stage,
    /// or why it cannot be computed.
    pub fn recompute(
        &self,
        layer: Option<usize>,
        stage: Stage,
        inputs: &dyn OracleInputs,
    ) -> Result<OracleStage, String> {
        let m = &self.model;
        let f = &m.facts;
        let need = |l: Option<usize>, s: Stage| {
            inputs.current(l, s).ok_or_else(|| {
                let at = l.map_or(String::new(), |l| format!(" of layer {l}"));
                format!("the reference did not record {s}{at}, an input of {stage}")
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
                for &tok in inputs.tokens() {
                    if tok as usize >= embd.rows {
                        return Err(format!("token {tok} is outside the embedding"));
                    }
                    out.extend(embd.row(tok as usize));
                }
                return Ok(OracleStage::rounded(out, 1.0));
            }
            Stage::ResultNorm => {
                let last = f.n_layer.checked_sub(1).ok_or("the model has no layers")?;
                let w = m
                    .vector("output_norm.weight")
                    .ok_or_else(|| tensor_missing("output_norm.weight"))?;
                return Ok(rms_norm(need(Some(last), Stage::LOut)?, e, eps, &w));
            }
            Stage::Logits => {
                let out = m.output().ok_or_else(|| tensor_missing("output matrix"))?;
                let t = inputs.tokens().len();
                return Ok(dense(&out, need(None, Stage::ResultNorm)?, t == 1));
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
        let proj = |stem: &str| {
            m.ternary(l, stem)
                .ok_or_else(|| tensor_missing(&format!("blk.{l}.{stem}.weight (I2_S)")))
        };
        let t = inputs.tokens().len();
        let n_past = inputs.n_past();
        let attn = Attention {
            n_head: f.n_head,
            n_head_kv: f.n_head_kv,
            head_dim: f.head_dim,
            t,
            n_past,
            kv_f16: self.kv_f16,
        };
        let sub_norms = m.math.sub_norms;
        let kv_rows = |s: Stage| {
            inputs
                .kv_history(l, s)
                .ok_or_else(|| format!("the reference's {s} history of layer {l} is incomplete"))
        };

        Ok(match stage {
            Stage::AttnNorm => rms_norm(layer_in()?, e, eps, &norm("attn_norm")?),
            Stage::QProj => linear(&proj("attn_q")?, here(Stage::AttnNorm)?)?,
            Stage::KProj => linear(&proj("attn_k")?, here(Stage::AttnNorm)?)?,
            Stage::VProj => linear(&proj("attn_v")?, here(Stage::AttnNorm)?)?,
            Stage::QRope => rope(here(Stage::QProj)?, f, f.n_head, n_past, m.math.neox),
            Stage::KRope => rope(here(Stage::KProj)?, f, f.n_head_kv, n_past, m.math.neox),
            Stage::AttnScores => attn.scores(here(Stage::QRope)?, &kv_rows(Stage::KRope)?)?,
            Stage::AttnProbs => attn.probs(here(Stage::AttnScores)?)?,
            Stage::AttnOut => attn.apply(here(Stage::AttnProbs)?, &kv_rows(Stage::VProj)?)?,
            Stage::AttnSubNorm if sub_norms => {
                rms_norm(here(Stage::AttnOut)?, e, eps, &norm("attn_sub_norm")?)
            }
            Stage::OProj => {
                let input = if sub_norms {
                    Stage::AttnSubNorm
                } else {
                    Stage::AttnOut
                };
                linear(&proj("attn_output")?, here(input)?)?
            }
            Stage::FfnInp => add(here(Stage::OProj)?, layer_in()?),
            Stage::FfnNorm => rms_norm(here(Stage::FfnInp)?, e, eps, &norm("ffn_norm")?),
            Stage::FfnGate => linear(&proj("ffn_gate")?, here(Stage::FfnNorm)?)?,
            Stage::FfnUp => linear(&proj("ffn_up")?, here(Stage::FfnNorm)?)?,
            Stage::FfnAct => ffn_act(here(Stage::FfnGate)?, m.math.squared_relu),
            Stage::FfnMul => {
                let product = here(Stage::FfnAct)?
                    .iter()
                    .zip(here(Stage::FfnUp)?)
                    .map(|(&a, &u)| f64::from(a) * f64::from(u))
                    .collect();
                OracleStage::rounded(product, 1.0)
            }
            Stage::FfnSubNorm if sub_norms => {
                rms_norm(here(Stage::FfnMul)?, f.n_ff, eps, &norm("ffn_sub_norm")?)
            }
            Stage::FfnDown => {
                let input = if sub_norms {
                    Stage::FfnSubNorm
                } else {
                    Stage::FfnMul
                };
                linear(&proj("ffn_down")?, here(input)?)?
            }
            Stage::LOut => add(here(Stage::FfnDown)?, here(Stage::FfnInp)?),
            Stage::AttnSubNorm | Stage::FfnSubNorm => {
                return Err(format!("arch {} has no {stage}", f.arch))
            }
            Stage::TokEmbd | Stage::ResultNorm | Stage::Logits => unreachable!("handled above"),
        })
    }
}

/// RMSNorm of each row, then the weight: `x / sqrt(mean(x²) + eps) · w`.
fn rms_norm(x: &[f32], n: usize, eps: f64, w: &[f64]) -> OracleStage {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(n) {
        let mean = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n as f64;
        let scale = 1.0 / (mean + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &wi)| f64::from(v) * scale * wi));
    }
    // The mean's and the root's roundings, the two products.
    OracleStage::rounded(out, 4.0)
}

fn add(a: &[f32], b: &[f32]) -> OracleStage {
    let sum = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) + f64::from(y))
        .collect();
    OracleStage::rounded(sum, 1.0)
}

fn ffn_act(gate: &[f32], squared_relu: bool) -> OracleStage {
    if squared_relu {
        let v = gate
            .iter()
            .map(|&g| f64::from(g).max(0.0).powi(2))
            .collect();
        OracleStage::rounded(v, 2.0)
    } else {
        let v = gate
            .iter()
            .map(|&g| {
                let g = f64::from(g);
                g / (1.0 + (-g).exp())
            })
            .collect();
        // An exp, a sum, a division: a few roundings (ggml's SIMD exp included).
        OracleStage::rounded(v, 8.0)
    }
}

/// BitNet b1.58's per-token absmax int8 quantization: the scale 127/max
/// (max floored at 1e-5) kept as the f32 the format stores, each code the
/// integer nearest the exact product x·scale (ties to even), clamped to
/// [-128, 127].
fn quantize_activations(row: &[f32]) -> (Vec<i64>, f32) {
    let max = row.iter().fold(1e-5f64, |m, &v| m.max(f64::from(v).abs()));
    let scale = (127.0 / max) as f32;
    let q = row
        .iter()
        .map(|&v| {
            (f64::from(v) * f64::from(scale))
                .round_ties_even()
                .clamp(-128.0, 127.0) as i64
        })
        .collect();
    (q, scale)
}

/// Int8 codes, an exact ternary dot over the flattened tensor (rows need not
/// be whole 128-value blocks), then `Σ w·q / act_scale · tensor_scale
/// (· extra scale)` in f64.
fn linear(m: &Ternary<'_>, x: &[f32]) -> Result<OracleStage, String> {
    if m.n_in == 0 || !x.len().is_multiple_of(m.n_in) {
        return Err(format!(
            "an input of {} values does not fill rows of {}",
            x.len(),
            m.n_in
        ));
    }
    let t = x.len() / m.n_in;
    let mut y = vec![0f64; t * m.n_out];
    for (ti, row) in x.chunks_exact(m.n_in).enumerate() {
        let (q, scale) = quantize_activations(row);
        for r in 0..m.n_out {
            let dot: i64 = q
                .iter()
                .enumerate()
                .map(|(j, &qj)| m.weight(r, j) * qj)
                .sum();
            let v = dot as f64 / f64::from(scale) * f64::from(m.tensor_scale);
            y[ti * m.n_out + r] = v * m.extra_scale.map_or(1.0, f64::from);
        }
    }
    // The integer dot is exact; its conversion, the division and the products round.
    Ok(OracleStage::rounded(y, 4.0))
}

/// RoPE at positions `pos0 + t`, pairs (i, i + d/2) (NEOX) or (2i, 2i + 1).
/// The rounding scale includes the angle's error: ggml builds θᵢ by i
/// successive f32 multiplications, so its relative error grows with i.
fn rope(x: &[f32], f: &FileFacts, n_heads: usize, pos0: usize, neox: bool) -> OracleStage {
    let hd = f.head_dim;
    let base = f64::from(f.rope_theta);
    let mut out = vec![(0f64, 0f64); x.len()];
    for (t, (row, orow)) in x
        .chunks_exact(n_heads * hd)
        .zip(out.chunks_exact_mut(n_heads * hd))
        .enumerate()
    {
        let pos = (pos0 + t) as f64;
        for (head, ohead) in row.chunks_exact(hd).zip(orow.chunks_exact_mut(hd)) {
            for i in 0..hd / 2 {
                let theta = pos * base.powf(-2.0 * i as f64 / hd as f64);
                let (s, c) = theta.sin_cos();
                let (a, b) = if neox {
                    (i, i + hd / 2)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (f64::from(head[a]), f64::from(head[b]));
                let scale = U * (x0.abs() + x1.abs()) * (4.0 + theta * (2 * i + 2) as f64);
                ohead[a] = (x0 * c - x1 * s, scale);
                ohead[b] = (x0 * s + x1 * c, scale);
            }
        }
    }
    OracleStage::from_pairs(out)
}

/// A dot product in f64 and the rounding scale of an f32 sum of its terms:
/// one rounding of the result plus √n roundings of the terms' magnitude.
fn dot_with_scale(terms: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut sum, mut sq, mut n) = (0f64, 0f64, 0usize);
    for v in terms {
        sum += v;
        sq += v * v;
        n += 1;
    }
    (sum, U * (sum.abs() + (n as f64).sqrt() * sq.sqrt()))
}

/// The attention products over the reference's rows.
struct Attention {
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    t: usize,
    n_past: usize,
    kv_f16: bool,
}

impl Attention {
    fn n_keys(&self) -> usize {
        self.n_past + self.t
    }

    fn kv_width(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// The kv head a query head reads (heads of a group share one).
    fn kv_head(&self, h: usize) -> usize {
        h / (self.n_head / self.n_head_kv)
    }

    /// K, V and the query as the F16 cache and mul_mat store them.
    fn stored(&self, v: f32) -> f64 {
        if self.kv_f16 {
            f64::from(half::f16::from_f32(v).to_f32())
        } else {
            f64::from(v)
        }
    }

    /// Raw q·k, [H, T, K], future keys 0.
    fn scores(&self, q: &[f32], k: &[f32]) -> Result<OracleStage, String> {
        let (hd, kw, n_keys) = (self.head_dim, self.kv_width(), self.n_keys());
        let e = self.n_head * hd;
        if q.len() != self.t * e || k.len() < n_keys * kw {
            return Err("the reference's q or k rows do not match the model's shape".into());
        }
        let mut s = vec![(0f64, 0f64); self.n_head * self.t * n_keys];
        for h in 0..self.n_head {
            let kvh = self.kv_head(h);
            for ti in 0..self.t {
                let qh = &q[ti * e + h * hd..ti * e + (h + 1) * hd];
                for j in 0..=self.n_past + ti {
                    let kj = &k[j * kw + kvh * hd..j * kw + (kvh + 1) * hd];
                    s[(h * self.t + ti) * n_keys + j] = dot_with_scale(
                        qh.iter()
                            .zip(kj)
                            .map(|(&a, &b)| self.stored(a) * self.stored(b)),
                    );
                }
            }
        }
        Ok(OracleStage::from_pairs(s))
    }

    /// Causal softmax of the scaled scores, [H, T, K].
    fn probs(&self, scores: &[f32]) -> Result<OracleStage, String> {
        let n_keys = self.n_keys();
        if scores.len() != self.n_head * self.t * n_keys {
            return Err("the reference's attention scores do not match the model's shape".into());
        }
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut p = vec![(0f64, 0f64); scores.len()];
        for (i, (row, out)) in scores
            .chunks_exact(n_keys)
            .zip(p.chunks_exact_mut(n_keys))
            .enumerate()
        {
            let n = self.n_past + i % self.t + 1;
            let scaled: Vec<f64> = row[..n].iter().map(|&v| f64::from(v) * scale).collect();
            let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scaled.iter().map(|&v| (v - max).exp()).sum();
            for (o, &v) in out[..n].iter_mut().zip(&scaled) {
                let pv = (v - max).exp() / sum;
                // The exponent's argument rounds twice (the scaling, the
                // subtraction); exp, the sum and the normalisation a few times.
                *o = (pv, U * pv * (8.0 + v.abs() + (v - max).abs()));
            }
        }
        Ok(OracleStage::from_pairs(p))
    }

    /// probs · V, [T, E].
    fn apply(&self, probs: &[f32], v: &[f32]) -> Result<OracleStage, String> {
        let (hd, kw, n_keys) = (self.head_dim, self.kv_width(), self.n_keys());
        let e = self.n_head * hd;
        if probs.len() != self.n_head * self.t * n_keys || v.len() < n_keys * kw {
            return Err(
                "the reference's probabilities or v rows do not match the model's shape".into(),
            );
        }
        // Probabilities are converted to f16 only for a single token (ggml's
        // mul_mat converts src1 there; tinyBLAS reads f32 for several).
        let store_p = |p: f32| {
            if self.kv_f16 && self.t == 1 {
                self.stored(p)
            } else {
                f64::from(p)
            }
        };
        let mut out = vec![(0f64, 0f64); self.t * e];
        for h in 0..self.n_head {
            let kvh = self.kv_head(h);
            for ti in 0..self.t {
                let p = &probs[(h * self.t + ti) * n_keys..(h * self.t + ti + 1) * n_keys];
                for d in 0..hd {
                    out[ti * e + h * hd + d] = dot_with_scale(
                        (0..n_keys).map(|j| store_p(p[j]) * self.stored(v[j * kw + kvh * hd + d])),
                    );
                }
            }
        }
        Ok(OracleStage::from_pairs(out))
    }
}

/// Logits [T, V] against a dense matrix; a single token's activations are
/// rounded to f16 first when the matrix is F16 (ggml's mul_mat conversion).
fn dense(m: &Dense<'_>, x: &[f32], single_token: bool) -> OracleStage {
    let e = m.n_in;
    let t = x.len() / e.max(1);
    let xs: Vec<f64> = x
        .iter()
        .map(|&v| {
            if m.is_f16() && single_token {
                f64::from(half::f16::from_f32(v).to_f32())
            } else {
                f64::from(v)
            }
        })
        .collect();
    let mut y = vec![(0f64, 0f64); t * m.rows];
    for r in 0..m.rows {
        let row = m.row(r);
        for ti in 0..t {
            y[ti * m.rows + r] = dot_with_scale(
                row.iter()
                    .zip(&xs[ti * e..(ti + 1) * e])
                    .map(|(&a, &b)| a * b),
            );
        }
    }
    OracleStage::from_pairs(y)
}
