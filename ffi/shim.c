// Thin, allocation-free wrappers over bitnet.cpp's internal I2_S kernels.
#include "shim.h"
#include "ggml-quants.h"

float divergence_quantize_row_i8_s(const float * x, int8_t * q, int64_t n, int32_t * sum) {
    float scale = 0.0f;
    quantize_row_i8_s(x, q, n, &scale, sum);
    return scale;
}

float divergence_vec_dot_i2_i8_s(int n, const uint8_t * w, const int8_t * q) {
    float s = 0.0f;
    ggml_vec_dot_i2_i8_s(n, &s, 0, w, 0, q, 0, 1);
    return s;
}

size_t divergence_quantize_i2_s(const float * src, uint8_t * dst, int64_t nrow, int64_t n_per_row) {
    return quantize_i2_s(src, dst, nrow, n_per_row, NULL);
}

void divergence_i2s_matvec(const uint8_t * w, int64_t n_in, int64_t n_out, const float * x, float * out) {
    // The weight scale sits right after the packed codes of the whole tensor.
    const float weight_scale = *(const float *)(w + n_in * n_out / 4);
    int8_t q[n_in];
    int32_t act_sum = 0;
    float act_scale = 0.0f;
    quantize_row_i8_s(x, q, n_in, &act_scale, &act_sum);
    for (int64_t r = 0; r < n_out; ++r) {
        float dot = 0.0f;
        ggml_vec_dot_i2_i8_s((int) n_in, &dot, 0, w + r * n_in / 4, 0, q, 0, 1);
        out[r] = (dot - act_sum) / act_scale * weight_scale;
    }
}

int divergence_kernel_available(void) {
#if defined(__AVX2__) || defined(__ARM_NEON)
    return 1;
#else
    return 0;
#endif
}
