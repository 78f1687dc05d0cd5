//! I2_S × int8 kernels with runtime dispatch. `scalar` is the specification;
//! every other file is one instruction set, tested bit for bit against it.

use crate::engine::kv_cache::{KvHead, KvRow};
use crate::quant::act::{act_scale, act_scale_of_max, quantize_row_i8_s, ActQuantVariant, ActRow};

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod scalar;

/// An instruction set the kernels have a path for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    /// `maddubs` with 16-bit lanes (both modes), F16C conversions, FMA.
    Avx2,
    /// `vpdpbusd` on 512-bit registers (exact mode; wrap mode runs AVX2).
    Avx512Vnni,
}

/// The instruction-set path an engine uses for its products: only ever one
/// this CPU supports. The field is private, so safe code can only get a
/// `Kernel` from [`Kernel::detect`], [`Kernel::fastest`], [`Kernel::named`],
/// [`Kernel::available`], [`Kernel::get`] or [`Kernel::SCALAR`], all of
/// which check the CPU; the SIMD calls inside rely on that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel(Isa);

/// The environment variable that forces a kernel path: `scalar`, `avx2` or
/// `avx512` (also `avx512-vnni`). Unset or empty: the fastest this CPU has.
/// A path the CPU cannot run is refused, never silently replaced.
pub const KERNEL_ENV: &str = "DIVERGENCE_KERNEL";

/// Why [`Kernel::detect`] refused the path [`KERNEL_ENV`] asks for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelChoiceError {
    #[error("{KERNEL_ENV}={0:?} names no kernel path (known: scalar, avx2, avx512)")]
    Unknown(String),
    #[error("{KERNEL_ENV}={asked} asks for a kernel path this CPU cannot run: it lacks {lacks}")]
    Unavailable { asked: String, lacks: String },
}

impl Kernel {
    /// The scalar specification: runs anywhere.
    pub const SCALAR: Kernel = Kernel(Isa::Scalar);

    /// The kernel path to use: the one [`KERNEL_ENV`] names if it is set
    /// (refused if unknown or if this CPU lacks its instructions), else
    /// [`Kernel::fastest`].
    pub fn detect() -> Result<Kernel, KernelChoiceError> {
        match std::env::var(KERNEL_ENV) {
            Ok(name) if !name.trim().is_empty() => Self::named(name.trim()),
            _ => Ok(Self::fastest()),
        }
    }

    /// Whether [`KERNEL_ENV`] chose the path [`Kernel::detect`] returns.
    pub fn forced() -> bool {
        std::env::var(KERNEL_ENV).is_ok_and(|v| !v.trim().is_empty())
    }

    /// The kernel path called `name` (`scalar`, `avx2`, `avx512` or
    /// `avx512-vnni`), if this CPU can run it.
    pub fn named(name: &str) -> Result<Kernel, KernelChoiceError> {
        let isa = match name.to_ascii_lowercase().as_str() {
            "scalar" => Isa::Scalar,
            "avx2" => Isa::Avx2,
            "avx512" | "avx512-vnni" => Isa::Avx512Vnni,
            _ => return Err(KernelChoiceError::Unknown(name.to_string())),
        };
        Self::get(isa).ok_or_else(|| KernelChoiceError::Unavailable {
            asked: name.to_string(),
            lacks: missing_features(isa).join(", "),
        })
    }

    /// The fastest kernel this CPU supports.
    pub fn fastest() -> Kernel {
        *Self::available().last().unwrap_or(&Kernel::SCALAR)
    }

    /// Every kernel this CPU can run (the scalar one first).
    pub fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut ks = vec![Kernel::SCALAR];
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::available() {
                ks.push(Kernel(Isa::Avx2));
            }
            if avx512::available() {
                ks.push(Kernel(Isa::Avx512Vnni));
            }
        }
        ks
    }

    /// The kernel for `isa`, if this CPU supports it.
    pub fn get(isa: Isa) -> Option<Kernel> {
        Self::available().into_iter().find(|k| k.0 == isa)
    }

    /// Its instruction set.
    pub fn isa(self) -> Isa {
        self.0
    }

    /// Its name as [`KERNEL_ENV`] and the receipts spell it.
    pub fn name(self) -> &'static str {
        match self.0 {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }

    /// [`scalar::dot_f16`] (the logits product against an F16 matrix), on
    /// the fastest path this kernel's CPU has; always the same bits.
    pub fn dot_f16(self, row: &[u8], x: &[f32]) -> f32 {
        assert_eq!(row.len(), 2 * x.len());
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                // SAFETY: Avx512Vnni is only selected when avx512::available()
                // (which includes avx512f); lengths checked above.
                unsafe { avx512::dot_f16(row, x) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                // SAFETY: Avx2 is only selected when avx2::available()
                // (AVX2, F16C and FMA); lengths checked above.
                unsafe { avx2::dot_f16(row, x) }
            }
            _ => scalar::dot_f16(row, x),
        }
    }

    /// [`Kernel::dot_f16`] of one row with every token of `xs` ([T, n]),
    /// written to `out[t]`; the same bits as one token at a time.
    pub fn dot_f16_tokens(self, row: &[u8], xs: &[f32], out: &mut [f32]) {
        let n = row.len() / 2;
        assert_eq!(xs.len(), n * out.len());
        let x = |t: usize| &xs[t * n..(t + 1) * n];
        let mut t = 0;
        #[cfg(target_arch = "x86_64")]
        if self.0 == Isa::Avx512Vnni {
            while t + 4 <= out.len() {
                // SAFETY: Avx512Vnni is only selected when avx512f is
                // available; each x(t) is n values for a 2n-byte row.
                let s = unsafe { avx512::dot_f16_multi(row, [x(t), x(t + 1), x(t + 2), x(t + 3)]) };
                out[t..t + 4].copy_from_slice(&s);
                t += 4;
            }
        }
        for (t, o) in out.iter_mut().enumerate().skip(t) {
            *o = self.dot_f16(row, x(t));
        }
    }

    /// [`Kernel::dot_f16_tokens`] for consecutive F16 rows of `n` values
    /// (`rows`, 2n bytes each) with the tokens of `xs` ([T, n]):
    /// `out[r * T + t]`, the same bits. A single token takes four rows per
    /// pass on AVX-512, sharing the activation loads.
    pub fn dot_f16_rows(self, n: usize, rows: &[u8], xs: &[f32], out: &mut [f32]) {
        assert!(n > 0);
        assert_eq!((rows.len() % (2 * n), xs.len() % n), (0, 0));
        let (n_rows, n_tok) = (rows.len() / (2 * n), xs.len() / n);
        assert_eq!(out.len(), n_rows * n_tok);
        let mut r = 0;
        #[cfg(target_arch = "x86_64")]
        if self.0 == Isa::Avx512Vnni && n_tok > 1 && n & (scalar::DENSE_LANES - 1) == 0 {
            let row = |r: usize| &rows[2 * n * r..2 * n * (r + 1)];
            let x = |t: usize| &xs[t * n..(t + 1) * n];
            while r + 4 <= n_rows {
                let mut t = 0;
                while t + 4 <= n_tok {
                    // SAFETY: Avx512Vnni is only selected when avx512f is
                    // available; rows are 2n bytes, tokens n values, n a
                    // multiple of 64 (checked above).
                    let s = unsafe {
                        avx512::dot_f16_tile(
                            [row(r), row(r + 1), row(r + 2), row(r + 3)],
                            [x(t), x(t + 1), x(t + 2), x(t + 3)],
                        )
                    };
                    for (i, si) in s.iter().enumerate() {
                        out[(r + i) * n_tok + t..(r + i) * n_tok + t + 4].copy_from_slice(si);
                    }
                    t += 4;
                }
                for i in r..r + 4 {
                    for tt in t..n_tok {
                        out[i * n_tok + tt] = self.dot_f16(row(i), x(tt));
                    }
                }
                r += 4;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if self.0 == Isa::Avx2 && n_tok > 1 && n & (scalar::DENSE_LANES - 1) == 0 {
            // SAFETY: Avx2 is only selected when avx2::available() (AVX2,
            // F16C and FMA); rows are 2n bytes and tokens n values (checked
            // above), n a multiple of 64.
            unsafe { avx2::dot_f16_rows_tiled(n, rows, xs, out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.0 == Isa::Avx2 && n_tok == 1 {
            // SAFETY: as above; one token of n values.
            unsafe { avx2::dot_f16_rows_one_token(rows, xs, out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.0 == Isa::Avx512Vnni && n_tok == 1 {
            while r + 4 <= n_rows {
                // SAFETY: Avx512Vnni is only selected when avx512f is
                // available; the slice is four rows of 2n bytes and x is n values.
                let s = unsafe { avx512::dot_f16_4rows(&rows[2 * n * r..2 * n * (r + 4)], xs) };
                out[r..r + 4].copy_from_slice(&s);
                r += 4;
            }
        }
        for r in r..n_rows {
            let row = &rows[2 * n * r..2 * n * (r + 1)];
            self.dot_f16_tokens(row, xs, &mut out[r * n_tok..(r + 1) * n_tok]);
        }
    }

    /// `out[j] = q · key j` for j < out.len(), each by [`scalar::dot_attn`]
    /// (F16 keys converted exactly); always the same bits.
    pub fn attn_scores(self, q: &[f32], keys: &KvHead<'_>, out: &mut [f32]) {
        assert_eq!(keys.head_dim(), q.len());
        let rows = keys.rows(out.len());
        #[cfg(target_arch = "x86_64")]
        if self.0 != Isa::Scalar {
            // SAFETY: both SIMD kernels are only selected when
            // avx2::available() (AVX2 and F16C); `rows` holds out.len()
            // rows of head_dim, checked equal to q's length above.
            unsafe {
                match rows {
                    KvRow::F16(k) => avx2::dot_attn_rows(q, k, out),
                    KvRow::F32(k) => avx2::dot_attn_rows(q, k, out),
                }
            }
            return;
        }
        let hd = q.len();
        for (j, o) in out.iter_mut().enumerate() {
            *o = match rows {
                KvRow::F16(k) => scalar::dot_attn(k[j * hd..][..hd].iter().map(|v| v.to_f32()), q),
                KvRow::F32(k) => scalar::dot_attn(k[j * hd..][..hd].iter().copied(), q),
            };
        }
    }

    /// `out = Σ_j p[j] · value j` for j < p.len(), each element summed in
    /// order of j by [`scalar::axpy`] from zero; always the same bits.
    pub fn attn_apply(self, p: &[f32], vals: &KvHead<'_>, out: &mut [f32]) {
        let hd = vals.head_dim();
        assert_eq!(hd, out.len());
        let rows = vals.rows(p.len());
        #[cfg(target_arch = "x86_64")]
        if self.0 != Isa::Scalar {
            // SAFETY: both SIMD kernels are only selected when
            // avx2::available() (AVX2 and F16C); `rows` holds p.len() rows
            // of head_dim, checked equal to out's length above.
            unsafe {
                match rows {
                    KvRow::F16(v) => avx2::apply(p, v, out),
                    KvRow::F32(v) => avx2::apply(p, v, out),
                }
            }
            return;
        }
        out.fill(0.0);
        for (j, &pj) in p.iter().enumerate() {
            match rows {
                KvRow::F16(v) => {
                    scalar::axpy(pj, v[j * hd..][..hd].iter().map(|v| v.to_f32()), out)
                }
                KvRow::F32(v) => scalar::axpy(pj, v[j * hd..][..hd].iter().copied(), out),
            }
        }
    }

    /// [`crate::engine::ops::rope`] over [T, n_heads, head_dim] rows at
    /// positions `pos0 + t`, its fused multiply-adds one instruction each
    /// where the CPU has them; always the same bits.
    pub fn rope(
        self,
        x: &mut [f32],
        n_heads: usize,
        head_dim: usize,
        pos0: usize,
        theta_base: f32,
        neox: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.0 != Isa::Scalar {
            // SAFETY: both SIMD kernels are only selected when
            // avx2::available() (AVX2, F16C and FMA); the function reads
            // and writes only `x`.
            unsafe { avx2::rope(x, n_heads, head_dim, pos0, theta_base, neox) };
            return;
        }
        crate::engine::ops::rope(x, n_heads, head_dim, pos0, theta_base, neox)
    }

    /// [`scalar::xor_fold`] with this kernel's widest loads (the bench's
    /// streaming read); always the same bits.
    pub fn xor_fold(self, words: &[u64]) -> u64 {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                // SAFETY: Avx512Vnni is only selected when avx512::available()
                // (which includes avx512f); the kernel reads only `words`.
                unsafe { avx512::xor_fold(words) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                // SAFETY: Avx2 is only selected when avx2::available(); the
                // kernel reads only `words`.
                unsafe { avx2::xor_fold(words) }
            }
            _ => scalar::xor_fold(words),
        }
    }

    /// [`quantize_row_i8_s`] on the fastest path this kernel's CPU has
    /// (SIMD for the reference variant; the bug-zoo variants run the
    /// scalar function); always the same codes, scale and sum.
    pub fn quantize_row(self, x: &[f32], out: &mut [i8], variant: ActQuantVariant) -> ActRow {
        assert_eq!(x.len(), out.len());
        if variant != ActQuantVariant::REFERENCE {
            return quantize_row_i8_s(x, out, variant);
        }
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                let scale = act_scale(x, variant.scale_numerator);
                // SAFETY: Avx512Vnni is only selected when avx512::available()
                // (F/BW/VL included); lengths checked above.
                let sum = unsafe { avx512::quantize_codes(x, scale, out) };
                ActRow { scale, sum }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                // SAFETY: Avx2 is only selected when avx2::available();
                // lengths checked above.
                let max = unsafe { avx2::abs_max(x) };
                let scale = act_scale_of_max(max, variant.scale_numerator);
                // SAFETY: as above.
                let sum = unsafe { avx2::quantize_codes(x, scale, out) };
                ActRow { scale, sum }
            }
            _ => quantize_row_i8_s(x, out, variant),
        }
    }

    /// `out[(r - rows.start) * n_tok + t] = Σ code·q` for the packed rows
    /// `rows` of `w` (row length `n_in`) and the `n_tok` activation rows of
    /// `q`. `wrap` reproduces bitnet.cpp's 16-bit lane wrap.
    pub fn matmul(
        self,
        wrap: bool,
        w: &[u8],
        n_in: usize,
        rows: std::ops::Range<usize>,
        q: &[i8],
        out: &mut [i32],
    ) {
        assert!(n_in > 0);
        assert_eq!(n_in % scalar::BLOCK, 0);
        assert!(w.len() >= rows.end * n_in / 4);
        assert_eq!(q.len() % n_in, 0);
        assert_eq!(out.len(), rows.len() * (q.len() / n_in));
        match self.0 {
            Isa::Scalar => scalar::matmul(wrap, w, n_in, rows, q, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::matmul(wrap, w, n_in, rows, q, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => avx512::matmul(wrap, w, n_in, rows, q, out),
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("no SIMD kernels on this target"),
        }
    }
}

/// The CPU features `isa` needs that this CPU does not report.
fn missing_features(isa: Isa) -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut lacks = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        let needs: &[(&str, bool)] = &[
            ("avx2", is_x86_feature_detected!("avx2")),
            ("f16c", is_x86_feature_detected!("f16c")),
            ("fma", is_x86_feature_detected!("fma")),
            ("avx512f", is_x86_feature_detected!("avx512f")),
            ("avx512bw", is_x86_feature_detected!("avx512bw")),
            ("avx512vl", is_x86_feature_detected!("avx512vl")),
            ("avx512vnni", is_x86_feature_detected!("avx512vnni")),
        ];
        let wanted = match isa {
            Isa::Scalar => 0,
            Isa::Avx2 => 3,
            Isa::Avx512Vnni => needs.len(),
        };
        lacks.extend(needs[..wanted].iter().filter(|n| !n.1).map(|n| n.0));
    }
    #[cfg(not(target_arch = "x86_64"))]
    if isa != Isa::Scalar {
        lacks.push("x86-64");
    }
    lacks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel's read fold is the plain XOR of the words, at every
    /// length around its step sizes and from unaligned starts.
    #[test]
    fn xor_fold_is_the_plain_xor_on_every_kernel() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let words: Vec<u64> = (0..1100)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            })
            .collect();
        for start in [0, 1, 3] {
            for len in [
                0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 129, 1000,
            ] {
                let slice = &words[start..start + len];
                let want = slice.iter().fold(0, |acc, &w| acc ^ w);
                for kernel in Kernel::available() {
                    assert_eq!(kernel.xor_fold(slice), want, "{} len {len}", kernel.name());
                }
            }
        }
    }
}
