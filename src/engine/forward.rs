//! The forward pass. One layer reads top to bottom; every canonical stage
//! is handed to the trace sink where it is produced, and the pass continues
//! from whatever the sink leaves in the buffer (resync).

use super::faults::{Fault, FaultSet};
use super::kernels::scalar::{self, BLOCK};
use super::kernels::Kernel;
use super::kv_cache::{KvCache, KvHead};
use super::ops;
use super::team::{with_team, Team, CHUNKS_PER_MEMBER};
use super::weights::{DenseMatrix, I2sMatrix, LayerWeights};
use super::{Engine, FfnAct, I2sMode, KvType, ModelConfig};
use crate::gguf::GgufFile;
use crate::quant::act::{ActQuantVariant, ActRow};
use crate::trace::{Stage, TraceSink};
use std::sync::Arc;

/// Everything a layer reads, borrowed from the engine (the KV cache is the
/// only thing a forward pass writes), and the team that runs the products.
pub(crate) struct Compute<'a, 't> {
    pub file: &'a GgufFile,
    pub config: &'a ModelConfig,
    pub team: &'t Team<'t, 'a>,
    pub kernel: Kernel,
    pub wrap: bool,
    pub faults: FaultSet,
    pub heads: Heads<'a>,
    /// The FFN runs relu(gate)² rather than silu(gate).
    pub ffn_relu2: bool,
}

/// Rows of activations quantized for an I2_S product ([T, n] codes and
/// one scale and sum per row), shared by the products that read the same input.
pub(crate) struct ActCodes {
    q: Arc<[i8]>,
    acts: Arc<[ActRow]>,
}

/// The per-head attention math, small enough to copy into a team task.
#[derive(Clone, Copy)]
pub(crate) struct Heads<'a> {
    config: &'a ModelConfig,
    faults: FaultSet,
    kv_f16: bool,
    kernel: Kernel,
}

pub(crate) fn forward<S: TraceSink + ?Sized>(
    engine: &mut Engine,
    tokens: &[u32],
    sink: &mut S,
) -> Vec<f32> {
    let Engine {
        file,
        config,
        opts,
        weights,
        kv,
        n_past,
        kernel,
        faults,
        ..
    } = engine;
    let (file, config, weights, kv): (&GgufFile, &ModelConfig, &_, &KvCache) =
        (file, config, weights, kv);
    with_team(opts.threads, |team| {
        let with_faults = |faults: FaultSet| Compute {
            file,
            config,
            team,
            kernel: *kernel,
            wrap: opts.i2s_mode == I2sMode::ReferenceWrap,
            faults,
            heads: Heads {
                config,
                faults,
                kv_f16: opts.kv_type == KvType::F16,
                kernel: *kernel,
            },
            // The arch's activation, or the one the run forces; the zoo's
            // fault swaps whichever it is.
            ffn_relu2: (opts.ffn_act.unwrap_or(config.arch.ffn_act()) == FfnAct::Relu2)
                != faults.has(Fault::WrongFfnAct),
        };
        // The faults of a chosen layer (`--inject-layer`) act only there.
        let cx = with_faults(faults.outside_layers());
        let sink = &mut Resting { team, sink };
        let (t, e) = (tokens.len(), config.n_embd);

        let mut x = cx.embedding(&weights.token_embd, tokens);
        sink.stage(None, Stage::TokEmbd, &[t, e], &mut x);
        for (l, w) in weights.layers.iter().enumerate() {
            x = with_faults(faults.in_layer(l)).layer(l, w, kv, *n_past, x, sink);
        }
        let mut out = cx.rms_norm(&x, e, cx.eps(), &weights.output_norm);
        sink.stage(None, Stage::ResultNorm, &[t, e], &mut out);
        let mut logits = cx.logits(&weights.output, &out);
        sink.stage(None, Stage::Logits, &[t, config.n_vocab], &mut logits);
        logits
    })
}

/// A sink that receives stages (a judge, a recorder) gets the cores to
/// itself while it runs: the team's idle workers sleep instead of spinning.
struct Resting<'s, 't, 'a, S: ?Sized> {
    team: &'t Team<'t, 'a>,
    sink: &'s mut S,
}

impl<S: TraceSink + ?Sized> TraceSink for Resting<'_, '_, '_, S> {
    fn enabled(&self) -> bool {
        self.sink.enabled()
    }

    fn stage(&mut self, layer: Option<usize>, stage: Stage, shape: &[usize], data: &mut [f32]) {
        if self.sink.enabled() {
            self.team.rest();
        }
        self.sink.stage(layer, stage, shape, data);
    }
}

impl<'a> Compute<'a, '_> {
    /// One transformer block over the T rows of `x` at positions pos0.. .
    fn layer<S: TraceSink + ?Sized>(
        &self,
        l: usize,
        w: &'a LayerWeights,
        kv: &'a KvCache,
        pos0: usize,
        x: Vec<f32>,
        sink: &mut S,
    ) -> Vec<f32> {
        let c = self.config;
        let (t, e, ekv, f, h) = (
            x.len() / c.n_embd,
            c.n_embd,
            c.n_embd_kv(),
            c.n_ff,
            c.n_head,
        );
        let n_keys = pos0 + t;
        let at = Some(l);

        // Attention: norm, projections, RoPE, cache, causal softmax over the cache.
        let mut cur = self.rms_norm(&x, e, self.eps(), &w.attn_norm);
        sink.stage(at, Stage::AttnNorm, &[t, e], &mut cur);
        let cur_q = self.quantize(&cur, e); // shared by q, k and v
        let [mut q, mut k, mut v] = self.linear_many([&w.q, &w.k, &w.v], &cur_q);
        sink.stage(at, Stage::QProj, &[t, e], &mut q);
        sink.stage(at, Stage::KProj, &[t, ekv], &mut k);
        sink.stage(at, Stage::VProj, &[t, ekv], &mut v);
        self.rope(&mut q, c.n_head, pos0);
        sink.stage(at, Stage::QRope, &[t, e], &mut q);
        self.rope(&mut k, c.n_head_kv, pos0);
        sink.stage(at, Stage::KRope, &[t, ekv], &mut k);
        // The bug zoo's KV slot fault writes a decode step's row one slot too far.
        let slot = if self.faults.has(Fault::KvSlotDecodeOffByOne)
            && t == 1
            && pos0 > 0
            && pos0 + 1 < kv.capacity()
        {
            pos0 + 1
        } else {
            pos0
        };
        kv.write(l, slot, &k, &v);
        let mut attn = if sink.enabled() {
            let raw = self.attn_scores(kv, l, &q, pos0);
            let mut scores = self.causal_zero(&raw, pos0, t);
            sink.stage(at, Stage::AttnScores, &[h, t, n_keys], &mut scores);
            let mut probs = self.attn_softmax(&scores, &raw, pos0, t);
            sink.stage(at, Stage::AttnProbs, &[h, t, n_keys], &mut probs);
            self.attn_apply(kv, l, &probs, pos0, t)
        } else {
            self.attention(kv, l, &q, pos0)
        };
        sink.stage(at, Stage::AttnOut, &[t, e], &mut attn);
        if let Some(sub_norm) = &w.attn_sub_norm {
            if !self.faults.has(Fault::SkipAttnSubNorm) {
                attn = self.rms_norm(&attn, e, self.eps(), sub_norm);
            }
            sink.stage(at, Stage::AttnSubNorm, &[t, e], &mut attn);
        }
        let mut o = self.linear(&w.o, &self.quantize(&attn, e));
        sink.stage(at, Stage::OProj, &[t, e], &mut o);
        let mut ffn_inp = ops::add(&o, &x);
        sink.stage(at, Stage::FfnInp, &[t, e], &mut ffn_inp);

        // Gated FFN: act(gate) * up, sub norm, down, residual.
        let mut cur = self.rms_norm(&ffn_inp, e, self.eps(), &w.ffn_norm);
        sink.stage(at, Stage::FfnNorm, &[t, e], &mut cur);
        let cur_q = self.quantize(&cur, e); // shared by gate and up
        let [mut gate, mut up] = self.linear_many([&w.gate, &w.up], &cur_q);
        sink.stage(at, Stage::FfnGate, &[t, f], &mut gate);
        let mut act = self.ffn_act(&gate);
        drop(gate); // (buffers of [T, n_ff] are freed as soon as they are read)
        sink.stage(at, Stage::FfnAct, &[t, f], &mut act);
        if l == 0 && self.faults.has(Fault::PanicAtFfnUp) {
            panic!("injected panic computing ffn_up of layer 0");
        }
        sink.stage(at, Stage::FfnUp, &[t, f], &mut up);
        let mut prod = act;
        ops::mul_assign(&mut prod, &up);
        drop(up);
        sink.stage(at, Stage::FfnMul, &[t, f], &mut prod);
        if let Some(sub_norm) = &w.ffn_sub_norm {
            prod = self.rms_norm(&prod, f, self.eps(), sub_norm);
            sink.stage(at, Stage::FfnSubNorm, &[t, f], &mut prod);
        }
        let mut down = self.linear(&w.down, &self.quantize(&prod, f));
        sink.stage(at, Stage::FfnDown, &[t, e], &mut down);
        let mut l_out = ops::add(&down, &ffn_inp);
        sink.stage(at, Stage::LOut, &[t, e], &mut l_out);
        l_out
    }

    /// RMSNorm (ops::rms_norm), or the bug zoo's wrong formula.
    fn rms_norm(&self, x: &[f32], n: usize, eps: f32, w: &[f32]) -> Vec<f32> {
        if self.faults.has(Fault::RmsNormEpsOutsideSqrt) {
            ops::rms_norm_eps_outside_sqrt(x, n, eps, w)
        } else {
            ops::rms_norm(x, n, eps, w)
        }
    }

    fn eps(&self) -> f32 {
        if self.faults.has(Fault::EpsHardcoded) {
            // The bug: a constant instead of the metadata; make sure it differs.
            if self.config.rms_eps == 1e-5 {
                1e-6
            } else {
                1e-5
            }
        } else {
            self.config.rms_eps
        }
    }

    /// The FFN activation (SiLU or squared ReLU) element-wise, split across
    /// the team (SiLU's exp is the costly part of the serial work).
    fn ffn_act(&self, gate: &[f32]) -> Vec<f32> {
        let act: fn(&[f32]) -> Vec<f32> = if self.ffn_relu2 {
            ops::relu2
        } else {
            ops::silu
        };
        let gate: Arc<[f32]> = gate.into();
        self.team
            .map_ranges(gate.len(), ACT_ALIGN, move |r| act(&gate[r]))
    }

    fn act_variant(&self) -> ActQuantVariant {
        ActQuantVariant {
            round_half_away: self.faults.has(Fault::ActRoundHalfAway),
            scale_numerator: if self.faults.has(Fault::ActScale128) {
                128
            } else {
                127
            },
        }
    }

    /// Rows of token embeddings, F16 converted exactly (ggml_get_rows).
    fn embedding(&self, m: &DenseMatrix, tokens: &[u32]) -> Vec<f32> {
        let mut x = vec![0f32; tokens.len() * m.n_in];
        for (row, &tok) in x.chunks_exact_mut(m.n_in).zip(tokens) {
            m.row_into_with(self.file, tok as usize, row, self.faults);
        }
        x
    }

    /// An I2_S projection of the rows quantized by [`Compute::quantize`]
    /// (see [`Compute::linear_many`]).
    fn linear(&self, m: &'a I2sMatrix, x: &ActCodes) -> Vec<f32> {
        let [y] = self.linear_many([m], x);
        y
    }

    /// I2_S projections of the same quantized rows by several matrices, as
    /// one team task over their rows end to end (one hand-over instead of
    /// one per matrix): integer products, then ggml's epilogue
    /// `((float)Σcode·q − (float)Σq) / act_scale * weight_scale` and the
    /// optional `*.scale` multiply, both in the task that computed the sums.
    /// Each output element is computed by exactly one member, by the same
    /// code whatever the thread count. Results are [T, n_out] per matrix.
    /// (With several tokens the matrices go one at a time, see below.)
    fn linear_many<const N: usize>(&self, ms: [&'a I2sMatrix; N], x: &ActCodes) -> [Vec<f32>; N] {
        let (q, acts) = (x.q.clone(), x.acts.clone());
        let t = acts.len();
        if N > 1 && t > 1 {
            // A prefill's results are megabytes and are rearranged to
            // [T, n_out] after the product: one matrix at a time holds one
            // of them twice instead of all of them (the hand-overs saved by
            // fusing matter only for single tokens).
            return ms.map(|m| self.linear(m, x));
        }
        // Rows as the kernels see them (whole blocks; see I2sMatrix::row_len).
        let n_in = ms[0].row_len();
        assert!(ms.iter().all(|m| m.row_len() == n_in));
        assert_eq!(q.len(), t * n_in);
        let (kernel, wrap) = (self.kernel, self.wrap);
        let parts: [(&'a [u8], usize, Dequant); N] =
            ms.map(|m| (m.kernel_codes(self.file), m.n_out, self.dequant_of(m)));
        let total: usize = parts.iter().map(|p| p.1).sum();
        // Per range of the matrices' rows end to end: [T, range] (each
        // member transposes its own sums, in parallel).
        let parts = self
            .team
            .map_parts(total, ROW_ALIGN, CHUNKS_PER_MEMBER, move |rows| {
                let mut sums = vec![0i32; rows.len() * t];
                let mut y = Vec::with_capacity(rows.len() * t);
                let mut base = 0; // first row of the current matrix in `total`
                for &(codes, n_out, dq) in &parts {
                    let lo = rows.start.max(base);
                    let hi = rows.end.min(base + n_out);
                    if lo < hi {
                        let s = &mut sums[..(hi - lo) * t];
                        kernel.matmul(wrap, codes, n_in, lo - base..hi - base, &q, s);
                        dq.extend(s, &acts, &mut y);
                    }
                    base += n_out;
                }
                if t == 1 {
                    return y;
                }
                let n = rows.len();
                let mut by_token = vec![0f32; n * t];
                for (r, row) in y.chunks_exact(t).enumerate() {
                    for (ti, &v) in row.iter().enumerate() {
                        by_token[ti * n + r] = v;
                    }
                }
                by_token
            });
        // Copy each range's token rows into [T, n_out] per matrix, in
        // pieces, one per matrix the range covers.
        let mut ys: [Vec<f32>; N] = std::array::from_fn(|i| vec![0f32; t * ms[i].n_out]);
        let starts: [usize; N] = std::array::from_fn(|i| ms[..i].iter().map(|m| m.n_out).sum());
        for (rows, y) in parts {
            for (ti, mut y) in y.chunks_exact(rows.len()).enumerate() {
                let mut k = rows.start;
                while !y.is_empty() {
                    let i = starts.iter().rposition(|&s0| s0 <= k).unwrap_or(0);
                    let (r, n_out) = (k - starts[i], ms[i].n_out);
                    let n = y.len().min(n_out - r);
                    ys[i][ti * n_out + r..][..n].copy_from_slice(&y[..n]);
                    (k, y) = (k + n, &y[n..]);
                }
            }
        }
        ys
    }

    /// Per-row int8 quantization of `x` ([T, n]), rows split across the
    /// team when there are several. Each row of codes is padded with zeros
    /// to whole 128-value blocks (the kernels' row length, see
    /// [`I2sMatrix::row_len`]); scale and sum cover the `n` real values.
    fn quantize(&self, x: &[f32], n: usize) -> ActCodes {
        let (variant, kernel) = (self.act_variant(), self.kernel);
        let t = x.len() / n;
        let width = n.next_multiple_of(BLOCK);
        let mut q = vec![0i8; t * width];
        if self.faults.has(Fault::ActScalePerBatch) {
            // The bug: one absmax over the whole batch instead of per token.
            let scale = crate::quant::act::act_scale(x, variant.scale_numerator);
            let acts: Vec<ActRow> = x
                .chunks_exact(n)
                .zip(q.chunks_exact_mut(width))
                .map(|(xr, qr)| {
                    crate::quant::act::quantize_row_with_scale(xr, &mut qr[..n], scale, variant)
                })
                .collect();
            return ActCodes {
                q: q.into(),
                acts: acts.into(),
            };
        }
        if t == 1 || self.team.threads() == 1 {
            let acts: Vec<ActRow> = x
                .chunks_exact(n)
                .zip(q.chunks_exact_mut(width))
                .map(|(xr, qr)| kernel.quantize_row(xr, &mut qr[..n], variant))
                .collect();
            return ActCodes {
                q: q.into(),
                acts: acts.into(),
            };
        }
        let x = x.to_vec();
        let rows = self.team.map_ranges(t, 1, move |rows| {
            rows.map(|r| {
                let mut qr = vec![0i8; n];
                let act = kernel.quantize_row(&x[r * n..(r + 1) * n], &mut qr, variant);
                (qr, act)
            })
            .collect()
        });
        let mut acts = Vec::with_capacity(t);
        for (out, (qr, act)) in q.chunks_exact_mut(width).zip(rows) {
            out[..n].copy_from_slice(&qr);
            acts.push(act);
        }
        ActCodes {
            q: q.into(),
            acts: acts.into(),
        }
    }

    /// The epilogue of an I2_S product by `m`, with this pass's faults.
    fn dequant_of(&self, m: &I2sMatrix) -> Dequant {
        Dequant {
            offset_times: if self.faults.has(Fault::MissingRowSum) {
                0
            } else if self.faults.has(Fault::I2sCodeOffByOne) {
                2
            } else {
                1
            },
            weight_scale: m.weight_scale,
            divide_weight_scale: self.faults.has(Fault::WeightScaleDivide),
            extra_scale: m.extra_scale,
        }
    }

    fn rope(&self, x: &mut [f32], n_heads: usize, pos0: usize) {
        let c = self.config;
        let one_token = x.len() == n_heads * c.head_dim;
        // The bug: decode steps (one token after a prefill) rotate one position too far.
        let pos0 = if self.faults.has(Fault::RopeDecodeOffByOne) && one_token && pos0 > 0 {
            pos0 + 1
        } else {
            pos0
        };
        // The fault swaps the pairing: adjacent pairs for NEOX arches (and halves for llama).
        let neox = c.arch.rope_neox() != self.faults.has(Fault::RopeInterleaved);
        self.kernel
            .rope(x, n_heads, c.head_dim, pos0, c.rope_theta, neox);
    }

    /// Whether ggml rounds the f32 operand of an F16 × f32 mul_mat to f16.
    /// With more than one token (and k a multiple of 16) ggml hands the
    /// product to llamafile's tinyBLAS, which reads the f32 operand as is;
    /// a single token goes through ggml_vec_dot_f16 on converted rows. This
    /// holds where src1 is contiguous: the logits and kqv (not kq, whose q
    /// is a permuted view and is always converted).
    fn f16_operand(t: usize) -> bool {
        t == 1
    }

    /// Raw q·k for every head, [H, T, K]; future entries are 0 unless
    /// NoCausalMask (then they are computed, for the softmax to use).
    fn attn_scores(&self, kv: &'a KvCache, l: usize, q: &[f32], pos0: usize) -> Vec<f32> {
        let c = self.config;
        let t = q.len() / c.n_embd;
        let n_keys = pos0 + t;
        let (heads, q) = (self.heads, q.to_vec());
        self.team.map_ranges(c.n_head, 1, move |hs| {
            let mut s = vec![0f32; hs.len() * t * n_keys];
            for (h, sh) in hs.zip(s.chunks_exact_mut(t * n_keys)) {
                let keys = kv.keys(l, heads.kv_head(h));
                for (ti, row) in sh.chunks_exact_mut(n_keys).enumerate() {
                    let n = heads.visible(pos0, ti, n_keys);
                    heads.score_row(&heads.query(&q, ti, h), &keys, &mut row[..n]);
                }
            }
            s
        })
    }

    /// The canonical attn_scores: future entries zeroed.
    fn causal_zero(&self, raw: &[f32], pos0: usize, t: usize) -> Vec<f32> {
        let n_keys = pos0 + t;
        let mut s = raw.to_vec();
        for (i, row) in s.chunks_exact_mut(n_keys).enumerate() {
            row[pos0 + i % t + 1..].fill(0.0);
        }
        s
    }

    /// Softmax of scaled scores per row; causal entries from `scores` (the
    /// sink may have replaced them), future ones from `raw` under NoCausalMask.
    fn attn_softmax(&self, scores: &[f32], raw: &[f32], pos0: usize, t: usize) -> Vec<f32> {
        let n_keys = pos0 + t;
        let mut probs = vec![0f32; scores.len()];
        let mut row_in = vec![0f32; n_keys];
        for (i, p) in probs.chunks_exact_mut(n_keys).enumerate() {
            let causal = pos0 + i % t + 1;
            let n = self.heads.visible(pos0, i % t, n_keys);
            row_in[..causal].copy_from_slice(&scores[i * n_keys..i * n_keys + causal]);
            row_in[causal..n].copy_from_slice(&raw[i * n_keys + causal..i * n_keys + n]);
            ops::softmax_row(&row_in, n, self.heads.attn_scale(), p);
        }
        probs
    }

    /// probs [H, T, K] · V → [T, E].
    fn attn_apply(
        &self,
        kv: &'a KvCache,
        l: usize,
        probs: &[f32],
        pos0: usize,
        t: usize,
    ) -> Vec<f32> {
        let n_keys = pos0 + t;
        let hd = self.config.head_dim;
        let (heads, probs) = (self.heads, probs.to_vec());
        self.per_head_out(t, move |h, out| {
            let vals = kv.values(l, heads.kv_head(h));
            for (ti, o) in out.chunks_exact_mut(hd).enumerate() {
                let p = &probs[(h * t + ti) * n_keys..(h * t + ti + 1) * n_keys];
                let n = heads.visible(pos0, ti, n_keys);
                heads.apply_row(&p[..n], &vals, t, o);
            }
        })
    }

    /// Untraced attention: the same row math without [H, T, K] buffers,
    /// reading the cache in place from inside the team's tasks.
    fn attention(&self, kv: &'a KvCache, l: usize, q: &[f32], pos0: usize) -> Vec<f32> {
        let c = self.config;
        let (hd, t) = (c.head_dim, q.len() / c.n_embd);
        let n_keys = pos0 + t;
        let (heads, q) = (self.heads, q.to_vec());
        self.per_head_out(t, move |h, out| {
            let keys = kv.keys(l, heads.kv_head(h));
            let vals = kv.values(l, heads.kv_head(h));
            let mut raw = vec![0f32; n_keys];
            let mut p = vec![0f32; n_keys];
            for (ti, o) in out.chunks_exact_mut(hd).enumerate() {
                let n = heads.visible(pos0, ti, n_keys);
                heads.score_row(&heads.query(&q, ti, h), &keys, &mut raw[..n]);
                ops::softmax_row(&raw, n, heads.attn_scale(), &mut p);
                heads.apply_row(&p[..n], &vals, t, o);
            }
        })
    }

    /// Run `f(h, out[T, hd])` for every head across the team and interleave
    /// the heads into [T, E].
    fn per_head_out(&self, t: usize, f: impl Fn(usize, &mut [f32]) + Send + Sync + 'a) -> Vec<f32> {
        let c = self.config;
        let hd = c.head_dim;
        // One range of consecutive heads per member: heads of a GQA group
        // share a kv head, so its keys and values come from DRAM once and
        // stay in L2 for the group's other heads (every head costs the
        // same, so equal ranges balance; finer ones split the groups).
        let per_head = self.team.map_ranges_by(c.n_head, 1, 1, move |hs| {
            let mut out = vec![0f32; hs.len() * t * hd];
            for (h, o) in hs.zip(out.chunks_exact_mut(t * hd)) {
                f(h, o);
            }
            out
        });
        let mut y = vec![0f32; t * c.n_embd];
        for (h, out) in per_head.chunks_exact(t * hd).enumerate() {
            for (ti, o) in out.chunks_exact(hd).enumerate() {
                y[ti * c.n_embd + h * hd..ti * c.n_embd + (h + 1) * hd].copy_from_slice(o);
            }
        }
        y
    }

    /// Logits [T, V] against the output (or tied embedding) matrix. With an
    /// F16 matrix and one token the activations are rounded to f16 first, as
    /// ggml's mul_mat does for an F16 src0 (see [`Compute::f16_operand`]); the dot itself is the 16-lane order of
    /// `scalar::dot_dense` (ggml's SIMD order differs: compared tightly, not
    /// exactly).
    fn logits(&self, m: &'a DenseMatrix, x: &[f32]) -> Vec<f32> {
        let (e, v, f16) = (m.n_in, m.rows, m.is_f16());
        let t = x.len() / e;
        let xs: Arc<Vec<f32>> = Arc::new(if f16 && Self::f16_operand(t) {
            ops::round_f16_slice(x)
        } else {
            x.to_vec()
        });
        let data = self.file.tensor_data(&m.info);
        let row_bytes = if f16 { 2 * e } else { 4 * e };
        let kernel = self.kernel;
        // Vocabulary blocks bound the transposition scratch (a prefill of
        // 128 tokens over a 128k vocabulary would otherwise hold the logits twice).
        let block = if t == 1 { v } else { LOGITS_BLOCK_ROWS.min(v) };
        let mut y = if t == 1 {
            Vec::new()
        } else {
            vec![0f32; t * v]
        };
        for b0 in (0..v).step_by(block) {
            let rows = block.min(v - b0);
            let xs = xs.clone();
            let out_t = self.team.map_ranges(rows, ROW_ALIGN, move |rr| {
                let mut out = vec![0f32; rr.len() * t];
                let bytes = &data[(b0 + rr.start) * row_bytes..(b0 + rr.end) * row_bytes];
                if f16 {
                    kernel.dot_f16_rows(e, bytes, &xs, &mut out);
                } else {
                    for (row, o) in bytes.chunks_exact(row_bytes).zip(out.chunks_exact_mut(t)) {
                        for (ti, oi) in o.iter_mut().enumerate() {
                            *oi = scalar::dot_f32_row(row, &xs[ti * e..(ti + 1) * e]);
                        }
                    }
                }
                out
            });
            if t == 1 {
                return out_t; // one block: already [1, V]
            }
            for (r, o) in out_t.chunks_exact(t).enumerate() {
                for (ti, &val) in o.iter().enumerate() {
                    y[ti * v + b0 + r] = val;
                }
            }
        }
        y
    }
}

/// ggml's I2_S epilogue for one matrix (and the bug-zoo faults in it).
#[derive(Clone, Copy)]
struct Dequant {
    /// The activation sum subtracted this many times (1; the faults 0 or 2).
    offset_times: i32,
    weight_scale: f32,
    divide_weight_scale: bool,
    extra_scale: Option<f32>,
}

impl Dequant {
    /// Append the outputs of `sums` ([rows, T], token-minor) to `out`.
    fn extend(self, sums: &[i32], acts: &[ActRow], out: &mut Vec<f32>) {
        let t = acts.len();
        if t == 1 {
            // One token: a straight loop the compiler can vectorise.
            let act = acts[0];
            out.extend(sums.iter().map(|&s| self.apply(s, act)));
        } else {
            out.extend(
                sums.iter()
                    .enumerate()
                    .map(|(i, &s)| self.apply(s, acts[i % t])),
            );
        }
    }

    #[inline(always)]
    fn apply(self, sum: i32, act: ActRow) -> f32 {
        let offset = self.offset_times * act.sum;
        let v = (sum as f32 - offset as f32) / act.scale;
        let v = if self.divide_weight_scale {
            v / self.weight_scale
        } else {
            v * self.weight_scale
        };
        match self.extra_scale {
            Some(s) => v * s,
            None => v,
        }
    }
}

impl Heads<'_> {
    /// The kv head query head `h` reads.
    fn kv_head(&self, h: usize) -> usize {
        if self.faults.has(Fault::GqaModulo) {
            h % self.config.n_head_kv
        } else {
            h / self.config.gqa_group()
        }
    }

    fn attn_scale(&self) -> f32 {
        let hd = self.config.head_dim as f32;
        if self.faults.has(Fault::AttnScaleInvHeadDim) {
            1.0 / hd
        } else {
            1.0 / hd.sqrt()
        }
    }

    /// Keys visible to query row t (all cached keys under NoCausalMask).
    fn visible(&self, pos0: usize, t: usize, n_keys: usize) -> usize {
        if self.faults.has(Fault::NoCausalMask) {
            n_keys
        } else {
            pos0 + t + 1
        }
    }

    /// The query of head h for row t, rounded to f16 when K is F16 (ggml's
    /// mul_mat converts src1 to src0's F16 vec_dot type).
    fn query(&self, q: &[f32], t: usize, h: usize) -> Vec<f32> {
        let (e, hd) = (self.config.n_embd, self.config.head_dim);
        let row = &q[t * e + h * hd..t * e + (h + 1) * hd];
        if self.kv_f16 {
            ops::round_f16_slice(row)
        } else {
            row.to_vec()
        }
    }

    /// `out[j] = q·k_j` for j < n ([`scalar::dot_attn`]'s order).
    fn score_row(&self, q: &[f32], keys: &KvHead<'_>, out: &mut [f32]) {
        self.kernel.attn_scores(q, keys, out);
    }

    /// `out[d] = Σ_j p_j v_j[d]` (probabilities rounded to f16 when V is F16
    /// and ggml would convert them, see [`Compute::f16_operand`]).
    fn apply_row(&self, p: &[f32], vals: &KvHead<'_>, t: usize, out: &mut [f32]) {
        if self.kv_f16 && Compute::f16_operand(t) {
            let p = ops::round_f16_slice(p);
            self.kernel.attn_apply(&p, vals, out);
        } else {
            self.kernel.attn_apply(p, vals, out);
        }
    }
}

/// Element ranges of an element-wise op are multiples of this (a cache line).
const ACT_ALIGN: usize = 16;

/// Vocabulary rows per block of a multi-token logits product.
const LOGITS_BLOCK_ROWS: usize = 4096;

/// Rows of a product are shared out in multiples of this (the kernels' row
/// tiles; any split gives the same bits, this only keeps the tiles full).
const ROW_ALIGN: usize = 16;
