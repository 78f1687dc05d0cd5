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
use super::scalar::{BLOCK, BLOCK_BYTES};
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

/// Exact `Σ code·q` over one row, with `qp` in [`pair_layout`].
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI, and `qp.len() == 4 * codes.len()`
/// with `codes.len()` a multiple of 32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn dot_pairs(codes: &[u8], qp: &[i8]) -> i32 {
    let nb = codes.len() / BLOCK_BYTES;
    let mask = _mm512_set1_epi8(3);
    let mut acc = _mm512_setzero_si512();
    for p in 0..nb / 2 {
        let x = _mm512_loadu_si512(codes.as_ptr().add(p * 2 * BLOCK_BYTES) as *const _);
        let q = qp.as_ptr().add(p * 2 * BLOCK);
        let c0 = _mm512_and_si512(_mm512_srli_epi16::<6>(x), mask);
        let c1 = _mm512_and_si512(_mm512_srli_epi16::<4>(x), mask);
        let c2 = _mm512_and_si512(_mm512_srli_epi16::<2>(x), mask);
        let c3 = _mm512_and_si512(x, mask);
        acc = _mm512_dpbusd_epi32(acc, c0, _mm512_loadu_si512(q as *const _));
        acc = _mm512_dpbusd_epi32(acc, c1, _mm512_loadu_si512(q.add(64) as *const _));
        acc = _mm512_dpbusd_epi32(acc, c2, _mm512_loadu_si512(q.add(128) as *const _));
        acc = _mm512_dpbusd_epi32(acc, c3, _mm512_loadu_si512(q.add(192) as *const _));
    }
    let mut sum = _mm512_reduce_add_epi32(acc);
    if nb % 2 == 1 {
        let j = nb - 1;
        let mask = _mm256_set1_epi8(3);
        let x = _mm256_loadu_si256(codes.as_ptr().add(j * BLOCK_BYTES) as *const __m256i);
        let q = qp.as_ptr().add(j * BLOCK);
        let mut a = _mm256_setzero_si256();
        let c0 = _mm256_and_si256(_mm256_srli_epi16::<6>(x), mask);
        let c1 = _mm256_and_si256(_mm256_srli_epi16::<4>(x), mask);
        let c2 = _mm256_and_si256(_mm256_srli_epi16::<2>(x), mask);
        let c3 = _mm256_and_si256(x, mask);
        a = _mm256_dpbusd_epi32(a, c0, _mm256_loadu_si256(q as *const __m256i));
        a = _mm256_dpbusd_epi32(a, c1, _mm256_loadu_si256(q.add(32) as *const __m256i));
        a = _mm256_dpbusd_epi32(a, c2, _mm256_loadu_si256(q.add(64) as *const __m256i));
        a = _mm256_dpbusd_epi32(a, c3, _mm256_loadu_si256(q.add(96) as *const __m256i));
        sum = sum.wrapping_add(avx2::hsum_i32(a));
    }
    sum
}

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
    let row_bytes = n_in / 4;
    let n_tok = q.len() / n_in;
    let mut qp = Vec::new();
    let mut layouts = Vec::with_capacity(n_tok * n_in);
    for t in 0..n_tok {
        pair_layout(&q[t * n_in..(t + 1) * n_in], &mut qp);
        layouts.extend_from_slice(&qp);
    }
    for (ri, r) in rows.enumerate() {
        let codes = &w[r * row_bytes..(r + 1) * row_bytes];
        for t in 0..n_tok {
            let qt = &layouts[t * n_in..(t + 1) * n_in];
            // SAFETY: the features were checked above; `codes` is n_in/4
            // bytes and `qt` n_in values (pair layout keeps the length),
            // n_in a multiple of 128, so every load stays in bounds.
            out[ri * n_tok + t] = unsafe { dot_pairs(codes, qt) };
        }
    }
}

/// [`super::scalar::dot_f16`] with `vcvtph2ps`: 16 lanes, multiply then add
/// (no FMA), the same pairwise fold. Bit-identical to the specification.
///
/// # Safety
/// The CPU must support AVX-512 F, and `row.len() == 2 * x.len()`.
#[target_feature(enable = "avx512f")]
pub unsafe fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let full = n / 16 * 16;
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < full {
        let h = _mm256_loadu_si256(row.as_ptr().add(2 * i) as *const __m256i);
        let a = _mm512_cvtph_ps(h);
        let b = _mm512_loadu_ps(x.as_ptr().add(i));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(a, b));
        i += 16;
    }
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
    for j in full..n {
        let v = half::f16::from_le_bytes([row[2 * j], row[2 * j + 1]]).to_f32();
        lanes[j % 16] += v * x[j];
    }
    super::scalar::fold_lanes(lanes)
}
