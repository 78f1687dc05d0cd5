// The reference's internal kernels, behind plain C signatures, so tests can
// compare our kernels with bitnet.cpp's own functions on the same bytes.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// quantize_row_i8_s: int8 codes into q, returns the scale (127/max) and the
// row sum of the codes through *sum.
float divergence_quantize_row_i8_s(const float * x, int8_t * q, int64_t n, int32_t * sum);

// ggml_vec_dot_i2_i8_s on one row: the raw integer-valued sum of code*q
// (codes 0..2), 16-bit lane wrap included. n must be a multiple of 128.
float divergence_vec_dot_i2_i8_s(int n, const uint8_t * w, const int8_t * q);

// quantize_i2_s: f32 weights to the I2_S layout (codes + f32 scale);
// returns the byte size written (nrow*n_per_row/4 + 32).
size_t divergence_quantize_i2_s(const float * src, uint8_t * dst, int64_t nrow, int64_t n_per_row);

// One row of the reference's I2_S mat-vec output, as ggml_compute_forward_mul_mat
// computes it: ((float)dot - (float)act_sum) / act_scale * weight_scale.
void divergence_i2s_matvec(const uint8_t * w, int64_t n_in, int64_t n_out, const float * x, float * out);

// Whether the kernel has a code path on this CPU (it has AVX2 and NEON paths
// and no scalar fallback).
int divergence_kernel_available(void);

#ifdef __cplusplus
}
#endif
