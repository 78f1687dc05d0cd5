//! GGUF reading, writing and validation, and the I2_S layout.
//!
//! Round trips are property tests over every metadata value type and every
//! supported tensor type; every class of hostile file has a row in a table
//! that names the error it must produce; random corruption must never panic.

mod common;

use divergence::gguf::{GgmlType, GgufError, GgufFile, GgufWriter, MetaArray, MetaValue};
use divergence::quant::i2s;
use proptest::collection::vec;
use proptest::prelude::*;

// ---------------------------------------------------------------------------
// Strategies

fn f32_any() -> impl Strategy<Value = f32> {
    any::<u32>().prop_map(f32::from_bits)
}

fn f64_any() -> impl Strategy<Value = f64> {
    any::<u64>().prop_map(f64::from_bits)
}

fn leaf_array() -> impl Strategy<Value = MetaArray> {
    prop_oneof![
        vec(any::<u8>(), 0..6).prop_map(MetaArray::U8),
        vec(any::<i8>(), 0..6).prop_map(MetaArray::I8),
        vec(any::<u16>(), 0..6).prop_map(MetaArray::U16),
        vec(any::<i16>(), 0..6).prop_map(MetaArray::I16),
        vec(any::<u32>(), 0..6).prop_map(MetaArray::U32),
        vec(any::<i32>(), 0..6).prop_map(MetaArray::I32),
        vec(f32_any(), 0..6).prop_map(MetaArray::F32),
        vec(any::<bool>(), 0..6).prop_map(MetaArray::Bool),
        vec(any::<String>(), 0..4).prop_map(MetaArray::String),
        vec(any::<u64>(), 0..6).prop_map(MetaArray::U64),
        vec(any::<i64>(), 0..6).prop_map(MetaArray::I64),
        vec(f64_any(), 0..6).prop_map(MetaArray::F64),
    ]
}

fn array() -> impl Strategy<Value = MetaArray> {
    leaf_array().prop_recursive(3, 24, 4, |inner| {
        vec(inner, 0..4).prop_map(MetaArray::Array)
    })
}

fn value() -> impl Strategy<Value = MetaValue> {
    prop_oneof![
        any::<u8>().prop_map(MetaValue::U8),
        any::<i8>().prop_map(MetaValue::I8),
        any::<u16>().prop_map(MetaValue::U16),
        any::<i16>().prop_map(MetaValue::I16),
        any::<u32>().prop_map(MetaValue::U32),
        any::<i32>().prop_map(MetaValue::I32),
        f32_any().prop_map(MetaValue::F32),
        any::<bool>().prop_map(MetaValue::Bool),
        prop_oneof![Just(String::new()), any::<String>()].prop_map(MetaValue::String),
        array().prop_map(MetaValue::Array),
        any::<u64>().prop_map(MetaValue::U64),
        any::<i64>().prop_map(MetaValue::I64),
        f64_any().prop_map(MetaValue::F64),
    ]
}

/// A tensor of any supported type: dims with ne0 a multiple of the block size.
fn tensor() -> impl Strategy<Value = (Vec<u64>, GgmlType, Vec<u8>)> {
    (
        prop::sample::select(GgmlType::ALL.to_vec()),
        vec(1u64..4, 1..=4),
    )
        .prop_flat_map(|(ty, mut dims)| {
            dims[0] *= ty.block_size();
            let n: u64 = dims.iter().product();
            let bytes = ty.tensor_bytes(n).expect("block-sized dims") as usize;
            (Just(dims), Just(ty), vec(any::<u8>(), bytes))
        })
}

type Model = (
    u64,
    Vec<(String, MetaValue)>,
    Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
);

fn model() -> impl Strategy<Value = Model> {
    (
        prop::sample::select(vec![1u64, 8, 32, 64, 256]),
        vec((any::<String>(), value()), 0..8),
        vec((any::<String>(), tensor()), 0..6),
    )
        .prop_map(|(alignment, kvs, tensors)| {
            // Suffixes keep names unique, as the format requires.
            let kvs = kvs
                .into_iter()
                .enumerate()
                .map(|(i, (k, v))| (format!("{k}#{i}"), v))
                .collect();
            let tensors = tensors
                .into_iter()
                .enumerate()
                .map(|(i, (name, (dims, ty, data)))| (format!("{name}#{i}"), dims, ty, data))
                .collect();
            (alignment, kvs, tensors)
        })
}

fn build((alignment, kvs, tensors): &Model) -> GgufWriter {
    let mut w = GgufWriter::new().alignment(*alignment);
    for (k, v) in kvs {
        w.set(k, v.clone());
    }
    for (name, dims, ty, data) in tensors {
        w.add_tensor(name, dims, *ty, data.clone());
    }
    w
}

// ---------------------------------------------------------------------------
// Round trip

proptest! {
    #[test]
    fn round_trip_is_exact(m in model()) {
        let w = build(&m);
        let file = GgufFile::from_bytes(w.to_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (alignment, kvs, tensors) = &m;

        prop_assert_eq!(file.version(), 3);
        prop_assert_eq!(file.alignment(), *alignment);
        prop_assert_eq!(file.data_offset() % alignment, 0);
        // The writer's metadata includes general.alignment first, then ours.
        prop_assert_eq!(file.metadata(), w.metadata());
        for (k, v) in kvs {
            prop_assert_eq!(file.get(k), Some(v));
        }
        prop_assert_eq!(file.tensors().len(), tensors.len());
        for ((name, dims, ty, data), info) in tensors.iter().zip(file.tensors()) {
            prop_assert_eq!(&info.name, name);
            prop_assert_eq!(&info.dims, dims);
            prop_assert_eq!(info.ty, *ty);
            prop_assert_eq!(info.offset % alignment, 0);
            prop_assert_eq!(info.n_bytes, data.len() as u64);
            prop_assert_eq!(file.tensor_data(info), &data[..]);
            prop_assert_eq!(file.tensor(name), Some(info));
        }
    }

    /// Random byte corruption and truncation of a valid file: `from_bytes`
    /// returns Ok or Err, and whatever it accepts can be fully walked.
    #[test]
    fn corrupted_files_never_panic(
        m in model(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = build(&m).to_bytes();
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        if let Ok(file) = GgufFile::from_bytes(bytes) {
            for (k, v) in file.metadata() {
                let _ = (k.len(), v.to_string());
            }
            for t in file.tensors() {
                prop_assert_eq!(file.tensor_data(t).len() as u64, t.n_bytes);
            }
        }
    }
}

#[test]
fn open_reads_a_written_file_and_leaves_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut w = GgufWriter::new();
    w.set("general.architecture", MetaValue::String("bitnet".into()));
    w.set("n", MetaValue::U16(7));
    w.set("neg", MetaValue::I8(-1));
    w.set("ratio", MetaValue::F32(0.5));
    w.set(
        "names",
        MetaValue::Array(MetaArray::String(vec!["a".into(), "ß".into()])),
    );
    w.set("scores", MetaValue::Array(MetaArray::F32(vec![1.0, -2.0])));
    w.set("types", MetaValue::Array(MetaArray::U8(vec![1, 6])));
    w.add_tensor(
        "x",
        &[4],
        GgmlType::F32,
        [1f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect(),
    );
    w.write_to(&path).unwrap();
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "temporary file left behind");

    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.path(), Some(path.as_path()));
    assert_eq!(f.file_size(), std::fs::metadata(&path).unwrap().len());
    assert_eq!(f.get_str("general.architecture").unwrap(), "bitnet");
    assert_eq!(f.get_u32("n").unwrap(), 7);
    assert_eq!(f.get_f32("ratio").unwrap(), 0.5);
    assert_eq!(f.get_str_array("names").unwrap(), vec!["a", "ß"]);
    assert_eq!(f.get_f32_array("scores").unwrap(), vec![1.0, -2.0]);
    assert_eq!(f.get_i32_array("types").unwrap(), vec![1, 6]);
    let x = f.tensor("x").unwrap();
    assert_eq!(x.n_elements(), 4);
    assert_eq!(&f.tensor_data(x)[4..8], &2f32.to_le_bytes());

    // Typed getters name the key and both types.
    let e = f.get_u32("neg").unwrap_err();
    assert!(
        matches!(e, GgufError::OutOfRange { ref key, .. } if key == "neg"),
        "{e}"
    );
    let e = f.get_str("n").unwrap_err();
    assert!(
        matches!(e, GgufError::WrongType { ref key, expected: "string", ref found } if key == "n" && found == "u16"),
        "{e}"
    );
    assert!(matches!(
        f.get_u32("absent"),
        Err(GgufError::MissingKey { .. })
    ));
    assert!(matches!(
        GgufFile::open(&dir.path().join("absent.gguf")),
        Err(GgufError::Io { .. })
    ));
}

/// A file of at least `RESIDENT_MIN_BYTES` is copied into anonymous memory
/// with the same bytes; a smaller one is mapped; one that shrinks or is not
/// a regular file is refused as `open` refuses it.
#[test]
fn open_resident_copies_large_files_and_maps_small_ones() {
    use divergence::gguf::RESIDENT_MIN_BYTES;
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.gguf");
    let n = RESIDENT_MIN_BYTES as usize / 4 + 1000;
    let data: Vec<u8> = (0..n as u32)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let mut w = GgufWriter::new();
    w.set("general.architecture", MetaValue::String("bitnet".into()));
    w.add_tensor("w", &[n as u64], GgmlType::F32, data.clone());
    w.write_to(&big).unwrap();

    let mapped = GgufFile::open(&big).unwrap();
    let resident = GgufFile::open_resident(&big).unwrap();
    assert!(!mapped.is_resident());
    // Unless this machine has less than twice the file in available memory.
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let l = m
                .lines()
                .find(|l| l.starts_with("MemAvailable:"))?
                .to_owned();
            l.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .unwrap_or(0)
        * 1024;
    assert_eq!(
        resident.is_resident(),
        available / 2 >= resident.file_size(),
        "available {available}"
    );
    assert_eq!(resident.path(), Some(big.as_path()));
    assert_eq!(resident.file_size(), mapped.file_size());
    let t = resident.tensor("w").unwrap();
    assert_eq!(&resident.tensor_data(t)[..data.len()], &data[..]);
    assert_eq!(
        resident.tensor_data(t),
        mapped.tensor_data(mapped.tensor("w").unwrap())
    );

    let small = dir.path().join("small.gguf");
    let mut w = GgufWriter::new();
    w.add_tensor("x", &[2], GgmlType::F32, vec![0; 8]);
    w.write_to(&small).unwrap();
    assert!(!GgufFile::open_resident(&small).unwrap().is_resident());

    for bad in [dir.path().join("absent.gguf"), dir.path().to_path_buf()] {
        assert!(matches!(
            GgufFile::open_resident(&bad),
            Err(GgufError::Io { .. })
        ));
    }
}

// ---------------------------------------------------------------------------
// Hostile files

/// A tensor info as it goes on disk, with any values at all.
struct RawTensor {
    name: Vec<u8>,
    dims: Vec<u64>,
    type_id: u32,
    offset: u64,
}

fn raw_tensor(name: &str, dims: &[u64], ty: GgmlType, offset: u64) -> RawTensor {
    RawTensor {
        name: name.as_bytes().to_vec(),
        dims: dims.to_vec(),
        type_id: ty.id(),
        offset,
    }
}

/// Builds GGUF bytes field by field, so each case can break exactly one thing.
struct Raw {
    magic: [u8; 4],
    version: u32,
    kv_count: Option<u64>,
    tensor_count: Option<u64>,
    /// Encoded KVs (key, type id, value bytes).
    kvs: Vec<Vec<u8>>,
    tensors: Vec<RawTensor>,
    alignment: u64,
    data_len: usize,
}

impl Raw {
    fn new() -> Raw {
        Raw {
            magic: *b"GGUF",
            version: 3,
            kv_count: None,
            tensor_count: None,
            kvs: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
            data_len: 0,
        }
    }

    fn kv(mut self, key: &[u8], type_id: u32, value: &[u8]) -> Raw {
        let mut out = str_bytes(key);
        out.extend_from_slice(&type_id.to_le_bytes());
        out.extend_from_slice(value);
        self.kvs.push(out);
        self
    }

    fn tensor(mut self, t: RawTensor) -> Raw {
        self.tensors.push(t);
        self
    }

    fn data(mut self, len: usize) -> Raw {
        self.data_len = len;
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = self.magic.to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(
            &self
                .tensor_count
                .unwrap_or(self.tensors.len() as u64)
                .to_le_bytes(),
        );
        out.extend_from_slice(&self.kv_count.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for kv in &self.kvs {
            out.extend_from_slice(kv);
        }
        for t in &self.tensors {
            out.extend_from_slice(&str_bytes(&t.name));
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            out.extend_from_slice(&t.offset.to_le_bytes());
        }
        let padded = out.len().next_multiple_of(self.alignment as usize);
        out.resize(padded + self.data_len, 0);
        out
    }
}

fn str_bytes(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

fn u32_value(v: u32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// An array value: element type, count, then raw element bytes.
fn array_value(elem_type: u32, count: u64, elems: &[u8]) -> Vec<u8> {
    let mut out = elem_type.to_le_bytes().to_vec();
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(elems);
    out
}

fn nested_array(depth: usize) -> Vec<u8> {
    if depth == 0 {
        return array_value(0, 0, &[]);
    }
    array_value(9, 1, &nested_array(depth - 1))
}

/// Every class of bad file and the error it must produce.
#[test]
fn hostile_files_get_specific_errors() {
    type Check = fn(&GgufError) -> bool;
    let f32x8 = || raw_tensor("w", &[8], GgmlType::F32, 0);
    let cases: Vec<(&str, Vec<u8>, Check)> = vec![
        ("empty file", vec![], |e| {
            matches!(e, GgufError::BadMagic { .. })
        }),
        (
            "bad magic",
            {
                let mut r = Raw::new();
                r.magic = *b"GGML";
                r.bytes()
            },
            |e| matches!(e, GgufError::BadMagic { .. }),
        ),
        (
            "version 1",
            {
                let mut r = Raw::new();
                r.version = 1;
                r.bytes()
            },
            |e| matches!(e, GgufError::UnsupportedVersion { found: 1 }),
        ),
        (
            "version 4",
            {
                let mut r = Raw::new();
                r.version = 4;
                r.bytes()
            },
            |e| matches!(e, GgufError::UnsupportedVersion { found: 4 }),
        ),
        (
            "header truncated",
            b"GGUF\x03\x00\x00\x00\x00".to_vec(),
            |e| matches!(e, GgufError::Truncated { .. }),
        ),
        (
            "huge KV count",
            {
                let mut r = Raw::new();
                r.kv_count = Some(u64::MAX);
                r.bytes()
            },
            |e| matches!(e, GgufError::CountTooLarge { .. }),
        ),
        (
            "huge tensor count",
            {
                let mut r = Raw::new();
                r.tensor_count = Some(1 << 40);
                r.bytes()
            },
            |e| matches!(e, GgufError::CountTooLarge { .. }),
        ),
        (
            "huge key length",
            {
                let mut b = Raw::new().bytes();
                b.truncate(24);
                b[16..24].copy_from_slice(&1u64.to_le_bytes());
                b.extend_from_slice(&u64::MAX.to_le_bytes());
                b.extend_from_slice(&[0; 16]);
                b
            },
            |e| matches!(e, GgufError::Truncated { .. }),
        ),
        (
            "huge string value",
            Raw::new().kv(b"s", 8, &u64::MAX.to_le_bytes()).bytes(),
            |e| matches!(e, GgufError::Truncated { .. }),
        ),
        (
            "huge array count",
            Raw::new()
                .kv(b"a", 9, &array_value(4, u64::MAX / 2, &[0; 8]))
                .bytes(),
            |e| matches!(e, GgufError::CountTooLarge { .. }),
        ),
        (
            "huge string array count",
            Raw::new()
                .kv(b"a", 9, &array_value(8, 1 << 60, &[]))
                .bytes(),
            |e| matches!(e, GgufError::CountTooLarge { .. }),
        ),
        (
            "unknown value type",
            Raw::new().kv(b"k", 13, &[0; 8]).bytes(),
            |e| matches!(e, GgufError::UnknownValueType { id: 13, .. }),
        ),
        (
            "unknown array element type",
            Raw::new().kv(b"k", 9, &array_value(99, 0, &[])).bytes(),
            |e| matches!(e, GgufError::UnknownValueType { id: 99, .. }),
        ),
        ("bool byte 2", Raw::new().kv(b"b", 7, &[2]).bytes(), |e| {
            matches!(e, GgufError::InvalidBool { found: 2, .. })
        }),
        (
            "key not UTF-8",
            Raw::new().kv(b"\xff\xfe", 4, &u32_value(1)).bytes(),
            |e| matches!(e, GgufError::InvalidUtf8 { .. }),
        ),
        (
            "arrays nested too deep",
            Raw::new().kv(b"deep", 9, &nested_array(40)).bytes(),
            |e| matches!(e, GgufError::NestingTooDeep { .. }),
        ),
        (
            "duplicate key",
            Raw::new()
                .kv(b"k", 4, &u32_value(1))
                .kv(b"k", 4, &u32_value(2))
                .bytes(),
            |e| matches!(e, GgufError::DuplicateKey { .. }),
        ),
        (
            "alignment zero",
            Raw::new()
                .kv(b"general.alignment", 4, &u32_value(0))
                .bytes(),
            |e| matches!(e, GgufError::BadAlignment { found: 0 }),
        ),
        (
            "alignment not a power of two",
            Raw::new()
                .kv(b"general.alignment", 4, &u32_value(48))
                .bytes(),
            |e| matches!(e, GgufError::BadAlignment { found: 48 }),
        ),
        (
            "alignment of the wrong type",
            Raw::new()
                .kv(b"general.alignment", 10, &64u64.to_le_bytes())
                .bytes(),
            |e| matches!(e, GgufError::WrongType { .. }),
        ),
        (
            "five dims",
            Raw::new()
                .tensor(raw_tensor("w", &[1, 1, 1, 1, 8], GgmlType::F32, 0))
                .data(32)
                .bytes(),
            |e| matches!(e, GgufError::TooManyDims { n_dims: 5, .. }),
        ),
        (
            "dims overflow",
            Raw::new()
                .tensor(raw_tensor("w", &[1 << 32, 1 << 32], GgmlType::F32, 0))
                .data(32)
                .bytes(),
            |e| matches!(e, GgufError::DimsOverflow { .. }),
        ),
        (
            "unknown tensor type",
            Raw::new()
                .tensor(RawTensor {
                    type_id: 2,
                    ..f32x8()
                })
                .data(32)
                .bytes(),
            |e| matches!(e, GgufError::UnknownTensorType { id: 2, .. }),
        ),
        (
            "tensor type past the table",
            Raw::new()
                .tensor(RawTensor {
                    type_id: 37,
                    ..f32x8()
                })
                .data(32)
                .bytes(),
            |e| matches!(e, GgufError::UnknownTensorType { id: 37, .. }),
        ),
        (
            "I2_S count not whole blocks",
            Raw::new()
                .tensor(raw_tensor("q", &[100], GgmlType::I2S, 0))
                .data(64)
                .bytes(),
            |e| {
                matches!(
                    e,
                    GgufError::BadBlockCount {
                        ty: "i2_s",
                        n_elements: 100,
                        ..
                    }
                )
            },
        ),
        (
            "Q8_0 count not whole blocks",
            Raw::new()
                .tensor(raw_tensor("q", &[33], GgmlType::Q8_0, 0))
                .data(64)
                .bytes(),
            |e| matches!(e, GgufError::BadBlockCount { ty: "q8_0", .. }),
        ),
        (
            "I2_S data short of ne/4 + 32",
            Raw::new()
                .tensor(raw_tensor("q", &[128, 2], GgmlType::I2S, 0))
                .data(64)
                .bytes(),
            |e| matches!(e, GgufError::TensorOutOfBounds { end: 96, .. }),
        ),
        (
            "misaligned offset",
            Raw::new()
                .tensor(raw_tensor("w", &[8], GgmlType::F32, 4))
                .data(64)
                .bytes(),
            |e| matches!(e, GgufError::MisalignedTensor { offset: 4, .. }),
        ),
        (
            "tensor past the end",
            Raw::new()
                .tensor(raw_tensor("w", &[8], GgmlType::F32, 64))
                .data(64)
                .bytes(),
            |e| matches!(e, GgufError::TensorOutOfBounds { .. }),
        ),
        (
            "offset overflows",
            Raw::new()
                .tensor(raw_tensor("w", &[8], GgmlType::F32, u64::MAX - 31))
                .data(64)
                .bytes(),
            |e| matches!(e, GgufError::TensorOutOfBounds { .. }),
        ),
        (
            "data section missing",
            Raw::new().tensor(f32x8()).bytes(),
            |e| {
                matches!(
                    e,
                    GgufError::TensorOutOfBounds { .. } | GgufError::Truncated { .. }
                )
            },
        ),
        (
            "overlapping tensors",
            Raw::new()
                .tensor(raw_tensor("a", &[16], GgmlType::F32, 0))
                .tensor(raw_tensor("b", &[8], GgmlType::F32, 32))
                .data(96)
                .bytes(),
            |e| matches!(e, GgufError::TensorOverlap { ref tensor, ref other, .. } if tensor == "b" && other == "a"),
        ),
        (
            "same offset twice",
            Raw::new()
                .tensor(raw_tensor("a", &[8], GgmlType::F32, 0))
                .tensor(raw_tensor("b", &[8], GgmlType::F32, 0))
                .data(64)
                .bytes(),
            |e| matches!(e, GgufError::TensorOverlap { .. }),
        ),
        (
            "duplicate tensor name",
            Raw::new()
                .tensor(raw_tensor("a", &[8], GgmlType::F32, 0))
                .tensor(raw_tensor("a", &[8], GgmlType::F32, 32))
                .data(64)
                .bytes(),
            |e| matches!(e, GgufError::DuplicateTensor { .. }),
        ),
    ];
    for (name, bytes, check) in cases {
        match GgufFile::from_bytes(bytes) {
            Ok(_) => panic!("{name}: accepted"),
            Err(e) => {
                assert!(check(&e), "{name}: wrong error: {e:?}");
                // Every message carries context, not just a variant name.
                assert!(e.to_string().len() > 20, "{name}: terse message {e}");
            }
        }
    }
    // The fixtures themselves are sound: the same shapes done right are accepted.
    let good = Raw::new()
        .kv(b"general.alignment", 4, &u32_value(64))
        .tensor(raw_tensor("a", &[16], GgmlType::F32, 0))
        .tensor(raw_tensor("q", &[128, 2], GgmlType::I2S, 64));
    let mut good = good;
    good.alignment = 64;
    let good = good.data(64 + 96).bytes();
    let f = GgufFile::from_bytes(good).unwrap();
    assert_eq!(f.tensor("q").unwrap().n_bytes, 96);
    assert_eq!(f.alignment(), 64);
}

/// Cutting a valid file anywhere before the end of its last tensor is an
/// error (never a panic); only the trailing padding may go.
#[test]
fn truncation_at_every_byte_is_an_error() {
    let mut w = GgufWriter::new();
    w.set("general.architecture", MetaValue::String("bitnet".into()));
    w.set(
        "arr",
        MetaValue::Array(MetaArray::Array(vec![
            MetaArray::I16(vec![1, 2]),
            MetaArray::String(vec!["x".into()]),
        ])),
    );
    w.set("b", MetaValue::Bool(true));
    w.add_tensor("f", &[3], GgmlType::F32, vec![0; 12]);
    w.add_tensor("q", &[128], GgmlType::I2S, i2s::pack(&[0; 128], 1.0));
    let bytes = w.to_bytes();
    let full = GgufFile::from_bytes(bytes.clone()).unwrap();
    let needed = full
        .tensors()
        .iter()
        .map(|t| full.data_offset() + t.offset + t.n_bytes)
        .max()
        .unwrap();
    for len in 0..bytes.len() {
        let r = GgufFile::from_bytes(bytes[..len].to_vec());
        if (len as u64) < needed {
            let e = r
                .err()
                .unwrap_or_else(|| panic!("accepted a file cut at {len}"));
            assert!(
                matches!(
                    e,
                    GgufError::BadMagic { .. }
                        | GgufError::Truncated { .. }
                        | GgufError::CountTooLarge { .. }
                        | GgufError::TensorOutOfBounds { .. }
                ),
                "cut at {len}: {e:?}"
            );
        } else {
            assert!(r.is_ok(), "cut at {len} only loses padding");
        }
    }
}

#[test]
fn gguf_file_is_send_and_sync() {
    fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<GgufFile>();
}

#[test]
fn ggml_type_table() {
    for ty in GgmlType::ALL {
        assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
    }
    assert_eq!(GgmlType::I2S.id(), 36);
    assert_eq!(GgmlType::I2S.name(), "i2_s");
    assert_eq!(GgmlType::F32.tensor_bytes(10), Some(40));
    assert_eq!(GgmlType::F16.tensor_bytes(10), Some(20));
    assert_eq!(GgmlType::Q8_0.tensor_bytes(64), Some(68));
    assert_eq!(
        GgmlType::I2S.tensor_bytes(2560 * 6912),
        Some(2560 * 6912 / 4 + 32)
    );
    assert_eq!(GgmlType::I2S.tensor_bytes(100), None);
    assert_eq!(GgmlType::F32.tensor_bytes(u64::MAX), None);
    assert_eq!(GgmlType::from_id(2), None);
}

// ---------------------------------------------------------------------------
// I2_S

fn ternary(n: usize) -> impl Strategy<Value = Vec<i8>> {
    vec(-1i8..=1, n)
}

proptest! {
    #[test]
    fn i2s_pack_unpack_is_exact(
        values in (1usize..6).prop_flat_map(|blocks| ternary(blocks * 128)),
        scale in f32_any(),
    ) {
        let packed = i2s::pack(&values, scale);
        prop_assert_eq!(packed.len(), values.len() / 4 + 32);
        let (back, s) = i2s::unpack(&packed, values.len());
        prop_assert_eq!(&back, &values);
        prop_assert_eq!(s.to_bits(), scale.to_bits());
        prop_assert_eq!(i2s::scale(&packed, values.len()).to_bits(), scale.to_bits());
        for (i, &v) in values.iter().enumerate() {
            prop_assert_eq!(i2s::code_at(&packed, i), (v + 1) as u8);
        }
        prop_assert!(packed[values.len() / 4 + 4..].iter().all(|&b| b == 0));
    }
}

/// Bytes derived by hand from the rule "byte b of a block holds values b
/// (bits 7-6), b+32 (5-4), b+64 (3-2), b+96 (1-0); codes 0,1,2 = -1,0,+1".
#[test]
fn i2s_bytes_match_the_layout_by_hand() {
    // Block 0: value j = (j % 3) - 1, so code(j) = j % 3. Byte b holds codes
    // (b%3, (b+32)%3, (b+64)%3, (b+96)%3) = (b%3, (b+2)%3, (b+1)%3, b%3):
    //   b%3 == 0: 00 10 01 00 = 0x24
    //   b%3 == 1: 01 00 10 01 = 0x49
    //   b%3 == 2: 10 01 00 10 = 0x92
    // Block 1: +1 for j < 64, -1 after: every byte is 10 10 00 00 = 0xA0.
    let mut values: Vec<i8> = (0..128).map(|j| (j % 3) as i8 - 1).collect();
    values.extend((0..128).map(|j| if j < 64 { 1 } else { -1 }));
    let packed = i2s::pack(&values, 0.5);

    #[rustfmt::skip]
    let expected_block0: [u8; 32] = [
        0x24, 0x49, 0x92, 0x24, 0x49, 0x92, 0x24, 0x49,
        0x92, 0x24, 0x49, 0x92, 0x24, 0x49, 0x92, 0x24,
        0x49, 0x92, 0x24, 0x49, 0x92, 0x24, 0x49, 0x92,
        0x24, 0x49, 0x92, 0x24, 0x49, 0x92, 0x24, 0x49,
    ];
    assert_eq!(packed.len(), 256 / 4 + 32);
    assert_eq!(&packed[..32], &expected_block0);
    assert_eq!(&packed[32..64], &[0xA0; 32]);
    // 0.5f32 = 0x3F000000, little-endian, then 28 bytes of padding.
    assert_eq!(&packed[64..68], &[0x00, 0x00, 0x00, 0x3F]);
    assert_eq!(&packed[68..], &[0; 28]);

    // One +1 at value 0 among zeros: byte 0 = 10 01 01 01, the rest 01 01 01 01.
    let mut spike = vec![0i8; 128];
    spike[0] = 1;
    let p = i2s::pack(&spike, 1.0);
    assert_eq!(p[0], 0x95);
    assert!(p[1..32].iter().all(|&b| b == 0x55));
    // Value 97 is byte 1, bits 1-0.
    let mut v = vec![0i8; 128];
    v[97] = -1;
    let p = i2s::pack(&v, 1.0);
    assert_eq!(p[1], 0x54);
    assert_eq!(i2s::code_at(&p, 97), 0);
}

// ---------------------------------------------------------------------------
// Independent reader

/// The PyPI `gguf` package (llama.cpp's own reader) lists the same tensors,
/// shapes, offsets and metadata. Skipped when the package is missing; it
/// rejects I2_S (type 36), so this file has F32/F16 tensors only.
#[test]
fn python_gguf_reader_agrees() {
    if !common::python_gguf_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut w = GgufWriter::new();
    w.set("general.architecture", MetaValue::String("llama".into()));
    w.set(
        "general.name",
        MetaValue::String("crosscheck ünïcode".into()),
    );
    w.set("llama.block_count", MetaValue::U32(2));
    w.set("llama.rope.freq_base", MetaValue::F32(10000.0));
    w.set("some.i64", MetaValue::I64(-5));
    w.set("some.bool", MetaValue::Bool(true));
    w.set(
        "tokenizer.ggml.tokens",
        MetaValue::Array(MetaArray::String(vec![
            "<unk>".into(),
            "▁a".into(),
            "".into(),
        ])),
    );
    w.set(
        "tokenizer.ggml.scores",
        MetaValue::Array(MetaArray::F32(vec![0.0, -1.5, -2.0])),
    );
    w.add_tensor(
        "token_embd.weight",
        &[64, 3],
        GgmlType::F16,
        (0..64 * 3 * 2).map(|i| i as u8).collect(),
    );
    w.add_tensor(
        "blk.0.attn_norm.weight",
        &[64],
        GgmlType::F32,
        (0..64 * 4).map(|i| (i * 7) as u8).collect(),
    );
    w.add_tensor("scalar", &[1], GgmlType::F32, 1f32.to_le_bytes().to_vec());
    w.write_to(&path).unwrap();

    let script = r#"
import json, sys, gguf
r = gguf.GGUFReader(sys.argv[1])
fields = {}
for name, f in r.fields.items():
    if name.startswith("GGUF."):
        continue
    v = f.contents()
    fields[name] = v
tensors = [dict(name=t.name, shape=[int(d) for d in t.shape], type=int(t.tensor_type),
                offset=int(t.data_offset), n_bytes=int(t.n_bytes)) for t in r.tensors]
print(json.dumps(dict(fields=fields, tensors=tensors)))
"#;
    let py = common::python_json(script, &path);

    let ours = GgufFile::open(&path).unwrap();
    let fields = py["fields"].as_object().unwrap();
    assert_eq!(fields.len(), ours.metadata().len());
    assert_eq!(fields["general.name"], "crosscheck ünïcode");
    assert_eq!(fields["llama.block_count"], 2);
    assert_eq!(fields["llama.rope.freq_base"], 10000.0);
    assert_eq!(fields["some.i64"], -5);
    assert_eq!(fields["some.bool"], true);
    assert_eq!(
        fields["tokenizer.ggml.tokens"],
        serde_json::json!(["<unk>", "▁a", ""])
    );
    assert_eq!(
        fields["tokenizer.ggml.scores"],
        serde_json::json!([0.0, -1.5, -2.0])
    );

    let tensors = py["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), ours.tensors().len());
    for (p, t) in tensors.iter().zip(ours.tensors()) {
        assert_eq!(p["name"], t.name.as_str());
        assert_eq!(p["shape"], serde_json::json!(t.dims));
        assert_eq!(p["type"], t.ty.id());
        assert_eq!(p["offset"], ours.data_offset() + t.offset, "{}", t.name);
        assert_eq!(p["n_bytes"], t.n_bytes);
    }
}
