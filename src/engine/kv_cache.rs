//! The KV cache: per layer, one row of K and one of V per position, stored
//! F16 (the reference's default: values are rounded to half when cached) or
//! F32. Buffers are zero-allocated up front; the OS maps pages lazily.
//!
//! Attention reads the cache where it lies, from inside the team's tasks:
//! each layer's rows sit behind a lock that the forward pass takes for
//! writing once per layer (uncontended) and the tasks take for reading.

use super::KvType;
use half::f16;
use half::slice::HalfFloatSliceExt;
use std::sync::{RwLock, RwLockReadGuard};

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
            Rows::F16(v) => v[at..at + src.len()].convert_from_f32_slice(src),
            Rows::F32(v) => v[at..at + src.len()].copy_from_slice(src),
        }
    }
}

/// Cached values of one kv head as stored: one row ([`KvHead::row`]) or
/// several back to back ([`KvHead::rows`]).
#[derive(Clone, Copy)]
pub enum KvRow<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

/// The keys (or values) of one kv head of one layer, read-locked.
pub struct KvHead<'a> {
    rows: RwLockReadGuard<'a, Rows>,
    offset: usize,
    head_dim: usize,
}

impl KvHead<'_> {
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The row of position `j`.
    #[inline]
    pub fn row(&self, j: usize) -> KvRow<'_> {
        self.slice(j * self.head_dim, self.head_dim)
    }

    /// The rows of positions `0..n`, back to back (the cache is head-major).
    pub fn rows(&self, n: usize) -> KvRow<'_> {
        self.slice(0, n * self.head_dim)
    }

    fn slice(&self, at: usize, len: usize) -> KvRow<'_> {
        let at = self.offset + at;
        match &*self.rows {
            Rows::F16(v) => KvRow::F16(&v[at..at + len]),
            Rows::F32(v) => KvRow::F32(&v[at..at + len]),
        }
    }
}

pub struct KvCache {
    capacity: usize,
    n_embd_kv: usize,
    head_dim: usize,
    k: Vec<RwLock<Rows>>,
    v: Vec<RwLock<Rows>>,
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
                .map(|_| RwLock::new(Rows::new(ty, capacity * n_embd_kv)))
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
    /// The cache is head-major: each kv head's rows are one contiguous block
    /// (`capacity` rows of `head_dim`), so attention streams a head's keys
    /// and values sequentially instead of striding across all heads.
    pub fn write(&self, layer: usize, pos0: usize, k: &[f32], v: &[f32]) {
        debug_assert!(pos0 * self.n_embd_kv + k.len() <= self.capacity * self.n_embd_kv);
        let hd = self.head_dim;
        // A poisoned lock only means a task panicked while reading (that
        // panic is reported); the rows are plain numbers, so carry on.
        for (rows, src) in [(&self.k[layer], k), (&self.v[layer], v)] {
            let mut rows = rows.write().unwrap_or_else(|e| e.into_inner());
            for (t, token) in src.chunks_exact(self.n_embd_kv).enumerate() {
                for (h, head) in token.chunks_exact(hd).enumerate() {
                    rows.write((h * self.capacity + pos0 + t) * hd, head);
                }
            }
        }
    }

    fn head<'a>(&'a self, rows: &'a RwLock<Rows>, kv_head: usize) -> KvHead<'a> {
        KvHead {
            rows: rows.read().unwrap_or_else(|e| e.into_inner()),
            offset: kv_head * self.capacity * self.head_dim,
            head_dim: self.head_dim,
        }
    }

    /// The cached keys of one kv head of `layer` (row j = position j).
    pub fn keys(&self, layer: usize, kv_head: usize) -> KvHead<'_> {
        self.head(&self.k[layer], kv_head)
    }

    /// The cached values of one kv head of `layer` (row j = position j).
    pub fn values(&self, layer: usize, kv_head: usize) -> KvHead<'_> {
        self.head(&self.v[layer], kv_head)
    }
}
