//! The oracle's floating-point stages, in f64, each value with the rounding
//! scale of an honest f32 computation of it: one rounding per op, `√n`
//! growth for sums of n terms, RoPE's angle accumulated over the pairs.
//!
//! Where an engine may legitimately store an operand in f16 or not (the
//! query and the probabilities of an F16 KV cache's products, the
//! activations of an F16 logits product), the value is the reference's
//! choice and the scale also covers the other one: a half-precision
//! rounding of each term. Bugs in these stages (a head mapping, a mask, a
//! scale) move values by far more.

use super::{OracleStage, U};
use crate::oracle::model::{Dense, FileFacts};
use rayon::prelude::*;

/// The f16 unit roundoff, 2⁻¹¹.
const U16: f64 = 1.0 / 2048.0;

/// RMSNorm of each row, then the weight: `x / sqrt(mean(x²) + eps) · w`.
pub(super) fn rms_norm(x: &[f32], n: usize, eps: f64, w: &[f64]) -> OracleStage {
    let mut out = vec![0f64; x.len() / n.max(1) * n];
    x.par_chunks_exact(n.max(1))
        .zip(out.par_chunks_exact_mut(n.max(1)))
        .for_each(|(row, out)| {
            let mean = row.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n as f64;
            let scale = 1.0 / (mean + eps).sqrt();
            for ((o, &v), &wi) in out.iter_mut().zip(row).zip(w) {
                *o = f64::from(v) * scale * wi;
            }
        });
    // The mean's and the root's roundings, the two products.
    OracleStage::rounded(out, 4.0)
}

/// Element-wise sum (the residual adds).
pub(super) fn add(a: &[f32], b: &[f32]) -> OracleStage {
    let sum = a
        .par_iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) + f64::from(y))
        .collect();
    OracleStage::rounded(sum, 1.0)
}

/// Element-wise product (`ffn_act · ffn_up`).
pub(super) fn mul(a: &[f32], b: &[f32]) -> OracleStage {
    let product = a
        .par_iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .collect();
    OracleStage::rounded(product, 1.0)
}

/// The gated FFN's activation of the gate.
pub(super) fn ffn_act(gate: &[f32], squared_relu: bool) -> OracleStage {
    if squared_relu {
        let v = gate
            .par_iter()
            .map(|&g| f64::from(g).max(0.0).powi(2))
            .collect();
        OracleStage::rounded(v, 2.0)
    } else {
        let v = gate
            .par_iter()
            .map(|&g| {
                let g = f64::from(g);
                g / (1.0 + (-g).exp())
            })
            .collect();
        // An exp, a sum, a division: a few roundings (ggml's SIMD exp included).
        OracleStage::rounded(v, 8.0)
    }
}

/// RoPE at positions `pos0 + t`, pairs (i, i + d/2) (NEOX) or (2i, 2i + 1).
/// The rounding scale includes the angle's error: ggml builds θᵢ by i
/// successive f32 multiplications, so its relative error grows with i.
pub(super) fn rope(
    x: &[f32],
    f: &FileFacts,
    n_heads: usize,
    pos0: usize,
    neox: bool,
) -> OracleStage {
    let hd = f.head_dim;
    let base = f64::from(f.rope_theta);
    let mut out = vec![(0f64, 0f64); x.len()];
    let width = (n_heads * hd).max(1);
    x.par_chunks_exact(width)
        .zip(out.par_chunks_exact_mut(width))
        .enumerate()
        .for_each(|(t, (row, orow))| {
            let pos = (pos0 + t) as f64;
            // The angles of this position, once for every head.
            let angles: Vec<(f64, f64, f64)> = (0..hd / 2)
                .map(|i| {
                    let theta = pos * base.powf(-2.0 * i as f64 / hd as f64);
                    let (s, c) = theta.sin_cos();
                    (theta, s, c)
                })
                .collect();
            for (head, ohead) in row.chunks_exact(hd).zip(orow.chunks_exact_mut(hd)) {
                for (i, &(theta, s, c)) in angles.iter().enumerate() {
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
        });
    OracleStage::from_pairs(out)
}

/// A dot product in f64 and the rounding scale of an f32 sum of its terms:
/// one rounding of the result plus √n roundings of the terms' magnitude;
/// `half` adds a half-precision rounding of every term (an operand an
/// engine may or may not store in f16). The specification of each score
/// (`Attention::scores` sums in lanes, bit for bit the same).
#[cfg(test)]
fn dot_with_scale(terms: impl Iterator<Item = f64>, half: bool) -> (f64, f64) {
    let (mut sum, mut sq, mut abs, mut n) = (0f64, 0f64, 0f64, 0usize);
    for v in terms {
        sum += v;
        sq += v * v;
        abs += v.abs();
        n += 1;
    }
    with_scale(sum, sq, abs, n, half)
}

/// The rounding scale of [`dot_with_scale`] from its running sums.
fn with_scale(sum: f64, sq: f64, abs: f64, n: usize, half: bool) -> (f64, f64) {
    let f32_scale = U * (sum.abs() + (n as f64).sqrt() * sq.sqrt());
    (sum, f32_scale + if half { U16 * abs } else { 0.0 })
}

/// The attention products over one side's rows.
pub(super) struct Attention {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub t: usize,
    pub n_past: usize,
    pub kv_f16: bool,
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

    /// K, V and the query as the F16 cache and mul_mat store them, widened
    /// to f64 once per stage (the slice conversions use F16C where the CPU
    /// has it).
    fn stored(&self, x: &[f32]) -> Vec<f64> {
        let mut out = vec![0f64; x.len()];
        if self.kv_f16 {
            use half::slice::HalfFloatSliceExt;
            let mut h = vec![half::f16::ZERO; x.len()];
            h.convert_from_f32_slice(x);
            h.convert_to_f64_slice(&mut out);
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = f64::from(v);
            }
        }
        out
    }

    /// Raw q·k, [H, T, K], future keys 0.
    pub fn scores(&self, q: &[f32], k: &[f32]) -> Result<OracleStage, String> {
        let (hd, kw, n_keys) = (self.head_dim, self.kv_width(), self.n_keys());
        let e = self.n_head * hd;
        if q.len() != self.t * e || k.len() < n_keys * kw {
            return Err("the q or k rows do not match the model's shape".into());
        }
        let (q, k) = (self.stored(q), self.stored(&k[..n_keys * kw]));
        // Each kv head's keys transposed, [hd, K], so that a query's sums
        // (one per key, each over d in order, as `dot_with_scale` takes
        // them) run in lanes along the keys.
        let transposed: Vec<Vec<f64>> = (0..self.n_head_kv)
            .into_par_iter()
            .map(|kvh| {
                let mut kt = vec![0f64; hd * n_keys];
                for (j, row) in k.chunks_exact(kw).enumerate() {
                    for (d, &v) in row[kvh * hd..(kvh + 1) * hd].iter().enumerate() {
                        kt[d * n_keys + j] = v;
                    }
                }
                kt
            })
            .collect();
        let mut s = vec![(0f64, 0f64); self.n_head * self.t * n_keys];
        s.par_chunks_mut(self.t * n_keys)
            .enumerate()
            .for_each(|(h, out)| {
                let kt = &transposed[self.kv_head(h)];
                let mut acc = vec![0f64; 3 * n_keys];
                for ti in 0..self.t {
                    let qh = &q[ti * e + h * hd..ti * e + (h + 1) * hd];
                    let n = self.n_past + ti + 1;
                    let acc = &mut acc[..3 * n];
                    acc.fill(0.0);
                    for (d, &a) in qh.iter().enumerate() {
                        lanes::add_terms(a, &kt[d * n_keys..d * n_keys + n], acc);
                    }
                    let (sums, rest) = acc.split_at(n);
                    let (sqs, abss) = rest.split_at(n);
                    for (o, ((&sum, &sq), &abs)) in out[ti * n_keys..ti * n_keys + n]
                        .iter_mut()
                        .zip(sums.iter().zip(sqs).zip(abss))
                    {
                        *o = with_scale(sum, sq, abs, hd, self.kv_f16);
                    }
                }
            });
        Ok(OracleStage::from_pairs(s))
    }

    /// Causal softmax of the scaled scores, [H, T, K].
    pub fn probs(&self, scores: &[f32]) -> Result<OracleStage, String> {
        let n_keys = self.n_keys();
        if scores.len() != self.n_head * self.t * n_keys {
            return Err("the attention scores do not match the model's shape".into());
        }
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut p = vec![(0f64, 0f64); scores.len()];
        p.par_chunks_mut(n_keys)
            .zip(scores.par_chunks(n_keys))
            .enumerate()
            .for_each(|(i, (out, row))| {
                let n = self.n_past + i % self.t + 1;
                let scaled: Vec<f64> = row[..n].iter().map(|&v| f64::from(v) * scale).collect();
                let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scaled.iter().map(|&v| (v - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for ((o, &v), &ev) in out[..n].iter_mut().zip(&scaled).zip(&exps) {
                    let pv = ev / sum;
                    // The exponent's argument rounds twice (the scaling, the
                    // subtraction); exp, the sum and the normalisation a few times.
                    *o = (pv, U * pv * (8.0 + v.abs() + (v - max).abs()));
                }
            });
        Ok(OracleStage::from_pairs(p))
    }

    /// probs · V, [T, E].
    pub fn apply(&self, probs: &[f32], v: &[f32]) -> Result<OracleStage, String> {
        let (hd, kw, n_keys) = (self.head_dim, self.kv_width(), self.n_keys());
        let e = self.n_head * hd;
        if probs.len() != self.n_head * self.t * n_keys || v.len() < n_keys * kw {
            return Err("the probabilities or v rows do not match the model's shape".into());
        }
        // Probabilities are converted to f16 only for a single token (ggml's
        // mul_mat converts src1 there; tinyBLAS reads f32 for several).
        let p = if self.t == 1 {
            self.stored(probs)
        } else {
            probs.iter().map(|&x| f64::from(x)).collect()
        };
        let v = self.stored(&v[..n_keys * kw]);
        // A zero probability adds nothing to the sums unless its v row holds
        // a NaN or an infinity (0·∞): such keys (the causal mask's) are
        // skipped, which leaves every sum bit for bit what it was.
        let finite: Vec<bool> = (0..n_keys * self.n_head_kv)
            .map(|i| v[i * hd..(i + 1) * hd].iter().all(|x| x.is_finite()))
            .collect();
        // Per head and token, the hd sums, then the hd Σ term², then the hd
        // Σ |term|: each output's terms summed in key order, the keys
        // outermost so the lanes run along d.
        let mut by_head = vec![0f64; self.n_head * self.t * 3 * hd];
        by_head
            .par_chunks_mut(self.t * 3 * hd)
            .enumerate()
            .for_each(|(h, out)| {
                let kvh = self.kv_head(h);
                for (ti, acc) in out.chunks_exact_mut(3 * hd).enumerate() {
                    let ph = &p[(h * self.t + ti) * n_keys..(h * self.t + ti + 1) * n_keys];
                    for (j, &pj) in ph.iter().enumerate() {
                        if pj == 0.0 && finite[j * self.n_head_kv + kvh] {
                            continue;
                        }
                        let vj = &v[j * kw + kvh * hd..j * kw + (kvh + 1) * hd];
                        lanes::add_terms(pj, vj, acc);
                    }
                }
            });
        let mut out = vec![(0f64, 0f64); self.t * e];
        for (h, head) in by_head.chunks_exact(self.t * 3 * hd).enumerate() {
            for (ti, acc) in head.chunks_exact(3 * hd).enumerate() {
                let (sums, rest) = acc.split_at(hd);
                let (sqs, abss) = rest.split_at(hd);
                for (d, ((&sum, &sq), &abs)) in sums.iter().zip(sqs).zip(abss).enumerate() {
                    out[ti * e + h * hd + d] = with_scale(sum, sq, abs, n_keys, self.kv_f16);
                }
            }
        }
        Ok(OracleStage::from_pairs(out))
    }
}

/// Logits [T, V] against a dense matrix; a single token's activations are
/// rounded to f16 first when the matrix is F16 (ggml's mul_mat conversion;
/// the scale also covers an engine that does not). `row_max` is each
/// matrix row's largest |w|: the rounding scale bounds the terms' norm by
/// max|w|·‖x‖ instead of summing their squares, which halves the work of
/// the one stage that reads the whole vocabulary.
pub(super) fn dense(m: &Dense<'_>, row_max: &[f32], x: &[f32], single_token: bool) -> OracleStage {
    let e = m.n_in;
    let t = x.len() / e.max(1);
    let half_in = m.is_f16() && single_token;
    let xs: Vec<f64> = x
        .iter()
        .map(|&v| {
            if half_in {
                f64::from(half::f16::from_f32(v).to_f32())
            } else {
                f64::from(v)
            }
        })
        .collect();
    let norms: Vec<(f64, f64)> = xs
        .chunks_exact(e.max(1))
        .map(|r| {
            (
                r.iter().map(|v| v * v).sum::<f64>().sqrt(),
                r.iter().map(|v| v.abs()).sum::<f64>(),
            )
        })
        .collect();
    let sqrt_n = (e as f64).sqrt();
    let mut y = vec![(0f64, 0f64); t * m.rows];
    // Row-major [T, V] output filled by blocks of matrix rows, so each row is
    // decoded once for every token.
    const ROWS: usize = 64;
    let mut by_row = vec![(0f64, 0f64); m.rows * t];
    by_row
        .par_chunks_mut(ROWS * t)
        .enumerate()
        .for_each(|(b, out)| {
            let mut w = vec![0f64; e];
            let n_rows = out.len() / t.max(1);
            // Sums of four F16 rows at once where the CPU converts f16 in
            // SIMD (each the same sum `dot4` gives), else row by row.
            let mut sums = vec![0f64; n_rows * t];
            for ti in 0..t {
                let xt = &xs[ti * e..(ti + 1) * e];
                let mut i = 0;
                while i < n_rows {
                    let r = b * ROWS + i;
                    if i + 4 <= n_rows && m.is_f16() {
                        let rows = [r, r + 1, r + 2, r + 3].map(|r| m.row_bytes(r));
                        if let Some(s4) = simd::dot4_f16_rows(rows, xt) {
                            for (k, s) in s4.into_iter().enumerate() {
                                sums[(i + k) * t + ti] = s;
                            }
                            i += 4;
                            continue;
                        }
                    }
                    m.row_into(r, &mut w);
                    sums[i * t + ti] = dot4(&w, xt);
                    i += 1;
                }
            }
            for (i, cell) in out.chunks_exact_mut(t).enumerate() {
                let r = b * ROWS + i;
                let wmax = f64::from(row_max[r]);
                for (ti, o) in cell.iter_mut().enumerate() {
                    let sum = sums[i * t + ti];
                    let (l2, l1) = norms[ti];
                    let mut scale = U * (sum.abs() + sqrt_n * wmax * l2);
                    if m.is_f16() && single_token {
                        scale += U16 * wmax * l1;
                    }
                    *o = (sum, scale);
                }
            }
        });
    for r in 0..m.rows {
        for ti in 0..t {
            y[ti * m.rows + r] = by_row[r * t + ti];
        }
    }
    OracleStage::from_pairs(y)
}

/// An f64 dot product with four accumulators (vectorizes; the order of an
/// f64 sum of f32-sized terms does not matter at f32 rounding scale).
fn dot4(a: &[f64], b: &[f64]) -> f64 {
    dot4_from([0f64; 4], a, b)
}

/// [`dot4`] continued from lane sums `acc` (where a SIMD kernel stopped).
fn dot4_from(mut acc: [f64; 4], a: &[f64], b: &[f64]) -> f64 {
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc[0] + acc[1] + acc[2] + acc[3] + tail
}

/// Loops whose lanes are independent sums, so that the compiler may
/// vectorize them: built for AVX2 where the CPU has it (the same
/// arithmetic, element by element, in the same order: the same bits).
mod lanes {
    /// `acc` holds n sums, then n Σ term², then n Σ |term| (n = `v.len()`);
    /// each gets the term `p·v[i]` of its i.
    pub fn add_terms(p: f64, v: &[f64], acc: &mut [f64]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above); the function is
            // safe code compiled with that feature enabled.
            return unsafe { add_terms_avx2(p, v, acc) };
        }
        add_terms_plain(p, v, acc);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn add_terms_avx2(p: f64, v: &[f64], acc: &mut [f64]) {
        add_terms_plain(p, v, acc);
    }

    #[inline(always)]
    fn add_terms_plain(p: f64, v: &[f64], acc: &mut [f64]) {
        let (sums, rest) = acc.split_at_mut(v.len());
        let (sqs, abss) = rest.split_at_mut(v.len());
        for (((s, q), a), &vd) in sums.iter_mut().zip(sqs).zip(abss).zip(v) {
            let term = p * vd;
            *s += term;
            *q += term * term;
            *a += term.abs();
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn values(n: usize, seed: usize) -> Vec<f64> {
            (0..n)
                .map(|i| {
                    (((i + seed) * 7919 % 2003) as f64 - 1001.0) / 37.0
                        * 1e-3f64.powi((i % 3) as i32)
                })
                .collect()
        }

        #[test]
        fn scores_are_each_keys_dot_with_scale() {
            use super::super::{dot_with_scale, Attention};
            for kv_f16 in [false, true] {
                let att = Attention {
                    n_head: 4,
                    n_head_kv: 2,
                    head_dim: 5,
                    t: 3,
                    n_past: 2,
                    kv_f16,
                };
                let (e, kw, n_keys) = (20, 10, 5);
                let q: Vec<f32> = values(att.t * e, 3).iter().map(|&v| v as f32).collect();
                let k: Vec<f32> = values(n_keys * kw, 4).iter().map(|&v| v as f32).collect();
                let got = att.scores(&q, &k).expect("shapes fit");
                let (qs, ks) = (att.stored(&q), att.stored(&k));
                for h in 0..att.n_head {
                    let kvh = att.kv_head(h);
                    for ti in 0..att.t {
                        let qh = &qs[ti * e + h * 5..ti * e + (h + 1) * 5];
                        for j in 0..n_keys {
                            let i = (h * att.t + ti) * n_keys + j;
                            let want = if j <= att.n_past + ti {
                                let kj = &ks[j * kw + kvh * 5..j * kw + (kvh + 1) * 5];
                                dot_with_scale(qh.iter().zip(kj).map(|(a, b)| a * b), kv_f16)
                            } else {
                                (0.0, 0.0)
                            };
                            let pair = (got.values[i], got.rounding[i]);
                            assert_eq!(
                                (pair.0.to_bits(), pair.1.to_bits()),
                                (want.0.to_bits(), want.1.to_bits()),
                                "head {h} token {ti} key {j}"
                            );
                        }
                    }
                }
            }
        }

        #[test]
        fn added_terms_are_each_columns_sums_in_order_on_every_path() {
            for hd in [1usize, 4, 64, 128, 130] {
                let (mut fast, mut plain, mut want) =
                    (vec![0f64; 3 * hd], vec![0f64; 3 * hd], vec![[0f64; 3]; hd]);
                for j in 0..9 {
                    let p = values(1, j)[0];
                    let v = values(hd, 10 + j);
                    add_terms(p, &v, &mut fast);
                    add_terms_plain(p, &v, &mut plain);
                    for (w, &vd) in want.iter_mut().zip(&v) {
                        let term = p * vd;
                        w[0] += term;
                        w[1] += term * term;
                        w[2] += term.abs();
                    }
                }
                let want: Vec<u64> = (0..3)
                    .flat_map(|c| want.iter().map(move |w| w[c].to_bits()))
                    .collect();
                let bits = |x: &[f64]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), want, "hd {hd}");
                assert_eq!(bits(&plain), want, "hd {hd}");
            }
        }
    }
}

/// The F16 logits product's inner loop in SIMD: f16 widened by F16C, f64
/// products and sums in the lane order of [`dot4`], so every sum is bit for
/// bit the one `dot4` gives on the widened row.
mod simd {
    /// `dot4` of each of four F16 rows (little-endian bytes, `x.len()`
    /// values each) with `x`; `None` where the CPU lacks AVX2 or F16C.
    pub fn dot4_f16_rows(rows: [&[u8]; 4], x: &[f64]) -> Option<[f64; 4]> {
        if rows.iter().any(|r| r.len() != 2 * x.len()) {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
            // SAFETY: the CPU has AVX2 and F16C (checked above), and every
            // row holds 2·x.len() bytes (checked above), which is all the
            // kernel reads.
            return Some(unsafe { avx2::dot4_f16_rows(rows, x) });
        }
        None
    }

    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use std::arch::x86_64::*;

        /// # Safety
        /// AVX2 and F16C present; each row holds at least `2 * x.len()` bytes.
        #[target_feature(enable = "avx2,f16c")]
        pub unsafe fn dot4_f16_rows(rows: [&[u8]; 4], x: &[f64]) -> [f64; 4] {
            let n = x.len();
            let blocks = n / 8;
            let mut acc = [_mm256_setzero_pd(); 4];
            for i in 0..blocks {
                // SAFETY: 8·i + 8 <= n values of x, 16·i + 16 <= 2n bytes of
                // each row (the caller's contract); unaligned loads.
                let (x0, x1) = unsafe {
                    (
                        _mm256_loadu_pd(x.as_ptr().add(8 * i)),
                        _mm256_loadu_pd(x.as_ptr().add(8 * i + 4)),
                    )
                };
                for (a, row) in acc.iter_mut().zip(&rows) {
                    // SAFETY: as above.
                    let h = unsafe { _mm_loadu_si128(row.as_ptr().add(16 * i).cast()) };
                    let w = _mm256_cvtph_ps(h);
                    let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(w));
                    let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(w));
                    // dot4's order: lane k sums elements 4j + k, one
                    // product rounded, then added, chunk after chunk.
                    *a = _mm256_add_pd(*a, _mm256_mul_pd(lo, x0));
                    *a = _mm256_add_pd(*a, _mm256_mul_pd(hi, x1));
                }
            }
            let mut out = [0f64; 4];
            for ((o, a), row) in out.iter_mut().zip(acc).zip(&rows) {
                let mut lanes = [0f64; 4];
                // SAFETY: lanes holds 4 f64.
                unsafe { _mm256_storeu_pd(lanes.as_mut_ptr(), a) };
                // The values after the last block of 8: dot4's remaining
                // chunks of 4 into the same lanes, then its tail.
                let rest = 8 * blocks;
                let w: Vec<f64> = row[2 * rest..2 * n]
                    .chunks_exact(2)
                    .map(|b| f64::from(half::f16::from_le_bytes([b[0], b[1]])))
                    .collect();
                *o = super::super::dot4_from(lanes, &w, &x[rest..]);
            }
            out
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::dot4;
        use super::*;

        #[test]
        fn four_rows_sum_bit_for_bit_as_dot4() {
            // Lengths with and without a block-of-8 remainder and a tail.
            for n in [1usize, 3, 4, 7, 8, 12, 13, 64, 2563] {
                let x: Vec<f64> = (0..n)
                    .map(|i| ((i * 37 % 101) as f64 - 50.0) / 7.0)
                    .collect();
                let rows: Vec<Vec<u8>> = (0..4)
                    .map(|r| {
                        (0..n)
                            .flat_map(|i| {
                                let v = ((i * 13 + r * 7) % 29) as f32 / 3.0 - 4.0;
                                half::f16::from_f32(v).to_le_bytes()
                            })
                            .collect()
                    })
                    .collect();
                let Some(got) = dot4_f16_rows([0, 1, 2, 3].map(|r| &rows[r][..]), &x) else {
                    eprintln!("skipped: no AVX2/F16C on this CPU");
                    return;
                };
                for (r, row) in rows.iter().enumerate() {
                    let w: Vec<f64> = row
                        .chunks_exact(2)
                        .map(|b| f64::from(half::f16::from_le_bytes([b[0], b[1]])))
                        .collect();
                    assert_eq!(got[r].to_bits(), dot4(&w, &x).to_bits(), "n {n} row {r}");
                }
            }
        }
    }
}
