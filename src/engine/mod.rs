//! The candidate: a pure-Rust BitNet b1.58 forward pass with a trace point
//! at every canonical stage.
//!
//! Written from the model's mathematics and the facts in DESIGN.md; where
//! the reference's arithmetic order is known, the ops mirror it so that the
//! exact stages (embedding, norms, activation codes, I2_S outputs, residual
//! adds) can be bit-identical to bitnet.cpp given identical inputs.
//!
//! - [`config`]: the one place that knows GGUF keys and tensor names.
//! - [`weights`]: mmap views; I2_S stays packed.
//! - [`forward`]: the forward pass, one layer on one screen.
//! - [`ops`]: the small named ops; [`kernels`]: the I2_S products.
//! - `team`: the threads of one forward pass (they spin between products).
//! - [`kv_cache`], [`faults`] (bug-zoo switches).

pub mod config;
pub mod faults;
pub mod forward;
pub mod kernels;
pub mod kv_cache;
pub mod ops;
pub(crate) mod team;
pub mod tokenizer;
pub mod weights;

pub use crate::model::{Arch, FfnAct, KvType, ModelConfig};
pub use faults::{Fault, FaultSet};

pub use kernels::Kernel;

use crate::gguf::{GgufError, GgufFile};
use crate::trace::TraceSink;
use kv_cache::KvCache;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use weights::Weights;

/// How I2_S dot products are accumulated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum I2sMode {
    /// Exact i32 accumulation: mathematically right.
    #[default]
    Exact,
    /// bitnet.cpp's I2_S mat-vec bit for bit: the AVX2 kernel's 16-bit lane
    /// wrap per 4096-value group (BitNet issue 629), and for a row length
    /// that is not a multiple of 128 the bytes its mul_mat hands the kernel
    /// (see [`weights::realign_rows`]).
    ReferenceWrap,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineOptions {
    /// Worker threads (rows of every matmul are split across them).
    pub threads: usize,
    pub kv_type: KvType,
    pub i2s_mode: I2sMode,
    /// Test/zoo-only fault injection; empty in normal use.
    pub faults: Vec<Fault>,
    /// KV capacity in positions; 0 means min(model context, 4096).
    pub n_ctx: usize,
    /// The one layer the faults act in (`None`: everywhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_layer: Option<usize>,
    /// The FFN activation to run instead of the arch's own (`--ffn-act`);
    /// `None` in normal use.
    pub ffn_act: Option<FfnAct>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            threads: 1,
            kv_type: KvType::F16,
            i2s_mode: I2sMode::Exact,
            faults: Vec::new(),
            n_ctx: 0,
            fault_layer: None,
            ffn_act: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unknown architecture `{0}` (known: bitnet, bitnet-b1.58, bitnet-25, llama)")]
    UnknownArch(String),
    #[error("missing metadata key `{0}`")]
    MissingKey(String),
    #[error("bad hyperparameters: {0}")]
    BadHyperparameters(String),
    #[error("missing tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{tensor}` has type {found}, expected {expected}")]
    TensorType {
        tensor: String,
        expected: String,
        found: String,
    },
    #[error("tensor `{tensor}` has dims {found:?}, expected {expected}")]
    Shape {
        tensor: String,
        expected: String,
        found: Vec<u64>,
    },
    #[error(
        "tensor `{tensor}` holds {n_values} values, not a whole number of 128-value I2_S blocks"
    )]
    I2sBlocks { tensor: String, n_values: usize },
    #[error("token id {token} at position {index} is out of range (n_vocab {n_vocab})")]
    TokenOutOfRange {
        token: u32,
        index: usize,
        n_vocab: usize,
    },
    #[error("context overflow: {n_past} cached + {n_tokens} new tokens exceed the KV capacity {capacity}")]
    ContextOverflow {
        n_past: usize,
        n_tokens: usize,
        capacity: usize,
    },
    #[error("empty token batch")]
    EmptyBatch,
    #[error("bad engine options: {0}")]
    Options(String),
    #[error(transparent)]
    Kernel(#[from] kernels::KernelChoiceError),
}

/// Checks that `file` is a model bitnet.cpp's loader would accept: the
/// hyperparameters agree with each other and with the tensor table, and
/// every tensor the arch needs is there with its type and shape (the rules
/// of llama.cpp's `llm_load_hparams` / `llm_load_tensors` that
/// [`ModelConfig::from_gguf`] and [`Weights::from_gguf`] encode). The
/// lockstep runner calls it before any engine loads, so a broken file is bad
/// input whatever the candidate.
pub fn validate(file: &GgufFile) -> Result<ModelConfig, EngineError> {
    let config = ModelConfig::from_gguf(file)?;
    Weights::from_gguf(file, &config)?;
    Ok(config)
}

/// A loaded model and its KV cache (threads are started per forward pass,
/// see `team`).
pub struct Engine {
    file: Arc<GgufFile>,
    config: ModelConfig,
    opts: EngineOptions,
    weights: Weights,
    kv: KvCache,
    n_past: usize,
    kernel: Kernel,
    /// Whether `DIVERGENCE_KERNEL` chose `kernel` (see [`kernels::KERNEL_ENV`]).
    kernel_forced: bool,
    faults: FaultSet,
    /// The vocabulary's tokenizer, when the engine has one for it.
    tokenizer: Option<tokenizer::Tokenizer>,
}

impl Engine {
    pub fn load(path: &Path, opts: EngineOptions) -> Result<Engine, EngineError> {
        let file = GgufFile::open_resident(path)?;
        Engine::from_gguf(Arc::new(file), opts)
    }

    pub fn from_gguf(file: Arc<GgufFile>, opts: EngineOptions) -> Result<Engine, EngineError> {
        let faults = FaultSet::new(&opts.faults).only_in_layer(opts.fault_layer);
        let kernel = Kernel::detect()?;
        let config = ModelConfig::from_gguf_with(&file, faults.outside_layers())?;
        let weights = Weights::from_gguf_with(&file, &config, faults, opts.i2s_mode)?;
        if opts.threads == 0 {
            return Err(EngineError::Options("threads must be at least 1".into()));
        }
        let capacity = match opts.n_ctx {
            0 if config.n_ctx_train == 0 => 4096,
            0 => config.n_ctx_train.min(4096),
            n => n,
        };
        let kv = KvCache::new(
            opts.kv_type,
            config.n_layer,
            capacity,
            config.n_embd_kv(),
            config.head_dim,
        );
        Ok(Engine {
            tokenizer: tokenizer::Tokenizer::from_gguf(&file).ok(),
            faults,
            kernel,
            kernel_forced: Kernel::forced(),
            file,
            config,
            opts,
            weights,
            kv,
            n_past: 0,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The tokenizer for the model's vocabulary, if the engine has one.
    pub fn tokenizer(&self) -> Option<&tokenizer::Tokenizer> {
        self.tokenizer.as_ref()
    }

    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// The I2_S kernel in use: "scalar", "avx2" or "avx512-vnni".
    pub fn kernel_name(&self) -> &'static str {
        self.kernel.name()
    }

    /// Whether the kernel path was forced through `DIVERGENCE_KERNEL`
    /// rather than detected as the fastest this CPU has.
    pub fn kernel_forced(&self) -> bool {
        self.kernel_forced
    }

    /// Force a kernel (tests and benchmarks); a [`Kernel`] only exists for
    /// an instruction set this CPU has.
    pub fn set_kernel(&mut self, kernel: Kernel) {
        self.kernel = kernel;
    }

    /// Run the tokens at positions n_past..n_past+T, append their K/V to the
    /// cache and return the logits of every position, row-major [T, n_vocab].
    pub fn forward<S: TraceSink + ?Sized>(
        &mut self,
        tokens: &[u32],
        sink: &mut S,
    ) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyBatch);
        }
        for (index, &token) in tokens.iter().enumerate() {
            if token as usize >= self.config.n_vocab {
                return Err(EngineError::TokenOutOfRange {
                    token,
                    index,
                    n_vocab: self.config.n_vocab,
                });
            }
        }
        if self.n_past + tokens.len() > self.kv.capacity() {
            return Err(EngineError::ContextOverflow {
                n_past: self.n_past,
                n_tokens: tokens.len(),
                capacity: self.kv.capacity(),
            });
        }
        let logits = forward::forward(self, tokens, sink);
        self.n_past += tokens.len();
        Ok(logits)
    }

    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// Forget every cached position.
    pub fn reset(&mut self) {
        self.n_past = 0;
    }

    /// Bytes streamed per decode token (all projections, norms, output matrix).
    pub fn weight_bytes(&self) -> u64 {
        self.weights.bytes_per_token()
    }
}
