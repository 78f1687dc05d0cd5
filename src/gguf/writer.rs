//! Writing GGUF v3 files.
//!
//! The output matches what `gguf-py` writes: KVs in insertion order, tensor
//! infos in insertion order, the data section aligned, every tensor's data at
//! an aligned offset and zero-padded to the alignment (the last one included).

use super::{GgmlType, MetaArray, MetaValue, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC};
use std::io::{self, Write};
use std::path::Path;

/// The version this writer emits.
const VERSION: u32 = 3;

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

/// Builds a GGUF file in memory and writes it out.
pub struct GgufWriter {
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter::new()
    }
}

impl GgufWriter {
    /// An empty file: no metadata, no tensors, the default alignment.
    pub fn new() -> Self {
        GgufWriter {
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Sets a key; an existing key keeps its position and gets the new value.
    ///
    /// Setting `general.alignment` to a `U32` power of two also changes the
    /// alignment the writer uses.
    pub fn set(&mut self, key: &str, v: MetaValue) {
        if key == ALIGNMENT_KEY {
            if let MetaValue::U32(a) = v {
                if a.is_power_of_two() {
                    self.alignment = u64::from(a);
                }
            }
        }
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some((_, slot)) => *slot = v,
            None => self.metadata.push((key.to_string(), v)),
        }
    }

    /// Sets the alignment and records it as `general.alignment`.
    ///
    /// # Panics
    /// If `alignment` is not a power of two that fits in u32.
    pub fn set_alignment(&mut self, alignment: u64) {
        let a = u32::try_from(alignment)
            .ok()
            .filter(|a| a.is_power_of_two())
            .unwrap_or_else(|| {
                panic!("GGUF alignment must be a power of two below 2^32, got {alignment}")
            });
        self.set(ALIGNMENT_KEY, MetaValue::U32(a));
    }

    /// Builder form of [`GgufWriter::set_alignment`].
    pub fn alignment(mut self, alignment: u64) -> Self {
        self.set_alignment(alignment);
        self
    }

    /// The key-value pairs set so far, in the order they will be written.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// Adds a tensor; `dims` lists `ne0` first.
    ///
    /// # Panics
    /// If `data` is not exactly `ty.tensor_bytes(n_elements)` bytes: a writer
    /// must not be able to produce a file its own reader rejects.
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) {
        let n_elements = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        let expected = n_elements.and_then(|n| ty.tensor_bytes(n));
        assert_eq!(
            expected,
            Some(data.len() as u64),
            "tensor {name:?}: {ty} dims {dims:?} need {expected:?} bytes, got {}",
            data.len()
        );
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            data,
        });
    }

    /// Everything before the data section, including the padding to it.
    fn header(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            out.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (t.data.len() as u64).next_multiple_of(self.alignment);
        }
        let padded = (out.len() as u64).next_multiple_of(self.alignment) as usize;
        out.resize(padded, 0);
        out
    }

    /// Streams the whole file into `w`.
    fn write_into(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.header())?;
        let zeros = vec![0u8; self.alignment as usize];
        for t in &self.tensors {
            w.write_all(&t.data)?;
            let pad =
                (t.data.len() as u64).next_multiple_of(self.alignment) as usize - t.data.len();
            w.write_all(&zeros[..pad])?;
        }
        Ok(())
    }

    /// The whole file, in memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = self.write_into(&mut out);
        out
    }

    /// [`GgufWriter::write_to`], keeping the file only when its bytes hash
    /// to `sha256` (hex): a mismatch leaves `path` as it was and no
    /// temporary file.
    pub fn write_to_verified(&self, path: &Path, sha256: &str) -> io::Result<()> {
        use sha2::{Digest, Sha256};
        /// Hashes what passes through it.
        struct Hashing<W> {
            inner: W,
            hash: Sha256,
        }
        impl<W: Write> Write for Hashing<W> {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                let n = self.inner.write(buf)?;
                self.hash.update(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                self.inner.flush()
            }
        }
        let dest = crate::outfile::Destination::of(path, "tmp")?;
        let result = (|| {
            let mut w = Hashing {
                inner: io::BufWriter::with_capacity(1 << 22, dest.create()?),
                hash: Sha256::new(),
            };
            self.write_into(&mut w)?;
            let got: String = w
                .hash
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if got != sha256 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the bytes made have sha256 {got}, not the {sha256} expected"),
                ));
            }
            dest.commit(
                w.inner
                    .into_inner()
                    .map_err(io::IntoInnerError::into_error)?,
            )
        })();
        if result.is_err() {
            dest.abandon();
        }
        result
    }

    /// Writes the file atomically: a temporary file in the same directory,
    /// fsync, then rename over `path`. A reader never sees half a model.
    /// (`/dev/null` or a FIFO is written in place, see `crate::outfile`.)
    pub fn write_to(&self, path: &Path) -> io::Result<()> {
        let dest = crate::outfile::Destination::of(path, "tmp")?;
        let result = (|| {
            let mut w = io::BufWriter::with_capacity(1 << 22, dest.create()?);
            self.write_into(&mut w)?;
            dest.commit(w.into_inner().map_err(io::IntoInnerError::into_error)?)
        })();
        if result.is_err() {
            dest.abandon();
        }
        result
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(a) => put_array(out, a),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, a: &MetaArray) {
    out.extend_from_slice(&a.elem_type().id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! each {
        ($xs:expr) => {
            for x in $xs {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        MetaArray::U8(xs) => out.extend_from_slice(xs),
        MetaArray::I8(xs) => each!(xs),
        MetaArray::U16(xs) => each!(xs),
        MetaArray::I16(xs) => each!(xs),
        MetaArray::U32(xs) => each!(xs),
        MetaArray::I32(xs) => each!(xs),
        MetaArray::F32(xs) => each!(xs),
        MetaArray::Bool(xs) => out.extend(xs.iter().map(|&b| u8::from(b))),
        MetaArray::String(xs) => xs.iter().for_each(|s| put_str(out, s)),
        MetaArray::Array(xs) => xs.iter().for_each(|inner| put_array(out, inner)),
        MetaArray::U64(xs) => each!(xs),
        MetaArray::I64(xs) => each!(xs),
        MetaArray::F64(xs) => each!(xs),
    }
}
