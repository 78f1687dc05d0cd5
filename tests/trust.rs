//! A verdict you can trust: coverage accounting (a stage one side does not
//! produce, a reference node that maps to nothing, tokens not compared) and
//! a candidate that fails mid-run, each through the public Candidate API.

use divergence::candidate::{
    BuiltinCandidate, Candidate, CandidateError, CandidateLoader, KvSemantics, LoadOptions,
};
use divergence::compare::Policy;
use divergence::lockstep::{self, Mode, Outcome, Prompt, RunConfig, TokenSource, Verdict};
use divergence::synth::{write_model, Preset, SynthConfig};
use divergence::trace::{Stage, StageKey, TraceSink};
use divergence::ModelConfig;
use std::path::{Path, PathBuf};

const PROMPT: &str = "The quick brown fox";

fn tiny() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let cfg = SynthConfig {
        seed: 1,
        ..SynthConfig::preset(Preset::Tiny)
    };
    write_model(&cfg, &path).unwrap();
    (dir, path)
}

fn config(model: &Path, mode: Mode) -> RunConfig {
    RunConfig {
        steps: 1,
        mode,
        ..RunConfig::new(
            model.to_path_buf(),
            Prompt::Text(PROMPT.into()),
            Policy::default_policy(),
            PathBuf::from(env!("CARGO_BIN_EXE_divergence")),
        )
    }
}

/// What a wrapped engine does differently.
#[derive(Clone, Copy, Default)]
struct Misbehaviour {
    /// Never hand this stage to the sink.
    skip: Option<StageKey>,
    /// Panic when this stage is reached.
    panic_at: Option<StageKey>,
    /// Claim to have no tokenizer.
    no_tokenizer: bool,
}

/// Our engine behind a filter: the template of a misbehaving candidate.
struct Wrapped {
    inner: Box<dyn Candidate>,
    how: Misbehaviour,
}

struct Filter<'a> {
    sink: &'a mut dyn TraceSink,
    how: Misbehaviour,
}

impl TraceSink for Filter<'_> {
    fn stage(&mut self, layer: Option<usize>, stage: Stage, shape: &[usize], data: &mut [f32]) {
        let key = StageKey::new(layer, stage);
        if self.how.panic_at == Some(key) {
            panic!("deliberate panic at {key}");
        }
        if self.how.skip != Some(key) {
            self.sink.stage(layer, stage, shape, data);
        }
    }
}

impl Candidate for Wrapped {
    fn name(&self) -> String {
        format!("wrapped {}", self.inner.name())
    }
    fn build(&self) -> String {
        self.inner.build()
    }
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Option<Vec<u32>> {
        if self.how.no_tokenizer {
            None
        } else {
            self.inner.tokenize(text, add_special, parse_special)
        }
    }
    fn kv_semantics(&self) -> KvSemantics {
        self.inner.kv_semantics()
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
    fn forward(
        &mut self,
        tokens: &[u32],
        pos0: usize,
        sink: &mut dyn TraceSink,
    ) -> Result<Vec<f32>, CandidateError> {
        let mut filter = Filter {
            sink,
            how: self.how,
        };
        self.inner.forward(tokens, pos0, &mut filter)
    }
}

fn run_wrapped(model: &Path, mode: Mode, how: Misbehaviour) -> Outcome {
    let loader = move |opts: &LoadOptions| -> Result<Box<dyn Candidate>, CandidateError> {
        Ok(Box::new(Wrapped {
            inner: BuiltinCandidate::default().load(opts)?,
            how,
        }))
    };
    lockstep::run(&config(model, mode), &loader).expect("the run completes")
}

#[test]
fn a_candidate_that_skips_a_trace_point_is_incomplete_not_clean() {
    let (_d, m) = tiny();
    let skipped = StageKey::new(Some(1), Stage::FfnSubNorm);
    for mode in [Mode::Resync, Mode::Free] {
        let o = run_wrapped(
            &m,
            mode,
            Misbehaviour {
                skip: Some(skipped),
                ..Default::default()
            },
        );
        assert_eq!(
            o.verdict,
            Verdict::Incomplete,
            "{mode:?}: {:?}",
            o.first_divergence
        );
        assert!(!o.coverage.complete);
        for step in &o.coverage.steps {
            assert_eq!(step.missing_candidate, vec![skipped], "step {}", step.step);
            assert!(step.missing_reference.is_empty());
            assert_eq!(step.judged, step.expected - 1);
        }
    }
}

#[test]
fn a_renamed_reference_node_is_incomplete_and_listed() {
    // As if a future bitnet.cpp named the FFN product differently: the stage
    // goes missing on the reference side and the node is listed, not dropped.
    let (_d, m) = tiny();
    let mut cfg = config(&m, Mode::Resync);
    cfg.rename_reference_nodes = vec![("ffn_sub_out".into(), "ffn_product".into())];
    let o = lockstep::run(&cfg, &BuiltinCandidate::default()).unwrap();
    assert_eq!(o.verdict, Verdict::Incomplete, "{:?}", o.first_divergence);
    let missing = &o.coverage.steps[0].missing_reference;
    assert_eq!(
        missing,
        &vec![
            StageKey::new(Some(0), Stage::FfnMul),
            StageKey::new(Some(1), Stage::FfnMul)
        ]
    );
    let unmapped = &o.coverage.unmapped_reference_nodes;
    assert!(
        unmapped.iter().any(|n| n == "ffn_product-0 [MUL]"),
        "{unmapped:?}"
    );
}

#[test]
fn the_unrenamed_graph_maps_completely() {
    // The control of the test above: every node of both arches' graphs is a
    // stage or a known auxiliary.
    for arch in ["bitnet", "llama"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let cfg = SynthConfig {
            arch: arch.into(),
            seed: 1,
            ..SynthConfig::preset(Preset::Tiny)
        };
        write_model(&cfg, &path).unwrap();
        let o = lockstep::run(&config(&path, Mode::Resync), &BuiltinCandidate::default()).unwrap();
        assert_eq!(o.verdict, Verdict::NoDivergence, "{arch}");
        assert!(o.coverage.complete, "{arch}: {:?}", o.coverage);
    }
}

#[test]
fn a_candidate_without_a_tokenizer_is_not_said_to_agree() {
    let (_d, m) = tiny();
    let o = run_wrapped(
        &m,
        Mode::Resync,
        Misbehaviour {
            no_tokenizer: true,
            ..Default::default()
        },
    );
    assert_eq!(o.tokens.source, TokenSource::CandidateHasNoTokenizer);
    assert_eq!(o.verdict, Verdict::Incomplete);
    assert!(o.coverage.notes.iter().any(|n| n.contains("no tokenizer")));
}

#[test]
fn a_panicking_candidate_yields_a_candidate_failed_outcome() {
    let (_d, m) = tiny();
    let at = StageKey::new(Some(1), Stage::FfnUp);
    for mode in [Mode::Resync, Mode::Free] {
        let o = run_wrapped(
            &m,
            mode,
            Misbehaviour {
                panic_at: Some(at),
                ..Default::default()
            },
        );
        assert_eq!(o.verdict, Verdict::CandidateFailed, "{mode:?}");
        let f = o.candidate_failure.as_ref().unwrap();
        assert_eq!(f.kind, "panic");
        assert_eq!(f.step, Some(0));
        assert!(
            f.message.contains("deliberate panic at ffn_up[1]"),
            "{}",
            f.message
        );
        // The last stage handed over before the panic: ffn_act comes before
        // ffn_up in the engine's order.
        assert_eq!(f.last_stage, Some(StageKey::new(Some(1), Stage::FfnAct)));
    }
}

#[test]
fn a_candidate_that_fails_to_load_yields_a_candidate_failed_outcome() {
    let (_d, m) = tiny();
    let loader = |_: &LoadOptions| -> Result<Box<dyn Candidate>, CandidateError> {
        Err(CandidateError::new("no such engine build"))
    };
    let o = lockstep::run(&config(&m, Mode::Resync), &loader).unwrap();
    assert_eq!(o.verdict, Verdict::CandidateFailed);
    let f = o.candidate_failure.unwrap();
    assert_eq!((f.kind.as_str(), f.step), ("load", None));
    assert!(f.message.contains("no such engine build"));
}

/// Runs our binary with `args`; (exit code, stdout, stderr).
fn cli(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_divergence"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn find_with_a_panicking_candidate_exits_5_with_a_receipt_and_no_backtrace() {
    let (dir, m) = tiny();
    let receipt = dir.path().join("r.json");
    let (code, stdout, stderr) = cli(&[
        "find",
        "--model",
        m.to_str().unwrap(),
        "--inject",
        "panic-at-ffn-up",
        "--receipt",
        receipt.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(code, 5, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("CANDIDATE FAILED (panic)"), "{stdout}");
    assert!(
        !stderr.contains("panicked at") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    let r = divergence::receipt::Receipt::read(&receipt).unwrap();
    assert_eq!(r.verdict, Verdict::CandidateFailed);
    let f = r.candidate_failure.unwrap();
    assert!(
        f.message.contains("injected panic computing ffn_up"),
        "{}",
        f.message
    );
    assert_eq!(f.last_stage, Some(StageKey::new(Some(0), Stage::FfnAct)));
}

#[test]
fn every_command_exits_quietly_on_a_closed_pipe() {
    let (dir, m) = tiny();
    let receipt = dir.path().join("closed-pipe-receipt.json");
    for args in [
        vec!["inspect", m.to_str().unwrap()],
        vec!["inspect", m.to_str().unwrap(), "--json"],
        vec![
            "find",
            "--model",
            m.to_str().unwrap(),
            "-q",
            "--receipt",
            receipt.to_str().unwrap(),
        ],
    ] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_divergence"))
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Close the pipe before the command writes, as `head -c 0` would.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "{args:?}: {:?}",
            out.status
        );
    }
}
