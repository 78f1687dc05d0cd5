//! Sweeps: one lockstep run per prompt of a corpus, and statistics over all
//! of them.
//!
//! One prompt proves little. A sweep runs every prompt of a corpus
//! ([`corpus`]) through one [`crate::lockstep::Session`] (both engines
//! loaded once, caches cleared between prompts) and keeps, per prompt, the
//! verdict, the first divergence, every judged (layer, stage) of every step
//! and, for every position, the two sides' next-token distributions
//! compared (KL and top tokens). Over the corpus it reports per (layer,
//! stage) the distribution of the error and for the logits the KL
//! divergence statistics of `llama-perplexity --kl-divergence`
//! ([`stats`]).
//!
//! Shards are exact: `--shard I/N` runs a fixed subset of the prompts
//! ([`Shard`]), each shard file keeps the raw values, and [`merge`] puts
//! shard files together into exactly the file one unsharded run writes
//! (apart from `volatile`): the statistics are recomputed from the merged
//! raw values, never averaged.
//!
//! The sweep runs with `keep_going`: every step of every prompt is run and
//! judged, so every prompt contributes the same positions whatever it finds.

pub mod corpus;
pub mod stats;

pub use corpus::{Corpus, CorpusError, CorpusPrompt, Shard};
pub use stats::{Distribution, KldSummary, StageDistribution};

use crate::candidate::BuiltinCandidate;
use crate::compare::{Blame, Policy};
use crate::dump::capture::CaptureError;
use crate::dump::map::DumpMap;
use crate::engine::Fault;
use crate::external::{self, CandidateCommand, ExternalError, ExternalRun};
use crate::lockstep::offline::OfflineOptions;
use crate::lockstep::{
    self, Measured, Mode, PositionLogits, Prompt, RunConfig, RunError, Session, StepRecord, Verdict,
};
use crate::model::{FfnAct, KvType};
use crate::receipt::{self, Generated, Receipt, RunRecord};
use crate::reference::BuildInfo;
use crate::trace::Stage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a sweep file says it is.
pub const FORMAT: &str = "divergence-sweep";
/// The version of the sweep file's layout.
pub const SCHEMA_VERSION: u32 = 1;
/// The largest sweep file (or shard) read.
pub const MAX_SWEEP_BYTES: u64 = 256 << 20;

/// A sweep file: what ran, the statistics, every prompt's raw results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sweep {
    /// Always [`FORMAT`].
    pub format: String,
    /// The layout's version, [`SCHEMA_VERSION`] when written.
    pub schema_version: u32,
    /// The tool that wrote it, `divergence` and its version.
    pub tool: String,
    /// What was run; shards of one sweep have the same.
    pub config: SweepConfig,
    /// The builds that ran it (one, unless shards ran on different machines).
    pub builds: Vec<SweepBuild>,
    /// The subset of the corpus this file covers (none: all of it).
    pub shard: Option<Shard>,
    /// Statistics over the prompts in this file.
    pub summary: SweepSummary,
    /// Per prompt, in corpus order.
    pub prompts: Vec<PromptResult>,
    /// Stopped by Ctrl-C: `prompts` holds the prompts that finished (the
    /// one running was dropped), not the whole corpus or shard.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    /// Never part of the sweep's identity.
    pub volatile: SweepVolatile,
}

/// What a sweep ran: shards of one sweep must agree on all of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepConfig {
    /// The model, as given.
    pub model_path: String,
    /// sha256 of the model file, hex.
    pub model_sha256: String,
    /// The corpus, as given.
    pub prompts_path: String,
    /// sha256 of the corpus file, hex.
    pub prompts_sha256: String,
    /// Prompts in the whole corpus (a shard runs some of them).
    pub corpus_prompts: usize,
    /// Greedy decode steps after each prompt's prefill.
    pub steps: usize,
    /// Resync or free.
    pub mode: Mode,
    /// Threads for each engine.
    pub threads: usize,
    /// KV cache type of both engines.
    pub kv_type: KvType,
    /// A policy file given with --policy, else the built-in one.
    pub policy_path: Option<String>,
    /// The tolerance policy in force, in full.
    pub policy: Policy,
    /// Test-only: faults injected into the candidate.
    pub faults: Vec<Fault>,
    /// Where per-prompt receipts were written (none: not written).
    pub receipts_dir: Option<String>,
    /// The FFN activation forced on both engines and the oracle
    /// (`--ffn-act`); absent when none was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_act: Option<FfnAct>,
    /// The external engine's command (`--candidate-cmd`), when the
    /// candidate was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_cmd: Option<String>,
}

/// Both sides' builds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepBuild {
    /// How the bitnet.cpp reference was built, and the CPU features it ran with.
    pub reference: BuildInfo,
    /// The candidate's name (empty if it never loaded).
    pub candidate_engine: String,
    /// The candidate's build description (empty if it never loaded).
    pub candidate_build: String,
}

/// The first divergence of one prompt, in brief (its receipt has the rest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DivergenceBrief {
    /// The step.
    pub step: usize,
    /// The position of the worst element.
    pub position: usize,
    /// The layer (none for model-level stages).
    pub layer: Option<usize>,
    /// The stage.
    pub stage: Stage,
    /// Which error the rule judged.
    pub measured: Measured,
    /// The stage's NMSE.
    pub nmse: f64,
    /// Which side the oracle blamed.
    pub blame: Blame,
}

/// One prompt's results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptResult {
    /// Index in the corpus (what shards select on).
    pub index: usize,
    /// The corpus line.
    pub line: usize,
    /// The kind of prompt, if the corpus says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Text or token ids.
    pub prompt: Prompt,
    /// None: the prompt could not run on this model (`not_run` says why).
    pub verdict: Option<Verdict>,
    /// Why the prompt could not run (too long for the context, ids outside
    /// the vocabulary); `None` when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_run: Option<String>,
    /// The reference's prompt ids.
    pub reference_tokens: Vec<u32>,
    /// Both sides' prompt ids are the same.
    pub tokens_equal: bool,
    /// Steps that ran, the prefill (step 0) included.
    pub steps_run: usize,
    /// Everything expected was judged.
    pub coverage_complete: bool,
    /// The first stage that failed its rule, if any.
    pub first_divergence: Option<DivergenceBrief>,
    /// Divergences after the first (the sweep keeps going).
    pub later_divergences: usize,
    /// Why bitnet.cpp failed, if it did.
    pub reference_failure: Option<String>,
    /// The candidate's failure message, if it failed.
    pub candidate_failure: Option<String>,
    /// Both sides' greedy tokens.
    pub generated: Generated,
    /// The receipt written for this prompt, if any.
    pub receipt: Option<String>,
    /// Raw: every stage judged, per step.
    pub steps: Vec<StepRecord>,
    /// Raw: every position's logits compared.
    pub positions: Vec<PositionLogits>,
}

/// Greedy choices of the two sides (in free mode the candidate's own).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenAgreement {
    /// Greedy choices made (one per step per prompt).
    pub choices: usize,
    /// Choices where both sides picked the same token.
    pub agreeing: usize,
    /// agreeing / choices (1 when there were none).
    pub rate: f64,
}

/// Statistics over the prompts of a sweep file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepSummary {
    /// Prompts in this file.
    pub prompts: usize,
    /// How many prompts got each verdict (`not_run`: could not run).
    pub verdicts: BTreeMap<String, usize>,
    /// KL(P_ref ‖ P_cand) over every position of every prompt.
    pub kld: Option<KldSummary>,
    /// The greedy tokens' agreement.
    pub greedy_tokens: TokenAgreement,
    /// Per (layer, stage) over every judged step of every prompt.
    pub stages: Vec<StageDistribution>,
}

/// One prompt's wall time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptTiming {
    /// The prompt's index in the corpus.
    pub index: usize,
    /// Seconds from its start to its result, receipt writing included.
    pub total_s: f64,
}

/// Volatile: timings, memory, where the file came from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SweepVolatile {
    /// When the file was made, in seconds since the Unix epoch.
    pub timestamp_unix: u64,
    /// The whole sweep (for a merge: the shards' sum).
    pub total_s: f64,
    /// Each prompt's wall time, in corpus order.
    pub prompts: Vec<PromptTiming>,
    /// Peak resident set of the harness (candidate + comparator).
    pub harness_peak_rss_bytes: Option<u64>,
    /// Largest peak resident set of a reference worker.
    pub reference_peak_rss_bytes: Option<u64>,
    /// For a merge: the shard files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged_from: Vec<String>,
}

/// What to sweep.
#[derive(Clone, Debug)]
pub struct SweepRequest {
    /// The GGUF both engines run.
    pub model: PathBuf,
    /// The corpus file (see [`corpus`]).
    pub prompts: PathBuf,
    /// Greedy decode steps after each prompt's prefill.
    pub steps: usize,
    /// Resync or free.
    pub mode: Mode,
    /// Threads for each engine.
    pub threads: usize,
    /// KV cache type of both engines.
    pub kv_type: KvType,
    /// A policy file; `None` for the built-in one.
    pub policy_path: Option<PathBuf>,
    /// Faults injected into the built-in candidate (the bug zoo).
    pub faults: Vec<Fault>,
    /// Run only this subset of the corpus; `None` for all of it.
    pub shard: Option<Shard>,
    /// Write one receipt per prompt here (`prompt-NNNN.json`).
    pub receipts_dir: Option<PathBuf>,
    /// The FFN activation forced on both engines and the oracle instead of
    /// the arch's own (`--ffn-act`; not with an external engine).
    pub ffn_act: Option<FfnAct>,
    /// Set (by Ctrl-C): the prompt running stops after its current step
    /// and is dropped, and the sweep ends with the prompts done.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// An external engine instead of ours (`--candidate-cmd`).
    pub external: Option<SweepExternal>,
}

/// An external engine run for every prompt of a sweep.
#[derive(Clone, Debug)]
pub struct SweepExternal {
    /// The command.
    pub command: CandidateCommand,
    /// Its dump read through this map.
    pub map: Option<DumpMap>,
    /// Both dumps of prompt i go to `prompt-NNNN/` in here.
    pub dumps_dir: PathBuf,
}

/// Why a sweep or a merge could not happen: bad input (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The corpus could not be read.
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    /// A prompt's run could not happen for a reason other than the prompt
    /// itself (the model or policy is bad, a file could not be read).
    #[error("prompt {index} (line {line}): {error}")]
    Run {
        /// The prompt's index in the corpus.
        index: usize,
        /// Its line in the corpus file.
        line: usize,
        /// Why the run could not happen.
        error: RunError,
    },
    /// The policy file could not be loaded.
    #[error(transparent)]
    Policy(#[from] crate::compare::policy::PolicyError),
    /// A file (model, receipt, sweep file) could not be read, written or
    /// parsed; the message names it.
    #[error("{0}")]
    Io(String),
    /// The shard files do not make one sweep: not shards, of different
    /// sweeps, given twice, missing, or holding the wrong prompts.
    #[error("{0}")]
    Merge(String),
}

/// The file name of prompt `index`'s receipt.
pub fn receipt_name(index: usize) -> String {
    format!("prompt-{index:04}.json")
}

/// Runs every prompt of the request's corpus (or shard), calling
/// `on_prompt(done, total)` before the first and after each.
pub fn run(
    req: &SweepRequest,
    worker_exe: PathBuf,
    on_prompt: &mut dyn FnMut(usize, usize),
) -> Result<Sweep, SweepError> {
    let t_total = Instant::now();
    let corpus = Corpus::read(&req.prompts)?;
    let policy = match &req.policy_path {
        Some(p) => Policy::load(p)?,
        None => Policy::default_policy(),
    };
    let model_sha256 = receipt::sha256_file(&req.model)
        .map_err(|e| SweepError::Io(format!("{}: {e}", req.model.display())))?;
    if let Some(dir) = &req.receipts_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| SweepError::Io(format!("creating {}: {e}", dir.display())))?;
    }
    let candidate = BuiltinCandidate {
        faults: req.faults.clone(),
        ..BuiltinCandidate::default()
    };
    let selected: Vec<&CorpusPrompt> = corpus
        .prompts
        .iter()
        .filter(|p| req.shard.is_none_or(|s| s.contains(p.index)))
        .collect();
    let mut prompts = Vec::with_capacity(selected.len());
    let mut volatile = SweepVolatile::default();
    let mut candidate_build = None;
    on_prompt(0, selected.len());
    let cancelled = || {
        req.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
    };
    let mut interrupted = false;
    let record_of = |p: &CorpusPrompt| RunRecord {
        model_path: req.model.display().to_string(),
        prompt: p.prompt.clone(),
        steps: req.steps,
        mode: req.mode,
        threads: req.threads,
        kv_type: req.kv_type,
        keep_going: true,
        faults: req.faults.clone(),
        token_faults: vec![],
        fault_layer: None,
        policy_path: req.policy_path.as_ref().map(|p| p.display().to_string()),
        chat: false,
        reference_ffn_act: Default::default(),
        ffn_act: req.ffn_act,
    };
    let config_of = |prompt: &Prompt| RunConfig {
        steps: req.steps,
        mode: req.mode,
        threads: req.threads,
        kv_type: req.kv_type,
        keep_going: true,
        ffn_act: req.ffn_act,
        cancel: req.cancel.clone(),
        ..RunConfig::new(
            req.model.clone(),
            prompt.clone(),
            policy.clone(),
            worker_exe.clone(),
        )
    };
    // Both engines stay loaded for the whole corpus (each prompt starts
    // from position 0 with empty caches): loading the 2B-4T shape costs
    // more than judging a short prompt. The caches are sized for the
    // longest prompt. A session that cannot open (an engine that fails to
    // load) leaves each prompt to a run of its own, which reports why.
    let session_cfg = selected.first().map(|p| config_of(&p.prompt));
    let bound = selected
        .iter()
        .map(|p| lockstep::prompt_bound(&p.prompt, false))
        .max()
        .unwrap_or(0);
    let mut session = match &session_cfg {
        Some(_) if req.external.is_some() => None,
        Some(cfg) => match Session::open(cfg, &candidate, bound) {
            Ok(Ok(session)) => Some(session),
            Ok(Err(_)) | Err(_) => None,
        },
        None => None,
    };
    for (done, p) in selected.iter().enumerate() {
        if cancelled() {
            interrupted = true;
            break;
        }
        let t = Instant::now();
        let record = record_of(p);
        let result = match (&req.external, session.as_mut()) {
            (Some(ext), _) => external_prompt(req, ext, &policy, p, &worker_exe),
            (None, Some(session)) => session.run_prompt(&p.prompt, t),
            (None, None) => lockstep::run(&config_of(&p.prompt), &candidate),
        };
        let result = match result {
            // Stopped part way: what it measured covers fewer positions.
            Ok(outcome) if outcome.interrupted => {
                interrupted = true;
                break;
            }
            Ok(mut outcome) => {
                let positions = std::mem::take(&mut outcome.logit_positions);
                if candidate_build.is_none() && !outcome.candidate.name.is_empty() {
                    candidate_build = Some((
                        outcome.candidate.name.clone(),
                        outcome.candidate.build.clone(),
                    ));
                }
                volatile.reference_peak_rss_bytes = volatile
                    .reference_peak_rss_bytes
                    .max(outcome.timings.reference_peak_rss_bytes);
                let receipt =
                    Receipt::from_outcome(record, model_sha256.clone(), policy.clone(), outcome);
                let receipt_path = match &req.receipts_dir {
                    Some(dir) => {
                        let path = dir.join(receipt_name(p.index));
                        receipt
                            .write(&path)
                            .map_err(|e| SweepError::Io(e.to_string()))?;
                        Some(path.display().to_string())
                    }
                    None => None,
                };
                prompt_result(p, &receipt, receipt_path, positions)
            }
            // A prompt this model cannot take (too long for its context,
            // ids outside its vocabulary) is reported, and the sweep goes on.
            Err(RunError::Input(why)) => not_run(p, why),
            Err(error) => {
                return Err(SweepError::Run {
                    index: p.index,
                    line: p.line,
                    error,
                })
            }
        };
        prompts.push(result);
        volatile.prompts.push(PromptTiming {
            index: p.index,
            total_s: t.elapsed().as_secs_f64(),
        });
        on_prompt(done + 1, selected.len());
    }
    let (candidate_engine, candidate_build) = candidate_build.unwrap_or_default();
    volatile.total_s = t_total.elapsed().as_secs_f64();
    volatile.harness_peak_rss_bytes = crate::reference::worker::peak_rss_of("/proc/self/status");
    volatile.timestamp_unix = now_unix();
    let config = SweepConfig {
        model_path: req.model.display().to_string(),
        model_sha256,
        prompts_path: req.prompts.display().to_string(),
        prompts_sha256: corpus.sha256.clone(),
        corpus_prompts: corpus.prompts.len(),
        steps: req.steps,
        mode: req.mode,
        threads: req.threads,
        kv_type: req.kv_type,
        policy_path: req.policy_path.as_ref().map(|p| p.display().to_string()),
        policy,
        faults: req.faults.clone(),
        receipts_dir: req.receipts_dir.as_ref().map(|d| d.display().to_string()),
        ffn_act: req.ffn_act,
        candidate_cmd: req.external.as_ref().map(|e| e.command.template.clone()),
    };
    Ok(Sweep {
        format: FORMAT.into(),
        schema_version: SCHEMA_VERSION,
        tool: format!("divergence {}", env!("CARGO_PKG_VERSION")),
        config,
        builds: vec![SweepBuild {
            reference: BuildInfo::current(req.threads),
            candidate_engine,
            candidate_build,
        }],
        shard: req.shard,
        summary: SweepSummary::of(&prompts),
        prompts,
        interrupted,
        volatile,
    })
}

/// One prompt through the external engine: the reference captured, the
/// command run, its dump judged as `compare` judges.
fn external_prompt(
    req: &SweepRequest,
    ext: &SweepExternal,
    policy: &Policy,
    p: &CorpusPrompt,
    worker_exe: &Path,
) -> Result<crate::lockstep::Outcome, RunError> {
    let dir = ext.dumps_dir.join(format!("prompt-{:04}", p.index));
    std::fs::create_dir_all(&dir)
        .map_err(|e| RunError::Io(format!("creating {}: {e}", dir.display())))?;
    let run = ExternalRun {
        model: req.model.clone(),
        prompt: p.prompt.clone(),
        steps: req.steps,
        threads: req.threads,
        kv_type: req.kv_type,
        map: ext.map.clone(),
        options: OfflineOptions {
            policy: policy.clone(),
            keep_going: true,
            model: None,
            worker_exe: Some(worker_exe.to_path_buf()),
            ffn_act: req.ffn_act,
        },
        dir,
    };
    match external::judge(&ext.command, &run, worker_exe, None) {
        Ok(judged) => Ok(judged.compared.outcome),
        Err(ExternalError::Run(e)) => Err(e),
        Err(ExternalError::Capture(CaptureError::Input(why))) => Err(RunError::Input(why)),
        Err(ExternalError::Capture(e)) => Err(RunError::Io(format!("the reference: {e}"))),
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn prompt_result(
    p: &CorpusPrompt,
    r: &Receipt,
    receipt: Option<String>,
    positions: Vec<PositionLogits>,
) -> PromptResult {
    PromptResult {
        index: p.index,
        line: p.line,
        tag: p.tag.clone(),
        prompt: p.prompt.clone(),
        verdict: Some(r.verdict),
        not_run: None,
        reference_tokens: r.tokens.reference.clone(),
        tokens_equal: r.tokens.equal,
        steps_run: r.steps_run,
        coverage_complete: r.coverage.complete,
        first_divergence: r.first_divergence.as_ref().map(|d| DivergenceBrief {
            step: d.step,
            position: d.position,
            layer: d.layer,
            stage: d.stage,
            measured: d.measured,
            nmse: d.nmse(),
            blame: d.blame.blame,
        }),
        later_divergences: r.later_divergences.len(),
        reference_failure: r.reference_failure.clone(),
        candidate_failure: r.candidate_failure.as_ref().map(|f| f.message.clone()),
        generated: r.generated.clone(),
        receipt,
        steps: r.step_results.clone(),
        positions,
    }
}

fn not_run(p: &CorpusPrompt, why: String) -> PromptResult {
    PromptResult {
        index: p.index,
        line: p.line,
        tag: p.tag.clone(),
        prompt: p.prompt.clone(),
        verdict: None,
        not_run: Some(why),
        reference_tokens: vec![],
        tokens_equal: true,
        steps_run: 0,
        coverage_complete: false,
        first_divergence: None,
        later_divergences: 0,
        reference_failure: None,
        candidate_failure: None,
        generated: Generated {
            reference: vec![],
            candidate: vec![],
            disagreements: vec![],
        },
        receipt: None,
        steps: vec![],
        positions: vec![],
    }
}

/// The name a verdict has in receipts (`no_divergence`, ...).
pub fn verdict_name(v: Option<Verdict>) -> String {
    match v {
        None => "not_run".into(),
        Some(v) => serde_json::to_value(v)
            .ok()
            .and_then(|j| j.as_str().map(str::to_owned))
            .unwrap_or_default(),
    }
}

impl SweepSummary {
    /// Computed from the prompts' raw values (in the order given: corpus order).
    pub fn of(prompts: &[PromptResult]) -> SweepSummary {
        let mut verdicts = BTreeMap::new();
        for p in prompts {
            *verdicts.entry(verdict_name(p.verdict)).or_insert(0) += 1;
        }
        let (mut choices, mut agreeing) = (0, 0);
        for p in prompts {
            let g = &p.generated;
            choices += g.reference.len().min(g.candidate.len());
            agreeing += g
                .reference
                .iter()
                .zip(&g.candidate)
                .filter(|(a, b)| a == b)
                .count();
        }
        SweepSummary {
            prompts: prompts.len(),
            verdicts,
            kld: KldSummary::of(prompts.iter().flat_map(|p| &p.positions)),
            greedy_tokens: TokenAgreement {
                choices,
                agreeing,
                rate: if choices == 0 {
                    1.0
                } else {
                    agreeing as f64 / choices as f64
                },
            },
            stages: stats::stage_distributions(prompts.iter().flat_map(|p| &p.steps)),
        }
    }
}

impl Sweep {
    /// The file's text: indented JSON, except that each prompt's result
    /// (with its raw values) is one line, so the file stays small and a
    /// prompt is one `grep` away.
    pub fn to_json(&self) -> String {
        fn pretty(v: &impl Serialize) -> String {
            serde_json::to_string_pretty(v)
                .expect("sweeps serialize")
                .replace('\n', "\n  ")
        }
        let mut s = String::from("{\n");
        let mut field = |name: &str, value: String| {
            if s.len() > 2 {
                s.push_str(",\n");
            }
            s.push_str(&format!("  \"{name}\": {value}"));
        };
        field("format", pretty(&self.format));
        field("schema_version", pretty(&self.schema_version));
        field("tool", pretty(&self.tool));
        field("config", pretty(&self.config));
        field("builds", pretty(&self.builds));
        field("shard", pretty(&self.shard));
        if self.interrupted {
            field("interrupted", "true".into());
        }
        field("summary", pretty(&self.summary));
        let prompts: Vec<String> = self
            .prompts
            .iter()
            .map(|p| {
                format!(
                    "    {}",
                    serde_json::to_string(p).expect("sweeps serialize")
                )
            })
            .collect();
        field(
            "prompts",
            if prompts.is_empty() {
                "[]".into()
            } else {
                format!("[\n{}\n  ]", prompts.join(",\n"))
            },
        );
        field("volatile", pretty(&self.volatile));
        s.push_str("\n}\n");
        s
    }

    /// Reads a sweep file, refusing anything else (a receipt, say).
    pub fn read(path: &Path) -> Result<Sweep, SweepError> {
        let text = crate::input::read_text(path, MAX_SWEEP_BYTES, "sweep file")
            .map_err(|e| SweepError::Io(format!("{}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| SweepError::Io(format!("{}: {e}", path.display())))
    }

    /// Parses a sweep file's text.
    pub fn parse(text: &str) -> Result<Sweep, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        if !is_sweep(&value) {
            return Err(format!("not a sweep file (no \"format\": \"{FORMAT}\")"));
        }
        let version = value.get("schema_version").and_then(|v| v.as_u64());
        if version != Some(u64::from(SCHEMA_VERSION)) {
            return Err(format!(
                "sweep schema version {version:?}, this tool reads {SCHEMA_VERSION}"
            ));
        }
        serde_json::from_value(value).map_err(|e| format!("not a valid sweep file: {e}"))
    }

    /// Writes atomically.
    pub fn write(&self, path: &Path) -> Result<(), SweepError> {
        receipt::write_atomic(path, self.to_json().as_bytes())
            .map_err(|e| SweepError::Io(format!("writing {}: {e}", path.display())))
    }

    /// Everything but `volatile`: what a merge of shards must reproduce.
    pub fn identity(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("sweeps serialize");
        if let Some(o) = v.as_object_mut() {
            o.remove("volatile");
        }
        v
    }

    /// The exit code of a sweep: 1 when a prompt diverged, else 5 when a
    /// candidate failed, 3 when the reference failed, 4 when a prompt was
    /// incomplete or could not run, 0 when every prompt ran clean.
    pub fn exit_code(&self) -> u8 {
        let has = |name: &str| self.summary.verdicts.get(name).is_some_and(|&n| n > 0);
        if has("divergence") {
            1
        } else if has("candidate_failed") {
            5
        } else if has("reference_failed") {
            3
        } else if has("incomplete") || has("not_run") {
            4
        } else {
            0
        }
    }
}

/// Whether a JSON document is a sweep file (else: a receipt, for `report`).
pub fn is_sweep(value: &serde_json::Value) -> bool {
    value.get("format").and_then(|f| f.as_str()) == Some(FORMAT)
}

/// Puts the shards of one sweep together: exactly what the unsharded sweep
/// writes, apart from `volatile`. `labels` name the inputs (file names) for
/// messages and for `volatile.merged_from`.
///
/// Refuses shards of different sweeps (any config difference), a shard
/// given twice, a missing shard, or a prompt in the wrong shard.
pub fn merge(shards: Vec<(String, Sweep)>) -> Result<Sweep, SweepError> {
    let bad = |m: String| Err(SweepError::Merge(m));
    let Some((first_label, first)) = shards.first() else {
        return bad("nothing to merge".into());
    };
    let count = match first.shard {
        Some(s) => s.count,
        None => {
            return bad(format!(
                "{first_label} is not a shard (it ran the whole corpus)"
            ))
        }
    };
    // Keyed by the shards given, never sized by the count a file states.
    let mut seen: BTreeMap<usize, &str> = BTreeMap::new();
    for (label, s) in &shards {
        let Some(shard) = s.shard else {
            return bad(format!("{label} is not a shard (it ran the whole corpus)"));
        };
        // A hand-edited file could claim any numbers: shards run 1..=N.
        if shard.count == 0 || shard.index == 0 || shard.index > shard.count {
            return bad(format!(
                "{label} claims shard {}/{}: a shard is I/N with 1 <= I <= N",
                shard.index, shard.count
            ));
        }
        if shard.count != count {
            return bad(format!(
                "{label} is shard {shard}, {first_label} one of {count}: they split the corpus differently"
            ));
        }
        if s.interrupted {
            return bad(format!(
                "{label} was interrupted (it holds {} prompts of its shard): run shard {shard} again",
                s.prompts.len()
            ));
        }
        if s.config != first.config {
            return bad(format!(
                "{label} and {first_label} are shards of different sweeps: {}",
                config_difference(&first.config, &s.config)
            ));
        }
        if let Some(other) = seen.insert(shard.index, label) {
            return bad(format!("shard {shard} is given twice: {other} and {label}"));
        }
        if let Some(p) = s.prompts.iter().find(|p| !shard.contains(p.index)) {
            return bad(format!(
                "{label} (shard {shard}) holds prompt {}, which belongs to another shard",
                p.index
            ));
        }
    }
    if seen.len() < count {
        let shown: Vec<String> = (1..=count)
            .filter(|i| !seen.contains_key(i))
            .take(8)
            .map(|i| format!("{i}/{count}"))
            .collect();
        let more = count - seen.len() - shown.len();
        return bad(format!(
            "{first_label} is one of {count} shards: missing shard(s) {}{}",
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    let mut prompts: Vec<PromptResult> = shards
        .iter()
        .flat_map(|(_, s)| s.prompts.iter().cloned())
        .collect();
    prompts.sort_by_key(|p| p.index);
    let expected = first.config.corpus_prompts;
    if let Some(problem) = incomplete(&prompts, expected) {
        return bad(format!("{problem}: a shard file is incomplete or edited"));
    }
    let mut builds: Vec<SweepBuild> = Vec::new();
    let mut volatile = SweepVolatile {
        timestamp_unix: now_unix(),
        ..SweepVolatile::default()
    };
    for (label, s) in &shards {
        for b in &s.builds {
            if !builds.contains(b) {
                builds.push(b.clone());
            }
        }
        volatile.total_s += s.volatile.total_s;
        volatile.prompts.extend(s.volatile.prompts.iter().cloned());
        volatile.harness_peak_rss_bytes = volatile
            .harness_peak_rss_bytes
            .max(s.volatile.harness_peak_rss_bytes);
        volatile.reference_peak_rss_bytes = volatile
            .reference_peak_rss_bytes
            .max(s.volatile.reference_peak_rss_bytes);
        volatile.merged_from.push(label.clone());
    }
    volatile.prompts.sort_by_key(|t| t.index);
    Ok(Sweep {
        format: FORMAT.into(),
        schema_version: SCHEMA_VERSION,
        tool: first.tool.clone(),
        config: first.config.clone(),
        builds,
        shard: None,
        summary: SweepSummary::of(&prompts),
        prompts,
        interrupted: false,
        volatile,
    })
}

/// What is wrong with merged prompts (sorted by index) that should be
/// exactly prompts `0..expected`, in words: the first repeated, extra and
/// missing prompt.
fn incomplete(prompts: &[PromptResult], expected: usize) -> Option<String> {
    let repeated = prompts
        .windows(2)
        .find(|w| w[0].index == w[1].index)
        .map(|w| format!("prompt {} appears twice", w[0].index));
    let extra = prompts
        .iter()
        .find(|p| p.index >= expected)
        .map(|p| format!("prompt {} is past the corpus's {expected} prompts", p.index));
    let missing = (0..expected)
        .find(|i| prompts.binary_search_by_key(i, |p| p.index).is_err())
        .map(|i| format!("prompt {i} is missing (no shard holds it)"));
    let problems: Vec<String> = [repeated, extra, missing].into_iter().flatten().collect();
    (!problems.is_empty()).then(|| problems.join(", "))
}

/// The first config field two shards disagree on, in words.
fn config_difference(a: &SweepConfig, b: &SweepConfig) -> String {
    let (va, vb) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    if let (Some(oa), Some(ob)) = (va.as_object(), vb.as_object()) {
        for (k, x) in oa {
            let y = ob.get(k).unwrap_or(&serde_json::Value::Null);
            if x != y {
                let short = |v: &serde_json::Value| {
                    let s = v.to_string();
                    if s.len() > 80 {
                        format!("{}…", s.chars().take(80).collect::<String>())
                    } else {
                        s
                    }
                };
                return format!("{k} is {} in one, {} in the other", short(x), short(y));
            }
        }
    }
    "their configs differ".into()
}
