//! `divergence bench`: both engines on the same GGUF, same threads, same
//! machine, measured in one run; ratios, not absolute claims.
//!
//! Model mode: prefill tokens/s and decode tokens/s of each engine, the
//! weight bytes a decode token streams and the effective GB/s, peak RSS,
//! and that GB/s as a fraction of the machine's streaming read bandwidth,
//! measured around every round (`bandwidth`).
//! Kernel mode (`--kernel`): our I2_S mat-vec (activation quantization on
//! the engine's path, the integer product, the f32 epilogue) against the reference's
//! `quantize_row_i8_s` + `ggml_vec_dot_i2_i8_s` through the shim, single
//! thread, on the same packed bytes.

use super::CliResult;
use anyhow::{anyhow, Context as _};
use divergence::compare::metrics::argmax;
use divergence::engine::kernels::Kernel;
use divergence::engine::{Engine, EngineOptions};
use divergence::gguf::GgufFile;
use divergence::quant::act::ActQuantVariant;
use divergence::reference::worker::{default_exe, peak_rss_of, Worker};
use divergence::reference::{kernels, CaptureFilter, ContextOptions};
use divergence::trace::{NoTrace, StageClock, TraceSink};
use divergence::KvType;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

mod bandwidth;

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
    /// Model mode: rounds of (prefill, decode) per engine, alternating which
    /// engine goes first; medians are reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
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
    /// Kernel mode: activation rows per product (1: the decode's mat-vec;
    /// more: a prefill's mat-mat, against the reference's mat-vec per row).
    #[arg(long, default_value_t = 1)]
    tokens: usize,
    #[arg(long)]
    json: bool,
    /// Model mode: also time the candidate's decode stage by stage (the
    /// untraced code path, a clock read between stages).
    #[arg(long)]
    stages: bool,
    /// Model mode: also time `divergence find` (resync, the same prompt,
    /// steps and threads, in a child process as a user runs it) against the
    /// two engines alone in the same round: the lockstep's cost ratio.
    #[arg(long)]
    lockstep: bool,
    /// Model mode: also time `divergence sweep` over this corpus on the
    /// same model and threads (free mode, the oracle judge on, both
    /// engines loaded once): prompts per minute, after the engine rounds.
    #[arg(long, value_name = "CORPUS")]
    sweep: Option<PathBuf>,
    /// With `--sweep`: only shard I of N of the corpus (as `sweep --shard`).
    #[arg(long, requires = "sweep")]
    sweep_shard: Option<divergence::sweep::Shard>,
    /// With `--sweep`: greedy decode steps after each prompt.
    #[arg(long, default_value_t = 4, requires = "sweep")]
    sweep_steps: usize,
}

#[derive(Serialize)]
struct EngineNumbers {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    decode_gb_s: f64,
    peak_rss_bytes: Option<u64>,
    /// Median over rounds of the round's decode GB/s over the round's
    /// read bandwidth (`bandwidth_rounds`).
    decode_bandwidth_fraction: f64,
    /// The lowest and highest of those per-round fractions.
    decode_bandwidth_fraction_range: [f64; 2],
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
    /// Whether `DIVERGENCE_KERNEL` forced that path (else: the fastest
    /// this CPU has).
    candidate_kernel_forced: bool,
    /// How the candidate holds the weights: `resident` (a copy in anonymous
    /// memory advised for huge pages) or `mapped` (the file's page cache);
    /// see `DIVERGENCE_WEIGHTS`.
    candidate_weights: &'static str,
    /// This process's anonymous memory in transparent huge pages after the
    /// candidate's first round (`AnonHugePages`): whether the advice took.
    candidate_huge_page_bytes: Option<u64>,
    /// The CPU's model name and the SIMD flags that choose kernel paths.
    cpu: String,
    cpu_simd_flags: Vec<String>,
    candidate: EngineNumbers,
    reference: EngineNumbers,
    /// Medians over this many rounds (each round times both engines).
    rounds: usize,
    /// Per round, in order: [prefill tok/s, decode tok/s].
    candidate_rounds: Vec<[f64; 2]>,
    reference_rounds: Vec<[f64; 2]>,
    /// Median over rounds of the round's candidate / reference rate: each
    /// round times both engines back to back, so the machine's slow spells
    /// (which last seconds here) mostly cancel within a pair.
    decode_ratio: f64,
    prefill_ratio: f64,
    /// The lowest and highest per-round ratios.
    decode_ratio_range: [f64; 2],
    prefill_ratio_range: [f64; 2],
    /// The machine's streaming read bandwidth (GB/s) at `threads` threads:
    /// the median over rounds of `bandwidth_rounds`.
    bandwidth_gbs: f64,
    /// Per round: a read of `bandwidth_read_bytes` right before the round
    /// and one right after, total bytes over total time.
    bandwidth_rounds: Vec<f64>,
    bandwidth_read_bytes: u64,
    /// The loads of the read (the candidate kernel's widest).
    bandwidth_kernel: String,
    /// Candidate peak RSS over (file + KV cache); the target is <= 1.10.
    candidate_rss_over_file_plus_kv: Option<f64>,
    /// With `--stages`: the candidate's decode time by stage (the time from
    /// the previous stage to this one), all layers summed.
    #[serde(skip_serializing_if = "Option::is_none")]
    candidate_decode_stages: Option<Vec<StageTime>>,
    /// With `--stages`: the same for the prefill (ms per prompt token).
    #[serde(skip_serializing_if = "Option::is_none")]
    candidate_prefill_stages: Option<Vec<StageTime>>,
    /// With `--lockstep`: median over rounds of find's time (without model
    /// loading) over the round's reference-alone plus candidate-alone time
    /// for the same prompt and steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    lockstep_ratio: Option<f64>,
    /// With `--lockstep`: each round's numbers.
    #[serde(skip_serializing_if = "Option::is_none")]
    lockstep_rounds: Option<Vec<LockstepRound>>,
    /// With `--sweep`: the sweep's throughput.
    #[serde(skip_serializing_if = "Option::is_none")]
    sweep: Option<SweepTiming>,
}

/// One `divergence sweep` run, timed (`bench --sweep`).
#[derive(Serialize)]
struct SweepTiming {
    corpus: String,
    shard: Option<String>,
    steps: usize,
    /// Prompts that ran (not `not_run`).
    prompts: usize,
    /// Positions whose logits were compared (prefill and decode).
    positions: usize,
    /// Prompts with a divergence (a clean engine: 0).
    divergences: usize,
    /// The sweep's wall time, loading both engines included.
    wall_s: f64,
    prompts_per_minute: f64,
    positions_per_second: f64,
    /// Per prompt: median, lowest and highest seconds.
    prompt_s_median: f64,
    prompt_s_range: [f64; 2],
    harness_peak_rss_bytes: Option<u64>,
}

/// One `divergence find` timed against the engines alone.
#[derive(Serialize)]
struct LockstepRound {
    /// find's wall time, start to exit (loading and hashing included).
    find_wall_s: f64,
    /// The wall time less the two engines' model loading (what the engines
    /// alone are timed without).
    find_s: f64,
    /// The same round's prefill + decode times: reference alone, candidate alone.
    reference_alone_s: f64,
    candidate_alone_s: f64,
    /// find_s / (reference_alone_s + candidate_alone_s).
    ratio: f64,
    /// The receipt's split of find's time.
    reference_s: f64,
    candidate_s: f64,
    compare_s: f64,
    /// Peak resident sets of find's two processes, and over the model file.
    harness_peak_rss_bytes: Option<u64>,
    reference_peak_rss_bytes: Option<u64>,
    harness_rss_over_file: Option<f64>,
}

#[derive(Serialize)]
struct StageTime {
    stage: String,
    ms_per_token: f64,
}

#[derive(Serialize)]
struct KernelReport {
    n_in: usize,
    n_out: usize,
    tokens: usize,
    reps: usize,
    weight_bytes: usize,
    candidate_kernel: String,
    candidate_gb_s: f64,
    reference_gb_s: f64,
    /// Ternary multiply-adds per second (n_in · n_out · tokens per product).
    candidate_gmac_s: f64,
    reference_gmac_s: f64,
    ratio: f64,
    outputs_equal: bool,
}

pub fn run(mut args: Args) -> CliResult {
    // More threads than CPUs measure the scheduler, not the engines.
    args.threads = super::threads::bounded(args.threads, "--threads")?;
    if args.kernel {
        return kernel_bench(&args);
    }
    let model = args
        .model
        .clone()
        .ok_or_else(|| anyhow!("--model is required"))?;
    if args.rounds == 0 {
        return Err(anyhow!("--rounds must be positive").into());
    }
    if args.prefill == 0 || args.decode == 0 || args.prefill + args.decode + 1 > 4096 {
        return Err(
            anyhow!("--prefill and --decode must be positive and fit a 4096 context").into(),
        );
    }
    if let Some(corpus) = &args.sweep {
        // A corpus that cannot be read fails now, not after the rounds.
        divergence::sweep::Corpus::read(corpus).map_err(|e| anyhow!("--sweep: {e}"))?;
    }
    let file = Arc::new(
        GgufFile::open_resident(&model).with_context(|| format!("reading {}", model.display()))?,
    );
    let n_ctx = args.prefill + args.decode + 8;
    let opts = EngineOptions {
        threads: args.threads,
        kv_type: KvType::F16,
        n_ctx,
        ..Default::default()
    };
    let mut engine = Engine::from_gguf(file.clone(), opts)?;
    let c = engine.config().clone();
    let kernel = Kernel::named(engine.kernel_name())?;
    let engine_forced = engine.kernel_forced();
    let prompt: Vec<u32> = (0..args.prefill)
        .map(|i| 3 + (i as u32 * 7919) % (c.n_vocab as u32 - 3))
        .collect();

    // Both engines stay loaded. The candidate first runs one round on its
    // own (it warms the page cache, and its peak RSS is read then: in the
    // timed rounds this process also receives the reference's logits, 66 MB
    // for a 128-token prefill of a 128k vocabulary). In each timed round the
    // two prefills run back to back and the decodes alternate in blocks of
    // DECODE_BLOCK tokens, the side going first alternating by round, so a
    // slow spell of this shared machine (they last seconds) lands on both.
    let ctx = ContextOptions {
        threads: args.threads,
        kv_type: KvType::F16,
        n_ctx,
        n_batch: n_ctx,
    };
    let exe = default_exe().map_err(anyhow::Error::from)?;
    let mut worker =
        Worker::start(&exe, &model, &ctx, CaptureFilter::none()).map_err(ref_failure)?;
    let mut candidate = Candidate {
        engine: &mut engine,
        clock: None,
        prefill_clock: None,
    };
    let cand_rss = {
        let reset = reset_peak_rss();
        time_round([&mut candidate], &prompt, args.decode)?;
        if reset {
            peak_rss_of("/proc/self/status")
        } else {
            None // the high-water mark would include the reference's client
        }
    };
    let huge_pages = anon_huge_page_bytes();
    let mut reference = Reference(&mut worker);
    reference.prefill(&prompt[..8.min(prompt.len())])?; // its page cache
    candidate.clock = args.stages.then(StageClock::default);
    candidate.prefill_clock = args.stages.then(StageClock::default);
    // Allocated after the candidate's RSS was read, which it would inflate.
    let read_probe = bandwidth::ReadProbe::new(args.threads, kernel)
        .map_err(|e| anyhow!("allocating the read-bandwidth buffer: {e}"))?;
    let (mut cand, mut refr, mut read_rounds) = (Vec::new(), Vec::new(), Vec::new());
    let mut lockstep_rounds = Vec::new();
    for round in 0..args.rounds {
        let read_before = read_probe.pass();
        if round % 2 == 0 {
            let [c, r] = time_round([&mut candidate, &mut reference], &prompt, args.decode)?;
            cand.push(c);
            refr.push(r);
        } else {
            let [r, c] = time_round([&mut reference, &mut candidate], &prompt, args.decode)?;
            cand.push(c);
            refr.push(r);
        }
        read_rounds.push((read_before + read_probe.pass()).gb_s());
        if args.lockstep {
            let (c, r) = (cand[round], refr[round]);
            let alone =
                |rates: [f64; 2]| args.prefill as f64 / rates[0] + args.decode as f64 / rates[1];
            lockstep_rounds.push(time_find(
                &exe,
                &model,
                &prompt,
                &args,
                alone(r),
                alone(c),
                file.file_size(),
            )?);
        }
    }
    let read_kernel = read_probe.kernel();
    drop(read_probe);
    let by_stage = |clock: Option<StageClock>, tokens: usize| {
        clock.map(|c| {
            c.by_stage()
                .filter(|&(_, s)| s > 0.0)
                .map(|(stage, s)| StageTime {
                    stage: stage.name().to_string(),
                    ms_per_token: 1e3 * s / (tokens * args.rounds) as f64,
                })
                .collect::<Vec<_>>()
        })
    };
    let decode_stages = by_stage(candidate.clock.take(), args.decode);
    let prefill_stages = by_stage(candidate.prefill_clock.take(), args.prefill);
    let ref_rss = worker.peak_rss_bytes();
    let weight_bytes = engine.weight_bytes();
    drop(worker);
    drop(engine);
    // The sweep opens the model itself: this copy would count in its peak RSS.
    let (file_bytes, file_resident) = (file.file_size(), file.is_resident());
    drop(file);
    // The sweep loads its own engines: the bench's are gone by now.
    let sweep = match &args.sweep {
        Some(corpus) => Some(time_sweep(&args, &model, corpus, &exe)?),
        None => None,
    };
    let (cand_prefill, cand_decode) = medians(&cand);
    let (ref_prefill, ref_decode) = medians(&refr);
    let paired: Vec<[f64; 2]> = cand
        .iter()
        .zip(&refr)
        .map(|(c, r)| [c[0] / r[0], c[1] / r[1]])
        .collect();
    let (prefill_ratio, decode_ratio) = medians(&paired);
    let ratio_range = |k: usize| range(paired.iter().map(|r| r[k]));

    let kv_bytes = (2 * c.n_layer * n_ctx * c.n_embd_kv() * 2) as u64;
    let gb = |tok_s: f64| weight_bytes as f64 * tok_s / 1e9;
    let fractions: Vec<[f64; 2]> = cand
        .iter()
        .zip(&refr)
        .zip(&read_rounds)
        .map(|((c, r), &read)| [gb(c[1]) / read, gb(r[1]) / read])
        .collect();
    let (cand_fraction, ref_fraction) = medians(&fractions);
    let fraction_range = |k: usize| range(fractions.iter().map(|f| f[k]));
    let report = ModelReport {
        model: model.display().to_string(),
        file_bytes,
        threads: args.threads,
        prefill_tokens: args.prefill,
        decode_tokens: args.decode,
        weight_bytes_per_decode_token: weight_bytes,
        kv_cache_bytes: kv_bytes,
        candidate_kernel: kernel.name().into(),
        candidate_kernel_forced: engine_forced,
        candidate_weights: if file_resident { "resident" } else { "mapped" },
        candidate_huge_page_bytes: huge_pages,
        cpu: cpu_model(),
        cpu_simd_flags: simd_flags(),
        candidate: EngineNumbers {
            prefill_tok_s: cand_prefill,
            decode_tok_s: cand_decode,
            decode_gb_s: gb(cand_decode),
            peak_rss_bytes: cand_rss,
            decode_bandwidth_fraction: cand_fraction,
            decode_bandwidth_fraction_range: fraction_range(0),
        },
        reference: EngineNumbers {
            prefill_tok_s: ref_prefill,
            decode_tok_s: ref_decode,
            decode_gb_s: gb(ref_decode),
            peak_rss_bytes: ref_rss,
            decode_bandwidth_fraction: ref_fraction,
            decode_bandwidth_fraction_range: fraction_range(1),
        },
        rounds: args.rounds,
        candidate_rounds: cand,
        reference_rounds: refr,
        decode_ratio,
        prefill_ratio,
        decode_ratio_range: ratio_range(1),
        prefill_ratio_range: ratio_range(0),
        bandwidth_gbs: median(read_rounds.clone()),
        bandwidth_rounds: read_rounds,
        bandwidth_read_bytes: bandwidth::READ_BYTES as u64,
        bandwidth_kernel: read_kernel.name().into(),
        candidate_rss_over_file_plus_kv: cand_rss
            .map(|r| r as f64 / (file_bytes + kv_bytes) as f64),
        candidate_decode_stages: decode_stages,
        candidate_prefill_stages: prefill_stages,
        lockstep_ratio: args
            .lockstep
            .then(|| median(lockstep_rounds.iter().map(|r| r.ratio).collect())),
        lockstep_rounds: args.lockstep.then_some(lockstep_rounds),
        sweep,
    };
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)?
        );
    } else {
        let mb = |b: Option<u64>| {
            b.map(|b| format!("{:.0} MiB", b as f64 / 1048576.0))
                .unwrap_or("?".into())
        };
        outln!(
            "model {} ({:.0} MiB), {} threads, candidate kernel {}{}, weights {}{}; medians of {} rounds; CPU {} ({})",
            report.model,
            report.file_bytes as f64 / 1048576.0,
            args.threads,
            report.candidate_kernel,
            if report.candidate_kernel_forced { " (forced)" } else { "" },
            report.candidate_weights,
            report.candidate_huge_page_bytes.map_or(String::new(), |b| format!(
                " ({:.0} MiB in huge pages)",
                b as f64 / 1048576.0
            )),
            args.rounds,
            report.cpu,
            report.cpu_simd_flags.join(" ")
        );
        outln!(
            "{:<12} {:>14} {:>14} {:>12} {:>12}",
            "engine",
            "prefill tok/s",
            "decode tok/s",
            "decode GB/s",
            "peak RSS"
        );
        for (name, n) in [
            ("candidate", &report.candidate),
            ("bitnet.cpp", &report.reference),
        ] {
            outln!(
                "{name:<12} {:>14.1} {:>14.2} {:>12.2} {:>12}",
                n.prefill_tok_s,
                n.decode_tok_s,
                n.decode_gb_s,
                mb(n.peak_rss_bytes)
            );
        }
        let [[p_lo, p_hi], [d_lo, d_hi]] = [report.prefill_ratio_range, report.decode_ratio_range];
        outln!(
            "ratio (candidate / bitnet.cpp, median of per-round ratios, lowest-highest): prefill {:.2}x ({p_lo:.2}-{p_hi:.2}), decode {:.2}x ({d_lo:.2}-{d_hi:.2})",
            report.prefill_ratio, report.decode_ratio
        );
        let [bw_lo, bw_hi] = [f64::min, f64::max].map(|pick| {
            report
                .bandwidth_rounds
                .iter()
                .copied()
                .reduce(pick)
                .unwrap_or(0.0)
        });
        outln!(
            "streaming read bandwidth ({} threads, {} GiB {} read before and after each round): {:.1} GB/s ({:.1}-{:.1})",
            args.threads,
            report.bandwidth_read_bytes >> 30,
            report.bandwidth_kernel,
            report.bandwidth_gbs,
            bw_lo,
            bw_hi
        );
        let fraction = |n: &EngineNumbers| {
            let [lo, hi] = n.decode_bandwidth_fraction_range;
            format!("{:.2} ({lo:.2}-{hi:.2})", n.decode_bandwidth_fraction)
        };
        outln!(
            "decode GB/s / read bandwidth, median of per-round fractions (lowest-highest): candidate {}, bitnet.cpp {}",
            fraction(&report.candidate),
            fraction(&report.reference)
        );
        outln!(
            "weights streamed per decode token: {:.1} MiB; candidate RSS / (file + KV): {}",
            weight_bytes as f64 / 1048576.0,
            report
                .candidate_rss_over_file_plus_kv
                .map(|r| format!("{r:.2}"))
                .unwrap_or("?".into())
        );
        if let (Some(ratio), Some(rounds)) = (report.lockstep_ratio, &report.lockstep_rounds) {
            let mid = &rounds[rounds.len() / 2];
            outln!(
                "lockstep: find {:.2} s without loading ({:.2} s wall) vs reference {:.2} s + candidate {:.2} s alone: {ratio:.2}x (median of {} rounds; target <= 2)",
                mid.find_s,
                mid.find_wall_s,
                mid.reference_alone_s,
                mid.candidate_alone_s,
                rounds.len()
            );
            outln!(
                "  find's split: reference {:.2} s, candidate {:.2} s, comparing {:.2} s; peak RSS harness {} ({}x file), reference {}",
                mid.reference_s,
                mid.candidate_s,
                mid.compare_s,
                mb(mid.harness_peak_rss_bytes),
                mid.harness_rss_over_file
                    .map(|r| format!("{r:.2}"))
                    .unwrap_or("?".into()),
                mb(mid.reference_peak_rss_bytes)
            );
        }
        if let Some(sw) = &report.sweep {
            outln!(
                "sweep {}{}: {} prompts, {} positions, {} steps each, free mode with the oracle judge: {:.1} s wall, {:.2} prompts/min, {:.1} positions/s; a prompt {:.2} s median ({:.2}-{:.2}); {} divergence(s); harness peak RSS {}",
                sw.corpus,
                sw.shard.as_ref().map(|s| format!(" (shard {s})")).unwrap_or_default(),
                sw.prompts,
                sw.positions,
                sw.steps,
                sw.wall_s,
                sw.prompts_per_minute,
                sw.positions_per_second,
                sw.prompt_s_median,
                sw.prompt_s_range[0],
                sw.prompt_s_range[1],
                sw.divergences,
                mb(sw.harness_peak_rss_bytes)
            );
        }
        let phases = [
            ("decode", &report.candidate_decode_stages),
            ("prefill", &report.candidate_prefill_stages),
        ];
        for (phase, stages) in phases {
            let Some(stages) = stages else { continue };
            let total: f64 = stages.iter().map(|s| s.ms_per_token).sum();
            outln!("candidate {phase} by stage (ms/token, all layers):");
            for s in stages {
                outln!(
                    "  {:<16} {:>8.3} {:>6.1}%",
                    s.stage,
                    s.ms_per_token,
                    100.0 * s.ms_per_token / total
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `divergence find` in resync mode on `prompt` as a user would (a
/// child process) and reads its receipt's timings.
fn time_find(
    exe: &std::path::Path,
    model: &std::path::Path,
    prompt: &[u32],
    args: &Args,
    reference_alone_s: f64,
    candidate_alone_s: f64,
    file_bytes: u64,
) -> Result<LockstepRound, super::Failure> {
    let receipt =
        std::env::temp_dir().join(format!("divergence-bench-{}.json", std::process::id()));
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let t = Instant::now();
    let out = std::process::Command::new(exe)
        .arg("find")
        .arg("--model")
        .arg(model)
        .arg("--tokens")
        .arg(ids.join(","))
        .args(["--steps", &args.decode.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .arg("-q")
        .arg("--receipt")
        .arg(&receipt)
        .output()
        .map_err(anyhow::Error::from)?;
    let find_wall_s = t.elapsed().as_secs_f64();
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(anyhow!(
            "find exited with {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let r = divergence::receipt::Receipt::read(&receipt)?;
    let _ = std::fs::remove_file(&receipt);
    let tm = &r.volatile.timings;
    let find_s = find_wall_s - tm.reference_load_s - tm.candidate_load_s;
    Ok(LockstepRound {
        find_wall_s,
        find_s,
        reference_alone_s,
        candidate_alone_s,
        ratio: find_s / (reference_alone_s + candidate_alone_s),
        reference_s: tm.reference_s,
        candidate_s: tm.candidate_s,
        compare_s: tm.compare_s,
        harness_peak_rss_bytes: tm.harness_peak_rss_bytes,
        reference_peak_rss_bytes: tm.reference_peak_rss_bytes,
        harness_rss_over_file: tm
            .harness_peak_rss_bytes
            .map(|b| b as f64 / file_bytes as f64),
    })
}

/// Decode tokens per turn when the engines take turns within a round.
const DECODE_BLOCK: usize = 8;

/// An engine under the clock: greedy decoding from a prompt. The candidate
/// side is any [`divergence::candidate::Candidate`], driven through that
/// trait as the lockstep runner drives it; the reference is bitnet.cpp in
/// its worker.
trait Timed {
    /// Run `prompt` from an empty cache; the next (argmax) token.
    fn prefill(&mut self, prompt: &[u32]) -> Result<u32, super::Failure>;
    /// Feed `next` at position `pos`, then greedily `n - 1` more; the
    /// token after the last.
    fn decode(&mut self, next: u32, pos: usize, n: usize) -> Result<u32, super::Failure>;
}

struct Candidate<'e> {
    engine: &'e mut dyn divergence::candidate::Candidate,
    /// With `--stages`: the decode's and the prefill's clocks.
    clock: Option<StageClock>,
    prefill_clock: Option<StageClock>,
}

impl Timed for Candidate<'_> {
    fn prefill(&mut self, prompt: &[u32]) -> Result<u32, super::Failure> {
        self.engine.reset();
        let logits =
            self.engine
                .forward(prompt, 0, restarted(&mut self.prefill_clock, &mut NoTrace))?;
        let n_vocab = self.engine.config().n_vocab;
        Ok(argmax(&logits[logits.len() - n_vocab..]) as u32)
    }

    fn decode(&mut self, mut next: u32, pos: usize, n: usize) -> Result<u32, super::Failure> {
        for i in 0..n {
            let logits =
                self.engine
                    .forward(&[next], pos + i, restarted(&mut self.clock, &mut NoTrace))?;
            next = argmax(&logits) as u32;
        }
        Ok(next)
    }
}

/// The clock, restarted, as the sink of one forward; `none` without one.
fn restarted<'a>(
    clock: &'a mut Option<StageClock>,
    none: &'a mut NoTrace,
) -> &'a mut dyn TraceSink {
    match clock {
        Some(c) => {
            c.restart();
            c
        }
        None => none,
    }
}

/// bitnet.cpp in its worker, capturing nothing.
struct Reference<'w>(&'w mut Worker);

impl Timed for Reference<'_> {
    fn prefill(&mut self, prompt: &[u32]) -> Result<u32, super::Failure> {
        self.0.clear_kv().map_err(ref_failure)?;
        let (logits, _, _) = self.0.decode(prompt, 0).map_err(ref_failure)?;
        let n_vocab = logits.len() / prompt.len();
        Ok(argmax(&logits[logits.len() - n_vocab..]) as u32)
    }

    fn decode(&mut self, mut next: u32, pos: usize, n: usize) -> Result<u32, super::Failure> {
        for i in 0..n {
            let (logits, _, _) = self.0.decode(&[next], pos + i).map_err(ref_failure)?;
            next = argmax(&logits) as u32;
        }
        Ok(next)
    }
}

fn ref_failure(e: divergence::reference::RefError) -> super::Failure {
    super::Failure {
        code: 3,
        error: e.into(),
    }
}

/// One round: every side prefills (back to back), then the sides take
/// turns decoding DECODE_BLOCK tokens until each has decoded `decode`.
/// Per side: [prefill tok/s, decode tok/s].
fn time_round<const N: usize>(
    mut sides: [&mut dyn Timed; N],
    prompt: &[u32],
    decode: usize,
) -> Result<[[f64; 2]; N], super::Failure> {
    let mut next = [0u32; N];
    let mut secs = [[0f64; 2]; N];
    for (side, (next, secs)) in sides.iter_mut().zip(next.iter_mut().zip(&mut secs)) {
        let t = Instant::now();
        *next = side.prefill(prompt)?;
        secs[0] = t.elapsed().as_secs_f64();
    }
    let mut done = 0;
    while done < decode {
        let n = DECODE_BLOCK.min(decode - done);
        for (side, (next, secs)) in sides.iter_mut().zip(next.iter_mut().zip(&mut secs)) {
            let t = Instant::now();
            *next = side.decode(*next, prompt.len() + done, n)?;
            secs[1] += t.elapsed().as_secs_f64();
        }
        done += n;
    }
    Ok(secs.map(|[p, d]| [prompt.len() as f64 / p, decode as f64 / d]))
}

/// Reset this process's peak RSS (VmHWM) to its current RSS; false where
/// the kernel does not allow it.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Medians of the rounds' two figures (prefill and decode rates, or the
/// two engines' fractions).
fn medians(rounds: &[[f64; 2]]) -> (f64, f64) {
    let column = |k: usize| median(rounds.iter().map(|r| r[k]).collect());
    (column(0), column(1))
}

/// The lowest and highest of `values`.
fn range(values: impl Iterator<Item = f64> + Clone) -> [f64; 2] {
    [
        values.clone().fold(f64::INFINITY, f64::min),
        values.fold(f64::NEG_INFINITY, f64::max),
    ]
}

/// The CPU's model name as /proc/cpuinfo gives it ("?" elsewhere).
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

/// The SIMD features this CPU reports among those the kernels choose by.
fn simd_flags() -> Vec<String> {
    #[allow(unused_mut)]
    let mut flags = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        let known = [
            ("avx2", is_x86_feature_detected!("avx2")),
            ("fma", is_x86_feature_detected!("fma")),
            ("f16c", is_x86_feature_detected!("f16c")),
            ("avx512f", is_x86_feature_detected!("avx512f")),
            ("avx512bw", is_x86_feature_detected!("avx512bw")),
            ("avx512vl", is_x86_feature_detected!("avx512vl")),
            ("avx512vnni", is_x86_feature_detected!("avx512vnni")),
            ("avxvnni", is_x86_feature_detected!("avxvnni")),
        ];
        flags.extend(known.iter().filter(|f| f.1).map(|f| f.0.to_string()));
    }
    flags
}

/// The median (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// `divergence sweep` as a user runs it (free mode, the built-in candidate,
/// the oracle judge on), in this process, its wall time measured.
fn time_sweep(
    args: &Args,
    model: &std::path::Path,
    corpus: &std::path::Path,
    exe: &std::path::Path,
) -> Result<SweepTiming, super::Failure> {
    if args.sweep_steps > super::find::MAX_STEPS {
        return Err(anyhow!(
            "--sweep-steps is absurd: at most {}",
            super::find::MAX_STEPS
        )
        .into());
    }
    let req = divergence::sweep::SweepRequest {
        model: model.to_path_buf(),
        prompts: corpus.to_path_buf(),
        steps: args.sweep_steps,
        mode: divergence::lockstep::Mode::Free,
        threads: args.threads,
        kv_type: KvType::F16,
        policy_path: None,
        faults: vec![],
        shard: args.sweep_shard,
        receipts_dir: None,
        ffn_act: None,
        cancel: Some(super::interrupt::flag()),
        external: None,
    };
    let t = Instant::now();
    let sw = divergence::sweep::run(&req, exe.to_path_buf(), &mut |_, _| {}).map_err(|e| {
        super::Failure {
            code: 2,
            error: anyhow!("bench --sweep: {e}"),
        }
    })?;
    let wall_s = t.elapsed().as_secs_f64();
    if sw.interrupted {
        return Err(anyhow!("bench --sweep: interrupted").into());
    }
    let not_run = sw.summary.verdicts.get("not_run").copied().unwrap_or(0);
    let prompts = sw.summary.prompts - not_run.min(sw.summary.prompts);
    let positions = sw.summary.kld.as_ref().map_or(0, |k| k.positions);
    let divergences = sw
        .summary
        .verdicts
        .iter()
        .filter(|(v, _)| !matches!(v.as_str(), "no_divergence" | "not_run"))
        .map(|(_, n)| n)
        .sum();
    let per_prompt: Vec<f64> = sw.volatile.prompts.iter().map(|p| p.total_s).collect();
    if per_prompt.is_empty() || prompts == 0 {
        return Err(anyhow!("bench --sweep: no prompt of {} ran", corpus.display()).into());
    }
    Ok(SweepTiming {
        corpus: corpus.display().to_string(),
        shard: args.sweep_shard.map(|s| s.to_string()),
        steps: args.sweep_steps,
        prompts,
        positions,
        divergences,
        wall_s,
        prompts_per_minute: prompts as f64 * 60.0 / wall_s,
        positions_per_second: positions as f64 / wall_s,
        prompt_s_median: median(per_prompt.clone()),
        prompt_s_range: range(per_prompt.iter().copied()),
        harness_peak_rss_bytes: sw.volatile.harness_peak_rss_bytes,
    })
}

fn kernel_bench(args: &Args) -> CliResult {
    let (n_in, n_out, n_tok) = (args.n_in, args.n_out, args.tokens);
    if n_in == 0 || n_in % 128 != 0 || n_out == 0 || args.reps == 0 || n_tok == 0 || n_tok > 4096 {
        return Err(anyhow!(
            "--n-in must be a positive multiple of 128; --n-out and --reps positive; --tokens 1 to 4096"
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
    let xs: Vec<f32> = (0..n_in * n_tok)
        .map(|_| ((next() % 2001) as f32 - 1000.0) / 250.0)
        .collect();
    let kernel = Kernel::detect()?;
    let codes = &packed[..n_in * n_out / 4];
    let w_scale = 0.25f32;

    // Per token row: quantized codes, then one product for every token;
    // out[t * n_out + r] as the reference lays it out.
    let ours = |out: &mut Vec<f32>| {
        let mut q = vec![0i8; n_in * n_tok];
        let rows: Vec<_> = xs
            .chunks_exact(n_in)
            .zip(q.chunks_exact_mut(n_in))
            .map(|(x, q)| kernel.quantize_row(x, q, ActQuantVariant::REFERENCE))
            .collect();
        let mut acc = vec![0i32; n_out * n_tok];
        kernel.matmul(false, codes, n_in, 0..n_out, &q, &mut acc);
        out.clear();
        out.resize(n_out * n_tok, 0.0);
        for (t, row) in rows.iter().enumerate() {
            for r in 0..n_out {
                let d = acc[r * n_tok + t];
                out[t * n_out + r] = (d as f32 - row.sum as f32) / row.scale * w_scale;
            }
        }
    };
    let theirs = |out: &mut Vec<f32>| -> Result<(), anyhow::Error> {
        out.clear();
        for x in xs.chunks_exact(n_in) {
            out.extend(
                kernels::i2s_matvec(&packed, n_in, n_out, x)
                    .ok_or_else(|| anyhow!("shim refused the shape"))?,
            );
        }
        Ok(())
    };
    let mut out_ours = Vec::new();
    ours(&mut out_ours);
    let t = Instant::now();
    for _ in 0..args.reps {
        ours(&mut out_ours);
    }
    let ours_s = t.elapsed().as_secs_f64() / args.reps as f64;

    let mut out_ref = Vec::new();
    theirs(&mut out_ref)?;
    let t = Instant::now();
    for _ in 0..args.reps {
        theirs(&mut out_ref)?;
    }
    let ref_s = t.elapsed().as_secs_f64() / args.reps as f64;
    let bytes = n_in * n_out / 4;
    let macs = (n_in * n_out * n_tok) as f64;
    let report = KernelReport {
        n_in,
        n_out,
        tokens: n_tok,
        reps: args.reps,
        weight_bytes: bytes,
        candidate_kernel: kernel.name().into(),
        candidate_gb_s: bytes as f64 / ours_s / 1e9,
        reference_gb_s: bytes as f64 / ref_s / 1e9,
        candidate_gmac_s: macs / ours_s / 1e9,
        reference_gmac_s: macs / ref_s / 1e9,
        ratio: ref_s / ours_s,
        outputs_equal: out_ours.len() == out_ref.len()
            && out_ours
                .iter()
                .zip(&out_ref)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
    };
    if args.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)?
        );
    } else {
        let what = if n_tok == 1 {
            "mat-vec".to_string()
        } else {
            format!("mat-mat ({n_tok} tokens; bitnet.cpp: a mat-vec per token)")
        };
        outln!(
            "I2_S {what} {n_in} x {n_out} ({:.2} MiB of codes), 1 thread, {} reps",
            bytes as f64 / 1048576.0,
            args.reps
        );
        outln!(
            "candidate ({:<11}) {:>8.2} GB/s {:>8.2} GMAC/s",
            report.candidate_kernel,
            report.candidate_gb_s,
            report.candidate_gmac_s
        );
        outln!(
            "bitnet.cpp (AVX2)       {:>8.2} GB/s {:>8.2} GMAC/s",
            report.reference_gb_s,
            report.reference_gmac_s
        );
        outln!(
            "ratio {:.2}x; outputs bit-identical: {}",
            report.ratio,
            report.outputs_equal
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `AnonHugePages` of this process (`/proc/self/smaps_rollup`), in bytes.
fn anon_huge_page_bytes() -> Option<u64> {
    let path = std::path::Path::new("/proc/self/smaps_rollup");
    divergence::input::proc_kb_value(path, "AnonHugePages")
}
