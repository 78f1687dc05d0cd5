//! Parsing and validation: from bytes to a [`GgufFile`] that is known good.

use super::{
    GgmlType, GgufError, MetaArray, MetaValue, TensorInfo, ValueType, ALIGNMENT_KEY,
    DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Arrays of arrays deeper than this are rejected: recursion depth must not
/// be chosen by the file.
const MAX_ARRAY_NESTING: usize = 16;
/// Least bytes one KV pair occupies: key length, value type, a 1-byte value.
const MIN_KV_LEN: u64 = 8 + 4 + 1;
/// Least bytes one tensor info occupies: name length, n_dims, type, offset.
const MIN_TENSOR_INFO_LEN: u64 = 8 + 4 + 4 + 8;
/// Vectors are never preallocated beyond this many elements on the word of
/// a count read from the file; larger arrays grow as they are actually read.
const MAX_PREALLOC: usize = 1 << 16;

/// Files smaller than this are mapped even by [`GgufFile::open_resident`]:
/// their page walks cost nothing worth a copy.
pub const RESIDENT_MIN_BYTES: u64 = 64 << 20;

/// The environment variable that can keep [`GgufFile::open_resident`] from
/// copying: `mapped` (or `resident`, the default).
pub const WEIGHTS_ENV: &str = "DIVERGENCE_WEIGHTS";

/// The bytes behind a [`GgufFile`].
enum Storage {
    /// A read-only mapping of the file.
    Mapped(memmap2::Mmap),
    /// A read-only copy of the file in anonymous memory, advised for huge pages.
    Resident(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) | Storage::Resident(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A validated GGUF file. Holds the mapping (or buffer) for its lifetime, so
/// tensor data views are plain borrowed slices.
pub struct GgufFile {
    storage: Storage,
    path: Option<PathBuf>,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, MetaValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("file_size", &self.file_size())
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and fully validates the file at `path`.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        GgufFile::open_with(path, false)
    }

    /// Like [`GgufFile::open`], but reads a large file into anonymous memory
    /// advised for transparent huge pages, for an engine that streams every
    /// weight once per token.
    ///
    /// A mapping of the file is backed by 4 KiB page-cache pages: streaming
    /// a 1.2 GB model walks some 300,000 of them per token, and the TLB
    /// misses cost about a fifth of the read bandwidth (a 265 MB ternary
    /// mat-vec on 2 threads: 12.4 ms mapped, 9.6 ms from huge pages). The copy
    /// costs one read of the file at load. It is skipped, and the file mapped
    /// as by [`GgufFile::open`], when the file is under [`RESIDENT_MIN_BYTES`]
    /// or over half the memory the system reports available (`MemAvailable`):
    /// a model must never be pushed into swap for speed. The bytes are the
    /// same either way; [`GgufFile::is_resident`] says which it was.
    /// [`WEIGHTS_ENV`]`=mapped` maps the file always (the page cache is
    /// then shared with the reference's own mapping of it).
    pub fn open_resident(path: &Path) -> Result<GgufFile, GgufError> {
        let resident = match std::env::var(WEIGHTS_ENV) {
            Ok(v) if v.trim() == "mapped" => false,
            Ok(v) if v.trim().is_empty() || v.trim() == "resident" => true,
            Err(_) => true,
            Ok(v) => {
                return Err(GgufError::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{WEIGHTS_ENV}={v:?} is neither \"resident\" nor \"mapped\""),
                    ),
                })
            }
        };
        GgufFile::open_with(path, resident)
    }

    /// Opens the file once; copies it into huge-page memory when asked
    /// (`resident`) and it is large enough and fits, else maps it.
    fn open_with(path: &Path, resident: bool) -> Result<GgufFile, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        // A FIFO would block in open(2), a device has nothing to map.
        let file = crate::input::open_regular(path, u64::MAX, "GGUF file").map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let copy =
            resident && len >= RESIDENT_MIN_BYTES && len <= available_memory().map_or(0, |a| a / 2);
        let storage = if copy {
            let mut anon = memmap2::MmapOptions::new()
                .len(len as usize)
                .map_anon()
                .map_err(io)?;
            // Advice only: a kernel without transparent huge pages keeps 4 KiB
            // pages, and the bytes are the same.
            #[cfg(target_os = "linux")]
            let _ = anon.advise(memmap2::Advice::HugePage);
            // `len` bytes exactly: a file that shrank since is an error, one
            // that grew is read as it was measured (and validated as such).
            read_parallel(&file, &mut anon[..]).map_err(io)?;
            Storage::Resident(anon.make_read_only().map_err(io)?)
        } else if len == 0 {
            // Mapping an empty file fails on some platforms; there is nothing to map.
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the mapping is read-only and lives as long as the GgufFile.
            // Another process truncating or rewriting the file while it is mapped
            // is outside what this tool can defend against (as for every
            // mmap-based model loader, bitnet.cpp's included); our own writer
            // replaces files by rename, which leaves existing mappings intact.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
            Storage::Mapped(map)
        };
        let mut parsed = GgufFile::parse(storage)?;
        parsed.path = Some(path.to_path_buf());
        Ok(parsed)
    }

    /// Whether [`GgufFile::open_resident`] copied the file into anonymous
    /// memory (rather than mapping it).
    pub fn is_resident(&self) -> bool {
        matches!(self.storage, Storage::Resident(_))
    }

    /// Validates an in-memory file (tests, fuzzing, files built in memory).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        GgufFile::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<GgufFile, GgufError> {
        let header = Header::parse(storage.bytes())?;
        let key_index = header
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            storage,
            path: None,
            version: header.version,
            alignment: header.alignment,
            data_offset: header.data_offset,
            metadata: header.metadata,
            key_index,
            tensors: header.tensors,
            tensor_index,
        })
    }

    /// The GGUF version from the header: 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The path the file was opened from; `None` for [`GgufFile::from_bytes`].
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Size of the whole file in bytes.
    pub fn file_size(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    /// Alignment of the data section and of every tensor's data, in bytes:
    /// `general.alignment`, or [`DEFAULT_ALIGNMENT`] when absent.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute byte offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// All key-value pairs, in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// The value of metadata key `key`, if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_string(),
        })
    }

    /// An integer of any GGUF integer type whose value fits in u32.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        let v = self.require(key)?;
        let n = v
            .as_integer()
            .ok_or_else(|| wrong_type(key, "an integer", v))?;
        u32::try_from(n).map_err(|_| GgufError::OutOfRange {
            key: key.to_string(),
            expected: "u32",
            found: n.to_string(),
        })
    }

    /// An integer of any GGUF integer type whose value fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        let n = v
            .as_integer()
            .ok_or_else(|| wrong_type(key, "an integer", v))?;
        u64::try_from(n).map_err(|_| GgufError::OutOfRange {
            key: key.to_string(),
            expected: "u64",
            found: n.to_string(),
        })
    }

    /// An `f32` value (no other float or integer type is converted).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        match self.require(key)? {
            MetaValue::F32(x) => Ok(*x),
            other => Err(wrong_type(key, "f32", other)),
        }
    }

    /// A `bool` value.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            MetaValue::Bool(b) => Ok(*b),
            other => Err(wrong_type(key, "bool", other)),
        }
    }

    /// A string value, borrowed from the file.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        match self.require(key)? {
            MetaValue::String(s) => Ok(s),
            other => Err(wrong_type(key, "string", other)),
        }
    }

    /// An `array<string>` value, borrowed from the file.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        match self.require(key)? {
            MetaValue::Array(MetaArray::String(v)) => Ok(v.iter().map(String::as_str).collect()),
            other => Err(wrong_type(key, "array<string>", other)),
        }
    }

    /// An `array<f32>` value, copied.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        match self.require(key)? {
            MetaValue::Array(MetaArray::F32(v)) => Ok(v.clone()),
            other => Err(wrong_type(key, "array<f32>", other)),
        }
    }

    /// An array of any integer type whose every element fits in i32.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        let v = self.require(key)?;
        let MetaValue::Array(a) = v else {
            return Err(wrong_type(key, "array<i32>", v));
        };
        fn narrow<T: Copy + Into<i128>>(key: &str, xs: &[T]) -> Result<Vec<i32>, GgufError> {
            xs.iter()
                .map(|&x| {
                    let wide: i128 = x.into();
                    i32::try_from(wide).map_err(|_| GgufError::OutOfRange {
                        key: key.to_string(),
                        expected: "i32",
                        found: wide.to_string(),
                    })
                })
                .collect()
        }
        match a {
            MetaArray::I32(xs) => Ok(xs.clone()),
            MetaArray::U8(xs) => narrow(key, xs),
            MetaArray::I8(xs) => narrow(key, xs),
            MetaArray::U16(xs) => narrow(key, xs),
            MetaArray::I16(xs) => narrow(key, xs),
            MetaArray::U32(xs) => narrow(key, xs),
            MetaArray::U64(xs) => narrow(key, xs),
            MetaArray::I64(xs) => narrow(key, xs),
            _ => Err(wrong_type(key, "array<i32>", v)),
        }
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor table entry named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// Zero-copy view of a tensor's bytes.
    ///
    /// For a `TensorInfo` of this file the range was validated at open. An
    /// info that does not belong to this file and does not fit it yields an
    /// empty slice rather than a panic.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let bytes = self.storage.bytes();
        let range = self
            .data_offset
            .checked_add(t.offset)
            .and_then(|start| Some((start, start.checked_add(t.n_bytes)?)))
            .and_then(|(s, e)| Some(usize::try_from(s).ok()?..usize::try_from(e).ok()?));
        range.and_then(|r| bytes.get(r)).unwrap_or(&[])
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
    GgufError::WrongType {
        key: key.to_string(),
        expected,
        found: found.type_description(),
    }
}

/// Everything before the data section, validated.
struct Header {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorInfo>,
}

impl Header {
    fn parse(bytes: &[u8]) -> Result<Header, GgufError> {
        let mut cur = Cursor { bytes, pos: 0 };
        let file_size = cur.len();

        if bytes.len() < 4 || bytes[..4] != MAGIC {
            return Err(GgufError::BadMagic {
                found: bytes.iter().take(4).copied().collect(),
            });
        }
        cur.pos = 4;
        let version = cur.u32(|| "version".into())?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion { found: version });
        }
        let tensor_count_at = cur.offset();
        let tensor_count = cur.u64(|| "tensor count".into())?;
        let kv_count_at = cur.offset();
        let kv_count = cur.u64(|| "metadata KV count".into())?;
        // Both counts describe data that follows; neither can exceed what is left.
        cur.check_count(kv_count, MIN_KV_LEN, kv_count_at, || {
            "metadata KV count".into()
        })?;
        cur.check_count(tensor_count, MIN_TENSOR_INFO_LEN, tensor_count_at, || {
            "tensor count".into()
        })?;

        let mut metadata: Vec<(String, MetaValue)> = Vec::with_capacity(prealloc(kv_count));
        let mut seen_keys: HashMap<String, ()> = HashMap::with_capacity(prealloc(kv_count));
        for i in 0..kv_count {
            let key_at = cur.offset();
            let key = cur.string(|| format!("key of metadata KV #{i}"))?;
            let type_at = cur.offset();
            let type_id = cur.u32(|| format!("value type of metadata key {key:?}"))?;
            let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
                key: key.clone(),
                offset: type_at,
                id: type_id,
            })?;
            let value = cur.value(&key, ty, 0)?;
            if seen_keys.insert(key.clone(), ()).is_some() {
                return Err(GgufError::DuplicateKey {
                    key,
                    offset: key_at,
                });
            }
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            None => DEFAULT_ALIGNMENT,
            Some((_, MetaValue::U32(a))) => {
                let a = u64::from(*a);
                if a == 0 || !a.is_power_of_two() {
                    return Err(GgufError::BadAlignment { found: a });
                }
                a
            }
            Some((_, other)) => return Err(wrong_type(ALIGNMENT_KEY, "u32", other)),
        };

        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(prealloc(tensor_count));
        let mut seen_tensors: HashMap<String, ()> = HashMap::with_capacity(prealloc(tensor_count));
        for i in 0..tensor_count {
            let info_at = cur.offset();
            let name = cur.string(|| format!("name of tensor #{i}"))?;
            let n_dims_at = cur.offset();
            let n_dims = cur.u32(|| format!("n_dims of tensor {name:?}"))?;
            if n_dims as usize > MAX_DIMS {
                return Err(GgufError::TooManyDims {
                    tensor: name,
                    offset: n_dims_at,
                    n_dims,
                    max: MAX_DIMS,
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(cur.u64(|| format!("dim {d} of tensor {name:?}"))?);
            }
            let type_at = cur.offset();
            let type_id = cur.u32(|| format!("type of tensor {name:?}"))?;
            let offset = cur.u64(|| format!("data offset of tensor {name:?}"))?;

            // ggml keeps element counts in int64_t.
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| GgufError::DimsOverflow {
                    tensor: name.clone(),
                    offset: n_dims_at,
                    dims: dims.clone(),
                })?;
            let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
                tensor: name.clone(),
                offset: type_at,
                id: type_id,
            })?;
            let n_bytes = ty
                .tensor_bytes(n_elements)
                .ok_or_else(|| GgufError::BadBlockCount {
                    tensor: name.clone(),
                    ty: ty.name(),
                    n_elements,
                    block: ty.block_size(),
                })?;
            if offset % alignment != 0 {
                return Err(GgufError::MisalignedTensor {
                    tensor: name,
                    offset,
                    alignment,
                });
            }
            if seen_tensors.insert(name.clone(), ()).is_some() {
                return Err(GgufError::DuplicateTensor {
                    tensor: name,
                    offset: info_at,
                });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_bytes,
            });
        }

        // The data section starts at the next multiple of the alignment.
        let infos_end = cur.offset();
        let data_offset = infos_end
            .checked_next_multiple_of(alignment)
            .ok_or(GgufError::BadAlignment { found: alignment })?;
        if !tensors.is_empty() && data_offset > file_size {
            return Err(GgufError::Truncated {
                what: "padding before the data section".into(),
                offset: infos_end,
                needed: data_offset - infos_end,
                file_size,
            });
        }
        let data_size = file_size.saturating_sub(data_offset);
        check_placement(&tensors, data_offset, data_size)?;

        Ok(Header {
            version,
            alignment,
            data_offset,
            metadata,
            tensors,
        })
    }
}

/// Every tensor inside the data section, and no two sharing a byte.
fn check_placement(
    tensors: &[TensorInfo],
    data_offset: u64,
    data_size: u64,
) -> Result<(), GgufError> {
    let end_of = |t: &TensorInfo| t.offset.checked_add(t.n_bytes);
    for t in tensors {
        match end_of(t) {
            Some(end) if end <= data_size => {}
            end => {
                return Err(GgufError::TensorOutOfBounds {
                    tensor: t.name.clone(),
                    offset: t.offset,
                    end: end.unwrap_or(u64::MAX),
                    data_offset,
                    data_size,
                })
            }
        }
    }
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        // Both ends were checked above, so these additions cannot overflow.
        let a_end = a.offset + a.n_bytes;
        if a_end > b.offset {
            return Err(GgufError::TensorOverlap {
                tensor: b.name.clone(),
                offset: b.offset,
                end: b.offset + b.n_bytes,
                other: a.name.clone(),
                other_offset: a.offset,
                other_end: a_end,
            });
        }
    }
    Ok(())
}

fn prealloc(count: u64) -> usize {
    usize::try_from(count)
        .unwrap_or(usize::MAX)
        .min(MAX_PREALLOC)
}

/// A bounds-checked little-endian reader. `what` closures build the error
/// context only when a read fails.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.offset(),
                needed: n,
                file_size: self.len(),
            });
        }
        // n <= remaining, which fits usize.
        let n = n as usize;
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Rejects a count of items, each at least `min_len` bytes, that the rest
    /// of the file cannot hold: hostile counts never reach an allocation.
    fn check_count(
        &self,
        count: u64,
        min_len: u64,
        at: u64,
        what: impl FnOnce() -> String,
    ) -> Result<(), GgufError> {
        let max = self.remaining() / min_len;
        if count > max {
            return Err(GgufError::CountTooLarge {
                what: what(),
                offset: at,
                count,
                max,
            });
        }
        Ok(())
    }

    fn string(&mut self, what: impl Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(|| format!("length of {}", what()))?;
        let at = self.offset();
        let raw = self.take(len, &what)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| GgufError::InvalidUtf8 {
                what: what(),
                offset: at,
            })
    }

    fn value(&mut self, key: &str, ty: ValueType, depth: usize) -> Result<MetaValue, GgufError> {
        let what = || format!("value of metadata key {key:?}");
        Ok(match ty {
            ValueType::U8 => MetaValue::U8(u8::from_le_bytes(self.array(what)?)),
            ValueType::I8 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            ValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            ValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            ValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => {
                let at = self.offset();
                let [b] = self.array(what)?;
                MetaValue::Bool(parse_bool(key, at, b)?)
            }
            ValueType::String => MetaValue::String(self.string(what)?),
            ValueType::Array => MetaValue::Array(self.meta_array(key, depth + 1)?),
        })
    }

    fn meta_array(&mut self, key: &str, depth: usize) -> Result<MetaArray, GgufError> {
        let at = self.offset();
        if depth > MAX_ARRAY_NESTING {
            return Err(GgufError::NestingTooDeep {
                key: key.to_string(),
                offset: at,
                max: MAX_ARRAY_NESTING,
            });
        }
        let type_id = self.u32(|| format!("array element type of metadata key {key:?}"))?;
        let ty = ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            key: key.to_string(),
            offset: at,
            id: type_id,
        })?;
        let count_at = self.offset();
        let count = self.u64(|| format!("array length of metadata key {key:?}"))?;
        self.check_count(count, ty.min_encoded_len(), count_at, || {
            format!("array length of metadata key {key:?}")
        })?;
        // check_count bounded count by the file size, so it fits usize.
        let n = count as usize;
        let what = || format!("array elements of metadata key {key:?}");
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                const W: usize = std::mem::size_of::<$t>();
                let raw = self.take((n * W) as u64, what)?;
                MetaArray::$variant(
                    raw.chunks_exact(W)
                        .map(|c| {
                            let mut a = [0u8; W];
                            a.copy_from_slice(c);
                            <$t>::from_le_bytes(a)
                        })
                        .collect(),
                )
            }};
        }
        Ok(match ty {
            ValueType::U8 => fixed!(U8, u8),
            ValueType::I8 => fixed!(I8, i8),
            ValueType::U16 => fixed!(U16, u16),
            ValueType::I16 => fixed!(I16, i16),
            ValueType::U32 => fixed!(U32, u32),
            ValueType::I32 => fixed!(I32, i32),
            ValueType::F32 => fixed!(F32, f32),
            ValueType::U64 => fixed!(U64, u64),
            ValueType::I64 => fixed!(I64, i64),
            ValueType::F64 => fixed!(F64, f64),
            ValueType::Bool => {
                let raw = self.take(n as u64, what)?;
                let mut out = Vec::with_capacity(n);
                for (i, &b) in raw.iter().enumerate() {
                    out.push(parse_bool(key, count_at + 8 + i as u64, b)?);
                }
                MetaArray::Bool(out)
            }
            ValueType::String => {
                let mut out = Vec::with_capacity(prealloc(count));
                for i in 0..n {
                    out.push(self.string(|| format!("string #{i} of metadata key {key:?}"))?);
                }
                MetaArray::String(out)
            }
            ValueType::Array => {
                let mut out = Vec::with_capacity(prealloc(count));
                for _ in 0..n {
                    out.push(self.meta_array(key, depth + 1)?);
                }
                MetaArray::Array(out)
            }
        })
    }
}

fn parse_bool(key: &str, offset: u64, b: u8) -> Result<bool, GgufError> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        found => Err(GgufError::InvalidBool {
            key: key.to_string(),
            offset,
            found,
        }),
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes; `None` where there is none.
fn available_memory() -> Option<u64> {
    crate::input::proc_kb_value(Path::new("/proc/meminfo"), "MemAvailable")
}

/// Fills `buf` from the start of `file`, a share per thread: first touches
/// of fresh memory (the kernel zeroing each huge page) are most of the time
/// of a copy from the page cache, and they run in parallel.
fn read_parallel(file: &std::fs::File, buf: &mut [u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let share = buf.len().div_ceil(threads).next_multiple_of(2 << 20);
    std::thread::scope(|s| {
        let readers: Vec<_> = buf
            .chunks_mut(share)
            .enumerate()
            .map(|(k, part)| s.spawn(move || file.read_exact_at(part, (k * share) as u64)))
            .collect();
        readers.into_iter().try_for_each(|r| {
            r.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a reader panicked")))
        })
    })
}
