//! AVX2 I2_S × int8 dot products: the reference's own scheme (`maddubs`
//! pair sums in 16-bit lanes, widened with `madd`), with the widening
//! interval chosen per mode: every 32 blocks reproduces bitnet.cpp's
//! `ggml_vec_dot_i2_i8_s` wrap bit for bit; every 8 blocks can never wrap
//! (|lane| ≤ 8 blocks · 4 sub-vectors · 2 · 3 · 128 = 24576 < 2^15), so it is
//! exact.

use super::scalar::{BLOCK, BLOCK_BYTES, DENSE_LANES, WRAP_GROUP_BLOCKS};
use std::arch::x86_64::*;

/// Blocks between widenings in exact mode (see the module doc).
const EXACT_FLUSH_BLOCKS: usize = 8;

pub fn available() -> bool {
    // Every AVX2 CPU also has F16C and FMA; the logits dot needs all three.
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("fma")
}

/// `Σ code·q` of `R` rows with `T` tokens (`out[r][t]`), each (row, token)
/// in the specification's 16 lanes: per block, sub-vector k's codes are
/// shifted down and masked once per row and used for every token, each
/// activation load serves every row, and the `maddubs` pair sums add into
/// 16-bit lanes that are widened every `flush` blocks (the wrap grouping or
/// the exact interval, see the module doc). Lane sums wrap modulo 2^16
/// however they are grouped within a widening interval, so any tiling gives
/// the specification's bits.
///
/// With `ahead`, the rows are read as one stream (they must be contiguous,
/// R * 32 bytes a block) and prefetched `ahead` bytes on: four rows abreast
/// are four short streams the hardware prefetcher follows poorly.
///
/// # Safety
/// The CPU must support AVX2; each `codes[r]` must be readable for `nb`
/// blocks of 32 bytes and each `qs[t]` for `nb` blocks of 128 values.
#[inline]
#[target_feature(enable = "avx2")]
#[allow(clippy::needless_range_loop)] // r and t index rows, tokens and accumulators together
unsafe fn tile<const R: usize, const T: usize>(
    codes: [*const u8; R],
    qs: [*const i8; T],
    nb: usize,
    flush: usize,
    ahead: Option<usize>,
) -> [[i32; T]; R] {
    let mask = _mm256_set1_epi8(3);
    let mut acc32 = [[_mm256_setzero_si256(); T]; R];
    let mut b = 0;
    while b < nb {
        let end = (b + flush).min(nb);
        let mut acc16 = [[_mm256_setzero_si256(); T]; R];
        for j in b..end {
            if let Some(ahead) = ahead {
                // A hint only: never faults, even past the end of the matrix.
                let at = codes[0].wrapping_add(ahead + j * R * BLOCK_BYTES);
                for line in (0..R * BLOCK_BYTES).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(line) as *const i8);
                }
            }
            let mut x = [_mm256_setzero_si256(); R];
            for r in 0..R {
                x[r] = _mm256_loadu_si256(codes[r].add(j * BLOCK_BYTES) as *const __m256i);
            }
            for k in 0..4 {
                // Sub-vector k sits at bit shift 6 - 2k (16-bit shifts are
                // fine: the mask drops what crosses from the next byte).
                let mut c = [_mm256_setzero_si256(); R];
                for r in 0..R {
                    let shifted = match k {
                        0 => _mm256_srli_epi16::<6>(x[r]),
                        1 => _mm256_srli_epi16::<4>(x[r]),
                        2 => _mm256_srli_epi16::<2>(x[r]),
                        _ => x[r],
                    };
                    c[r] = _mm256_and_si256(shifted, mask);
                }
                for t in 0..T {
                    let qv = _mm256_loadu_si256(qs[t].add(j * BLOCK + 32 * k) as *const __m256i);
                    for r in 0..R {
                        acc16[r][t] = _mm256_add_epi16(acc16[r][t], _mm256_maddubs_epi16(c[r], qv));
                    }
                }
            }
        }
        widen(&mut acc32, &acc16);
        b = end;
    }
    horizontal_sums(&acc32)
}

/// Adds each 16-bit accumulator into its 32-bit one (pairs of lanes
/// summed by `madd` with ones): the widening of [`tile`] and [`byte_tile`].
#[inline]
#[target_feature(enable = "avx2")]
fn widen<const R: usize, const T: usize>(acc32: &mut [[__m256i; T]; R], acc16: &[[__m256i; T]; R]) {
    let ones = _mm256_set1_epi16(1);
    for (a32, a16) in acc32.iter_mut().zip(acc16) {
        for (a, &b) in a32.iter_mut().zip(a16) {
            *a = _mm256_add_epi32(*a, _mm256_madd_epi16(b, ones));
        }
    }
}

/// Each 32-bit accumulator's eight lanes summed.
#[inline]
#[target_feature(enable = "avx2")]
fn horizontal_sums<const R: usize, const T: usize>(acc32: &[[__m256i; T]; R]) -> [[i32; T]; R] {
    let mut sums = [[0i32; T]; R];
    for (s, a) in sums.iter_mut().zip(acc32) {
        for (s, &v) in s.iter_mut().zip(a) {
            *s = hsum_i32(v);
        }
    }
    sums
}

#[target_feature(enable = "avx2")]
pub(super) fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// How far ahead of the rows being read a single-token product prefetches
/// (measured on a 2-core AVX2 EPYC over the 2B-4T shape's 521 MB of I2_S
/// projections: without it the four-row tiles stream at half the speed;
/// 4 to 8 KiB ahead are best, 16 KiB a little worse).
const PREFETCH_AHEAD: usize = 8192;

/// Rows per tile of a single-token product (they share the activation loads).
const DECODE_ROWS: usize = 4;

/// Rows and tokens per tile of a multi-token product: twelve 16-bit
/// accumulators, two rows of unpacked codes and an activation register fit
/// the sixteen YMM registers (the codes are unpacked beforehand, so no
/// mask register; measured on a 2-core AVX2 EPYC, 2 x 6 beat 2 x 4, 3 x 4,
/// 4 x 3 and 1 x 8 by 10 to 40 %).
const PREFILL_ROWS: usize = 2;
const PREFILL_TOKENS: usize = 6;

/// Rows unpacked at a time: their byte codes stay in L2 while every token
/// tile passes over them.
const PREFILL_ROW_BLOCK: usize = 16;

/// The matmul of [`super::Kernel::matmul`] on AVX2: one token takes four
/// rows per pass, prefetching ahead; several tokens unpack each block of
/// rows once (a byte per code) and take tiles of two rows by six tokens
/// over it, so each weight is unpacked and read from memory once for all
/// the tokens.
pub fn matmul(
    wrap: bool,
    w: &[u8],
    n_in: usize,
    rows: std::ops::Range<usize>,
    q: &[i8],
    out: &mut [i32],
) {
    assert!(available());
    let row_bytes = n_in / 4;
    let n_tok = q.len() / n_in;
    let nb = n_in / BLOCK;
    assert!(w.len() >= rows.end * row_bytes && out.len() == rows.len() * n_tok);
    let flush = if wrap {
        WRAP_GROUP_BLOCKS
    } else {
        EXACT_FLUSH_BLOCKS
    };
    let row = |r: usize| w[r * row_bytes..].as_ptr();
    let tok = |t: usize| q[t * n_in..].as_ptr();
    let first = rows.start;
    if n_tok == 1 {
        let mut r = rows.start;
        while r + DECODE_ROWS <= rows.end {
            // SAFETY: AVX2 was checked above; rows r..r+4 are whole rows of
            // `w` (checked above), contiguous, and the token is n_in values,
            // n_in a multiple of 128 (the dispatcher's check).
            let s = unsafe {
                tile::<DECODE_ROWS, 1>(
                    std::array::from_fn(|i| row(r + i)),
                    [tok(0)],
                    nb,
                    flush,
                    Some(PREFETCH_AHEAD),
                )
            };
            for (i, si) in s.iter().enumerate() {
                out[r - first + i] = si[0];
            }
            r += DECODE_ROWS;
        }
        for r in r..rows.end {
            // SAFETY: as above, one row.
            out[r - first] = unsafe { tile::<1, 1>([row(r)], [tok(0)], nb, flush, None) }[0][0];
        }
        return;
    }
    // Several tokens: each block of rows is unpacked once to one byte per
    // code (natural order: value j of a row at byte j), then tiles of two
    // rows by six tokens run plain u8 x i8 products over it.
    let mut codes = vec![0u8; PREFILL_ROW_BLOCK * n_in];
    let mut r0 = rows.start;
    while r0 < rows.end {
        let r1 = (r0 + PREFILL_ROW_BLOCK).min(rows.end);
        for (r, dst) in (r0..r1).zip(codes.chunks_exact_mut(n_in)) {
            // SAFETY: AVX2 was checked above; row r is n_in / 4 bytes of
            // `w` (checked above) and `dst` n_in bytes.
            unsafe { unpack_row(&w[r * row_bytes..(r + 1) * row_bytes], dst) };
        }
        let unpacked = |r: usize| codes[(r - r0) * n_in..].as_ptr();
        let mut t = 0;
        while t < n_tok {
            let tt = PREFILL_TOKENS.min(n_tok - t);
            let mut r = r0;
            while r < r1 {
                let rr = PREFILL_ROWS.min(r1 - r);
                // SAFETY: AVX2 was checked above; rows r..r+rr are whole
                // unpacked rows and tokens t..t+tt whole tokens of n_in
                // values (n_in a multiple of 128, the dispatcher's check).
                unsafe {
                    unpacked_tile(
                        rr,
                        tt,
                        &|i| unpacked(r + i),
                        &|k| tok(t + k),
                        n_in,
                        flush,
                        &mut |i, k, v| out[(r - first + i) * n_tok + t + k] = v,
                    )
                };
                r += rr;
            }
            t += tt;
        }
        r0 = r1;
    }
}

/// One row of packed I2_S codes as one byte per code, in value order:
/// sub-vector k of a block (bit shift 6 − 2k) becomes bytes 32k..32k+32
/// of the block's 128.
///
/// # Safety
/// The CPU must support AVX2; `dst.len() == 4 * src.len()`, a multiple of 128.
#[target_feature(enable = "avx2")]
unsafe fn unpack_row(src: &[u8], dst: &mut [u8]) {
    assert_eq!(dst.len(), 4 * src.len());
    let mask = _mm256_set1_epi8(3);
    for (s, d) in src
        .chunks_exact(BLOCK_BYTES)
        .zip(dst.chunks_exact_mut(BLOCK))
    {
        let x = _mm256_loadu_si256(s.as_ptr() as *const __m256i);
        let parts = [
            _mm256_srli_epi16::<6>(x),
            _mm256_srli_epi16::<4>(x),
            _mm256_srli_epi16::<2>(x),
            x,
        ];
        for (k, part) in parts.into_iter().enumerate() {
            _mm256_storeu_si256(
                d[32 * k..].as_mut_ptr() as *mut __m256i,
                _mm256_and_si256(part, mask),
            );
        }
    }
}

/// A tile of `rr` (1..=2) unpacked rows by `tt` (1..=6) tokens, each sum
/// handed to `put(row, token, sum)`.
///
/// # Safety
/// The CPU must support AVX2; `row(0..rr)` and `tok(0..tt)` are readable
/// for `n_in` bytes, `n_in` a multiple of 128.
#[target_feature(enable = "avx2")]
unsafe fn unpacked_tile(
    rr: usize,
    tt: usize,
    row: &dyn Fn(usize) -> *const u8,
    tok: &dyn Fn(usize) -> *const i8,
    n_in: usize,
    flush: usize,
    put: &mut dyn FnMut(usize, usize, i32),
) {
    macro_rules! run {
        ($r:literal, $t:literal) => {{
            let s = byte_tile::<$r, $t>(
                std::array::from_fn(|i| row(i)),
                std::array::from_fn(|k| tok(k)),
                n_in,
                flush,
            );
            for (i, si) in s.iter().enumerate() {
                for (k, &v) in si.iter().enumerate() {
                    put(i, k, v);
                }
            }
        }};
    }
    match (rr, tt) {
        (2, 6) => run!(2, 6),
        (2, 5) => run!(2, 5),
        (2, 4) => run!(2, 4),
        (2, 3) => run!(2, 3),
        (2, 2) => run!(2, 2),
        (2, _) => run!(2, 1),
        (_, 6) => run!(1, 6),
        (_, 5) => run!(1, 5),
        (_, 4) => run!(1, 4),
        (_, 3) => run!(1, 3),
        (_, 2) => run!(1, 2),
        _ => run!(1, 1),
    }
}

/// `Σ code·q` of `R` unpacked rows (one byte per code) with `T` tokens:
/// the products of [`tile`] in the same 16-bit lanes (byte j of a row
/// meets byte j of a token, as sub-vector k of block b does there), widened
/// every `flush` blocks, so the same bits.
///
/// # Safety
/// The CPU must support AVX2; each `rows[r]` and `qs[t]` readable for `n_in`
/// bytes, `n_in` a multiple of 128.
#[inline]
#[target_feature(enable = "avx2")]
#[allow(clippy::needless_range_loop)] // r and t index rows, tokens and accumulators together
unsafe fn byte_tile<const R: usize, const T: usize>(
    rows: [*const u8; R],
    qs: [*const i8; T],
    n_in: usize,
    flush: usize,
) -> [[i32; T]; R] {
    let mut acc32 = [[_mm256_setzero_si256(); T]; R];
    let chunks = n_in / 32;
    let flush = 4 * flush; // 32-byte chunks per widening
    let mut b = 0;
    while b < chunks {
        let end = (b + flush).min(chunks);
        let mut acc16 = [[_mm256_setzero_si256(); T]; R];
        for j in b..end {
            let mut c = [_mm256_setzero_si256(); R];
            for r in 0..R {
                c[r] = _mm256_loadu_si256(rows[r].add(32 * j) as *const __m256i);
            }
            for t in 0..T {
                let qv = _mm256_loadu_si256(qs[t].add(32 * j) as *const __m256i);
                for r in 0..R {
                    acc16[r][t] = _mm256_add_epi16(acc16[r][t], _mm256_maddubs_epi16(c[r], qv));
                }
            }
        }
        widen(&mut acc32, &acc16);
        b = end;
    }
    horizontal_sums(&acc32)
}

/// The largest `|x|` of the row, NaNs skipped (what
/// [`crate::quant::act::act_scale`]'s f64 maximum sees: |x| is exact in
/// f32 and widening to f64 keeps the order), at least 0.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn abs_max(x: &[f32]) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = [_mm256_setzero_ps(); 4];
    let mut chunks = x.chunks_exact(32);
    for c in &mut chunks {
        for (k, m) in m.iter_mut().enumerate() {
            let a = _mm256_andnot_ps(sign, _mm256_loadu_ps(c.as_ptr().add(8 * k)));
            // maxps returns its second operand when either is NaN: a NaN
            // element leaves the running maximum as it was.
            *m = _mm256_max_ps(a, *m);
        }
    }
    let v = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
    lanes
        .iter()
        .chain(chunks.remainder())
        .fold(0f32, |acc, &v| if v.abs() > acc { v.abs() } else { acc })
}

/// Four codes of [`quantize_codes`]: the f64 products of `v` with `s`,
/// rounded to nearest even, clamped to [lo, hi], a NaN product giving 0.
#[inline]
#[target_feature(enable = "avx2")]
fn codes4(v: __m128, s: __m256d, lo: __m256d, hi: __m256d) -> __m128i {
    let p = _mm256_mul_pd(_mm256_cvtps_pd(v), s);
    let r = _mm256_round_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(p);
    let r = _mm256_min_pd(_mm256_max_pd(r, lo), hi);
    // maxpd gave `lo` for a NaN product; the ordered mask makes it 0.
    let r = _mm256_and_pd(r, _mm256_cmp_pd::<_CMP_ORD_Q>(p, p));
    _mm256_cvtpd_epi32(r)
}

/// The codes and code sum of [`crate::quant::act::quantize_row_i8_s`]
/// (reference variant) for a row whose activation scale is `scale`: the
/// exact f64 product rounded once, ties to even, clamped to [-128, 127],
/// NaN products giving 0 as the scalar cast does. Bit for bit the same codes.
///
/// # Safety
/// The CPU must support AVX2, and `out.len() == x.len()`.
#[target_feature(enable = "avx2")]
pub unsafe fn quantize_codes(x: &[f32], scale: f32, out: &mut [i8]) -> i32 {
    let n = x.len();
    let s = _mm256_set1_pd(scale as f64);
    let (lo, hi) = (_mm256_set1_pd(-128.0), _mm256_set1_pd(127.0));
    let mut sum = _mm256_setzero_si256();
    let mut i = 0;
    while i + 16 <= n {
        let a = _mm256_loadu_ps(x.as_ptr().add(i));
        let b = _mm256_loadu_ps(x.as_ptr().add(i + 8));
        let qa = _mm256_set_m128i(
            codes4(_mm256_extractf128_ps::<1>(a), s, lo, hi),
            codes4(_mm256_castps256_ps128(a), s, lo, hi),
        );
        let qb = _mm256_set_m128i(
            codes4(_mm256_extractf128_ps::<1>(b), s, lo, hi),
            codes4(_mm256_castps256_ps128(b), s, lo, hi),
        );
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(qa, qb));
        // Pack to 16 bytes: packs works within 128-bit lanes, so the i16
        // order is a0-3 b0-3 a4-7 b4-7; the permute restores a0-7 b0-7.
        let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(qa, qb));
        let bytes = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
        _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, bytes);
        i += 16;
    }
    let mut total = hsum_i32(sum);
    for j in i..n {
        let p = f64::from(x[j]) * f64::from(scale);
        let q = (p.round_ties_even() as i32).clamp(-128, 127);
        out[j] = q as i8;
        total += q;
    }
    total
}

/// [`super::scalar::dot_f16`] with F16C: the specification's 64 lanes as
/// eight 8-lane registers, a fused multiply-add each, the same fold.
///
/// # Safety
/// The CPU must support AVX2, F16C and FMA, and `row.len() == 2 * x.len()`.
#[target_feature(enable = "avx2,f16c,fma")]
pub unsafe fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    dot_f16_ahead(row, x, None)
}

/// [`dot_f16`], prefetching `ahead` bytes past the part of the row being
/// read when given (the rows of a decode's logits are one long stream).
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn dot_f16_ahead(row: &[u8], x: &[f32], ahead: Option<usize>) -> f32 {
    let n = x.len();
    let full = n / DENSE_LANES * DENSE_LANES;
    let mut acc = [_mm256_setzero_ps(); 8];
    let mut i = 0;
    while i < full {
        if let Some(ahead) = ahead {
            // A hint only: never faults, even past the end of the matrix.
            let at = row.as_ptr().wrapping_add(2 * i + ahead);
            _mm_prefetch::<_MM_HINT_T0>(at as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64) as *const i8);
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let j = i + 8 * r;
            let w = _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(2 * j) as *const __m128i));
            *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.as_ptr().add(j)), *a);
        }
        i += DENSE_LANES;
    }
    if full == n {
        return fold64(acc);
    }
    let mut lanes = [0f32; DENSE_LANES];
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * r), *a);
    }
    for j in full..n {
        let v = half::f16::from_le_bytes([row[2 * j], row[2 * j + 1]]).to_f32();
        let lane = &mut lanes[j % DENSE_LANES];
        *lane = v.mul_add(x[j], *lane);
    }
    super::scalar::fold_lanes(lanes)
}

/// [`super::scalar::fold_lanes`] of the 64 lanes held as eight registers
/// (lanes 8k..8k+8 in register k): `acc[l] += acc[l + w]` for w = 32, 16,
/// 8 register-wise, then [`fold8`]: the same adds in the same pairs.
#[inline]
#[target_feature(enable = "avx2")]
fn fold64(acc: [__m256; 8]) -> f32 {
    let a: [__m256; 4] = std::array::from_fn(|k| _mm256_add_ps(acc[k], acc[k + 4])); // w = 32
    let b = [_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3])]; // w = 16
    fold8(_mm256_add_ps(b[0], b[1])) // w = 8, then 4, 2, 1
}

/// How far ahead of the row being read a decode's logits prefetch
/// (measured on the 2B-4T shape's 657 MB F16 matrix, two threads: 1 KiB
/// ahead about 6 % faster than none; 2 KiB and more no better than none).
const F16_PREFETCH_AHEAD: usize = 1024;

/// [`dot_f16`] of consecutive rows of `x.len()` values (`rows`, 2n bytes
/// each) with one `x` (a decode's logits): `out[r]`, the same bits,
/// prefetching ahead along the rows.
///
/// # Safety
/// The CPU must support AVX2, F16C and FMA, and `rows.len() == 2 * x.len() * out.len()`.
#[target_feature(enable = "avx2,f16c,fma")]
pub unsafe fn dot_f16_rows_one_token(rows: &[u8], x: &[f32], out: &mut [f32]) {
    for (row, o) in rows.chunks_exact(2 * x.len()).zip(out) {
        *o = dot_f16_ahead(row, x, Some(F16_PREFETCH_AHEAD));
    }
}

/// Rows converted per block of [`dot_f16_rows_tiled`] (160 KB of f32 at
/// the 2B-4T width: they stay in L2 while every token tile passes).
const F16_ROW_BLOCK: usize = 16;

/// Tokens per tile of [`dot_f16_rows_tiled`] (two rows by six tokens:
/// twelve accumulators, two weight registers, one activation).
const F16_TILE_TOKENS: usize = 6;

/// [`dot_f16`] of consecutive rows of `n` values with every token of `xs`
/// ([T, n]), for `n` a multiple of 64: `out[r * T + t]`, the same bits.
///
/// The specification's 64 lanes are eight independent groups of eight
/// (register g holds lanes 8g..8g+8). Activations are rearranged once per
/// call and rows once per block of [`F16_ROW_BLOCK`] (converted to f32)
/// so that group g of a row or token is one contiguous run: a tile of two
/// rows by six tokens then accumulates one group at a time from streams
/// the caches serve whole (an element's lane is its index mod 64 and the
/// order along a lane is the row order, so the sums are the
/// specification's, bit for bit).
///
/// # Safety
/// The CPU must support AVX2, F16C and FMA; `n` is a positive multiple of 64,
/// `rows.len() == 2 * n * R` and `xs.len() == n * T`, `out.len() == R * T`.
#[target_feature(enable = "avx2,f16c,fma")]
pub unsafe fn dot_f16_rows_tiled(n: usize, rows: &[u8], xs: &[f32], out: &mut [f32]) {
    let (n_rows, n_tok) = (rows.len() / (2 * n), xs.len() / n);
    let chunks = n / DENSE_LANES;
    // Group-major: element 64c + 8g + j of a vector goes to (g * chunks + c) * 8 + j.
    let mut xg = vec![0f32; n_tok * n];
    for (x, dst) in xs.chunks_exact(n).zip(xg.chunks_exact_mut(n)) {
        for (c, x) in x.chunks_exact(DENSE_LANES).enumerate() {
            for g in 0..8 {
                dst[(g * chunks + c) * 8..][..8].copy_from_slice(&x[8 * g..8 * g + 8]);
            }
        }
    }
    let mut wg = vec![0f32; F16_ROW_BLOCK * n];
    let mut sums = [[[_mm256_setzero_ps(); 8]; F16_TILE_TOKENS]; F16_ROW_BLOCK];
    let mut r0 = 0;
    while r0 < n_rows {
        let rb = F16_ROW_BLOCK.min(n_rows - r0);
        let block = &rows[2 * n * r0..2 * n * (r0 + rb)];
        for (row, dst) in block.chunks_exact(2 * n).zip(wg.chunks_exact_mut(n)) {
            for (c, row) in row.chunks_exact(2 * DENSE_LANES).enumerate() {
                for g in 0..8 {
                    let h = _mm_loadu_si128(row[16 * g..16 * g + 16].as_ptr() as *const __m128i);
                    let d = &mut dst[(g * chunks + c) * 8..][..8];
                    _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
                }
            }
        }
        let mut t0 = 0;
        while t0 < n_tok {
            let tt = F16_TILE_TOKENS.min(n_tok - t0);
            let group = 8 * chunks; // values of one lane group of a row or token
            for g in 0..8 {
                // A short tile repeats its last token or row (computed twice, kept once).
                let mut x = [xg.as_ptr(); F16_TILE_TOKENS];
                for (k, x) in x.iter_mut().enumerate() {
                    *x = xg[(t0 + k.min(tt - 1)) * n + g * group..][..group].as_ptr();
                }
                let mut r = 0;
                while r < rb {
                    let r1 = (r + 1).min(rb - 1);
                    let w = [
                        wg[r * n + g * group..][..group].as_ptr(),
                        wg[r1 * n + g * group..][..group].as_ptr(),
                    ];
                    let acc = f16_group_tile(w, x, chunks);
                    for i in 0..2.min(rb - r) {
                        for k in 0..F16_TILE_TOKENS {
                            sums[r + i][k][g] = acc[i][k];
                        }
                    }
                    r += 2;
                }
            }
            for (r, sums) in sums.iter().enumerate().take(rb) {
                for (k, &lanes) in sums.iter().enumerate().take(tt) {
                    out[(r0 + r) * n_tok + t0 + k] = fold64(lanes);
                }
            }
            t0 += tt;
        }
        r0 += rb;
    }
}

/// One lane group of two rows with six tokens: `acc[r][t] = fma(w[r],
/// x[t], acc[r][t])` (as the specification) along `chunks` runs of eight
/// lanes.
///
/// # Safety
/// The CPU must support AVX2 and FMA; every pointer is readable for `8 * chunks` values.
#[inline]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // t indexes tokens and accumulators together
unsafe fn f16_group_tile(
    w: [*const f32; 2],
    x: [*const f32; F16_TILE_TOKENS],
    chunks: usize,
) -> [[__m256; F16_TILE_TOKENS]; 2] {
    let mut acc = [[_mm256_setzero_ps(); F16_TILE_TOKENS]; 2];
    for c in 0..chunks {
        let w0 = _mm256_loadu_ps(w[0].add(8 * c));
        let w1 = _mm256_loadu_ps(w[1].add(8 * c));
        for t in 0..F16_TILE_TOKENS {
            let xv = _mm256_loadu_ps(x[t].add(8 * c));
            acc[0][t] = _mm256_fmadd_ps(w0, xv, acc[0][t]);
            acc[1][t] = _mm256_fmadd_ps(w1, xv, acc[1][t]);
        }
    }
    acc
}

/// An element type of the KV cache, as the attention kernels read it.
pub trait CacheElem: Copy {
    /// Eight consecutive elements from `p`, as f32.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C, and `p..p + 8` must be readable.
    unsafe fn load8(p: *const Self) -> __m256;
    fn to_f32(self) -> f32;
}

impl CacheElem for half::f16 {
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

impl CacheElem for f32 {
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_loadu_ps(p)
    }

    fn to_f32(self) -> f32 {
        self
    }
}

/// `out[j] =` [`super::scalar::dot_attn`] of `q` with key j, for the
/// `out.len()` keys stored back to back in `keys` (rows of `q.len()`).
/// Four keys per pass (four independent add chains); each key keeps the
/// specification's 8 lanes, multiply then add (no FMA), and its pairwise
/// lane fold, done in registers when the rows are a multiple of 8 long.
///
/// # Safety
/// The CPU must support AVX2 and F16C, and `keys.len() == out.len() * q.len()`.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn dot_attn_rows<T: CacheElem>(q: &[f32], keys: &[T], out: &mut [f32]) {
    let hd = q.len();
    let key = |j: usize| keys.as_ptr().add(j * hd);
    let mut j = 0;
    while j + 4 <= out.len() {
        let s = dot_attn_x4(q, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
        out[j..j + 4].copy_from_slice(&s);
        j += 4;
    }
    while j < out.len() {
        // The last 1-3 keys: the same lanes and fold, one key at a time.
        out[j] = dot_attn_x4(q, [key(j); 4])[0];
        j += 1;
    }
}

/// [`super::scalar::dot_attn`] of `q` with four keys of `q.len()` elements.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn dot_attn_x4<T: CacheElem>(q: &[f32], k: [*const T; 4]) -> [f32; 4] {
    let full = q.len() / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in (0..full).step_by(8) {
        let qv = _mm256_loadu_ps(q.as_ptr().add(i));
        for (a, k) in acc.iter_mut().zip(k) {
            *a = _mm256_add_ps(*a, _mm256_mul_ps(qv, T::load8(k.add(i))));
        }
    }
    if full == q.len() {
        return acc.map(|a| fold8(a));
    }
    std::array::from_fn(|r| {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` is 8 f32, one unaligned 256-bit store.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]) };
        for (i, &qi) in q.iter().enumerate().skip(full) {
            // SAFETY: key r has q.len() elements (the caller's contract).
            lanes[i % 8] += qi * unsafe { *k[r].add(i) }.to_f32();
        }
        super::scalar::fold_lanes(lanes)
    })
}

/// [`super::scalar::fold_lanes`] of one 8-lane register, in registers:
/// `l[i] += l[i + w]` for w = 4, 2, 1 (the same adds in the same pairs).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn fold8(a: __m256) -> f32 {
    let e = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a)); // w = 4
    let f = _mm_add_ps(e, _mm_movehl_ps(e, e)); // w = 2
    let g = _mm_add_ss(f, _mm_shuffle_ps::<0b01>(f, f)); // w = 1
    _mm_cvtss_f32(g)
}

/// Dimensions of the output kept in registers by [`apply`]: eight 8-lane
/// accumulators.
const APPLY_BLOCK: usize = 64;

/// `out = Σ_j p[j] · v_j` (`out` starts at zero) for the values stored
/// back to back in `vals` (rows of `out.len()`), each element summed over j
/// in order with a separate multiply and add: [`super::scalar::axpy`]
/// applied for j = 0, 1, ... . Blocks of 64 dimensions stay in registers
/// across all j.
///
/// # Safety
/// The CPU must support AVX2 and F16C, and `vals.len() >= p.len() * out.len()`.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn apply<T: CacheElem>(p: &[f32], vals: &[T], out: &mut [f32]) {
    let n = out.len();
    let v = |j: usize, d: usize| vals.as_ptr().add(j * n + d);
    let mut d0 = 0;
    while d0 + APPLY_BLOCK <= n {
        let mut acc = [_mm256_setzero_ps(); APPLY_BLOCK / 8];
        for (j, &pj) in p.iter().enumerate() {
            let (pv, row) = (_mm256_set1_ps(pj), v(j, d0));
            for (b, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(pv, T::load8(row.add(8 * b))));
            }
        }
        for (b, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(d0 + 8 * b), *a);
        }
        d0 += APPLY_BLOCK;
    }
    let full = n / 8 * 8;
    while d0 < full {
        let mut a = _mm256_setzero_ps();
        for (j, &pj) in p.iter().enumerate() {
            a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_set1_ps(pj), T::load8(v(j, d0))));
        }
        _mm256_storeu_ps(out.as_mut_ptr().add(d0), a);
        d0 += 8;
    }
    for (d, o) in out.iter_mut().enumerate().skip(full) {
        *o = 0.0;
        for (j, &pj) in p.iter().enumerate() {
            *o += pj * (*v(j, d)).to_f32();
        }
    }
}

/// [`super::scalar::xor_fold`] with four 256-bit accumulators: 128 bytes a
/// step in independent loads. The same bits as the specification.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn xor_fold(words: &[u64]) -> u64 {
    let mut acc = [_mm256_setzero_si256(); 4];
    let mut chunks = words.chunks_exact(16);
    for chunk in &mut chunks {
        let p = chunk.as_ptr() as *const __m256i;
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm256_xor_si256(*a, _mm256_loadu_si256(p.add(k)));
        }
    }
    let v = _mm256_xor_si256(
        _mm256_xor_si256(acc[0], acc[1]),
        _mm256_xor_si256(acc[2], acc[3]),
    );
    let mut lanes = [0u64; 4];
    _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, v);
    lanes
        .iter()
        .chain(chunks.remainder())
        .fold(0, |acc, &w| acc ^ w)
}

/// [`crate::engine::ops::rope`] compiled with FMA: its `f32::mul_add`s
/// (the reference's contracted forms) become one instruction each instead
/// of a library call, with the same bits (a fused multiply-add has one
/// exact result).
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn rope(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    pos0: usize,
    theta_base: f32,
    neox: bool,
) {
    crate::engine::ops::rope(x, n_heads, head_dim, pos0, theta_base, neox)
}
