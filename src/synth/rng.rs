//! A small, fast, reproducible PRNG for synthetic weights.
//!
//! SplitMix64: one multiply-xorshift chain per output, good enough statistics
//! for weights, and cheap to seed. Every tensor (and every chunk of a large
//! tensor) gets its own stream derived from the model seed, the tensor name
//! and the chunk index, so chunks can be filled in parallel and the bytes do
//! not depend on the thread count.

#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The stream for `chunk` of the tensor called `name` in a model seeded with `seed`.
    pub fn stream(seed: u64, name: &str, chunk: u64) -> Self {
        // FNV-1a of the name: stable across platforms and Rust versions.
        let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let mut mix = SplitMix64::new(seed ^ name_hash);
        let base = mix.next_u64();
        SplitMix64::new(base ^ chunk.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    #[inline]
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [lo, hi).
    #[inline]
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next_f32()
    }

    /// Approximately standard normal: the Irwin-Hall sum of four 16-bit
    /// uniforms, rescaled to unit variance. One u64 per value; tails are cut
    /// at ±2√3, which weights do not miss.
    #[inline]
    pub fn normal(&mut self) -> f32 {
        let x = self.next_u64();
        let sum = (x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48);
        // Each term has mean 32767.5 and variance (2^16)^2 / 12.
        const SCALE: f32 = 1.732_050_8 / 65536.0; // sqrt(3) / 2^16: the sum of 4 has variance 4/12
        (sum as f32 - 131_070.0) * SCALE
    }
}
