//! Runs the reference and the candidate in lockstep and finds the first
//! divergence.
//!
//! A run is a token check, then steps: step 0 prefills the prompt, steps
//! 1..=N decode one greedy token each. Both engines get the same token ids:
//! when their greedy choices differ, that is recorded and the reference's
//! token is fed to both so the run stays comparable. In each step the
//! reference decodes first (in its worker process; its nodes are mapped to
//! canonical stages), then the candidate runs with a [`Comparator`] sink that
//! judges every stage as it is produced. In `resync` mode the sink hands the
//! reference's tensor back, so each stage is judged on its own error; in
//! `free` mode each engine feeds itself and error accumulates.
//!
//! At the first failing stage the f64 oracle recomputes that stage from the
//! reference's inputs, and the side farther from it is blamed.

use crate::compare::{self, metrics, policy, Blame, BlameReport, Metrics, Policy, WorstElement};
use crate::engine::{
    oracle, reference_bugs, Engine, EngineOptions, Fault, I2sMode, KvType, ModelConfig,
};
use crate::gguf::GgufFile;
use crate::reference::worker::Worker;
use crate::reference::{CaptureFilter, ContextOptions, FfnAct, RefError};
use crate::trace::reference_map::{capture_base_names, map_nodes};
use crate::trace::{Stage, StageKey, Tensor, TraceSink};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How the candidate is fed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each engine feeds itself: shows how error grows.
    Free,
    /// Before each stage the candidate takes the reference's input.
    Resync,
}

/// What the user gave as the prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// Faults injected outside the engine (the tokenizer path).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenFault {
    /// The candidate adds BOS although the tokenizer already did.
    DuplicateBos,
}

#[derive(Clone)]
pub struct RunConfig {
    pub model: PathBuf,
    pub prompt: Prompt,
    pub steps: usize,
    pub mode: Mode,
    pub threads: usize,
    pub kv_type: KvType,
    pub policy: Policy,
    pub keep_going: bool,
    pub faults: Vec<Fault>,
    pub token_faults: Vec<TokenFault>,
    /// The reference's FFN activation for arch `bitnet-b1.58` (SiLU
    /// reproduces upstream's current bug); other arches refuse SiLU here.
    pub reference_ffn_act: FfnAct,
    /// How the candidate accumulates I2_S products (`ReferenceWrap` mirrors
    /// the reference's kernel bugs; tests use it to show they are the cause).
    pub i2s_mode: I2sMode,
    /// Our own binary, started as the reference worker.
    pub worker_exe: PathBuf,
    /// Called after each step with (step, total steps).
    pub progress: Option<Arc<dyn Fn(usize, usize) + Send + Sync>>,
    /// Set (by a Ctrl-C handler) to stop after the current step; the outcome
    /// then says `interrupted` and covers the steps that finished.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// The token check that precedes every run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenCheck {
    pub reference: Vec<u32>,
    pub candidate: Vec<u32>,
    pub equal: bool,
    /// Positions where a BOS directly follows a BOS, per side.
    pub duplicate_bos_reference: Vec<usize>,
    pub duplicate_bos_candidate: Vec<usize>,
}

/// One (layer, stage) aggregated over the steps compared so far.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    pub layer: Option<usize>,
    pub stage: Stage,
    pub class: compare::Class,
    pub steps: usize,
    pub all_pass: bool,
    pub all_exact: bool,
    pub worst_nmse: f64,
    pub worst_max_abs: f64,
    pub worst_max_ulp: u64,
}

/// The first stage that failed its rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    pub step: usize,
    /// Positions of the step's batch (absolute), and the worst one.
    pub positions: Vec<usize>,
    pub position: usize,
    pub layer: Option<usize>,
    pub stage: Stage,
    pub shape: Vec<usize>,
    pub rule: policy::Rule,
    pub metrics: Metrics,
    pub worst: Vec<WorstElement>,
    pub blame: BlameReport,
}

/// A greedy decode choice that differed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenDisagreement {
    pub step: usize,
    pub reference: u32,
    pub candidate: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    NoDivergence,
    Divergence,
    ReferenceFailed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub verdict: Verdict,
    pub tokens: TokenCheck,
    pub first_divergence: Option<Divergence>,
    /// With `--keep-going`: every failing stage after the first.
    pub later_divergences: Vec<Divergence>,
    pub summary: Vec<StageSummary>,
    pub generated_reference: Vec<u32>,
    pub generated_candidate: Vec<u32>,
    pub token_disagreements: Vec<TokenDisagreement>,
    pub steps_run: usize,
    /// The run was stopped by the user before all steps ran.
    pub interrupted: bool,
    pub unknown_nodes: Vec<String>,
    pub reference_failure: Option<String>,
    pub reference_description: String,
    /// The model as the candidate read it, and the candidate's build.
    pub model: ModelConfig,
    pub model_file_size: u64,
    pub candidate_kernel: String,
    pub candidate_i2s_mode: String,
    /// F32/F16 tensors holding NaN or Inf: a warning, the run goes on.
    pub weight_warnings: Vec<String>,
    pub timings: Timings,
}

/// Volatile: never part of a receipt's identity.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timings {
    pub reference_load_s: f64,
    pub candidate_load_s: f64,
    pub reference_s: f64,
    pub candidate_s: f64,
    pub compare_s: f64,
    pub total_s: f64,
    /// Peak resident set (VmHWM) of this process (candidate + comparator)
    /// and of the reference's worker process.
    pub harness_peak_rss_bytes: Option<u64>,
    pub reference_peak_rss_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Policy(#[from] crate::compare::policy::PolicyError),
    #[error("{0}")]
    Io(String),
}

impl RunConfig {
    /// A run with the defaults `find` uses: 4 decode steps, resync, one
    /// thread, F16 KV cache, stop at the first divergence, no faults.
    pub fn new(model: PathBuf, prompt: Prompt, policy: Policy, worker_exe: PathBuf) -> RunConfig {
        RunConfig {
            model,
            prompt,
            steps: 4,
            mode: Mode::Resync,
            threads: 1,
            kv_type: KvType::F16,
            policy,
            keep_going: false,
            faults: vec![],
            token_faults: vec![],
            reference_ffn_act: FfnAct::default(),
            i2s_mode: I2sMode::default(),
            worker_exe,
            progress: None,
            cancel: None,
        }
    }
}

/// A warning per F32/F16 tensor that holds NaN or Inf values.
fn non_finite_weights(file: &GgufFile) -> Vec<String> {
    file.tensors()
        .iter()
        .filter_map(|t| match crate::gguf::count_non_finite(file, t) {
            Some((nan, inf)) if nan + inf > 0 => Some(format!(
                "tensor {} has {nan} NaN and {inf} Inf values",
                t.name
            )),
            _ => None,
        })
        .collect()
}

/// How many worst elements a divergence lists.
const WORST_K: usize = 8;
const TOP_K: usize = 5;

/// Runs the whole comparison. Reference failures are part of the outcome
/// (verdict `reference_failed`), not errors: the receipt must still be written.
pub fn run(cfg: &RunConfig) -> Result<Outcome, RunError> {
    let t_total = Instant::now();
    let mut timings = Timings::default();
    let file = Arc::new(GgufFile::open(&cfg.model)?);
    let model_config = ModelConfig::from_gguf(&file)?;
    if cfg.reference_ffn_act == FfnAct::Silu && !model_config.arch.ffn_relu2() {
        return Err(RunError::Input(format!(
            "--reference-ffn-act silu applies to arch bitnet-b1.58 only: arch {} is SiLU by design",
            model_config.arch.name()
        )));
    }
    let model_ctx = model_config.n_ctx_train.clamp(1, 4096);
    // Both KV caches are sized for what this run can need, not the model's
    // whole context (4096 positions of a 2B-4T cache are 315 MB per side):
    // a text prompt is at most one token per byte, plus the space prefix,
    // BOS and an injected duplicate BOS.
    let prompt_bound = match &cfg.prompt {
        Prompt::Text(text) => text.len() + 3,
        Prompt::Tokens(ids) => ids.len(),
    };
    let n_ctx = (prompt_bound + cfg.steps + 1).min(model_ctx);
    let t = Instant::now();
    let opts = EngineOptions {
        threads: cfg.threads,
        kv_type: cfg.kv_type,
        faults: cfg.faults.clone(),
        n_ctx,
        i2s_mode: cfg.i2s_mode,
    };
    let mut engine = Engine::from_gguf(file.clone(), opts)?;
    timings.candidate_load_s = t.elapsed().as_secs_f64();
    let tokenizer = crate::engine::tokenizer::Tokenizer::from_gguf(&file).ok();

    let mut outcome = Outcome {
        verdict: Verdict::NoDivergence,
        tokens: TokenCheck {
            reference: vec![],
            candidate: vec![],
            equal: true,
            duplicate_bos_reference: vec![],
            duplicate_bos_candidate: vec![],
        },
        first_divergence: None,
        later_divergences: vec![],
        summary: vec![],
        generated_reference: vec![],
        generated_candidate: vec![],
        token_disagreements: vec![],
        steps_run: 0,
        interrupted: false,
        unknown_nodes: vec![],
        reference_failure: None,
        reference_description: String::new(),
        model: engine.config().clone(),
        model_file_size: file.file_size(),
        candidate_kernel: engine.kernel_name().to_string(),
        candidate_i2s_mode: format!("{:?}", engine.options().i2s_mode),
        weight_warnings: non_finite_weights(&file),
        timings: Timings::default(),
    };

    let t = Instant::now();
    let ctx = ContextOptions {
        threads: cfg.threads,
        kv_type: cfg.kv_type,
        n_ctx,
        n_batch: n_ctx,
    };
    let filter = CaptureFilter {
        off: false,
        layers: None,
        name_patterns: vec![],
        base_names: capture_base_names(),
    };
    let started = Worker::start_with(
        &cfg.worker_exe,
        &cfg.model,
        &ctx,
        filter,
        cfg.reference_ffn_act,
    );
    let mut reference = match started {
        Ok(w) => w,
        Err(e) => return Ok(reference_failed(outcome, e, timings, t_total)),
    };
    timings.reference_load_s = t.elapsed().as_secs_f64();
    outcome.reference_description = reference.description.clone();

    // The token check.
    let bos = tokenizer.as_ref().and_then(|t| t.bos());
    let (ref_tokens, cand_tokens) = match &cfg.prompt {
        Prompt::Text(text) => {
            let r = match reference.tokenize(text, true) {
                Ok(r) => r,
                Err(e) => return Ok(reference_failed(outcome, e, timings, t_total)),
            };
            let mut c = match &tokenizer {
                Some(tk) => tk.encode(text, true),
                None => r.clone(),
            };
            if cfg.token_faults.contains(&TokenFault::DuplicateBos) {
                if let Some(b) = bos {
                    c.insert(0, b);
                }
            }
            (r, c)
        }
        Prompt::Tokens(ids) => (ids.clone(), ids.clone()),
    };
    if ref_tokens.is_empty() {
        return Err(RunError::Input("the prompt tokenizes to nothing".into()));
    }
    if ref_tokens.len() + cfg.steps > model_ctx {
        return Err(RunError::Input(format!(
            "prompt ({} tokens) plus --steps {} exceeds the context of {model_ctx} positions",
            ref_tokens.len(),
            cfg.steps
        )));
    }
    if ref_tokens.len().max(cand_tokens.len()) + cfg.steps > n_ctx {
        return Err(RunError::Input(format!(
            "the prompt tokenized to {} ids, more than its {} bytes allow for",
            ref_tokens.len().max(cand_tokens.len()),
            prompt_bound
        )));
    }
    if let Some(bad) = ref_tokens
        .iter()
        .find(|&&t| t as usize >= engine.config().n_vocab)
    {
        return Err(RunError::Input(format!(
            "token id {bad} is outside the vocabulary of {}",
            engine.config().n_vocab
        )));
    }
    let dup = |ids: &[u32]| -> Vec<usize> {
        ids.windows(2)
            .enumerate()
            .filter(|(_, w)| Some(w[0]) == bos && w[1] == w[0])
            .map(|(i, _)| i + 1)
            .collect()
    };
    outcome.tokens = TokenCheck {
        equal: ref_tokens == cand_tokens,
        duplicate_bos_reference: dup(&ref_tokens),
        duplicate_bos_candidate: dup(&cand_tokens),
        reference: ref_tokens.clone(),
        candidate: cand_tokens.clone(),
    };
    let mut state = RunState::new(cfg, &engine);
    let mut batch = ref_tokens.clone();
    // The candidate prefills its own token ids: if they differ from the
    // reference's, the embedding stage shows it (a shape or value mismatch).
    let mut cand_batch = cand_tokens.clone();
    let total_steps = cfg.steps + 1;
    for step in 0..total_steps {
        if cfg
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
        {
            outcome.interrupted = true;
            break;
        }
        let t = Instant::now();
        let (ref_logits, nodes) = match reference.decode(&batch, state.ref_pos) {
            Ok(v) => v,
            Err(e) => return Ok(reference_failed(state.finish(outcome), e, timings, t_total)),
        };
        timings.reference_s += t.elapsed().as_secs_f64();
        let mapped = map_nodes(nodes, state.ref_pos);
        for u in mapped.unknown {
            if !outcome.unknown_nodes.contains(&u) {
                outcome.unknown_nodes.push(u);
            }
        }
        let ref_stages: BTreeMap<StageKey, Tensor> = mapped.stages.into_iter().collect();

        let t = Instant::now();
        let mut sink = Comparator::new(&state, &ref_stages);
        let cand_logits = engine.forward(&cand_batch, &mut sink)?;
        timings.candidate_s += t.elapsed().as_secs_f64() - sink.compare_s;
        timings.compare_s += sink.compare_s;
        let failures = std::mem::take(&mut sink.failures);
        let judged = std::mem::take(&mut sink.judged);
        drop(sink);
        state.absorb(judged);

        // Blame each failure with the oracle, from the reference's inputs.
        let inputs = StepInputs {
            stages: &ref_stages,
            history: &state.kv_history,
            tokens: &batch,
            n_past: state.ref_pos,
        };
        for f in failures {
            let oracle_values = oracle::recompute(&engine, f.key.layer, f.key.stage, &inputs);
            let mut div = state.divergence(
                step,
                &f,
                oracle_values.as_deref(),
                state.ref_pos,
                batch.len(),
            );
            if step == 0 && !outcome.tokens.equal && div.stage == Stage::TokEmbd {
                div.blame = token_blame(&outcome.tokens);
            }
            if div.blame.blame == Blame::Reference {
                div.blame.cause = reference_bugs::explain(
                    &engine,
                    f.key.layer,
                    f.key.stage,
                    &inputs,
                    &f.reference,
                );
            }
            if outcome.first_divergence.is_none() {
                outcome.first_divergence = Some(div);
            } else {
                outcome.later_divergences.push(div);
            }
        }
        state.append_history(&ref_stages, engine.config().n_layer);
        state.ref_pos += batch.len();
        outcome.steps_run = step + 1;
        if let Some(p) = &cfg.progress {
            p(step + 1, total_steps);
        }

        // Greedy next tokens from the last position of each side.
        let v = engine.config().n_vocab;
        let last = |l: &[f32]| metrics::argmax(&l[l.len().saturating_sub(v)..]) as u32;
        let (r_next, c_next) = (last(&ref_logits), last(&cand_logits));
        if step > 0 || cfg.steps > 0 {
            outcome.generated_reference.push(r_next);
            outcome.generated_candidate.push(c_next);
        }
        if r_next != c_next {
            outcome.token_disagreements.push(TokenDisagreement {
                step,
                reference: r_next,
                candidate: c_next,
            });
        }
        let stop = outcome.first_divergence.is_some() && !cfg.keep_going;
        if stop || step + 1 == total_steps {
            break;
        }
        batch = vec![r_next];
        cand_batch = vec![r_next];
    }
    let mut outcome = state.finish(outcome);
    if !outcome.tokens.equal && outcome.first_divergence.is_none() {
        outcome.verdict = Verdict::Divergence;
    }
    timings.reference_peak_rss_bytes = reference.peak_rss_bytes();
    timings.harness_peak_rss_bytes = crate::reference::worker::peak_rss_of("/proc/self/status");
    timings.total_s = t_total.elapsed().as_secs_f64();
    outcome.timings = timings;
    Ok(outcome)
}

fn reference_failed(
    mut outcome: Outcome,
    e: RefError,
    mut timings: Timings,
    t0: Instant,
) -> Outcome {
    outcome.verdict = Verdict::ReferenceFailed;
    outcome.reference_failure = Some(e.to_string());
    timings.total_s = t0.elapsed().as_secs_f64();
    outcome.timings = timings;
    outcome
}

/// What persists across steps.
struct RunState<'a> {
    cfg: &'a RunConfig,
    n_vocab: usize,
    ref_pos: usize,
    summary: Vec<StageSummary>,
    /// Per layer: the reference's k_rope and v_proj rows for every position so far.
    kv_history: Vec<(Vec<f32>, Vec<f32>)>,
}

/// A failed stage, before blame.
struct Failure {
    key: StageKey,
    shape: Vec<usize>,
    reference: Vec<f32>,
    candidate: Vec<f32>,
    metrics: Metrics,
}

impl<'a> RunState<'a> {
    fn new(cfg: &'a RunConfig, engine: &Engine) -> Self {
        RunState {
            cfg,
            n_vocab: engine.config().n_vocab,
            ref_pos: 0,
            summary: Vec::new(),
            kv_history: vec![(Vec::new(), Vec::new()); engine.config().n_layer],
        }
    }

    fn absorb(&mut self, judged: Vec<(StageKey, compare::Class, bool, Metrics)>) {
        for (key, class, pass, m) in judged {
            let slot = match self
                .summary
                .iter_mut()
                .position(|s| s.layer == key.layer && s.stage == key.stage)
            {
                Some(i) => &mut self.summary[i],
                None => {
                    self.summary.push(StageSummary {
                        layer: key.layer,
                        stage: key.stage,
                        class,
                        steps: 0,
                        all_pass: true,
                        all_exact: true,
                        worst_nmse: 0.0,
                        worst_max_abs: 0.0,
                        worst_max_ulp: 0,
                    });
                    self.summary.last_mut().expect("just pushed")
                }
            };
            slot.steps += 1;
            slot.all_pass &= pass;
            slot.all_exact &= m.exact;
            slot.worst_nmse = metrics::finite_or_max(slot.worst_nmse.max(m.nmse));
            slot.worst_max_abs = metrics::finite_or_max(slot.worst_max_abs.max(m.max_abs));
            slot.worst_max_ulp = slot.worst_max_ulp.max(m.max_ulp);
        }
    }

    fn append_history(&mut self, stages: &BTreeMap<StageKey, Tensor>, n_layer: usize) {
        for l in 0..n_layer {
            if let Some(k) = stages.get(&StageKey::new(Some(l), Stage::KRope)) {
                self.kv_history[l].0.extend_from_slice(&k.data);
            }
            if let Some(v) = stages.get(&StageKey::new(Some(l), Stage::VProj)) {
                self.kv_history[l].1.extend_from_slice(&v.data);
            }
        }
    }

    fn divergence(
        &self,
        step: usize,
        f: &Failure,
        oracle: Option<&[f64]>,
        pos0: usize,
        t: usize,
    ) -> Divergence {
        let rule = self
            .cfg
            .policy
            .rule(f.key.stage, self.cfg.mode == Mode::Free)
            .clone();
        let worst = metrics::worst_elements(&f.reference, &f.candidate, &f.shape, oracle, WORST_K);
        // The token axis is 0 for [T, D] stages and 1 for [H, T, K] ones.
        let tok_axis = if f.key.stage.is_attention_matrix() {
            1
        } else {
            0
        };
        let position = pos0
            + worst
                .first()
                .and_then(|w| w.index.get(tok_axis).copied())
                .unwrap_or(0);
        let blame = compare::blame(&f.reference, &f.candidate, oracle);
        Divergence {
            step,
            positions: (pos0..pos0 + t).collect(),
            position,
            layer: f.key.layer,
            stage: f.key.stage,
            shape: f.shape.clone(),
            rule,
            metrics: f.metrics.clone(),
            worst,
            blame,
        }
    }

    fn finish(self, mut outcome: Outcome) -> Outcome {
        outcome.summary = self.summary;
        outcome
            .summary
            .sort_by_key(|s| StageKey::new(s.layer, s.stage).order());
        if outcome.first_divergence.is_some() {
            outcome.verdict = Verdict::Divergence;
        }
        outcome
    }
}

/// The trace sink that compares the candidate with the reference, stage by
/// stage, during the candidate's forward pass.
struct Comparator<'s> {
    cfg: &'s RunConfig,
    n_vocab: usize,
    reference: &'s BTreeMap<StageKey, Tensor>,
    /// Stop judging after the first failure unless keep-going.
    stopped: bool,
    judged: Vec<(StageKey, compare::Class, bool, Metrics)>,
    failures: Vec<Failure>,
    compare_s: f64,
}

impl<'s> Comparator<'s> {
    fn new(state: &'s RunState<'s>, reference: &'s BTreeMap<StageKey, Tensor>) -> Self {
        Comparator {
            cfg: state.cfg,
            n_vocab: state.n_vocab,
            reference,
            stopped: false,
            judged: Vec::new(),
            failures: Vec::new(),
            compare_s: 0.0,
        }
    }
}

impl TraceSink for Comparator<'_> {
    fn stage(&mut self, layer: Option<usize>, stage: Stage, shape: &[usize], data: &mut [f32]) {
        if self.stopped {
            return;
        }
        let t = Instant::now();
        let key = StageKey::new(layer, stage);
        let free = self.cfg.mode == Mode::Free;
        let rule = self.cfg.policy.rule(stage, free);
        let Some(reference) = self.reference.get(&key) else {
            // The reference has no such node (e.g. the arch lacks it): nothing to judge.
            self.compare_s += t.elapsed().as_secs_f64();
            return;
        };
        let mut m = if reference.shape != shape {
            // A shape mismatch is a divergence by itself.
            let mut m = metrics::compute(&[], &[], 0.0, 0.0);
            m.exact = false;
            m.nmse = f64::MAX;
            m.n_outside = data.len().max(reference.data.len());
            m
        } else {
            metrics::compute(&reference.data, data, rule.atol, rule.rtol)
        };
        if stage == Stage::Logits && reference.shape == shape {
            m.logits = Some(metrics::logit_metrics(
                &reference.data,
                data,
                self.n_vocab,
                TOP_K,
            ));
        }
        let pass = policy::passes(rule, &m);
        if !pass {
            let same_shape = reference.shape == shape;
            self.failures.push(Failure {
                key,
                shape: reference.shape.clone(),
                reference: reference.data.clone(),
                candidate: if same_shape { data.to_vec() } else { vec![] },
                metrics: m.clone(),
            });
            if !self.cfg.keep_going {
                self.stopped = true;
            }
        }
        self.judged.push((key, rule.class, pass, m));
        if self.cfg.mode == Mode::Resync && reference.shape == shape {
            data.copy_from_slice(&reference.data);
        }
        self.compare_s += t.elapsed().as_secs_f64();
    }
}

/// The reference's tensors of the current step, for the oracle.
struct StepInputs<'a> {
    stages: &'a BTreeMap<StageKey, Tensor>,
    history: &'a [(Vec<f32>, Vec<f32>)],
    tokens: &'a [u32],
    n_past: usize,
}

impl oracle::OracleInputs for StepInputs<'_> {
    fn current(&self, layer: Option<usize>, stage: Stage) -> Option<&[f32]> {
        self.stages
            .get(&StageKey::new(layer, stage))
            .map(|t| t.data.as_slice())
    }

    fn kv_history(&self, layer: usize, stage: Stage) -> Option<Vec<f32>> {
        let (k, v) = self.history.get(layer)?;
        let (past, now) = match stage {
            Stage::KRope => (k, self.current(Some(layer), Stage::KRope)?),
            Stage::VProj => (v, self.current(Some(layer), Stage::VProj)?),
            _ => return None,
        };
        let mut all = past.clone();
        all.extend_from_slice(now);
        Some(all)
    }

    fn tokens(&self) -> &[u32] {
        self.tokens
    }

    fn n_past(&self) -> usize {
        self.n_past
    }
}

/// Blame when the two sides saw different prompt token ids: a side with a
/// duplicated BOS is wrong; otherwise the tokenizers disagree and the ids
/// alone cannot say which is right.
fn token_blame(tokens: &TokenCheck) -> BlameReport {
    let (blame, reason) = match (
        tokens.duplicate_bos_reference.is_empty(),
        tokens.duplicate_bos_candidate.is_empty(),
    ) {
        (true, false) => (
            Blame::Candidate,
            "the candidate's prompt starts with a duplicated BOS token",
        ),
        (false, true) => (
            Blame::Reference,
            "the reference's prompt starts with a duplicated BOS token",
        ),
        _ => (
            Blame::Undetermined,
            "the tokenizers produce different ids for the prompt",
        ),
    };
    BlameReport {
        blame,
        reference_nmse_vs_oracle: None,
        candidate_nmse_vs_oracle: None,
        reason: reason.into(),
        cause: None,
    }
}
