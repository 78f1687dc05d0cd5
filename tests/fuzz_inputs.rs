//! Bounded mutation fuzzing of the other readers of untrusted files (the
//! GGUF reader and the receipt parser are in `tests/fuzz_gguf.rs`): the
//! safetensors dump reader, the `--map` file (parsed and applied to a
//! dump), the tolerance policy and the sweep file. None may panic, and none
//! may allocate what a number in the file claims rather than what the file
//! holds (a case runs in milliseconds, so a billion-element claim shows as
//! an abort or a stall). `fuzz/` holds the same targets for cargo-fuzz; for
//! a long run here: `PROPTEST_CASES=200000 cargo test --release --test fuzz_inputs`.

use divergence::compare::Policy;
use divergence::dump::map::{map_dump, DumpMap};
use divergence::dump::Dump;
use divergence::sweep::Sweep;
use divergence::synth::{Preset, SynthConfig};
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const EXE: &str = env!("CARGO_BIN_EXE_divergence");

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A folder with the tiny model, a dump of it and a sweep shard of it, made
/// once by the real binary.
fn seeds() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-inputs-seeds");
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = SynthConfig::preset(Preset::Tiny);
        cfg.seed = 1;
        let model = dir.join("tiny.gguf");
        divergence::synth::write_model(&cfg, &model).unwrap();
        let prompts = dir.join("prompts.txt");
        std::fs::write(&prompts, "Hello there\nThe quick brown fox\n").unwrap();
        for args in [
            vec![
                "capture",
                "--tokens",
                "1,2,3",
                "--steps",
                "1",
                "--out",
                "dump.safetensors",
            ],
            vec![
                "sweep",
                "--prompts",
                "prompts.txt",
                "--steps",
                "1",
                "--shard",
                "1/2",
                "--out",
                "sweep.json",
            ],
        ] {
            let out = std::process::Command::new(EXE)
                .current_dir(&dir)
                .args(&args)
                .args(["--model", "tiny.gguf", "-q"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        dir
    })
}

fn seed_dump() -> &'static [u8] {
    static B: OnceLock<Vec<u8>> = OnceLock::new();
    B.get_or_init(|| std::fs::read(seeds().join("dump.safetensors")).unwrap())
}

fn seed_sweep() -> &'static str {
    static S: OnceLock<String> = OnceLock::new();
    S.get_or_init(|| std::fs::read_to_string(seeds().join("sweep.json")).unwrap())
}

/// A map whose rules match the seed dump's own names, with every transform.
const SEED_MAP: &str = r#"{
  "description": "fuzz seed",
  "tensors": [
    {"name": "step{S}.layer{L}.q_proj", "stage": "q_proj", "transpose": [1, 0]},
    {"name": "step{S}.layer{L}.attn_scores", "stage": "attn_scores", "reshape": [-1, 4]},
    {"name": "step{S}.layer{L}.k_rope", "stage": "k_rope", "transpose": [1, 0], "reshape": [-1, 64]},
    {"name": "step{S}.logits", "stage": "logits"},
    {"name": "step{S}.layer{L}.ffn_down", "skip": true}
  ]
}"#;

/// One edit of a text: a byte, a cut, an insertion, or a number replaced by
/// an extreme one (sizes, counts, offsets, axes).
#[derive(Debug, Clone)]
enum Edit {
    Byte(f64, u8),
    Cut(f64),
    Insert(f64, u8),
    Number(f64, &'static str),
}

fn edit() -> impl Strategy<Value = Edit> {
    let numbers = prop_oneof![
        Just("0"),
        Just("-1"),
        Just("1000000000"),
        Just("18446744073709551615"),
        Just("4294967296"),
        Just("1e308"),
        Just("-9223372036854775808"),
        Just("3"),
    ];
    prop_oneof![
        3 => (0.0..1.0f64, any::<u8>()).prop_map(|(a, b)| Edit::Byte(a, b)),
        1 => (0.0..1.0f64).prop_map(Edit::Cut),
        1 => (0.0..1.0f64, any::<u8>()).prop_map(|(a, b)| Edit::Insert(a, b)),
        4 => (0.0..1.0f64, numbers).prop_map(|(a, n)| Edit::Number(a, n)),
    ]
}

/// Applies `edits` to `bytes`, within `region` bytes from the start.
fn apply(bytes: &mut Vec<u8>, edits: &[Edit], region: usize) {
    for e in edits {
        let n = bytes.len().min(region);
        if n == 0 {
            return;
        }
        let at = |f: f64| ((f * n as f64) as usize).min(n - 1);
        match e {
            Edit::Byte(a, b) => {
                let i = at(*a);
                bytes[i] = *b;
            }
            Edit::Cut(a) => bytes.truncate(at(*a)),
            Edit::Insert(a, b) => bytes.insert(at(*a), *b),
            Edit::Number(a, with) => {
                // The first run of digits at or after the point.
                let Some(start) = (at(*a)..n).find(|&i| bytes[i].is_ascii_digit()) else {
                    continue;
                };
                let end = (start..bytes.len())
                    .find(|&i| !bytes[i].is_ascii_digit())
                    .unwrap_or(bytes.len());
                bytes.splice(start..end, with.bytes());
            }
        }
    }
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(10000), failure_persistence: None, ..ProptestConfig::default() })]

    /// The dump reader on a mutated dump (its header: the safetensors JSON
    /// with the manifest); an accepted dump is read tensor by tensor.
    #[test]
    fn mutated_dumps_never_panic(edits in proptest::collection::vec(edit(), 1..6)) {
        let mut bytes = seed_dump().to_vec();
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        apply(&mut bytes, &edits, header);
        if let Ok(d) = Dump::from_bytes(Path::new("fuzz.safetensors"), bytes) {
            let names: Vec<String> = d.names().map(str::to_owned).collect();
            for n in &names {
                let _ = d.tensor(n);
            }
            let _ = map_dump(&d, None);
        }
    }

    /// A mutated map, parsed and applied to the seed dump.
    #[test]
    fn mutated_maps_never_panic(edits in proptest::collection::vec(edit(), 1..6)) {
        let mut bytes = SEED_MAP.as_bytes().to_vec();
        apply(&mut bytes, &edits, usize::MAX);
        if let Ok(map) = DumpMap::parse(&text_of(&bytes), "fuzz-map.json") {
            let dump = Dump::from_bytes(Path::new("seed.safetensors"), seed_dump().to_vec()).unwrap();
            let _ = map_dump(&dump, Some(&map));
        }
    }

    /// A mutated policy.
    #[test]
    fn mutated_policies_never_panic(edits in proptest::collection::vec(edit(), 1..6)) {
        let mut bytes = divergence::compare::policy::DEFAULT_POLICY.as_bytes().to_vec();
        apply(&mut bytes, &edits, usize::MAX);
        let _ = Policy::parse(&text_of(&bytes), "fuzz-policy.json");
    }

    /// A mutated sweep file, and an accepted one merged with itself.
    #[test]
    fn mutated_sweeps_never_panic(edits in proptest::collection::vec(edit(), 1..6)) {
        let mut bytes = seed_sweep().as_bytes().to_vec();
        apply(&mut bytes, &edits, usize::MAX);
        if let Ok(s) = Sweep::parse(&text_of(&bytes)) {
            let _ = divergence::sweep::merge(vec![("a".into(), s.clone()), ("b".into(), s)]);
        }
    }
}

#[test]
fn the_seeds_are_accepted_as_they_are() {
    let d = Dump::from_bytes(Path::new("seed.safetensors"), seed_dump().to_vec()).unwrap();
    let map = DumpMap::parse(SEED_MAP, "seed-map.json").unwrap();
    map_dump(&d, Some(&map)).unwrap();
    Sweep::parse(seed_sweep()).unwrap();
    Policy::parse(divergence::compare::policy::DEFAULT_POLICY, "default").unwrap();
}
