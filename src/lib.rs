//! `divergence`: run a pure-Rust BitNet b1.58 engine in lockstep with bitnet.cpp
//! on the same GGUF and the same token ids, compare every intermediate tensor,
//! and name the first divergence with evidence.
//!
//! The spine, one module each:
//! `gguf` (read, validate, write) → `reference` (bitnet.cpp via FFI) and
//! `engine` (the candidate) → `trace` (canonical stages) → `compare`
//! (metrics, policy, oracle blame) → `lockstep` (steps, resync) → `receipt`;
//! `sweep` runs a corpus of prompts, `report` renders receipts and sweeps as HTML.

pub mod candidate;
pub mod compare;
pub mod dump;
pub mod engine;
pub mod gguf;
pub mod lockstep;
pub mod oracle;
mod outfile;
pub mod quant;
pub mod receipt;
pub mod reference;
pub mod report;
pub mod sweep;
pub mod synth;
pub mod trace;

pub use engine::{Arch, KvType, ModelConfig};
