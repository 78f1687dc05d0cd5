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
        let a = _mm512_add_epi32(
            _mm512_add_epi32(
                _mm512_srai_epi32::<6>(acc[t][0]),
                _mm512_srai_epi32::<4>(acc[t][1]),
            ),
            _mm512_add_epi32(_mm512_srai_epi32::<2>(acc[t][2]), acc[t][3]),
        );
        sums[t] = _mm512_reduce_add_epi32(a);
    }
    if nb % 2 == 1 {
        let j = nb - 1;
        let mask = _mm256_set1_epi8(3);
        let x = _mm256_loadu_si256(codes.as_ptr().add(j * BLOCK_BYTES) as *const __m256i);
        let c0 = _mm256_and_si256(_mm256_srli_epi16::<6>(x), mask);
        let c1 = _mm256_and_si256(_mm256_srli_epi16::<4>(x), mask);
        let c2 = _mm256_and_si256(_mm256_srli_epi16::<2>(x), mask);
        let c3 = _mm256_and_si256(x, mask);
        for t in 0..N {
            let q = qps[t].as_ptr().add(j * BLOCK);
            let mut a = _mm256_setzero_si256();
            a = _mm256_dpbusd_epi32(a, c0, _mm256_loadu_si256(q as *const __m256i));
            a = _mm256_dpbusd_epi32(a, c1, _mm256_loadu_si256(q.add(32) as *const __m256i));
            a = _mm256_dpbusd_epi32(a, c2, _mm256_loadu_si256(q.add(64) as *const __m256i));
            a = _mm256_dpbusd_epi32(a, c3, _mm256_loadu_si256(q.add(96) as *const __m256i));
            sums[t] = sums[t].wrapping_add(avx2::hsum_i32(a));
        }
    }
    sums
}

/// How far ahead of the current block pair the codes are prefetched.
const PREFETCH_BYTES: usize = 1024;

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
    let mut qp = Vec::new();
    let mut layouts = Vec::with_capacity(n_tok * n_in);
    for t in 0..n_tok {
        pair_layout(&q[t * n_in..(t + 1) * n_in], &mut qp);
        layouts.extend_from_slice(&qp);
    }
    let tok = |t: usize| &layouts[t * n_in..(t + 1) * n_in];
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
                acc[t][r] = _mm512_add_ps(acc[t][r], _mm512_mul_ps(a, b));
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
            lanes[j % DENSE_LANES] += v * xs[t][j];
        }
        out[t] = super::scalar::fold_lanes(lanes);
    }
    out
}

/// [`super::scalar::dot_f16`] with `vcvtph2ps`: the specification's 64
/// lanes as four registers, multiply then add (no FMA), the same fold.
/// Bit-identical to the specification.
///
/// # Safety
/// The CPU must support AVX-512 F, and `row.len() == 2 * x.len()`.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    dot_f16_multi(row, [x])[0]
}
