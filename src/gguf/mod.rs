//! GGUF v3 (and v2) reading, validation and writing.
//!
//! Both engines read the same file, so this module is the one place that
//! decides whether a file is well formed. [`GgufFile::open`] memory-maps the
//! file and validates *everything* before handing it out: magic, version,
//! counts, string lengths, value and tensor type ids, dimensions, byte sizes
//! per type (including I2_S's `ne/4 + 32`), alignment and placement of every
//! tensor. After that, [`GgufFile::tensor_data`] is a plain zero-copy slice
//! that cannot fail. A hostile or truncated file produces a [`GgufError`] that
//! names the field, the byte offset and what was expected; it never panics and
//! never allocates more than the file itself could describe.
//!
//! [`GgufWriter`] produces files that this reader, the PyPI `gguf` package and
//! bitnet.cpp accept (tensor data aligned and padded as `gguf-py` does).
//!
//! Layout (v2/v3): magic `GGUF`, u32 version, u64 tensor count, u64 KV count,
//! the KVs, the tensor infos, padding to `general.alignment`, then the data.

mod error;
mod reader;
mod stats;
mod types;
mod value;
mod writer;

pub use error::GgufError;
pub use reader::{GgufFile, RESIDENT_MIN_BYTES, WEIGHTS_ENV};
pub use stats::{count_non_finite, tensor_stats, TensorStats};
pub use types::{GgmlType, TensorInfo};
pub use value::{MetaArray, MetaValue, ValueType};
pub use writer::GgufWriter;

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that sets the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// The most dimensions a ggml tensor can have.
pub const MAX_DIMS: usize = 4;
