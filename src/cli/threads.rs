//! Thread counts: within what `find` accepts, and no more than this process
//! may run at once. bitnet.cpp's threads spin at every graph barrier, so 64
//! threads on 2 cores take 20 times longer than 2, and a million never start.

use anyhow::anyhow;

/// The most threads any command accepts.
pub const MAX_THREADS: usize = 256;

/// Checks `requested` (what `name` asked for: `--threads`, or a receipt's
/// recorded value) and bounds it by the CPUs this process may use, saying
/// so on stderr when it does.
pub fn bounded(requested: usize, name: &str) -> anyhow::Result<usize> {
    if requested == 0 || requested > MAX_THREADS {
        return Err(anyhow!(
            "{name} {requested}: threads must be between 1 and {MAX_THREADS}"
        ));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if requested > cores {
        errln!(
            "warning: {name} {requested} is more than the {cores} CPU(s) this process may use: using {cores}"
        );
        return Ok(cores);
    }
    Ok(requested)
}
