//! The `divergence` command line. All logic lives in the library and in `cli/`.

mod cli;

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    cli::main()
}

/// glibc hands every freed block of 128 KiB or more back to the kernel (its
/// own mapping, or a trim of the heap), and the next block of that size is
/// faulted in and zeroed page by page again. A forward pass allocates such
/// blocks per stage (a 128-token prefill of the 2B-4T shape: 3.5 MB for
/// each FFN product). Blocks of up to 256 MiB now come from the heap, and
/// freed memory stays there for reuse (up to 1 GiB at the heap's top):
/// `bench` on the 2B-4T shape took 158,000 minor page faults instead of
/// 507,000 to 663,000, with the same peak RSS; in its prefill the stages
/// that fill a fresh buffer took a quarter (the activation) to a half (the
/// attention norm) less time.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt sets two of glibc's allocator parameters; it reads no
    // memory of ours, and runs first in main, before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
