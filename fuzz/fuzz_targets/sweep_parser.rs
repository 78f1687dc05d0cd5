//! `cargo +nightly fuzz run sweep_parser`: a sweep file's text, parsed, and
//! an accepted one merged with itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(s) = divergence::sweep::Sweep::parse(text) {
            let _ = divergence::sweep::merge(vec![("a".into(), s.clone()), ("b".into(), s)]);
        }
    }
});
