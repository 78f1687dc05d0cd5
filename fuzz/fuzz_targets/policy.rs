//! `cargo +nightly fuzz run policy`: a tolerance policy's text, parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = divergence::compare::Policy::parse(text, "fuzz-policy.json");
    }
});
