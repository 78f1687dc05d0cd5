//! `cargo +nightly fuzz run gguf_reader fuzz/corpus/gguf_reader`
//! Seed the corpus with `divergence gen-model` output (see fuzz/README.md).
#![no_main]

use divergence::gguf::{tensor_stats, GgufFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = GgufFile::from_bytes(data.to_vec()) {
        // Whatever the reader accepts must be safe to walk.
        for t in f.tensors() {
            let _ = f.tensor_data(t).len();
            let _ = tensor_stats(&f, t);
        }
        let _ = divergence::engine::ModelConfig::from_gguf(&f);
    }
});
