//! The f64 oracle: each stage recomputed in f64 from the reference's own
//! inputs to that stage, used by the comparator to decide which side of a
//! divergence is wrong. Slow and simple on purpose; no fault is ever applied.
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

use super::config::Arch;
use super::ops::round_f16;
use super::weights::{DenseMatrix, I2sMatrix};
use super::{Engine, KvType};
use crate::quant::i2s;
use crate::trace::Stage;

/// The reference's tensors, as the oracle needs them.
pub trait OracleInputs {
    /// The current step's tensor of that stage (canonical layout), as the
    /// reference computed it.
    fn current(&self, layer: Option<usize>, stage: Stage) -> Option<&[f32]>;
    /// For `Stage::KRope` / `Stage::VProj`: rows for positions
    /// 0..n_past+T, [K, n_embd_kv].
    fn kv_history(&self, layer: usize, stage: Stage) -> Option<Vec<f32>>;
    fn tokens(&self) -> &[u32];
    fn n_past(&self) -> usize;
}

/// The stage's output in f64 from the reference's inputs of that stage;
/// None if an input is missing (or the stage does not exist for the arch).
pub fn recompute(
    engine: &Engine,
    layer: Option<usize>,
    stage: Stage,
    inputs: &dyn OracleInputs,
) -> Option<Vec<f64>> {
    let c = engine.config();
    let w = engine.weights();
    let file = engine.file();
    let cur = |l: Option<usize>, s: Stage| inputs.current(l, s);
    let eps = c.rms_eps as f64;
    let e = c.n_embd;
    let sub_norms = c.arch.has_sub_norms();

    if stage == Stage::TokEmbd {
        let mut row = vec![0f32; e];
        let mut out = Vec::with_capacity(inputs.tokens().len() * e);
        for &tok in inputs.tokens() {
            if tok as usize >= c.n_vocab {
                return None;
            }
            w.token_embd.row_into(file, tok as usize, &mut row);
            out.extend(row.iter().map(|&v| v as f64));
        }
        return Some(out);
    }
    if stage == Stage::ResultNorm {
        let x = cur(Some(c.n_layer.checked_sub(1)?), Stage::LOut)?;
        return Some(rms_norm(x, e, eps, &w.output_norm));
    }
    if stage == Stage::Logits {
        let x = cur(None, Stage::ResultNorm)?;
        return Some(dense(engine, &w.output, x));
    }

    let l = layer?;
    let lw = w.layers.get(l)?;
    let layer_in = || {
        if l == 0 {
            cur(None, Stage::TokEmbd)
        } else {
            cur(Some(l - 1), Stage::LOut)
        }
    };
    let here = |s: Stage| cur(Some(l), s);
    let kv_f16 = engine.options().kv_type == KvType::F16;
    let t = inputs.tokens().len();
    let n_past = inputs.n_past();
    let n_keys = n_past + t;
    let hd = c.head_dim;
    let group = c.n_head / c.n_head_kv;
    let store = |v: f32| if kv_f16 { round_f16(v) } else { v } as f64;
    // Probabilities are converted to f16 only for a single token (see
    // forward::Compute::f16_operand); K, V and q always are under F16 KV.
    let store_p = |v: f32| if kv_f16 && t == 1 { round_f16(v) } else { v } as f64;

    Some(match stage {
        Stage::AttnNorm => rms_norm(layer_in()?, e, eps, &lw.attn_norm),
        Stage::QProj => linear(engine, &lw.q, here(Stage::AttnNorm)?),
        Stage::KProj => linear(engine, &lw.k, here(Stage::AttnNorm)?),
        Stage::VProj => linear(engine, &lw.v, here(Stage::AttnNorm)?),
        Stage::QRope => rope(
            here(Stage::QProj)?,
            c.n_head,
            hd,
            n_past,
            c.rope_theta,
            c.arch,
        ),
        Stage::KRope => rope(
            here(Stage::KProj)?,
            c.n_head_kv,
            hd,
            n_past,
            c.rope_theta,
            c.arch,
        ),
        Stage::AttnScores => {
            let q = here(Stage::QRope)?;
            let k = inputs.kv_history(l, Stage::KRope)?;
            if q.len() != t * e || k.len() < n_keys * c.n_embd_kv() {
                return None;
            }
            let mut s = vec![0f64; c.n_head * t * n_keys];
            for h in 0..c.n_head {
                let kvh = h / group;
                for ti in 0..t {
                    let qh = &q[ti * e + h * hd..ti * e + (h + 1) * hd];
                    for j in 0..=n_past + ti {
                        let kj =
                            &k[j * c.n_embd_kv() + kvh * hd..j * c.n_embd_kv() + (kvh + 1) * hd];
                        s[(h * t + ti) * n_keys + j] =
                            qh.iter().zip(kj).map(|(&a, &b)| store(a) * store(b)).sum();
                    }
                }
            }
            s
        }
        Stage::AttnProbs => {
            let scores = here(Stage::AttnScores)?;
            let scale = 1.0 / (hd as f64).sqrt();
            let mut p = vec![0f64; scores.len()];
            for (i, (row, out)) in scores
                .chunks_exact(n_keys)
                .zip(p.chunks_exact_mut(n_keys))
                .enumerate()
            {
                let n = n_past + i % t + 1;
                let max = row[..n]
                    .iter()
                    .map(|&v| v as f64 * scale)
                    .fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for (o, &v) in out[..n].iter_mut().zip(&row[..n]) {
                    *o = (v as f64 * scale - max).exp();
                    sum += *o;
                }
                out[..n].iter_mut().for_each(|o| *o /= sum);
            }
            p
        }
        Stage::AttnOut => {
            let probs = here(Stage::AttnProbs)?;
            let v = inputs.kv_history(l, Stage::VProj)?;
            if probs.len() != c.n_head * t * n_keys || v.len() < n_keys * c.n_embd_kv() {
                return None;
            }
            let mut out = vec![0f64; t * e];
            for h in 0..c.n_head {
                let kvh = h / group;
                for ti in 0..t {
                    let p = &probs[(h * t + ti) * n_keys..(h * t + ti + 1) * n_keys];
                    for d in 0..hd {
                        out[ti * e + h * hd + d] = (0..n_keys)
                            .map(|j| store_p(p[j]) * store(v[j * c.n_embd_kv() + kvh * hd + d]))
                            .sum();
                    }
                }
            }
            out
        }
        Stage::AttnSubNorm => rms_norm(here(Stage::AttnOut)?, e, eps, lw.attn_sub_norm.as_ref()?),
        Stage::OProj => {
            let input = if sub_norms {
                Stage::AttnSubNorm
            } else {
                Stage::AttnOut
            };
            linear(engine, &lw.o, here(input)?)
        }
        Stage::FfnInp => add(here(Stage::OProj)?, layer_in()?),
        Stage::FfnNorm => rms_norm(here(Stage::FfnInp)?, e, eps, &lw.ffn_norm),
        Stage::FfnGate => linear(engine, &lw.gate, here(Stage::FfnNorm)?),
        Stage::FfnUp => linear(engine, &lw.up, here(Stage::FfnNorm)?),
        Stage::FfnAct => {
            let g = here(Stage::FfnGate)?;
            if c.arch.ffn_relu2() {
                g.iter().map(|&v| (v as f64).max(0.0).powi(2)).collect()
            } else {
                g.iter()
                    .map(|&v| v as f64 / (1.0 + (-(v as f64)).exp()))
                    .collect()
            }
        }
        Stage::FfnMul => {
            let (a, u) = (here(Stage::FfnAct)?, here(Stage::FfnUp)?);
            a.iter()
                .zip(u)
                .map(|(&x, &y)| x as f64 * y as f64)
                .collect()
        }
        Stage::FfnSubNorm => rms_norm(here(Stage::FfnMul)?, c.n_ff, eps, lw.ffn_sub_norm.as_ref()?),
        Stage::FfnDown => {
            let input = if sub_norms {
                Stage::FfnSubNorm
            } else {
                Stage::FfnMul
            };
            linear(engine, &lw.down, here(input)?)
        }
        Stage::LOut => add(here(Stage::FfnDown)?, here(Stage::FfnInp)?),
        Stage::TokEmbd | Stage::ResultNorm | Stage::Logits => return None,
    })
}

fn rms_norm(x: &[f32], n: usize, eps: f64, w: &[f32]) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(n) {
        let mean = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / n as f64;
        let scale = 1.0 / (mean + eps).sqrt();
        out.extend(
            row.iter()
                .zip(w)
                .map(|(&v, &wi)| v as f64 * scale * wi as f64),
        );
    }
    out
}

fn add(a: &[f32], b: &[f32]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| x as f64 + y as f64)
        .collect()
}

/// Int8 codes as the model defines them, an exact ternary dot, then
/// `Σ w·q / act_scale · weight_scale (· extra scale)` in f64. Written out
/// here, not borrowed from the candidate's quantizer or kernels: an oracle
/// that shares the candidate's rounding would share its bugs (it once did,
/// and blamed the reference for our f32-rounded activation products).
fn linear(engine: &Engine, m: &I2sMatrix, x: &[f32]) -> Vec<f64> {
    let t = x.len() / m.n_in;
    let codes = m.codes(engine.file());
    let mut y = vec![0f64; t * m.n_out];
    for (ti, row) in x.chunks_exact(m.n_in).enumerate() {
        let (q, scale) = quantize_activations(row);
        for r in 0..m.n_out {
            let dot: i64 = q
                .iter()
                .enumerate()
                .map(|(j, &qj)| (i2s::code_at(codes, r * m.n_in + j) as i64 - 1) * qj as i64)
                .sum();
            let v = dot as f64 / scale as f64 * m.weight_scale as f64;
            y[ti * m.n_out + r] = v * m.extra_scale.map_or(1.0, |s| s as f64);
        }
    }
    y
}

/// BitNet b1.58's per-token absmax int8 quantization: the scale 127/max
/// (max floored at 1e-5) kept as the f32 the format stores, each code the
/// integer nearest the exact product x·scale (ties to even), clamped to
/// [-128, 127].
fn quantize_activations(row: &[f32]) -> (Vec<i32>, f32) {
    let max = row.iter().fold(1e-5f64, |m, &v| m.max((v as f64).abs()));
    let scale = (127.0 / max) as f32;
    let q = row
        .iter()
        .map(|&v| {
            ((v as f64) * scale as f64)
                .round_ties_even()
                .clamp(-128.0, 127.0) as i32
        })
        .collect();
    (q, scale)
}

fn rope(x: &[f32], n_heads: usize, hd: usize, pos0: usize, base: f32, arch: Arch) -> Vec<f64> {
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (t, row) in out.chunks_exact_mut(n_heads * hd).enumerate() {
        let pos = (pos0 + t) as f64;
        for head in row.chunks_exact_mut(hd) {
            for i in 0..hd / 2 {
                let theta = pos * (base as f64).powf(-2.0 * i as f64 / hd as f64);
                let (s, c) = theta.sin_cos();
                let (a, b) = if arch.rope_neox() {
                    (i, i + hd / 2)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }
    out
}

fn dense(engine: &Engine, m: &DenseMatrix, x: &[f32]) -> Vec<f64> {
    let e = m.n_in;
    let t = x.len() / e;
    let xs: Vec<f64> = x
        .iter()
        .map(|&v| if m.is_f16() && t == 1 { round_f16(v) } else { v } as f64)
        .collect();
    let mut row = vec![0f32; e];
    let mut y = vec![0f64; t * m.rows];
    for r in 0..m.rows {
        m.row_into(engine.file(), r, &mut row);
        for ti in 0..t {
            y[ti * m.rows + r] = row
                .iter()
                .zip(&xs[ti * e..(ti + 1) * e])
                .map(|(&a, &b)| a as f64 * b)
                .sum();
        }
    }
    y
}
