//! The exact I2_S products: int8 activation codes and ternary weights are
//! integers, so the oracle reproduces a projection exactly from a side's own
//! f32 input, and the only freedom an honest engine has is the f32 epilogue
//! (`Σ / act_scale · weight_scale`) and, rarely, one activation code.
//!
//! The code of `x` is the integer nearest the exact product `x·s`, ties to
//! even (bitnet.cpp's `quantize_row_i8_s`, where GCC fuses the product into
//! the rounding). An engine that rounds `x·s` to f32 first gets another code
//! only when that f32 rounding lands on or across a .5 boundary the exact
//! product does not: both codes are then honest. Those codes are the
//! stage's *ties*: the oracle takes the fused one, counts them, and offers
//! the other as an [`Alternative`] the judge may apply to the token row it
//! moves (the judge takes it when it brings the side closer).
//!
//! The integer product runs through the engine's kernels (`Kernel::matmul`,
//! proven equal to the scalar specification by the property tests): the
//! oracle quantizes with its own code and reads the weights from the file
//! itself, so what it shares with the candidate is an integer sum, not a
//! rounding or a loading decision.

use super::model::Ternary;
use super::{OracleStage, U};
use crate::engine::kernels::Kernel;
use crate::quant::i2s;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Values per I2_S block.
const BLOCK: usize = i2s::BLOCK;
/// Ties recorded as alternatives per stage; more are folded into the
/// rounding scale of the rows they touch (never seen on real activations).
const MAX_ALTERNATIVES: usize = 256;
/// Tokens whose epilogue one task computes (16 sums fill a cache line).
const TOKEN_BLOCK: usize = 16;

/// Another honest value of one token row: the output if one tied
/// activation code had rounded the other way.
#[derive(Clone, Debug, PartialEq)]
pub struct Alternative {
    /// The token row (outermost index of the stage's layout).
    pub row: usize,
    /// What the row's values move by, one per output column.
    pub delta: Vec<f64>,
}

/// One row's int8 codes as the format defines them, with their scale, and
/// the ties: (column, the other code − this code).
struct Codes {
    q: Vec<i8>,
    scale: f32,
    sum: i64,
    ties: Vec<(usize, i8)>,
}

/// BitNet b1.58's per-token absmax int8 quantization: the scale 127/max
/// (max floored at 1e-5, in f64) kept as the f32 the format stores, each code
/// the integer nearest the exact product x·scale (ties to even), clamped to
/// [-128, 127]; and where rounding the product to f32 first would give
/// another code, that code as a tie.
fn quantize(row: &[f32]) -> Codes {
    let max = row.iter().fold(1e-5f64, |m, &v| m.max(f64::from(v).abs()));
    let scale = (127.0 / max) as f32;
    let s = f64::from(scale);
    // The fused codes, in a loop without branches (see `code`).
    let q: Vec<i8> = row.iter().map(|&v| code(f64::from(v) * s) as i8).collect();
    let sum = q.iter().map(|&c| i64::from(c)).sum();
    // Where rounding the product to f32 first gives another code.
    let ties = row
        .iter()
        .zip(&q)
        .enumerate()
        .filter_map(|(j, (&v, &c))| {
            let other = code(f64::from((f64::from(v) * s) as f32));
            (other != f64::from(c)).then(|| (j, (other - f64::from(c)) as i8))
        })
        .collect();
    Codes {
        q,
        scale,
        sum,
        ties,
    }
}

/// The code of a product: `exact.round_ties_even()` clamped to [-128,
/// 127], without the libm call `round_ties_even` compiles to on baseline
/// x86-64 and without a branch. Clamping to [-129, 128] first changes no
/// code and keeps |v| < 2⁵¹, where adding and subtracting 1.5·2⁵² rounds to
/// an integer in the current (nearest-even) mode (a negative value that
/// rounds to zero gives +0, not −0: the same code). NaN stays NaN (code 0
/// once cast, as before).
fn code(exact: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52
    ((exact.clamp(-129.0, 128.0) + MAGIC) - MAGIC).clamp(-128.0, 127.0)
}

/// The activation codes of `x` as [`quantize`] makes them, for the reference
/// bug recogniser (i64 codes and the f32 scale).
pub(super) fn quantize_activations(row: &[f32]) -> (Vec<i64>, f32) {
    let c = quantize(row);
    (c.q.iter().map(|&v| i64::from(v)).collect(), c.scale)
}

/// The packed codes of `m` with every row starting a 128-value block, as
/// `Kernel::matmul` reads them: the file's own bytes when rows are whole
/// blocks, else a copy with each row padded by code 1 (weight 0) to the next
/// block (the padding meets activation 0).
pub(super) fn aligned_codes(m: &Ternary<'_>) -> (Arc<Vec<u8>>, usize) {
    let padded = m.n_in.next_multiple_of(BLOCK);
    let mut bytes = vec![0u8; m.n_out * padded / 4];
    bytes
        .par_chunks_mut(padded / 4)
        .enumerate()
        .for_each(|(r, row)| {
            for j in 0..padded {
                let code = if j < m.n_in {
                    i2s::code_at(m.codes, r * m.n_in + j)
                } else {
                    1
                };
                row[(j / BLOCK) * (BLOCK / 4) + j % (BLOCK / 4)] |=
                    code << (6 - 2 * ((j % BLOCK) / (BLOCK / 4)));
            }
        });
    (Arc::new(bytes), padded)
}

/// The last inputs the oracle quantized (one per side, judged one after
/// the other), with their codes: the projections that read one input (Q,
/// K and V; gate and up) share them.
#[derive(Default)]
pub(super) struct ProductMemo {
    inputs: Vec<(Vec<f32>, usize, Arc<Vec<Codes>>)>,
}

/// Inputs remembered: one per side.
const INPUTS_KEPT: usize = 2;

impl ProductMemo {
    /// The codes of `x` in rows of `n_in`, quantized now or remembered.
    fn codes(memo: &Mutex<ProductMemo>, x: &[f32], n_in: usize) -> Arc<Vec<Codes>> {
        let lock = || memo.lock().unwrap_or_else(|e| e.into_inner());
        let known = lock()
            .inputs
            .iter()
            .find(|(input, n, _)| *n == n_in && bits_equal(input, x))
            .map(|(_, _, codes)| codes.clone());
        if let Some(codes) = known {
            return codes;
        }
        let codes: Arc<Vec<Codes>> = Arc::new(x.par_chunks(n_in).map(quantize).collect());
        let mut memo = lock();
        if memo.inputs.len() == INPUTS_KEPT {
            memo.inputs.remove(0);
        }
        memo.inputs.push((x.to_vec(), n_in, codes.clone()));
        codes
    }
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// `Σ code·q` of every row of `packed` with every token of `codes`
/// (`[r * t + ti]`), rows split across threads: exact integer sums on
/// every path, so the fastest kernel whatever is forced.
fn integer_products(
    packed: &[u8],
    padded: usize,
    n_out: usize,
    codes: &[Codes],
    n_in: usize,
) -> Vec<i32> {
    let t = codes.len();
    // Codes of every token, each row padded with zero activations.
    let mut q = vec![0i8; t * padded];
    for (dst, c) in q.chunks_exact_mut(padded).zip(codes) {
        dst[..n_in].copy_from_slice(&c.q);
    }
    let kernel = Kernel::fastest();
    let mut sums = vec![0i32; n_out * t];
    let rows_per_task = (n_out / (4 * rayon::current_num_threads()).max(1)).max(16);
    sums.par_chunks_mut(rows_per_task * t)
        .enumerate()
        .for_each(|(i, out)| {
            let start = i * rows_per_task;
            let rows = start..start + out.len() / t;
            kernel.matmul(false, packed, padded, rows, &q, out);
        });
    sums
}

/// `x` ([T, n_in]) through the projection `m`: exact integer products,
/// the f64 epilogue `Σ (code − 1)·q / act_scale · tensor_scale (· extra)`,
/// and per value the rounding scale of an f32 epilogue. `packed` holds the
/// rows block-aligned (`aligned_codes`, or the file's bytes when n_in is a
/// multiple of 128) with `padded` values a row. `memo` (the oracle's)
/// gives back the codes of an input quantized just before.
pub(super) fn linear(
    m: &Ternary<'_>,
    packed: &[u8],
    padded: usize,
    x: &[f32],
    memo: &Mutex<ProductMemo>,
) -> Result<OracleStage, String> {
    if m.n_in == 0 || !x.len().is_multiple_of(m.n_in) {
        return Err(format!(
            "an input of {} values does not fill rows of {}",
            x.len(),
            m.n_in
        ));
    }
    let t = x.len() / m.n_in;
    let codes = ProductMemo::codes(memo, x, m.n_in);
    let sums = integer_products(packed, padded, m.n_out, &codes, m.n_in);
    let tensor_scale = f64::from(m.tensor_scale);
    let extra = m.extra_scale.map_or(1.0, f64::from);
    let mut values = vec![0f64; t * m.n_out];
    let mut rounding = vec![0f64; t * m.n_out];
    let unit_of = |c: &Codes| tensor_scale * extra / f64::from(c.scale);
    // Tokens in blocks of TOKEN_BLOCK: the sums are [r * t + ti], so a
    // block reads each row's sums of its tokens from one cache line.
    values
        .par_chunks_mut(TOKEN_BLOCK * m.n_out)
        .zip(rounding.par_chunks_mut(TOKEN_BLOCK * m.n_out))
        .zip(codes.par_chunks(TOKEN_BLOCK))
        .enumerate()
        .for_each(|(b, ((values, rounding), block))| {
            let t0 = b * TOKEN_BLOCK;
            // The epilogue's roundings (the conversion, the division, the
            // products) and, for an engine that subtracts the offset Σq
            // after scaling, the cancellation of that term.
            let epilogue: Vec<(i64, f64, f64)> = block
                .iter()
                .map(|c| {
                    let unit = unit_of(c);
                    (c.sum, unit, U * (c.sum as f64).abs() * unit.abs())
                })
                .collect();
            for r in 0..m.n_out {
                let row = &sums[r * t + t0..r * t + t0 + block.len()];
                for (k, (&sum, &(offset_sum, unit, offset))) in
                    row.iter().zip(&epilogue).enumerate()
                {
                    let v = (i64::from(sum) - offset_sum) as f64 * unit;
                    values[k * m.n_out + r] = v;
                    rounding[k * m.n_out + r] = 4.0 * U * v.abs() + offset;
                }
            }
        });
    // Ties: the first MAX_ALTERNATIVES offered one by one (their deltas, a
    // weight column each, computed in parallel), the rest folded into the
    // rounding scale of their rows.
    let mut offered = Vec::new();
    let mut ties = 0usize;
    for (ti, c) in codes.iter().enumerate() {
        let unit = unit_of(c);
        for &(j, dq) in &c.ties {
            ties += 1;
            if offered.len() < MAX_ALTERNATIVES {
                offered.push((ti, j, dq, unit));
            } else {
                // Too many to offer one by one: the row may move by a step.
                for rd in &mut rounding[ti * m.n_out..(ti + 1) * m.n_out] {
                    *rd += unit.abs();
                }
            }
        }
    }
    let alternatives = offered
        .par_iter()
        .map(|&(row, j, dq, unit)| Alternative {
            row,
            delta: (0..m.n_out)
                .map(|r| f64::from(dq) * m.weight(r, j) as f64 * unit)
                .collect(),
        })
        .collect();
    Ok(OracleStage {
        values,
        rounding,
        ties,
        alternatives,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_product_that_rounds_onto_a_half_in_f32_is_a_tie() {
        // max = 127 so scale = 1: the product is x itself, no tie possible.
        let (q, s) = quantize_activations(&[127.0, 2.5, -3.5]);
        assert_eq!((q, s), (vec![127, 2, -4], 1.0));
        // scale 127/max with max = 1.1: find an x whose exact product is
        // just above k + 0.5 but rounds to k + 0.5 in f32 (then ties to even
        // picks k): the fused code is k + 1, the unfused one k.
        let scale = (127.0f64 / f64::from(1.1f32)) as f32;
        let mut found = None;
        let mut x = 0.2f32;
        for _ in 0..2_000_000 {
            x = f32::from_bits(x.to_bits() + 1);
            let p = f64::from(x) * f64::from(scale);
            let f = p as f32;
            if f64::from(f).fract() == 0.5 && p != f64::from(f) {
                found = Some(x);
                break;
            }
        }
        let x = found.expect("such an x exists near 0.2");
        let c = quantize(&[1.1, x]);
        assert_eq!(c.scale, scale);
        assert_eq!(c.ties.len(), 1, "{x}");
        let (j, dq) = c.ties[0];
        assert_eq!(j, 1);
        assert_eq!(dq.abs(), 1);
    }

    #[test]
    fn code_is_round_ties_even_clamped() {
        let check = |x: f64| {
            let c = code(x);
            let want = x.round_ties_even().clamp(-128.0, 127.0);
            assert!(
                c == want || (c.is_nan() && want.is_nan()),
                "{x}: {c} vs {want}"
            );
        };
        let mut v = -300.0f64;
        while v < 300.0 {
            for x in [
                v,
                v + 0.5,
                v - 0.5,
                v + 1e-9,
                v - 1e-9,
                -0.0,
                0.49999999999999994,
            ] {
                // Equal as numbers (the sign of a zero code does not matter).
                check(x);
            }
            v += 0.25;
        }
        for x in [
            f64::NAN,
            f64::INFINITY,
            -f64::INFINITY,
            3e51,
            -4.5e15,
            4503599627370497.0,
        ] {
            check(x);
        }
    }

    #[test]
    fn quantize_is_the_plain_loop() {
        // The definition, element by element, with the library rounding.
        let plain = |row: &[f32]| {
            let max = row.iter().fold(1e-5f64, |m, &v| m.max(f64::from(v).abs()));
            let s = f64::from((127.0 / max) as f32);
            let (mut q, mut ties, mut sum) = (vec![], vec![], 0i64);
            for (j, &v) in row.iter().enumerate() {
                let exact = f64::from(v) * s;
                let fused = exact.round_ties_even().clamp(-128.0, 127.0);
                let unfused = f64::from(exact as f32)
                    .round_ties_even()
                    .clamp(-128.0, 127.0);
                if fused != unfused {
                    ties.push((j, (unfused - fused) as i8));
                }
                q.push(fused as i8);
                sum += fused as i64;
            }
            (q, ties, sum)
        };
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for case in 0..300 {
            let row: Vec<f32> = (0..1 + case % 97)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    match state % 50 {
                        0 => f32::NAN,
                        1 => f32::INFINITY,
                        2 => -0.0,
                        3 => f32::from_bits(state as u32 >> 1),
                        _ => ((state >> 20) % 100_000) as f32 * 1e-3 - 50.0,
                    }
                })
                .collect();
            let c = quantize(&row);
            assert_eq!((c.q, c.ties, c.sum), plain(&row), "{row:?}");
        }
    }

    #[test]
    fn exact_ties_are_not_ambiguous() {
        // x·s = 2.5 exactly in both f32 and f64: ties to even, one answer.
        let c = quantize(&[127.0, 2.5, 4.5]);
        assert!(c.ties.is_empty());
        assert_eq!(c.q, vec![127, 2, 4]);
    }
}
