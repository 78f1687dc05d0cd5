//! Views of a model's tensors. Projections stay packed I2_S in the mmap;
//! only the small F32 norm vectors and scalar scales are copied out.

use super::config::{ModelConfig, Norm, Proj, OUTPUT, OUTPUT_NORM, TOKEN_EMBD};
use super::faults::{Fault, FaultSet};
use super::kernels::scalar::BLOCK;
use super::EngineError;
use crate::gguf::{GgmlType, GgufFile, TensorInfo};

/// A packed I2_S projection: `n_out` rows of `n_in` ternary weights.
#[derive(Clone, Debug)]
pub struct I2sMatrix {
    pub info: TensorInfo,
    pub n_in: usize,
    pub n_out: usize,
    /// The tensor's own scale, stored after the codes.
    pub weight_scale: f32,
    /// An optional `*.scale` tensor, multiplied after the matmul (ggml_mul).
    pub extra_scale: Option<f32>,
}

impl I2sMatrix {
    /// The packed codes of all rows (without the trailing scale).
    pub fn codes<'a>(&self, file: &'a GgufFile) -> &'a [u8] {
        &file.tensor_data(&self.info)[..self.n_in * self.n_out / 4]
    }
}

/// A dense F16 or F32 matrix (`rows` rows of `n_in`), kept in the mmap.
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
        Self::from_gguf_with(file, c, FaultSet::default())
    }

    /// [`Weights::from_gguf`] with the loading faults of the bug zoo.
    pub fn from_gguf_with(
        file: &GgufFile,
        c: &ModelConfig,
        faults: FaultSet,
    ) -> Result<Weights, EngineError> {
        let token_embd = dense(file, TOKEN_EMBD, c.n_embd, c.n_vocab)?;
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
            let norm = |n: Norm| f32_vec(file, &n.name(l), n.len(c));
            let sub = |n: Norm| -> Result<Option<Vec<f32>>, EngineError> {
                if c.arch.has_sub_norms() {
                    norm(n).map(Some)
                } else {
                    Ok(None)
                }
            };
            let proj = |p: Proj| i2s(file, c, p, l, faults);
            let (gate, up) = if faults.has(Fault::SwapGateUp) {
                (Proj::Up, Proj::Gate) // the bug: two names mixed up at load
            } else {
                (Proj::Gate, Proj::Up)
            };
            let o = if faults.has(Fault::OProjPreviousLayer) && l > 0 {
                i2s(file, c, Proj::O, l - 1, faults)? // the bug: a layer index off by one
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

fn i2s(
    file: &GgufFile,
    c: &ModelConfig,
    p: Proj,
    layer: usize,
    faults: FaultSet,
) -> Result<I2sMatrix, EngineError> {
    let name = p.weight_name(layer);
    let info = tensor(file, &name)?;
    check_type(info, &[GgmlType::I2S])?;
    let (n_in, n_out) = p.shape(c);
    check_dims(info, &[n_in, n_out])?;
    if n_in % BLOCK != 0 {
        return Err(EngineError::RowLength { tensor: name, n_in });
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
    Ok(I2sMatrix {
        info: info.clone(),
        n_in,
        n_out,
        weight_scale,
        extra_scale,
    })
}
