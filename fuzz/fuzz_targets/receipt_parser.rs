//! `cargo +nightly fuzz run receipt_parser`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = divergence::receipt::Receipt::parse(text);
    }
});
