//! Bounded mutation fuzzing of the two parsers that read untrusted bytes:
//! the GGUF reader ([`GgufFile::from_bytes`]) and the receipt parser
//! ([`Receipt::parse`]). Neither may panic on any input. The default case
//! counts keep this to seconds in CI; for a long run:
//! `PROPTEST_CASES=2000000 cargo test --release --test fuzz_gguf`.

use divergence::gguf::GgufFile;
use divergence::receipt::Receipt;
use divergence::synth::{generate, Preset, SynthConfig};
use proptest::prelude::*;
use std::sync::OnceLock;

/// A valid model small enough to mutate quickly: one layer, tiny vocab.
fn seed_model() -> &'static [u8] {
    static B: OnceLock<Vec<u8>> = OnceLock::new();
    B.get_or_init(|| {
        let mut c = SynthConfig::preset(Preset::Tiny);
        c.n_embd = 128;
        c.n_ff = 128;
        c.n_head = 2;
        c.n_head_kv = 1;
        c.n_layer = 1;
        c.seed = 7;
        generate(&c).unwrap().to_bytes()
    })
}

/// Where the interesting bytes are: the header (KVs and tensor table).
fn header_len() -> usize {
    GgufFile::from_bytes(seed_model().to_vec())
        .unwrap()
        .data_offset() as usize
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Overwrite one byte (position as a fraction of the header or file).
    Flip {
        at: f64,
        in_header: bool,
        byte: u8,
    },
    /// Overwrite 8 bytes with an interesting u64 (counts, lengths, offsets).
    Word {
        at: f64,
        value: u64,
    },
    Truncate {
        at: f64,
    },
    Insert {
        at: f64,
        bytes: Vec<u8>,
    },
    Delete {
        at: f64,
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX / 2),
        Just(1 << 32),
        Just(1 << 62),
        Just(u32::MAX as u64),
        any::<u64>(),
        0u64..64,
    ];
    prop_oneof![
        4 => (0.0..1.0f64, any::<bool>(), any::<u8>()).prop_map(|(at, in_header, byte)| Mutation::Flip { at, in_header, byte }),
        3 => (0.0..1.0f64, interesting).prop_map(|(at, value)| Mutation::Word { at, value }),
        1 => (0.0..1.0f64).prop_map(|at| Mutation::Truncate { at }),
        1 => (0.0..1.0f64, proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (0.0..1.0f64, 1usize..64).prop_map(|(at, len)| Mutation::Delete { at, len }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation, header: usize) {
    let pos = |at: f64, limit: usize| ((at * limit as f64) as usize).min(limit.saturating_sub(1));
    let n = bytes.len();
    if n == 0 {
        return;
    }
    match m {
        Mutation::Flip {
            at,
            in_header,
            byte,
        } => {
            let i = pos(*at, if *in_header { header.min(n) } else { n });
            bytes[i] = *byte;
        }
        Mutation::Word { at, value } => {
            let i = pos(*at, header.min(n));
            let end = (i + 8).min(n);
            bytes[i..end].copy_from_slice(&value.to_le_bytes()[..end - i]);
        }
        Mutation::Truncate { at } => bytes.truncate(pos(*at, n)),
        Mutation::Insert { at, bytes: b } => {
            let i = pos(*at, header.min(n));
            bytes.splice(i..i, b.iter().copied());
        }
        Mutation::Delete { at, len } => {
            let i = pos(*at, header.min(n));
            let end = (i + len).min(n);
            bytes.drain(i..end);
        }
    }
}

/// A header-shaped input: magic, a version, counts and random KV/tensor bytes.
fn header_shaped() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(2u32), Just(3), any::<u32>()],
        prop_oneof![0u64..8, any::<u64>()],
        prop_oneof![0u64..8, any::<u64>()],
        proptest::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(|(version, n_tensors, n_kv, rest)| {
            let mut b = b"GGUF".to_vec();
            b.extend_from_slice(&version.to_le_bytes());
            b.extend_from_slice(&n_tensors.to_le_bytes());
            b.extend_from_slice(&n_kv.to_le_bytes());
            b.extend_from_slice(&rest);
            b
        })
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(20000), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_models_never_panic(ms in proptest::collection::vec(mutation(), 1..6)) {
        let header = header_len();
        let mut bytes = seed_model().to_vec();
        for m in &ms {
            apply(&mut bytes, m, header);
        }
        if let Ok(f) = GgufFile::from_bytes(bytes) {
            // A file the reader accepts must be safe to walk.
            for t in f.tensors() {
                let _ = f.tensor_data(t).len();
                let _ = divergence::gguf::tensor_stats(&f, t);
            }
            let _ = divergence::engine::ModelConfig::from_gguf(&f);
        }
    }

    #[test]
    fn header_shaped_inputs_never_panic(b in header_shaped()) {
        let _ = GgufFile::from_bytes(b);
    }

    #[test]
    fn mutated_receipts_never_panic(
        edits in proptest::collection::vec((0.0..1.0f64, any::<u8>(), 0u8..3), 1..8)
    ) {
        let mut text = seed_receipt().as_bytes().to_vec();
        for (at, byte, op) in edits {
            if text.is_empty() { break; }
            let i = ((at * text.len() as f64) as usize).min(text.len() - 1);
            match op {
                0 => text[i] = byte,
                1 => text.truncate(i),
                _ => text.insert(i, byte),
            }
        }
        let _ = Receipt::parse(&String::from_utf8_lossy(&text));
    }
}

/// A valid receipt: from the test suite's fixtures if any, else a JSON shape
/// with the receipt's top-level keys (still exercises every error path).
fn seed_receipt() -> &'static str {
    static R: OnceLock<String> = OnceLock::new();
    R.get_or_init(|| {
        let p =
            std::env::temp_dir().join(format!("divergence-fuzz-seed-{}.json", std::process::id()));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_divergence"))
            .args(["find", "--steps", "1", "-q", "--receipt"])
            .arg(&p)
            .output();
        let text = out.ok().and_then(|_| std::fs::read_to_string(&p).ok());
        let _ = std::fs::remove_file(&p);
        let text = text.expect("a receipt from `divergence find` on the default model");
        Receipt::parse(&text).expect("the seed receipt parses");
        text
    })
}
