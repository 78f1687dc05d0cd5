//! A real cross-language candidate: `examples/python/bitnet_numpy.py`, a
//! numpy BitNet forward pass with its own GGUF and I2_S reading, writes a
//! dump; `divergence compare` judges it against bitnet.cpp's dump. CI
//! installs numpy and safetensors; elsewhere the test says it is skipped.

mod common;

use divergence::compare::Blame;
use divergence::lockstep::{Measured, Verdict};
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

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/python/bitnet_numpy.py"
);

fn python_dump(model: &Path, out: &Path, bug: &str) {
    python_dump_with(model, out, &["--bug", bug]);
}

fn python_dump_with(model: &Path, out: &Path, extra: &[&str]) {
    let out_s = out.to_str().unwrap();
    let log = run(Command::new("python3")
        .args([
            SCRIPT,
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            TOKENS,
            "--steps",
            "3",
            "--out",
            out_s,
        ])
        .args(extra));
    assert!(out.is_file(), "the numpy engine wrote no dump: {log}");
}

/// A model, and bitnet.cpp's dump of the test's tokens on it.
fn model_and_reference(dir: &Path, cfg: SynthConfig) -> (std::path::PathBuf, std::path::PathBuf) {
    let model = dir.join("m.gguf");
    write_model(&cfg, &model).unwrap();
    let reference = dir.join("ref.safetensors");
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
    (model, reference)
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

/// Bugs whose whole effect is below the old free-run bound (NMSE 1e-2
/// against the reference) are found at their stage of layer 0 and blamed on
/// the candidate: each side is judged on its own local error.
#[test]
fn bugs_below_1e_2_nmse_are_found_at_their_stage() {
    if !python_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        seed: 1,
        ..SynthConfig::preset(Preset::Tiny)
    };
    let (model, reference) = model_and_reference(dir.path(), cfg);
    for (bug, stage) in [
        ("eps-hardcoded", Stage::AttnNorm),
        ("act-scale128", Stage::QProj),
    ] {
        let dump = dir.path().join(format!("{bug}.safetensors"));
        python_dump(&model, &dump, bug);
        let (code, r) = compare(
            &reference,
            &dump,
            &model,
            &dir.path().join(format!("{bug}.json")),
        );
        assert_eq!(code, 1, "{bug}: {:?}", r.first_divergence);
        let d = r.first_divergence.unwrap();
        assert_eq!(
            (d.step, d.layer, d.stage, d.blame.blame),
            (0, Some(0), stage, Blame::Candidate),
            "{bug}: {}",
            d.blame.reason
        );
        let sides = d.metrics.as_ref().expect("both sides emitted it").nmse;
        assert!(sides < 1e-2, "{bug}: NMSE against the reference {sides:e}");
        assert!(d.candidate_local.as_ref().is_some_and(|e| !e.pass));
        assert!(d.reference_local.as_ref().is_some_and(|e| e.pass));
    }
}

/// An engine whose RoPE is computed as Hugging Face does (its own angle
/// arithmetic, no FMA) is honest: clean at every stage.
#[test]
fn an_honest_rope_that_rounds_differently_stays_clean() {
    if !python_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        seed: 1,
        rope_theta: 500_000.0,
        ..SynthConfig::preset(Preset::Small)
    };
    let (model, reference) = model_and_reference(dir.path(), cfg);
    let dump = dir.path().join("hf.safetensors");
    python_dump_with(&model, &dump, &["--rope-style", "hf"]);
    let (code, r) = compare(&reference, &dump, &model, &dir.path().join("hf.json"));
    assert_eq!(code, 0, "{:?}", r.first_divergence.map(|d| d.blame.reason));
    // It is not bit-exact with the reference at q_rope, only honest.
    let q = r
        .stages
        .iter()
        .find(|s| s.stage == Stage::QRope && s.layer == Some(0))
        .unwrap();
    assert!(!q.all_exact);
}

/// A dump of the layer outputs, the final norm and the last position's
/// logits: a bug planted inside layer 5 is placed in layer 5, and the
/// receipt says the verdict is at layer granularity.
#[test]
fn a_dump_of_layer_outputs_places_a_bug_in_its_layer() {
    if !python_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        seed: 1,
        n_layer: 8,
        ..SynthConfig::preset(Preset::Tiny)
    };
    let (model, reference) = model_and_reference(dir.path(), cfg);
    let coarse = ["--stages", "l_out,result_norm,logits", "--last-logits"];
    let clean = dir.path().join("clean.safetensors");
    python_dump_with(&model, &clean, &coarse);
    let (code, r) = compare(&reference, &clean, &model, &dir.path().join("clean.json"));
    assert_eq!(code, 0, "{:?}", r.first_divergence.map(|d| d.blame.reason));
    let scope = r.coverage.scope.as_ref().expect("a declared scope");
    assert_eq!(scope.granularity, "layer");
    assert!(scope.note.contains("layer granularity"), "{}", scope.note);
    assert!(r.coverage.complete, "{:?}", r.coverage);

    let buggy = dir.path().join("bug.safetensors");
    let mut args = coarse.to_vec();
    args.extend(["--bug", "rope-pairs", "--bug-layer", "5"]);
    python_dump_with(&model, &buggy, &args);
    let (code, r) = compare(&reference, &buggy, &model, &dir.path().join("bug.json"));
    assert_eq!(code, 1);
    let d = r.first_divergence.unwrap();
    assert_eq!(
        (d.layer, d.stage, d.blame.blame, d.measured),
        (Some(5), Stage::LOut, Blame::Candidate, Measured::AcrossGap),
        "{}",
        d.blame.reason
    );
    // Layers 0 to 4 were judged at every step up to it and held.
    for step in r.step_results.iter().filter(|s| s.step <= d.step) {
        for x in step
            .stages
            .iter()
            .filter(|x| x.layer.is_some_and(|l| l < 5))
        {
            assert!(x.pass, "step {} layer {:?} {}", step.step, x.layer, x.stage);
        }
    }
}

/// The tiny preset as arch `bitnet`, seed 1, written into `dir`.
fn tiny_bitnet(dir: &Path) -> std::path::PathBuf {
    let model = dir.join("tiny.gguf");
    let cfg = SynthConfig {
        arch: "bitnet".into(),
        seed: 1,
        ..SynthConfig::preset(Preset::Tiny)
    };
    write_model(&cfg, &model).unwrap();
    model
}

/// The numpy engine as a `--candidate-cmd` (placeholders filled by the
/// harness), with `extra` arguments.
fn numpy_cmd(extra: &str) -> String {
    format!(
        "python3 {SCRIPT} --model {{model}} --tokens {{tokens}} --steps {{steps}} --kv {{kv}} --out {{out}} {extra}"
    )
}

/// `find` with `--candidate-cmd`: (exit code, receipt, stdout+stderr).
fn find_cmd(model: &Path, dir: &Path, cmd: &str, extra: &[&str]) -> (i32, Receipt, String) {
    let receipt = dir.join("cmd.json");
    let out = Command::new(env!("CARGO_BIN_EXE_divergence"))
        .args(["find", "-q", "--model", model.to_str().unwrap()])
        .args(["--tokens", TOKENS, "--steps", "3", "--candidate-cmd", cmd])
        .args(extra)
        .arg("--receipt")
        .arg(&receipt)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r = Receipt::read(&receipt).unwrap_or_else(|e| panic!("no receipt ({e}): {log}"));
    (out.status.code().unwrap_or(-1), r, log)
}

#[test]
fn find_runs_an_external_engine_as_a_command() {
    if !python_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_bitnet(dir.path());

    let (code, r, log) = find_cmd(&model, dir.path(), &numpy_cmd("--bug none"), &[]);
    assert_eq!(code, 0, "clean: {log}");
    assert_eq!(r.verdict, Verdict::NoDivergence);
    let off = r.offline.as_ref().expect("judged as dumps are");
    assert_eq!(
        off.candidate_cmd.as_deref(),
        Some(numpy_cmd("--bug none").as_str())
    );
    assert!(
        Path::new(&off.candidate_dump).is_file(),
        "the evidence is kept"
    );

    // A bug below 1e-2 NMSE, in layer 1 only: found at its stage and layer.
    let (code, r, log) = find_cmd(
        &model,
        dir.path(),
        &numpy_cmd("--bug eps-hardcoded --bug-layer 1"),
        &[],
    );
    assert_eq!(code, 1, "{log}");
    let d = r
        .first_divergence
        .as_ref()
        .expect("the planted bug is found");
    assert_eq!(
        (d.step, d.layer, d.stage, d.blame.blame),
        (0, Some(1), Stage::AttnNorm, Blame::Candidate),
        "{log}"
    );

    // A command that fails: candidate_failed (exit 5), its status and the
    // end of its stderr in the receipt, escape codes escaped.
    let (code, r, log) = find_cmd(
        &model,
        dir.path(),
        "sh -c 'echo loading {model} >&2; printf \"\\033[2Jout of memory\\n\" >&2; exit 7' {out}",
        &[],
    );
    assert_eq!(code, 5, "{log}");
    assert_eq!(r.verdict, Verdict::CandidateFailed);
    let why = serde_json::to_string(&r.candidate_failure).unwrap();
    assert!(
        why.contains("status 7") && why.contains("out of memory"),
        "{why}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "no raw escape code on the terminal: {log}"
    );

    // Too slow: killed at --candidate-timeout, candidate_failed.
    let (code, r, log) = find_cmd(
        &model,
        dir.path(),
        "sh -c 'sleep 60' {out}",
        &["--candidate-timeout", "1"],
    );
    assert_eq!((code, r.verdict), (5, Verdict::CandidateFailed), "{log}");
    assert!(log.contains("timed out"), "{log}");

    // Exits 0 without writing its dump, or writing garbage.
    let (code, _, log) = find_cmd(&model, dir.path(), "true {out}", &[]);
    assert_eq!(code, 5, "{log}");
    let (code, r, log) = find_cmd(
        &model,
        dir.path(),
        "sh -c 'head -c 5000 /dev/urandom > \"$0\"' {out}",
        &[],
    );
    assert_eq!((code, r.verdict), (5, Verdict::CandidateFailed), "{log}");

    // A template that cannot be a command is bad input, before anything runs.
    let out = Command::new(env!("CARGO_BIN_EXE_divergence"))
        .args(["find", "-q", "--model", model.to_str().unwrap()])
        .args(["--candidate-cmd", "engine --model {model} {oops}"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("{oops}"));
}

#[test]
fn a_sweep_runs_an_external_engine_on_every_prompt_and_merges() {
    if !python_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_bitnet(dir.path());
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"tokens\": [1, 407, 259]}\n{\"tokens\": [1, 300, 301, 302]}\n{\"prompt\": \"fn main\"}\n",
    )
    .unwrap();
    let sweep = |extra: &[&str], out: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_divergence"))
            .args(["sweep", "-q", "--model", model.to_str().unwrap()])
            .args(["--prompts", prompts.to_str().unwrap(), "--steps", "2"])
            .args(["--candidate-cmd", &numpy_cmd("--bug act-scale128")])
            .args(extra)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.code(), log)
    };
    let whole = dir.path().join("whole.json");
    let (code, log) = sweep(&[], &whole);
    assert_eq!(code, Some(1), "{log}");
    let sw = divergence::sweep::Sweep::read(&whole).unwrap();
    assert_eq!(sw.prompts.len(), 3);
    for p in &sw.prompts {
        let d = p
            .first_divergence
            .as_ref()
            .unwrap_or_else(|| panic!("{log}"));
        assert_eq!(
            (d.stage, d.blame),
            (Stage::QProj, Blame::Candidate),
            "{log}"
        );
    }
    // Two shards merge into the same file as the whole run.
    let shards: Vec<_> = (1..=2)
        .map(|i| {
            let out = dir.path().join(format!("s{i}.json"));
            let (code, log) = sweep(&["--shard", &format!("{i}/2")], &out);
            assert_eq!(code, Some(1), "{log}");
            out
        })
        .collect();
    let merged = dir.path().join("merged.json");
    let o = Command::new(env!("CARGO_BIN_EXE_divergence"))
        .arg("merge")
        .args(&shards)
        .arg("-o")
        .arg(&merged)
        .output()
        .unwrap();
    // The merged sweep's exit code is the whole run's: 1, a divergence.
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let m = divergence::sweep::Sweep::read(&merged).unwrap();
    assert_eq!(m.identity(), sw.identity());
}

#[test]
fn a_black_box_running_bitnet_with_squared_relu_is_caught_at_its_first_wrong_token() {
    if !python_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_bitnet(dir.path());
    // Tokens only, the model's own activation: clean.
    let (code, r, log) = find_cmd(&model, dir.path(), &numpy_cmd("--stages none"), &[]);
    assert_eq!(code, 0, "{log}");
    assert_eq!(r.coverage.scope.as_ref().unwrap().granularity, "tokens");
    // Squared ReLU where arch bitnet is SiLU-gated: the first token it gets
    // wrong is the divergence, with the reference's rank, gap and probability.
    let (code, r, log) = find_cmd(
        &model,
        dir.path(),
        &numpy_cmd("--stages none --ffn-act relu2"),
        &[],
    );
    assert_eq!(code, 1, "{log}");
    let d = r.first_divergence.as_ref().unwrap();
    assert_eq!(d.measured, Measured::Choice);
    assert_eq!(d.blame.blame, Blame::Candidate);
    let first_wrong = r
        .generated
        .reference
        .iter()
        .zip(&r.generated.candidate)
        .position(|(a, b)| a != b)
        .expect("a wrong token");
    assert_eq!(d.step, first_wrong, "{log}");
    for figure in ["ranks it", "below the top-1 logit", "probability"] {
        assert!(d.blame.reason.contains(figure), "{}", d.blame.reason);
    }
    assert!(log.contains("tokens only"), "{log}");
}

/// `--ffn-act` reaches an external engine: bitnet.cpp and the oracle run
/// it, and the command is given it as `{ffn_act}`; a command that keeps the
/// arch's own SiLU is caught at `ffn_act`. Through dumps, `capture
/// --ffn-act` records it in the manifest and `compare` gives the oracle the
/// same one.
#[test]
fn ffn_act_reaches_an_external_engine_and_the_dumps() {
    if !python_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_bitnet(dir.path());
    let relu2 = ["--ffn-act", "relu2"];
    let (code, r, log) = find_cmd(
        &model,
        dir.path(),
        &numpy_cmd("--ffn-act {ffn_act}"),
        &relu2,
    );
    assert_eq!(code, 0, "{log}");
    assert_eq!(r.run.ffn_act, Some(divergence::FfnAct::Relu2));
    let (code, r, log) = find_cmd(&model, dir.path(), &numpy_cmd("--ffn-act silu"), &relu2);
    assert_eq!(code, 1, "{log}");
    let d = r.first_divergence.as_ref().expect("a divergence");
    assert_eq!(
        (d.step, d.layer, d.stage, d.blame.blame),
        (0, Some(0), Stage::FfnAct, Blame::Candidate),
        "{log}"
    );

    let reference = dir.path().join("ref.safetensors");
    let log = run(Command::new(env!("CARGO_BIN_EXE_divergence"))
        .args(["capture", "--model", model.to_str().unwrap()])
        .args(["--tokens", TOKENS, "--steps", "3", "--ffn-act", "relu2"])
        .arg("--out")
        .arg(&reference));
    assert!(reference.is_file(), "{log}");
    let candidate = dir.path().join("cand.safetensors");
    python_dump_with(&model, &candidate, &["--ffn-act", "relu2"]);
    let (code, r) = compare(&reference, &candidate, &model, &dir.path().join("c.json"));
    assert_eq!(code, 0, "{:?}", r.first_divergence);
    assert_eq!(r.run.ffn_act, Some(divergence::FfnAct::Relu2));
    // The arch's own SiLU in the candidate's dump: caught at ffn_act.
    let silu = dir.path().join("silu.safetensors");
    python_dump_with(&model, &silu, &["--ffn-act", "silu"]);
    let (code, r) = compare(&reference, &silu, &model, &dir.path().join("s.json"));
    assert_eq!(code, 1);
    assert_eq!(r.first_divergence.unwrap().stage, Stage::FfnAct);
}
