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
// (codes 0..2), 16-bit lane wrap included. The kernel walks n/128 whole
// blocks (reading n/128*32 bytes of w and n/128*128 of q) and ignores the
// remainder of n.
float divergence_vec_dot_i2_i8_s(int n, const uint8_t * w, const int8_t * q);

// quantize_i2_s: f32 weights to the I2_S layout (codes + f32 scale);
// returns the byte size written (nrow*n_per_row/4 + 32).
size_t divergence_quantize_i2_s(const float * src, uint8_t * dst, int64_t nrow, int64_t n_per_row);

// The reference's I2_S mat-vec output, as ggml_compute_forward_mul_mat
// computes it: row r's dot starts at byte r*n_in/4 of w (its
// src0_row + ir0*nb01/4), then ((float)dot - (float)act_sum) / act_scale *
// weight_scale. Any n_in > 0: that is what the reference does with it.
void divergence_i2s_matvec(const uint8_t * w, int64_t n_in, int64_t n_out, const float * x, float * out);

// Whether the kernel has a code path on this CPU (it has AVX2 and NEON paths
// and no scalar fallback).
int divergence_kernel_available(void);

// Defined in llama.cpp by vendor/patches/06-arch-bitnet-25-and-ffn-act.patch,
// not in shim.c: the FFN activation of arches bitnet, bitnet-b1.58 and
// bitnet-25. 0: each arch's own (bitnet SiLU, the others squared ReLU);
// 1: SiLU (upstream bitnet.cpp's bitnet-b1.58 bug, BitNet issues #588/#602);
// 2: squared ReLU. Read when a graph is built: set it before creating
// contexts.
void divergence_set_ffn_act(int act);

// Defined in llama.cpp by vendor/patches/05-keep-captured-tensors.patch: the
// graphs built from now on keep the tensors with these base names (every
// named tensor when `all` is nonzero) as graph outputs, so their data stays
// valid after llama_decode returns. The names are copied.
void divergence_keep_tensors(const char * const * names, int n, int all);

#ifdef __cplusplus
}
#endif
