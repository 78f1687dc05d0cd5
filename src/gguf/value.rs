//! Typed metadata values.
//!
//! Equality is *bitwise* for floats: a value read back from a file equals the
//! value written, NaN payloads and signed zeros included. That is the notion
//! of "same metadata" a file-format round trip needs; numeric comparison is
//! the caller's business.

use std::fmt;

/// A GGUF metadata value type id (`gguf_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// Unsigned 8-bit integer (`GGUF_TYPE_UINT8`).
    U8 = 0,
    /// Signed 8-bit integer (`GGUF_TYPE_INT8`).
    I8 = 1,
    /// Unsigned 16-bit integer (`GGUF_TYPE_UINT16`).
    U16 = 2,
    /// Signed 16-bit integer (`GGUF_TYPE_INT16`).
    I16 = 3,
    /// Unsigned 32-bit integer (`GGUF_TYPE_UINT32`).
    U32 = 4,
    /// Signed 32-bit integer (`GGUF_TYPE_INT32`).
    I32 = 5,
    /// IEEE 754 single-precision float (`GGUF_TYPE_FLOAT32`).
    F32 = 6,
    /// One byte, 0 or 1 (`GGUF_TYPE_BOOL`).
    Bool = 7,
    /// UTF-8 string: a u64 byte length, then the bytes (`GGUF_TYPE_STRING`).
    String = 8,
    /// Array: a u32 element type id, a u64 count, then the elements (`GGUF_TYPE_ARRAY`).
    Array = 9,
    /// Unsigned 64-bit integer (`GGUF_TYPE_UINT64`).
    U64 = 10,
    /// Signed 64-bit integer (`GGUF_TYPE_INT64`).
    I64 = 11,
    /// IEEE 754 double-precision float (`GGUF_TYPE_FLOAT64`).
    F64 = 12,
}

impl ValueType {
    /// The type for a GGUF value type id, if it is one (0..=12).
    pub fn from_id(id: u32) -> Option<ValueType> {
        Some(match id {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// The GGUF value type id.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Lower-case name for messages, e.g. `u32` or `string`.
    pub fn name(self) -> &'static str {
        match self {
            ValueType::U8 => "u8",
            ValueType::I8 => "i8",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::Bool => "bool",
            ValueType::String => "string",
            ValueType::Array => "array",
            ValueType::U64 => "u64",
            ValueType::I64 => "i64",
            ValueType::F64 => "f64",
        }
    }

    /// The fewest bytes one value of this type occupies in a file: used to
    /// reject counts that the rest of the file could not possibly hold.
    pub(crate) fn min_encoded_len(self) -> u64 {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 => 8,
            ValueType::String => 8,
            ValueType::Array => 12,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value.
#[derive(Clone, Debug)]
pub enum MetaValue {
    /// A `u8` value.
    U8(u8),
    /// An `i8` value.
    I8(i8),
    /// A `u16` value.
    U16(u16),
    /// An `i16` value.
    I16(i16),
    /// A `u32` value.
    U32(u32),
    /// An `i32` value.
    I32(i32),
    /// An `f32` value, compared bitwise.
    F32(f32),
    /// A `bool` value.
    Bool(bool),
    /// A UTF-8 string value.
    String(String),
    /// An array value.
    Array(MetaArray),
    /// A `u64` value.
    U64(u64),
    /// An `i64` value.
    I64(i64),
    /// An `f64` value, compared bitwise.
    F64(f64),
}

/// A homogeneous array: one typed vector per element type. Arrays of arrays
/// are allowed by the format (each inner array carries its own element type).
#[derive(Clone, Debug)]
pub enum MetaArray {
    /// `u8` elements.
    U8(Vec<u8>),
    /// `i8` elements.
    I8(Vec<i8>),
    /// `u16` elements.
    U16(Vec<u16>),
    /// `i16` elements.
    I16(Vec<i16>),
    /// `u32` elements.
    U32(Vec<u32>),
    /// `i32` elements.
    I32(Vec<i32>),
    /// `f32` elements, compared bitwise.
    F32(Vec<f32>),
    /// `bool` elements.
    Bool(Vec<bool>),
    /// String elements.
    String(Vec<String>),
    /// Inner arrays, each with its own element type and length.
    Array(Vec<MetaArray>),
    /// `u64` elements.
    U64(Vec<u64>),
    /// `i64` elements.
    I64(Vec<i64>),
    /// `f64` elements, compared bitwise.
    F64(Vec<f64>),
}

impl MetaValue {
    /// The type id this value is stored with.
    pub fn value_type(&self) -> ValueType {
        match self {
            MetaValue::U8(_) => ValueType::U8,
            MetaValue::I8(_) => ValueType::I8,
            MetaValue::U16(_) => ValueType::U16,
            MetaValue::I16(_) => ValueType::I16,
            MetaValue::U32(_) => ValueType::U32,
            MetaValue::I32(_) => ValueType::I32,
            MetaValue::F32(_) => ValueType::F32,
            MetaValue::Bool(_) => ValueType::Bool,
            MetaValue::String(_) => ValueType::String,
            MetaValue::Array(_) => ValueType::Array,
            MetaValue::U64(_) => ValueType::U64,
            MetaValue::I64(_) => ValueType::I64,
            MetaValue::F64(_) => ValueType::F64,
        }
    }

    /// A short type description for error messages, e.g. `array<string>`.
    pub fn type_description(&self) -> String {
        match self {
            MetaValue::Array(a) => a.type_description(),
            other => other.value_type().name().to_string(),
        }
    }

    /// The value as a signed 128-bit integer, if it is an integer type.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }
}

impl MetaArray {
    /// The element type (for an array of arrays, [`ValueType::Array`]).
    pub fn elem_type(&self) -> ValueType {
        match self {
            MetaArray::U8(_) => ValueType::U8,
            MetaArray::I8(_) => ValueType::I8,
            MetaArray::U16(_) => ValueType::U16,
            MetaArray::I16(_) => ValueType::I16,
            MetaArray::U32(_) => ValueType::U32,
            MetaArray::I32(_) => ValueType::I32,
            MetaArray::F32(_) => ValueType::F32,
            MetaArray::Bool(_) => ValueType::Bool,
            MetaArray::String(_) => ValueType::String,
            MetaArray::Array(_) => ValueType::Array,
            MetaArray::U64(_) => ValueType::U64,
            MetaArray::I64(_) => ValueType::I64,
            MetaArray::F64(_) => ValueType::F64,
        }
    }

    /// Number of elements (for an array of arrays, of inner arrays).
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `array<elem>`, for error messages and `inspect`.
    pub fn type_description(&self) -> String {
        format!("array<{}>", self.elem_type())
    }

    /// The element at `i` as a scalar value (a nested array is cloned).
    pub fn get(&self, i: usize) -> Option<MetaValue> {
        Some(match self {
            MetaArray::U8(v) => MetaValue::U8(*v.get(i)?),
            MetaArray::I8(v) => MetaValue::I8(*v.get(i)?),
            MetaArray::U16(v) => MetaValue::U16(*v.get(i)?),
            MetaArray::I16(v) => MetaValue::I16(*v.get(i)?),
            MetaArray::U32(v) => MetaValue::U32(*v.get(i)?),
            MetaArray::I32(v) => MetaValue::I32(*v.get(i)?),
            MetaArray::F32(v) => MetaValue::F32(*v.get(i)?),
            MetaArray::Bool(v) => MetaValue::Bool(*v.get(i)?),
            MetaArray::String(v) => MetaValue::String(v.get(i)?.clone()),
            MetaArray::Array(v) => MetaValue::Array(v.get(i)?.clone()),
            MetaArray::U64(v) => MetaValue::U64(*v.get(i)?),
            MetaArray::I64(v) => MetaValue::I64(*v.get(i)?),
            MetaArray::F64(v) => MetaValue::F64(*v.get(i)?),
        })
    }
}

fn f32_bits_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn f64_bits_eq(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

impl PartialEq for MetaValue {
    fn eq(&self, other: &Self) -> bool {
        use MetaValue as V;
        match (self, other) {
            (V::U8(a), V::U8(b)) => a == b,
            (V::I8(a), V::I8(b)) => a == b,
            (V::U16(a), V::U16(b)) => a == b,
            (V::I16(a), V::I16(b)) => a == b,
            (V::U32(a), V::U32(b)) => a == b,
            (V::I32(a), V::I32(b)) => a == b,
            (V::F32(a), V::F32(b)) => a.to_bits() == b.to_bits(),
            (V::Bool(a), V::Bool(b)) => a == b,
            (V::String(a), V::String(b)) => a == b,
            (V::Array(a), V::Array(b)) => a == b,
            (V::U64(a), V::U64(b)) => a == b,
            (V::I64(a), V::I64(b)) => a == b,
            (V::F64(a), V::F64(b)) => a.to_bits() == b.to_bits(),
            _ => false,
        }
    }
}

impl Eq for MetaValue {}

impl PartialEq for MetaArray {
    fn eq(&self, other: &Self) -> bool {
        use MetaArray as A;
        match (self, other) {
            (A::U8(a), A::U8(b)) => a == b,
            (A::I8(a), A::I8(b)) => a == b,
            (A::U16(a), A::U16(b)) => a == b,
            (A::I16(a), A::I16(b)) => a == b,
            (A::U32(a), A::U32(b)) => a == b,
            (A::I32(a), A::I32(b)) => a == b,
            (A::F32(a), A::F32(b)) => f32_bits_eq(a, b),
            (A::Bool(a), A::Bool(b)) => a == b,
            (A::String(a), A::String(b)) => a == b,
            (A::Array(a), A::Array(b)) => a == b,
            (A::U64(a), A::U64(b)) => a == b,
            (A::I64(a), A::I64(b)) => a == b,
            (A::F64(a), A::F64(b)) => f64_bits_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for MetaArray {}

impl fmt::Display for MetaValue {
    /// Scalars as themselves, strings quoted, arrays summarized as
    /// `array<type>[len] [first, few, ...]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::U8(v) => write!(f, "{v}"),
            MetaValue::I8(v) => write!(f, "{v}"),
            MetaValue::U16(v) => write!(f, "{v}"),
            MetaValue::I16(v) => write!(f, "{v}"),
            MetaValue::U32(v) => write!(f, "{v}"),
            MetaValue::I32(v) => write!(f, "{v}"),
            MetaValue::F32(v) => write!(f, "{v:?}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            MetaValue::String(v) => write!(f, "{v:?}"),
            MetaValue::Array(a) => write!(f, "{a}"),
            MetaValue::U64(v) => write!(f, "{v}"),
            MetaValue::I64(v) => write!(f, "{v}"),
            MetaValue::F64(v) => write!(f, "{v:?}"),
        }
    }
}

impl fmt::Display for MetaArray {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 5;
        write!(f, "{}[{}] [", self.type_description(), self.len())?;
        let shown = self.len().min(SHOWN);
        for i in 0..shown {
            if i > 0 {
                f.write_str(", ")?;
            }
            if let Some(v) = self.get(i) {
                write!(f, "{v}")?;
            }
        }
        if self.len() > shown {
            f.write_str(", ...")?;
        }
        f.write_str("]")
    }
}
