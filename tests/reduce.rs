//! `divergence reduce` (issue 23): the test that decides whether a
//! reduction still fails, the refusal of a nondeterministic original, bad
//! input, and end to end on the tiny and small synthetic models (fast
//! enough for CI): a candidate bug planted in a middle layer reduces to two
//! layers and a few ids, with the model from its recipe and as a plain
//! file. The done-means measurements on the 3B and 2B-4T shapes are in
//! docs/reduce.md (release build, by hand: they need GB-sized models).

mod common;

use divergence::gguf::GgufFile;
use divergence::lockstep::Prompt;
use divergence::receipt::{Receipt, RunRecord};
use divergence::reduce::{Options, ReduceError, Reducer};
use divergence::trace::Stage;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

const EXE: &str = env!("CARGO_BIN_EXE_divergence");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A checked-in receipt, its model moved into `dir` (made again from its
/// recipe when a run needs it).
fn receipt_in(name: &str, dir: &Path) -> (PathBuf, Receipt) {
    let mut r = Receipt::read(&repo().join("receipts").join(name)).expect("checked-in receipt");
    let model = dir.join("model.gguf").display().to_string();
    r.run.model_path = model.clone();
    r.model.path = model;
    let path = dir.join(name);
    r.write(&path).expect("write receipt");
    (path, r)
}

fn options(dir: &Path) -> Options {
    Options {
        dir: dir.to_path_buf(),
        budget_s: None,
        keep_going: false,
        stop: Arc::new(AtomicBool::new(false)),
        on_attempt: None,
        threads: None,
    }
}

fn attempts(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("attempts.jsonl"))
        .expect("attempts log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn prompt_len(r: &RunRecord) -> usize {
    match &r.prompt {
        Prompt::Tokens(ids) => ids.len(),
        Prompt::Text(t) => t.len(),
    }
}

#[test]
fn a_reduction_that_changes_the_failure_is_unresolved_and_not_taken() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, original) = receipt_in("zoo-missing-row-sum.json", tmp.path());
    // Scripted engines: the failure needs three prompt tokens; with fewer
    // the run shows another stage (what a careless minifier would take).
    let base = original.clone();
    let mut runner = move |record: &RunRecord| {
        let mut r = base.clone();
        r.run = record.clone();
        if let Prompt::Tokens(ids) = &record.prompt {
            if ids.len() < 3 {
                r.first_divergence.as_mut().unwrap().stage = Stage::KProj;
            }
        }
        Ok(r)
    };
    let out = tmp.path().join("out");
    let summary = Reducer::new(original, options(&out), &mut runner)
        .and_then(Reducer::reduce)
        .expect("reduces");
    assert_eq!(summary.prompt_tokens, Some(3));
    let log = attempts(&out);
    let unresolved: Vec<_> = log
        .iter()
        .filter(|a| a["judgement"] == "unresolved")
        .collect();
    assert!(
        unresolved
            .iter()
            .any(|a| a["reason"].as_str().unwrap().contains("another failure")),
        "{log:#?}"
    );
    let kept = Receipt::read(&out.join("receipt.json")).unwrap();
    assert_eq!(kept.first_divergence.unwrap().stage, Stage::QProj);
    assert_eq!(prompt_len(&kept.run), 3);
    // Resuming reads the log back: nothing is run again that was judged.
    let (_, original) = receipt_in("zoo-missing-row-sum.json", tmp.path());
    let mut runs = 0;
    let base = original.clone();
    let mut counting = |record: &RunRecord| {
        runs += 1;
        let mut r = base.clone();
        r.run = record.clone();
        Ok(r)
    };
    Reducer::new(original, options(&out), &mut counting)
        .and_then(Reducer::reduce)
        .expect("resumes");
    assert!(attempts(&out).iter().any(|a| a["resumed"] == true));
    let _ = runs;
}

#[test]
fn a_nondeterministic_original_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, original) = receipt_in("zoo-missing-row-sum.json", tmp.path());
    let base = original.clone();
    let mut calls = 0;
    let mut runner = move |record: &RunRecord| {
        calls += 1;
        let mut r = base.clone();
        r.run = record.clone();
        if calls == 2 {
            // The second run of the same request diverges one layer later.
            r.first_divergence.as_mut().unwrap().layer = Some(1);
        }
        Ok(r)
    };
    let err = Reducer::new(original, options(tmp.path()), &mut runner)
        .err()
        .expect("refused");
    assert!(matches!(err, ReduceError::Nondeterministic(_)), "{err}");
    assert!(err.to_string().contains("run 2"), "{err}");
}

#[test]
fn bad_receipts_exit_2_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let (clean, _) = receipt_in("parity-tiny-bitnet-resync-t1-f16.json", tmp.path());
    let out = Command::new(EXE)
        .args(["reduce", clean.to_str().unwrap(), "-o"])
        .arg(tmp.path().join("a"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no divergence"));

    let (path, mut r) = receipt_in("zoo-missing-row-sum.json", tmp.path());
    r.model.recipe = None;
    r.write(&path).unwrap();
    let out = Command::new(EXE)
        .args(["reduce", path.to_str().unwrap(), "-o"])
        .arg(tmp.path().join("b"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no recipe"));

    let junk = tmp.path().join("junk.json");
    std::fs::write(&junk, b"{\"schema_version\": 3").unwrap();
    let out = Command::new(EXE)
        .args(["reduce", junk.to_str().unwrap(), "-o"])
        .arg(tmp.path().join("c"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// Runs `reduce` on a checked-in receipt with both engines; returns the out dir.
fn reduce_for_real(name: &str, tmp: &Path) -> PathBuf {
    let (path, _) = receipt_in(name, tmp);
    let out = tmp.join("out");
    let run = Command::new(EXE)
        .args(["reduce", path.to_str().unwrap(), "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    for f in [
        "reduced.gguf",
        "receipt.json",
        "repro.sh",
        "tokens.txt",
        "prompt.txt",
        "attempts.jsonl",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let verify = Command::new(EXE)
        .arg("verify")
        .arg(out.join("receipt.json"))
        .output()
        .unwrap();
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    GgufFile::open(&out.join("reduced.gguf")).expect("our reader reads the reduced file");
    out
}

#[test]
fn a_candidate_bug_reduces_and_its_receipt_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let out = reduce_for_real("zoo-missing-row-sum.json", tmp.path());
    let r = Receipt::read(&out.join("receipt.json")).unwrap();
    let d = r.first_divergence.as_ref().unwrap();
    assert_eq!(d.stage, Stage::QProj);
    assert_eq!(d.blame.blame, divergence::compare::Blame::Candidate);
    assert_eq!(r.run.steps, 0, "steps after the divergence's are dropped");
    assert!(prompt_len(&r.run) <= 2, "{:?}", r.run.prompt);
}

#[test]
fn the_reference_ffn_down_bug_keeps_its_cause_on_smaller_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = reduce_for_real("zoo-reference-i2s-unaligned-rows.json", tmp.path());
    let r = Receipt::read(&out.join("receipt.json")).unwrap();
    let d = r.first_divergence.as_ref().unwrap();
    assert_eq!(d.blame.blame, divergence::compare::Blame::Reference);
    assert!(d.blame.cause.as_ref().unwrap().contains("last 64 values"));
    let recipe = r
        .model
        .recipe
        .as_ref()
        .expect("a synthetic model keeps its recipe");
    assert_eq!(recipe.n_ff % 128, 64);
    assert!(recipe.n_ff < 320 || recipe.n_embd < 256, "{recipe:?}");
}

#[test]
fn removing_the_layers_before_is_not_taken_when_the_failure_goes_with_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, mut original) = receipt_in("zoo-missing-row-sum.json", tmp.path());
    // The failure at layer 1 of 2; a scripted engine shows it only while the
    // model keeps both layers (as when the bug needs what layer 0 makes).
    original.first_divergence.as_mut().unwrap().layer = Some(1);
    let base = original.clone();
    let mut runner = move |record: &RunRecord| {
        let mut r = base.clone();
        r.run = record.clone();
        let f = GgufFile::open(Path::new(&record.model_path)).map_err(|e| e.to_string())?;
        let arch = f.get_str("general.architecture").unwrap().to_string();
        if f.get_u32(&format!("{arch}.block_count")).unwrap() < 2 {
            r.verdict = divergence::lockstep::Verdict::NoDivergence;
            r.first_divergence = None;
        }
        Ok(r)
    };
    let out = tmp.path().join("out");
    let summary = Reducer::new(original, options(&out), &mut runner)
        .and_then(Reducer::reduce)
        .expect("reduces");
    assert_eq!(summary.n_layer, Some(2));
    let log = attempts(&out);
    let before: Vec<_> = log
        .iter()
        .filter(|a| {
            a["what"]
                .as_str()
                .unwrap()
                .contains("before layer 1 removed")
        })
        .collect();
    assert!(!before.is_empty(), "{log:#?}");
    assert!(
        before.iter().all(|a| a["judgement"] == "unresolved"),
        "{before:#?}"
    );
    // The clean run is kept as the nearest passing variant.
    assert!(summary.min_good.is_some());
}

#[test]
fn a_receipt_of_an_external_engine_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, mut r) = receipt_in("zoo-missing-row-sum.json", tmp.path());
    r.offline = Some(divergence::receipt::OfflineRecord {
        reference_dump: "ref.safetensors".into(),
        candidate_dump: "cand.safetensors".into(),
        map: None,
        model_given: true,
        note: String::new(),
        candidate_cmd: Some("my-engine --model {model} --out {out}".into()),
    });
    r.write(&path).unwrap();
    let out = Command::new(EXE)
        .args(["reduce", path.to_str().unwrap(), "-o"])
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--candidate-cmd"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_reduce_and_inject_layer_options_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, _) = receipt_in("zoo-missing-row-sum.json", tmp.path());
    let out = Command::new(EXE)
        .args(["reduce", path.to_str().unwrap(), "--threads", "0", "-o"])
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--threads"));
    let model = tmp.path().join("tiny.gguf");
    gen(&["--preset", "tiny", "--seed", "1"], &model);
    let out = Command::new(EXE)
        .args(["find", "-q", "--model", model.to_str().unwrap()])
        .args([
            "--inject",
            "missing-row-sum",
            "--inject-layer",
            "7",
            "--receipt",
        ])
        .arg(tmp.path().join("r.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--inject-layer 7: the model has 2 layer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn gen(args: &[&str], out: &Path) {
    let g = Command::new(EXE)
        .arg("gen-model")
        .args(args)
        .args(["-q", "-o"])
        .arg(out)
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
}

/// `find` with a fault planted in one layer; returns the receipt.
fn find_with_fault(model: &Path, prompt: &str, layer: usize, receipt: &Path) -> Receipt {
    let f = Command::new(EXE)
        .args(["find", "-q", "--model", model.to_str().unwrap()])
        .args(["--prompt", prompt, "--steps", "2", "--threads", "2"])
        .args([
            "--inject",
            "missing-row-sum",
            "--inject-layer",
            &layer.to_string(),
        ])
        .arg("--receipt")
        .arg(receipt)
        .output()
        .unwrap();
    assert_eq!(
        f.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&f.stderr)
    );
    let r = Receipt::read(receipt).unwrap();
    let d = r.first_divergence.as_ref().unwrap();
    assert_eq!((d.layer, d.stage), (Some(layer), Stage::QProj));
    r
}

/// `reduce --threads 2` into `out`; the reduced receipt, after checking it verifies.
fn reduce_and_verify(receipt: &Path, out: &Path) -> Receipt {
    let run = Command::new(EXE)
        .args([
            "reduce",
            "-q",
            receipt.to_str().unwrap(),
            "--threads",
            "2",
            "-o",
        ])
        .arg(out)
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let verify = Command::new(EXE)
        .arg("verify")
        .arg(out.join("receipt.json"))
        .output()
        .unwrap();
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    Receipt::read(&out.join("receipt.json")).unwrap()
}

fn n_layer(model: &Path) -> u32 {
    let f = GgufFile::open(model).unwrap();
    let arch = f.get_str("general.architecture").unwrap().to_string();
    f.get_u32(&format!("{arch}.block_count")).unwrap()
}

/// The 2B-4T done-means on the `small` shape: a fault planted in layer 2
/// of 4 with a long text prompt reduces to 2 layers (the failing one, now
/// layer 0, and a guard) and at most 4 ids, and the injected fault's layer
/// moved with the layers removed before it.
#[test]
fn a_fault_in_a_middle_layer_reduces_to_two_layers_and_a_few_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("small.gguf");
    gen(&["--preset", "small", "--seed", "1"], &model);
    let prompt = "The capital of France is Paris, and it is huge";
    let receipt = tmp.path().join("find.json");
    let original = find_with_fault(&model, prompt, 2, &receipt);
    assert!(original.tokens.reference.len() >= 20);

    let out = tmp.path().join("out");
    let r = reduce_and_verify(&receipt, &out);
    let d = r.first_divergence.as_ref().unwrap();
    assert_eq!((d.layer, d.stage), (Some(0), Stage::QProj));
    assert_eq!(d.blame.blame, divergence::compare::Blame::Candidate);
    assert_eq!(r.run.fault_layer, Some(0));
    assert!(n_layer(&out.join("reduced.gguf")) <= 2);
    assert!(prompt_len(&r.run) <= 4, "{:?}", r.run.prompt);
    assert!(matches!(r.run.prompt, Prompt::Tokens(_)));
    let repro = std::fs::read_to_string(out.join("repro.sh")).unwrap();
    assert!(repro.contains("--inject-layer 0"), "{repro}");

    // The same as a plain file (no recipe): the layers are cut out of the
    // file and renumbered, and the vocabulary's reduction is skipped with
    // its reason logged.
    let plain = tmp.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let mut o = Receipt::read(&receipt).unwrap();
    o.model.recipe = None;
    let plain_receipt = plain.join("find.json");
    o.write(&plain_receipt).unwrap();
    let out = plain.join("out");
    let r = reduce_and_verify(&plain_receipt, &out);
    let d = r.first_divergence.as_ref().unwrap();
    assert_eq!((d.layer, d.stage), (Some(0), Stage::QProj));
    assert_eq!(n_layer(&out.join("reduced.gguf")), 2);
    assert!(prompt_len(&r.run) <= 4, "{:?}", r.run.prompt);
    let f = GgufFile::open(&out.join("reduced.gguf")).unwrap();
    assert!(f.tensor("blk.1.ffn_down.weight").is_some());
    assert!(f.tensor("blk.2.ffn_down.weight").is_none());
    let log = attempts(&out);
    assert!(
        log.iter().any(|a| a["judgement"] == "skipped"
            && a["what"] == "vocabulary"
            && a["reason"].as_str().unwrap().contains("without a recipe")),
        "{log:#?}"
    );
}

/// A real vocabulary (llama.cpp's llama3 file) is replaced by a synthetic
/// one only once the prompt is ids; the case still fails and verifies.
#[test]
fn a_real_vocabulary_gives_way_to_a_synthetic_one_once_the_prompt_is_ids() {
    let dir = std::env::var_os("DIVERGENCE_VOCAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/vocab"));
    let vocab = dir.join("ggml-vocab-llama-bpe.gguf");
    if !vocab.is_file() {
        common::skip(
            "reduce on a real vocabulary",
            &format!("{} not found: run scripts/fetch-vocab.sh", vocab.display()),
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m.gguf");
    gen(
        &[
            "--preset",
            "tiny",
            "--arch",
            "bitnet-b1.58",
            "--seed",
            "1",
            "--vocab",
            vocab.to_str().unwrap(),
        ],
        &model,
    );
    let receipt = tmp.path().join("find.json");
    find_with_fault(&model, "Hello world, this is a test", 1, &receipt);
    let out = tmp.path().join("out");
    let r = reduce_and_verify(&receipt, &out);
    let recipe = r.model.recipe.as_ref().unwrap();
    assert!(recipe.vocab_source.is_none());
    assert!(recipe.n_vocab < 128256, "{}", recipe.n_vocab);
    let log = attempts(&out);
    assert!(
        log.iter().any(|a| a["what"]
            .as_str()
            .unwrap()
            .starts_with("vocabulary: the real one")
            && a["judgement"] == "fails"),
        "{log:#?}"
    );
}
