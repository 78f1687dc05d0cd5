//! Tensor element types and the tensor table entry.

use std::fmt;

/// A ggml tensor type that this crate knows the byte size of.
///
/// Only the types BitNet models and our tests use are listed; any other type
/// id in a file is a validation error, because without its block layout we
/// could not check that the tensor fits in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// IEEE 754 single precision, 4 bytes an element.
    F32,
    /// IEEE 754 half precision, 2 bytes an element.
    F16,
    /// 8-bit blocks of 32 values with one f16 scale: 34 bytes a block.
    Q8_0,
    /// Signed 8-bit integers, 1 byte an element.
    I8,
    /// BitNet's ternary type: 2-bit codes in 128-value blocks, then one f32
    /// scale for the whole tensor, padded to 32 bytes (see `quant::i2s`).
    I2S,
}

impl GgmlType {
    /// Every supported type, in id order.
    pub const ALL: [GgmlType; 5] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::I8,
        GgmlType::I2S,
    ];

    /// The type for a GGUF type id, if supported.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        match id {
            0 => Some(GgmlType::F32),
            1 => Some(GgmlType::F16),
            8 => Some(GgmlType::Q8_0),
            24 => Some(GgmlType::I8),
            36 => Some(GgmlType::I2S),
            _ => None,
        }
    }

    /// The GGUF type id (`ggml_type` in bitnet.cpp's ggml).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            GgmlType::I8 => 24,
            GgmlType::I2S => 36,
        }
    }

    /// The name ggml prints for the type.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::I8 => "i8",
            GgmlType::I2S => "i2_s",
        }
    }

    /// Elements per block: a tensor's element count must be a multiple of it.
    ///
    /// ggml itself gives I2_S a block size of 1, but the packing works on
    /// 128-value blocks of the flattened tensor, so a count that is not a
    /// multiple of 128 cannot be stored.
    pub fn block_size(self) -> u64 {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::I8 => 1,
            GgmlType::Q8_0 => 32,
            GgmlType::I2S => 128,
        }
    }

    /// Bytes a tensor of `n_elements` occupies, or `None` when the count does
    /// not fit the block size or the size overflows.
    ///
    /// I2_S mirrors `ggml_nbytes` in bitnet.cpp: `n/4` bytes of codes plus 32
    /// bytes holding the f32 scale and padding.
    pub fn tensor_bytes(self, n_elements: u64) -> Option<u64> {
        if !n_elements.is_multiple_of(self.block_size()) {
            return None;
        }
        match self {
            GgmlType::F32 => n_elements.checked_mul(4),
            GgmlType::F16 => n_elements.checked_mul(2),
            GgmlType::I8 => Some(n_elements),
            GgmlType::Q8_0 => (n_elements / 32).checked_mul(34),
            GgmlType::I2S => Some(n_elements / 4 + 32),
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions, `ne0` (the row length) first, as GGUF stores them.
    pub dims: Vec<u64>,
    /// Element type, which fixes the byte layout.
    pub ty: GgmlType,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
    /// Bytes the tensor occupies, from [`GgmlType::tensor_bytes`].
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements (product of the dims; 1 for a scalar).
    ///
    /// Validated tensors never overflow; this saturates rather than panics
    /// for hand-built infos.
    pub fn n_elements(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX)
    }
}
