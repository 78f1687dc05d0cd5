//! Everything that can be wrong with a GGUF file, each with enough context
//! (field, key or tensor name, byte offset, expected vs found) to act on.

use std::path::PathBuf;

/// Why a GGUF file could not be opened, validated or queried.
///
/// Offsets are absolute byte offsets into the file unless a variant says
/// otherwise (tensor data offsets are relative to the data section).
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, stat'ed or mapped (or the path is a directory).
    #[error("cannot read {path}")]
    Io {
        /// The path that was being opened.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The file does not start with the four bytes `GGUF`.
    #[error("not a GGUF file: magic at offset 0 is {found:02x?}, expected \"GGUF\"")]
    BadMagic {
        /// The first (up to four) bytes of the file.
        found: Vec<u8>,
    },

    /// The header's version is neither 2 nor 3.
    #[error("unsupported GGUF version {found} at offset 4 (supported: 2, 3)")]
    UnsupportedVersion {
        /// The version read from the header.
        found: u32,
    },

    /// The file ends before a field, or the padding before the data section, is complete.
    #[error("file truncated reading {what} at offset {offset}: need {needed} bytes, file has {file_size}")]
    Truncated {
        /// What was being read, e.g. `value of metadata key "general.name"`.
        what: String,
        /// Where the read started.
        offset: u64,
        /// How many bytes the read needed from `offset`.
        needed: u64,
        /// The size of the whole file in bytes.
        file_size: u64,
    },

    /// A count (KVs, tensors, array elements) is larger than the rest of the
    /// file could hold even at the smallest encoding per item.
    #[error(
        "{what} at offset {offset} is {count}, but the rest of the file can hold at most {max}"
    )]
    CountTooLarge {
        /// Which count, e.g. `tensor count`.
        what: String,
        /// Where the count is stored.
        offset: u64,
        /// The count read from the file.
        count: u64,
        /// The most items the bytes after the count could hold.
        max: u64,
    },

    /// A key, tensor name or string value is not valid UTF-8.
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which string, e.g. `name of tensor #3`.
        what: String,
        /// Where the string's bytes start (after its length).
        offset: u64,
    },

    /// A metadata value, or an array's element type, has a type id outside 0..=12.
    #[error(
        "metadata key {key:?} at offset {offset}: unknown value type id {id} (expected 0..=12)"
    )]
    UnknownValueType {
        /// The key whose value could not be typed.
        key: String,
        /// Where the type id is stored.
        offset: u64,
        /// The type id read.
        id: u32,
    },

    /// A bool value or array element is a byte other than 0 or 1.
    #[error("metadata key {key:?} at offset {offset}: bool byte is {found}, expected 0 or 1")]
    InvalidBool {
        /// The key holding the bool.
        key: String,
        /// Where the offending byte is.
        offset: u64,
        /// The byte read.
        found: u8,
    },

    /// A metadata value nests arrays of arrays deeper than the reader allows.
    #[error("metadata key {key:?} at offset {offset}: arrays nested deeper than {max}")]
    NestingTooDeep {
        /// The key holding the nested array.
        key: String,
        /// Where the array that is one level too deep starts.
        offset: u64,
        /// The deepest nesting accepted.
        max: usize,
    },

    /// The same metadata key occurs more than once.
    #[error("metadata key {key:?} at offset {offset} appears twice")]
    DuplicateKey {
        /// The repeated key.
        key: String,
        /// Where the second occurrence starts.
        offset: u64,
    },

    /// A required metadata key is absent.
    #[error("metadata key {key:?} missing")]
    MissingKey {
        /// The key that was looked up.
        key: String,
    },

    /// A metadata key holds a value of another type than the one asked for.
    #[error("metadata key {key:?}: expected {expected}, found {found}")]
    WrongType {
        /// The key that was looked up.
        key: String,
        /// The type asked for, e.g. `an integer` or `array<string>`.
        expected: &'static str,
        /// The type the file holds, e.g. `array<i32>`.
        found: String,
    },

    /// A metadata integer (or array element) does not fit the integer type asked for.
    #[error("metadata key {key:?}: value {found} does not fit {expected}")]
    OutOfRange {
        /// The key that was looked up.
        key: String,
        /// The target type, e.g. `u32`.
        expected: &'static str,
        /// The value that does not fit, in decimal.
        found: String,
    },

    /// `general.alignment` is zero or not a power of two.
    #[error("general.alignment is {found}, expected a nonzero power of two")]
    BadAlignment {
        /// The alignment the file declares.
        found: u64,
    },

    /// A tensor declares more than [`MAX_DIMS`](super::MAX_DIMS) dimensions.
    #[error("tensor {tensor:?} at offset {offset}: {n_dims} dimensions, at most {max} allowed")]
    TooManyDims {
        /// The tensor's name.
        tensor: String,
        /// Where its `n_dims` field is stored.
        offset: u64,
        /// The dimension count read.
        n_dims: u32,
        /// The most dimensions allowed.
        max: usize,
    },

    /// A tensor's dimensions multiply to more elements than an `i64` can count.
    #[error("tensor {tensor:?} at offset {offset}: dims {dims:?} overflow the element count")]
    DimsOverflow {
        /// The tensor's name.
        tensor: String,
        /// Where its `n_dims` field is stored.
        offset: u64,
        /// The dimensions read, `ne0` first.
        dims: Vec<u64>,
    },

    /// A tensor's type id is not one of the [`GgmlType`](super::GgmlType)s
    /// this crate supports.
    #[error("tensor {tensor:?} at offset {offset}: unknown tensor type id {id} (supported: f32=0, f16=1, q8_0=8, i8=24, i2_s=36)")]
    UnknownTensorType {
        /// The tensor's name.
        tensor: String,
        /// Where its type id is stored.
        offset: u64,
        /// The type id read.
        id: u32,
    },

    /// A tensor's element count is not a whole number of its type's blocks
    /// (or its byte size overflows).
    #[error(
        "tensor {tensor:?}: {n_elements} elements is not a multiple of the {ty} block size {block}"
    )]
    BadBlockCount {
        /// The tensor's name.
        tensor: String,
        /// The tensor type's name, e.g. `i2_s`.
        ty: &'static str,
        /// The element count (product of the dims).
        n_elements: u64,
        /// The type's block size in elements.
        block: u64,
    },

    /// Two tensors share a name.
    #[error("tensor {tensor:?} at offset {offset} appears twice")]
    DuplicateTensor {
        /// The repeated name.
        tensor: String,
        /// Where the second tensor info starts.
        offset: u64,
    },

    /// A tensor's data offset is not a multiple of the file's alignment.
    #[error(
        "tensor {tensor:?}: data offset {offset} is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        /// The tensor's name.
        tensor: String,
        /// Its data offset, relative to the data section.
        offset: u64,
        /// The file's alignment in bytes.
        alignment: u64,
    },

    /// A tensor's bytes extend past the end of the file.
    #[error("tensor {tensor:?}: bytes {offset}..{end} (relative to the data section at {data_offset}) run past the end of the data section ({data_size} bytes)")]
    TensorOutOfBounds {
        /// The tensor's name.
        tensor: String,
        /// Where its data starts, relative to the data section.
        offset: u64,
        /// Where its data ends (exclusive), relative to the data section;
        /// `u64::MAX` if that overflows.
        end: u64,
        /// Absolute offset of the data section.
        data_offset: u64,
        /// Bytes from the data section to the end of the file.
        data_size: u64,
    },

    /// Two tensors' byte ranges overlap. Ranges are relative to the data section.
    #[error("tensor {tensor:?} (bytes {offset}..{end}) overlaps tensor {other:?} (bytes {other_offset}..{other_end})")]
    TensorOverlap {
        /// The tensor that starts inside the other one.
        tensor: String,
        /// Where its data starts.
        offset: u64,
        /// Where its data ends (exclusive).
        end: u64,
        /// The tensor it overlaps, which starts at or before `offset`.
        other: String,
        /// Where the other tensor's data starts.
        other_offset: u64,
        /// Where the other tensor's data ends (exclusive).
        other_end: u64,
    },
}
