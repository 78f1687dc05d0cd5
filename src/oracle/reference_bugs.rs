//! Known bugs of the reference's I2_S mat-vec, recognised by reproducing
//! them: when a projection's divergence is blamed on the reference, the
//! stage is recomputed from the reference's own input the way bitnet.cpp's
//! mul_mat computes it (the oracle's activation quantizer, which is
//! quantize_row_i8_s's arithmetic; the bytes mul_mat hands
//! `ggml_vec_dot_i2_i8_s` for each row; the kernel's 16-bit lanes; the f32
//! epilogue). If that reproduces the reference's output bit for bit and the
//! kernel's effects are what moved it, the receipt names the cause.
//! Evidence, not a guess: nothing is said unless the mirror matches exactly.
//!
//! The two effects (DESIGN.md, "I2_S and the int8 activations, exactly"):
//! - the 16-bit lane wrap over 4096-value groups (BitNet issue 629);
//! - a row length that is not a multiple of 128: mul_mat starts row `r` at
//!   byte `r·n_in/4` (`src0_row + ir0 * nb01 / 4`) and the kernel walks
//!   `n_in / 128` whole blocks from there, dropping each row's remainder;
//!   since I2_S blocks the flattened tensor, a row that starts inside a
//!   block is read as if it started one (bitnet_b1_58-3B: every odd
//!   ffn_down row).

use super::model::Ternary;
use super::ternary::quantize_activations;
use super::{Oracle, OracleInputs};
use crate::trace::Stage;

/// Values per I2_S block; blocks whose 16-bit sums the kernel keeps.
const BLOCK: usize = 128;
const WRAP_GROUP_BLOCKS: usize = 32;

impl Oracle {
    /// Why the reference's output of an I2_S stage is what it is, when a
    /// known bug of its mat-vec reproduces it exactly; `None` otherwise (a
    /// stage that is not a projection, a missing input, or no known bug
    /// explains it).
    pub fn explain_reference(
        &self,
        layer: Option<usize>,
        stage: Stage,
        inputs: &dyn OracleInputs,
        reference: &[f32],
    ) -> Option<String> {
        let l = layer?;
        let model = self.model();
        let sub_norms = model.math.sub_norms;
        let (stem, input) = match stage {
            Stage::QProj => ("attn_q", Stage::AttnNorm),
            Stage::KProj => ("attn_k", Stage::AttnNorm),
            Stage::VProj => ("attn_v", Stage::AttnNorm),
            Stage::OProj if sub_norms => ("attn_output", Stage::AttnSubNorm),
            Stage::OProj => ("attn_output", Stage::AttnOut),
            Stage::FfnGate => ("ffn_gate", Stage::FfnNorm),
            Stage::FfnUp => ("ffn_up", Stage::FfnNorm),
            Stage::FfnDown if sub_norms => ("ffn_down", Stage::FfnSubNorm),
            Stage::FfnDown => ("ffn_down", Stage::FfnMul),
            _ => return None,
        };
        let m = model.ternary(l, stem)?;
        let x = inputs.current(layer, input)?;
        if m.n_in == 0
            || !x.len().is_multiple_of(m.n_in)
            || reference.len() != x.len() / m.n_in * m.n_out
        {
            return None;
        }
        let mut wrapped = false;
        for (row_x, row_ref) in x.chunks_exact(m.n_in).zip(reference.chunks_exact(m.n_out)) {
            let (q, act_scale) = quantize_activations(row_x);
            let act_sum: i64 = q.iter().sum();
            for (r, &want) in row_ref.iter().enumerate() {
                let (sum, exact) = kernel_row_dot(&m, r, &q);
                wrapped |= sum != exact;
                // mul_mat's epilogue in f32, then ggml_mul by a `*.scale` tensor.
                let v = (sum as f32 - act_sum as f32) / act_scale * m.tensor_scale;
                if m.extra_scale.map_or(v, |s| v * s).to_bits() != want.to_bits() {
                    return None;
                }
            }
        }
        let mut causes = Vec::new();
        if !m.n_in.is_multiple_of(BLOCK) {
            causes.push(format!(
                "blk.{l}.{stem}.weight has rows of {n} values, not a multiple of 128: bitnet.cpp's \
                 mul_mat hands ggml_vec_dot_i2_i8_s each row from byte r*{n}/4 and the kernel walks \
                 only {blocks} whole 128-value blocks from there, so every row loses its last {rest} \
                 values and a row that starts inside a block (I2_S blocks the flattened tensor) is \
                 read as if it started one, pairing codes with the wrong activations",
                n = m.n_in,
                blocks = m.n_in / BLOCK,
                rest = m.n_in % BLOCK,
            ));
        }
        if wrapped {
            causes.push(
                "ggml_vec_dot_i2_i8_s keeps partial sums in 16-bit lanes for up to 4096 values \
                 and they wrapped (BitNet issue 629)"
                    .to_string(),
            );
        }
        if causes.is_empty() {
            return None;
        }
        Some(format!(
            "the reference's I2_S mat-vec reproduced bit for bit from its own input: {}",
            causes.join("; and ")
        ))
    }
}

/// `Σ code·q` for row `r` as the reference's AVX2 kernel computes it from
/// the bytes mul_mat gives it, and the same sum without the 16-bit wrap.
///
/// The kernel reads blocks of 32 bytes from byte `r·n_in/4`; value `i` of a
/// block is in byte `i % 32` at shift `6 − 2·(i / 32)` and meets activation
/// `q[block·128 + i]`. Per group of 32 blocks, 16 lanes of i16 each sum the
/// `maddubs` pairs at block positions `k·32 + 2l`, `k·32 + 2l + 1`
/// (k = 0..4), wrapping; the lanes are then widened and added.
fn kernel_row_dot(m: &Ternary<'_>, r: usize, q: &[i64]) -> (i64, i64) {
    let start = r * m.n_in / 4;
    let blocks = m.n_in / BLOCK;
    let code = |block: usize, i: usize| -> i64 {
        let byte = m.codes[start + block * 32 + i % 32];
        i64::from((byte >> (6 - 2 * (i / 32))) & 3)
    };
    let (mut wrapped, mut exact) = (0i64, 0i64);
    for group in (0..blocks).collect::<Vec<_>>().chunks(WRAP_GROUP_BLOCKS) {
        let mut lanes = [0i16; 16];
        for &b in group {
            for k in 0..4 {
                for (l, lane) in lanes.iter_mut().enumerate() {
                    let i = k * 32 + 2 * l;
                    let pair =
                        code(b, i) * q[b * BLOCK + i] + code(b, i + 1) * q[b * BLOCK + i + 1];
                    exact += pair;
                    *lane = lane.wrapping_add(pair as i16);
                }
            }
        }
        wrapped += lanes.iter().map(|&v| i64::from(v)).sum::<i64>();
    }
    (wrapped, exact)
}
