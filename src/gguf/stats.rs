//! Per-tensor statistics: the numbers that settle "are the weights sane?".

use super::{GgmlType, GgufFile, TensorInfo};
use crate::quant::i2s;
use serde::Serialize;

/// Statistics of one tensor's values.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TensorStats {
    /// F32/F16: moments over the finite values, plus counts of the others.
    Float {
        /// All elements, the non-finite ones included.
        count: u64,
        /// Mean of the finite values (0 if there are none).
        mean: f64,
        /// Population standard deviation of the finite values.
        std: f64,
        /// Smallest finite value; NaN if there are none.
        min: f64,
        /// Largest finite value; NaN if there are none.
        max: f64,
        /// Number of NaN elements.
        nan: u64,
        /// Number of infinite elements, of either sign.
        inf: u64,
    },
    /// I2_S: fraction of each code and the tensor scale. `invalid` counts
    /// code 3, which no writer should produce.
    Ternary {
        /// Number of elements.
        count: u64,
        /// Fraction of elements with code 0 (weight -1).
        minus_one: f64,
        /// Fraction of elements with code 1 (weight 0).
        zero: f64,
        /// Fraction of elements with code 2 (weight +1).
        plus_one: f64,
        /// Number of elements with code 3.
        invalid: u64,
        /// The per-tensor f32 scale stored after the codes.
        scale: f32,
    },
}

/// Statistics for F32, F16 and I2_S tensors; `None` for other types.
pub fn tensor_stats(file: &GgufFile, t: &TensorInfo) -> Option<TensorStats> {
    let data = file.tensor_data(t);
    let n = usize::try_from(t.n_elements()).ok()?;
    match t.ty {
        GgmlType::F32 => {
            Some(float_stats(data.chunks_exact(4).map(|c| {
                f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64
            })))
        }
        GgmlType::F16 => Some(float_stats(
            data.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()),
        )),
        GgmlType::I2S => {
            if data.len() < i2s::packed_len(n) {
                return None;
            }
            let mut counts = [0u64; 4];
            for &byte in &data[..n / 4] {
                for shift in [6, 4, 2, 0] {
                    counts[((byte >> shift) & 3) as usize] += 1;
                }
            }
            let total = (n as f64).max(1.0);
            Some(TensorStats::Ternary {
                count: n as u64,
                minus_one: counts[0] as f64 / total,
                zero: counts[1] as f64 / total,
                plus_one: counts[2] as f64 / total,
                invalid: counts[3],
                scale: i2s::scale(data, n),
            })
        }
        GgmlType::Q8_0 | GgmlType::I8 => None,
    }
}

/// NaN and Inf counts of an F32/F16 tensor, from the bit patterns alone
/// (exponent all ones; a zero mantissa is Inf). A cheap check that every run
/// can afford on a full-size model; `None` for other types.
pub fn count_non_finite(file: &GgufFile, t: &TensorInfo) -> Option<(u64, u64)> {
    let data = file.tensor_data(t);
    // Counts over the raw bits (an exponent of all ones is non-finite; a
    // zero mantissa then means infinity). Tensor data is aligned, so the
    // bytes are read as words and the loop vectorises: the scan of a
    // 128k-row embedding runs at memory speed.
    fn count<W: bytemuck::Pod + Into<u32>>(words: &[W], exp: u32, mant: u32) -> (u64, u64) {
        let (mut non_finite, mut inf) = (0u64, 0u64);
        for &w in words {
            let bits: u32 = w.into();
            let special = bits & exp == exp;
            non_finite += u64::from(special);
            inf += u64::from(special & (bits & mant == 0));
        }
        (non_finite - inf, inf)
    }
    fn words<W: bytemuck::Pod>(data: &[u8]) -> std::borrow::Cow<'_, [W]> {
        let usable = data.len() - data.len() % std::mem::size_of::<W>();
        match bytemuck::try_cast_slice(&data[..usable]) {
            Ok(w) => std::borrow::Cow::Borrowed(w),
            // Only an in-memory file could be unaligned: copy it.
            Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(&data[..usable])),
        }
    }
    match t.ty {
        GgmlType::F32 => Some(count::<u32>(&words(data), 0x7f80_0000, 0x007f_ffff)),
        GgmlType::F16 => Some(count::<u16>(&words(data), 0x7c00, 0x03ff)),
        _ => None,
    }
}

fn float_stats(values: impl Iterator<Item = f64>) -> TensorStats {
    let (mut count, mut nan, mut inf) = (0u64, 0u64, 0u64);
    let (mut sum, mut sum_sq) = (0f64, 0f64);
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in values {
        if x.is_nan() {
            nan += 1;
        } else if x.is_infinite() {
            inf += 1;
        } else {
            count += 1;
            sum += x;
            sum_sq += x * x;
            min = min.min(x);
            max = max.max(x);
        }
    }
    let finite = (count as f64).max(1.0);
    let mean = sum / finite;
    let std = (sum_sq / finite - mean * mean).max(0.0).sqrt();
    if count == 0 {
        (min, max) = (f64::NAN, f64::NAN);
    }
    TensorStats::Float {
        count: count + nan + inf,
        mean,
        std,
        min,
        max,
        nan,
        inf,
    }
}
