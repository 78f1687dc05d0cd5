//! Runs the reference and a candidate in lockstep and finds the first
//! divergence.
//!
//! A run is a token check, then steps: step 0 prefills the prompt, steps
//! 1..=N decode one greedy token each. Both engines get the same token ids:
//! when their greedy choices differ, that is recorded and the reference's
//! token is fed to both so the run stays comparable. In each step the
//! reference decodes first (in its worker process; its nodes are mapped to
//! canonical stages), then the candidate runs into the one judge
//! ([`StepJudge`]), which judges every stage of both sides as the candidate
//! produces it: each side against the f64 oracle recomputed from that side's
//! own inputs (its local error), and the two sides against each other.
//!
//! In `resync` mode the judge hands the reference's tensor back after each
//! stage, so the candidate's inputs are the reference's and the two sides
//! are also compared on the same inputs (their agreement). In `free` mode
//! each engine feeds itself: the local errors still place a bug where it is
//! born, and side against side is the drift, reported with its growth.
//!
//! Coverage is checked at every step: the stages the arch implies, the ones
//! each side produced, and every reference graph node that maps to nothing.
//! A clean verdict is only given when everything expected was judged;
//! otherwise the verdict is `incomplete`.
//!
//! A run reads like its phases: [`Session::open`] opens the model and loads
//! both engines; [`Session::run_prompt`] tokenizes, checks the tokens,
//! prefills, decodes step by step, and finishes the outcome. A sweep keeps
//! one session across its prompts.

pub mod offline;
mod outcome;
mod record;

pub use outcome::*;
pub(crate) use record::{Ended, Run, StepJudged};

use crate::candidate::{Candidate, CandidateError, CandidateLoader, KvSemantics, LoadOptions};
use crate::compare::judge::{Pairing, SideTrack, StepInput, StepJudge};
use crate::compare::{metrics, policy, Blame, BlameReport, Policy};
use crate::engine::tokenizer::chat::ChatMessage;
use crate::gguf::GgufFile;
use crate::model::KvType;
use crate::oracle::{FileFacts, Oracle};
use crate::reference::worker::Worker;
use crate::reference::{CaptureFilter, ContextOptions, FfnAct, GraphNode, RefError};
use crate::trace::reference_map::{capture_base_names, classify_graph, map_nodes};
use crate::trace::{Stage, StageKey, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
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
    /// The FFN activation forced on both engines and the oracle instead of
    /// the arch's own (`--ffn-act`): a 2B-4T model converted as arch
    /// `bitnet` is judged as the squared-ReLU model it is. The bitnet arches
    /// only (`llama` refuses it).
    pub ffn_act: Option<FfnAct>,
    /// The reference's FFN activation alone: `Silu` runs upstream
    /// bitnet.cpp's bug for `bitnet-b1.58` (the oracle and the candidate
    /// keep the run's squared ReLU); `Relu2`, the default, leaves the
    /// reference as the run is. SiLU is refused where the run is SiLU already.
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
            ffn_act: None,
            reference_ffn_act: FfnAct::default(),
            worker_exe,
            progress: None,
            cancel: None,
            chat: false,
            rename_reference_nodes: vec![],
        }
    }
}

/// Refuses `--ffn-act` on an arch without the reference's switch (`llama`).
pub(crate) fn ffn_act_applies(file: &GgufFile, act: Option<FfnAct>) -> Result<(), RunError> {
    let name = file.get_str("general.architecture").unwrap_or("(none)");
    match (act, crate::model::Arch::from_name(name)) {
        (Some(act), Some(arch)) if !arch.ffn_act_overridable() => Err(RunError::Input(format!(
            "--ffn-act {} applies to arches bitnet, bitnet-b1.58 and bitnet-25: arch {name} keeps its SiLU",
            act.name()
        ))),
        _ => Ok(()),
    }
}

/// Refuses FFN activation choices the model's arch cannot take: `--ffn-act`
/// on an arch without the reference's switch (`llama`), and
/// `--reference-ffn-act silu` where the run is SiLU already.
fn check_ffn_act(file: &GgufFile, cfg: &RunConfig) -> Result<(), RunError> {
    if cfg.ffn_act.is_none() && cfg.reference_ffn_act == FfnAct::Relu2 {
        return Ok(());
    }
    let name = file.get_str("general.architecture").unwrap_or("(none)");
    // An unknown arch is engine::validate's to name.
    let Some(arch) = crate::model::Arch::from_name(name) else {
        return Ok(());
    };
    ffn_act_applies(file, cfg.ffn_act)?;
    let run_act = cfg.ffn_act.unwrap_or(arch.ffn_act());
    if cfg.reference_ffn_act == FfnAct::Silu && run_act == FfnAct::Silu {
        let why = match cfg.ffn_act {
            Some(_) => "this run forces SiLU (--ffn-act silu)".to_string(),
            None => format!(
                "arch {name} is SiLU by design (--ffn-act relu2 judges it with squared ReLU)"
            ),
        };
        return Err(RunError::Input(format!(
            "--reference-ffn-act silu needs a squared-ReLU run: {why}"
        )));
    }
    Ok(())
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

/// The most positions a prompt can need: a text prompt is at most one token
/// per byte, plus the space prefix, BOS and an injected duplicate BOS.
pub(crate) fn prompt_bound(prompt: &Prompt, chat: bool) -> usize {
    match prompt {
        // A chat template adds its role headers: a generous allowance.
        Prompt::Text(text) if chat => text.len() + 3 + CHAT_TEMPLATE_ALLOWANCE,
        Prompt::Text(text) => text.len() + 3,
        Prompt::Tokens(ids) => ids.len(),
    }
}

/// Runs the whole comparison of the candidate that `loader` makes against
/// bitnet.cpp. Engine failures are part of the outcome (verdicts
/// `reference_failed`, `candidate_failed`), not errors: the receipt must
/// still be written.
pub fn run(cfg: &RunConfig, loader: &dyn CandidateLoader) -> Result<Outcome, RunError> {
    let t_total = Instant::now();
    let bound = prompt_bound(&cfg.prompt, cfg.chat);
    match Session::open(cfg, loader, bound)? {
        Ok(mut session) => session.run_prompt(&cfg.prompt, t_total),
        Err(outcome) => Ok(outcome),
    }
}

/// Both engines loaded on one model, ready to run prompts one after the
/// other (each from position 0): a sweep keeps one session for its corpus.
pub struct Session<'c> {
    cfg: &'c RunConfig,
    loader: &'c dyn CandidateLoader,
    file: Arc<GgufFile>,
    facts: Option<FileFacts>,
    oracle: Result<Oracle, String>,
    /// The positions the KV caches hold; `model_ctx` the model's context.
    n_ctx: usize,
    model_ctx: usize,
    reference: Option<Worker>,
    candidate: Option<Box<dyn Candidate>>,
    /// What every outcome of this session starts with (model, engines, loads).
    base: Outcome,
    weight_scan: Option<std::thread::JoinHandle<Vec<String>>>,
    weight_warnings: Option<Vec<String>>,
}

impl<'c> Session<'c> {
    /// Opens and validates the model, starts the NaN/Inf weight scan beside
    /// the run, loads the candidate and starts the reference, with KV
    /// caches for prompts of up to `prompt_bound` positions. A model that is
    /// bad input is an error; an engine that fails to load is an outcome.
    pub fn open(
        cfg: &'c RunConfig,
        loader: &'c dyn CandidateLoader,
        prompt_bound: usize,
    ) -> Result<Result<Session<'c>, Outcome>, RunError> {
        let t_total = Instant::now();
        let file = Arc::new(GgufFile::open_resident(&cfg.model)?);
        check_ffn_act(&file, cfg)?;
        crate::engine::validate(&file)?;
        let oracle = Oracle::new(file.clone(), cfg.kv_type == KvType::F16)
            .map(|o| o.with_ffn_act(cfg.ffn_act));
        let facts = oracle.as_ref().ok().map(|o| o.facts().clone());
        let model_ctx = facts
            .as_ref()
            .map_or(4096, |f| f.n_ctx_train)
            .clamp(1, 4096);
        // Both KV caches are sized for what this run can need, not the
        // model's whole context (4096 positions of a 2B-4T cache are 315 MB
        // per side).
        let n_ctx = (prompt_bound + cfg.steps + 1).min(model_ctx);
        // The scan for NaN/Inf weights reads every F16/F32 tensor (656 MB on
        // the 2B-4T): beside the run, not before it.
        let scan = {
            let file = file.clone();
            std::thread::spawn(move || non_finite_weights(&file))
        };
        let mut base = Outcome {
            file_facts: facts.clone(),
            model_file_size: file.file_size(),
            recipe: crate::synth::recipe_of(&file),
            ..Outcome::starting(TokenCheck::ids_given(vec![]))
        };
        if let Err(e) = &oracle {
            base.coverage
                .notes
                .push(format!("{e}: blame will be undetermined"));
        }
        if let Some(w) = facts
            .as_ref()
            .and_then(|f| f.relu2_trained_as_bitnet(file.get_str("general.name").ok()))
        {
            base.remarks.push(match cfg.ffn_act {
                Some(act) => format!("{w}. This run forces --ffn-act {}", act.name()),
                None => w,
            });
        }
        let mut session = Session {
            cfg,
            loader,
            file,
            facts,
            oracle: oracle.map_err(|e| e.to_string()),
            n_ctx,
            model_ctx,
            reference: None,
            candidate: None,
            base,
            weight_scan: Some(scan),
            weight_warnings: None,
        };
        match session.load_engines() {
            Ok(()) => Ok(Ok(session)),
            Err(e) => {
                let mut run = session.new_run(&cfg.prompt, t_total);
                Ok(Err(run_ended(&mut run, e)?))
            }
        }
    }

    /// Loads whatever engine is not loaded (both at first; after a failure,
    /// the one that failed).
    fn load_engines(&mut self) -> Result<(), Ended> {
        let cfg = self.cfg;
        if self.candidate.is_none() {
            let opts = LoadOptions {
                model: cfg.model.clone(),
                threads: cfg.threads,
                kv_type: cfg.kv_type,
                n_ctx: self.n_ctx,
                file: Some(self.file.clone()),
                ffn_act: cfg.ffn_act,
            };
            let t = Instant::now();
            let loader = self.loader;
            let c = guarded(|| loader.load(&opts)).map_err(|failed| Ended::Candidate {
                during: "load",
                failed,
                step: None,
                last: None,
            })?;
            self.base.timings.candidate_load_s = t.elapsed().as_secs_f64();
            self.base.candidate = CandidateInfo {
                name: c.name(),
                build: c.build(),
                kv_semantics: Some(c.kv_semantics()),
            };
            let config = c.config().clone();
            if let Some(f) = &self.facts {
                self.base.config_check = config_mismatches(&config, f);
            }
            self.base.model = Some(config);
            self.candidate = Some(c);
        }
        if self.reference.is_none() {
            let t = Instant::now();
            let ctx = ContextOptions {
                threads: cfg.threads,
                kv_type: cfg.kv_type,
                n_ctx: self.n_ctx,
                n_batch: self.n_ctx,
            };
            let filter = CaptureFilter {
                off: false,
                layers: None,
                name_patterns: vec![],
                base_names: capture_base_names(),
            };
            // `--reference-ffn-act silu` for the reference alone, else the
            // run's activation.
            let reference_act = match cfg.reference_ffn_act {
                FfnAct::Silu => Some(FfnAct::Silu),
                FfnAct::Relu2 => cfg.ffn_act,
            };
            let w = Worker::start_with(&cfg.worker_exe, &cfg.model, &ctx, filter, reference_act)
                .map_err(Ended::Reference)?;
            self.base.timings.reference_load_s = t.elapsed().as_secs_f64();
            self.base.reference_description = w.description.clone();
            self.reference = Some(w);
        }
        Ok(())
    }

    /// An outcome under construction with what the session knows, for
    /// `prompt`: a text prompt has no ids until both sides tokenized it.
    fn new_run(&mut self, prompt: &Prompt, t_total: Instant) -> Run {
        let tokens = TokenCheck {
            source: match prompt {
                Prompt::Text(_) => TokenSource::NotTokenized,
                Prompt::Tokens(_) => TokenSource::IdsGiven,
            },
            ..TokenCheck::ids_given(vec![])
        };
        let mut run = Run::new(tokens.clone(), t_total);
        run.outcome = Outcome {
            tokens,
            ..self.base.clone()
        };
        if self.weight_warnings.is_none() {
            if let Some(scan) = self.weight_scan.take() {
                self.weight_warnings = Some(
                    scan.join()
                        .unwrap_or_else(|_| vec!["the NaN/Inf weight scan panicked".into()]),
                );
            }
        }
        run.outcome.weight_warnings = self.weight_warnings.clone().unwrap_or_default();
        run
    }

    /// Runs one prompt from position 0 through every step: tokenize, check
    /// the tokens, prefill, decode, finish.
    pub fn run_prompt(&mut self, prompt: &Prompt, t_total: Instant) -> Result<Outcome, RunError> {
        let mut run = self.new_run(prompt, t_total);
        let result = self.load_engines().and_then(|()| {
            // A fresh start: nothing cached on either side.
            if let Some(c) = self.candidate.as_mut() {
                c.reset();
            }
            if let Some(r) = self.reference.as_mut() {
                r.clear_kv().map_err(Ended::Reference)?;
            }
            let (ref_tokens, cand_tokens) = self.tokenize(&mut run, prompt)?;
            self.steps(&mut run, ref_tokens, cand_tokens)
        });
        if let Some(r) = &self.reference {
            run.outcome.timings.reference_peak_rss_bytes = r.peak_rss_bytes();
        }
        match result {
            Ok(()) => Ok(run.finish()),
            Err(e) => {
                // An engine that failed is loaded again for the next prompt.
                match &e {
                    Ended::Reference(_) => self.reference = None,
                    Ended::Candidate { .. } => self.candidate = None,
                    Ended::Bad(_) => {}
                }
                run.ended(e)
            }
        }
    }

    /// The token check: each side makes its own ids from the text (and,
    /// with `chat`, its own chat prompt first), as llama-cli does: BOS as
    /// the vocabulary asks, special tokens in the text recognised. Given
    /// ids go to both sides as they are.
    fn tokenize(&mut self, run: &mut Run, prompt: &Prompt) -> Result<(Vec<u32>, Vec<u32>), Ended> {
        let cfg = self.cfg;
        let reference = self.reference.as_mut().expect("loaded");
        let candidate = self.candidate.as_mut().expect("loaded");
        let bos = bos_id(&self.file);
        let (ref_tokens, cand_tokens) = match prompt {
            Prompt::Text(text) => {
                let (ref_text, cand_text) = if cfg.chat {
                    let messages = [ChatMessage::user(text)];
                    let r = reference
                        .apply_chat_template(None, &messages, true)
                        .map_err(Ended::Reference)?;
                    let c = match guarded(|| Ok(candidate.chat_prompt(&messages))) {
                        Ok(Some(Ok(c))) => Some(c),
                        // The reference formatted it: the candidate's failure, with a receipt.
                        Ok(Some(Err(e))) => {
                            return Err(Ended::Candidate {
                                during: "chat_prompt",
                                failed: Failed::Error(e),
                                step: None,
                                last: None,
                            })
                        }
                        Ok(None) => None,
                        Err(failed) => {
                            return Err(Ended::Candidate {
                                during: "chat_prompt",
                                failed,
                                step: None,
                                last: None,
                            })
                        }
                    };
                    run.outcome.tokens.chat = Some(ChatPrompts {
                        reference: r.clone(),
                        candidate: c.clone(),
                    });
                    (r, c)
                } else {
                    (text.clone(), Some(text.clone()))
                };
                let r = reference
                    .tokenize(&ref_text, true, true)
                    .map_err(Ended::Reference)?;
                run.outcome.tokens.reference_tokenizer = Some(format!(
                    "bitnet.cpp llama_tokenize (add_special, parse_special){}",
                    if cfg.chat {
                        " of llama_chat_apply_template's prompt"
                    } else {
                        ""
                    }
                ));
                let own = match &cand_text {
                    Some(t) => {
                        guarded(|| Ok(candidate.tokenize(t, true, true))).map_err(|failed| {
                            Ended::Candidate {
                                during: "tokenize",
                                failed,
                                step: None,
                                last: None,
                            }
                        })?
                    }
                    None => None,
                };
                let mut c = match own {
                    Some(c) => {
                        run.outcome.tokens.source = TokenSource::EachSideTokenized;
                        run.outcome.tokens.candidate_tokenizer = candidate.tokenizer_description();
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
            return Err(RunError::Input("the prompt tokenizes to nothing".into()).into());
        }
        if ref_tokens.len() + cfg.steps > self.model_ctx {
            return Err(RunError::Input(format!(
                "prompt ({} tokens) plus --steps {} exceeds the context of {} positions",
                ref_tokens.len(),
                cfg.steps,
                self.model_ctx
            ))
            .into());
        }
        if ref_tokens.len().max(cand_tokens.len()) + cfg.steps > self.n_ctx {
            return Err(RunError::Input(format!(
                "the prompt tokenized to {} ids, more than the {} positions this run was sized for",
                ref_tokens.len().max(cand_tokens.len()),
                self.n_ctx.saturating_sub(cfg.steps + 1)
            ))
            .into());
        }
        let n_vocab_file = self.facts.as_ref().map(|f| f.n_vocab);
        if let (Some(n_vocab), Some(bad)) = (
            n_vocab_file,
            ref_tokens
                .iter()
                .find(|&&t| Some(t as usize) >= n_vocab_file),
        ) {
            return Err(RunError::Input(format!(
                "token id {bad} is outside the vocabulary of {n_vocab}"
            ))
            .into());
        }
        let mut pieces = |ids: &[u32]| -> Vec<Option<String>> {
            reference
                .pieces(ids)
                .map(|p| {
                    p.into_iter()
                        .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()))
                        .collect()
                })
                .unwrap_or_default()
        };
        run.check_tokens(ref_tokens.clone(), cand_tokens.clone(), bos, &mut pieces);
        Ok((ref_tokens, cand_tokens))
    }

    /// The prefill and the decode steps, each judged as the candidate
    /// produces it.
    fn steps(
        &mut self,
        run: &mut Run,
        ref_tokens: Vec<u32>,
        cand_tokens: Vec<u32>,
    ) -> Result<(), Ended> {
        let cfg = self.cfg;
        let reference = self.reference.as_mut().expect("loaded");
        let candidate = self.candidate.as_mut().expect("loaded");
        let n_vocab = self.facts.as_ref().map_or(reference.n_vocab, |f| f.n_vocab);
        let n_layer = self.facts.as_ref().map_or(0, |f| f.n_layer);
        let expected = self
            .facts
            .as_ref()
            .map(|f| f.expected_stages())
            .unwrap_or_default();
        let resync = cfg.mode == Mode::Resync;
        let pairing = if resync {
            Pairing::SameInputs
        } else {
            Pairing::OwnInputs
        };
        let caches_own = candidate.kv_semantics() == KvSemantics::CachesOwnValues;
        let oracle = self.oracle.as_ref().map_err(String::as_str);
        let (mut ref_track, mut cand_track) =
            (SideTrack::new(n_layer, None), SideTrack::new(n_layer, None));
        let (mut batch, mut cand_batch) = (ref_tokens, cand_tokens);
        let (mut ref_pos, mut cand_pos) = (0usize, 0usize);
        let total_steps = cfg.steps + 1;
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
            let (ref_logits, mut nodes, mut graph) = reference
                .decode(&batch, ref_pos)
                .map_err(Ended::Reference)?;
            run.outcome.timings.reference_s += t.elapsed().as_secs_f64();
            rename_nodes(&cfg.rename_reference_nodes, &mut nodes, &mut graph);
            for u in classify_graph(&graph).unknown {
                if !run.outcome.coverage.unmapped_reference_nodes.contains(&u) {
                    run.outcome.coverage.unmapped_reference_nodes.push(u);
                }
            }
            let ref_stages: BTreeMap<StageKey, Tensor> =
                map_nodes(nodes, ref_pos).stages.into_iter().collect();
            let ref_keys: BTreeSet<StageKey> = ref_stages.keys().copied().collect();

            let t = Instant::now();
            let mut judge = StepJudge::new(
                &cfg.policy,
                pairing,
                n_vocab,
                (oracle, oracle),
                &ref_stages,
                (&mut ref_track, &mut cand_track),
                StepInput {
                    tokens: &batch,
                    n_past: ref_pos,
                },
                StepInput {
                    tokens: &cand_batch,
                    n_past: cand_pos,
                },
            )
            .resync(resync)
            .caches_own_values(caches_own)
            .keep_going(cfg.keep_going);
            let cand_logits = guarded(|| candidate.forward(&cand_batch, cand_pos, &mut judge))
                .map_err(|failed| Ended::Candidate {
                    during: "forward",
                    failed,
                    step: Some(step),
                    last: judge.last_stage(),
                })?;
            let emitted = std::mem::take(&mut judge.emitted);
            let (judged, compare_s) = judge.finish();
            run.outcome.timings.candidate_s += t.elapsed().as_secs_f64() - compare_s;
            run.outcome.timings.compare_s += compare_s;
            run.absorb(
                &cfg.policy,
                StepJudged {
                    step,
                    pos0: ref_pos,
                    n_tokens: batch.len(),
                    judged,
                    expected: &expected,
                    reference: &ref_keys,
                    emitted: &emitted,
                    scope: None,
                    pairing,
                    keep_going: cfg.keep_going,
                },
            );
            ref_pos += batch.len();
            cand_pos += cand_batch.len();
            run.outcome.steps_run = step + 1;
            if let Some(p) = &cfg.progress {
                p(step + 1, total_steps);
            }

            // Greedy next tokens from the last position of each side (in
            // resync the candidate continued from the reference's logits).
            run.compare_position_logits(
                step,
                ref_pos - batch.len(),
                &ref_logits,
                &cand_logits,
                n_vocab,
            );
            let last = |l: &[f32]| metrics::argmax(&l[l.len().saturating_sub(n_vocab)..]) as u32;
            let (r_next, c_next) = (last(&ref_logits), last(&cand_logits));
            run.record_choices(step, r_next, c_next, step > 0 || cfg.steps > 0);
            let stop = run.outcome.first_divergence.is_some() && !cfg.keep_going;
            if stop || step + 1 == total_steps {
                break;
            }
            batch = vec![r_next];
            cand_batch = vec![r_next];
        }
        Ok(())
    }
}

/// The outcome of a session that ended while opening.
fn run_ended(run: &mut Run, e: Ended) -> Result<Outcome, RunError> {
    let taken = std::mem::replace(run, Run::new(TokenCheck::ids_given(vec![]), Instant::now()));
    taken.ended(e)
}

/// `tokenizer.ggml.bos_token_id` as the file states it.
fn bos_id(file: &GgufFile) -> Option<u32> {
    file.get("tokenizer.ggml.bos_token_id")
        .and_then(|_| file.get_u32("tokenizer.ggml.bos_token_id").ok())
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
pub(crate) enum Failed {
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
