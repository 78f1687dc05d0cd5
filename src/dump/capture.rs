//! `divergence capture`: one engine's run, every stage of every step, into
//! a dump. Each engine feeds itself (greedy), so a dump is a free run.

use super::{DumpError, DumpSink, DumpStep, DumpWriter, Manifest};
use crate::candidate::{CandidateLoader, LoadOptions};
use crate::compare::metrics::argmax;
use crate::gguf::GgufFile;
use crate::lockstep::{Mode, Prompt};
use crate::model::KvType;
use crate::oracle::OracleModel;
use crate::reference::worker::Worker;
use crate::reference::{BuildInfo, CaptureFilter, ContextOptions, RefError};
use crate::trace::reference_map::{capture_base_names, map_nodes};
use crate::trace::StageKey;
use std::path::PathBuf;

/// What to capture.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// The GGUF model.
    pub model: PathBuf,
    /// Text (tokenized by the engine itself) or token ids.
    pub prompt: Prompt,
    /// Greedy decode steps after the prefill.
    pub steps: usize,
    /// Threads.
    pub threads: usize,
    /// KV cache type.
    pub kv_type: KvType,
    /// The FFN activation instead of the arch's own (`--ffn-act`).
    pub ffn_act: Option<crate::model::FfnAct>,
    /// Where to write the dump.
    pub out: PathBuf,
    /// Set (by Ctrl-C): stop after the current step and write the steps
    /// done, marked `interrupted`.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl CaptureConfig {
    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// Why a capture failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The request is wrong.
    #[error("{0}")]
    Input(String),
    /// The model is not valid GGUF.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    /// bitnet.cpp failed.
    #[error(transparent)]
    Reference(#[from] RefError),
    /// The candidate failed.
    #[error("the candidate failed: {0}")]
    Candidate(String),
    /// The dump could not be written.
    #[error(transparent)]
    Dump(#[from] DumpError),
}

fn context_size(file: &GgufFile, prompt: &Prompt, steps: usize) -> usize {
    let model_ctx = OracleModel::read(file)
        .map(|m| m.facts.n_ctx_train)
        .unwrap_or(4096)
        .clamp(1, 4096);
    let bound = match prompt {
        Prompt::Text(t) => t.len() + 3,
        Prompt::Tokens(ids) => ids.len(),
    };
    (bound + steps + 1).min(model_ctx)
}

fn manifest(cfg: &CaptureConfig, file: &GgufFile, engine: &str, build: String) -> Manifest {
    Manifest {
        tool: format!("divergence {}", env!("CARGO_PKG_VERSION")),
        engine: engine.into(),
        engine_build: build,
        model_path: cfg.model.display().to_string(),
        model_sha256: crate::receipt::sha256_file(&cfg.model).unwrap_or_default(),
        model: OracleModel::read(file).ok().map(|m| m.facts),
        engine_config: None,
        prompt: match &cfg.prompt {
            Prompt::Text(t) => Some(t.clone()),
            Prompt::Tokens(_) => None,
        },
        stages: None,
        steps: Vec::new(),
        mode: Mode::Free,
        threads: cfg.threads,
        kv_type: cfg.kv_type,
        ffn_act: cfg.ffn_act,
        reference_build: None,
        interrupted: false,
    }
}

fn check_room(n_prompt: usize, steps: usize, n_ctx: usize) -> Result<(), CaptureError> {
    if n_prompt == 0 {
        return Err(CaptureError::Input(
            "the prompt tokenizes to nothing".into(),
        ));
    }
    if n_prompt + steps > n_ctx {
        return Err(CaptureError::Input(format!(
            "a prompt of {n_prompt} tokens plus {steps} steps does not fit the context of {n_ctx}"
        )));
    }
    Ok(())
}

/// Captures bitnet.cpp's run (in its worker process) into `cfg.out`.
pub fn capture_reference(
    cfg: &CaptureConfig,
    worker_exe: &std::path::Path,
) -> Result<Manifest, CaptureError> {
    let file = GgufFile::open(&cfg.model)?;
    let n_ctx = context_size(&file, &cfg.prompt, cfg.steps);
    let ctx = ContextOptions {
        threads: cfg.threads,
        kv_type: cfg.kv_type,
        n_ctx,
        n_batch: n_ctx,
    };
    let filter = CaptureFilter {
        base_names: capture_base_names(),
        ..CaptureFilter::default()
    };
    crate::lockstep::ffn_act_applies(&file, cfg.ffn_act)
        .map_err(|e| CaptureError::Input(e.to_string()))?;
    let mut worker = Worker::start_with(worker_exe, &cfg.model, &ctx, filter, cfg.ffn_act)?;
    let mut batch = match &cfg.prompt {
        Prompt::Text(t) => worker.tokenize(t, true, true)?,
        Prompt::Tokens(ids) => ids.clone(),
    };
    check_room(batch.len(), cfg.steps, n_ctx)?;
    let mut m = manifest(
        cfg,
        &file,
        "reference",
        format!("bitnet.cpp ({})", worker.description),
    );
    m.reference_build = Some(BuildInfo::current(cfg.threads));
    let mut writer = DumpWriter::create(&cfg.out)?;
    let mut pos = 0;
    for step in 0..=cfg.steps {
        if cfg.cancelled() {
            m.interrupted = true;
            break;
        }
        let (logits, nodes, _) = worker.decode(&batch, pos)?;
        let mut stages = map_nodes(nodes, pos).stages;
        stages.sort_by_key(|(k, _)| k.order());
        for (key, t) in &stages {
            writer.add(step, *key, &t.shape, &t.data)?;
        }
        m.steps.push(DumpStep {
            step,
            pos0: pos,
            tokens: batch.clone(),
        });
        pos += batch.len();
        let v = worker.n_vocab;
        batch = vec![argmax(&logits[logits.len().saturating_sub(v)..]) as u32];
    }
    writer.finish(Some(&m))?;
    Ok(m)
}

/// Captures a candidate's run into `cfg.out`.
pub fn capture_candidate(
    cfg: &CaptureConfig,
    loader: &dyn CandidateLoader,
) -> Result<Manifest, CaptureError> {
    let file = GgufFile::open(&cfg.model)?;
    let n_ctx = context_size(&file, &cfg.prompt, cfg.steps);
    crate::lockstep::ffn_act_applies(&file, cfg.ffn_act)
        .map_err(|e| CaptureError::Input(e.to_string()))?;
    let mut cand = loader
        .load(&LoadOptions {
            model: cfg.model.clone(),
            threads: cfg.threads,
            kv_type: cfg.kv_type,
            n_ctx,
            file: None,
            ffn_act: cfg.ffn_act,
        })
        .map_err(|e| CaptureError::Candidate(e.to_string()))?;
    let mut batch = match &cfg.prompt {
        Prompt::Text(t) => cand.tokenize(t, true, true).ok_or_else(|| {
            CaptureError::Input(
                "the candidate has no tokenizer for this vocabulary: give --tokens".into(),
            )
        })?,
        Prompt::Tokens(ids) => ids.clone(),
    };
    check_room(batch.len(), cfg.steps, n_ctx)?;
    let mut m = manifest(
        cfg,
        &file,
        "candidate",
        format!("{} ({})", cand.name(), cand.build()),
    );
    m.engine_config = Some(cand.config().clone());
    let n_vocab = cand.config().n_vocab;
    let mut writer = DumpWriter::create(&cfg.out)?;
    let mut pos = 0;
    for step in 0..=cfg.steps {
        if cfg.cancelled() {
            m.interrupted = true;
            break;
        }
        let mut sink = DumpSink::new(&mut writer, step);
        let logits = cand
            .forward(&batch, pos, &mut sink)
            .map_err(|e| CaptureError::Candidate(e.to_string()))?;
        if let Some(e) = sink.error.take() {
            return Err(e.into());
        }
        m.steps.push(DumpStep {
            step,
            pos0: pos,
            tokens: batch.clone(),
        });
        pos += batch.len();
        batch = vec![argmax(&logits[logits.len().saturating_sub(n_vocab)..]) as u32];
    }
    writer.finish(Some(&m))?;
    Ok(m)
}

/// The canonical (step, stage) keys of a manifest's model: what a dump of
/// it should hold (empty when the model's facts are unknown).
pub fn expected_keys(m: &Manifest) -> Vec<(usize, StageKey)> {
    let Some(facts) = &m.model else {
        return vec![];
    };
    let per_step = facts.expected_stages();
    m.steps
        .iter()
        .flat_map(|s| per_step.iter().map(move |k| (s.step, *k)))
        .collect()
}
