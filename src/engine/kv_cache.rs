//! The KV cache: per layer, one row of K and one of V per position, stored
//! F16 (the reference's default: values are rounded to half when cached) or
//! F32. Buffers are zero-allocated up front; the OS maps pages lazily.

use super::KvType;
use half::f16;
use half::slice::HalfFloatSliceExt;

enum Rows {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl Rows {
    fn new(ty: KvType, len: usize) -> Rows {
        match ty {
            KvType::F16 => Rows::F16(vec![f16::ZERO; len]),
            KvType::F32 => Rows::F32(vec![0.0; len]),
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Rows::F16(v) => {
                for (d, &s) in v[at..at + src.len()].iter_mut().zip(src) {
                    *d = f16::from_f32(s);
                }
            }
            Rows::F32(v) => v[at..at + src.len()].copy_from_slice(src),
        }
    }

    fn read(&self, at: usize, dst: &mut [f32]) {
        let n = dst.len();
        match self {
            // Exact either way; the slice form converts with F16C in bulk.
            Rows::F16(v) => v[at..at + n].convert_to_f32_slice(dst),
            Rows::F32(v) => dst.copy_from_slice(&v[at..at + n]),
        }
    }
}

pub struct KvCache {
    capacity: usize,
    n_embd_kv: usize,
    head_dim: usize,
    k: Vec<Rows>,
    v: Vec<Rows>,
}

impl KvCache {
    pub fn new(
        ty: KvType,
        n_layer: usize,
        capacity: usize,
        n_embd_kv: usize,
        head_dim: usize,
    ) -> KvCache {
        let make = || {
            (0..n_layer)
                .map(|_| Rows::new(ty, capacity * n_embd_kv))
                .collect()
        };
        KvCache {
            capacity,
            n_embd_kv,
            head_dim,
            k: make(),
            v: make(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Store rows [T, n_embd_kv] of K and V for positions `pos0..pos0+T`.
    pub fn write(&mut self, layer: usize, pos0: usize, k: &[f32], v: &[f32]) {
        debug_assert!(pos0 * self.n_embd_kv + k.len() <= self.capacity * self.n_embd_kv);
        self.k[layer].write(pos0 * self.n_embd_kv, k);
        self.v[layer].write(pos0 * self.n_embd_kv, v);
    }

    fn gather(&self, rows: &Rows, kv_head: usize, n_keys: usize) -> Vec<f32> {
        let hd = self.head_dim;
        let mut out = vec![0f32; n_keys * hd];
        for (j, dst) in out.chunks_exact_mut(hd).enumerate() {
            rows.read(j * self.n_embd_kv + kv_head * hd, dst);
        }
        out
    }

    /// Keys of one kv head for positions 0..n_keys, as f32 [n_keys, head_dim].
    pub fn keys(&self, layer: usize, kv_head: usize, n_keys: usize) -> Vec<f32> {
        self.gather(&self.k[layer], kv_head, n_keys)
    }

    /// Values of one kv head for positions 0..n_keys, as f32 [n_keys, head_dim].
    pub fn values(&self, layer: usize, kv_head: usize, n_keys: usize) -> Vec<f32> {
        self.gather(&self.v[layer], kv_head, n_keys)
    }
}
