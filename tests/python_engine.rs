//! A real cross-language candidate: `examples/python/bitnet_numpy.py`, a
//! numpy BitNet forward pass with its own GGUF and I2_S reading, writes a
//! dump; `divergence compare` judges it against bitnet.cpp's dump. CI
//! installs numpy and safetensors; elsewhere the test says it is skipped.

mod common;

use divergence::compare::Blame;
use divergence::lockstep::Verdict;
use divergence::receipt::Receipt;
use divergence::synth::{write_model, Preset, SynthConfig};
use divergence::trace::Stage;
use std::path::Path;
use std::process::Command;

const TOKENS: &str = "1,407,259,340,344,332,326,334";

fn python_ready() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import numpy, safetensors"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        common::skip(
            "the numpy example engine",
            "python3 packages numpy/safetensors not installed (pip install numpy safetensors)",
        );
    }
    ok
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.code().is_some(), "{log}");
    log
}

fn python_dump(model: &Path, out: &Path, bug: &str) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/bitnet_numpy.py"
    );
    let out_s = out.to_str().unwrap();
    let log = run(Command::new("python3").args([
        script,
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        TOKENS,
        "--steps",
        "3",
        "--bug",
        bug,
        "--out",
        out_s,
    ]));
    assert!(out.is_file(), "the numpy engine wrote no dump: {log}");
}

/// (exit code, receipt) of comparing `candidate` against `reference`.
fn compare(reference: &Path, candidate: &Path, model: &Path, receipt: &Path) -> (i32, Receipt) {
    let out = Command::new(env!("CARGO_BIN_EXE_divergence"))
        .args(["compare", "--reference"])
        .arg(reference)
        .arg("--candidate")
        .arg(candidate)
        .arg("--model")
        .arg(model)
        .arg("--receipt")
        .arg(receipt)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        Receipt::read(receipt).unwrap(),
    )
}

#[test]
fn the_numpy_engine_matches_bitnet_cpp_and_its_planted_bug_is_localised() {
    if !python_ready() {
        return;
    }
    for arch in ["bitnet", "llama"] {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        let cfg = SynthConfig {
            arch: arch.into(),
            seed: 1,
            ..SynthConfig::preset(Preset::Tiny)
        };
        write_model(&cfg, &model).unwrap();
        let reference = dir.path().join("ref.safetensors");
        let log = run(Command::new(env!("CARGO_BIN_EXE_divergence")).args([
            "capture",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            TOKENS,
            "--steps",
            "3",
            "--out",
            reference.to_str().unwrap(),
        ]));
        assert!(reference.is_file(), "{log}");

        let clean = dir.path().join("numpy.safetensors");
        python_dump(&model, &clean, "none");
        let (code, r) = compare(&reference, &clean, &model, &dir.path().join("r1.json"));
        assert_eq!(code, 0, "{arch}: {:?}", r.first_divergence);
        assert!(r.coverage.complete, "{arch}: {:?}", r.coverage);
        assert_eq!(r.generated.disagreements, vec![], "{arch}");
        // What it matches bit for bit: the embedding and everything before the
        // first RoPE (norm, activation codes, integer products, epilogue).
        for (stage, layer) in [
            (Stage::TokEmbd, None),
            (Stage::AttnNorm, Some(0)),
            (Stage::QProj, Some(0)),
            (Stage::KProj, Some(0)),
            (Stage::VProj, Some(0)),
        ] {
            let s = r
                .stages
                .iter()
                .find(|s| s.stage == stage && s.layer == layer)
                .unwrap();
            assert!(s.all_exact, "{arch}: {stage} was not bit-exact");
        }

        let buggy = dir.path().join("numpy-bug.safetensors");
        python_dump(&model, &buggy, "rope-pairs");
        let (code, r) = compare(&reference, &buggy, &model, &dir.path().join("r2.json"));
        assert_eq!(code, 1, "{arch}");
        assert_eq!(r.verdict, Verdict::Divergence);
        let d = r.first_divergence.unwrap();
        assert_eq!(
            (d.step, d.layer, d.stage, d.blame.blame),
            (0, Some(0), Stage::QRope, Blame::Candidate),
            "{arch}: {}",
            d.blame.reason
        );
    }
}
