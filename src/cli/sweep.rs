//! `divergence sweep` (one lockstep run per prompt of a corpus, statistics
//! over all of them) and `divergence merge` (shards into the one file an
//! unsharded sweep writes).

use super::find::{parse_fault, parse_kv, MAX_STEPS};
use super::{interrupt, threads, CliResult, Failure};
use anyhow::anyhow;
use divergence::dump::map::DumpMap;
use divergence::engine::Fault;
use divergence::external::CandidateCommand;
use divergence::lockstep::Mode;
use divergence::model::FfnAct;
use divergence::report::html::{layer_name, pct, sci};
use divergence::sweep::{self, Shard, Sweep, SweepError, SweepExternal, SweepRequest};
use divergence::KvType;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct SweepArgs {
    /// GGUF model both engines run.
    #[arg(long)]
    model: PathBuf,
    /// The corpus: one prompt per line, or JSONL (`.jsonl`) with {"prompt": ...} or {"tokens": [...]}.
    #[arg(long)]
    prompts: PathBuf,
    /// Greedy decode steps after each prompt's prefill.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// free (default): the candidate's own logits meet the reference's, as
    /// llama-perplexity compares two models; resync: each stage on the reference's inputs.
    #[arg(long, value_enum, default_value = "free")]
    mode: Mode,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// KV cache type for both engines.
    #[arg(long, value_parser = parse_kv, default_value = "f16")]
    kv: KvType,
    /// Tolerance policy (JSON); default: the built-in one.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Run only shard I of N: the prompts whose index i has i % N == I-1.
    #[arg(long)]
    shard: Option<Shard>,
    /// Where to write the sweep file.
    #[arg(long)]
    out: PathBuf,
    /// Also write one receipt per prompt into this folder (prompt-NNNN.json).
    #[arg(long)]
    receipts: Option<PathBuf>,
    /// The FFN activation of both engines and the oracle instead of the
    /// arch's own (see `find --ffn-act`); with --candidate-cmd, of the
    /// reference, the oracle and the command's {ffn_act}.
    #[arg(long, value_enum)]
    ffn_act: Option<FfnAct>,
    /// Run the candidate as this command for every prompt (see `find
    /// --candidate-cmd`): it writes a dump to {out}; placeholders {model}
    /// {tokens} {steps} {kv} {threads} {prompt} {ffn_act}. Runs are free.
    #[arg(long, conflicts_with = "inject")]
    candidate_cmd: Option<String>,
    /// Seconds each --candidate-cmd run may take before it is killed.
    #[arg(long, default_value_t = divergence::external::DEFAULT_TIMEOUT.as_secs(), requires = "candidate_cmd")]
    candidate_timeout: u64,
    /// How the --candidate-cmd's dump names map onto canonical stages.
    #[arg(long, requires = "candidate_cmd")]
    map: Option<PathBuf>,
    /// Where --candidate-cmd keeps each prompt's dumps (default:
    /// `<out>.dumps/`).
    #[arg(long, requires = "candidate_cmd")]
    dumps: Option<PathBuf>,
    /// Test-only: inject a candidate fault (the bug zoo).
    #[arg(long = "inject", hide = true, value_parser = parse_fault)]
    inject: Vec<Fault>,
}

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The shard files (every shard of one sweep, in any order).
    #[arg(required = true)]
    shards: Vec<PathBuf>,
    /// Where to write the merged sweep file.
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
}

fn failure(e: SweepError) -> Failure {
    Failure {
        code: 2,
        error: e.into(),
    }
}

pub fn sweep(args: SweepArgs) -> CliResult {
    if args.steps > MAX_STEPS {
        return Err(anyhow!("--steps {} is absurd: at most {MAX_STEPS}", args.steps).into());
    }
    let threads = threads::bounded(args.threads, "--threads")?;
    let mut inputs = vec![args.model.as_path(), args.prompts.as_path()];
    inputs.extend(args.policy.as_deref());
    divergence::outfile::refuse_overwriting(&args.out, &inputs).map_err(|e| anyhow!(e))?;
    let external = match &args.candidate_cmd {
        Some(template) => Some(SweepExternal {
            command: CandidateCommand::parse(
                template,
                std::time::Duration::from_secs(args.candidate_timeout),
            )
            .map_err(|e| anyhow!(e))?,
            map: match &args.map {
                Some(p) => Some(DumpMap::load(p)?),
                None => None,
            },
            dumps_dir: args.dumps.clone().unwrap_or_else(|| {
                let mut d = args.out.clone().into_os_string();
                d.push(".dumps");
                PathBuf::from(d)
            }),
        }),
        None => None,
    };
    let req = SweepRequest {
        model: args.model,
        prompts: args.prompts,
        steps: args.steps,
        // An external engine's dumps are free runs.
        mode: if external.is_some() {
            Mode::Free
        } else {
            args.mode
        },
        threads,
        kv_type: args.kv,
        policy_path: args.policy,
        faults: args.inject,
        shard: args.shard,
        receipts_dir: args.receipts,
        ffn_act: args.ffn_act,
        cancel: Some(interrupt::flag()),
        external,
    };
    let bar = (!super::quiet() && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} prompt {pos}/{len} {bar:30} {elapsed} (eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let worker = divergence::reference::worker::default_exe().map_err(anyhow::Error::from)?;
    let mut on_prompt = |done: usize, total: usize| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    };
    let result = sweep::run(&req, worker, &mut on_prompt);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let sw = result.map_err(failure)?;
    sw.write(&args.out).map_err(failure)?;
    print_summary(&sw);
    outln!("sweep {}", args.out.display());
    if sw.interrupted {
        outln!(
            "INTERRUPTED after {} prompt(s): the file holds those (marked \"interrupted\")",
            sw.prompts.len()
        );
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::from(sw.exit_code()))
}

pub fn merge(args: MergeArgs) -> CliResult {
    let inputs: Vec<&Path> = args.shards.iter().map(PathBuf::as_path).collect();
    divergence::outfile::refuse_overwriting(&args.out, &inputs).map_err(|e| anyhow!(e))?;
    let mut shards = Vec::new();
    for path in &args.shards {
        let s = Sweep::read(path).map_err(failure)?;
        shards.push((path.display().to_string(), s));
    }
    let merged = sweep::merge(shards).map_err(failure)?;
    if merged.builds.len() > 1 {
        errln!(
            "warning: the shards ran {} different builds (see \"builds\"): the merge is not what one machine would have written",
            merged.builds.len()
        );
    }
    merged.write(&args.out).map_err(failure)?;
    print_summary(&merged);
    outln!(
        "merged {} shard(s) into {}",
        args.shards.len(),
        args.out.display()
    );
    Ok(ExitCode::from(merged.exit_code()))
}

/// The statistics in a few lines.
fn print_summary(sw: &Sweep) {
    let s = &sw.summary;
    let verdicts: Vec<String> = s.verdicts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    outln!(
        "prompts {} of {}{}: {}",
        s.prompts,
        sw.config.corpus_prompts,
        sw.shard
            .map_or(String::new(), |sh| format!(" (shard {sh})")),
        verdicts.join(", ")
    );
    match &s.kld {
        Some(k) => {
            outln!(
                "KLD     {} positions: mean {} median {} p90 {} p99 {} p99.9 {} max {}",
                k.positions,
                sci(k.mean),
                sci(k.median),
                sci(k.p90),
                sci(k.p99),
                sci(k.p999),
                sci(k.max)
            );
            outln!(
                "top-1   agreement {}; reference top p {:.4} (reference) vs {:.4} (candidate)",
                pct(k.top1_agreement),
                k.same_top_p.reference_mean,
                k.same_top_p.candidate_mean
            );
        }
        None => outln!("KLD     no position compared"),
    }
    outln!(
        "greedy  {} of {} choices agree ({})",
        s.greedy_tokens.agreeing,
        s.greedy_tokens.choices,
        pct(s.greedy_tokens.rate)
    );
    let worst = s
        .stages
        .iter()
        .filter(|d| d.exact_fraction < 1.0)
        .max_by(|a, b| a.local_nmse.p99.total_cmp(&b.local_nmse.p99));
    match worst {
        Some(d) => outln!(
            "stages  {} judged; worst p99 local NMSE {} at layer {} {}; {} always bit-exact",
            s.stages.len(),
            sci(d.local_nmse.p99),
            layer_name(d.layer),
            d.stage,
            s.stages.iter().filter(|d| d.exact_fraction >= 1.0).count()
        ),
        None => outln!(
            "stages  {} judged, every one always bit-exact",
            s.stages.len()
        ),
    }
    for p in sw.prompts.iter().filter(|p| p.not_run.is_some()) {
        outln!(
            "not run prompt {} (line {}): {}",
            p.index,
            p.line,
            p.not_run.as_deref().unwrap_or("")
        );
    }
}
