//! bitnet.cpp's internal I2_S kernels, called directly through `ffi/shim.c`,
//! so tests compare our kernels with the reference's own functions.

use super::ffi;

/// Whether `ggml_vec_dot_i2_i8_s` has a code path on this CPU (it writes
/// nothing on a CPU with neither AVX2 nor NEON).
pub fn available() -> bool {
    // SAFETY: a pure query with no arguments.
    unsafe { ffi::divergence_kernel_available() != 0 }
}

/// `quantize_row_i8_s`: returns (codes, scale, row sum of the codes).
pub fn quantize_row_i8_s(x: &[f32]) -> (Vec<i8>, f32, i32) {
    let mut q = vec![0i8; x.len()];
    let mut sum = 0i32;
    // SAFETY: x and q both hold x.len() elements; sum is a valid out pointer.
    let scale = unsafe {
        ffi::divergence_quantize_row_i8_s(x.as_ptr(), q.as_mut_ptr(), x.len() as i64, &mut sum)
    };
    (q, scale, sum)
}

/// `ggml_vec_dot_i2_i8_s` on one packed row: the raw sum of code*q (codes
/// 0..2), wrap included, over the `q.len() / 128` whole blocks the kernel
/// walks (it ignores the remainder of a length that is not a multiple of
/// 128). Returns None when `row` is shorter than those blocks (the kernel
/// would read out of bounds) or the CPU has no kernel path.
pub fn vec_dot_i2_i8_s(row: &[u8], q: &[i8]) -> Option<f32> {
    let n = q.len();
    if row.len() < n / 128 * 32 || n > i32::MAX as usize || !available() {
        return None;
    }
    // SAFETY: the kernel reads n/128*32 bytes of row and n/128*128 <= n
    // codes of q, both checked above.
    Some(unsafe { ffi::divergence_vec_dot_i2_i8_s(n as i32, row.as_ptr(), q.as_ptr()) })
}

/// `quantize_i2_s`: f32 weights [n_out rows of n_in] to the I2_S tensor bytes.
pub fn quantize_i2_s(w: &[f32], n_in: usize, n_out: usize) -> Option<Vec<u8>> {
    if !n_in.is_multiple_of(128) || w.len() != n_in * n_out {
        return None;
    }
    let mut out = vec![0u8; n_in * n_out / 4 + 32];
    // SAFETY: w has nrow*n_per_row floats; out has the documented size.
    let written = unsafe {
        ffi::divergence_quantize_i2_s(w.as_ptr(), out.as_mut_ptr(), n_out as i64, n_in as i64)
    };
    out.truncate(written);
    Some(out)
}

/// The reference's full I2_S mat-vec for one activation row: quantize, dot
/// every weight row, rescale, exactly as ggml's mul_mat does for I2_S,
/// including where it starts each row (byte `r·n_in/4`) when `n_in` is not
/// a multiple of 128.
pub fn i2s_matvec(tensor: &[u8], n_in: usize, n_out: usize, x: &[f32]) -> Option<Vec<f32>> {
    if n_in == 0
        || n_in > i32::MAX as usize
        || x.len() != n_in
        || tensor.len() < n_in * n_out / 4 + 4
        || !available()
    {
        return None;
    }
    let mut out = vec![0f32; n_out];
    // SAFETY: sizes checked above; the shim reads n_in*n_out/4 code bytes
    // plus the f32 scale after them (row r's n_in/128 blocks from byte
    // r*n_in/4 end by byte (r+1)*n_in/4), and writes n_out floats.
    unsafe {
        ffi::divergence_i2s_matvec(
            tensor.as_ptr(),
            n_in as i64,
            n_out as i64,
            x.as_ptr(),
            out.as_mut_ptr(),
        )
    };
    Some(out)
}
