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
    // Every AVX2 CPU also has F16C; the logits dot needs both.
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")
}

/// `Σ code·q` over one row.
///
/// # Safety
/// The CPU must support AVX2, and `q.len() == 4 * codes.len()` with
/// `codes.len()` a multiple of 32.
#[target_feature(enable = "avx2")]
pub unsafe fn dot(codes: &[u8], q: &[i8], wrap: bool) -> i32 {
    let nb = codes.len() / BLOCK_BYTES;
    let flush = if wrap {
        WRAP_GROUP_BLOCKS
    } else {
        EXACT_FLUSH_BLOCKS
    };
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut acc32 = _mm256_setzero_si256();
    let mut b = 0;
    while b < nb {
        let end = (b + flush).min(nb);
        let mut acc16 = _mm256_setzero_si256();
        for j in b..end {
            let x = _mm256_loadu_si256(codes.as_ptr().add(j * BLOCK_BYTES) as *const __m256i);
            let qp = q.as_ptr().add(j * BLOCK);
            let c0 = _mm256_and_si256(_mm256_srli_epi16::<6>(x), mask);
            let c1 = _mm256_and_si256(_mm256_srli_epi16::<4>(x), mask);
            let c2 = _mm256_and_si256(_mm256_srli_epi16::<2>(x), mask);
            let c3 = _mm256_and_si256(x, mask);
            let p0 = _mm256_maddubs_epi16(c0, _mm256_loadu_si256(qp as *const __m256i));
            let p1 = _mm256_maddubs_epi16(c1, _mm256_loadu_si256(qp.add(32) as *const __m256i));
            let p2 = _mm256_maddubs_epi16(c2, _mm256_loadu_si256(qp.add(64) as *const __m256i));
            let p3 = _mm256_maddubs_epi16(c3, _mm256_loadu_si256(qp.add(96) as *const __m256i));
            let s = _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3));
            acc16 = _mm256_add_epi16(acc16, s);
        }
        acc32 = _mm256_add_epi32(acc32, _mm256_madd_epi16(acc16, ones));
        b = end;
    }
    hsum_i32(acc32)
}

#[target_feature(enable = "avx2")]
pub(super) fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// The matmul of [`super::Kernel::matmul`] on AVX2.
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
    for (ri, r) in rows.enumerate() {
        let codes = &w[r * row_bytes..(r + 1) * row_bytes];
        for t in 0..n_tok {
            let qt = &q[t * n_in..(t + 1) * n_in];
            // SAFETY: AVX2 was checked above; `codes` is n_in/4 bytes and
            // `qt` n_in values with n_in a multiple of 128 (checked by the
            // dispatcher), so every load stays inside both slices.
            out[ri * n_tok + t] = unsafe { dot(codes, qt, wrap) };
        }
    }
}

/// [`super::scalar::dot_f16`] with F16C: the specification's 64 lanes as
/// eight 8-lane registers, multiply then add (no FMA), the same fold.
///
/// # Safety
/// The CPU must support AVX2 and F16C, and `row.len() == 2 * x.len()`.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let full = n / DENSE_LANES * DENSE_LANES;
    let mut acc = [_mm256_setzero_ps(); 8];
    let mut i = 0;
    while i < full {
        for (r, a) in acc.iter_mut().enumerate() {
            let j = i + 8 * r;
            let w = _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(2 * j) as *const __m128i));
            *a = _mm256_add_ps(*a, _mm256_mul_ps(w, _mm256_loadu_ps(x.as_ptr().add(j))));
        }
        i += DENSE_LANES;
    }
    let mut lanes = [0f32; DENSE_LANES];
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * r), *a);
    }
    for j in full..n {
        let v = half::f16::from_le_bytes([row[2 * j], row[2 * j + 1]]).to_f32();
        lanes[j % DENSE_LANES] += v * x[j];
    }
    super::scalar::fold_lanes(lanes)
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
