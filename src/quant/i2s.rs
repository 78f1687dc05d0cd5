//! I2_S: BitNet's 2-bit ternary weight format, as bitnet.cpp stores it.
//!
//! The tensor is flattened row-major (a row is `ne0` values) and cut into
//! blocks of 128 values, 32 bytes a block. Value `j` of a block lives in byte
//! `j % 32` at bit shift `6 - 2 * (j / 32)`: byte `b` holds values `b`
//! (bits 7-6), `b + 32` (bits 5-4), `b + 64` (bits 3-2) and `b + 96`
//! (bits 1-0). Codes 0, 1, 2 mean -1, 0, +1. After the `n / 4` code bytes
//! comes one little-endian f32 scale for the whole tensor, then zero padding
//! to `n / 4 + 32` bytes (`ggml_nbytes` for I2_S).
//!
//! bitnet.cpp's dot kernel (`ggml_vec_dot_i2_i8_s`) walks whole 128-value
//! blocks of each row, so a row length that is not a multiple of 128 loses
//! its remainder there; the format itself only needs the total count to be.

/// Values per block.
pub const BLOCK: usize = 128;
/// Bytes per block.
pub const BLOCK_BYTES: usize = BLOCK / 4;
/// Bytes after the codes: the f32 scale plus padding.
pub const TRAILER_BYTES: usize = 32;

/// Total bytes of an I2_S tensor with `n` values.
pub fn packed_len(n: usize) -> usize {
    n / 4 + TRAILER_BYTES
}

/// Byte index and bit shift of value `i` of the flattened tensor.
#[inline]
fn position(i: usize) -> (usize, u32) {
    let block = i / BLOCK;
    let j = i % BLOCK;
    (
        block * BLOCK_BYTES + j % BLOCK_BYTES,
        6 - 2 * (j / BLOCK_BYTES) as u32,
    )
}

/// Packs ternary values with one tensor scale.
///
/// # Panics
/// If `ternary.len()` is not a multiple of 128 or a value is outside {-1, 0, 1}.
pub fn pack(ternary: &[i8], scale: f32) -> Vec<u8> {
    assert!(
        ternary.len().is_multiple_of(BLOCK),
        "I2_S packs whole 128-value blocks; got {} values",
        ternary.len()
    );
    let n = ternary.len();
    let mut out = vec![0u8; packed_len(n)];
    for (block, values) in ternary.chunks_exact(BLOCK).enumerate() {
        let bytes = &mut out[block * BLOCK_BYTES..(block + 1) * BLOCK_BYTES];
        for (j, &v) in values.iter().enumerate() {
            assert!(
                (-1..=1).contains(&v),
                "I2_S value {v} at index {} is not ternary",
                block * BLOCK + j
            );
            let code = (v + 1) as u8;
            bytes[j % BLOCK_BYTES] |= code << (6 - 2 * (j / BLOCK_BYTES));
        }
    }
    out[n / 4..n / 4 + 4].copy_from_slice(&scale.to_le_bytes());
    out
}

/// Unpacks `n` values and the scale.
///
/// A code of 3 (never written by [`pack`]) comes back as 2, which is what the
/// reference kernel computes with it (`code - 1`).
///
/// # Panics
/// If `n` is not a multiple of 128 or `bytes` is shorter than `n / 4 + 4`.
pub fn unpack(bytes: &[u8], n: usize) -> (Vec<i8>, f32) {
    assert!(
        n.is_multiple_of(BLOCK),
        "I2_S holds whole 128-value blocks; asked for {n} values"
    );
    let codes = &bytes[..n / 4];
    let mut out = vec![0i8; n];
    for (values, packed) in out
        .chunks_exact_mut(BLOCK)
        .zip(codes.chunks_exact(BLOCK_BYTES))
    {
        for (b, &byte) in packed.iter().enumerate() {
            for group in 0..4 {
                let code = (byte >> (6 - 2 * group)) & 3;
                values[group * BLOCK_BYTES + b] = code as i8 - 1;
            }
        }
    }
    (out, scale(bytes, n))
}

/// The 2-bit code (0..=3; 0, 1, 2 in valid data) of value `i`.
///
/// # Panics
/// If the byte holding value `i` is out of range.
pub fn code_at(bytes: &[u8], i: usize) -> u8 {
    let (byte, shift) = position(i);
    (bytes[byte] >> shift) & 3
}

/// The tensor scale stored after the codes of an `n`-value tensor.
///
/// # Panics
/// If `bytes` is shorter than `n / 4 + 4`.
pub fn scale(bytes: &[u8], n: usize) -> f32 {
    let at = n / 4;
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    f32::from_le_bytes(raw)
}
