//! AVX-512 VNNI I2_S × int8 dot products (exact mode).
//!
//! `vpdpbusd` multiplies unsigned codes by signed activations and sums four
//! products straight into i32 lanes, so nothing can wrap. Two blocks are
//! handled per 512-bit register: the activations are first rearranged once
//! per call so that, for a block pair and sub-vector k, the 32 activations
//! of both blocks are contiguous. The reference-wrap mode has no 512-bit
//! equivalent worth having; it runs the AVX2 emulation.
// AVX-512 intrinsics need Rust 1.89; this file is only compiled into
// dispatch on CPUs that report the features at run time.
#![allow(clippy::incompatible_msrv)]

use super::avx2;
use super::scalar::{BLOCK, BLOCK_BYTES, DENSE_LANES};
use std::arch::x86_64::*;

pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
        && avx2::available()
}

/// Rearrange one token's activations for [`dot_pairs`]: for block pair p
/// and sub-vector k, bytes `[p*256 + k*64, +32)` are block 2p's values
/// `k*32..k*32+32` and the next 32 bytes block 2p+1's. A trailing odd block
/// is copied as is.
pub fn pair_layout(q: &[i8], out: &mut Vec<i8>) {
    out.clear();
    out.reserve(q.len());
    let nb = q.len() / BLOCK;
    for p in 0..nb / 2 {
        let (a, b) = (&q[2 * p * BLOCK..], &q[(2 * p + 1) * BLOCK..]);
        for k in 0..4 {
            out.extend_from_slice(&a[k * 32..k * 32 + 32]);
            out.extend_from_slice(&b[k * 32..k * 32 + 32]);
        }
    }
    if nb % 2 == 1 {
        out.extend_from_slice(&q[(nb - 1) * BLOCK..nb * BLOCK]);
    }
}

/// Exact `Σ code·q` of one row with `N` tokens at once, each of `qps` in
/// [`pair_layout`]: the codes are unpacked once per block pair and reused
/// for every token (prefill), which is what makes this compute-light.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI, and every `qps[t].len() ==
/// 4 * codes.len()` with `codes.len()` a multiple of 32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_pairs<const N: usize>(codes: &[u8], qps: [&[i8]; N]) -> [i32; N] {
    let nb = codes.len() / BLOCK_BYTES;
    // Sub-vector k's codes are masked in place, not shifted down: lane sums
    // of acc[t][k] are then exactly 4^(3-k) times Σ code·q, undone by an
    // exact arithmetic shift at the end (|lane| < 2^31 for any row under
    // 2^21 values). One accumulator per sub-vector and token: independent
    // vpdpbusd chains, so the loop is throughput- not latency-bound.
    let masks = [
        _mm512_set1_epi8(0xC0u8 as i8),
        _mm512_set1_epi8(0x30),
        _mm512_set1_epi8(0x0C),
        _mm512_set1_epi8(0x03),
    ];
    let mut acc = [[_mm512_setzero_si512(); 4]; N];
    for p in 0..nb / 2 {
        let at = codes.as_ptr().add(p * 2 * BLOCK_BYTES);
        // Prefetch hint only (never faults, even past the end).
        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH_BYTES) as *const i8);
        let x = _mm512_loadu_si512(at as *const _);
        let c = [
            _mm512_and_si512(x, masks[0]),
            _mm512_and_si512(x, masks[1]),
            _mm512_and_si512(x, masks[2]),
            _mm512_and_si512(x, masks[3]),
        ];
        for t in 0..N {
            let q = qps[t].as_ptr().add(p * 2 * BLOCK);
            for k in 0..4 {
                let qk = _mm512_loadu_si512(q.add(64 * k) as *const _);
                acc[t][k] = _mm512_dpbusd_epi32(acc[t][k], c[k], qk);
            }
        }
    }
    let mut sums = [0i32; N];
    for t in 0..N {
        sums[t] = unscale_sum(acc[t]);
        if nb % 2 == 1 {
            sums[t] = sums[t].wrapping_add(odd_block(codes, qps[t]));
        }
    }
    sums
}

/// [`dot_pairs`] for four rows and one token (decode): the activation
/// loads of each block pair are shared by the four rows.
///
/// # Safety
/// As [`dot_pairs`], for each of the four rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::needless_range_loop)] // r indexes rows and accumulators together
pub unsafe fn dot_pairs_4rows(codes: [&[u8]; 4], qp: &[i8]) -> [i32; 4] {
    let nb = codes[0].len() / BLOCK_BYTES;
    let masks = [
        _mm512_set1_epi8(0xC0u8 as i8),
        _mm512_set1_epi8(0x30),
        _mm512_set1_epi8(0x0C),
        _mm512_set1_epi8(0x03),
    ];
    let mut acc = [[_mm512_setzero_si512(); 4]; 4];
    for p in 0..nb / 2 {
        let q = qp.as_ptr().add(p * 2 * BLOCK);
        let qk = [
            _mm512_loadu_si512(q as *const _),
            _mm512_loadu_si512(q.add(64) as *const _),
            _mm512_loadu_si512(q.add(128) as *const _),
            _mm512_loadu_si512(q.add(192) as *const _),
        ];
        // The four rows are read abreast, which the hardware prefetcher
        // follows poorly; the group is contiguous, so fetch it into L2 as
        // one sequential stream, PREFETCH_AHEAD bytes on (a hint only:
        // never faults, even past the end of the matrix).
        let ahead = codes[0].as_ptr().wrapping_add(PREFETCH_AHEAD + p * 4 * 64);
        for j in 0..4 {
            _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(j * 64) as *const i8);
        }
        for r in 0..4 {
            let at = codes[r].as_ptr().add(p * 2 * BLOCK_BYTES);
            // Rows are read four abreast, which the hardware prefetcher
            // follows poorly: fetch the same spot of the rows
            // PREFETCH_ROWS further on (a hint only: never faults, even
            // past the end of the matrix).

            let x = _mm512_loadu_si512(at as *const _);
            for k in 0..4 {
                let c = _mm512_and_si512(x, masks[k]);
                acc[r][k] = _mm512_dpbusd_epi32(acc[r][k], c, qk[k]);
            }
        }
    }
    let mut sums = [0i32; 4];
    for r in 0..4 {
        sums[r] = unscale_sum(acc[r]);
        if nb % 2 == 1 {
            sums[r] = sums[r].wrapping_add(odd_block(codes[r], qp));
        }
    }
    sums
}

/// The codes and code sum of [`crate::quant::act::quantize_row_i8_s`]
/// (reference variant) for a row whose activation scale is `scale`: the
/// exact f64 product rounded once, ties to even, clamped to [-128, 127],
/// NaN products giving 0 as the scalar cast does. Bit for bit the same codes.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL, and `out.len() == x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_codes(x: &[f32], scale: f32, out: &mut [i8]) -> i32 {
    let n = x.len();
    let s = _mm512_set1_pd(scale as f64);
    let (lo, hi) = (_mm512_set1_pd(-128.0), _mm512_set1_pd(127.0));
    let mut sum = _mm512_setzero_si512();
    let mut i = 0;
    while i + 8 <= n {
        let p = _mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x.as_ptr().add(i))), s);
        let r = _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(p);
        let r = _mm512_min_pd(_mm512_max_pd(r, lo), hi);
        let nan = _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(p, p);
        let q = _mm512_maskz_cvtpd_epi32(!nan, r);
        sum = _mm512_add_epi32(sum, _mm512_zextsi256_si512(q));
        _mm_storel_epi64(
            out.as_mut_ptr().add(i) as *mut __m128i,
            _mm256_cvtsepi32_epi8(q),
        );
        i += 8;
    }
    let mut total = _mm512_reduce_add_epi32(sum);
    for j in i..n {
        let p = f64::from(x[j]) * f64::from(scale);
        let q = (p.round_ties_even() as i32).clamp(-128, 127);
        out[j] = q as i8;
        total += q;
    }
    total
}

/// [`dot_pairs`] for four rows and four tokens (prefill): the codes of a
/// block pair are shifted down to 0..3 (so every sub-vector adds into one
/// accumulator per row and token: 16 of them) and each activation load
/// serves four rows, which quarters the activation traffic per row.
///
/// # Safety
/// As [`dot_pairs`], for each of the four rows and tokens.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::needless_range_loop)] // r and t index rows, tokens and accumulators together
pub unsafe fn dot_pairs_tile(codes: [&[u8]; 4], qps: [&[i8]; 4]) -> [[i32; 4]; 4] {
    let nb = codes[0].len() / BLOCK_BYTES;
    let mask = _mm512_set1_epi8(3);
    let mut acc = [[_mm512_setzero_si512(); 4]; 4];
    for p in 0..nb / 2 {
        let x = [
            _mm512_loadu_si512(codes[0].as_ptr().add(p * 2 * BLOCK_BYTES) as *const _),
            _mm512_loadu_si512(codes[1].as_ptr().add(p * 2 * BLOCK_BYTES) as *const _),
            _mm512_loadu_si512(codes[2].as_ptr().add(p * 2 * BLOCK_BYTES) as *const _),
            _mm512_loadu_si512(codes[3].as_ptr().add(p * 2 * BLOCK_BYTES) as *const _),
        ];
        for k in 0..4 {
            let mut c = [_mm512_setzero_si512(); 4];
            for r in 0..4 {
                // Sub-vector k sits at bit shift 6 - 2k (16-bit shifts are
                // fine: the mask drops what crosses from the next byte).
                let shifted = match k {
                    0 => _mm512_srli_epi16::<6>(x[r]),
                    1 => _mm512_srli_epi16::<4>(x[r]),
                    2 => _mm512_srli_epi16::<2>(x[r]),
                    _ => x[r],
                };
                c[r] = _mm512_and_si512(shifted, mask);
            }
            for t in 0..4 {
                let q = _mm512_loadu_si512(qps[t].as_ptr().add(p * 2 * BLOCK + 64 * k) as *const _);
                for r in 0..4 {
                    acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], c[r], q);
                }
            }
        }
    }
    let mut sums = [[0i32; 4]; 4];
    for r in 0..4 {
        for t in 0..4 {
            sums[r][t] = _mm512_reduce_add_epi32(acc[r][t]);
            if nb % 2 == 1 {
                sums[r][t] = sums[r][t].wrapping_add(odd_block(codes[r], qps[t]));
            }
        }
    }
    sums
}

/// The sum of the four sub-vector accumulators of [`dot_pairs`], each
/// divided back by its code scale 4^(3-k) (exact shifts).
#[target_feature(enable = "avx512f")]
fn unscale_sum(acc: [__m512i; 4]) -> i32 {
    let a = _mm512_add_epi32(
        _mm512_add_epi32(
            _mm512_srai_epi32::<6>(acc[0]),
            _mm512_srai_epi32::<4>(acc[1]),
        ),
        _mm512_add_epi32(_mm512_srai_epi32::<2>(acc[2]), acc[3]),
    );
    _mm512_reduce_add_epi32(a)
}

/// `Σ code·q` of the last block of a row with an odd block count (pair
/// layout copies it as is).
///
/// # Safety
/// The CPU must support AVX-512 VL/VNNI; `codes` and `q` as in [`dot_pairs`]
/// with an odd number of blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn odd_block(codes: &[u8], q: &[i8]) -> i32 {
    let j = codes.len() / BLOCK_BYTES - 1;
    let mask = _mm256_set1_epi8(3);
    let x = _mm256_loadu_si256(codes.as_ptr().add(j * BLOCK_BYTES) as *const __m256i);
    let c0 = _mm256_and_si256(_mm256_srli_epi16::<6>(x), mask);
    let c1 = _mm256_and_si256(_mm256_srli_epi16::<4>(x), mask);
    let c2 = _mm256_and_si256(_mm256_srli_epi16::<2>(x), mask);
    let c3 = _mm256_and_si256(x, mask);
    let q = q.as_ptr().add(j * BLOCK);
    let mut a = _mm256_setzero_si256();
    a = _mm256_dpbusd_epi32(a, c0, _mm256_loadu_si256(q as *const __m256i));
    a = _mm256_dpbusd_epi32(a, c1, _mm256_loadu_si256(q.add(32) as *const __m256i));
    a = _mm256_dpbusd_epi32(a, c2, _mm256_loadu_si256(q.add(64) as *const __m256i));
    a = _mm256_dpbusd_epi32(a, c3, _mm256_loadu_si256(q.add(96) as *const __m256i));
    avx2::hsum_i32(a)
}

/// How far ahead of the current block pair the codes are prefetched.
const PREFETCH_BYTES: usize = 1024;

/// How far ahead [`dot_pairs_4rows`] prefetches into L2 (measured on a
/// matrix larger than L3: 8 KiB ahead streams about 1.5x faster than the
/// hardware prefetcher alone, 2 KiB and 32 KiB less so).
const PREFETCH_AHEAD: usize = 8192;

/// Tokens per pass of the prefill tile.
const TOKEN_TILE: usize = 4;

/// The matmul of [`super::Kernel::matmul`] with AVX-512 VNNI.
pub fn matmul(
    wrap: bool,
    w: &[u8],
    n_in: usize,
    rows: std::ops::Range<usize>,
    q: &[i8],
    out: &mut [i32],
) {
    if wrap {
        return avx2::matmul(wrap, w, n_in, rows, q, out);
    }
    assert!(available());
    assert!(
        n_in < 1 << 21,
        "row of {n_in} values could overflow the scaled lanes"
    );
    let row_bytes = n_in / 4;
    let n_tok = q.len() / n_in;
    // The rearranged activations start on a cache line, so no 64-byte load
    // of them splits one.
    let mut qp = Vec::new();
    let mut buf = vec![0i8; n_tok * n_in + 64];
    let skew = buf.as_ptr().align_offset(64).min(64);
    let layouts = &mut buf[skew..skew + n_tok * n_in];
    for (t, dst) in layouts.chunks_exact_mut(n_in).enumerate() {
        pair_layout(&q[t * n_in..(t + 1) * n_in], &mut qp);
        dst.copy_from_slice(&qp);
    }
    let tok = |t: usize| &layouts[t * n_in..(t + 1) * n_in];
    let row = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];
    let mut rows = rows;
    let mut out = out;
    while rows.len() >= 4 {
        let r = rows.start;
        let four = [row(r), row(r + 1), row(r + 2), row(r + 3)];
        if n_tok == 1 {
            // SAFETY: the features were checked above; each row is n_in/4
            // bytes and the token n_in values, n_in a multiple of 128.
            let s = unsafe { dot_pairs_4rows(four, tok(0)) };
            out[..4].copy_from_slice(&s);
        } else {
            let mut t = 0;
            while t + TOKEN_TILE <= n_tok {
                // SAFETY: as above, four rows and four tokens.
                let s =
                    unsafe { dot_pairs_tile(four, [tok(t), tok(t + 1), tok(t + 2), tok(t + 3)]) };
                for (i, si) in s.iter().enumerate() {
                    out[i * n_tok + t..i * n_tok + t + TOKEN_TILE].copy_from_slice(si);
                }
                t += TOKEN_TILE;
            }
            for (i, codes) in four.iter().enumerate() {
                for tt in t..n_tok {
                    // SAFETY: as above, one row and one token.
                    out[i * n_tok + tt] = unsafe { dot_pairs(codes, [tok(tt)]) }[0];
                }
            }
        }
        out = &mut out[4 * n_tok..];
        rows.start += 4;
    }
    for (ri, r) in rows.enumerate() {
        let codes = &w[r * row_bytes..(r + 1) * row_bytes];
        let out_row = &mut out[ri * n_tok..(ri + 1) * n_tok];
        let mut t = 0;
        while t + TOKEN_TILE <= n_tok {
            // SAFETY: the features were checked above; `codes` is n_in/4
            // bytes and each token n_in values (pair layout keeps the
            // length), n_in a multiple of 128, so every load is in bounds.
            let s = unsafe { dot_pairs(codes, [tok(t), tok(t + 1), tok(t + 2), tok(t + 3)]) };
            out_row[t..t + TOKEN_TILE].copy_from_slice(&s);
            t += TOKEN_TILE;
        }
        for (t, o) in out_row.iter_mut().enumerate().skip(t) {
            // SAFETY: as above, one token at a time.
            *o = unsafe { dot_pairs(codes, [tok(t)]) }[0];
        }
    }
}

/// [`dot_f16`] for `N` tokens at once: each 64-value slice of the row is
/// converted once and used for every token (prefill logits).
///
/// # Safety
/// The CPU must support AVX-512 F, and `row.len() == 2 * xs[t].len()` for all t.
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // r and t index lanes and tokens together
pub unsafe fn dot_f16_multi<const N: usize>(row: &[u8], xs: [&[f32]; N]) -> [f32; N] {
    let n = xs[0].len();
    let full = n / DENSE_LANES * DENSE_LANES;
    // acc[t][r] holds specification lanes 16r..16r+16 of token t.
    let mut acc = [[_mm512_setzero_ps(); 4]; N];
    let mut i = 0;
    while i < full {
        for r in 0..4 {
            let h = _mm256_loadu_si256(row.as_ptr().add(2 * (i + 16 * r)) as *const __m256i);
            let a = _mm512_cvtph_ps(h);
            for t in 0..N {
                let b = _mm512_loadu_ps(xs[t].as_ptr().add(i + 16 * r));
                acc[t][r] = _mm512_fmadd_ps(a, b, acc[t][r]);
            }
        }
        i += DENSE_LANES;
    }
    let mut out = [0f32; N];
    for t in 0..N {
        let mut lanes = [0f32; DENSE_LANES];
        for r in 0..4 {
            _mm512_storeu_ps(lanes.as_mut_ptr().add(16 * r), acc[t][r]);
        }
        for j in full..n {
            let v = half::f16::from_le_bytes([row[2 * j], row[2 * j + 1]]).to_f32();
            let lane = &mut lanes[j % DENSE_LANES];
            *lane = v.mul_add(xs[t][j], *lane);
        }
        out[t] = super::scalar::fold_lanes(lanes);
    }
    out
}

/// [`super::scalar::dot_f16`] of four consecutive rows (`rows` is 4 × 2n
/// bytes) with one `x`: each activation slice is loaded once for the four
/// rows (decode logits). The specification's lane fold is done in
/// registers (lane-wise adds in the same pairs, so the same bits).
///
/// # Safety
/// The CPU must support AVX-512 F, and `rows.len() == 8 * x.len()`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // r indexes rows and accumulators together
pub unsafe fn dot_f16_4rows(rows: &[u8], x: &[f32]) -> [f32; 4] {
    let n = x.len();
    let full = n / DENSE_LANES * DENSE_LANES;
    let row = |r: usize| rows.as_ptr().add(2 * n * r);
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let mut i = 0;
    while i < full {
        let xv = [
            _mm512_loadu_ps(x.as_ptr().add(i)),
            _mm512_loadu_ps(x.as_ptr().add(i + 16)),
            _mm512_loadu_ps(x.as_ptr().add(i + 32)),
            _mm512_loadu_ps(x.as_ptr().add(i + 48)),
        ];
        for r in 0..4 {
            let p = row(r).add(2 * i);
            // The same spot of the next four rows, into L2 (each row is a
            // long stream, but four abreast outrun the hardware prefetcher;
            // a hint only: never faults, even past the end).
            let ahead = p.wrapping_add(8 * n);
            _mm_prefetch::<_MM_HINT_T1>(ahead as *const i8);
            _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(64) as *const i8);
            for (k, a) in acc[r].iter_mut().enumerate() {
                let w = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32 * k) as *const __m256i));
                *a = _mm512_fmadd_ps(w, xv[k], *a);
            }
        }
        i += DENSE_LANES;
    }
    let mut out = [0f32; 4];
    for r in 0..4 {
        if full == n {
            out[r] = fold_registers(acc[r]);
            continue;
        }
        let mut lanes = [0f32; DENSE_LANES];
        for k in 0..4 {
            _mm512_storeu_ps(lanes.as_mut_ptr().add(16 * k), acc[r][k]);
        }
        let p = std::slice::from_raw_parts(row(r), 2 * n);
        for j in full..n {
            let v = half::f16::from_le_bytes([p[2 * j], p[2 * j + 1]]).to_f32();
            let lane = &mut lanes[j % DENSE_LANES];
            *lane = v.mul_add(x[j], *lane);
        }
        out[r] = super::scalar::fold_lanes(lanes);
    }
    out
}

/// [`super::scalar::dot_f16`] of four rows with four tokens each (prefill
/// logits), for rows a multiple of 64 values long: `out[r][t]`. The
/// specification's lanes are independent, so each of its four registers is
/// accumulated in its own pass over the row (16 accumulators: four rows
/// times four tokens); every converted row slice then serves four tokens
/// and every activation slice four rows, which keeps the activations of
/// the tile in L1. Same lanes, same order: the same bits.
///
/// # Safety
/// The CPU must support AVX-512 F; every row is `2 * n` bytes and every
/// token `n` values, `n` a multiple of 64.
#[target_feature(enable = "avx512f")]
#[allow(clippy::needless_range_loop)] // r and t index rows, tokens and accumulators together
pub unsafe fn dot_f16_tile(rows: [&[u8]; 4], xs: [&[f32]; 4]) -> [[f32; 4]; 4] {
    let n = xs[0].len();
    let mut regs = [[[_mm512_setzero_ps(); 4]; 4]; 4];
    for k in 0..4 {
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let mut i = 16 * k;
        while i < n {
            let w = [
                _mm512_cvtph_ps(_mm256_loadu_si256(
                    rows[0].as_ptr().add(2 * i) as *const __m256i
                )),
                _mm512_cvtph_ps(_mm256_loadu_si256(
                    rows[1].as_ptr().add(2 * i) as *const __m256i
                )),
                _mm512_cvtph_ps(_mm256_loadu_si256(
                    rows[2].as_ptr().add(2 * i) as *const __m256i
                )),
                _mm512_cvtph_ps(_mm256_loadu_si256(
                    rows[3].as_ptr().add(2 * i) as *const __m256i
                )),
            ];
            for t in 0..4 {
                let x = _mm512_loadu_ps(xs[t].as_ptr().add(i));
                for r in 0..4 {
                    acc[r][t] = _mm512_fmadd_ps(w[r], x, acc[r][t]);
                }
            }
            i += DENSE_LANES;
        }
        for r in 0..4 {
            for t in 0..4 {
                regs[r][t][k] = acc[r][t];
            }
        }
    }
    let mut out = [[0f32; 4]; 4];
    for r in 0..4 {
        for t in 0..4 {
            out[r][t] = fold_registers(regs[r][t]);
        }
    }
    out
}

/// [`super::scalar::fold_lanes`] of the 64 lanes held as four registers
/// (lanes 16k..16k+16 in register k): `acc[l] += acc[l + w]` for w = 32,
/// 16, 8, 4, 2, 1, each step lane-wise in registers.
#[target_feature(enable = "avx512f")]
fn fold_registers(acc: [__m512; 4]) -> f32 {
    let a = _mm512_add_ps(acc[0], acc[2]); // w = 32: lanes 0..16
    let b = _mm512_add_ps(acc[1], acc[3]); // w = 32: lanes 16..32
    let c = _mm512_add_ps(a, b); // w = 16
    let d = _mm256_add_ps(
        _mm512_castps512_ps256(c),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(c))),
    ); // w = 8
    avx2::fold8(d) // w = 4, 2, 1
}

/// [`super::scalar::dot_f16`] with `vcvtph2ps`: the specification's 64
/// lanes as four registers, a fused multiply-add each, the same fold.
/// Bit-identical to the specification.
///
/// # Safety
/// The CPU must support AVX-512 F, and `row.len() == 2 * x.len()`.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    dot_f16_multi(row, [x])[0]
}

/// [`super::scalar::xor_fold`] with four 512-bit accumulators: 256 bytes a
/// step in independent loads. The same bits as the specification.
///
/// # Safety
/// The CPU must support AVX-512 F.
#[target_feature(enable = "avx512f")]
pub unsafe fn xor_fold(words: &[u64]) -> u64 {
    let mut acc = [_mm512_setzero_si512(); 4];
    let mut chunks = words.chunks_exact(32);
    for chunk in &mut chunks {
        let p = chunk.as_ptr() as *const __m512i;
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm512_xor_si512(*a, _mm512_loadu_si512(p.add(k)));
        }
    }
    let v = _mm512_xor_si512(
        _mm512_xor_si512(acc[0], acc[1]),
        _mm512_xor_si512(acc[2], acc[3]),
    );
    let mut lanes = [0u64; 8];
    _mm512_storeu_si512(lanes.as_mut_ptr() as *mut __m512i, v);
    lanes
        .iter()
        .chain(chunks.remainder())
        .fold(0, |acc, &w| acc ^ w)
}
