//! Known bugs of the reference's I2_S mat-vec, recognised by reproducing
//! them: when a projection's divergence is blamed on the reference, the
//! stage is recomputed from the reference's own input the way bitnet.cpp's
//! mul_mat computes it (its quantizer, the bytes it hands
//! `ggml_vec_dot_i2_i8_s` per row, the kernel's 16-bit lanes). If that
//! reproduces the reference's output bit for bit, and the kernel's effects
//! are what moved it, the receipt names the cause. Evidence, not a guess:
//! nothing is said unless the mirror matches exactly.
//!
//! The two effects (DESIGN.md, "I2_S and the int8 activations, exactly"):
//! - the 16-bit lane wrap over 4096-value groups (BitNet issue 629);
//! - a row length that is not a multiple of 128: the kernel walks
//!   `n_in / 128` whole blocks from byte `r·n_in/4`, dropping each row's
//!   remainder, and a row that starts inside a block is read as if it
//!   started one (see [`super::weights::realign_rows`]).

use super::config::Proj;
use super::kernels::scalar::{dot_exact, dot_reference_wrap, BLOCK};
use super::oracle::OracleInputs;
use super::weights::{realign_rows, I2sMatrix};
use super::{Engine, I2sMode};
use crate::quant::act::{quantize_row_i8_s, ActQuantVariant};
use crate::trace::Stage;

/// The projection a stage is the output of, and the stage that feeds it.
fn projection(stage: Stage, sub_norms: bool) -> Option<(Proj, Stage)> {
    Some(match stage {
        Stage::QProj => (Proj::Q, Stage::AttnNorm),
        Stage::KProj => (Proj::K, Stage::AttnNorm),
        Stage::VProj => (Proj::V, Stage::AttnNorm),
        Stage::OProj if sub_norms => (Proj::O, Stage::AttnSubNorm),
        Stage::OProj => (Proj::O, Stage::AttnOut),
        Stage::FfnGate => (Proj::Gate, Stage::FfnNorm),
        Stage::FfnUp => (Proj::Up, Stage::FfnNorm),
        Stage::FfnDown if sub_norms => (Proj::Down, Stage::FfnSubNorm),
        Stage::FfnDown => (Proj::Down, Stage::FfnMul),
        _ => return None,
    })
}

/// Why the reference's output of an I2_S stage is what it is, when a known
/// bug of its mat-vec reproduces it exactly; `None` otherwise (a stage that
/// is not a projection, a missing input, or no known bug explains it).
pub fn explain(
    engine: &Engine,
    layer: Option<usize>,
    stage: Stage,
    inputs: &dyn OracleInputs,
    reference: &[f32],
) -> Option<String> {
    let c = engine.config();
    let (proj, input) = projection(stage, c.arch.has_sub_norms())?;
    let m = engine.weights().layers.get(layer?)?.proj(proj);
    let x = inputs.current(layer, input)?;
    let mirror = Mirror::new(engine, m);
    let t = x.len() / m.n_in;
    if x.len() != t * m.n_in || reference.len() != t * m.n_out {
        return None;
    }
    let mut wrapped = false;
    let mut q = vec![0i8; m.row_len()];
    for (row_x, row_ref) in x.chunks_exact(m.n_in).zip(reference.chunks_exact(m.n_out)) {
        let act = quantize_row_i8_s(row_x, &mut q[..m.n_in], ActQuantVariant::REFERENCE);
        for (r, &want) in row_ref.iter().enumerate() {
            let codes = mirror.row(r);
            let sum = dot_reference_wrap(codes, &q);
            wrapped |= sum != dot_exact(codes, &q);
            let v = (sum as f32 - act.sum as f32) / act.scale * m.weight_scale;
            if m.extra_scale.map_or(v, |s| v * s).to_bits() != want.to_bits() {
                return None;
            }
        }
    }
    let tensor = proj.weight_name(layer?);
    let mut causes = Vec::new();
    if !m.n_in.is_multiple_of(BLOCK) {
        causes.push(format!(
            "{tensor} has rows of {n} values, not a multiple of 128: bitnet.cpp's mul_mat hands \
             ggml_vec_dot_i2_i8_s each row from byte r*{n}/4 and the kernel walks only {blocks} whole \
             128-value blocks from there, so every row loses its last {rest} values and a row that \
             starts inside a block (I2_S blocks the flattened tensor) is read as if it started one, \
             pairing codes with the wrong activations",
            n = m.n_in,
            blocks = m.n_in / BLOCK,
            rest = m.n_in % BLOCK,
        ));
    }
    if wrapped {
        causes.push(
            "ggml_vec_dot_i2_i8_s keeps partial sums in 16-bit lanes for up to 4096 values and \
             they wrapped (BitNet issue 629)"
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

/// The rows of a matrix as the reference's kernel reads them.
struct Mirror<'a> {
    bytes: std::borrow::Cow<'a, [u8]>,
    row_bytes: usize,
}

impl<'a> Mirror<'a> {
    fn new(engine: &'a Engine, m: &'a I2sMatrix) -> Mirror<'a> {
        let flat = m.codes(engine.file());
        let bytes = if m.n_in.is_multiple_of(BLOCK) {
            flat.into()
        } else {
            realign_rows(flat, m.n_in, m.n_out, I2sMode::ReferenceWrap).into()
        };
        Mirror {
            bytes,
            row_bytes: m.row_len() / 4,
        }
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.bytes[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}
