//! The machine's streaming read bandwidth, measured in the same run as the
//! engines: a decode token streams its weights from memory, so its GB/s is
//! judged against what a plain read achieves at that moment on this shared
//! machine (whose bandwidth moves by a third between quiet and busy spells).
//!
//! STREAM-style: a buffer far larger than the last-level cache, written
//! once so every page has memory of its own, then read whole by `threads`
//! threads, each a contiguous share, with the kernel's widest loads
//! ([`Kernel::xor_fold`]).

use divergence::engine::kernels::Kernel;
use std::sync::Barrier;
use std::time::Instant;

/// Bytes read per pass: 1 GiB, several times any last-level cache here.
pub const READ_BYTES: usize = 1 << 30;

pub struct ReadProbe {
    words: Vec<u64>,
    threads: usize,
    kernel: Kernel,
}

/// Bytes read and seconds taken, summed over passes.
#[derive(Clone, Copy, Default)]
pub struct Reads {
    bytes: f64,
    secs: f64,
}

impl Reads {
    pub fn gb_s(self) -> f64 {
        self.bytes / self.secs / 1e9
    }
}

impl std::ops::Add for Reads {
    type Output = Reads;
    fn add(self, other: Reads) -> Reads {
        Reads {
            bytes: self.bytes + other.bytes,
            secs: self.secs + other.secs,
        }
    }
}

impl ReadProbe {
    /// Allocates and writes the buffer (untouched pages would all map to the
    /// kernel's one zero page, and the read would come from cache).
    pub fn new(threads: usize, kernel: Kernel) -> ReadProbe {
        let words = (0..(READ_BYTES / 8) as u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        ReadProbe {
            words,
            threads: threads.max(1),
            kernel,
        }
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// One pass over the whole buffer. The clock starts when every thread
    /// is ready (thread start-up is not read time) and stops when the last
    /// one is done.
    pub fn pass(&self) -> Reads {
        let share = self.words.len().div_ceil(self.threads);
        let parts: Vec<&[u64]> = self.words.chunks(share).collect();
        let ready = Barrier::new(parts.len() + 1);
        let secs = std::thread::scope(|s| {
            let readers: Vec<_> = parts
                .iter()
                .map(|&part| {
                    let ready = &ready;
                    let kernel = self.kernel;
                    s.spawn(move || {
                        ready.wait();
                        std::hint::black_box(kernel.xor_fold(part))
                    })
                })
                .collect();
            ready.wait();
            let start = Instant::now();
            for reader in readers {
                let _ = reader.join();
            }
            start.elapsed().as_secs_f64()
        });
        Reads {
            bytes: (self.words.len() * 8) as f64,
            secs,
        }
    }
}
