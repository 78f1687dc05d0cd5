//! `cargo +nightly fuzz run dump_reader` (seed it with a dump from
//! `divergence capture`): the safetensors dump reader, every tensor of an
//! accepted dump read back and mapped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = divergence::dump::Dump::from_bytes(Path::new("fuzz.safetensors"), data.to_vec()) {
        let names: Vec<String> = d.names().map(str::to_owned).collect();
        for n in &names {
            let _ = d.tensor(n);
        }
        let _ = divergence::dump::map::map_dump(&d, None);
    }
});
