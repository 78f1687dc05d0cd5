//! `divergence`: run a BitNet b1.58 engine in lockstep with bitnet.cpp on the
//! same GGUF and the same token ids, compare every canonical stage of both,
//! and name the first divergence with evidence: where, how large, and which
//! side is wrong.
//!
//! # The public API: bring your own engine
//!
//! - [`candidate`]: the [`Candidate`](candidate::Candidate) trait an engine
//!   implements (config, tokenization, a traced forward pass, KV semantics)
//!   and [`CandidateLoader`](candidate::CandidateLoader), how a run makes one.
//! - [`model`]: [`Arch`], [`ModelConfig`] and [`KvType`], the vocabulary
//!   every part (and the trait) shares.
//! - [`trace`]: the canonical [`Stage`](trace::Stage)s, their logical
//!   layouts, and the [`TraceSink`](trace::TraceSink) a forward pass emits
//!   them to.
//! - [`lockstep`]: [`lockstep::run`] drives bitnet.cpp and a candidate step
//!   by step and judges every stage; [`receipt`] is what it writes.
//! - [`dump`]: safetensors dumps of every stage, to compare offline.
//! - [`compare`]: the metrics, the tolerance policy and the blame.
//! - [`gguf`]: a validating GGUF reader (and writer) an engine can load with.
//! - [`sweep`] and [`report`]: corpus statistics and HTML pages.
//!
//! `docs/candidate-api.md` shows the three ways to plug an engine in (this
//! trait, a dump and `divergence compare`, a dump with `--map`).
//!
//! The modules hidden from these docs (`engine`, `reference`, `oracle`,
//! `quant`, `synth`) are this crate's own machinery: the built-in
//! pure-Rust candidate, bitnet.cpp through FFI, the independent f64 oracle,
//! the quantization formats and the synthetic model generator. They are
//! public for the `divergence` binary and the tests, not as an API.

#![deny(missing_docs)]

pub mod candidate;
pub mod compare;
pub mod dump;
#[doc(hidden)]
pub mod engine;
pub mod external;
pub mod gguf;
#[doc(hidden)]
pub mod input;
pub mod lockstep;
pub mod model;
#[doc(hidden)]
pub mod oracle;
#[doc(hidden)]
pub mod outfile;
#[doc(hidden)]
pub mod quant;
pub mod receipt;
pub mod reduce;
#[doc(hidden)]
pub mod reference;
pub mod report;
pub mod sweep;
#[doc(hidden)]
pub mod synth;
pub mod trace;

pub use model::{Arch, FfnAct, KvType, ModelConfig};
