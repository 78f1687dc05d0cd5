//! Synthetic models: every preset generates, the same seed gives the same
//! bytes, the weights have the statistics a real model would, the files
//! carry what bitnet.cpp needs, and the tokenizer behaves like llama.cpp's SPM.

mod common;

use divergence::engine::tokenizer::Tokenizer;
use divergence::gguf::{
    tensor_stats, GgmlType, GgufFile, GgufWriter, MetaArray, MetaValue, TensorStats,
};
use divergence::quant::i2s;
use divergence::synth::{self, Preset, SplitMix64, SynthConfig};
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use std::path::Path;

fn tiny() -> SynthConfig {
    SynthConfig {
        seed: 7,
        ..SynthConfig::preset(Preset::Tiny)
    }
}

fn load(cfg: &SynthConfig) -> GgufFile {
    GgufFile::from_bytes(synth::generate(cfg).unwrap().to_bytes()).unwrap()
}

fn sha256(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn preset_names_round_trip() {
    for p in Preset::ALL {
        assert_eq!(p.to_string().parse::<Preset>().unwrap(), p);
        SynthConfig::preset(p)
            .validate()
            .unwrap_or_else(|e| panic!("{p}: {e}"));
    }
    assert_eq!(
        "BitNet-b1.58-2B-4T".parse::<Preset>().unwrap(),
        Preset::Bitnet2B4T
    );
    assert!("huge".parse::<Preset>().is_err());
    let p = SynthConfig::preset(Preset::Bitnet2B4T);
    assert_eq!(
        (
            p.arch.as_str(),
            p.n_embd,
            p.n_layer,
            p.n_head,
            p.n_head_kv,
            p.n_ff,
            p.n_vocab
        ),
        ("bitnet-b1.58", 2560, 30, 20, 5, 6912, 128256)
    );
    assert_eq!(p.rope_theta, 500000.0);
    assert!(p.tiny_attn_norm);
    let p = SynthConfig::preset(Preset::Bitnet3B);
    assert_eq!(
        (p.n_embd, p.n_layer, p.n_head, p.n_ff, p.n_vocab),
        (3200, 26, 32, 8640, 32002)
    );
}

#[test]
fn small_presets_generate_at_the_advertised_size() {
    let dir = tempfile::tempdir().unwrap();
    for (preset, max_bytes) in [(Preset::Tiny, 1 << 20), (Preset::Small, 8 << 20)] {
        let path = dir.path().join(format!("{preset}.gguf"));
        synth::write_model(&SynthConfig::preset(preset), &path).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert!(
            f.file_size() < max_bytes,
            "{preset}: {} bytes",
            f.file_size()
        );
        let cfg = SynthConfig::preset(preset);
        assert_eq!(f.tensors().len(), 2 + cfg.n_layer * 11, "{preset}");
    }
}

#[test]
fn same_seed_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a.gguf"),
        dir.path().join("b.gguf"),
        dir.path().join("c.gguf"),
    );
    synth::write_model(&tiny(), &a).unwrap();
    synth::write_model(&tiny(), &b).unwrap();
    synth::write_model(&SynthConfig { seed: 8, ..tiny() }, &c).unwrap();
    assert_eq!(sha256(&a), sha256(&b));
    assert_ne!(sha256(&a), sha256(&c));
}

#[test]
fn carries_what_the_reference_needs() {
    let f = load(&tiny());
    assert_eq!(f.get_str("general.architecture").unwrap(), "bitnet");
    assert_eq!(f.alignment(), 32);
    for (key, want) in [
        ("bitnet.context_length", 256),
        ("bitnet.embedding_length", 256),
        ("bitnet.block_count", 2),
        ("bitnet.feed_forward_length", 512),
        ("bitnet.attention.head_count", 4),
        ("bitnet.attention.head_count_kv", 2),
        ("bitnet.rope.dimension_count", 64),
        ("bitnet.vocab_size", 512),
        ("tokenizer.ggml.bos_token_id", 1),
        ("tokenizer.ggml.eos_token_id", 2),
        ("tokenizer.ggml.unknown_token_id", 0),
    ] {
        assert_eq!(f.get_u32(key).unwrap(), want, "{key}");
    }
    assert_eq!(
        f.get_f32("bitnet.attention.layer_norm_rms_epsilon")
            .unwrap(),
        1e-5
    );
    assert_eq!(f.get_f32("bitnet.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "llama");
    assert_eq!(f.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 512);
    assert_eq!(f.get_f32_array("tokenizer.ggml.scores").unwrap().len(), 512);
    assert_eq!(
        f.get_i32_array("tokenizer.ggml.token_type").unwrap().len(),
        512
    );
    assert_eq!(
        f.get("tokenizer.ggml.add_bos_token"),
        Some(&MetaValue::Bool(true))
    );

    let shape = |name: &str| f.tensor(name).map(|t| (t.dims.clone(), t.ty));
    assert_eq!(
        shape("token_embd.weight"),
        Some((vec![256, 512], GgmlType::F16))
    );
    assert_eq!(
        shape("output_norm.weight"),
        Some((vec![256], GgmlType::F32))
    );
    assert_eq!(shape("output.weight"), None, "embeddings are tied");
    for l in 0..2 {
        let t = |n: &str| shape(&format!("blk.{l}.{n}"));
        for norm in ["attn_norm", "attn_sub_norm", "ffn_norm"] {
            assert_eq!(
                t(&format!("{norm}.weight")),
                Some((vec![256], GgmlType::F32))
            );
        }
        assert_eq!(t("ffn_sub_norm.weight"), Some((vec![512], GgmlType::F32)));
        assert_eq!(t("attn_q.weight"), Some((vec![256, 256], GgmlType::I2S)));
        assert_eq!(t("attn_k.weight"), Some((vec![256, 128], GgmlType::I2S)));
        assert_eq!(t("attn_v.weight"), Some((vec![256, 128], GgmlType::I2S)));
        assert_eq!(
            t("attn_output.weight"),
            Some((vec![256, 256], GgmlType::I2S))
        );
        assert_eq!(t("ffn_gate.weight"), Some((vec![256, 512], GgmlType::I2S)));
        assert_eq!(t("ffn_up.weight"), Some((vec![256, 512], GgmlType::I2S)));
        assert_eq!(t("ffn_down.weight"), Some((vec![512, 256], GgmlType::I2S)));
        assert_eq!(t("attn_q.scale"), None);
    }
    // I2_S placement by our own rules (the PyPI reader cannot read type 36).
    for t in f.tensors() {
        assert_eq!(t.offset % 32, 0, "{}", t.name);
        if t.ty == GgmlType::I2S {
            assert_eq!(t.n_bytes, t.n_elements() / 4 + 32, "{}", t.name);
        }
    }
}

#[test]
fn arch_variants() {
    let f = load(&SynthConfig {
        arch: "llama".into(),
        ..tiny()
    });
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 2);
    assert!(f.tensor("blk.0.attn_sub_norm.weight").is_none());
    assert!(f.tensor("blk.0.ffn_sub_norm.weight").is_none());
    assert!(f.tensor("output.weight").is_none());
    assert_eq!(f.tensor("blk.1.ffn_down.weight").unwrap().ty, GgmlType::I2S);

    let f = load(&SynthConfig {
        arch: "bitnet-b1.58".into(),
        ..tiny()
    });
    assert_eq!(f.get_u32("bitnet-b1.58.embedding_length").unwrap(), 256);
    assert!(f.tensor("blk.0.ffn_sub_norm.weight").is_some());

    let f = load(&SynthConfig {
        embd_type: GgmlType::F32,
        scale_tensors: true,
        ..tiny()
    });
    assert_eq!(f.tensor("token_embd.weight").unwrap().ty, GgmlType::F32);
    let q = f.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(i2s::scale(f.tensor_data(q), q.n_elements() as usize), 1.0);
    let s = f.tensor("blk.0.attn_q.scale").unwrap();
    assert_eq!((s.dims.clone(), s.ty), (vec![1], GgmlType::F32));
    let scale = f32::from_le_bytes(f.tensor_data(s).try_into().unwrap());
    assert!(scale > 0.01 && scale < 1.0, "{scale}");
}

#[test]
fn bad_configs_are_rejected() {
    for (what, cfg) in [
        (
            "heads",
            SynthConfig {
                n_head: 3,
                ..tiny()
            },
        ),
        (
            "kv heads",
            SynthConfig {
                n_head_kv: 3,
                ..tiny()
            },
        ),
        (
            "odd head dim",
            SynthConfig {
                n_embd: 384,
                n_head: 128,
                n_head_kv: 128,
                ..tiny()
            },
        ),
        (
            "n_embd blocks",
            SynthConfig {
                n_embd: 200,
                n_head: 4,
                ..tiny()
            },
        ),
        (
            "vocab",
            SynthConfig {
                n_vocab: 100,
                ..tiny()
            },
        ),
        (
            "arch",
            SynthConfig {
                arch: "gpt2".into(),
                ..tiny()
            },
        ),
        (
            "embd type",
            SynthConfig {
                embd_type: GgmlType::I2S,
                ..tiny()
            },
        ),
        (
            "eps",
            SynthConfig {
                rms_eps: 0.0,
                ..tiny()
            },
        ),
        (
            "layers",
            SynthConfig {
                n_layer: 0,
                ..tiny()
            },
        ),
    ] {
        assert!(synth::generate(&cfg).is_err(), "{what} accepted");
    }
}

/// The numbers `divergence inspect` prints are those of a plausible model.
#[test]
fn weight_statistics_are_sane() {
    for cfg in [
        tiny(),
        SynthConfig::preset(Preset::Small),
        SynthConfig {
            tiny_attn_norm: true,
            ..tiny()
        },
    ] {
        let f = load(&cfg);
        for t in f.tensors() {
            let stats = tensor_stats(&f, t).unwrap_or_else(|| panic!("no stats for {}", t.name));
            match stats {
                TensorStats::Float {
                    mean,
                    std,
                    min,
                    max,
                    nan,
                    inf,
                    ..
                } => {
                    assert_eq!((nan, inf), (0, 0), "{}", t.name);
                    if t.name == "token_embd.weight" {
                        let want = 4.0 / (cfg.n_embd as f64).sqrt();
                        assert!(mean.abs() < 0.05 * want, "{}: mean {mean}", t.name);
                        assert!(
                            (std / want - 1.0).abs() < 0.05,
                            "{}: std {std} want {want}",
                            t.name
                        );
                    } else if cfg.tiny_attn_norm && t.name.ends_with("attn_norm.weight") {
                        assert!(min >= 0.01 && max <= 0.05, "{}: {min}..{max}", t.name);
                    } else {
                        assert!((mean - 1.0).abs() < 0.05, "{}: mean {mean}", t.name);
                        assert!(min >= 0.8 && max <= 1.2 && std > 0.05, "{}", t.name);
                    }
                }
                TensorStats::Ternary {
                    minus_one,
                    zero,
                    plus_one,
                    invalid,
                    scale,
                    ..
                } => {
                    assert_eq!(invalid, 0, "{}", t.name);
                    for frac in [minus_one, zero, plus_one] {
                        assert!((frac - 1.0 / 3.0).abs() < 0.02, "{}: {frac}", t.name);
                    }
                    let n_in = t.dims[0] as f32;
                    let want = 1.0 / (n_in * 2.0 / 3.0).sqrt();
                    assert!(
                        scale > 0.85 * want && scale < 1.15 * want,
                        "{}: scale {scale}",
                        t.name
                    );
                }
            }
        }
    }
}

/// A projection keeps the RMS of its input: activations stay O(1) however
/// many layers follow. Checked on the unpacked weights of every projection.
#[test]
fn projections_preserve_activation_scale() {
    let f = load(&tiny());
    let mut rng = SplitMix64::new(3);
    for t in f.tensors().iter().filter(|t| t.ty == GgmlType::I2S) {
        let (n_in, n_out) = (t.dims[0] as usize, t.dims[1] as usize);
        let (w, scale) = i2s::unpack(f.tensor_data(t), n_in * n_out);
        let x: Vec<f32> = (0..n_in).map(|_| rng.normal()).collect();
        let rms = |v: &[f32]| (v.iter().map(|a| a * a).sum::<f32>() / v.len() as f32).sqrt();
        let y: Vec<f32> = w
            .chunks_exact(n_in)
            .map(|row| scale * row.iter().zip(&x).map(|(&a, &b)| a as f32 * b).sum::<f32>())
            .collect();
        let ratio = rms(&y) / rms(&x);
        assert!(
            (0.7..1.4).contains(&ratio),
            "{}: output/input RMS {ratio}",
            t.name
        );
    }
}

// ---------------------------------------------------------------------------
// Tokenizer

/// llama.cpp asserts `id_to_token.size() == token_to_id.size()` at load: a
/// repeated token text would abort the reference. Every merge must also be
/// reachable, i.e. join two tokens that exist.
#[test]
fn vocab_texts_are_unique_and_merges_reachable() {
    for n_vocab in [512, 1024, 32002, 128256] {
        let tokens = synth::vocab::tokens(n_vocab).unwrap();
        assert_eq!(tokens.len(), n_vocab);
        let mut seen = std::collections::HashSet::new();
        for t in &tokens {
            assert!(seen.insert(t.text.as_str()), "duplicate token {:?}", t.text);
        }
        for t in tokens
            .iter()
            .filter(|t| t.ty == 1 && t.text.chars().count() > 1 && !t.text.starts_with('<'))
        {
            let reachable = t
                .text
                .char_indices()
                .skip(1)
                .any(|(at, _)| seen.contains(&t.text[..at]) && seen.contains(&t.text[at..]));
            assert!(
                reachable,
                "merge {:?} is not the join of two tokens",
                t.text
            );
        }
    }
    assert!(synth::vocab::tokens(100).is_none());
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&load(&tiny())).unwrap()
}

fn pieces(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&i| tok.token_text(i).unwrap().to_string())
        .collect()
}

#[test]
fn tokenizer_follows_spm_merging() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 512);
    assert_eq!((tok.bos(), tok.eos()), (Some(1), Some(2)));
    // By hand: "▁hello▁world" merges he, ▁w, or, ll, ▁he (not ▁h: h is gone),
    // ▁wor, ld, ▁world; "ello" never forms because "el" and "lo" lose to "ll".
    let ids = tok.encode("hello world", true, false);
    assert_eq!(ids[0], 1);
    assert_eq!(pieces(&tok, &ids[1..]), ["▁he", "ll", "o", "▁world"]);
    assert_eq!(tok.encode("", true, false), vec![1]);
    assert_eq!(tok.encode("", false, false), Vec::<u32>::new());
    // "the" is a merge chain: ▁t + he → ▁the.
    assert_eq!(pieces(&tok, &tok.encode("the", false, false)), ["▁the"]);
    // Not in the vocab: byte fallback, uppercase hex like llama.cpp.
    assert_eq!(
        pieces(&tok, &tok.encode("€", false, false)),
        ["▁", "<0xE2>", "<0x82>", "<0xAC>"]
    );
    // In the vocab as a single character: no fallback.
    assert_eq!(pieces(&tok, &tok.encode("é", false, false)), ["▁", "é"]);
    // Special-token text is not parsed as a special token.
    assert!(!tok.encode("<s>", false, false).contains(&1));
}

/// Ids that bitnet.cpp's `llama_tokenize` returned for the tiny preset's
/// vocab (seen through `divergence find`, which compares both tokenizers).
#[test]
fn tokenizer_matches_ids_seen_from_bitnet_cpp() {
    let tok = tokenizer();
    let seen: [(&str, &[u32]); 4] = [
        ("hello world", &[1, 412, 388, 338, 430]),
        (
            "  The world, é€ 100 BitNet!",
            &[
                1, 259, 259, 407, 430, 271, 259, 354, 229, 133, 175, 432, 433, 436, 260,
            ],
        ),
        (
            "with ü and ß—x",
            &[1, 413, 259, 355, 259, 363, 327, 259, 356, 357, 347],
        ),
        ("the end", &[1, 360, 259, 368, 327]),
    ];
    for (text, ids) in seen {
        assert_eq!(tok.encode(text, true, false), ids, "{text:?}");
    }
}

#[test]
fn tokenizer_breaks_ties_leftmost() {
    let mut w = GgufWriter::new();
    let tokens = ["<unk>", "<s>", "</s>", "▁", "a", "aa"];
    w.set("tokenizer.ggml.model", MetaValue::String("llama".into()));
    w.set(
        "tokenizer.ggml.tokens",
        MetaValue::Array(MetaArray::String(
            tokens.iter().map(|s| s.to_string()).collect(),
        )),
    );
    w.set(
        "tokenizer.ggml.scores",
        MetaValue::Array(MetaArray::F32(vec![0.0, 0.0, 0.0, -5.0, -5.0, -1.0])),
    );
    w.set(
        "tokenizer.ggml.token_type",
        MetaValue::Array(MetaArray::I32(vec![2, 3, 3, 1, 1, 1])),
    );
    let tok = Tokenizer::from_gguf(&GgufFile::from_bytes(w.to_bytes()).unwrap()).unwrap();
    assert_eq!(
        pieces(&tok, &tok.encode("aaa", false, false)),
        ["▁", "aa", "a"]
    );
    assert_eq!(
        pieces(&tok, &tok.encode("aaaa", false, false)),
        ["▁", "aa", "aa"]
    );
    // No byte tokens at all: unknown characters become <unk>.
    assert_eq!(tok.encode("b", false, false), vec![3, 0]);
}

proptest! {
    #[test]
    fn tokenizer_round_trips_text(s in "[^\u{2581}]{0,40}") {
        let tok = tokenizer();
        let ids = tok.encode(&s, true, false);
        prop_assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
        // llama_detokenize strips the space prefix from the first piece,
        // which follows BOS here.
        prop_assert_eq!(ids[0], 1);
        prop_assert_eq!(tok.decode(&ids[1..]), s);
    }
}

// ---------------------------------------------------------------------------
// Real-size presets: benchmarks, not part of the default run.

/// `cargo test --release --test synth -- --ignored large_presets`
#[test]
#[ignore = "writes up to 1.2 GB per preset; run in release as a benchmark"]
fn large_presets_generate() {
    let dir = tempfile::tempdir().unwrap();
    for preset in [Preset::BitnetLarge, Preset::Bitnet3B, Preset::Bitnet2B4T] {
        let path = dir.path().join("m.gguf");
        let started = std::time::Instant::now();
        synth::write_model(&SynthConfig::preset(preset), &path).unwrap();
        let elapsed = started.elapsed();
        let f = GgufFile::open(&path).unwrap();
        eprintln!(
            "{preset}: {} bytes in {:.1} s",
            f.file_size(),
            elapsed.as_secs_f64()
        );
        if preset == Preset::Bitnet2B4T {
            assert!(elapsed.as_secs() < 60, "2B-4T took {elapsed:?}");
        }
        let norm = f.tensor("output_norm.weight").unwrap();
        assert!(matches!(
            tensor_stats(&f, norm),
            Some(TensorStats::Float { nan: 0, inf: 0, .. })
        ));
        drop(f);
        std::fs::remove_file(&path).unwrap();
    }
}

// ---------------------------------------------------------------------------
// The command line

fn divergence(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_divergence"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn gen_model_and_inspect_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small-llama.gguf");
    let p = path.to_str().unwrap();
    let out = divergence(&[
        "gen-model",
        "--preset",
        "small",
        "--arch",
        "llama",
        "--n-layer",
        "2",
        "--embd-type",
        "f32",
        "--scale-tensors",
        "--seed",
        "5",
        "-o",
        p,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&format!("sha256  {}", sha256(&path))),
        "{text}"
    );

    let out = divergence(&["inspect", p, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["version"], 3);
    assert_eq!(json["metadata"]["general.architecture"], "llama");
    assert_eq!(json["metadata"]["llama.block_count"], 2);
    assert_eq!(json["metadata"]["tokenizer.ggml.tokens"]["len"], 1024);
    for t in json["tensors"].as_array().unwrap() {
        let stats = &t["stats"];
        let name = t["name"].as_str().unwrap();
        match stats["kind"].as_str().unwrap() {
            "float" => {
                assert_eq!(
                    (stats["nan"].as_u64(), stats["inf"].as_u64()),
                    (Some(0), Some(0)),
                    "{name}"
                );
                if name.ends_with("norm.weight") {
                    let mean = stats["mean"].as_f64().unwrap();
                    assert!((mean - 1.0).abs() < 0.05, "{name}: mean {mean}");
                }
            }
            "ternary" => assert_eq!(
                stats["scale"].as_f64(),
                Some(1.0),
                "{name}: scale tensors on"
            ),
            other => panic!("{name}: stats kind {other}"),
        }
    }

    let out = divergence(&["inspect", p, "--no-stats"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("blk.1.ffn_down.weight"));

    // Bad input exits 2 with a message naming the problem.
    std::fs::write(dir.path().join("bad.gguf"), b"GGML").unwrap();
    let out = divergence(&["inspect", dir.path().join("bad.gguf").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("magic"));
    let out = divergence(&["gen-model", "--n-head", "3", "-o", p]);
    assert_eq!(out.status.code(), Some(2));
}

/// The PyPI `gguf` reader sees the same metadata (vocab included) and the
/// same F32/F16 tensors. It rejects I2_S, so the copy it reads leaves the
/// projections out; their offsets and sizes are checked by our own rules in
/// `carries_what_the_reference_needs`. Skipped without the package.
#[test]
fn python_gguf_reads_synth_metadata() {
    if !common::python_gguf_available() {
        return;
    }
    let model = load(&tiny());
    let mut w = GgufWriter::new();
    for (k, v) in model.metadata() {
        w.set(k, v.clone());
    }
    for t in model.tensors().iter().filter(|t| t.ty != GgmlType::I2S) {
        w.add_tensor(&t.name, &t.dims, t.ty, model.tensor_data(t).to_vec());
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-i2s.gguf");
    w.write_to(&path).unwrap();

    let script = r#"
import json, sys, gguf
r = gguf.GGUFReader(sys.argv[1])
fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
tensors = [[t.name, [int(d) for d in t.shape], int(t.tensor_type), int(t.data_offset), int(t.n_bytes)] for t in r.tensors]
print(json.dumps(dict(fields=fields, tensors=tensors)))
"#;
    let py = common::python_json(script, &path);

    let ours = GgufFile::open(&path).unwrap();
    let fields = py["fields"].as_object().unwrap();
    assert_eq!(fields.len(), ours.metadata().len());
    let tokens: Vec<&str> = fields["tokenizer.ggml.tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(tokens, ours.get_str_array("tokenizer.ggml.tokens").unwrap());
    let types: Vec<i64> = fields["tokenizer.ggml.token_type"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(
        types,
        ours.get_i32_array("tokenizer.ggml.token_type")
            .unwrap()
            .iter()
            .map(|&t| t as i64)
            .collect::<Vec<_>>()
    );
    assert_eq!(fields["general.architecture"], "bitnet");
    assert_eq!(fields["bitnet.attention.head_count_kv"], 2);
    assert_eq!(fields["tokenizer.ggml.add_bos_token"], true);
    let tensors = py["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), ours.tensors().len());
    for (p, t) in tensors.iter().zip(ours.tensors()) {
        assert_eq!(
            p,
            &serde_json::json!([
                t.name,
                t.dims,
                t.ty.id(),
                ours.data_offset() + t.offset,
                t.n_bytes
            ])
        );
    }
}
