//! The specification of the I2_S × int8 dot product. Every SIMD kernel is
//! tested bit for bit against these two functions.
//!
//! Layout (DESIGN.md, bitnet.cpp `quantize_i2_s`): a row of `n` weights is
//! `n / 128` blocks of 32 bytes; value `j` of a block lives in byte `j % 32`
//! at bit shift `6 - 2 * (j / 32)`. Codes 0, 1, 2 mean -1, 0, +1; the
//! kernels return `Σ code·q`, and the caller applies the offset identity
//! `Σ w·q = Σ code·q − Σ q`.

/// Values per I2_S block.
pub const BLOCK: usize = 128;
/// Bytes per I2_S block.
pub const BLOCK_BYTES: usize = 32;
/// Blocks whose 16-bit partial sums the reference keeps before widening.
pub const WRAP_GROUP_BLOCKS: usize = 32;

/// The 2-bit code of value `j` (0..128) of a 32-byte block.
#[inline(always)]
pub fn code_at(block: &[u8], j: usize) -> u8 {
    (block[j % 32] >> (6 - 2 * (j / 32))) & 3
}

/// Mathematically exact `Σ code·q` in i32.
pub fn dot_exact(codes: &[u8], q: &[i8]) -> i32 {
    debug_assert_eq!(codes.len() * 4, q.len());
    let mut sum = 0i32;
    for (block, qb) in codes.chunks_exact(BLOCK_BYTES).zip(q.chunks_exact(BLOCK)) {
        for (i, &byte) in block.iter().enumerate() {
            for k in 0..4 {
                let code = ((byte >> (6 - 2 * k)) & 3) as i32;
                sum += code * qb[k * 32 + i] as i32;
            }
        }
    }
    sum
}

/// `Σ code·q` as bitnet.cpp's AVX2 `ggml_vec_dot_i2_i8_s` computes it,
/// including its 16-bit wrap (BitNet issue 629).
///
/// Per group of 32 blocks (4096 values), and for the trailing partial group,
/// 16 lanes of i16: lane `l` sums, over the group's blocks and sub-vectors
/// `k = 0..4`, the `maddubs` pair `code·q` at block positions `k*32 + 2l`
/// and `k*32 + 2l + 1`, wrapping in i16 (a pair cannot saturate: |pair| ≤
/// 2·3·128). Each group's lanes are then sign-extended and summed in i32.
pub fn dot_reference_wrap(codes: &[u8], q: &[i8]) -> i32 {
    debug_assert_eq!(codes.len() * 4, q.len());
    let mut total = 0i32;
    let group_bytes = WRAP_GROUP_BLOCKS * BLOCK_BYTES;
    for (group, qg) in codes
        .chunks(group_bytes)
        .zip(q.chunks(WRAP_GROUP_BLOCKS * BLOCK))
    {
        let mut lanes = [0i16; 16];
        for (block, qb) in group.chunks_exact(BLOCK_BYTES).zip(qg.chunks_exact(BLOCK)) {
            for k in 0..4 {
                for (l, lane) in lanes.iter_mut().enumerate() {
                    let j0 = k * 32 + 2 * l;
                    let pair = code_at(block, j0) as i16 * qb[j0] as i16
                        + code_at(block, j0 + 1) as i16 * qb[j0 + 1] as i16;
                    *lane = lane.wrapping_add(pair);
                }
            }
        }
        for lane in lanes {
            total = total.wrapping_add(lane as i32);
        }
    }
    total
}

/// The scalar matmul: for rows `rows` of the packed matrix `w` (row length
/// `n_in`) and `n_tok` quantized activation rows `q` ([n_tok, n_in]), writes
/// `out[(r - rows.start) * n_tok + t] = Σ code·q`.
pub fn matmul(
    wrap: bool,
    w: &[u8],
    n_in: usize,
    rows: std::ops::Range<usize>,
    q: &[i8],
    out: &mut [i32],
) {
    let row_bytes = n_in / 4;
    let n_tok = q.len() / n_in;
    for (ri, r) in rows.enumerate() {
        let codes = &w[r * row_bytes..(r + 1) * row_bytes];
        for t in 0..n_tok {
            let qt = &q[t * n_in..(t + 1) * n_in];
            out[ri * n_tok + t] = if wrap {
                dot_reference_wrap(codes, qt)
            } else {
                dot_exact(codes, qt)
            };
        }
    }
}

/// Accumulator lanes of the dense (F16/F32 × f32) dot products: four
/// 16-lane registers, so SIMD versions have four independent add chains.
pub const DENSE_LANES: usize = 64;

/// The specification of the logits dot product: element `i` is
/// accumulated into lane `i % 64` by a fused multiply-add (one rounding, as
/// every SIMD path does it in one instruction: bitnet.cpp's tinyBLAS does
/// the same), then lanes are folded pairwise `acc[l] += acc[l + w]` for
/// w = 32, 16, ..., 1. The order is fixed, so every kernel (and any thread
/// count) gives the same bits.
pub fn dot_dense(a: impl Iterator<Item = f32>, x: &[f32]) -> f32 {
    let mut acc = [0f32; DENSE_LANES];
    for (i, (ai, &xi)) in a.zip(x).enumerate() {
        let lane = &mut acc[i % DENSE_LANES];
        *lane = ai.mul_add(xi, *lane);
    }
    fold_lanes(acc)
}

/// The pairwise lane fold of [`dot_dense`] and [`dot_attn`]:
/// `acc[l] += acc[l + w]` for w = N/2, N/4, ..., 1 (N a power of two).
pub fn fold_lanes<const N: usize>(mut acc: [f32; N]) -> f32 {
    let mut w = N / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

/// `dot_dense` of a little-endian F16 row with f32 activations.
pub fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    dot_dense(
        row.chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        x,
    )
}

/// `dot_dense` of a little-endian F32 row with f32 activations.
pub fn dot_f32_row(row: &[u8], x: &[f32]) -> f32 {
    dot_dense(
        row.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        x,
    )
}

/// Accumulator lanes of the attention products (q·k per cached key).
pub const ATTN_LANES: usize = 8;

/// The specification of an attention score: element `i` of `q·k` is added
/// to lane `i % 8` (product and sum as separate f32 operations), then the
/// lanes are folded pairwise `acc[l] += acc[l + w]` for w = 4, 2, 1.
pub fn dot_attn(k: impl Iterator<Item = f32>, q: &[f32]) -> f32 {
    let mut acc = [0f32; ATTN_LANES];
    for (i, (ki, &qi)) in k.zip(q).enumerate() {
        acc[i % ATTN_LANES] += qi * ki;
    }
    fold_lanes(acc)
}

/// The specification of one step of `probs · V`: `out[d] += p * v[d]`
/// (product and sum as separate f32 operations).
pub fn axpy(p: f32, v: impl Iterator<Item = f32>, out: &mut [f32]) {
    for (o, vd) in out.iter_mut().zip(v) {
        *o += p * vd;
    }
}

/// Independent accumulators of [`xor_fold`]: several loads in flight and
/// a loop the compiler vectorises, instead of one dependency chain.
pub const XOR_FOLD_LANES: usize = 8;

/// The XOR of every word. It reads each word once and its result depends on
/// all of them, so no compiler can skip a load: the streaming read of the
/// bench's bandwidth probe. XOR is associative and commutative, so every
/// kernel's version gives these bits whatever its lane count.
pub fn xor_fold(words: &[u64]) -> u64 {
    let mut lanes = [0u64; XOR_FOLD_LANES];
    let mut chunks = words.chunks_exact(XOR_FOLD_LANES);
    for chunk in &mut chunks {
        for (lane, &w) in lanes.iter_mut().zip(chunk) {
            *lane ^= w;
        }
    }
    lanes
        .iter()
        .chain(chunks.remainder())
        .fold(0, |acc, &w| acc ^ w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_629_wrap_example() {
        // All codes 2 and q = 127 over 4096 values: the reference returns
        // -8192 instead of 1,040,384.
        let codes = vec![0b1010_1010u8; 4096 / 4];
        let q = vec![127i8; 4096];
        assert_eq!(dot_exact(&codes, &q), 1_040_384);
        assert_eq!(dot_reference_wrap(&codes, &q), -8192);
    }
}
