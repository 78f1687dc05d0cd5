//! Everything that can be wrong with a GGUF file, each with enough context
//! (field, key or tensor name, byte offset, expected vs found) to act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("not a GGUF file: magic at offset 0 is {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: Vec<u8> },

    #[error("unsupported GGUF version {found} at offset 4 (supported: 2, 3)")]
    UnsupportedVersion { found: u32 },

    #[error("file truncated reading {what} at offset {offset}: need {needed} bytes, file has {file_size}")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        file_size: u64,
    },

    #[error(
        "{what} at offset {offset} is {count}, but the rest of the file can hold at most {max}"
    )]
    CountTooLarge {
        what: String,
        offset: u64,
        count: u64,
        max: u64,
    },

    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },

    #[error(
        "metadata key {key:?} at offset {offset}: unknown value type id {id} (expected 0..=12)"
    )]
    UnknownValueType { key: String, offset: u64, id: u32 },

    #[error("metadata key {key:?} at offset {offset}: bool byte is {found}, expected 0 or 1")]
    InvalidBool { key: String, offset: u64, found: u8 },

    #[error("metadata key {key:?} at offset {offset}: arrays nested deeper than {max}")]
    NestingTooDeep {
        key: String,
        offset: u64,
        max: usize,
    },

    #[error("metadata key {key:?} at offset {offset} appears twice")]
    DuplicateKey { key: String, offset: u64 },

    #[error("metadata key {key:?} missing")]
    MissingKey { key: String },

    #[error("metadata key {key:?}: expected {expected}, found {found}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },

    #[error("metadata key {key:?}: value {found} does not fit {expected}")]
    OutOfRange {
        key: String,
        expected: &'static str,
        found: String,
    },

    #[error("general.alignment is {found}, expected a nonzero power of two")]
    BadAlignment { found: u64 },

    #[error("tensor {tensor:?} at offset {offset}: {n_dims} dimensions, at most {max} allowed")]
    TooManyDims {
        tensor: String,
        offset: u64,
        n_dims: u32,
        max: usize,
    },

    #[error("tensor {tensor:?} at offset {offset}: dims {dims:?} overflow the element count")]
    DimsOverflow {
        tensor: String,
        offset: u64,
        dims: Vec<u64>,
    },

    #[error("tensor {tensor:?} at offset {offset}: unknown tensor type id {id} (supported: f32=0, f16=1, q8_0=8, i8=24, i2_s=36)")]
    UnknownTensorType {
        tensor: String,
        offset: u64,
        id: u32,
    },

    #[error(
        "tensor {tensor:?}: {n_elements} elements is not a multiple of the {ty} block size {block}"
    )]
    BadBlockCount {
        tensor: String,
        ty: &'static str,
        n_elements: u64,
        block: u64,
    },

    #[error("tensor {tensor:?} at offset {offset} appears twice")]
    DuplicateTensor { tensor: String, offset: u64 },

    #[error(
        "tensor {tensor:?}: data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },

    #[error("tensor {tensor:?}: bytes {offset}..{end} (relative to the data section at {data_offset}) run past the end of the data section ({data_size} bytes)")]
    TensorOutOfBounds {
        tensor: String,
        offset: u64,
        end: u64,
        data_offset: u64,
        data_size: u64,
    },

    #[error("tensor {tensor:?} (bytes {offset}..{end}) overlaps tensor {other:?} (bytes {other_offset}..{other_end})")]
    TensorOverlap {
        tensor: String,
        offset: u64,
        end: u64,
        other: String,
        other_offset: u64,
        other_end: u64,
    },
}
