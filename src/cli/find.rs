//! `divergence find` and `divergence verify`: run the lockstep comparison,
//! write the receipt, print a human summary.

use super::{interrupt, threads, CliResult, Failure};
use anyhow::{anyhow, Context as _};
use divergence::compare::Policy;
use divergence::dump::capture::CaptureError;
use divergence::dump::map::DumpMap;
use divergence::engine::Fault;
use divergence::external::{CandidateCommand, ExternalError, ExternalRun};
use divergence::lockstep::offline::OfflineOptions;
use divergence::lockstep::{Measured, Mode, Prompt, RunError, TokenFault, TokenSource, Verdict};
use divergence::receipt::{self, OfflineRecord, Receipt, RunRecord};
use divergence::reference::FfnAct;
use divergence::KvType;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// The most decode steps a run may ask for.
pub const MAX_STEPS: usize = 4096;

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model; without it, an embedded synthetic default (the `tiny` preset, seed 1).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt text (tokenized by each engine's own tokenizer).
    #[arg(long, conflicts_with = "tokens")]
    prompt: Option<String>,
    /// Token ids instead of a prompt, comma-separated (fed to both engines as is).
    #[arg(long, value_delimiter = ',')]
    tokens: Option<Vec<u32>>,
    /// Greedy decode steps after the prefill.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// resync: each stage judged on its own error; free: each engine feeds itself.
    #[arg(long, value_enum, default_value = "resync")]
    mode: Mode,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// KV cache type for both engines.
    #[arg(long, value_parser = parse_kv, default_value = "f16")]
    kv: KvType,
    /// Tolerance policy (JSON); default: the built-in policies/default.json.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Where to write the receipt.
    #[arg(long, default_value = "divergence-receipt.json")]
    receipt: PathBuf,
    /// Also write the receipt's HTML report here.
    #[arg(long)]
    html: Option<PathBuf>,
    /// The reference's own FFN activation: silu runs upstream bitnet.cpp's
    /// bug for arch bitnet-b1.58 (BitNet issues #588, #602) while the
    /// candidate and the oracle keep squared ReLU; relu2 (the default)
    /// leaves the reference as the run is. silu is a usage error where the
    /// run is SiLU already.
    #[arg(
        long,
        value_enum,
        default_value = "relu2",
        conflicts_with = "candidate_cmd"
    )]
    reference_ffn_act: FfnAct,
    /// The FFN activation of both engines and the oracle instead of the
    /// arch's own (arches bitnet, bitnet-b1.58, bitnet-25): relu2 judges a
    /// BitNet-b1.58-2B-4T converted as arch bitnet as the model it is.
    /// With --candidate-cmd: the reference and the oracle, and the command
    /// through its {ffn_act} placeholder.
    #[arg(long, value_enum)]
    ffn_act: Option<FfnAct>,
    /// Record every divergence instead of stopping at the first.
    #[arg(long)]
    keep_going: bool,
    /// Format the prompt as one user message with each side's chat template
    /// (bitnet.cpp's llama_chat_apply_template; the candidate renders the
    /// GGUF's Jinja tokenizer.chat_template) before tokenizing.
    #[arg(long, conflicts_with = "tokens")]
    chat: bool,
    /// Print the receipt JSON on stdout instead of the summary.
    #[arg(long)]
    json: bool,
    /// Run the candidate as this command instead of our engine: it must
    /// write a dump of its run to {out} (any subset of the stages). Other
    /// placeholders: {model} {tokens} {steps} {kv} {threads} {prompt} {ffn_act}. The
    /// run is free (each engine feeds itself), judged as `compare` judges.
    #[arg(long, conflicts_with_all = ["inject", "chat"])]
    candidate_cmd: Option<String>,
    /// Seconds the --candidate-cmd may run before it is killed.
    #[arg(long, default_value_t = divergence::external::DEFAULT_TIMEOUT.as_secs(), requires = "candidate_cmd")]
    candidate_timeout: u64,
    /// How the --candidate-cmd's dump names map onto canonical stages.
    #[arg(long, requires = "candidate_cmd")]
    map: Option<PathBuf>,
    /// Where --candidate-cmd keeps both dumps (default: beside the receipt,
    /// `<receipt>.dumps/`).
    #[arg(long, requires = "candidate_cmd")]
    dumps: Option<PathBuf>,
    /// Test-only: inject a candidate fault (the bug zoo).
    #[arg(long = "inject", hide = true, value_parser = parse_fault)]
    inject: Vec<Fault>,
    /// Test-only: the one layer the --inject faults act in (default: every
    /// layer, and the embeddings, final norm and logits).
    #[arg(long = "inject-layer", hide = true, requires = "inject")]
    inject_layer: Option<usize>,
    /// Test-only: inject a tokenizer fault (duplicate-bos).
    #[arg(long = "inject-token", hide = true, value_parser = parse_token_fault)]
    inject_token: Vec<TokenFault>,
}

pub fn parse_kv(s: &str) -> Result<KvType, String> {
    match s {
        "f16" => Ok(KvType::F16),
        "f32" => Ok(KvType::F32),
        _ => Err(format!("`{s}` is not a KV type: use f16 or f32")),
    }
}

pub fn parse_fault(s: &str) -> Result<Fault, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("unknown fault `{s}`"))
}

fn parse_token_fault(s: &str) -> Result<TokenFault, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("unknown token fault `{s}`"))
}

/// The embedded default model: generated once, deterministically, into the
/// temp folder, so `divergence find` works on a fresh machine.
fn default_model() -> anyhow::Result<PathBuf> {
    let mut cfg = divergence::synth::SynthConfig::preset(divergence::synth::Preset::Tiny);
    cfg.seed = 1;
    let path = std::env::temp_dir().join("divergence-default-tiny-seed1.gguf");
    if divergence::gguf::GgufFile::open(&path).is_err() {
        divergence::synth::write_model(&cfg, &path)
            .context("writing the default synthetic model")?;
    }
    Ok(path)
}

pub fn run(args: Args) -> CliResult {
    if args.steps > MAX_STEPS {
        return Err(anyhow!("--steps {} is absurd: at most {MAX_STEPS}", args.steps).into());
    }
    let threads = threads::bounded(args.threads, "--threads")?;
    let mut inputs: Vec<&Path> = args.policy.iter().map(PathBuf::as_path).collect();
    inputs.extend(args.model.as_deref());
    for out in std::iter::once(&args.receipt).chain(&args.html) {
        divergence::outfile::refuse_overwriting(out, &inputs).map_err(|e| anyhow!(e))?;
    }
    let model = match &args.model {
        Some(m) => m.clone(),
        None => default_model()?,
    };
    let prompt = match (&args.prompt, &args.tokens) {
        (_, Some(ids)) if ids.is_empty() => return Err(anyhow!("--tokens is empty").into()),
        (_, Some(ids)) => Prompt::Tokens(ids.clone()),
        (Some(p), None) if p.is_empty() => return Err(anyhow!("--prompt is empty").into()),
        (Some(p), None) => Prompt::Text(p.clone()),
        (None, None) => Prompt::Text("The quick brown fox".into()),
    };
    if let Some(l) = args.inject_layer {
        // A layer the model does not have would leave the faults acting
        // nowhere: a clean run that looks like a result.
        let n_layer = divergence::gguf::GgufFile::open(&model).ok().and_then(|f| {
            let arch = f.get_str("general.architecture").ok()?.to_string();
            f.get_u32(&format!("{arch}.block_count")).ok()
        });
        if let Some(n) = n_layer.filter(|&n| l >= n as usize) {
            return Err(anyhow!(
                "--inject-layer {l}: the model has {n} layer(s) (0 to {})",
                n.saturating_sub(1)
            )
            .into());
        }
    }
    let record = RunRecord {
        model_path: model.display().to_string(),
        prompt,
        steps: args.steps,
        mode: args.mode,
        threads,
        kv_type: args.kv,
        keep_going: args.keep_going,
        faults: args.inject.clone(),
        fault_layer: args.inject_layer,
        token_faults: args.inject_token.clone(),
        policy_path: args.policy.as_ref().map(|p| p.display().to_string()),
        chat: args.chat,
        reference_ffn_act: args.reference_ffn_act,
        ffn_act: args.ffn_act,
    };
    let show_progress = !super::quiet() && !args.json && std::io::stderr().is_terminal();
    let receipt = match &args.candidate_cmd {
        Some(template) => {
            let dir = args.dumps.clone().unwrap_or_else(|| {
                let mut d = args.receipt.clone().into_os_string();
                d.push(".dumps");
                PathBuf::from(d)
            });
            external(
                template,
                Duration::from_secs(args.candidate_timeout),
                args.map.as_deref(),
                &record,
                dir,
            )?
        }
        None => execute(&record, show_progress)?,
    };
    receipt.write(&args.receipt).map_err(|e| Failure {
        code: 2,
        error: e.into(),
    })?;
    if let Some(html) = &args.html {
        let label = args.receipt.display().to_string();
        super::report::write_receipts_page(&[(label, receipt.clone())], html)?;
    }
    if args.json {
        json_out!(&receipt.to_json());
    } else {
        print_summary(&receipt, &args.receipt);
        if let Some(html) = &args.html {
            outln!("report  {}", html.display());
        }
    }
    Ok(exit_code(&receipt))
}

/// Runs what a record describes and builds the receipt (find and verify).
pub fn execute(record: &RunRecord, show_progress: bool) -> Result<Receipt, Failure> {
    let bar = show_progress.then(|| {
        let b = indicatif::ProgressBar::new((record.steps + 1) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} step {pos}/{len} {bar:30} {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let progress: Option<Arc<dyn Fn(usize, usize) + Send + Sync>> = bar
        .clone()
        .map(|b| Arc::new(move |done: usize, _| b.set_position(done as u64)) as _);
    let worker = divergence::reference::worker::default_exe().map_err(anyhow::Error::from)?;
    let receipt = Receipt::run(record, worker, progress, Some(interrupt::flag()))
        .map_err(|e| run_failure(e, &record.model_path))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    for w in &receipt.weight_warnings {
        errln!("warning: {w}");
    }
    Ok(receipt)
}

/// A run that could not happen (exit 2): errors about the model are
/// prefixed with it (one that could not read it names it already); a
/// policy names its own file.
pub fn run_failure(e: RunError, model: &str) -> Failure {
    match e {
        RunError::Policy(_) => anyhow::Error::from(e).into(),
        e @ RunError::Gguf(divergence::gguf::GgufError::Io { .. }) => anyhow::Error::from(e).into(),
        e => anyhow::Error::from(e)
            .context(format!("model {model}"))
            .into(),
    }
}

/// Runs the reference and `template` on what `record` asks for, and judges
/// the command's dump as `compare` would (find and sweep).
pub fn external(
    template: &str,
    timeout: Duration,
    map: Option<&Path>,
    record: &RunRecord,
    dir: PathBuf,
) -> Result<Receipt, Failure> {
    let cmd = CandidateCommand::parse(template, timeout).map_err(|e| anyhow!(e))?;
    let map_path = map;
    let map = match map_path {
        Some(p) => Some(DumpMap::load(p)?),
        None => None,
    };
    let policy = match &record.policy_path {
        Some(p) => Policy::load(Path::new(p))?,
        None => Policy::default_policy(),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let run = ExternalRun {
        model: PathBuf::from(&record.model_path),
        prompt: record.prompt.clone(),
        steps: record.steps,
        threads: record.threads,
        kv_type: record.kv_type,
        map,
        options: OfflineOptions {
            policy: policy.clone(),
            keep_going: record.keep_going,
            model: None,
            worker_exe: None,
            ffn_act: record.ffn_act,
        },
        dir,
    };
    let worker = divergence::reference::worker::default_exe().map_err(anyhow::Error::from)?;
    let judged = divergence::external::judge(&cmd, &run, &worker, Some(&interrupt::flag()))
        .map_err(|e| {
            let code = match &e {
                ExternalError::Capture(CaptureError::Reference(_)) => 3,
                _ => 2,
            };
            Failure {
                code,
                error: anyhow::Error::from(e).context(format!("model {}", record.model_path)),
            }
        })?;
    let reference = divergence::dump::Dump::open(&judged.reference_dump)
        .with_context(|| format!("reading {}", judged.reference_dump.display()))?;
    let m = reference
        .manifest
        .as_ref()
        .ok_or_else(|| anyhow!("the reference dump lost its manifest"))?;
    let offline = OfflineRecord {
        reference_dump: judged.reference_dump.display().to_string(),
        candidate_dump: judged.candidate_dump.display().to_string(),
        map: map_path.map(|p| p.display().to_string()),
        model_given: true,
        note: String::new(),
        candidate_cmd: Some(template.to_string()),
    };
    let mut receipt = super::capture::offline_receipt(
        m,
        judged.compared,
        policy,
        record.policy_path.as_deref().map(Path::new),
        record.keep_going,
        offline,
    );
    // The prompt as asked (text stays text).
    receipt.run.prompt = record.prompt.clone();
    receipt.candidate.engine = format!("command: {template}");
    Ok(receipt)
}

/// 0 no divergence, 1 divergence, 3 the reference failed, 4 incomplete
/// (something expected was not judged), 5 the candidate failed; 130 when
/// the user interrupted a run that had not diverged yet (its receipt says so).
pub fn exit_code(r: &Receipt) -> ExitCode {
    if r.interrupted && matches!(r.verdict, Verdict::NoDivergence | Verdict::Incomplete) {
        return ExitCode::from(130);
    }
    ExitCode::from(verdict_code(r.verdict))
}

/// The exit code of a verdict (see [`exit_code`]).
pub fn verdict_code(v: Verdict) -> u8 {
    match v {
        Verdict::NoDivergence => 0,
        Verdict::Divergence => 1,
        Verdict::ReferenceFailed => 3,
        Verdict::Incomplete => 4,
        Verdict::CandidateFailed => 5,
    }
}

pub fn print_summary(r: &Receipt, path: &Path) {
    let (arch, layers) = match (&r.model.file, &r.model.config) {
        (Some(f), _) => (f.arch.clone(), f.n_layer),
        (None, Some(c)) => (c.arch.name().to_string(), c.n_layer),
        (None, None) => ("?".to_string(), 0),
    };
    outln!(
        "model   {} ({arch}, {layers} layers, sha256 {}…)",
        r.model.path,
        &r.model.sha256[..12.min(r.model.sha256.len())]
    );
    outln!("candidate {} ({})", r.candidate.engine, r.candidate.build);
    outln!(
        "run     mode {:?}, {} step(s), {} thread(s), KV {:?}, policy {}",
        r.run.mode,
        r.run.steps,
        r.run.threads,
        r.run.kv_type,
        r.policy.name
    );
    if let Some(act) = r.run.ffn_act {
        outln!(
            "        FFN activation {} in both engines and the oracle (--ffn-act, instead of the arch's own)",
            act.name()
        );
    }
    if r.run.reference_ffn_act != FfnAct::default() {
        outln!(
            "        reference FFN activation {} (--reference-ffn-act: the reference alone, as upstream runs it; bitnet.cpp's bitnet-b1.58 bug)",
            r.run.reference_ffn_act.name()
        );
    }
    let t = &r.tokens;
    outln!(
        "tokens  reference {:?}{}",
        t.reference,
        match (t.source, t.equal) {
            (TokenSource::NotTokenized, _) => {
                " (none: the run stopped before the prompt was tokenized)".to_string()
            }
            (TokenSource::IdsGiven, _) => " (given: both sides were fed these ids)".to_string(),
            (TokenSource::CandidateHasNoTokenizer, _) => {
                " (NOT compared: the candidate has no tokenizer for this vocabulary and was fed these ids)".to_string()
            }
            (_, true) => " (candidate agrees)".to_string(),
            (_, false) => format!(", candidate {:?}", t.candidate),
        }
    );
    if let Some(d) = &t.first_difference {
        let piece = |p: &Option<String>| p.as_ref().map(|p| format!(" {p:?}")).unwrap_or_default();
        outln!(
            "        first difference at {}: {} (reference {}{}, candidate {}{})",
            d.position,
            d.description,
            d.reference.map_or("-".into(), |v| v.to_string()),
            piece(&d.reference_piece),
            d.candidate.map_or("-".into(), |v| v.to_string()),
            piece(&d.candidate_piece)
        );
    }
    for m in &r.config_check {
        outln!(
            "config  the candidate read {} = {}, the file says {}",
            m.field,
            m.candidate,
            m.file
        );
    }
    if !t.duplicate_bos_candidate.is_empty() || !t.duplicate_bos_reference.is_empty() {
        outln!(
            "        duplicated BOS at: reference {:?}, candidate {:?}",
            t.duplicate_bos_reference,
            t.duplicate_bos_candidate
        );
    }
    // Per-layer table: one column per stage, the candidate's worst local
    // error (over its rounding level, on its own inputs) up to the divergence.
    let stages: Vec<_> = divergence::trace::Stage::ALL
        .into_iter()
        .filter(|s| r.stages.iter().any(|x| x.stage == *s))
        .collect();
    let mut layers: Vec<Option<usize>> = r.stages.iter().map(|s| s.layer).collect();
    layers.sort_by_key(|l| l.map_or(usize::MAX, |v| v));
    layers.dedup();
    outln!(
        "\nlocal error per stage, candidate against the f64 oracle on its own inputs (= bit-identical to the reference, ~ within the local rule, X beyond it; number: worst error over the stage's rounding level)"
    );
    for layer in layers {
        let label = layer.map_or("model".to_string(), |l| format!("layer {l}"));
        let mut cells = Vec::new();
        for s in &stages {
            if let Some(x) = r.stages.iter().find(|x| x.layer == layer && x.stage == *s) {
                let mark = if !x.all_pass {
                    "X"
                } else if x.all_exact {
                    "="
                } else {
                    "~"
                };
                cells.push(match x.worst_candidate_over_rounding {
                    Some(v) if !x.all_exact || !x.all_pass => format!("{s}{mark}{v:.0e}"),
                    _ => format!("{s}{mark}"),
                });
            }
        }
        outln!("  {label:>8}  {}", cells.join(" "));
    }
    if let Some(scope) = &r.coverage.scope {
        outln!("scope   {}", scope.note);
    }
    if let Some(d) = &r.drift {
        let growth: Vec<String> = d
            .l_out_by_layer
            .iter()
            .map(|v| format!("{v:.0e}"))
            .collect();
        if !growth.is_empty() {
            outln!(
                "drift   l_out NMSE against the reference by layer (each fed itself; reported, not judged): {}",
                growth.join(" ")
            );
        }
        if !d.beyond_free_run_bound.is_empty() {
            outln!(
                "        beyond the free-run drift bound at {} (drift, not a bug: each side is within its local rule)",
                keys(&d.beyond_free_run_bound)
            );
        }
        if let Some(s) = d.fed_different_tokens_from {
            outln!("        from step {s} the two sides were fed different tokens");
        }
    }
    for remark in &r.remarks {
        outln!("note    {remark}");
    }
    outln!();
    match (&r.verdict, &r.first_divergence) {
        (Verdict::ReferenceFailed, _) => {
            outln!(
                "REFERENCE FAILED: {}",
                r.reference_failure.as_deref().unwrap_or("unknown")
            );
        }
        (Verdict::CandidateFailed, _) => {
            if let Some(f) = &r.candidate_failure {
                outln!(
                    "CANDIDATE FAILED ({}) at step {}, after stage {}: {}",
                    f.kind,
                    f.step.map_or("-".to_string(), |s| s.to_string()),
                    f.last_stage.map_or("(none)".to_string(), |k| k.to_string()),
                    f.message
                );
            }
        }
        (_, Some(d)) if d.measured == Measured::Tokens => {
            outln!(
                "FIRST DIVERGENCE  the prompt's token ids, position {}",
                d.position
            );
            outln!("  blame: {:?} — {}", d.blame.blame, d.blame.reason);
        }
        (_, Some(d)) => {
            outln!(
                "FIRST DIVERGENCE  step {} position {} layer {} stage {} ({})",
                d.step,
                d.position,
                d.layer.map_or("-".to_string(), |l| l.to_string()),
                d.stage,
                match d.measured {
                    Measured::Local => "local error on its own inputs",
                    Measured::AcrossGap => "local error across the stages it does not emit",
                    Measured::SideVsSide => "side against side: the oracle could not judge",
                    Measured::Tokens => "tokens",
                    Measured::Choice => "a chosen token under the reference's logits",
                }
            );
            if let Some(shape) = d.metrics.as_ref().and_then(|m| m.candidate_shape.as_ref()) {
                outln!(
                    "  the shapes differ: reference {:?}, candidate {:?}",
                    d.shape,
                    shape
                );
            }
            for (side, e) in [
                ("candidate", &d.candidate_local),
                ("reference", &d.reference_local),
            ] {
                if let Some(e) = e {
                    outln!(
                        "  {side:<9} {} (NMSE {:.3e} vs the oracle{}{})",
                        if e.recomputed.is_empty() {
                            format!("{:.2e}x its rounding level", e.over_rounding)
                        } else {
                            format!("across {} recomputed stage(s)", e.recomputed.len())
                        },
                        e.nmse,
                        if e.ties > 0 {
                            format!(", {} tied code(s), {} taken", e.ties, e.ties_taken)
                        } else {
                            String::new()
                        },
                        if e.pass {
                            ", within its rule"
                        } else {
                            ", BEYOND its rule"
                        }
                    );
                }
            }
            if let Some(m) = &d.metrics {
                outln!(
                    "  side against side: nmse {:.3e}  max_abs {:.3e}  max_ulp {}  cosine {:.6}",
                    m.nmse,
                    m.max_abs,
                    m.max_ulp,
                    m.cosine
                );
            }
            for w in d.worst.iter().take(4) {
                outln!(
                    "  at {:?}: reference {} candidate {}{}",
                    w.index,
                    w.reference,
                    w.candidate,
                    w.oracle
                        .map(|o| format!(" oracle {o:.6}"))
                        .unwrap_or_default()
                );
            }
            outln!("  blame: {:?} — {}", d.blame.blame, d.blame.reason);
            if let Some(cause) = &d.blame.cause {
                outln!("  cause: {cause}");
            }
        }
        (_, None) if !r.tokens.equal => outln!("DIVERGENCE in the prompt's token ids"),
        (Verdict::Incomplete, None) => {
            outln!("INCOMPLETE: nothing failed, but not everything expected was judged:");
            for n in &r.coverage.notes {
                outln!("  {n}");
            }
            for s in &r.coverage.steps {
                if !s.missing_reference.is_empty() {
                    outln!(
                        "  step {}: the reference lacks {}",
                        s.step,
                        keys(&s.missing_reference)
                    );
                }
                if !s.missing_candidate.is_empty() {
                    outln!(
                        "  step {}: the candidate did not emit {}",
                        s.step,
                        keys(&s.missing_candidate)
                    );
                }
            }
        }
        (_, None) if r.interrupted => outln!(
            "INTERRUPTED after {} of {} steps: no divergence in the steps that ran",
            r.steps_run,
            r.run.steps + 1
        ),
        (_, None) => outln!("NO DIVERGENCE: every stage of every step is within the policy"),
    }
    if !r.generated.disagreements.is_empty() {
        outln!(
            "greedy tokens disagreed at steps {:?}",
            r.generated
                .disagreements
                .iter()
                .map(|d| d.step)
                .collect::<Vec<_>>()
        );
    }
    if !r.coverage.unmapped_reference_nodes.is_empty() {
        outln!(
            "unmapped reference nodes: {}",
            r.coverage.unmapped_reference_nodes.join(", ")
        );
    }
    outln!("receipt {}", path.display());
}

/// Stage keys as a short list (`q_proj[0], ffn_up[3], ...`).
fn keys(ks: &[divergence::trace::StageKey]) -> String {
    let shown: Vec<String> = ks.iter().take(8).map(|k| k.to_string()).collect();
    if ks.len() > shown.len() {
        format!("{} and {} more", shown.join(", "), ks.len() - shown.len())
    } else {
        shown.join(", ")
    }
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Receipts to re-run and check.
    #[arg(required = true)]
    receipts: Vec<PathBuf>,
}

/// What checking one receipt found.
enum Checked {
    Same,
    Different,
    Interrupted,
}

/// Re-runs what each receipt recorded. Every receipt is checked and
/// reported: exit 0 when every result is the same, 1 when one changed, 2
/// when one could not be checked (bad or unreadable receipt, model gone),
/// 130 when interrupted.
pub fn verify(args: VerifyArgs) -> CliResult {
    let cancel = interrupt::flag();
    let mut worst = 0u8;
    let mut unchecked = 0;
    for path in &args.receipts {
        match verify_one(path, &cancel) {
            Ok(Checked::Same) => {}
            Ok(Checked::Different) => worst = worst.max(1),
            Ok(Checked::Interrupted) => {
                errln!(
                    "{}: interrupted: not verified (nor the receipts after it)",
                    path.display()
                );
                return Ok(ExitCode::from(130));
            }
            Err(f) => {
                errln!(
                    "error: {}: {}",
                    path.display(),
                    super::terminal::error_chain(&f.error)
                );
                unchecked += 1;
                worst = worst.max(f.code);
            }
        }
    }
    if unchecked > 0 && args.receipts.len() > 1 {
        errln!(
            "{unchecked} of {} receipts could not be verified",
            args.receipts.len()
        );
    }
    Ok(ExitCode::from(worst))
}

/// Checks what a receipt records before anything runs: a version this
/// tool reads, and run values `find` itself would accept.
fn check_recorded(r: &Receipt) -> anyhow::Result<RunRecord> {
    if r.schema_version != receipt::SCHEMA_VERSION {
        return Err(anyhow!(
            "schema_version {}: this divergence reads receipts of version {}",
            r.schema_version,
            receipt::SCHEMA_VERSION
        ));
    }
    if let Some(off) = &r.offline {
        return Err(anyhow!(
            "an offline comparison of {} and {}: run `divergence compare` on those dumps again",
            off.reference_dump,
            off.candidate_dump
        ));
    }
    let mut run = r.run.clone();
    if run.steps > MAX_STEPS {
        return Err(anyhow!(
            "its recorded steps {}: at most {MAX_STEPS}",
            run.steps
        ));
    }
    match &run.prompt {
        Prompt::Text(t) if t.is_empty() => return Err(anyhow!("its recorded prompt is empty")),
        Prompt::Tokens(ids) if ids.is_empty() => {
            return Err(anyhow!("its recorded token ids are empty"))
        }
        _ => {}
    }
    run.threads = threads::bounded(run.threads, "its recorded threads")?;
    Ok(run)
}

fn verify_one(
    path: &Path,
    cancel: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<Checked, Failure> {
    let old = Receipt::read(path).map_err(|e| match e {
        receipt::ReceiptError::Io(_, e) => anyhow::Error::from(e),
        receipt::ReceiptError::Parse(_, e) => anyhow!("not a valid receipt: {e}"),
    })?;
    let record = check_recorded(&old)?;
    let model = Path::new(&old.run.model_path);
    if !model.exists() {
        // A synthetic model records its recipe: make the same bytes again,
        // kept only when they hash to what the receipt recorded.
        let recipe = old.model.recipe.as_ref().ok_or_else(|| {
            anyhow!(
                "model {} is missing, and the receipt has no recipe to make it again",
                model.display()
            )
        })?;
        if let Some(dir) = model.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut recipe = recipe.clone();
        if let Some(src) = &recipe.vocab_source {
            // The copied tokenizer comes from its file again, checked by hash.
            let p = Path::new(&src.path);
            let sha = receipt::sha256_file(p)
                .with_context(|| format!("the recipe's vocabulary {}", p.display()))?;
            if sha != src.sha256 {
                return Err(anyhow!(
                    "vocabulary {} has sha256 {sha}, the recipe recorded {}",
                    p.display(),
                    src.sha256
                )
                .into());
            }
            recipe.vocab = Some(divergence::synth::CopiedVocab::from_gguf(p)?);
        }
        divergence::synth::remake(&recipe, model, &old.model.sha256)
            .with_context(|| format!("making model {} again from its recipe", model.display()))?;
        outln!(
            "{}: made {} again from the recipe it records",
            path.display(),
            model.display()
        );
    }
    let sha = receipt::sha256_file(model).with_context(|| format!("model {}", model.display()))?;
    if sha != old.model.sha256 {
        return Err(anyhow!(
            "model {} has sha256 {sha}, the receipt recorded {}",
            model.display(),
            old.model.sha256
        )
        .into());
    }
    let worker = divergence::reference::worker::default_exe().map_err(anyhow::Error::from)?;
    // The record as checked (its threads bounded by this machine).
    let mut rerun = old.clone();
    rerun.run = record;
    let mut new = rerun
        .rerun(worker, None, Some(Arc::clone(cancel)))
        .map_err(|e| run_failure(e, &old.run.model_path))?;
    if new.interrupted {
        return Ok(Checked::Interrupted);
    }
    // Compared as recorded: a clamped thread count was said on stderr.
    new.run.threads = old.run.threads;
    let diffs = old.differences(&new);
    let elsewhere = (!old.same_machine(&new)).then(|| {
        format!(
            " on another CPU (made with {}, run with {}: compared as results, floats to 1e-3)",
            old.reference.cpu_features.join(" "),
            new.reference.cpu_features.join(" ")
        )
    });
    if diffs.is_empty() {
        outln!(
            "{}: same result ({:?}){}",
            path.display(),
            new.verdict,
            elsewhere.unwrap_or_default()
        );
        return Ok(Checked::Same);
    }
    if let Some(e) = elsewhere {
        outln!("{}: compared{e}", path.display());
    }
    outln!("{}: DIFFERENT", path.display());
    for d in diffs {
        outln!("  {d}");
    }
    Ok(Checked::Different)
}
