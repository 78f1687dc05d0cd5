//! Per-token int8 activation quantization (bitnet.cpp quantize_row_i8_s).
//!
//! Mirrors `quantize_row_i8_s` (ggml-quants.c): the absolute maximum is taken
//! in f64 with a 1e-5 floor, the scale is `127 / max` computed in f64 and
//! rounded once to f32, each code is `nearest_int(x * s)` with ties to even,
//! clamped to [-128, 127]; the row sum of the codes is kept for the I2_S
//! offset identity.
//!
//! The product is *not* rounded to f32 first. ggml builds with GCC's default
//! `-ffp-contract=fast` and `-march=native`, so on an FMA machine
//! `nearest_int`'s `x*s + 12582912.0f` compiles to one `vfmadd`: the exact
//! product is rounded once, to the nearest integer (checked by disassembling
//! `quantize_row_i8_s` in the built `libggml.a`). Rounding `x*s` to f32 first
//! flips a code whenever the f32 product lands on a .5 tie the exact product
//! does not — rarely, but enough to move an I2_S output (seen on the `small`
//! preset). An f32×f32 product is exact in f64, so rounding that f64 to the
//! nearest integer, ties to even, is the fused result bit for bit.

/// How a row is quantized. `Reference` is quantize_row_i8_s; the other
/// fields exist only to inject the bug-zoo faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActQuantVariant {
    /// `f32::round` (half away from zero) instead of ties to even.
    pub round_half_away: bool,
    /// Numerator of the scale: 127 in the reference.
    pub scale_numerator: u32,
}

impl ActQuantVariant {
    pub const REFERENCE: ActQuantVariant = ActQuantVariant {
        round_half_away: false,
        scale_numerator: 127,
    };
}

impl Default for ActQuantVariant {
    fn default() -> Self {
        Self::REFERENCE
    }
}

/// One quantized row: the codes' scale (`codes ≈ x * scale`) and their sum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActRow {
    pub scale: f32,
    pub sum: i32,
}

/// The activation scale of a row, exactly as quantize_row_i8_s computes it.
pub fn act_scale(x: &[f32], numerator: u32) -> f32 {
    let mut max = 1e-5f64;
    for &v in x {
        max = max.max((v as f64).abs());
    }
    (numerator as f64 / max) as f32
}

/// [`act_scale`] given the row's largest `|x|` (NaNs skipped), as a SIMD
/// maximum finds it: the same f64 floor and division.
pub fn act_scale_of_max(abs_max: f32, numerator: u32) -> f32 {
    (numerator as f64 / 1e-5f64.max(abs_max as f64)) as f32
}

/// Quantize one row into `out` (same length as `x`).
pub fn quantize_row_i8_s(x: &[f32], out: &mut [i8], variant: ActQuantVariant) -> ActRow {
    quantize_row_with_scale(x, out, act_scale(x, variant.scale_numerator), variant)
}

/// Quantize one row with a given scale (the codes of quantize_row_i8_s for
/// that scale). Only the bug zoo passes a scale that is not the row's own.
pub fn quantize_row_with_scale(
    x: &[f32],
    out: &mut [i8],
    scale: f32,
    variant: ActQuantVariant,
) -> ActRow {
    assert_eq!(x.len(), out.len());
    let mut sum = 0i32;
    for (o, &v) in out.iter_mut().zip(x) {
        // Exact product (f32×f32 fits an f64 mantissa), rounded once.
        let p = f64::from(v) * f64::from(scale);
        let q = if variant.round_half_away {
            p.round().clamp(-128.0, 127.0) as i32
        } else {
            nearest_int(p).clamp(-128, 127)
        };
        sum += q;
        *o = q as i8;
    }
    ActRow { scale, sum }
}

/// ggml's fused `nearest_int`: the integer nearest the exact product, ties
/// to even. |x·s| ≤ 128 by construction of the scale; a NaN input gives 0
/// here (the reference's code for NaN is arbitrary).
#[inline(always)]
fn nearest_int(p: f64) -> i32 {
    p.round_ties_even() as i32
}

/// Quantize a [T, n] matrix row by row.
pub fn quantize_rows(x: &[f32], n: usize, out: &mut [i8], variant: ActQuantVariant) -> Vec<ActRow> {
    assert_eq!(x.len(), out.len());
    assert!(n > 0 && x.len().is_multiple_of(n));
    x.chunks_exact(n)
        .zip(out.chunks_exact_mut(n))
        .map(|(xr, qr)| quantize_row_i8_s(xr, qr, variant))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_even() {
        // max 127 → scale 1.0 exactly; 2.5 rounds to 2, -0.5 to 0.
        let x = [127.0f32, 2.5, -0.5, 3.5];
        let mut q = [0i8; 4];
        let row = quantize_row_i8_s(&x, &mut q, ActQuantVariant::REFERENCE);
        assert_eq!(row.scale, 1.0);
        assert_eq!(q, [127, 2, 0, 4]);
        assert_eq!(row.sum, 133);
    }

    #[test]
    fn nearest_int_is_round_ties_even() {
        for i in -300_000..300_000 {
            let x = i as f32 / 1024.0;
            assert_eq!(nearest_int(f64::from(x)), x.round_ties_even() as i32, "{x}");
        }
    }

    #[test]
    fn zero_row_uses_floor() {
        let x = [0.0f32; 8];
        let mut q = [1i8; 8];
        let row = quantize_row_i8_s(&x, &mut q, ActQuantVariant::REFERENCE);
        assert_eq!(row.scale, (127.0f64 / 1e-5) as f32);
        assert_eq!(q, [0; 8]);
    }
}
