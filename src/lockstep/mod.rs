//! Runs the reference and a candidate in lockstep and finds the first
//! divergence.
//!
//! A run is a token check, then steps: step 0 prefills the prompt, steps
//! 1..=N decode one greedy token each. Both engines get the same token ids:
//! when their greedy choices differ, that is recorded and the reference's
//! token is fed to both so the run stays comparable. In each step the
//! reference decodes first (in its worker process; its nodes are mapped to
//! canonical stages), then the candidate runs into a
//! [`StageJudge`] that judges every stage as it is produced and hands the
//! reference's tensor back (resync), so each stage is judged on its own
//! error: its *local* error.
//!
//! In `free` mode a second instance of the candidate feeds itself (no
//! resync), and its *propagated* error is recorded next to the local one at
//! every stage: one run shows both where an error is born and how it grows.
//! The first divergence is always the first stage whose local error fails.
//!
//! At the first failing stage the f64 oracle ([`crate::oracle`], which reads
//! the model from the file itself) recomputes that stage from the
//! reference's inputs, and blame goes to the side measurably off it.
//!
//! Coverage is checked at every step: the stages the arch implies, the ones
//! each side produced, and every reference graph node that maps to nothing.
//! A clean verdict is only given when everything expected was judged;
//! otherwise the verdict is `incomplete`.

pub mod offline;
mod outcome;

pub use outcome::*;

use crate::candidate::{Candidate, CandidateError, CandidateLoader, LoadOptions};
use crate::compare::judge::{Judged, StageFailure, StageJudge};
use crate::compare::{self, metrics, Blame, BlameReport, Policy};
use crate::engine::tokenizer::chat::ChatMessage;
use crate::gguf::GgufFile;
use crate::model::KvType;
use crate::oracle::{Oracle, OracleInputs};
use crate::reference::worker::Worker;
use crate::reference::{CaptureFilter, ContextOptions, FfnAct, GraphNode, RefError};
use crate::trace::reference_map::{capture_base_names, classify_graph, map_nodes};
use crate::trace::{Stage, StageKey, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Instant;

/// How the candidate is fed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each engine feeds itself (and a resynced twin measures local error).
    Free,
    /// Before each stage the candidate takes the reference's input.
    Resync,
}

/// What the user gave as the prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Text, tokenized by each side's own tokenizer.
    Text(String),
    /// Token ids, fed to both sides as they are.
    Tokens(Vec<u32>),
}

/// Faults injected outside the engine (the tokenizer path).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenFault {
    /// The candidate adds BOS although the tokenizer already did.
    DuplicateBos,
}

/// Everything a lockstep run needs besides the candidate.
#[derive(Clone)]
pub struct RunConfig {
    /// The GGUF both engines run.
    pub model: PathBuf,
    /// The prompt.
    pub prompt: Prompt,
    /// Greedy decode steps after the prefill.
    pub steps: usize,
    /// Resync or free.
    pub mode: Mode,
    /// Threads for each engine.
    pub threads: usize,
    /// KV cache type of both engines.
    pub kv_type: KvType,
    /// The tolerance policy.
    pub policy: Policy,
    /// Record every divergence instead of stopping at the first.
    pub keep_going: bool,
    /// Tokenizer-path faults (the bug zoo).
    pub token_faults: Vec<TokenFault>,
    /// The reference's FFN activation for arch `bitnet-b1.58` (SiLU
    /// reproduces upstream's current bug); other arches refuse SiLU here.
    pub reference_ffn_act: FfnAct,
    /// Our own binary, started as the reference worker.
    pub worker_exe: PathBuf,
    /// Called after each step with (step, total steps).
    pub progress: Option<Arc<dyn Fn(usize, usize) + Send + Sync>>,
    /// Set (by a Ctrl-C handler) to stop after the current step; the outcome
    /// then says `interrupted` and covers the steps that finished.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Format the text prompt as one user message with each side's chat
    /// template (bitnet.cpp's `llama_chat_apply_template`, the candidate's
    /// own) before tokenizing it.
    pub chat: bool,
    /// Test hook: rename reference graph nodes (old base name, new base
    /// name) before mapping, as a future bitnet.cpp might.
    #[doc(hidden)]
    pub rename_reference_nodes: Vec<(String, String)>,
}

/// Why a run could not happen at all (bad input); engine failures are
/// outcomes, not errors.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The request itself is wrong (prompt, tokens, steps).
    #[error("{0}")]
    Input(String),
    /// The model file is not valid GGUF.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    /// A policy file is not valid.
    #[error(transparent)]
    Policy(#[from] crate::compare::policy::PolicyError),
    /// The model is not one bitnet.cpp's loader accepts.
    #[error(transparent)]
    Model(#[from] crate::engine::EngineError),
    /// A file could not be read or written.
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
            token_faults: vec![],
            reference_ffn_act: FfnAct::default(),
            worker_exe,
            progress: None,
            cancel: None,
            chat: false,
            rename_reference_nodes: vec![],
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

/// Bytes a chat template may add around a prompt (role headers, a default
/// system prompt): only sizes the KV caches.
const CHAT_TEMPLATE_ALLOWANCE: usize = 1024;

/// How many worst elements a divergence lists.
const WORST_K: usize = 8;

/// Runs the whole comparison of the candidate that `loader` makes against
/// bitnet.cpp. Engine failures are part of the outcome (verdicts
/// `reference_failed`, `candidate_failed`), not errors: the receipt must
/// still be written.
pub fn run(cfg: &RunConfig, loader: &dyn CandidateLoader) -> Result<Outcome, RunError> {
    let t_total = Instant::now();
    let file = Arc::new(GgufFile::open(&cfg.model)?);
    if cfg.reference_ffn_act == FfnAct::Silu {
        let arch = file.get_str("general.architecture").unwrap_or("(none)");
        if arch != "bitnet-b1.58" {
            return Err(RunError::Input(format!(
                "--reference-ffn-act silu applies to arch bitnet-b1.58 only: arch {arch} is SiLU by design"
            )));
        }
    }
    crate::engine::validate(&file)?;
    let oracle = Oracle::new(&file, cfg.kv_type == KvType::F16);
    let facts = oracle.as_ref().ok().map(|o| o.facts().clone());
    let model_ctx = facts
        .as_ref()
        .map_or(4096, |f| f.n_ctx_train)
        .clamp(1, 4096);
    // Both KV caches are sized for what this run can need, not the model's
    // whole context (4096 positions of a 2B-4T cache are 315 MB per side):
    // a text prompt is at most one token per byte, plus the space prefix,
    // BOS and an injected duplicate BOS.
    let prompt_bound = match &cfg.prompt {
        // A chat template adds its role headers: a generous allowance.
        Prompt::Text(text) if cfg.chat => text.len() + 3 + CHAT_TEMPLATE_ALLOWANCE,
        Prompt::Text(text) => text.len() + 3,
        Prompt::Tokens(ids) => ids.len(),
    };
    let n_ctx = (prompt_bound + cfg.steps + 1).min(model_ctx);
    // The scan for NaN/Inf weights reads every F16/F32 tensor (656 MB on the
    // 2B-4T): beside the run, not before it.
    let scan = {
        let file = file.clone();
        std::thread::spawn(move || non_finite_weights(&file))
    };
    let mut run = Run {
        weight_scan: Some(scan),
        outcome: Outcome {
            file_facts: facts.clone(),
            model_file_size: file.file_size(),
            recipe: crate::synth::recipe_of(&file),
            ..Outcome::starting(TokenCheck {
                // A text prompt has no ids until both sides tokenized it.
                source: match &cfg.prompt {
                    Prompt::Text(_) => TokenSource::NotTokenized,
                    Prompt::Tokens(_) => TokenSource::IdsGiven,
                },
                ..TokenCheck::ids_given(vec![])
            })
        },
        t_total,
    };
    if let Err(e) = &oracle {
        run.outcome
            .coverage
            .notes
            .push(format!("{e}: blame will be undetermined"));
    }

    // The candidate (twice in free mode: the twin measures local error).
    let opts = LoadOptions {
        model: cfg.model.clone(),
        threads: cfg.threads,
        kv_type: cfg.kv_type,
        n_ctx,
        file: Some(file.clone()),
    };
    let t = Instant::now();
    let copies = if cfg.mode == Mode::Free { 2 } else { 1 };
    let mut candidates: Vec<Box<dyn Candidate>> = Vec::with_capacity(copies);
    for _ in 0..copies {
        match guarded(|| loader.load(&opts)) {
            Ok(c) => candidates.push(c),
            Err(f) => return Ok(run.candidate_failed("load", f, None, None)),
        }
    }
    run.outcome.timings.candidate_load_s = t.elapsed().as_secs_f64();
    let mut free_twin = if copies == 2 { candidates.pop() } else { None };
    let mut local = candidates.pop().expect("one candidate loaded");
    run.outcome.candidate = CandidateInfo {
        name: local.name(),
        build: local.build(),
        kv_semantics: Some(local.kv_semantics()),
    };
    let cand_config = local.config().clone();
    if let Some(f) = &facts {
        run.outcome.config_check = config_mismatches(&cand_config, f);
    }
    run.outcome.model = Some(cand_config);

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
        Err(e) => return Ok(run.reference_failed(e)),
    };
    run.outcome.timings.reference_load_s = t.elapsed().as_secs_f64();
    run.outcome.reference_description = reference.description.clone();

    // The token check: each side makes its own ids from the text (and, with
    // --chat, its own chat prompt first), as llama-cli does: BOS as the
    // vocabulary asks, special tokens in the text recognised.
    let bos = bos_id(&file);
    let n_vocab_file = facts.as_ref().map(|f| f.n_vocab);
    let (ref_tokens, cand_tokens) = match &cfg.prompt {
        Prompt::Text(text) => {
            let (ref_text, cand_text) = if cfg.chat {
                let messages = [ChatMessage::user(text)];
                let r = match reference.apply_chat_template(None, &messages, true) {
                    Ok(r) => r,
                    Err(e) => return Ok(run.reference_failed(e)),
                };
                let c = match guarded(|| Ok(local.chat_prompt(&messages))) {
                    Ok(Some(Ok(c))) => Some(c),
                    // The reference formatted it: the candidate's failure, with a receipt.
                    Ok(Some(Err(e))) => {
                        return Ok(run.candidate_failed(
                            "chat_prompt",
                            Failed::Error(e),
                            None,
                            None,
                        ))
                    }
                    Ok(None) => None,
                    Err(f) => return Ok(run.candidate_failed("chat_prompt", f, None, None)),
                };
                run.outcome.tokens.chat = Some(ChatPrompts {
                    reference: r.clone(),
                    candidate: c.clone(),
                });
                (r, c)
            } else {
                (text.clone(), Some(text.clone()))
            };
            let r = match reference.tokenize(&ref_text, true, true) {
                Ok(r) => r,
                Err(e) => return Ok(run.reference_failed(e)),
            };
            run.outcome.tokens.reference_tokenizer = Some(format!(
                "bitnet.cpp llama_tokenize (add_special, parse_special){}",
                if cfg.chat {
                    " of llama_chat_apply_template's prompt"
                } else {
                    ""
                }
            ));
            let own = match &cand_text {
                Some(t) => match guarded(|| Ok(local.tokenize(t, true, true))) {
                    Ok(own) => own,
                    Err(f) => return Ok(run.candidate_failed("tokenize", f, None, None)),
                },
                None => None,
            };
            let mut c = match own {
                Some(c) => {
                    run.outcome.tokens.source = TokenSource::EachSideTokenized;
                    run.outcome.tokens.candidate_tokenizer = local.tokenizer_description();
                    c
                }
                None => {
                    run.outcome.tokens.source = TokenSource::CandidateHasNoTokenizer;
                    run.outcome.coverage.notes.push(if cand_text.is_none() {
                        "tokens not compared: the candidate has no chat formatting, so it was fed the reference's ids".into()
                    } else {
                        "tokens not compared: the candidate has no tokenizer for this vocabulary, so it was fed the reference's ids".into()
                    });
                    r.clone()
                }
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
    if let (Some(n_vocab), Some(bad)) = (
        n_vocab_file,
        ref_tokens
            .iter()
            .find(|&&t| Some(t as usize) >= n_vocab_file),
    ) {
        return Err(RunError::Input(format!(
            "token id {bad} is outside the vocabulary of {n_vocab}"
        )));
    }
    run.check_tokens(ref_tokens.clone(), cand_tokens.clone(), bos, &mut reference);

    let n_vocab = n_vocab_file.unwrap_or(reference.n_vocab);
    let mut kv_history: Vec<(Vec<f32>, Vec<f32>)> =
        vec![(Vec::new(), Vec::new()); facts.as_ref().map_or(0, |f| f.n_layer)];
    let expected = facts
        .as_ref()
        .map(|f| f.expected_stages())
        .unwrap_or_default();
    let mut batch = ref_tokens.clone();
    // The candidate prefills its own token ids: if they differ from the
    // reference's, the embedding stage shows it (a shape or value mismatch).
    let mut cand_batch = cand_tokens.clone();
    let (mut ref_pos, mut cand_pos) = (0usize, 0usize);
    let total_steps = cfg.steps + 1;
    let free = cfg.mode == Mode::Free;
    for step in 0..total_steps {
        if cfg
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
        {
            run.outcome.interrupted = true;
            break;
        }
        let t = Instant::now();
        let decoded = match reference.decode(&batch, ref_pos) {
            Ok(v) => v,
            Err(e) => return Ok(run.reference_failed(e)),
        };
        run.outcome.timings.reference_s += t.elapsed().as_secs_f64();
        let (ref_logits, mut nodes, mut graph) = decoded;
        rename_nodes(&cfg.rename_reference_nodes, &mut nodes, &mut graph);
        for u in classify_graph(&graph).unknown {
            if !run.outcome.coverage.unmapped_reference_nodes.contains(&u) {
                run.outcome.coverage.unmapped_reference_nodes.push(u);
            }
        }
        let mapped = map_nodes(nodes, ref_pos);
        let ref_stages: BTreeMap<StageKey, Tensor> = mapped.stages.into_iter().collect();

        // The candidate, resynced: local error.
        let t = Instant::now();
        let mut judge = StageJudge::new(&cfg.policy, &ref_stages, n_vocab)
            .resync(true)
            .keep_going(cfg.keep_going);
        let local_logits = match guarded(|| local.forward(&cand_batch, cand_pos, &mut judge)) {
            Ok(l) => l,
            Err(f) => {
                let last = judge.last_stage();
                return Ok(run.candidate_failed("forward", f, Some(step), last));
            }
        };
        let mut compare_s = judge.compare_s;
        let local_judged = std::mem::take(&mut judge.judged);
        let failures = std::mem::take(&mut judge.failures);
        let emitted = std::mem::take(&mut judge.emitted);
        drop(judge);

        // Free mode: the twin on its own inputs: propagated error.
        let mut propagated: Vec<Judged> = Vec::new();
        let own_logits = match free_twin.as_mut() {
            Some(twin) => {
                let mut judge = StageJudge::new(&cfg.policy, &ref_stages, n_vocab)
                    .free_rules(true)
                    .keep_going(true);
                let logits = match guarded(|| twin.forward(&cand_batch, cand_pos, &mut judge)) {
                    Ok(l) => l,
                    Err(f) => {
                        let last = judge.last_stage();
                        return Ok(run.candidate_failed("forward", f, Some(step), last));
                    }
                };
                compare_s += judge.compare_s;
                propagated = std::mem::take(&mut judge.judged);
                Some(logits)
            }
            None => None,
        };
        run.outcome.timings.candidate_s += t.elapsed().as_secs_f64() - compare_s;
        run.outcome.timings.compare_s += compare_s;

        let coverage = step_coverage(
            step,
            &expected,
            &ref_stages,
            &emitted,
            &local_judged,
            !failures.is_empty() && !cfg.keep_going,
        );
        run.outcome.coverage.steps.push(coverage);
        run.absorb(step, ref_pos, batch.len(), &local_judged, &propagated);

        // Blame each failure with the oracle, from the reference's inputs.
        let inputs = StepInputs {
            stages: &ref_stages,
            history: &kv_history,
            tokens: &batch,
            n_past: ref_pos,
        };
        for f in failures {
            let prop = propagated
                .iter()
                .find(|j| j.key == f.key)
                .map(|j| j.metrics.clone());
            let mut div = divergence(
                &cfg.policy,
                step,
                f,
                oracle.as_ref().map_err(|e| e.to_string()),
                &inputs,
                ref_pos,
                batch.len(),
            );
            div.propagated = prop;
            run.outcome.record_divergence(step, div);
        }
        extend_kv_history(&mut kv_history, &ref_stages);
        ref_pos += batch.len();
        cand_pos += cand_batch.len();
        run.outcome.steps_run = step + 1;
        if let Some(p) = &cfg.progress {
            p(step + 1, total_steps);
        }

        // Greedy next tokens from the last position of each side (the
        // candidate's own logits in free mode).
        let cand_logits = if free {
            own_logits.unwrap_or(local_logits)
        } else {
            local_logits
        };
        run.compare_position_logits(
            step,
            ref_pos - batch.len(),
            &ref_logits,
            &cand_logits,
            n_vocab,
        );
        let last = |l: &[f32]| metrics::argmax(&l[l.len().saturating_sub(n_vocab)..]) as u32;
        let (r_next, c_next) = (last(&ref_logits), last(&cand_logits));
        if step > 0 || cfg.steps > 0 {
            run.outcome.generated_reference.push(r_next);
            run.outcome.generated_candidate.push(c_next);
        }
        if r_next != c_next {
            run.outcome.token_disagreements.push(TokenDisagreement {
                step,
                reference: r_next,
                candidate: c_next,
            });
        }
        let stop = run.outcome.first_divergence.is_some() && !cfg.keep_going;
        if stop || step + 1 == total_steps {
            break;
        }
        batch = vec![r_next];
        cand_batch = vec![r_next];
    }
    run.outcome.timings.reference_peak_rss_bytes = reference.peak_rss_bytes();
    Ok(run.finish())
}

/// Appends a step's reference keys (after RoPE) and values to the history
/// the oracle attends over, layer by layer.
pub(crate) fn extend_kv_history(
    history: &mut [(Vec<f32>, Vec<f32>)],
    ref_stages: &BTreeMap<StageKey, Tensor>,
) {
    for (l, (k, v)) in history.iter_mut().enumerate() {
        if let Some(t) = ref_stages.get(&StageKey::new(Some(l), Stage::KRope)) {
            k.extend_from_slice(&t.data);
        }
        if let Some(t) = ref_stages.get(&StageKey::new(Some(l), Stage::VProj)) {
            v.extend_from_slice(&t.data);
        }
    }
}

/// The outcome under construction.
struct Run {
    outcome: Outcome,
    t_total: Instant,
    /// The NaN/Inf weight scan running beside the run.
    weight_scan: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Run {
    fn reference_failed(mut self, e: RefError) -> Outcome {
        self.outcome.reference_failure = Some(e.to_string());
        let mut o = self.finish();
        o.verdict = Verdict::ReferenceFailed;
        o
    }

    fn candidate_failed(
        mut self,
        during: &str,
        f: Failed,
        step: Option<usize>,
        last_stage: Option<StageKey>,
    ) -> Outcome {
        let (kind, message) = match f {
            Failed::Error(e) => (
                if during == "load" { "load" } else { "error" },
                format!("{during}: {e}"),
            ),
            Failed::Panic(msg) => ("panic", format!("{during} panicked: {msg}")),
        };
        self.outcome.candidate_failure = Some(CandidateFailure {
            kind: kind.into(),
            message,
            step,
            last_stage,
        });
        let mut o = self.finish();
        o.verdict = Verdict::CandidateFailed;
        o
    }

    /// The token check: ids of both sides, BOS duplicates, the first
    /// difference in words.
    fn check_tokens(
        &mut self,
        reference: Vec<u32>,
        candidate: Vec<u32>,
        bos: Option<u32>,
        worker: &mut Worker,
    ) {
        let dup = |ids: &[u32]| -> Vec<usize> {
            ids.windows(2)
                .enumerate()
                .filter(|(_, w)| Some(w[0]) == bos && w[1] == w[0])
                .map(|(i, _)| i + 1)
                .collect()
        };
        let t = &mut self.outcome.tokens;
        t.equal = reference == candidate;
        t.duplicate_bos_reference = dup(&reference);
        t.duplicate_bos_candidate = dup(&candidate);
        if !t.equal {
            let mut pieces = |ids: &[u32]| -> Vec<Option<String>> {
                worker
                    .pieces(ids)
                    .map(|p| {
                        p.into_iter()
                            .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let (ref_pieces, cand_pieces) = (pieces(&reference), pieces(&candidate));
            let show = |side: &str, id: u32| {
                let (ids, ps) = if side == "reference" {
                    (&reference, &ref_pieces)
                } else {
                    (&candidate, &cand_pieces)
                };
                ids.iter()
                    .position(|&i| i == id)
                    .and_then(|i| ps.get(i).cloned().flatten())
                    .unwrap_or_default()
            };
            if let Some(d) = crate::compare::tokens::first_difference(
                ("reference", &reference),
                &[("candidate", &candidate)],
                bos,
                &show,
            ) {
                let at = d.position;
                t.first_difference = Some(TokenDifference {
                    position: at,
                    reference: reference.get(at).copied(),
                    candidate: candidate.get(at).copied(),
                    reference_piece: reference.get(at).map(|&id| show("reference", id)),
                    candidate_piece: candidate.get(at).map(|&id| show("candidate", id)),
                    description: d.explanation,
                });
            }
        }
        t.reference = reference;
        t.candidate = candidate;
    }

    /// Compares the two sides' logits position by position (the sweep's
    /// KL statistics). Skipped for a step whose two sides have different
    /// row counts (the prompts' ids differ): no row pairs with another.
    fn compare_position_logits(
        &mut self,
        step: usize,
        pos0: usize,
        reference: &[f32],
        candidate: &[f32],
        n_vocab: usize,
    ) {
        if n_vocab == 0 || reference.len() != candidate.len() {
            return;
        }
        for (row, (r, c)) in reference
            .chunks_exact(n_vocab)
            .zip(candidate.chunks_exact(n_vocab))
            .enumerate()
        {
            self.outcome.logit_positions.push(PositionLogits {
                step,
                position: pos0 + row,
                compared: metrics::position_kl(r, c),
            });
        }
    }

    /// Adds one step's judged stages to the summary and the step records.
    fn absorb(
        &mut self,
        step: usize,
        pos0: usize,
        n_tokens: usize,
        local: &[Judged],
        propagated: &[Judged],
    ) {
        let mut record = StepRecord {
            step,
            pos0,
            n_tokens,
            stages: Vec::with_capacity(local.len()),
        };
        for j in local {
            summary_slot(&mut self.outcome.summary, j.key, j.class).add_local(j.pass, &j.metrics);
            let prop = propagated.iter().find(|p| p.key == j.key);
            if let Some(p) = prop {
                summary_slot(&mut self.outcome.summary, j.key, j.class)
                    .add_propagated(p.pass, &p.metrics);
            }
            record.stages.push(StageResult {
                layer: j.key.layer,
                stage: j.key.stage,
                nmse: metrics::finite_or_max(j.metrics.nmse),
                max_abs: metrics::finite_or_max(j.metrics.max_abs),
                exact: j.metrics.exact,
                pass: j.pass,
                propagated_nmse: prop.map(|p| metrics::finite_or_max(p.metrics.nmse)),
                propagated_pass: prop.map(|p| p.pass),
            });
        }
        self.outcome.steps.push(record);
    }

    fn finish(mut self) -> Outcome {
        if let Some(scan) = self.weight_scan.take() {
            self.outcome.weight_warnings = scan
                .join()
                .unwrap_or_else(|_| vec!["the NaN/Inf weight scan panicked".into()]);
        }
        let o = &mut self.outcome;
        o.summary
            .sort_by_key(|s| StageKey::new(s.layer, s.stage).order());
        let c = &mut o.coverage;
        c.complete = c.unmapped_reference_nodes.is_empty()
            && c.notes.is_empty()
            && c.steps
                .iter()
                .all(|s| s.missing_reference.is_empty() && s.missing_candidate.is_empty());
        o.verdict = if o.first_divergence.is_some() || !o.tokens.equal {
            Verdict::Divergence
        } else if !c.complete {
            Verdict::Incomplete
        } else {
            Verdict::NoDivergence
        };
        o.timings.harness_peak_rss_bytes =
            crate::reference::worker::peak_rss_of("/proc/self/status");
        o.timings.total_s = self.t_total.elapsed().as_secs_f64();
        self.outcome
    }
}

/// The coverage of one step: expected stages against what each side produced.
fn step_coverage(
    step: usize,
    expected: &[StageKey],
    reference: &BTreeMap<StageKey, Tensor>,
    emitted: &[StageKey],
    judged: &[Judged],
    stopped: bool,
) -> StepCoverage {
    let emitted_set: std::collections::BTreeSet<StageKey> = emitted.iter().copied().collect();
    let judged_set: std::collections::BTreeSet<StageKey> = judged.iter().map(|j| j.key).collect();
    let both = expected
        .iter()
        .filter(|k| reference.contains_key(k) && emitted_set.contains(k))
        .count();
    StepCoverage {
        step,
        expected: expected.len(),
        judged: judged_set.len(),
        after_divergence: if stopped {
            both.saturating_sub(judged_set.len())
        } else {
            0
        },
        missing_reference: expected
            .iter()
            .filter(|k| !reference.contains_key(k))
            .copied()
            .collect(),
        missing_candidate: expected
            .iter()
            .filter(|k| !emitted_set.contains(k))
            .copied()
            .collect(),
        unexpected_candidate: emitted_set
            .iter()
            .filter(|k| !expected.contains(k))
            .copied()
            .collect(),
    }
}

/// A failure turned into a divergence: worst elements, position, blame.
fn divergence(
    policy: &Policy,
    step: usize,
    f: StageFailure,
    oracle: Result<&Oracle<'_>, String>,
    inputs: &dyn OracleInputs,
    pos0: usize,
    t: usize,
) -> Divergence {
    let rule = policy.rule(f.key.stage, false).clone();
    let recomputed = match &oracle {
        Ok(o) => o.recompute(f.key.layer, f.key.stage, inputs),
        Err(e) => Err(e.clone()),
    };
    let oracle_values = recomputed.as_ref().ok().map(|o| o.values.as_slice());
    let worst = if f.candidate_shape.is_some() {
        vec![]
    } else {
        metrics::worst_elements(&f.reference, &f.candidate, &f.shape, oracle_values, WORST_K)
    };
    // The token axis is 0 for [T, D] stages and 1 for [H, T, K] ones.
    let tok_axis = usize::from(f.key.stage.is_attention_matrix());
    let position = pos0
        + worst
            .first()
            .and_then(|w| w.index.get(tok_axis).copied())
            .unwrap_or(0);
    let blame = if f.candidate_shape.is_some() {
        BlameReport {
            blame: Blame::Undetermined,
            reference_nmse_vs_oracle: None,
            candidate_nmse_vs_oracle: None,
            reference_error_over_rounding: None,
            candidate_error_over_rounding: None,
            reason: format!(
                "the shapes differ: reference {:?}, candidate {:?}",
                f.shape,
                f.candidate_shape.as_deref().unwrap_or_default()
            ),
            cause: None,
        }
    } else {
        let mut blame = compare::blame(
            &f.reference,
            &f.candidate,
            recomputed.as_ref().map_err(|e| e.as_str()),
        );
        if let (Blame::Reference, Ok(o)) = (blame.blame, &oracle) {
            blame.cause = o.explain_reference(f.key.layer, f.key.stage, inputs, &f.reference);
        }
        blame
    };
    Divergence {
        step,
        positions: (pos0..pos0 + t).collect(),
        position,
        layer: f.key.layer,
        stage: f.key.stage,
        shape: f.shape,
        rule,
        measured: Measured::Local,
        metrics: f.metrics,
        propagated: None,
        worst,
        blame,
    }
}

/// The reference's tensors of the current step, for the oracle.
pub(crate) struct StepInputs<'a> {
    pub stages: &'a BTreeMap<StageKey, Tensor>,
    pub history: &'a [(Vec<f32>, Vec<f32>)],
    pub tokens: &'a [u32],
    pub n_past: usize,
}

impl OracleInputs for StepInputs<'_> {
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

/// `tokenizer.ggml.bos_token_id` as the file states it.
fn bos_id(file: &GgufFile) -> Option<u32> {
    file.get("tokenizer.ggml.bos_token_id")
        .and_then(|_| file.get_u32("tokenizer.ggml.bos_token_id").ok())
}

/// The first difference between two prompts' ids, in words.
fn describe_token_difference(
    reference: &[u32],
    candidate: &[u32],
    at: usize,
    bos: Option<u32>,
) -> String {
    let (r, c) = (reference.get(at), candidate.get(at));
    let is_bos = |id: Option<&u32>| id.is_some() && id.copied() == bos;
    let after_bos = |ids: &[u32]| at > 0 && ids.get(at - 1).copied() == bos;
    if is_bos(c) && !is_bos(r) && after_bos(candidate) {
        return format!("the candidate has a duplicated BOS at position {at}");
    }
    if is_bos(r) && !is_bos(c) && after_bos(reference) {
        return format!("the reference has a duplicated BOS at position {at}");
    }
    if at == 0 && is_bos(r) && !is_bos(c) {
        return "the candidate's prompt lacks the BOS the reference's starts with".into();
    }
    if at == 0 && is_bos(c) && !is_bos(r) {
        return "the candidate's prompt starts with a BOS the reference's lacks".into();
    }
    match (r, c) {
        (Some(r), Some(c)) => format!("position {at}: reference id {r}, candidate id {c}"),
        (Some(_), None) => format!(
            "the candidate's prompt ends at {at} ids; the reference's has {}",
            reference.len()
        ),
        (None, Some(_)) => format!(
            "the reference's prompt ends at {at} ids; the candidate's has {}",
            candidate.len()
        ),
        (None, None) => "the prompts are equal".into(),
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
            "the candidate's prompt has a duplicated BOS token".to_string(),
        ),
        (false, true) => (
            Blame::Reference,
            "the reference's prompt has a duplicated BOS token".to_string(),
        ),
        _ => (
            Blame::Undetermined,
            format!(
                "the tokenizers produce different ids for the prompt: {}",
                tokens
                    .first_difference
                    .as_ref()
                    .map_or("", |d| d.description.as_str())
            ),
        ),
    };
    BlameReport {
        blame,
        reference_nmse_vs_oracle: None,
        candidate_nmse_vs_oracle: None,
        reference_error_over_rounding: None,
        candidate_error_over_rounding: None,
        reason,
        cause: None,
    }
}

/// Applies the test hook's renames to the captured nodes and the graph listing.
fn rename_nodes(
    renames: &[(String, String)],
    nodes: &mut [crate::reference::Node],
    graph: &mut [GraphNode],
) {
    if renames.is_empty() {
        return;
    }
    let rename = |name: &mut String| {
        let (base, layer) = crate::reference::split_layer(name);
        if let Some((_, new)) = renames.iter().find(|(old, _)| old == base) {
            *name = match layer {
                Some(l) => format!("{new}-{l}"),
                None => new.clone(),
            };
        }
    };
    for n in nodes {
        rename(&mut n.name);
    }
    for g in graph {
        rename(&mut g.name);
    }
}

/// How a guarded candidate call failed.
enum Failed {
    Error(CandidateError),
    Panic(String),
}

/// Candidate calls in progress: while nonzero, the panic hook records
/// panics (from any thread of the candidate) instead of printing them.
static IN_CANDIDATE: AtomicUsize = AtomicUsize::new(0);
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);
static HOOK: Once = Once::new();

/// Runs a candidate call, turning an error or a panic into a [`Failed`]:
/// an engine that panics yields a receipt, not a dead process.
fn guarded<T>(call: impl FnOnce() -> Result<T, CandidateError>) -> Result<T, Failed> {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_CANDIDATE.load(Ordering::SeqCst) > 0 {
                let mut last = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
                // The first panic is the cause; later ones (a scope's
                // re-panic) only report that a thread panicked.
                last.get_or_insert_with(|| info.to_string());
            } else {
                previous(info);
            }
        }));
    });
    *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = None;
    IN_CANDIDATE.fetch_add(1, Ordering::SeqCst);
    let result = catch_unwind(AssertUnwindSafe(call));
    IN_CANDIDATE.fetch_sub(1, Ordering::SeqCst);
    match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failed::Error(e)),
        Err(payload) => {
            let recorded = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
            let message = recorded.unwrap_or_else(|| {
                payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into())
            });
            Err(Failed::Panic(message.replace('\n', " ")))
        }
    }
}
