//! Views of a model's tensors. Projections stay packed I2_S in the file's
//! bytes (mapped, or resident in huge pages: `GgufFile::open_resident`);
//! only the small F32 norm vectors and scalar scales are copied out.

use super::config::{ModelConfig, Norm, Proj, OUTPUT, OUTPUT_NORM, TOKEN_EMBD};
use super::faults::{Fault, FaultSet};
use super::kernels::scalar::{BLOCK, BLOCK_BYTES};
use super::{EngineError, I2sMode};
use crate::gguf::{GgmlType, GgufFile, TensorInfo};
use crate::quant::i2s;
use rayon::prelude::*;
use std::sync::Arc;

/// A packed I2_S projection: `n_out` rows of `n_in` ternary weights.
///
/// I2_S blocks the *flattened* tensor (DESIGN.md), so when `n_in` is not a
/// multiple of 128 (bitnet_b1_58-3B's ffn_down: 8640) rows start inside a
/// block. The kernels take whole, row-aligned blocks: such a matrix keeps a
/// re-laid copy of its rows, each padded to [`I2sMatrix::row_len`] with
/// code 0 (whose products `code·q` are 0 whatever the activation).
#[derive(Clone, Debug)]
pub struct I2sMatrix {
    pub info: TensorInfo,
    pub n_in: usize,
    pub n_out: usize,
    /// The tensor's own scale, stored after the codes.
    pub weight_scale: f32,
    /// An optional `*.scale` tensor, multiplied after the matmul (ggml_mul).
    pub extra_scale: Option<f32>,
    /// Row-aligned codes when `n_in` is not a multiple of 128 (see
    /// [`realign_rows`]); `None` when the file's bytes already are.
    realigned: Option<Arc<[u8]>>,
}

impl I2sMatrix {
    /// The packed codes of the whole flattened tensor, as the file holds
    /// them (without the trailing scale): the format's definition.
    pub fn codes<'a>(&self, file: &'a GgufFile) -> &'a [u8] {
        &file.tensor_data(&self.info)[..self.n_in * self.n_out / 4]
    }

    /// Values per row as the kernels see it: `n_in` rounded up to whole blocks.
    pub fn row_len(&self) -> usize {
        self.n_in.next_multiple_of(BLOCK)
    }

    /// `n_out` rows of [`I2sMatrix::row_len`] values in whole blocks, for the kernels.
    pub fn kernel_codes<'a>(&'a self, file: &'a GgufFile) -> &'a [u8] {
        match &self.realigned {
            Some(rows) => rows,
            None => self.codes(file),
        }
    }

    /// Whether the rows were re-laid for the kernels (`n_in` % 128 != 0).
    pub fn is_realigned(&self) -> bool {
        self.realigned.is_some()
    }
}

/// Rows of a flattened I2_S tensor whose row length `n_in` is not a multiple
/// of 128, re-laid as `n_out` rows of whole blocks (padding code 0).
///
/// - [`I2sMode::Exact`]: row `r` holds values `r·n_in .. (r+1)·n_in` of the
///   flattened tensor, each read where the format puts it
///   ([`i2s::code_at`]): the file's ternary weights, exactly.
/// - [`I2sMode::ReferenceWrap`]: row `r` holds the bytes bitnet.cpp's mul_mat
///   hands `ggml_vec_dot_i2_i8_s` for that row, verbatim: the
///   `n_in / 128` whole blocks starting at byte `r·n_in/4` (its
///   `src0_row + ir0 * nb01 / 4`). The kernel drops the remainder of each
///   row, and a row starting inside a block is read as if it started one
///   (codes paired with the wrong activations, the previous row's tail
///   included): reproduced here bit for bit, so the candidate can mirror it.
pub fn realign_rows(flat: &[u8], n_in: usize, n_out: usize, mode: I2sMode) -> Vec<u8> {
    let row_bytes = n_in.next_multiple_of(BLOCK) / 4;
    let mut out = vec![0u8; n_out * row_bytes];
    out.par_chunks_mut(row_bytes)
        .enumerate()
        .for_each(|(r, row)| match mode {
            I2sMode::ReferenceWrap => {
                let start = r * n_in / 4;
                let whole = n_in / BLOCK * BLOCK_BYTES;
                row[..whole].copy_from_slice(&flat[start..start + whole]);
            }
            I2sMode::Exact => {
                let first = r * n_in;
                for j in 0..n_in {
                    let code = i2s::code_at(flat, first + j);
                    let k = j % BLOCK;
                    row[j / BLOCK * BLOCK_BYTES + k % BLOCK_BYTES] |=
                        code << (6 - 2 * (k / BLOCK_BYTES));
                }
            }
        });
    out
}

/// A dense F16 or F32 matrix (`rows` rows of `n_in`), kept in the file's bytes.
#[derive(Clone, Debug)]
pub struct DenseMatrix {
    pub info: TensorInfo,
    pub n_in: usize,
    pub rows: usize,
}

impl DenseMatrix {
    pub fn is_f16(&self) -> bool {
        self.info.ty == GgmlType::F16
    }

    /// Row `r` converted to f32 (F16 → f32 is exact).
    pub fn row_into(&self, file: &GgufFile, r: usize, out: &mut [f32]) {
        self.row_into_with(file, r, out, FaultSet::default())
    }

    /// [`DenseMatrix::row_into`] with the loading faults of the bug zoo.
    pub fn row_into_with(&self, file: &GgufFile, r: usize, out: &mut [f32], faults: FaultSet) {
        let data = file.tensor_data(&self.info);
        match self.info.ty {
            GgmlType::F16 => {
                // The bug: rows taken one element short, so row r starts r values early.
                let stride = if faults.has(Fault::F16RowStride) {
                    self.n_in - 1
                } else {
                    self.n_in
                };
                let bytes = &data[r * stride * 2..(r * stride + self.n_in) * 2];
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            _ => {
                let bytes = &data[r * self.n_in * 4..(r + 1) * self.n_in * 4];
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub attn_sub_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub ffn_sub_norm: Option<Vec<f32>>,
    pub q: I2sMatrix,
    pub k: I2sMatrix,
    pub v: I2sMatrix,
    pub o: I2sMatrix,
    pub gate: I2sMatrix,
    pub up: I2sMatrix,
    pub down: I2sMatrix,
}

impl LayerWeights {
    pub fn proj(&self, p: Proj) -> &I2sMatrix {
        match p {
            Proj::Q => &self.q,
            Proj::K => &self.k,
            Proj::V => &self.v,
            Proj::O => &self.o,
            Proj::Gate => &self.gate,
            Proj::Up => &self.up,
            Proj::Down => &self.down,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Weights {
    pub token_embd: DenseMatrix,
    /// `output.weight`, or `token_embd` when tied.
    pub output: DenseMatrix,
    pub output_norm: Vec<f32>,
    pub layers: Vec<LayerWeights>,
}

impl Weights {
    pub fn from_gguf(file: &GgufFile, c: &ModelConfig) -> Result<Weights, EngineError> {
        Self::from_gguf_with(file, c, FaultSet::default(), I2sMode::default())
    }

    /// [`Weights::from_gguf`] with the loading faults of the bug zoo, and
    /// `mode` deciding how rows of a length that is not a multiple of 128
    /// are laid out for the kernels (see [`realign_rows`]).
    pub fn from_gguf_with(
        file: &GgufFile,
        c: &ModelConfig,
        faults: FaultSet,
        mode: I2sMode,
    ) -> Result<Weights, EngineError> {
        let token_embd = dense(file, TOKEN_EMBD, c.n_embd, c.n_vocab)?;
        let all_faults = faults;
        let faults = all_faults.outside_layers();
        let output = if c.tied_output || faults.has(Fault::LogitsWrongMatrix) {
            token_embd.clone()
        } else {
            dense(file, OUTPUT, c.n_embd, c.n_vocab)?
        };
        let output_norm = if faults.has(Fault::FinalNormWrongWeight) {
            // The bug: the last layer's ffn_norm read for the final norm.
            f32_vec(file, &Norm::Ffn.name(c.n_layer - 1), c.n_embd)?
        } else {
            f32_vec(file, OUTPUT_NORM, c.n_embd)?
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            let faults = all_faults.in_layer(l);
            let norm = |n: Norm| f32_vec(file, &n.name(l), n.len(c));
            let sub = |n: Norm| -> Result<Option<Vec<f32>>, EngineError> {
                if c.arch.has_sub_norms() {
                    norm(n).map(Some)
                } else {
                    Ok(None)
                }
            };
            let proj = |p: Proj| i2s_matrix(file, c, p, l, faults, mode);
            let (gate, up) = if faults.has(Fault::SwapGateUp) {
                (Proj::Up, Proj::Gate) // the bug: two names mixed up at load
            } else {
                (Proj::Gate, Proj::Up)
            };
            let o = if faults.has(Fault::OProjPreviousLayer) && l > 0 {
                i2s_matrix(file, c, Proj::O, l - 1, faults, mode)? // the bug: a layer index off by one
            } else {
                proj(Proj::O)?
            };
            layers.push(LayerWeights {
                attn_norm: norm(Norm::Attn)?,
                attn_sub_norm: sub(Norm::AttnSub)?,
                ffn_norm: norm(Norm::Ffn)?,
                ffn_sub_norm: sub(Norm::FfnSub)?,
                q: proj(Proj::Q)?,
                k: proj(Proj::K)?,
                v: proj(Proj::V)?,
                o,
                gate: proj(gate)?,
                up: proj(up)?,
                down: proj(Proj::Down)?,
            });
        }
        Ok(Weights {
            token_embd,
            output,
            output_norm,
            layers,
        })
    }

    /// Bytes read per decoded token: every projection, every norm, the
    /// output matrix (the embedding row lookup is negligible).
    pub fn bytes_per_token(&self) -> u64 {
        let norm_bytes = |v: &Vec<f32>| 4 * v.len() as u64;
        let mut total = self.output.info.n_bytes + norm_bytes(&self.output_norm);
        for l in &self.layers {
            for p in Proj::ALL {
                total += l.proj(p).info.n_bytes;
            }
            total += norm_bytes(&l.attn_norm) + norm_bytes(&l.ffn_norm);
            total += l.attn_sub_norm.as_ref().map_or(0, norm_bytes);
            total += l.ffn_sub_norm.as_ref().map_or(0, norm_bytes);
        }
        total
    }
}

fn tensor<'a>(file: &'a GgufFile, name: &str) -> Result<&'a TensorInfo, EngineError> {
    file.tensor(name)
        .ok_or_else(|| EngineError::MissingTensor(name.to_string()))
}

fn check_dims(info: &TensorInfo, expected: &[usize]) -> Result<(), EngineError> {
    let found: Vec<u64> = info.dims.clone();
    let want: Vec<u64> = expected.iter().map(|&d| d as u64).collect();
    // GGUF may carry trailing 1-dims; ignore them.
    let trim = |v: &[u64]| -> Vec<u64> {
        let mut v = v.to_vec();
        while v.len() > 1 && v.last() == Some(&1) {
            v.pop();
        }
        v
    };
    if trim(&found) != trim(&want) {
        return Err(EngineError::Shape {
            tensor: info.name.clone(),
            expected: format!("{want:?}"),
            found,
        });
    }
    Ok(())
}

fn check_type(info: &TensorInfo, allowed: &[GgmlType]) -> Result<(), EngineError> {
    if !allowed.contains(&info.ty) {
        return Err(EngineError::TensorType {
            tensor: info.name.clone(),
            expected: allowed
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(" or "),
            found: info.ty.name().to_string(),
        });
    }
    Ok(())
}

fn f32_vec(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
    let info = tensor(file, name)?;
    check_type(info, &[GgmlType::F32])?;
    check_dims(info, &[len])?;
    let data = file.tensor_data(info);
    Ok(data[..4 * len]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn dense(
    file: &GgufFile,
    name: &str,
    n_in: usize,
    rows: usize,
) -> Result<DenseMatrix, EngineError> {
    let info = tensor(file, name)?;
    check_type(info, &[GgmlType::F16, GgmlType::F32])?;
    check_dims(info, &[n_in, rows])?;
    Ok(DenseMatrix {
        info: info.clone(),
        n_in,
        rows,
    })
}

fn i2s_matrix(
    file: &GgufFile,
    c: &ModelConfig,
    p: Proj,
    layer: usize,
    faults: FaultSet,
    mode: I2sMode,
) -> Result<I2sMatrix, EngineError> {
    let name = p.weight_name(layer);
    let info = tensor(file, &name)?;
    check_type(info, &[GgmlType::I2S])?;
    let (n_in, n_out) = p.shape(c);
    check_dims(info, &[n_in, n_out])?;
    // The format blocks the flattened tensor: only the total must be whole blocks.
    if !(n_in * n_out).is_multiple_of(BLOCK) {
        return Err(EngineError::I2sBlocks {
            tensor: name,
            n_values: n_in * n_out,
        });
    }
    let data = file.tensor_data(info);
    let at = n_in * n_out / 4;
    let sb = data.get(at..at + 4).ok_or_else(|| EngineError::Shape {
        tensor: name.clone(),
        expected: format!("{} bytes of codes then an f32 scale", at),
        found: info.dims.clone(),
    })?;
    let weight_scale = f32::from_le_bytes([sb[0], sb[1], sb[2], sb[3]]);
    let scale_tensor = if faults.has(Fault::ScaleTensorIgnored) {
        None
    } else {
        file.tensor(&p.scale_name(layer))
    };
    let extra_scale = match scale_tensor {
        None => None,
        Some(s) => {
            check_type(s, &[GgmlType::F32])?;
            check_dims(s, &[1])?;
            let b = file.tensor_data(s);
            Some(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
    };
    let realigned =
        (!n_in.is_multiple_of(BLOCK)).then(|| realign_rows(&data[..at], n_in, n_out, mode).into());
    Ok(I2sMatrix {
        info: info.clone(),
        n_in,
        n_out,
        weight_scale,
        extra_scale,
        realigned,
    })
}
