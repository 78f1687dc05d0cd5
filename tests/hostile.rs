//! Hostile input, end to end: corrupted and inconsistent GGUF files (all
//! generated here from the good tiny synthetic model) and bad command lines,
//! each run through the real binary under a deadline. Every one must give
//! exit code 2 and an error that names the problem; none may panic, hang or
//! abort. Plus: a file that passes our checks but makes bitnet.cpp throw a
//! C++ exception (exit 3, the receipt names it and its cause), and receipt
//! atomicity under SIGINT. `tests/hostile_health.rs` covers the process
//! itself (limits, special files, signals, the worker, the terminal).

use divergence::gguf::{GgmlType, GgufFile, GgufWriter, MetaArray, MetaValue};
use divergence::synth::{generate, Preset, SynthConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_divergence");

// ------------------------------------------------------------------ running

struct Run {
    code: Option<i32>,
    stderr: String,
    stdout: String,
}

/// Runs the binary with `args`; kills it and fails if it outlives `limit`.
fn run_limited(args: &[&str], limit: Duration) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(EXE)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn divergence");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("divergence {args:?} still running after {limit:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
    }
}

fn run(args: &[&str]) -> Run {
    run_limited(args, Duration::from_secs(20))
}

// ---------------------------------------------------------------- the model

fn tiny() -> SynthConfig {
    let mut c = SynthConfig::preset(Preset::Tiny);
    c.seed = 1;
    c
}

fn good_bytes() -> Vec<u8> {
    generate(&tiny()).unwrap().to_bytes()
}

type Tensor = (String, Vec<u64>, GgmlType, Vec<u8>);

/// Rebuilds the good model with its metadata and tensor list edited.
fn rebuild(
    edit_meta: impl Fn(&mut Vec<(String, MetaValue)>),
    edit_tensors: impl Fn(&mut Vec<Tensor>),
) -> Vec<u8> {
    let file = GgufFile::from_bytes(good_bytes()).unwrap();
    let mut meta: Vec<(String, MetaValue)> = file.metadata().to_vec();
    edit_meta(&mut meta);
    let mut tensors: Vec<Tensor> = file
        .tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.dims.clone(),
                t.ty,
                file.tensor_data(t).to_vec(),
            )
        })
        .collect();
    edit_tensors(&mut tensors);
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.set(&k, v);
    }
    for (name, dims, ty, data) in tensors {
        w.add_tensor(&name, &dims, ty, data);
    }
    w.to_bytes()
}

fn with_meta(key: &'static str, v: MetaValue) -> Vec<u8> {
    rebuild(
        move |m| match m.iter_mut().find(|(k, _)| k == key) {
            Some((_, slot)) => *slot = v.clone(),
            None => m.push((key.to_string(), v.clone())),
        },
        |_| {},
    )
}

fn without_meta(key: &'static str) -> Vec<u8> {
    rebuild(move |m| m.retain(|(k, _)| k != key), |_| {})
}

fn with_tensors(edit: impl Fn(&mut Vec<Tensor>)) -> Vec<u8> {
    rebuild(|_| {}, edit)
}

fn tensor_mut<'a>(ts: &'a mut [Tensor], name: &str) -> &'a mut Tensor {
    ts.iter_mut()
        .find(|t| t.0 == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

/// Valid I2_S bytes (all-zero codes, zero scale) for `n` elements.
fn i2s_zeros(n: u64) -> Vec<u8> {
    vec![0u8; GgmlType::I2S.tensor_bytes(n).unwrap() as usize]
}

/// Byte offset of the tensor info of `name` just after its name (at n_dims).
fn tensor_info_at(bytes: &[u8], name: &str) -> usize {
    let mut needle = (name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(name.as_bytes());
    let p = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("tensor name in header");
    p + needle.len()
}

/// Offset of a tensor info's type id and data offset fields.
fn type_and_offset_at(bytes: &[u8], name: &str) -> (usize, usize) {
    let p = tensor_info_at(bytes, name);
    let n_dims = u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
    let ty = p + 4 + 8 * n_dims;
    (ty, ty + 4)
}

fn patch(mut bytes: Vec<u8>, at: usize, with: &[u8]) -> Vec<u8> {
    bytes[at..at + with.len()].copy_from_slice(with);
    bytes
}

fn truncated(n: usize) -> Vec<u8> {
    let mut b = good_bytes();
    b.truncate(n);
    b
}

// ---------------------------------------------------------------- the table

#[derive(Clone, Copy, PartialEq)]
enum Via {
    /// The GGUF reader refuses it: both `inspect` and `find` must.
    Reader,
    /// Well-formed GGUF, not a runnable model: `find` must refuse it.
    Model,
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    via: Via,
    /// Every one of these (lowercase) must appear in stderr.
    expect: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    let good = good_bytes();
    let data_offset = GgufFile::from_bytes(good.clone()).unwrap().data_offset() as usize;
    let q_info = tensor_info_at(&good, "blk.0.attn_q.weight");
    let (q_ty, q_off) = type_and_offset_at(&good, "blk.0.attn_q.weight");
    let (_, last_off) = type_and_offset_at(&good, "output_norm.weight");
    // The first KV starts at 24: key length u64, key, value type u32.
    let first_key_len = u64::from_le_bytes(good[24..32].try_into().unwrap()) as usize;
    let first_value_type = 32 + first_key_len;
    let c = |name, bytes, via, expect| Case {
        name,
        bytes,
        via,
        expect,
    };
    use Via::*;
    vec![
        // --- truncations, one per region
        c(
            "empty file",
            Vec::new(),
            Reader,
            &["not a gguf file", "magic"],
        ),
        c(
            "truncated in magic",
            truncated(3),
            Reader,
            &["not a gguf file", "magic"],
        ),
        c(
            "truncated in counts",
            truncated(12),
            Reader,
            &["truncated", "tensor count"],
        ),
        c(
            "truncated in metadata",
            truncated(200),
            Reader,
            &["kv count", "at most"],
        ),
        c(
            "truncated in tensor infos",
            truncated(q_info + 2),
            Reader,
            &["truncated", "blk.0.attn_q.weight"],
        ),
        c(
            "truncated in tensor data",
            truncated(data_offset + 1000),
            Reader,
            &["past the end"],
        ),
        c(
            "last tensor cut short",
            truncated(good.len() - 600),
            Reader,
            &["output_norm.weight", "past the end"],
        ),
        // --- header fields
        c(
            "bad magic",
            patch(good.clone(), 0, b"GGML"),
            Reader,
            &["magic", "gguf"],
        ),
        c(
            "version 1",
            patch(good.clone(), 4, &1u32.to_le_bytes()),
            Reader,
            &["version 1"],
        ),
        c(
            "version 99",
            patch(good.clone(), 4, &99u32.to_le_bytes()),
            Reader,
            &["version 99"],
        ),
        c(
            "huge tensor count",
            patch(good.clone(), 8, &(u64::MAX / 3).to_le_bytes()),
            Reader,
            &["tensor count"],
        ),
        c(
            "huge kv count",
            patch(good.clone(), 16, &(u64::MAX / 3).to_le_bytes()),
            Reader,
            &["count", "at most"],
        ),
        c(
            "huge string length",
            patch(good.clone(), 24, &(1u64 << 60).to_le_bytes()),
            Reader,
            &["key of metadata kv #0", "need 1152921504606846976 bytes"],
        ),
        c(
            "unknown value type",
            patch(good.clone(), first_value_type, &77u32.to_le_bytes()),
            Reader,
            &["unknown value type id 77"],
        ),
        c(
            "invalid utf-8 key",
            patch(good.clone(), 32, &[0xff]),
            Reader,
            &["utf-8"],
        ),
        // --- tensor table
        c(
            "unknown tensor type id",
            patch(good.clone(), q_ty, &99u32.to_le_bytes()),
            Reader,
            &["blk.0.attn_q.weight", "unknown tensor type id 99"],
        ),
        c(
            "misaligned tensor offset",
            {
                let off = u64::from_le_bytes(good[q_off..q_off + 8].try_into().unwrap());
                patch(good.clone(), q_off, &(off + 1).to_le_bytes())
            },
            Reader,
            &["blk.0.attn_q.weight", "alignment"],
        ),
        c(
            "tensor offset past the file",
            patch(good.clone(), last_off, &(1u64 << 40).to_le_bytes()),
            Reader,
            &["output_norm.weight", "past the end"],
        ),
        c(
            "wrong I2_S byte size (dims grown)",
            patch(good.clone(), q_info + 4 + 8, &512u64.to_le_bytes()),
            Reader,
            &["blk.0.attn_q.weight"],
        ),
        c(
            "I2_S element count not a block multiple",
            {
                let b = patch(good.clone(), q_info + 4, &100u64.to_le_bytes());
                patch(b, q_info + 12, &1u64.to_le_bytes())
            },
            Reader,
            &["blk.0.attn_q.weight", "block size"],
        ),
        c(
            "alignment not a power of two",
            with_meta("general.alignment", MetaValue::U32(48)),
            Reader,
            &["general.alignment", "power of two"],
        ),
        // --- inconsistent model metadata
        c(
            "head_count_kv does not divide head_count",
            with_meta("bitnet.attention.head_count_kv", MetaValue::U32(3)),
            Model,
            &["head_count_kv 3"],
        ),
        c(
            "head_count does not divide n_embd",
            with_meta("bitnet.attention.head_count", MetaValue::U32(5)),
            Model,
            &["head_count 5", "n_embd 256"],
        ),
        c(
            "rope dimension mismatch",
            with_meta("bitnet.rope.dimension_count", MetaValue::U32(32)),
            Model,
            &["rope.dimension_count 32", "head_dim 64"],
        ),
        c(
            "vocab_size vs tokenizer and token_embd",
            with_meta("bitnet.vocab_size", MetaValue::U32(600)),
            Model,
            &["n_vocab 600", "tokenizer.ggml.tokens has 512"],
        ),
        c(
            "tokenizer shorter than token_embd",
            rebuild(
                |m| {
                    for (k, v) in m.iter_mut() {
                        if k == "tokenizer.ggml.tokens" {
                            if let MetaValue::Array(MetaArray::String(s)) = v {
                                s.truncate(400);
                            }
                        }
                    }
                    m.retain(|(k, _)| k != "bitnet.vocab_size");
                },
                |_| {},
            ),
            Model,
            &["tokenizer.ggml.tokens has 400 tokens", "n_vocab 512"],
        ),
        c(
            "unknown arch",
            with_meta("general.architecture", MetaValue::String("gpt-17".into())),
            Model,
            &["unknown architecture", "gpt-17"],
        ),
        c(
            "missing block_count",
            without_meta("bitnet.block_count"),
            Model,
            &["bitnet.block_count"],
        ),
        c(
            "embedding_length is a string",
            with_meta("bitnet.embedding_length", MetaValue::String("256".into())),
            Model,
            &["bitnet.embedding_length"],
        ),
        c(
            "negative rms eps",
            with_meta(
                "bitnet.attention.layer_norm_rms_epsilon",
                MetaValue::F32(-1.0),
            ),
            Model,
            &["rms_eps"],
        ),
        // --- tensors vs the arch
        c(
            "missing blk.1.ffn_down.weight",
            with_tensors(|ts| ts.retain(|t| t.0 != "blk.1.ffn_down.weight")),
            Model,
            &["blk.1.ffn_down.weight"],
        ),
        c(
            "F32 projection",
            with_tensors(|ts| {
                let t = tensor_mut(ts, "blk.0.attn_q.weight");
                t.2 = GgmlType::F32;
                t.3 = vec![0u8; 256 * 256 * 4];
            }),
            Model,
            &["blk.0.attn_q.weight", "type"],
        ),
        c(
            "wrong projection shape",
            with_tensors(|ts| {
                let t = tensor_mut(ts, "blk.1.attn_k.weight");
                t.1 = vec![256, 256];
                t.3 = i2s_zeros(256 * 256);
            }),
            Model,
            &["blk.1.attn_k.weight", "dims"],
        ),
        c(
            "norm of the wrong length",
            with_tensors(|ts| {
                let t = tensor_mut(ts, "blk.0.ffn_norm.weight");
                t.1 = vec![128];
                t.3.truncate(128 * 4);
            }),
            Model,
            &["blk.0.ffn_norm.weight"],
        ),
    ]
}

#[test]
fn corrupted_and_inconsistent_files_exit_2_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases();
    assert!(cases.len() >= 25, "{} cases", cases.len());
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.gguf"));
        std::fs::write(&path, &case.bytes).unwrap();
        let receipt = dir.path().join(format!("case{i}.json"));
        let p = path.to_str().unwrap();
        let mut runs = vec![(
            "find",
            run(&[
                "find",
                "--model",
                p,
                "--steps",
                "1",
                "-q",
                "--receipt",
                receipt.to_str().unwrap(),
            ]),
        )];
        if case.via == Via::Reader {
            runs.push(("inspect", run(&["inspect", p])));
        }
        for (cmd, r) in runs {
            let err = r.stderr.to_lowercase();
            let first = r.stderr.lines().next().unwrap_or("").to_string();
            report.push(format!(
                "{:<45} {cmd:<8} exit {:?}  {first}",
                case.name, r.code
            ));
            let missing: Vec<_> = case
                .expect
                .iter()
                .filter(|s| !err.contains(&s.to_lowercase()))
                .collect();
            if r.code != Some(2) || !missing.is_empty() || err.contains("panicked") {
                failures.push(format!(
                    "{} ({cmd}): exit {:?}, missing {missing:?}, stderr: {}",
                    case.name, r.code, r.stderr
                ));
            }
            if cmd == "find" && receipt.exists() {
                failures.push(format!(
                    "{}: the model was run (a receipt was written), not refused",
                    case.name
                ));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "{} failing:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn missing_directory_and_unreadable_files_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    let unreadable = dir.path().join("locked.gguf");
    std::fs::write(&unreadable, good_bytes()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&unreadable, std::fs::Permissions::from_mode(0o000)).unwrap();
    // root reads mode-000 files: fall back to a path through a regular file.
    let unreadable_is_readable = std::fs::read(&unreadable).is_ok();
    let not_a_dir = dir.path().join("locked.gguf/inner.gguf");
    let mut cases: Vec<(&str, PathBuf, &[&str])> = vec![
        (
            "missing file",
            missing.clone(),
            &["nope.gguf", "no such file"],
        ),
        ("a directory", dir.path().to_path_buf(), &["directory"]),
    ];
    if unreadable_is_readable {
        cases.push((
            "path through a file (running as root)",
            not_a_dir,
            &["inner.gguf", "not a directory"],
        ));
    } else {
        cases.push((
            "unreadable file",
            unreadable.clone(),
            &["locked.gguf", "permission denied"],
        ));
    }
    let receipt = dir.path().join("r.json");
    for (name, path, expect) in cases {
        let p = path.to_str().unwrap();
        for args in [
            vec![
                "find",
                "--model",
                p,
                "--steps",
                "1",
                "-q",
                "--receipt",
                receipt.to_str().unwrap(),
            ],
            vec!["inspect", p],
        ] {
            let r = run(&args);
            let err = r.stderr.to_lowercase();
            eprintln!(
                "{name:<40} {:<8} exit {:?}  {}",
                args[0],
                r.code,
                r.stderr.trim()
            );
            assert_eq!(r.code, Some(2), "{name} {args:?}: {}", r.stderr);
            assert!(!err.contains("panicked"), "{name}: {}", r.stderr);
            for e in expect {
                assert!(
                    err.contains(e),
                    "{name} {args:?}: {e:?} not in {}",
                    r.stderr
                );
            }
        }
    }
}

#[test]
fn nan_in_a_norm_weight_is_a_warning_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("nan.gguf");
    std::fs::write(
        &model,
        with_tensors(|ts| {
            let t = tensor_mut(ts, "blk.0.attn_norm.weight");
            for i in 0..3 {
                t.3[4 * i..4 * i + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            t.3[12..16].copy_from_slice(&f32::INFINITY.to_le_bytes());
        }),
    )
    .unwrap();
    let receipt = dir.path().join("r.json");
    let r = run_limited(
        &find_one_step(model.to_str().unwrap(), receipt.to_str().unwrap()),
        Duration::from_secs(60),
    );
    eprintln!("exit {:?}\n{}\n{}", r.code, r.stderr, r.stdout);
    assert!(r.stderr.contains("warning"), "{}", r.stderr);
    assert!(
        r.stderr.contains("blk.0.attn_norm.weight") && r.stderr.contains("3 NaN and 1 Inf"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"));
    assert!(
        matches!(r.code, Some(0) | Some(1)),
        "the run must go on: exit {:?}",
        r.code
    );
    let written = divergence::receipt::Receipt::read(&receipt).expect("the run wrote its receipt");
    assert_eq!(
        written.weight_warnings,
        vec!["tensor blk.0.attn_norm.weight has 3 NaN and 1 Inf values".to_string()]
    );
}

/// `find` of one step on `model`, quiet, its receipt written to `receipt`.
fn find_one_step<'a>(model: &'a str, receipt: &'a str) -> [&'a str; 8] {
    [
        "find",
        "--model",
        model,
        "--steps",
        "1",
        "-q",
        "--receipt",
        receipt,
    ]
}

/// `DIVERGENCE_WEIGHTS` takes `resident` or `mapped`; anything else is
/// refused by name, escaped, before a model is loaded.
#[test]
fn an_unknown_weights_residence_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.gguf");
    std::fs::write(&model, good_bytes()).unwrap();
    let receipt = dir.path().join("r.json");
    let find = |weights: &str| {
        Command::new(EXE)
            .args(find_one_step(
                model.to_str().unwrap(),
                receipt.to_str().unwrap(),
            ))
            .env("DIVERGENCE_WEIGHTS", weights)
            .stdin(Stdio::null())
            .output()
            .expect("spawn divergence")
    };
    let out = find("huge\x1b[31m");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("DIVERGENCE_WEIGHTS="), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "an escape reached the terminal: {stderr:?}"
    );
    for ok in ["mapped", "resident", ""] {
        let out = find(ok);
        assert!(
            matches!(out.status.code(), Some(0) | Some(1)),
            "DIVERGENCE_WEIGHTS={ok:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn bad_command_lines_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("good.gguf");
    std::fs::write(&model, good_bytes()).unwrap();
    let m = model.to_str().unwrap();
    let receipt = dir.path().join("r.json");
    let rc = receipt.to_str().unwrap();
    let bad_policy = dir.path().join("policy.json");
    std::fs::write(&bad_policy, "{ not json").unwrap();
    let not_receipt = dir.path().join("not-a-receipt.json");
    std::fs::write(&not_receipt, r#"{"hello": "world"}"#).unwrap();
    let missing_policy = dir.path().join("nope-policy.json");
    let find = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["find", "--model", m, "-q", "--receipt", rc]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(&str, Vec<String>, &[&str])> = vec![
        (
            "empty --prompt",
            find(&["--prompt", "", "--steps", "1"]),
            &["--prompt is empty"],
        ),
        (
            "--tokens with an id >= vocab",
            find(&["--tokens", "1,5000", "--steps", "1"]),
            &["5000"],
        ),
        (
            "--steps 100000",
            find(&["--steps", "100000"]),
            &["--steps", "100000"],
        ),
        (
            "prompt + steps beyond the context",
            find(&["--steps", "300"]),
            &["context"],
        ),
        (
            "--tokens beyond the context",
            find(&["--tokens", &vec!["5"; 300].join(","), "--steps", "1"]),
            &["context"],
        ),
        ("--threads 0", find(&["--threads", "0"]), &["--threads"]),
        (
            "--policy missing",
            find(&["--steps", "1", "--policy", missing_policy.to_str().unwrap()]),
            &["nope-policy.json"],
        ),
        (
            "--policy invalid",
            find(&["--steps", "1", "--policy", bad_policy.to_str().unwrap()]),
            &["policy.json"],
        ),
        (
            "verify on a non-receipt",
            vec!["verify".into(), not_receipt.to_str().unwrap().into()],
            &["not-a-receipt.json", "not a valid receipt"],
        ),
        (
            "verify on a model file",
            vec!["verify".into(), m.into()],
            &["good.gguf"],
        ),
        (
            "verify on a missing file",
            vec![
                "verify".into(),
                dir.path().join("gone.json").to_str().unwrap().into(),
            ],
            &["gone.json"],
        ),
        ("unknown --kv", find(&["--kv", "q4"]), &["q4"]),
    ];
    let mut failures = Vec::new();
    for (name, args, expect) in cases {
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let r = run(&args);
        let err = r.stderr.to_lowercase();
        eprintln!(
            "{name:<36} exit {:?}  {}",
            r.code,
            r.stderr.lines().next().unwrap_or("")
        );
        let missing: Vec<_> = expect
            .iter()
            .filter(|s| !err.contains(&s.to_lowercase()))
            .collect();
        if r.code != Some(2) || !missing.is_empty() || err.contains("panicked") {
            failures.push(format!(
                "{name}: exit {:?}, missing {missing:?}, stderr: {}",
                r.code, r.stderr
            ));
        }
        assert!(!receipt.exists(), "{name}: refused input left a receipt");
    }
    assert!(
        failures.is_empty(),
        "{} failing:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

// ------------------------------------------------------- reference crash

/// The good model with every `<0xXX>` byte token except `<0x0A>` renamed
/// (and typed normal). Our checks accept it: a vocab may lack byte tokens
/// (our tokenizer falls back to <unk>). bitnet.cpp's SPM tokenizer, on a
/// byte with neither a `<0xXX>` token nor a single-byte token, calls
/// `token_to_id.at()` (llama_byte_to_token_impl), which throws
/// std::out_of_range; the exception guard (`ffi/guard.cpp`) catches it at
/// the C boundary (uncaught, it aborted the worker). `\n` keeps its byte
/// token because llama.cpp looks it up while loading.
fn model_without_byte_tokens() -> Vec<u8> {
    rebuild(
        |m| {
            let mut renamed = Vec::new();
            for (k, v) in m.iter_mut() {
                if k == "tokenizer.ggml.tokens" {
                    if let MetaValue::Array(MetaArray::String(s)) = v {
                        for (i, t) in s.iter_mut().enumerate() {
                            if t.len() == 6
                                && t.starts_with("<0x")
                                && t.ends_with('>')
                                && t != "<0x0A>"
                            {
                                *t = format!("<byte{}>", &t[3..5]);
                                renamed.push(i);
                            }
                        }
                    }
                }
            }
            assert_eq!(renamed.len(), 255);
            for (k, v) in m.iter_mut() {
                if k == "tokenizer.ggml.token_type" {
                    if let MetaValue::Array(MetaArray::I32(ty)) = v {
                        for &i in &renamed {
                            ty[i] = 1;
                        }
                    }
                }
            }
        },
        |_| {},
    )
}

#[test]
fn reference_exception_is_exit_3_with_a_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("no-byte-tokens.gguf");
    std::fs::write(&model, model_without_byte_tokens()).unwrap();
    // Our own reader and engine accept the file.
    assert_eq!(
        run(&["inspect", "--no-stats", model.to_str().unwrap()]).code,
        Some(0)
    );
    let receipt = dir.path().join("crash.json");
    let r = run_limited(
        &[
            "find",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "café ünïcödé",
            "--steps",
            "1",
            "-q",
            "--receipt",
            receipt.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    eprintln!(
        "exit {:?}\nstderr: {}\nstdout: {}",
        r.code, r.stderr, r.stdout
    );
    assert!(!r.stderr.contains("panicked"));
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(r.stdout.contains("REFERENCE FAILED"), "{}", r.stdout);
    let j = read_json(&receipt);
    assert_eq!(j["verdict"], "reference_failed", "{j}");
    let failure = j["reference_failure"]
        .as_str()
        .expect("reference_failure string");
    // The exception, caught at the shim: its type, what(), the call, the cause.
    for want in [
        "std::out_of_range",
        "in llama_tokenize",
        "no byte token for <0xC3>",
    ] {
        assert!(failure.contains(want), "{want:?} not in {failure}");
    }
    assert!(!failure.contains("SIGABRT"), "{failure}");
    assert_eq!(j["tokens"]["source"], "not_tokenized", "{}", j["tokens"]);
}

// ------------------------------------------------------- receipt atomicity

/// Ctrl-C at any moment leaves either the previous receipt or a complete new
/// one, never a half-written file or a temp file; a run interrupted after it
/// started says so in its receipt (`interrupted`, `steps_run`) and exits 130.
/// Timing only decides which of those outcomes is checked, never whether the
/// test passes.
#[test]
fn interrupted_run_leaves_a_whole_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = SynthConfig::preset(Preset::Small);
    cfg.seed = 3;
    let model = dir.path().join("small.gguf");
    divergence::synth::write_model(&cfg, &model).unwrap();
    let receipt = dir.path().join("receipt.json");
    let old = "{\"previous\": \"receipt\"}\n";
    let steps = 230;
    let mut saw_interrupted = false;
    for delay_ms in [0u64, 150, 400, 800, 1500] {
        std::fs::write(&receipt, old).unwrap();
        let mut child = Command::new(EXE)
            .args([
                "find",
                "--model",
                model.to_str().unwrap(),
                "--steps",
                &steps.to_string(),
                "-q",
                "--receipt",
            ])
            .arg(&receipt)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "SIGINT did not stop the run");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(!stderr.contains("panicked"), "{stderr}");
        let text = std::fs::read_to_string(&receipt).unwrap();
        if text != old {
            let r = divergence::receipt::Receipt::parse(&text).expect("a complete receipt");
            if r.interrupted {
                saw_interrupted = true;
                assert_eq!(status.code(), Some(130), "{stderr}");
                assert!(r.steps_run < steps + 1);
                assert!(stderr.contains("interrupted"), "{stderr}");
            } else {
                assert_eq!(r.steps_run, steps + 1);
            }
        } else {
            // Killed before the handler was installed: nothing was written.
            assert!(!status.success(), "a finished run must write its receipt");
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
    assert!(
        saw_interrupted,
        "no delay interrupted a running run; raise --steps"
    );
}

/// write_atomic replaces a file whole and leaves nothing beside it.
#[test]
fn write_atomic_replaces_whole_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.json");
    std::fs::write(&p, "old").unwrap();
    divergence::receipt::write_atomic(&p, b"new contents").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"new contents");
    // A failing write (target is a directory) leaves no temporary file.
    let d = dir.path().join("adir");
    std::fs::create_dir(&d).unwrap();
    assert!(divergence::receipt::write_atomic(&d, b"x").is_err());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

/// `gen-model` and `bench` refuse bad input with exit 2 and a message that
/// names the problem.
#[test]
fn gen_model_and_bench_bad_inputs_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    let o = out.to_str().unwrap();
    let not_gguf = dir.path().join("text.gguf");
    std::fs::write(&not_gguf, "hello").unwrap();
    let ng = not_gguf.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["gen-model", "--n-head", "0", "-o", o], "n_head"),
        (&["gen-model", "--n-head", "3", "-o", o], "n_head"),
        (&["gen-model", "--n-embd", "200", "-o", o], "n_embd"),
        (&["gen-model", "--preset", "nope", "-o", o], "nope"),
        (
            &["gen-model", "-o", "/nonexistent-dir/m.gguf"],
            "nonexistent-dir",
        ),
        (
            &["bench", "--model", "/nonexistent.gguf"],
            "nonexistent.gguf",
        ),
        (&["bench", "--model", ng], "magic"),
        (&["bench", "--kernel", "--n-in", "100"], "multiple of 128"),
        (&["bench", "--model", ng, "--threads", "0"], "--threads"),
        (&["bench", "--model", ng, "--prefill", "0"], "--prefill"),
        (&["bench", "--model", ng, "--rounds", "0"], "--rounds"),
        (
            &["bench", "--model", ng, "--sweep", "/nonexistent.jsonl"],
            "--sweep",
        ),
        (&["bench", "--model", ng, "--sweep-shard", "1/2"], "--sweep"),
    ];
    for (args, needle) in cases {
        let r = run_limited(args, Duration::from_secs(20));
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains(needle),
            "{args:?}: stderr does not name `{needle}`: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.stderr);
    }
}

/// `bench --sweep`: the corpus swept after the rounds as `sweep` runs it
/// (free mode, the judge on), its throughput consistent with its own
/// counts and wall time (no timing is asserted).
#[test]
fn bench_times_a_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    divergence::synth::write_model(&tiny(), &model).unwrap();
    let corpus = dir.path().join("c.jsonl");
    std::fs::write(
        &corpus,
        "{\"tokens\": [1, 5, 9, 12]}\n{\"prompt\": \"The quick brown fox\"}\n{\"tokens\": [1, 7]}\n",
    )
    .unwrap();
    let args = [
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prefill",
        "6",
        "--decode",
        "3",
        "--rounds",
        "1",
        "--json",
        "--sweep",
        corpus.to_str().unwrap(),
        "--sweep-steps",
        "2",
    ];
    let r = run_limited(&args, Duration::from_secs(120));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let sw = &v["sweep"];
    assert_eq!(sw["prompts"].as_u64(), Some(3), "{sw}");
    assert_eq!(sw["steps"].as_u64(), Some(2));
    assert_eq!(sw["divergences"].as_u64(), Some(0), "{sw}");
    // Each prompt's prefill positions and one per decode step.
    let positions = sw["positions"].as_u64().unwrap();
    assert!(positions >= 4 + 2 + 2 + 2 * 3, "{sw}");
    let wall = sw["wall_s"].as_f64().unwrap();
    assert!(wall > 0.0);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
    assert!(close(
        sw["prompts_per_minute"].as_f64().unwrap(),
        3.0 * 60.0 / wall
    ));
    assert!(close(
        sw["positions_per_second"].as_f64().unwrap(),
        positions as f64 / wall
    ));
    let [lo, hi]: [f64; 2] = serde_json::from_value(sw["prompt_s_range"].clone()).unwrap();
    let med = sw["prompt_s_median"].as_f64().unwrap();
    assert!(0.0 < lo && lo <= med && med <= hi && hi <= wall, "{sw}");
}

/// `bench` end to end on the tiny model: both engines timed in every
/// round, medians and paired ratios consistent with the rounds, the stage
/// clock's table present (no timing is asserted).
#[test]
fn bench_reports_rounds_ratios_and_stages() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    divergence::synth::write_model(&tiny(), &model).unwrap();
    let m = model.to_str().unwrap();
    let args = [
        "bench",
        "--model",
        m,
        "--prefill",
        "6",
        "--decode",
        "3",
        "--rounds",
        "3",
        "--json",
        "--stages",
    ];
    let r = run_limited(&args, Duration::from_secs(120));
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let rounds = |side: &str| -> Vec<[f64; 2]> { serde_json::from_value(v[side].clone()).unwrap() };
    let (cand, refr) = (rounds("candidate_rounds"), rounds("reference_rounds"));
    assert_eq!((cand.len(), refr.len()), (3, 3));
    assert!(cand
        .iter()
        .chain(&refr)
        .flatten()
        .all(|&x| x.is_finite() && x > 0.0));
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs[1]
    };
    let paired = median(cand.iter().zip(&refr).map(|(c, r)| c[1] / r[1]).collect());
    assert_eq!(v["decode_ratio"].as_f64().unwrap(), paired);
    assert_eq!(
        v["candidate"]["decode_tok_s"].as_f64().unwrap(),
        median(cand.iter().map(|c| c[1]).collect())
    );
    // The machine's read bandwidth around every round, and each engine's
    // decode GB/s as a fraction of it: the median over rounds of the
    // round's decode GB/s over the round's bandwidth.
    let bandwidth: Vec<f64> = serde_json::from_value(v["bandwidth_rounds"].clone()).unwrap();
    assert_eq!(bandwidth.len(), 3);
    assert!(bandwidth.iter().all(|&b| b.is_finite() && b > 0.0));
    assert_eq!(
        v["bandwidth_gbs"].as_f64().unwrap(),
        median(bandwidth.clone())
    );
    assert!(v["bandwidth_read_bytes"].as_u64().unwrap() >= 1 << 30);
    let weight_gb = v["weight_bytes_per_decode_token"].as_f64().unwrap() / 1e9;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
    for (side, rounds) in [("candidate", &cand), ("reference", &refr)] {
        let n = &v[side];
        let decode_gb_s = n["decode_gb_s"].as_f64().unwrap();
        assert!(close(
            decode_gb_s,
            weight_gb * n["decode_tok_s"].as_f64().unwrap()
        ));
        let fractions: Vec<f64> = rounds
            .iter()
            .zip(&bandwidth)
            .map(|(r, b)| weight_gb * r[1] / b)
            .collect();
        let fraction = n["decode_bandwidth_fraction"].as_f64().unwrap();
        assert!(
            close(fraction, median(fractions.clone())),
            "{side}: {fraction} vs {fractions:?}"
        );
        let range: [f64; 2] =
            serde_json::from_value(n["decode_bandwidth_fraction_range"].clone()).unwrap();
        let lowest = fractions.iter().copied().fold(f64::INFINITY, f64::min);
        let highest = fractions.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert!(
            close(range[0], lowest) && close(range[1], highest),
            "{side}: {range:?}"
        );
    }
    let stages = v["candidate_decode_stages"].as_array().unwrap();
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    for want in ["attn_norm", "q_proj", "attn_out", "ffn_down", "logits"] {
        assert!(names.contains(&want), "{names:?} lacks {want}");
    }
    assert!(stages.iter().all(|s| s["ms_per_token"]
        .as_f64()
        .is_some_and(|x| x.is_finite() && x >= 0.0)));
}
