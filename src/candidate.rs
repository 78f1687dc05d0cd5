//! The seam between the harness and an engine under test.
//!
//! An engine becomes a candidate by implementing [`Candidate`]: it says
//! what it is, what model config it read, optionally how it tokenizes, and
//! runs a forward pass that hands every canonical stage to a [`TraceSink`]
//! and continues from whatever the sink leaves in the buffer. A
//! [`CandidateLoader`] makes one for a model file and the run's options
//! (the harness may load two: free mode runs a resynced twin to measure
//! each stage's local error).
//!
//! The stage list and each stage's logical layout are the contract; they are
//! written once in `docs/candidate-api.md` (tested against
//! [`crate::trace::Stage`]), which follows.
//!
#![doc = include_str!("../docs/candidate-api.md")]

use crate::engine::tokenizer::chat::{render_chat, ChatMessage};
use crate::engine::{Engine, EngineOptions, Fault, I2sMode};
use crate::model::{FfnAct, KvType, ModelConfig};
use crate::trace::TraceSink;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Why a candidate could not load or run. The harness turns it into a
/// receipt with verdict `candidate_failed`; it never ends the process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CandidateError {
    /// What went wrong, in the engine's words.
    pub message: String,
}

impl CandidateError {
    /// An error with this message.
    pub fn new(message: impl std::fmt::Display) -> CandidateError {
        CandidateError {
            message: message.to_string(),
        }
    }
}

impl From<crate::engine::EngineError> for CandidateError {
    fn from(e: crate::engine::EngineError) -> Self {
        CandidateError::new(e)
    }
}

/// What an engine's KV cache holds after a sink replaced `k_rope` or
/// `v_proj` (resync).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvSemantics {
    /// The engine caches K and V *after* the sink saw `k_rope` and
    /// `v_proj`: values the sink writes reach the cache, so a resynced step
    /// (and every later one) attends over the reference's keys and values.
    CachesSinkValues,
    /// The engine caches its own K and V whatever the sink writes: in
    /// resync mode later steps attend over the candidate's own history, so
    /// an error in K or V at one step also shows in later steps' attention.
    CachesOwnValues,
}

/// What the harness asks of a candidate when it loads one.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The GGUF model both engines run.
    pub model: PathBuf,
    /// Threads the engine may use.
    pub threads: usize,
    /// The KV cache element type both engines use.
    pub kv_type: KvType,
    /// Positions the run needs (prompt plus decode steps).
    pub n_ctx: usize,
    /// The harness's own validated mapping of the model, for engines that
    /// read GGUF through this crate: sharing it keeps one mapping of the
    /// file in the process instead of one per engine (resident memory counts
    /// every mapping's pages).
    pub file: Option<std::sync::Arc<crate::gguf::GgufFile>>,
    /// The FFN activation the run forces instead of the arch's own
    /// (`--ffn-act`; `None`: as the arch defines it). The reference and the
    /// oracle run it too, so an engine that ignores it is judged against it.
    pub ffn_act: Option<FfnAct>,
}

/// An engine under test.
///
/// The harness calls [`Candidate::forward`] once per step: the prompt at
/// positions `0..T`, then one token per decode step at the next position.
pub trait Candidate {
    /// A short name for receipts, e.g. "divergence pure-Rust BitNet engine".
    fn name(&self) -> String;

    /// How it was built and how it runs (version, kernel path, options).
    fn build(&self) -> String;

    /// The model's hyperparameters as the engine read them (the harness
    /// cross-checks them against the file's metadata).
    fn config(&self) -> &ModelConfig;

    /// Token ids of `text` from the engine's own tokenizer, with
    /// `llama_tokenize`'s flags (`add_special`: BOS/EOS as the vocabulary
    /// asks; `parse_special`: special tokens written in the text are
    /// recognised). `None` when the engine has no tokenizer for this
    /// vocabulary: the harness then uses the reference's ids and the
    /// receipt says so (the run is then `incomplete`: tokens were not
    /// compared).
    fn tokenize(&self, _text: &str, _add_special: bool, _parse_special: bool) -> Option<Vec<u32>> {
        None
    }

    /// Which tokenizer [`Candidate::tokenize`] uses, for the receipt.
    fn tokenizer_description(&self) -> Option<String> {
        None
    }

    /// The chat prompt for `messages` as the engine formats it (usually the
    /// GGUF's `tokenizer.chat_template` rendered as Hugging Face does),
    /// ending with the assistant's turn opened. `None`: the engine has no
    /// chat formatting (then `find --chat` cannot compare it).
    fn chat_prompt(&self, _messages: &[ChatMessage]) -> Option<Result<String, CandidateError>> {
        None
    }

    /// Whether values the sink writes into `k_rope` / `v_proj` reach the KV cache.
    fn kv_semantics(&self) -> KvSemantics;

    /// Forgets every cached position: the next forward starts at position 0.
    fn reset(&mut self);

    /// Runs `tokens` at positions `pos0..pos0 + T` (the engine has cached
    /// exactly `pos0` positions), hands every canonical stage to `sink` in
    /// execution order and in its canonical layout, continues from whatever
    /// the sink leaves in each buffer, and returns the logits of every
    /// position, row-major `[T, n_vocab]`.
    fn forward(
        &mut self,
        tokens: &[u32],
        pos0: usize,
        sink: &mut dyn TraceSink,
    ) -> Result<Vec<f32>, CandidateError>;
}

/// Makes a candidate for a model and the run's options.
pub trait CandidateLoader {
    /// Loads the engine.
    fn load(&self, opts: &LoadOptions) -> Result<Box<dyn Candidate>, CandidateError>;
}

impl<F> CandidateLoader for F
where
    F: Fn(&LoadOptions) -> Result<Box<dyn Candidate>, CandidateError>,
{
    fn load(&self, opts: &LoadOptions) -> Result<Box<dyn Candidate>, CandidateError> {
        self(opts)
    }
}

/// This project's engine ([`Engine`]) as a candidate, with the bug-zoo
/// faults and the I2_S accumulation mode to load it with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuiltinCandidate {
    /// Faults to inject (the bug zoo); empty in normal use.
    pub faults: Vec<Fault>,
    /// The one layer the faults act in (`None`: everywhere).
    pub fault_layer: Option<usize>,
    /// How I2_S dot products accumulate.
    pub i2s_mode: I2sMode,
}

impl CandidateLoader for BuiltinCandidate {
    fn load(&self, opts: &LoadOptions) -> Result<Box<dyn Candidate>, CandidateError> {
        let engine_opts = EngineOptions {
            threads: opts.threads,
            kv_type: opts.kv_type,
            i2s_mode: self.i2s_mode,
            faults: self.faults.clone(),
            n_ctx: opts.n_ctx,
            fault_layer: self.fault_layer,
            ffn_act: opts.ffn_act,
        };
        let engine = match &opts.file {
            Some(file) => Engine::from_gguf(file.clone(), engine_opts)?,
            None => Engine::load(&opts.model, engine_opts)?,
        };
        Ok(Box::new(engine))
    }
}

impl Candidate for Engine {
    fn name(&self) -> String {
        "divergence pure-Rust BitNet engine".into()
    }

    fn build(&self) -> String {
        format!(
            "divergence {}, kernel {}{}, I2_S {:?}, {} thread(s){}{}",
            env!("CARGO_PKG_VERSION"),
            self.kernel_name(),
            if self.kernel_forced() {
                " (forced by DIVERGENCE_KERNEL)"
            } else {
                ""
            },
            self.options().i2s_mode,
            self.options().threads,
            match self.options().ffn_act {
                Some(act) => format!(", FFN {} (forced)", act.name()),
                None => String::new(),
            },
            if self.options().faults.is_empty() {
                String::new()
            } else {
                format!(
                    ", faults {}{}",
                    self.options()
                        .faults
                        .iter()
                        .map(|f| f.name())
                        .collect::<Vec<_>>()
                        .join(","),
                    self.options()
                        .fault_layer
                        .map(|l| format!(" in layer {l}"))
                        .unwrap_or_default()
                )
            }
        )
    }

    fn config(&self) -> &ModelConfig {
        Engine::config(self)
    }

    fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Option<Vec<u32>> {
        self.tokenizer()
            .map(|t| t.encode(text, add_special, parse_special))
    }

    fn tokenizer_description(&self) -> Option<String> {
        self.tokenizer()
            .map(|t| format!("divergence tokenizer: {}", t.describe()))
    }

    fn chat_prompt(&self, messages: &[ChatMessage]) -> Option<Result<String, CandidateError>> {
        let tok = self.tokenizer()?;
        let template = match crate::engine::tokenizer::Tokenizer::chat_template(self.file()) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Some(Err(CandidateError::new(
                    "the model has no tokenizer.chat_template",
                )))
            }
            Err(e) => return Some(Err(CandidateError::new(e))),
        };
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
        Some(
            render_chat(
                &template,
                messages,
                true,
                &text(tok.bos()),
                &text(tok.eos()),
            )
            .map_err(CandidateError::new),
        )
    }

    fn kv_semantics(&self) -> KvSemantics {
        // forward.rs writes the cache after the sink saw k_rope and v_proj.
        KvSemantics::CachesSinkValues
    }

    fn reset(&mut self) {
        Engine::reset(self)
    }

    fn forward(
        &mut self,
        tokens: &[u32],
        pos0: usize,
        sink: &mut dyn TraceSink,
    ) -> Result<Vec<f32>, CandidateError> {
        if pos0 != self.n_past() {
            return Err(CandidateError::new(format!(
                "asked to run at position {pos0}, but {} positions are cached",
                self.n_past()
            )));
        }
        Ok(Engine::forward(self, tokens, sink)?)
    }
}
