//! The oracle's own reading of a GGUF model: metadata and tensors straight
//! from the file's bytes, through code the candidate engine never calls.
//!
//! An oracle that recomputed from the candidate's parsed config and weight
//! views would share every loading bug with it (a theta read from the wrong
//! key, two projections swapped at load, F16 rows read with the wrong
//! stride) and then blame the reference for them. So this file knows the
//! GGUF keys and tensor names of each arch a second time, on purpose, and
//! decodes F16/F32/I2_S data itself; it depends on `gguf` (raw metadata and
//! byte views) and `quant::i2s` (the format's definition) only.

use crate::gguf::{GgmlType, GgufFile, MetaValue, TensorInfo};
use crate::quant::i2s;
use serde::{Deserialize, Serialize};

/// The hyperparameters of a model as the file states them, read by the oracle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileFacts {
    /// `general.architecture`.
    pub arch: String,
    /// `{arch}.embedding_length`.
    pub n_embd: usize,
    /// `{arch}.block_count`.
    pub n_layer: usize,
    /// `{arch}.attention.head_count`.
    pub n_head: usize,
    /// `{arch}.attention.head_count_kv` (the head count when absent, as llama.cpp does).
    pub n_head_kv: usize,
    /// `{arch}.feed_forward_length`.
    pub n_ff: usize,
    /// Rows of `token_embd.weight`.
    pub n_vocab: usize,
    /// `{arch}.context_length`.
    pub n_ctx_train: usize,
    /// n_embd / n_head.
    pub head_dim: usize,
    /// `{arch}.rope.freq_base` (10000 when absent, llama.cpp's default).
    pub rope_theta: f32,
    /// `{arch}.attention.layer_norm_rms_epsilon`.
    pub rms_eps: f32,
    /// No `output.weight`: the logits use `token_embd.weight`.
    pub tied_output: bool,
}

impl FileFacts {
    /// A warning for a file whose arch says `bitnet` (SiLU-gated in
    /// bitnet.cpp, llama.cpp and both our engines) but whose shape is
    /// microsoft/BitNet-b1.58-2B-4T's (GQA, RoPE theta 500000, tied output),
    /// a model trained with squared ReLU: upstream llama.cpp's converter
    /// writes such files.
    pub fn relu2_trained_as_bitnet(&self, general_name: Option<&str>) -> Option<String> {
        let named = general_name.is_some_and(|n| {
            let n = n.to_ascii_lowercase();
            n.contains("2b-4t") || n.contains("bitnetforcausallm")
        });
        let shaped =
            self.n_head_kv < self.n_head && self.rope_theta == 500_000.0 && self.tied_output;
        (self.arch == "bitnet" && (named || shaped)).then(|| {
            format!(
                "arch `bitnet` with the shape of BitNet-b1.58-2B-4T ({}GQA {}/{} heads, RoPE theta {}, tied output): bitnet.cpp and llama.cpp run arch `bitnet` with a SiLU-gated FFN, but that model was trained with squared ReLU; its outputs will be wrong in every engine that trusts the arch. Convert it as arch `bitnet-b1.58`, or judge it as the model it is with `--ffn-act relu2`",
                general_name.map(|n| format!("`{n}`, ")).unwrap_or_default(),
                self.n_head,
                self.n_head_kv,
                self.rope_theta
            )
        })
    }

    /// Every (layer, stage) one forward pass of this arch produces, in
    /// execution order: what a step's coverage is checked against.
    pub fn expected_stages(&self) -> Vec<crate::trace::StageKey> {
        use crate::trace::{Stage, StageKey};
        let sub_norms = ArchMath::of(&self.arch).is_none_or(|m| m.sub_norms);
        let mut out = vec![StageKey::new(None, Stage::TokEmbd)];
        for l in 0..self.n_layer {
            out.extend(
                Stage::per_layer()
                    .filter(|s| sub_norms || !matches!(s, Stage::AttnSubNorm | Stage::FfnSubNorm))
                    .map(|s| StageKey::new(Some(l), s)),
            );
        }
        out.push(StageKey::new(None, Stage::ResultNorm));
        out.push(StageKey::new(None, Stage::Logits));
        out
    }
}

/// How an arch computes, as far as the oracle needs to know.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArchMath {
    /// RoPE pairs (i, i + d/2) (NEOX) rather than (2i, 2i + 1).
    pub neox: bool,
    /// `relu(gate)²` rather than `silu(gate)`.
    pub squared_relu: bool,
    /// attn_sub_norm and ffn_sub_norm exist.
    pub sub_norms: bool,
}

impl ArchMath {
    fn of(arch: &str) -> Option<ArchMath> {
        // llama.cpp's llama_rope_type and each arch's graph builder.
        match arch {
            "bitnet" => Some(ArchMath {
                neox: true,
                squared_relu: false,
                sub_norms: true,
            }),
            // `bitnet-25` is the same model under another engines' name.
            "bitnet-b1.58" | "bitnet-25" => Some(ArchMath {
                neox: true,
                squared_relu: true,
                sub_norms: true,
            }),
            "llama" => Some(ArchMath {
                neox: false,
                squared_relu: false,
                sub_norms: false,
            }),
            _ => None,
        }
    }
}

/// A ternary projection read from the file: codes stay in the mapping.
pub(crate) struct Ternary<'f> {
    pub codes: &'f [u8],
    pub n_in: usize,
    pub n_out: usize,
    pub tensor_scale: f32,
    /// The optional `*.scale` tensor multiplied after the product.
    pub extra_scale: Option<f32>,
}

impl Ternary<'_> {
    /// The weight (−1, 0, +1) at row `r`, column `j`: value `r·n_in + j` of
    /// the flattened tensor, as the I2_S format defines it.
    #[inline]
    pub fn weight(&self, r: usize, j: usize) -> i64 {
        i64::from(i2s::code_at(self.codes, r * self.n_in + j)) - 1
    }
}

/// A dense F16/F32 matrix of `rows` rows of `n_in`, decoded on demand.
pub(crate) struct Dense<'f> {
    data: &'f [u8],
    f16: bool,
    pub n_in: usize,
    pub rows: usize,
}

impl Dense<'_> {
    pub fn is_f16(&self) -> bool {
        self.f16
    }

    /// Row `r`'s bytes as the file stores them.
    pub fn row_bytes(&self, r: usize) -> &[u8] {
        let width = if self.f16 { 2 } else { 4 };
        &self.data[r * self.n_in * width..(r + 1) * self.n_in * width]
    }

    /// Row `r` widened to f64 into `out` (exact for both F16 and F32).
    pub fn row_into(&self, r: usize, out: &mut [f64]) {
        let width = if self.f16 { 2 } else { 4 };
        let bytes = &self.data[r * self.n_in * width..(r + 1) * self.n_in * width];
        if self.f16 {
            use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
            // The slice conversion uses F16C where the CPU has it: the
            // logits matrix is 328 M values on the 2B-4T shape, read once
            // per step and side.
            match bytemuck::try_cast_slice::<u8, u16>(bytes) {
                Ok(bits) => bits
                    .reinterpret_cast::<half::f16>()
                    .convert_to_f64_slice(&mut out[..self.n_in]),
                Err(_) => {
                    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                        *o = f64::from(half::f16::from_le_bytes([b[0], b[1]]));
                    }
                }
            }
        } else {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
    }

    /// The largest |w| of every row (one pass over the matrix, in parallel).
    pub fn row_max(&self) -> Vec<f32> {
        use rayon::prelude::*;
        (0..self.rows)
            .into_par_iter()
            .map(|r| {
                let mut row = vec![0f64; self.n_in];
                self.row_into(r, &mut row);
                row.iter().fold(0f64, |m, v| m.max(v.abs())) as f32
            })
            .collect()
    }
}

/// The model as the oracle reads it.
#[derive(Clone)]
pub struct OracleModel<'f> {
    pub(crate) file: &'f GgufFile,
    /// What the file says.
    pub facts: FileFacts,
    pub(crate) math: ArchMath,
}

/// Why the oracle could not read a model (the run goes on; blame is then
/// `undetermined`, with this reason).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the oracle cannot read the model: {0}")]
pub struct OracleError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, OracleError> {
    Err(OracleError(msg.into()))
}

impl<'f> OracleModel<'f> {
    /// Reads the facts of `file` by the GGUF keys of its arch.
    pub fn read(file: &'f GgufFile) -> Result<OracleModel<'f>, OracleError> {
        let arch = match file.get("general.architecture") {
            Some(MetaValue::String(s)) => s.clone(),
            Some(_) => return err("general.architecture is not a string"),
            None => return err("no general.architecture"),
        };
        let math = ArchMath::of(&arch)
            .ok_or_else(|| OracleError(format!("unknown architecture {arch:?}")))?;
        let number = |suffix: &str| -> Result<Option<f64>, OracleError> {
            let key = format!("{arch}.{suffix}");
            Ok(match file.get(&key) {
                None => None,
                Some(v) => {
                    Some(scalar(v).ok_or_else(|| OracleError(format!("{key} is not a number")))?)
                }
            })
        };
        let count = |suffix: &str| -> Result<usize, OracleError> {
            match number(suffix)? {
                Some(v) if v >= 0.0 && v.fract() == 0.0 => Ok(v as usize),
                Some(v) => err(format!("{arch}.{suffix} = {v} is not a count")),
                None => err(format!("no {arch}.{suffix}")),
            }
        };
        let n_embd = count("embedding_length")?;
        let n_head = count("attention.head_count")?;
        let n_head_kv = match number("attention.head_count_kv")? {
            Some(v) => v as usize,
            None => n_head,
        };
        let embd = file
            .tensor("token_embd.weight")
            .ok_or_else(|| OracleError("no token_embd.weight".into()))?;
        let n_vocab = embd.dims.get(1).copied().unwrap_or(1) as usize;
        if n_head == 0 || n_embd % n_head != 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return err(format!(
                "heads {n_head}/{n_head_kv} do not divide n_embd {n_embd}"
            ));
        }
        let facts = FileFacts {
            n_embd,
            n_layer: count("block_count")?,
            n_head,
            n_head_kv,
            n_ff: count("feed_forward_length")?,
            n_vocab,
            n_ctx_train: count("context_length")?,
            head_dim: n_embd / n_head,
            rope_theta: number("rope.freq_base")?.unwrap_or(10_000.0) as f32,
            rms_eps: number("attention.layer_norm_rms_epsilon")?
                .ok_or_else(|| OracleError(format!("no {arch}.attention.layer_norm_rms_epsilon")))?
                as f32,
            tied_output: file.tensor("output.weight").is_none(),
            arch,
        };
        Ok(OracleModel { file, facts, math })
    }

    fn info(&self, name: &str) -> Option<&'f TensorInfo> {
        self.file.tensor(name)
    }

    /// An F32 vector tensor (norm weights).
    pub(crate) fn vector(&self, name: &str) -> Option<Vec<f64>> {
        let t = self.info(name)?;
        if t.ty != GgmlType::F32 {
            return None;
        }
        Some(
            self.file
                .tensor_data(t)
                .chunks_exact(4)
                .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
        )
    }

    /// The per-layer norm weight `blk.{l}.{stem}.weight`.
    pub(crate) fn norm(&self, l: usize, stem: &str) -> Option<Vec<f64>> {
        self.vector(&format!("blk.{l}.{stem}.weight"))
    }

    /// The ternary projection `blk.{l}.{stem}.weight` (+ optional `.scale`).
    pub(crate) fn ternary(&self, l: usize, stem: &str) -> Option<Ternary<'f>> {
        let t = self.info(&format!("blk.{l}.{stem}.weight"))?;
        if t.ty != GgmlType::I2S || t.dims.len() < 2 {
            return None;
        }
        let (n_in, n_out) = (t.dims[0] as usize, t.dims[1] as usize);
        let data = self.file.tensor_data(t);
        let n = n_in * n_out;
        if data.len() < n / 4 + 4 {
            return None;
        }
        let extra_scale = self
            .vector(&format!("blk.{l}.{stem}.scale"))
            .and_then(|v| v.first().map(|&s| s as f32));
        Some(Ternary {
            codes: &data[..n / 4],
            n_in,
            n_out,
            tensor_scale: i2s::scale(data, n),
            extra_scale,
        })
    }

    /// `token_embd.weight`, or `output.weight` for the logits.
    pub(crate) fn dense(&self, name: &str) -> Option<Dense<'f>> {
        let t = self.info(name)?;
        let f16 = match t.ty {
            GgmlType::F16 => true,
            GgmlType::F32 => false,
            _ => return None,
        };
        Some(Dense {
            data: self.file.tensor_data(t),
            f16,
            n_in: *t.dims.first()? as usize,
            rows: t.dims.get(1).copied().unwrap_or(1) as usize,
        })
    }

    /// The matrix the logits are computed against.
    pub(crate) fn output(&self) -> Option<Dense<'f>> {
        if self.facts.tied_output {
            self.dense("token_embd.weight")
        } else {
            self.dense("output.weight")
        }
    }
}

/// Any integer or float metadata value as f64.
fn scalar(v: &MetaValue) -> Option<f64> {
    Some(match *v {
        MetaValue::U8(x) => f64::from(x),
        MetaValue::I8(x) => f64::from(x),
        MetaValue::U16(x) => f64::from(x),
        MetaValue::I16(x) => f64::from(x),
        MetaValue::U32(x) => f64::from(x),
        MetaValue::I32(x) => f64::from(x),
        MetaValue::U64(x) => x as f64,
        MetaValue::I64(x) => x as f64,
        MetaValue::F32(x) => f64::from(x),
        MetaValue::F64(x) => x,
        _ => return None,
    })
}
