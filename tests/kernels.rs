//! Kernel and op properties: every optimised path equals its scalar
//! specification bit for bit, the scalar specification equals the plain
//! mathematics (and the reference's known wrap), and the activation
//! quantizer is quantize_row_i8_s.

use divergence::engine::kernels::{scalar, Kernel};
use divergence::engine::kv_cache::{KvCache, KvRow};
use divergence::engine::ops;
use divergence::quant::act::{quantize_row_i8_s, ActQuantVariant};
use divergence::quant::i2s;
use divergence::KvType;
use proptest::prelude::*;

/// Ternary weights [rows, n_in] packed as a tensor, plus int8 activations [t, n_in].
fn case() -> impl Strategy<Value = (usize, usize, Vec<i8>, Vec<i8>)> {
    (1usize..=40, 1usize..=5, 1usize..=3, any::<u64>()).prop_flat_map(|(blocks, rows, t, _)| {
        let n_in = blocks * scalar::BLOCK;
        (
            Just(n_in),
            Just(rows),
            proptest::collection::vec(-1i8..=1, n_in * rows),
            proptest::collection::vec(any::<i8>(), n_in * t),
        )
    })
}

fn pack(w: &[i8]) -> Vec<u8> {
    i2s::pack(w, 1.0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Σ code·q − Σ q is the ternary dot product, exactly.
    #[test]
    fn exact_dot_is_the_ternary_dot((n_in, rows, w, q) in case()) {
        let packed = pack(&w);
        for r in 0..rows {
            let codes = &packed[r * n_in / 4..(r + 1) * n_in / 4];
            for qt in q.chunks_exact(n_in) {
                let want: i32 = w[r * n_in..(r + 1) * n_in].iter().zip(qt).map(|(&a, &b)| a as i32 * b as i32).sum();
                let qsum: i32 = qt.iter().map(|&v| v as i32).sum();
                prop_assert_eq!(scalar::dot_exact(codes, qt) - qsum, want);
            }
        }
    }

    /// The wrap emulation equals exact accumulation reduced per lane mod 2^16.
    #[test]
    fn wrap_is_exact_per_lane_mod_2_16((n_in, rows, w, q) in case()) {
        let packed = pack(&w);
        for r in 0..rows {
            let codes = &packed[r * n_in / 4..(r + 1) * n_in / 4];
            for qt in q.chunks_exact(n_in) {
                // Independent formulation: exact i64 lane sums per group, then
                // each lane reduced to i16 by truncation.
                let mut total = 0i64;
                for (g, group) in codes.chunks(32 * 32).enumerate() {
                    let mut lanes = [0i64; 16];
                    for (b, block) in group.chunks_exact(32).enumerate() {
                        for j in 0..128 {
                            let code = scalar::code_at(block, j) as i64;
                            let v = qt[(g * 32 + b) * 128 + j] as i64;
                            lanes[(j % 32) / 2] += code * v;
                        }
                    }
                    total += lanes.iter().map(|&l| l as i16 as i64).sum::<i64>();
                }
                prop_assert_eq!(scalar::dot_reference_wrap(codes, qt) as i64, total);
            }
        }
    }

    /// Every kernel this CPU has equals the scalar specification, in both
    /// modes, on any row range.
    #[test]
    fn kernels_equal_scalar((n_in, rows, w, q) in case(), wrap in any::<bool>(), start in 0usize..5) {
        let packed = pack(&w);
        let start = start.min(rows - 1);
        let bad = kernels_differing_from_scalar(wrap, &packed, n_in, start..rows, &q);
        prop_assert!(bad.is_empty(), "kernels {:?} differ from scalar", bad);
    }

    /// The same on raw bytes: any 2-bit code, including the unused code 3,
    /// and row lengths past one 4096-value wrap group.
    #[test]
    fn kernels_equal_scalar_on_raw_bytes(
        blocks in 1usize..=72,
        seed in any::<u64>(),
        wrap in any::<bool>(),
    ) {
        let n_in = blocks * scalar::BLOCK;
        let rows = 3;
        let mut next = xorshift(seed);
        let w: Vec<u8> = (0..n_in * rows / 4).map(|_| next() as u8).collect();
        let q: Vec<i8> = (0..n_in * 2).map(|_| next() as i8).collect();
        let bad = kernels_differing_from_scalar(wrap, &w, n_in, 0..rows, &q);
        prop_assert!(bad.is_empty(), "kernels {:?} differ from scalar", bad);
    }

    /// The F16 logits dot: every kernel equals the 16-lane specification
    /// bit for bit (any length, tails included), and the specification is
    /// within n·eps·Σ|a·x| of the f64 dot.
    #[test]
    fn dense_f16_dot_kernels_equal_scalar(
        vals in proptest::collection::vec(-4f32..4.0, 1..700),
        seed in any::<u32>(),
    ) {
        let n = vals.len();
        let row: Vec<u8> = vals.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let x: Vec<f32> = (0..n).map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 / u32::MAX as f32 - 0.5).collect();
        let want = scalar::dot_f16(&row, &x);
        for k in Kernel::available() {
            prop_assert_eq!(k.dot_f16(&row, &x).to_bits(), want.to_bits(), "kernel {}", k.name());
            // Several tokens at once (the prefill tile plus a remainder).
            let t = 1 + (seed as usize % 7);
            let xs: Vec<f32> = (0..t).flat_map(|ti| x.iter().map(move |&v| v * (ti as f32 + 1.0))).collect();
            let mut multi = vec![0f32; t];
            k.dot_f16_tokens(&row, &xs, &mut multi);
            for ti in 0..t {
                let one = scalar::dot_f16(&row, &xs[ti * n..(ti + 1) * n]);
                prop_assert_eq!(multi[ti].to_bits(), one.to_bits(), "kernel {} token {}", k.name(), ti);
            }
        }
        let exact: f64 = row.chunks_exact(2).zip(&x).map(|(b, &xi)| half::f16::from_le_bytes([b[0], b[1]]).to_f64() * xi as f64).sum();
        let mag: f64 = row.chunks_exact(2).zip(&x).map(|(b, &xi)| (half::f16::from_le_bytes([b[0], b[1]]).to_f64() * xi as f64).abs()).sum();
        prop_assert!((want as f64 - exact).abs() <= n as f64 * f32::EPSILON as f64 * mag + 1e-30);
    }

    /// Consecutive F16 rows at once (the decode logits take four per pass,
    /// with the specification's lane fold done in registers): the same
    /// bits as one row at a time, for any row count and length.
    #[test]
    fn dense_f16_rows_equal_one_row_at_a_time(
        n in prop_oneof![1usize..300, (1usize..6).prop_map(|m| 64 * m)],
        rows in 1usize..=9,
        t in 1usize..=5,
        seed in any::<u64>(),
    ) {
        let mut raw = xorshift(seed);
        let mut next = move || {
            let x = raw();
            (x % 20001) as f32 / 2500.0 - 4.0
        };
        let data: Vec<u8> = (0..rows * n).flat_map(|_| half::f16::from_f32(next()).to_le_bytes()).collect();
        let xs: Vec<f32> = (0..t * n).map(|_| next()).collect();
        for k in Kernel::available() {
            let mut got = vec![0f32; rows * t];
            k.dot_f16_rows(n, &data, &xs, &mut got);
            for r in 0..rows {
                for ti in 0..t {
                    let want = scalar::dot_f16(&data[2 * n * r..2 * n * (r + 1)], &xs[ti * n..(ti + 1) * n]);
                    prop_assert_eq!(got[r * t + ti].to_bits(), want.to_bits(), "kernel {} row {} token {}", k.name(), r, ti);
                }
            }
        }
    }

    /// Products over many rows and tokens (decode takes four rows per
    /// pass; prefill unpacks blocks of 16 rows and takes tiles of two rows
    /// by six tokens on AVX2, four by four on AVX-512) equal the
    /// specification on raw bytes, in both modes, from any start row, odd
    /// block counts, several row blocks and remainders included.
    #[test]
    fn row_and_token_tiles_equal_scalar(
        blocks in 1usize..=40,
        rows in 1usize..=37,
        t in 1usize..=14,
        start in 0usize..4,
        wrap in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let n_in = blocks * scalar::BLOCK;
        let start = start.min(rows - 1);
        let mut next = xorshift(seed);
        let w: Vec<u8> = (0..n_in * rows / 4).map(|_| next() as u8).collect();
        let q: Vec<i8> = (0..n_in * t).map(|_| next() as i8).collect();
        let bad = kernels_differing_from_scalar(wrap, &w, n_in, start..rows, &q);
        prop_assert!(bad.is_empty(), "kernels {:?} differ from scalar (wrap {})", bad, wrap);
    }

    /// Every kernel's activation quantizer is quantize_row_i8_s: same
    /// codes, scale and sum, on rows with exact .5 ties (max 127 makes the
    /// scale 1), huge and tiny values, infinities and NaN, any length.
    #[test]
    fn kernel_act_quant_is_quantize_row_i8_s(
        halves in proptest::collection::vec(-254i32..=254, 1..300),
        special in proptest::collection::vec((0usize..300, prop_oneof![
            Just(f32::NAN), Just(f32::INFINITY), Just(-1e30f32), Just(1e-30f32), -1e3f32..1e3,
        ]), 0..3),
        with_max in any::<bool>(),
    ) {
        let mut x: Vec<f32> = halves.iter().map(|&h| h as f32 / 2.0).collect();
        if with_max {
            x[0] = 127.0;
        }
        for (at, v) in special {
            let n = x.len();
            x[at % n] = v;
        }
        let mut want = vec![0i8; x.len()];
        let want_row = quantize_row_i8_s(&x, &mut want, ActQuantVariant::REFERENCE);
        for k in Kernel::available() {
            let mut got = vec![0i8; x.len()];
            let row = k.quantize_row(&x, &mut got, ActQuantVariant::REFERENCE);
            prop_assert_eq!(&got, &want, "kernel {}", k.name());
            prop_assert_eq!(row.scale.to_bits(), want_row.scale.to_bits());
            prop_assert_eq!(row.sum, want_row.sum);
        }
    }

    /// quantize_row_i8_s: codes are ggml's nearest_int (magic-number
    /// rounding, ties to even) of x·s with s = (float)(127 / max(|x|, 1e-5)),
    /// with `x*s + 12582912.0f` fused into one FMA as GCC compiles it.
    #[test]
    fn act_quant_is_quantize_row_i8_s(x in proptest::collection::vec(-1e3f32..1e3, 1..300)) {
        let mut q = vec![0i8; x.len()];
        let row = quantize_row_i8_s(&x, &mut q, ActQuantVariant::REFERENCE);
        let max = x.iter().fold(1e-5f64, |m, &v| m.max((v as f64).abs()));
        let s = (127.0 / max) as f32;
        prop_assert_eq!(row.scale.to_bits(), s.to_bits());
        let mut sum = 0i32;
        for (&xi, &qi) in x.iter().zip(&q) {
            let val = xi.mul_add(s, 12582912.0f32);
            let n = (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000;
            let n = n.clamp(-128, 127);
            prop_assert_eq!(qi as i32, n);
            sum += n;
        }
        prop_assert_eq!(row.sum, sum);
    }

    /// RMSNorm: the f32 result is within 4 ULP-ish relative error of f64 math.
    #[test]
    fn rms_norm_is_close_to_f64(x in proptest::collection::vec(-10f32..10.0, 1..200), eps in 1e-7f32..1e-4) {
        let n = x.len();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 5) as f32 * 0.1).collect();
        let y = ops::rms_norm(&x, n, eps, &w);
        let mean = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
        let scale = 1.0 / (mean + eps as f64).sqrt();
        for i in 0..n {
            let want = x[i] as f64 * scale * w[i] as f64;
            prop_assert!((y[i] as f64 - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs().max(1e-30), "{} vs {}", y[i], want);
        }
    }

    /// NEOX RoPE rotates (i, i + d/2); NORM RoPE rotates (2i, 2i + 1); both
    /// preserve each pair's norm and agree with f64 within a few ULP of the
    /// pair's magnitude (the angle itself is built in f32 as ggml does).
    #[test]
    fn rope_pairs(x in proptest::collection::vec(-4f32..4.0, 64), pos in 0usize..512) {
        for neox in [true, false] {
            let mut y = x.clone();
            ops::rope(&mut y, 1, 64, pos, 10000.0, neox);
            for i in 0..32 {
                let (a, b) = if neox { (i, i + 32) } else { (2 * i, 2 * i + 1) };
                let n0 = (x[a] as f64).hypot(x[b] as f64);
                let n1 = (y[a] as f64).hypot(y[b] as f64);
                prop_assert!((n0 - n1).abs() <= 1e-5 * n0.max(1.0));
            }
        }
    }

    /// Softmax rows sum to 1, masked entries are 0, and values match f64.
    #[test]
    fn softmax_row_matches_f64(raw in proptest::collection::vec(-30f32..30.0, 1..100), cut in 0usize..100) {
        let n = 1 + cut % raw.len();
        let mut p = vec![9f32; raw.len()];
        ops::softmax_row(&raw, n, 0.125, &mut p);
        let max = raw[..n].iter().map(|&v| (v * 0.125) as f64).fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = raw[..n].iter().map(|&v| ((v * 0.125) as f64 - max).exp()).sum();
        for j in 0..raw.len() {
            if j < n {
                let want = (((raw[j] * 0.125) as f64 - max).exp()) / sum;
                prop_assert!((p[j] as f64 - want).abs() <= 1e-6 * want.max(1e-6) + 1e-7);
            } else {
                prop_assert_eq!(p[j], 0.0);
            }
        }
    }

    /// Bulk f16 rounding is element-wise f16 rounding (any f32 bits:
    /// subnormals, overflow to infinity, ties; NaN stays NaN).
    #[test]
    fn bulk_f16_rounding_is_elementwise(bits_in in proptest::collection::vec(any::<u32>(), 0..700)) {
        let x: Vec<f32> = bits_in.iter().map(|&b| f32::from_bits(b)).collect();
        let got = ops::round_f16_slice(&x);
        prop_assert_eq!(got.len(), x.len());
        for (&g, &v) in got.iter().zip(&x) {
            let want = ops::round_f16(v);
            prop_assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "{} -> {} vs {}", v, g, want);
        }
    }

    /// Attention over a cache, every kernel against the scalar specification
    /// bit for bit (both cache types, head sizes that are not a multiple of
    /// the lanes, key counts that are not a multiple of the 4-key groups),
    /// and the specification against f64.
    #[test]
    fn attention_kernels_equal_scalar(
        hd in 1usize..=160,
        n_keys in 0usize..=41,
        f16 in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let kv_heads = 2;
        let ty = if f16 { KvType::F16 } else { KvType::F32 };
        // Room for more positions than are written: each kv head's block
        // starts `capacity` rows after the previous one.
        let cache = KvCache::new(ty, 1, n_keys + 3, kv_heads * hd, hd);
        let mut raw = xorshift(seed);
        let mut next = move || {
            let x = raw();
            (x >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        };
        let mut written = Vec::new();
        for pos in 0..n_keys {
            let k: Vec<f32> = (0..kv_heads * hd).map(|_| next()).collect();
            let v: Vec<f32> = (0..kv_heads * hd).map(|_| next()).collect();
            cache.write(0, pos, &k, &v);
            written.push((k, v));
        }
        let q: Vec<f32> = (0..hd).map(|_| next()).collect();
        let p: Vec<f32> = (0..n_keys).map(|_| next().abs()).collect();
        // The cache hands back, per kv head and position, what was written
        // there (rounded to half in an F16 cache).
        for (pos, (k, v)) in written.iter().enumerate() {
            for kvh in 0..kv_heads {
                let want = |x: &[f32]| -> Vec<f64> {
                    x[kvh * hd..(kvh + 1) * hd]
                        .iter()
                        .map(|&e| if f16 { half::f16::from_f32(e).to_f64() } else { e as f64 })
                        .collect()
                };
                prop_assert_eq!(kv_row_f64(cache.keys(0, kvh).row(pos)), want(k));
                prop_assert_eq!(kv_row_f64(cache.values(0, kvh).row(pos)), want(v));
            }
        }
        for kvh in 0..kv_heads {
            let (keys, vals) = (cache.keys(0, kvh), cache.values(0, kvh));
            let mut want_s = vec![0f32; n_keys];
            Kernel::SCALAR.attn_scores(&q, &keys, &mut want_s);
            let mut want_o = vec![7f32; hd];
            Kernel::SCALAR.attn_apply(&p, &vals, &mut want_o);
            // The specification is the mathematics, to f32 rounding.
            for (j, &s) in want_s.iter().enumerate() {
                let k = kv_row_f64(keys.row(j));
                let exact: f64 = q.iter().zip(&k).map(|(&a, &b)| a as f64 * b).sum();
                let mag: f64 = q.iter().zip(&k).map(|(&a, &b)| (a as f64 * b).abs()).sum();
                prop_assert!((s as f64 - exact).abs() <= 1e-5 * mag + 1e-30, "score {} vs {}", s, exact);
            }
            for (d, &o) in want_o.iter().enumerate() {
                let exact: f64 = (0..n_keys).map(|j| p[j] as f64 * kv_row_f64(vals.row(j))[d]).sum();
                let mag: f64 = (0..n_keys).map(|j| (p[j] as f64 * kv_row_f64(vals.row(j))[d]).abs()).sum();
                prop_assert!((o as f64 - exact).abs() <= 1e-5 * mag + 1e-30, "apply {} vs {}", o, exact);
            }
            for kernel in Kernel::available() {
                let mut s = vec![0f32; n_keys];
                kernel.attn_scores(&q, &keys, &mut s);
                prop_assert_eq!(bits(&s), bits(&want_s), "{:?} scores", kernel);
                let mut o = vec![-3f32; hd];
                kernel.attn_apply(&p, &vals, &mut o);
                prop_assert_eq!(bits(&o), bits(&want_o), "{:?} apply", kernel);
            }
        }
    }
}

#[test]
fn issue_629_example_in_every_kernel() {
    // All codes 2 and q = 127 over 4096 values: exact 1,040,384; the
    // reference's 16-bit lanes give -8192.
    let codes = vec![0b1010_1010u8; 4096 / 4];
    let q = vec![127i8; 4096];
    for k in Kernel::available() {
        let mut out = [0i32; 1];
        k.matmul(false, &codes, 4096, 0..1, &q, &mut out);
        assert_eq!(out[0], 1_040_384, "{}", k.name());
        k.matmul(true, &codes, 4096, 0..1, &q, &mut out);
        assert_eq!(out[0], -8192, "{}", k.name());
    }
}

#[test]
fn long_rows_and_odd_row_counts_in_every_kernel() {
    // Rows over 4096 values (a full wrap group plus a partial one), 7 rows,
    // 9 tokens (a whole prefill tile and a partial one), extreme
    // activations so that lanes do wrap.
    let n_in = 4096 + 3 * 128;
    let rows = 7;
    let n_tok = 9;
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
    let w: Vec<i8> = (0..n_in * rows)
        .map(|_| if next().is_multiple_of(4) { 0 } else { 1 })
        .collect();
    let q: Vec<i8> = (0..n_in * n_tok)
        .map(|i| if i % 11 == 0 { -128 } else { 127 })
        .collect();
    let packed = i2s::pack(&w, 1.0);
    for wrap in [false, true] {
        let bad = kernels_differing_from_scalar(wrap, &packed, n_in, 0..rows, &q);
        assert!(
            bad.is_empty(),
            "kernels {bad:?} differ from scalar, wrap={wrap}"
        );
    }
    let mut exact = vec![0i32; rows * n_tok];
    let mut wrapped = vec![0i32; rows * n_tok];
    Kernel::SCALAR.matmul(false, &packed, n_in, 0..rows, &q, &mut exact);
    Kernel::SCALAR.matmul(true, &packed, n_in, 0..rows, &q, &mut wrapped);
    assert_ne!(exact, wrapped, "this input must provoke the wrap");
}

/// Not a test: single-threaded matvec GB/s of every kernel on a
/// 2B-4T-sized ffn_up (6912 × 2560) (`cargo test --release --test kernels
/// -- --ignored --nocapture`). `divergence bench --kernel` compares with the
/// reference.
#[test]
#[ignore]
fn kernel_speed_report() {
    let (n_in, rows) = (2560, 6912);
    let w: Vec<u8> = (0..n_in * rows / 4)
        .map(|i| ((i * 2654435761usize) >> 7) as u8 & 0b1010_1010)
        .collect();
    let q: Vec<i8> = (0..n_in).map(|i| (i * 31 % 255) as i8).collect();
    for k in Kernel::available() {
        for wrap in [false, true] {
            let mut out = vec![0i32; rows];
            let reps = 50;
            let t0 = std::time::Instant::now();
            for _ in 0..reps {
                k.matmul(wrap, &w, n_in, 0..rows, &q, &mut out);
            }
            let s = t0.elapsed().as_secs_f64();
            eprintln!(
                "{:12} wrap={wrap:5}: {:.2} GB/s ({:.0} µs per matvec)",
                k.name(),
                (w.len() * reps) as f64 / s / 1e9,
                s / reps as f64 * 1e6
            );
        }
    }
}

/// Not a test: single-threaded GB/s and GFLOP/s of every kernel's F16
/// logits product over 2048 vocabulary rows of 2560 values, one token and
/// a 128-token prefill (`cargo test --release --test kernels -- --ignored
/// --nocapture`).
#[test]
#[ignore]
fn f16_rows_speed_report() {
    let (n, rows) = (2560, 2048);
    let mut next = xorshift(7);
    let data: Vec<u8> = (0..n * rows)
        .flat_map(|_| half::f16::from_f32((next() % 2001) as f32 / 1000.0 - 1.0).to_le_bytes())
        .collect();
    for t in [1, 128] {
        let xs: Vec<f32> = (0..n * t).map(|i| (i % 97) as f32 / 97.0 - 0.5).collect();
        for k in Kernel::available() {
            let mut out = vec![0f32; rows * t];
            let reps = if t == 1 { 50 } else { 2 };
            let t0 = std::time::Instant::now();
            for _ in 0..reps {
                k.dot_f16_rows(n, &data, &xs, &mut out);
            }
            let s = t0.elapsed().as_secs_f64() / reps as f64;
            eprintln!(
                "{:12} {t:3} token(s): {:.2} GB/s, {:.1} GFLOP/s ({:.1} ms)",
                k.name(),
                data.len() as f64 / s / 1e9,
                2.0 * (n * rows * t) as f64 / s / 1e9,
                s * 1e3
            );
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn kv_row_f64(row: KvRow<'_>) -> Vec<f64> {
    match row {
        KvRow::F16(r) => r.iter().map(|v| v.to_f64()).collect(),
        KvRow::F32(r) => r.iter().map(|&v| v as f64).collect(),
    }
}

/// A xorshift64 stream (deterministic test data from one seed).
fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// The kernels whose I2_S product of `rows` of `w` with `q` is not
/// bit-identical to the scalar specification's.
fn kernels_differing_from_scalar(
    wrap: bool,
    w: &[u8],
    n_in: usize,
    rows: std::ops::Range<usize>,
    q: &[i8],
) -> Vec<&'static str> {
    let mut want = vec![0i32; rows.len() * (q.len() / n_in)];
    Kernel::SCALAR.matmul(wrap, w, n_in, rows.clone(), q, &mut want);
    Kernel::available()
        .into_iter()
        .filter(|k| {
            let mut got = vec![0i32; want.len()];
            k.matmul(wrap, w, n_in, rows.clone(), q, &mut got);
            got != want
        })
        .map(Kernel::name)
        .collect()
}
