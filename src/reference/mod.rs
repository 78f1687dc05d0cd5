//! The reference engine: bitnet.cpp, built from the pinned source by
//! `build.rs`, reached through bindgen. The only module with FFI.
//!
//! Two ways in:
//! - [`session`]: in-process model/context/decode/capture. A `GGML_ASSERT` in
//!   bitnet.cpp aborts the process, so only tests and the worker use it.
//! - [`worker`]: the same API in a child process (our own binary in worker
//!   mode, frames over a pipe). The lockstep runner uses this: a crash of the
//!   reference becomes [`RefError::Crashed`] with the signal and the last node
//!   the child reported, and the harness lives on to write the receipt.
//! - [`kernels`]: bitnet.cpp's internal I2_S kernels through `ffi/shim.c`.
//! - [`vocab`]: how bitnet.cpp will read a file's tokenizer keys (no FFI).

mod ffi;
pub mod kernels;
pub mod session;
pub mod vocab;
pub mod worker;

use serde::{Deserialize, Serialize};

pub use session::{set_ffn_act, Context, ContextOptions, Decoded, Model, VocabSpecials};

/// KV cache element type: one type for both engines.
pub use crate::model::KvType;

/// The FFN activation a run can force on the reference's bitnet graphs
/// (our patches 04 and 06); one build serves every choice, made at run time.
pub use crate::model::FfnAct;

/// One graph node as `cb_eval` showed it, data converted to contiguous f32.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// ggml op name ("MUL_MAT", "ROPE", ...).
    pub op: String,
    /// ggml type name of the node's data ("f32", "f16").
    pub ty: String,
    /// ggml dims, ne0 (innermost) first.
    pub ne: [usize; 4],
    /// ggml strides in bytes, as the node had them (before we made it contiguous).
    pub nb: [usize; 4],
    /// Layer parsed from a `-N` name suffix.
    pub layer: Option<usize>,
    #[serde(skip)]
    pub data: Vec<f32>,
}

/// A graph node as `cb_eval` was asked about it (every node, captured or
/// not): what coverage accounting checks the stage mapping against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphNode {
    /// The node's name (`Qcur-3`).
    pub name: String,
    /// Its ggml op name.
    pub op: String,
}

/// Which nodes to copy. A full-size model should not copy every tensor.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CaptureFilter {
    /// Capture nothing at all (fastest; logits only).
    pub off: bool,
    /// Only these layers (model-level nodes are always kept).
    pub layers: Option<Vec<usize>>,
    /// Only names containing one of these (empty: no restriction).
    pub name_patterns: Vec<String>,
    /// Only nodes whose base name (the name without its `-N` layer suffix)
    /// is one of these (empty: no restriction). Unlike a pattern, `Qcur`
    /// here does not also copy `Qcur-0 (reshaped)`.
    #[serde(default)]
    pub base_names: Vec<String>,
}

impl CaptureFilter {
    pub fn all() -> Self {
        CaptureFilter::default()
    }

    pub fn none() -> Self {
        CaptureFilter {
            off: true,
            ..Default::default()
        }
    }

    pub fn wants(&self, name: &str) -> bool {
        if self.off || name.is_empty() {
            return false;
        }
        let (base, layer) = split_layer(name);
        if let (Some(layers), Some(layer)) = (&self.layers, layer) {
            if !layers.contains(&layer) {
                return false;
            }
        }
        (self.name_patterns.is_empty()
            || self.name_patterns.iter().any(|p| name.contains(p.as_str())))
            && (self.base_names.is_empty() || self.base_names.iter().any(|b| b == base))
    }
}

/// Splits a ggml node name into its base and the layer of a `-N` suffix
/// (`Qcur-3` → (`Qcur`, 3); `result_norm` and `Qcur-3 (reshaped)` keep their
/// whole name and no layer).
pub fn split_layer(name: &str) -> (&str, Option<usize>) {
    match name.rsplit_once('-') {
        Some((base, l)) => match l.parse::<usize>() {
            Ok(layer) => (base, Some(layer)),
            Err(_) => (name, None),
        },
        None => (name, None),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RefError {
    #[error("reference refused the model: {0}")]
    Load(String),
    #[error("reference decode failed: {0}")]
    Decode(String),
    #[error("bad input for the reference: {0}")]
    Input(String),
    #[error("reference capture failed: {0}")]
    Capture(String),
    #[error("reference crashed ({signal}); last node reached: {last_node}; its stderr ended with: {stderr_tail}")]
    Crashed {
        signal: String,
        last_node: String,
        stderr_tail: String,
    },
    #[error("reference worker: {0}")]
    Worker(String),
    /// A C++ exception, caught at the shim (`ffi/guard.h`): its type, what()
    /// and the call, and a cause where one is recognised.
    #[error("{0}")]
    Threw(String),
}

/// How the reference was built and how it runs: goes into every receipt.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BuildInfo {
    pub source: String,
    pub source_sha256: String,
    pub patches: Vec<String>,
    pub compiler: String,
    pub cmake_flags: String,
    pub march: String,
    pub cpu_features: Vec<String>,
    pub i2s_kernel: String,
    pub threads: usize,
}

impl BuildInfo {
    pub fn current(threads: usize) -> BuildInfo {
        let split = |s: &str| {
            s.split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect()
        };
        BuildInfo {
            source: env!("DIVERGENCE_REF_ORIGIN").to_owned(),
            source_sha256: env!("DIVERGENCE_REF_SHA256").to_owned(),
            patches: split(env!("DIVERGENCE_REF_PATCHES")),
            compiler: env!("DIVERGENCE_REF_COMPILER").to_owned(),
            cmake_flags: env!("DIVERGENCE_REF_CMAKE_FLAGS").to_owned(),
            march: env!("DIVERGENCE_REF_MARCH").to_owned(),
            cpu_features: cpu_features(),
            i2s_kernel: if kernels::available() {
                "ggml_vec_dot_i2_i8_s (AVX2)".into()
            } else {
                "none".into()
            },
            threads,
        }
    }
}

/// The SIMD features of this CPU that matter to either engine.
pub fn cpu_features() -> Vec<String> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) { out.push($f.to_string()); }
            )*};
        }
        probe!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avx512vbmi"
        );
    }
    out
}
