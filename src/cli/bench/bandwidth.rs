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
    /// Anonymous memory advised for huge pages, as the engine's weights are
    /// ([`divergence::gguf::GgufFile::open_resident`]): 4 KiB pages would
    /// measure the TLB as much as the memory.
    buffer: memmap2::MmapMut,
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
    pub fn new(threads: usize, kernel: Kernel) -> std::io::Result<ReadProbe> {
        let mut buffer = memmap2::MmapOptions::new().len(READ_BYTES).map_anon()?;
        // Advice only: without transparent huge pages the read takes 4 KiB pages.
        #[cfg(target_os = "linux")]
        let _ = buffer.advise(memmap2::Advice::HugePage);
        let words: &mut [u64] = bytemuck::cast_slice_mut(&mut buffer[..]);
        for (i, w) in words.iter_mut().enumerate() {
            *w = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
        Ok(ReadProbe {
            buffer,
            threads: threads.max(1),
            kernel,
        })
    }

    fn words(&self) -> &[u64] {
        // A mapping starts on a page boundary, so the cast cannot fail.
        bytemuck::cast_slice(&self.buffer[..])
    }

    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// One pass over the whole buffer. The clock starts when every thread
    /// is ready (thread start-up is not read time) and stops when the last
    /// one is done.
    pub fn pass(&self) -> Reads {
        let words = self.words();
        let share = words.len().div_ceil(self.threads);
        let parts: Vec<&[u64]> = words.chunks(share).collect();
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
            bytes: (words.len() * 8) as f64,
            secs,
        }
    }
}
