//! A deliberately plain BitNet b1.58 engine: scalar f32, straight loops, no
//! SIMD, no threads; written for reading, and as the template for plugging
//! your own engine into `divergence` through its public API alone.
//!
//! What it takes to be bit-exact with bitnet.cpp is spelled out where it
//! matters (the arithmetic order of ggml's ops); everything else is the
//! model's definition. The stage names handed to the sink are the contract
//! of `docs/candidate-api.md`.

use divergence::candidate::{Candidate, CandidateError, KvSemantics, LoadOptions};
use divergence::gguf::{GgmlType, GgufFile};
use divergence::trace::{Stage, TraceSink};
use divergence::{Arch, FfnAct, KvType, ModelConfig};
use half::f16;

/// Bugs the broken variant can carry (a test proves each is localised).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Bug {
    /// No bug.
    #[default]
    None,
    /// RoPE rotates adjacent pairs (2i, 2i+1) instead of NEOX halves.
    RopeAdjacentPairs,
    /// The FFN's sub norm is read from the attention's sub norm weights.
    FfnSubNormWeightsOfAttention,
}

/// One ternary projection: weights as -1/0/+1, and its two scales.
struct Ternary {
    n_in: usize,
    n_out: usize,
    w: Vec<i8>,
    scale: f32,
    extra: Option<f32>,
}

struct Layer {
    attn_norm: Vec<f32>,
    attn_sub_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    ffn_sub_norm: Option<Vec<f32>>,
    q: Ternary,
    k: Ternary,
    v: Ternary,
    o: Ternary,
    gate: Ternary,
    up: Ternary,
    down: Ternary,
}

/// The engine: weights decoded into plain vectors, a KV cache per layer.
pub struct PlainEngine {
    config: ModelConfig,
    embd: Vec<f32>,
    /// The logits matrix, and whether it is stored F16 (ggml then rounds a
    /// single token's activations to f16 before the product).
    output: Vec<f32>,
    output_f16: bool,
    output_norm: Vec<f32>,
    layers: Vec<Layer>,
    /// Per layer, K and V rows of every cached position ([pos][n_embd_kv]).
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    kv_f16: bool,
    /// relu(gate)² rather than silu(gate): the arch's, or the run's `--ffn-act`.
    ffn_relu2: bool,
    bug: Bug,
}

fn err(msg: impl std::fmt::Display) -> CandidateError {
    CandidateError::new(msg)
}

fn f32s(file: &GgufFile, name: &str) -> Result<Vec<f32>, CandidateError> {
    let t = file
        .tensor(name)
        .ok_or_else(|| err(format!("no tensor {name}")))?;
    let bytes = file.tensor_data(t);
    Ok(match t.ty {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        GgmlType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => return Err(err(format!("{name}: type {other} is not F32 or F16"))),
    })
}

/// I2_S: 128-value blocks of 32 bytes; value j of a block sits in byte
/// j % 32 at bit shift 6 - 2·(j / 32); codes 0, 1, 2 are -1, 0, +1; one f32
/// scale follows the codes.
fn ternary(file: &GgufFile, name: &str, extra: Option<f32>) -> Result<Ternary, CandidateError> {
    let t = file
        .tensor(name)
        .ok_or_else(|| err(format!("no tensor {name}")))?;
    if t.ty != GgmlType::I2S {
        return Err(err(format!("{name} is not I2_S")));
    }
    let (n_in, n_out) = (t.dims[0] as usize, t.dims[1] as usize);
    let n = n_in * n_out;
    let bytes = file.tensor_data(t);
    let w = (0..n)
        .map(|i| {
            let (block, j) = (i / 128, i % 128);
            let byte = bytes[block * 32 + j % 32];
            ((byte >> (6 - 2 * (j / 32))) & 3) as i8 - 1
        })
        .collect();
    let s = &bytes[n / 4..n / 4 + 4];
    Ok(Ternary {
        n_in,
        n_out,
        w,
        scale: f32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        extra,
    })
}

impl PlainEngine {
    /// Loads `opts.model`.
    pub fn load(opts: &LoadOptions, bug: Bug) -> Result<PlainEngine, CandidateError> {
        let file = GgufFile::open(&opts.model).map_err(err)?;
        let arch_name = file
            .get_str("general.architecture")
            .map_err(err)?
            .to_string();
        let arch =
            Arch::from_name(&arch_name).ok_or_else(|| err(format!("unknown arch {arch_name}")))?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let int = |k: &str| file.get_u32(&key(k)).map(|v| v as usize).map_err(err);
        let n_embd = int("embedding_length")?;
        let n_head = int("attention.head_count")?;
        let embd_info = file
            .tensor("token_embd.weight")
            .ok_or_else(|| err("no token_embd.weight"))?;
        let config = ModelConfig {
            arch,
            n_embd,
            n_layer: int("block_count")?,
            n_head,
            n_head_kv: int("attention.head_count_kv").unwrap_or(n_head),
            n_ff: int("feed_forward_length")?,
            n_vocab: embd_info.dims[1] as usize,
            n_ctx_train: int("context_length")?,
            head_dim: n_embd / n_head,
            rope_theta: file.get_f32(&key("rope.freq_base")).unwrap_or(10000.0),
            rms_eps: file
                .get_f32(&key("attention.layer_norm_rms_epsilon"))
                .map_err(err)?,
            tied_output: file.tensor("output.weight").is_none(),
        };
        let sub_norms = arch != Arch::Llama;
        let mut layers = Vec::new();
        for l in 0..config.n_layer {
            let name = |s: &str| format!("blk.{l}.{s}");
            let proj = |s: &str| {
                let extra = f32s(&file, &name(&format!("{s}.scale"))).ok().map(|v| v[0]);
                ternary(&file, &name(&format!("{s}.weight")), extra)
            };
            let norm = |s: &str| f32s(&file, &name(&format!("{s}.weight")));
            layers.push(Layer {
                attn_norm: norm("attn_norm")?,
                attn_sub_norm: if sub_norms {
                    Some(norm("attn_sub_norm")?)
                } else {
                    None
                },
                ffn_norm: norm("ffn_norm")?,
                ffn_sub_norm: if sub_norms {
                    Some(norm("ffn_sub_norm")?)
                } else {
                    None
                },
                q: proj("attn_q")?,
                k: proj("attn_k")?,
                v: proj("attn_v")?,
                o: proj("attn_output")?,
                gate: proj("ffn_gate")?,
                up: proj("ffn_up")?,
                down: proj("ffn_down")?,
            });
        }
        let output_name = if config.tied_output {
            "token_embd.weight"
        } else {
            "output.weight"
        };
        let output_f16 = file.tensor(output_name).map(|t| t.ty) == Some(GgmlType::F16);
        Ok(PlainEngine {
            embd: f32s(&file, "token_embd.weight")?,
            output: f32s(&file, output_name)?,
            output_f16,
            output_norm: f32s(&file, "output_norm.weight")?,
            k_cache: vec![Vec::new(); config.n_layer],
            v_cache: vec![Vec::new(); config.n_layer],
            kv_f16: opts.kv_type == KvType::F16,
            ffn_relu2: opts.ffn_act.unwrap_or(config.arch.ffn_act()) == FfnAct::Relu2,
            layers,
            config,
            bug,
        })
    }
}

/// RMSNorm as ggml computes it: squares in f32 summed in f64, the mean
/// rounded to f32, `1/sqrtf(mean + eps)`, `x * scale`, then `* w`.
fn rms_norm(x: &[f32], n: usize, eps: f32, w: &[f32]) -> Vec<f32> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(n) {
        let mut sum = 0f64;
        for &v in row {
            sum += (v * v) as f64;
        }
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (i, &v) in row.iter().enumerate() {
            y.push((v * scale) * w[i]);
        }
    }
    y
}

/// bitnet.cpp's I2_S product: per token, int8 codes `round(x · 127/max)`
/// (the product taken exactly, ties to even: ggml's fused nearest_int), an
/// integer dot with the ternary weights, then `(Σ - 0) / scale · w_scale`.
/// (ggml sums code·q with codes 0..2 and subtracts Σq; with weights -1..1
/// that is the same integer.)
fn linear(m: &Ternary, x: &[f32]) -> Vec<f32> {
    let t = x.len() / m.n_in;
    let mut y = vec![0f32; t * m.n_out];
    for ti in 0..t {
        let row = &x[ti * m.n_in..(ti + 1) * m.n_in];
        let mut max = 1e-5f64;
        for &v in row {
            max = max.max((v as f64).abs());
        }
        let s = (127.0 / max) as f32;
        let q: Vec<i32> = row
            .iter()
            .map(|&v| {
                ((v as f64) * (s as f64))
                    .round_ties_even()
                    .clamp(-128.0, 127.0) as i32
            })
            .collect();
        let q_sum: i32 = q.iter().sum();
        for r in 0..m.n_out {
            let w = &m.w[r * m.n_in..(r + 1) * m.n_in];
            let mut codes_dot = 0i32; // Σ (w + 1)·q, as the kernel's unsigned codes give it
            for j in 0..m.n_in {
                codes_dot += (w[j] as i32 + 1) * q[j];
            }
            let mut v = (codes_dot as f32 - q_sum as f32) / s * m.scale;
            if let Some(e) = m.extra {
                v *= e;
            }
            y[ti * m.n_out + r] = v;
        }
    }
    y
}

/// RoPE at positions pos0.. over [T, heads, head_dim]: ggml's angle table
/// (θ starts at the position, multiplied by base^(-2/d) once per pair, in
/// f32) and its fused multiply-adds.
fn rope(x: &mut [f32], heads: usize, hd: usize, pos0: usize, base: f32, neox: bool) {
    let theta_scale = base.powf(-2.0 / hd as f32);
    for (t, row) in x.chunks_mut(heads * hd).enumerate() {
        let mut theta = (pos0 + t) as f32;
        let mut table = Vec::with_capacity(hd / 2);
        for _ in 0..hd / 2 {
            table.push((theta.cos(), theta.sin()));
            theta *= theta_scale;
        }
        for head in row.chunks_mut(hd) {
            for (i, &(c, s)) in table.iter().enumerate() {
                let (a, b) = if neox {
                    (i, i + hd / 2)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0.mul_add(c, -(x1 * s));
                head[b] = x0.mul_add(s, x1 * c);
            }
        }
    }
}

/// What an F16 cache (or ggml's F16 operand conversion) does to a value.
fn round_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

impl PlainEngine {
    fn layer(&mut self, l: usize, x: Vec<f32>, pos0: usize, sink: &mut dyn TraceSink) -> Vec<f32> {
        let c = self.config.clone();
        let (e, hd, nh, nkv, f) = (c.n_embd, c.head_dim, c.n_head, c.n_head_kv, c.n_ff);
        let ekv = nkv * hd;
        let t = x.len() / e;
        let at = Some(l);
        let neox = c.arch != Arch::Llama;
        let w = &self.layers[l];

        // Attention.
        let mut cur = rms_norm(&x, e, c.rms_eps, &w.attn_norm);
        sink.stage(at, Stage::AttnNorm, &[t, e], &mut cur);
        let mut q = linear(&w.q, &cur);
        let mut k = linear(&w.k, &cur);
        let mut v = linear(&w.v, &cur);
        sink.stage(at, Stage::QProj, &[t, e], &mut q);
        sink.stage(at, Stage::KProj, &[t, ekv], &mut k);
        sink.stage(at, Stage::VProj, &[t, ekv], &mut v);
        let neox_q = neox != (self.bug == Bug::RopeAdjacentPairs);
        rope(&mut q, nh, hd, pos0, c.rope_theta, neox_q);
        sink.stage(at, Stage::QRope, &[t, e], &mut q);
        rope(&mut k, nkv, hd, pos0, c.rope_theta, neox_q);
        sink.stage(at, Stage::KRope, &[t, ekv], &mut k);
        // The cache takes K and V after the sink saw them (resync reaches it).
        let store = |v: f32| if self.kv_f16 { round_f16(v) } else { v };
        self.k_cache[l].extend(k.iter().map(|&v| store(v)));
        self.v_cache[l].extend(v.iter().map(|&v| store(v)));
        let n_keys = pos0 + t;
        let (kc, vc) = (&self.k_cache[l], &self.v_cache[l]);
        let group = nh / nkv;
        let mut scores = vec![0f32; nh * t * n_keys];
        for h in 0..nh {
            let kvh = h / group;
            for ti in 0..t {
                for j in 0..=pos0 + ti {
                    let mut dot = 0f32;
                    for d in 0..hd {
                        dot += store(q[ti * e + h * hd + d]) * kc[j * ekv + kvh * hd + d];
                    }
                    scores[(h * t + ti) * n_keys + j] = dot;
                }
            }
        }
        sink.stage(at, Stage::AttnScores, &[nh, t, n_keys], &mut scores);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut probs = vec![0f32; scores.len()];
        for (i, (row, p)) in scores
            .chunks(n_keys)
            .zip(probs.chunks_mut(n_keys))
            .enumerate()
        {
            let n = pos0 + i % t + 1;
            let max = row[..n]
                .iter()
                .map(|&s| s * scale)
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f64;
            for j in 0..n {
                p[j] = (row[j] * scale - max).exp();
                sum += p[j] as f64;
            }
            let inv = (1.0 / sum) as f32;
            for pj in &mut p[..n] {
                *pj *= inv;
            }
        }
        sink.stage(at, Stage::AttnProbs, &[nh, t, n_keys], &mut probs);
        // ggml converts a single token's probabilities to f16 for the F16 V product.
        let store_p = |p: f32| {
            if self.kv_f16 && t == 1 {
                round_f16(p)
            } else {
                p
            }
        };
        let mut attn = vec![0f32; t * e];
        for h in 0..nh {
            let kvh = h / group;
            for ti in 0..t {
                for d in 0..hd {
                    let mut acc = 0f32;
                    for j in 0..n_keys {
                        acc +=
                            store_p(probs[(h * t + ti) * n_keys + j]) * vc[j * ekv + kvh * hd + d];
                    }
                    attn[ti * e + h * hd + d] = acc;
                }
            }
        }
        sink.stage(at, Stage::AttnOut, &[t, e], &mut attn);
        if let Some(sub) = &w.attn_sub_norm {
            attn = rms_norm(&attn, e, c.rms_eps, sub);
            sink.stage(at, Stage::AttnSubNorm, &[t, e], &mut attn);
        }
        let mut o = linear(&w.o, &attn);
        sink.stage(at, Stage::OProj, &[t, e], &mut o);
        let mut ffn_inp: Vec<f32> = o.iter().zip(&x).map(|(a, b)| a + b).collect();
        sink.stage(at, Stage::FfnInp, &[t, e], &mut ffn_inp);

        // Feed-forward.
        let mut cur = rms_norm(&ffn_inp, e, c.rms_eps, &w.ffn_norm);
        sink.stage(at, Stage::FfnNorm, &[t, e], &mut cur);
        let mut gate = linear(&w.gate, &cur);
        sink.stage(at, Stage::FfnGate, &[t, f], &mut gate);
        let mut act: Vec<f32> = if self.ffn_relu2 {
            gate.iter().map(|&g| g.max(0.0) * g.max(0.0)).collect()
        } else {
            gate.iter().map(|&g| g / (1.0 + (-g).exp())).collect()
        };
        sink.stage(at, Stage::FfnAct, &[t, f], &mut act);
        let mut up = linear(&w.up, &cur);
        sink.stage(at, Stage::FfnUp, &[t, f], &mut up);
        let mut prod: Vec<f32> = act.iter().zip(&up).map(|(a, u)| a * u).collect();
        sink.stage(at, Stage::FfnMul, &[t, f], &mut prod);
        let sub_weights = match self.bug {
            // The bug reads attn_sub_norm (n_embd long) for a row of n_ff: it
            // wraps around, as an index mistake in a flat weight array would.
            Bug::FfnSubNormWeightsOfAttention => w
                .attn_sub_norm
                .as_ref()
                .map(|a| a.iter().cycle().take(f).copied().collect()),
            _ => w.ffn_sub_norm.clone(),
        };
        if let Some(sub) = &sub_weights {
            prod = rms_norm(&prod, f, c.rms_eps, sub);
            sink.stage(at, Stage::FfnSubNorm, &[t, f], &mut prod);
        }
        let mut down = linear(&w.down, &prod);
        sink.stage(at, Stage::FfnDown, &[t, e], &mut down);
        let mut out: Vec<f32> = down.iter().zip(&ffn_inp).map(|(a, b)| a + b).collect();
        sink.stage(at, Stage::LOut, &[t, e], &mut out);
        out
    }
}

impl Candidate for PlainEngine {
    fn name(&self) -> String {
        "plain example engine".into()
    }

    fn build(&self) -> String {
        format!("examples/plain_engine, scalar f32, bug {:?}", self.bug)
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_semantics(&self) -> KvSemantics {
        KvSemantics::CachesSinkValues
    }

    fn reset(&mut self) {
        self.k_cache.iter_mut().for_each(Vec::clear);
        self.v_cache.iter_mut().for_each(Vec::clear);
    }

    fn forward(
        &mut self,
        tokens: &[u32],
        pos0: usize,
        sink: &mut dyn TraceSink,
    ) -> Result<Vec<f32>, CandidateError> {
        let c = self.config.clone();
        if self
            .k_cache
            .first()
            .map_or(0, |k| k.len() / (c.n_head_kv * c.head_dim))
            != pos0
        {
            return Err(err(format!("asked to run at position {pos0}")));
        }
        let (e, t) = (c.n_embd, tokens.len());
        let mut x = Vec::with_capacity(t * e);
        for &tok in tokens {
            let r = tok as usize;
            if r >= c.n_vocab {
                return Err(err(format!("token {tok} is outside the vocabulary")));
            }
            x.extend_from_slice(&self.embd[r * e..(r + 1) * e]);
        }
        sink.stage(None, Stage::TokEmbd, &[t, e], &mut x);
        for l in 0..c.n_layer {
            x = self.layer(l, x, pos0, sink);
        }
        let mut h = rms_norm(&x, e, c.rms_eps, &self.output_norm);
        sink.stage(None, Stage::ResultNorm, &[t, e], &mut h);
        let v = c.n_vocab;
        let mut logits = vec![0f32; t * v];
        for ti in 0..t {
            let row: Vec<f32> = h[ti * e..(ti + 1) * e]
                .iter()
                .map(|&a| {
                    if self.output_f16 && t == 1 {
                        round_f16(a)
                    } else {
                        a
                    }
                })
                .collect();
            for r in 0..v {
                let w = &self.output[r * e..(r + 1) * e];
                let mut dot = 0f32;
                for i in 0..e {
                    dot += w[i] * row[i];
                }
                logits[ti * v + r] = dot;
            }
        }
        sink.stage(None, Stage::Logits, &[t, v], &mut logits);
        Ok(logits)
    }
}
