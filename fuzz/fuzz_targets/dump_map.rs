//! `cargo +nightly fuzz run dump_map`: a `--map` file's text, parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = divergence::dump::map::DumpMap::parse(text, "fuzz-map.json");
    }
});
