//! GGUF v3 (and v2) reading, validation and writing.
//!
//! CONTRACT (filled in by the GGUF issue; other modules rely on these names):
//! - `GgmlType` { F32=0, F16=1, ..., I2S=36 } with `block_size()`/`tensor_bytes(n_elements)`
//!   (I2_S: n/4 + 32).
//! - `MetaValue` covering every GGUF value type including arrays.
//! - `GgufFile::open(path) -> Result<GgufFile, GgufError>`: mmap + full validation.
//!   `metadata()`, `get(key) -> Option<&MetaValue>`, typed getters `get_u32/get_f32/get_str/get_str_array`,
//!   `tensors() -> &[TensorInfo]`, `tensor(name) -> Option<&TensorInfo>`,
//!   `tensor_data(&TensorInfo) -> &[u8]` (zero-copy view), `path()`, `file_size()`.
//! - `TensorInfo { name, dims: Vec<u64> (ne0 first), ty: GgmlType, offset (relative to data start), n_bytes }`.
//! - `GgufWriter`: `new()`, `set(key, MetaValue)`, `add_tensor(name, dims, ty, bytes)`,
//!   `write_to(path)` / `to_bytes()`.
