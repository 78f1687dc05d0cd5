//! The checked-in receipts: every one validates against `receipts/schema.json`
//! and `divergence verify` reproduces every one of them.
//!
//! The models they name are regenerated exactly as `scripts/regen-receipts.sh`
//! makes them (synthetic, deterministic: the sha256 in each receipt is checked
//! by verify itself).

use std::path::{Path, PathBuf};
use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_divergence");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn receipts() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(repo().join("receipts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && p.file_name().is_some_and(|n| n != "schema.json")
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_checked_in_receipt_validates_against_the_schema() {
    let schema: serde_json::Value = serde_json::from_str(divergence::receipt::SCHEMA).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let all = receipts();
    assert!(
        all.len() >= 19,
        "expected the parity and zoo receipts, found {}",
        all.len()
    );
    for path in all {
        let value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| format!("{e} at {}", e.instance_path))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        divergence::receipt::Receipt::read(&path).unwrap();
    }
}

#[test]
fn verify_reproduces_every_checked_in_receipt_from_a_fresh_working_directory() {
    // As on a fresh clone: no model exists yet. Every receipt records the
    // recipe of its synthetic model; verify makes the model again (checking
    // its sha256) and re-runs what the receipt recorded, under the policy it
    // recorded.
    let fresh = tempfile::tempdir().unwrap();
    let out = Command::new(EXE)
        .current_dir(fresh.path())
        .arg("verify")
        .args(receipts())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches("same result").count(),
        receipts().len(),
        "{stdout}"
    );
    assert!(stdout.contains("made target/receipt-models/"), "{stdout}");
}

#[test]
fn verify_notices_a_changed_result() {
    // A receipt whose recorded first divergence is edited no longer verifies.
    let src = repo().join("receipts/zoo-gqa-modulo.json");
    let mut r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&src).unwrap()).unwrap();
    r["first_divergence"]["layer"] = serde_json::json!(1);
    let dir = tempfile::tempdir().unwrap();
    let edited = dir.path().join("edited.json");
    std::fs::write(&edited, serde_json::to_string_pretty(&r).unwrap()).unwrap();
    let out = Command::new(EXE)
        .current_dir(dir.path())
        .arg("verify")
        .arg(&edited)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("DIFFERENT") && stdout.contains("first_divergence"),
        "{stdout}"
    );
}
