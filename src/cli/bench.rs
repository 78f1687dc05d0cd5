//! `divergence bench`: both engines on the same GGUF, same threads, same
//! machine, measured in one run; ratios, not absolute claims.
//!
//! Model mode: prefill tokens/s and decode tokens/s of each engine, the
//! weight bytes a decode token streams and the effective GB/s, peak RSS.
//! Kernel mode (`--kernel`): our I2_S mat-vec (activation quantization, the
//! integer product, the f32 epilogue) against the reference's
//! `quantize_row_i8_s` + `ggml_vec_dot_i2_i8_s` through the shim, single
//! thread, on the same packed bytes.

use super::CliResult;
use anyhow::{anyhow, Context as _};
use divergence::engine::kernels::Kernel;
use divergence::engine::{Engine, EngineOptions, KvType};
use divergence::gguf::GgufFile;
use divergence::quant::act::{quantize_row_i8_s, ActQuantVariant};
use divergence::reference::worker::{default_exe, peak_rss_of, Worker};
use divergence::reference::{kernels, CaptureFilter, ContextOptions};
use divergence::trace::NoTrace;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model (model mode).
    #[arg(long, required_unless_present = "kernel")]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prefill: usize,
    /// Decode steps measured.
    #[arg(long, default_value_t = 32)]
    decode: usize,
    /// Time the I2_S mat-vec kernels instead of whole models.
    #[arg(long)]
    kernel: bool,
    /// Kernel mode: input length (row length) and output rows.
    #[arg(long, default_value_t = 2560)]
    n_in: usize,
    #[arg(long, default_value_t = 6912)]
    n_out: usize,
    /// Kernel mode: repetitions.
    #[arg(long, default_value_t = 200)]
    reps: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct EngineNumbers {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    decode_gb_s: f64,
    peak_rss_bytes: Option<u64>,
}

#[derive(Serialize)]
struct ModelReport {
    model: String,
    file_bytes: u64,
    threads: usize,
    prefill_tokens: usize,
    decode_tokens: usize,
    weight_bytes_per_decode_token: u64,
    kv_cache_bytes: u64,
    candidate_kernel: String,
    candidate: EngineNumbers,
    reference: EngineNumbers,
    decode_ratio: f64,
    prefill_ratio: f64,
    /// Candidate peak RSS over (file + KV cache); the target is <= 1.10.
    candidate_rss_over_file_plus_kv: Option<f64>,
}

#[derive(Serialize)]
struct KernelReport {
    n_in: usize,
    n_out: usize,
    reps: usize,
    weight_bytes: usize,
    candidate_kernel: String,
    candidate_gb_s: f64,
    reference_gb_s: f64,
    ratio: f64,
    outputs_equal: bool,
}

pub fn run(args: Args) -> CliResult {
    if args.threads == 0 || args.threads > 256 {
        return Err(anyhow!("--threads must be between 1 and 256").into());
    }
    if args.kernel {
        return kernel_bench(&args);
    }
    let model = args
        .model
        .clone()
        .ok_or_else(|| anyhow!("--model is required"))?;
    if args.prefill == 0 || args.decode == 0 || args.prefill + args.decode + 1 > 4096 {
        return Err(
            anyhow!("--prefill and --decode must be positive and fit a 4096 context").into(),
        );
    }
    let file =
        Arc::new(GgufFile::open(&model).with_context(|| format!("reading {}", model.display()))?);
    let n_ctx = args.prefill + args.decode + 8;
    let opts = EngineOptions {
        threads: args.threads,
        kv_type: KvType::F16,
        n_ctx,
        ..Default::default()
    };
    let mut engine = Engine::from_gguf(file.clone(), opts)?;
    let c = engine.config().clone();
    let prompt: Vec<u32> = (0..args.prefill)
        .map(|i| 3 + (i as u32 * 7919) % (c.n_vocab as u32 - 3))
        .collect();

    // Candidate.
    engine.forward(&prompt[..8.min(prompt.len())], &mut NoTrace)?; // warm the page cache
    engine.reset();
    let t = Instant::now();
    let logits = engine.forward(&prompt, &mut NoTrace)?;
    let cand_prefill = args.prefill as f64 / t.elapsed().as_secs_f64();
    let mut next = divergence::compare::metrics::argmax(&logits[logits.len() - c.n_vocab..]) as u32;
    let t = Instant::now();
    for _ in 0..args.decode {
        let l = engine.forward(&[next], &mut NoTrace)?;
        next = divergence::compare::metrics::argmax(&l) as u32;
    }
    let cand_decode = args.decode as f64 / t.elapsed().as_secs_f64();
    let cand_rss = peak_rss_of("/proc/self/status");
    let weight_bytes = engine.weight_bytes();
    drop(engine);

    // Reference, in its worker, capturing nothing.
    let ctx = ContextOptions {
        threads: args.threads,
        kv_type: KvType::F16,
        n_ctx,
        n_batch: n_ctx,
    };
    let exe = default_exe().map_err(anyhow::Error::from)?;
    let mut reference =
        Worker::start(&exe, &model, &ctx, CaptureFilter::none()).map_err(|e| super::Failure {
            code: 3,
            error: e.into(),
        })?;
    let ref_err = |e: divergence::reference::RefError| super::Failure {
        code: 3,
        error: e.into(),
    };
    reference
        .decode(&prompt[..8.min(prompt.len())], 0)
        .map_err(ref_err)?;
    reference.clear_kv().map_err(ref_err)?;
    let t = Instant::now();
    let (logits, _) = reference.decode(&prompt, 0).map_err(ref_err)?;
    let ref_prefill = args.prefill as f64 / t.elapsed().as_secs_f64();
    let mut next = divergence::compare::metrics::argmax(&logits[logits.len() - c.n_vocab..]) as u32;
    let t = Instant::now();
    for i in 0..args.decode {
        let (l, _) = reference
            .decode(&[next], args.prefill + i)
            .map_err(ref_err)?;
        next = divergence::compare::metrics::argmax(&l) as u32;
    }
    let ref_decode = args.decode as f64 / t.elapsed().as_secs_f64();
    let ref_rss = reference.peak_rss_bytes();
    drop(reference);

    let kv_bytes = (2 * c.n_layer * n_ctx * c.n_embd_kv() * 2) as u64;
    let gb = |tok_s: f64| weight_bytes as f64 * tok_s / 1e9;
    let report = ModelReport {
        model: model.display().to_string(),
        file_bytes: file.file_size(),
        threads: args.threads,
        prefill_tokens: args.prefill,
        decode_tokens: args.decode,
        weight_bytes_per_decode_token: weight_bytes,
        kv_cache_bytes: kv_bytes,
        candidate_kernel: Kernel::detect().name().into(),
        candidate: EngineNumbers {
            prefill_tok_s: cand_prefill,
            decode_tok_s: cand_decode,
            decode_gb_s: gb(cand_decode),
            peak_rss_bytes: cand_rss,
        },
        reference: EngineNumbers {
            prefill_tok_s: ref_prefill,
            decode_tok_s: ref_decode,
            decode_gb_s: gb(ref_decode),
            peak_rss_bytes: ref_rss,
        },
        decode_ratio: cand_decode / ref_decode,
        prefill_ratio: cand_prefill / ref_prefill,
        candidate_rss_over_file_plus_kv: cand_rss
            .map(|r| r as f64 / (file.file_size() + kv_bytes) as f64),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)?
        );
    } else {
        let mb = |b: Option<u64>| {
            b.map(|b| format!("{:.0} MiB", b as f64 / 1048576.0))
                .unwrap_or("?".into())
        };
        println!(
            "model {} ({:.0} MiB), {} threads, candidate kernel {}",
            report.model,
            report.file_bytes as f64 / 1048576.0,
            args.threads,
            report.candidate_kernel
        );
        println!(
            "{:<12} {:>14} {:>14} {:>12} {:>12}",
            "engine", "prefill tok/s", "decode tok/s", "decode GB/s", "peak RSS"
        );
        for (name, n) in [
            ("candidate", &report.candidate),
            ("bitnet.cpp", &report.reference),
        ] {
            println!(
                "{name:<12} {:>14.1} {:>14.2} {:>12.2} {:>12}",
                n.prefill_tok_s,
                n.decode_tok_s,
                n.decode_gb_s,
                mb(n.peak_rss_bytes)
            );
        }
        println!(
            "ratio (candidate / bitnet.cpp): prefill {:.2}x, decode {:.2}x",
            report.prefill_ratio, report.decode_ratio
        );
        println!(
            "weights streamed per decode token: {:.1} MiB; candidate RSS / (file + KV): {}",
            weight_bytes as f64 / 1048576.0,
            report
                .candidate_rss_over_file_plus_kv
                .map(|r| format!("{r:.2}"))
                .unwrap_or("?".into())
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn kernel_bench(args: &Args) -> CliResult {
    let (n_in, n_out) = (args.n_in, args.n_out);
    if n_in == 0 || n_in % 128 != 0 || n_out == 0 || args.reps == 0 {
        return Err(anyhow!(
            "--n-in must be a positive multiple of 128; --n-out and --reps positive"
        )
        .into());
    }
    if !kernels::available() {
        return Err(anyhow!(
            "the reference's I2_S kernel has no code path on this CPU (needs AVX2)"
        )
        .into());
    }
    // Deterministic ternary weights and activations.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let ternary: Vec<i8> = (0..n_in * n_out).map(|_| (next() % 3) as i8 - 1).collect();
    let packed = divergence::quant::i2s::pack(&ternary, 0.25);
    let x: Vec<f32> = (0..n_in)
        .map(|_| ((next() % 2001) as f32 - 1000.0) / 250.0)
        .collect();
    let kernel = Kernel::detect();
    let codes = &packed[..n_in * n_out / 4];
    let w_scale = 0.25f32;

    let ours = |out: &mut Vec<f32>| {
        let mut q = vec![0i8; n_in];
        let row = quantize_row_i8_s(&x, &mut q, ActQuantVariant::REFERENCE);
        let mut acc = vec![0i32; n_out];
        kernel.matmul(false, codes, n_in, 0..n_out, &q, &mut acc);
        out.clear();
        out.extend(
            acc.iter()
                .map(|&d| (d as f32 - row.sum as f32) / row.scale * w_scale),
        );
    };
    let mut out_ours = Vec::new();
    ours(&mut out_ours);
    let t = Instant::now();
    for _ in 0..args.reps {
        ours(&mut out_ours);
    }
    let ours_s = t.elapsed().as_secs_f64() / args.reps as f64;

    let mut out_ref = kernels::i2s_matvec(&packed, n_in, n_out, &x)
        .ok_or_else(|| anyhow!("shim refused the shape"))?;
    let t = Instant::now();
    for _ in 0..args.reps {
        out_ref = kernels::i2s_matvec(&packed, n_in, n_out, &x)
            .ok_or_else(|| anyhow!("shim refused the shape"))?;
    }
    let ref_s = t.elapsed().as_secs_f64() / args.reps as f64;
    let bytes = n_in * n_out / 4;
    let report = KernelReport {
        n_in,
        n_out,
        reps: args.reps,
        weight_bytes: bytes,
        candidate_kernel: kernel.name().into(),
        candidate_gb_s: bytes as f64 / ours_s / 1e9,
        reference_gb_s: bytes as f64 / ref_s / 1e9,
        ratio: ref_s / ours_s,
        outputs_equal: out_ours
            .iter()
            .zip(&out_ref)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)?
        );
    } else {
        println!(
            "I2_S mat-vec {n_in} x {n_out} ({:.2} MiB of codes), 1 thread, {} reps",
            bytes as f64 / 1048576.0,
            args.reps
        );
        println!(
            "candidate ({:<11}) {:>8.2} GB/s",
            report.candidate_kernel, report.candidate_gb_s
        );
        println!(
            "bitnet.cpp (AVX2)       {:>8.2} GB/s",
            report.reference_gb_s
        );
        println!(
            "ratio {:.2}x; outputs bit-identical: {}",
            report.ratio, report.outputs_equal
        );
    }
    Ok(ExitCode::SUCCESS)
}
