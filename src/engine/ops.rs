//! The forward pass's ops, one small function each, in the arithmetic order
//! of the ggml function each one names (so that exact stages can be bit
//! identical to the reference given identical inputs).

use half::f16;

/// Round an f32 through f16 (what an F16 KV cache or ggml's F16 mul_mat
/// conversion of `src1` does to a value).
#[inline(always)]
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// [`round_f16`] of every element, in bulk (F16C where the CPU has it; the
/// same bits as one at a time).
pub fn round_f16_slice(x: &[f32]) -> Vec<f32> {
    use half::slice::HalfFloatSliceExt;
    let mut out = vec![0f32; x.len()];
    let mut half = [f16::ZERO; 256];
    for (src, dst) in x.chunks(half.len()).zip(out.chunks_mut(half.len())) {
        let h = &mut half[..src.len()];
        h.convert_from_f32_slice(src);
        h.convert_to_f32_slice(dst);
    }
    out
}

/// RMSNorm of each row of `x` ([rows, n]), then a separate multiply by `w`.
/// Mirrors ggml_compute_forward_rms_norm_f32 (squares in f32 summed in f64,
/// mean rounded to f32, `1.0f/sqrtf(mean + eps)`, `y = x*scale`) followed by
/// the graph's ggml_mul by the norm weight.
pub fn rms_norm(x: &[f32], n: usize, eps: f32, w: &[f32]) -> Vec<f32> {
    debug_assert_eq!(w.len(), n);
    let mut y = vec![0f32; x.len()];
    for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let mut sum = 0f64;
        for &v in xr {
            sum += (v * v) as f64;
        }
        let mean = (sum / n as f64) as f32;
        let scale = 1.0f32 / (mean + eps).sqrt();
        for ((o, &v), &wi) in yr.iter_mut().zip(xr).zip(w) {
            *o = (v * scale) * wi;
        }
    }
    y
}

/// The bug zoo's RMSNorm: `x / (sqrtf(mean) + eps)`, otherwise as [`rms_norm`].
pub fn rms_norm_eps_outside_sqrt(x: &[f32], n: usize, eps: f32, w: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let sum: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0f32 / (mean.sqrt() + eps);
        for ((o, &v), &wi) in yr.iter_mut().zip(xr).zip(w) {
            *o = (v * scale) * wi;
        }
    }
    y
}

/// Element-wise `a + b` in f32 (residual adds, ggml_add).
pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// Element-wise `a *= b` in f32 (the gated FFN product, ggml_mul, in place).
pub fn mul_assign(a: &mut [f32], b: &[f32]) {
    for (x, &y) in a.iter_mut().zip(b) {
        *x *= y;
    }
}

/// SiLU, `x / (1 + e^-x)` as ggml_silu_f32 (with libm's expf; ggml uses its
/// own exp approximation, so this stage is compared loosely).
pub fn silu(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| v / (1.0f32 + (-v).exp())).collect()
}

/// Squared ReLU, `relu(x)^2` (ggml_relu then ggml_sqr: exact in f32).
pub fn relu2(x: &[f32]) -> Vec<f32> {
    x.iter()
        .map(|&v| {
            let r = v.max(0.0);
            r * r
        })
        .collect()
}

/// The cos/sin table of one position, as ggml_rope_cache_init builds it:
/// `theta` starts at the position and is multiplied by
/// `theta_scale = powf(base, -2/n_dims)` once per pair, all in f32.
#[inline(always)]
pub fn rope_cache(pos: usize, head_dim: usize, theta_base: f32) -> Vec<(f32, f32)> {
    let theta_scale = theta_base.powf(-2.0f32 / head_dim as f32);
    let mut theta = pos as f32;
    let mut cache = Vec::with_capacity(head_dim / 2);
    for _ in 0..head_dim / 2 {
        cache.push((theta.cos(), theta.sin()));
        theta *= theta_scale;
    }
    cache
}

/// NEOX RoPE on one head in place: pairs (i, i + d/2) (ggml mode NEOX).
///
/// The fused multiply-adds are the reference's: ggml is built with
/// `-march=native`, and GCC contracts ggml_compute_forward_rope_f32's
/// `x0*cos - x1*sin` / `x0*sin + x1*cos` into `fma(x0, cos, -(x1*sin))` and
/// `fma(x0, sin, x1*cos)` (read from its object code, and confirmed
/// bit-exact against the reference in both modes).
#[inline(always)]
pub fn rope_neox(head: &mut [f32], cache: &[(f32, f32)]) {
    let half = head.len() / 2;
    for (i, &(c, s)) in cache.iter().enumerate() {
        let x0 = head[i];
        let x1 = head[i + half];
        head[i] = x0.mul_add(c, -(x1 * s));
        head[i + half] = x0.mul_add(s, x1 * c);
    }
}

/// NORM RoPE on one head in place: adjacent pairs (2i, 2i + 1), with the
/// same fused forms as [`rope_neox`].
#[inline(always)]
pub fn rope_norm(head: &mut [f32], cache: &[(f32, f32)]) {
    for (i, &(c, s)) in cache.iter().enumerate() {
        let x0 = head[2 * i];
        let x1 = head[2 * i + 1];
        head[2 * i] = x0.mul_add(c, -(x1 * s));
        head[2 * i + 1] = x0.mul_add(s, x1 * c);
    }
}

/// RoPE over [T, n_heads, head_dim] rows at positions `pos0 + t`.
#[inline(always)]
pub fn rope(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    pos0: usize,
    theta_base: f32,
    neox: bool,
) {
    for (t, row) in x.chunks_exact_mut(n_heads * head_dim).enumerate() {
        let cache = rope_cache(pos0 + t, head_dim, theta_base);
        for head in row.chunks_exact_mut(head_dim) {
            if neox {
                rope_neox(head, &cache);
            } else {
                rope_norm(head, &cache);
            }
        }
    }
}

/// Softmax of `scale * raw[..n]` into `out[..n]` as ggml_compute_forward_soft_max_f32:
/// scale, max subtraction, exps summed in f64, then a multiply by
/// `(float)(1.0/sum)`. Entries from `n` on are written 0 (masked).
pub fn softmax_row(raw: &[f32], n: usize, scale: f32, out: &mut [f32]) {
    let mut max = f32::NEG_INFINITY;
    for &v in &raw[..n] {
        max = max.max(v * scale);
    }
    let mut sum = 0f64;
    for (o, &v) in out[..n].iter_mut().zip(&raw[..n]) {
        let e = (v * scale - max).exp();
        *o = e;
        sum += e as f64;
    }
    let inv = (1.0 / sum) as f32;
    for o in &mut out[..n] {
        *o *= inv;
    }
    for o in &mut out[n..] {
        *o = 0.0;
    }
}
