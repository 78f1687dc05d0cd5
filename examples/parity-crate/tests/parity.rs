//! The test a user copies into their engine's crate: the engine in lockstep
//! with bitnet.cpp on a small synthetic model, clean; a planted bug found at
//! its stage and blamed on the engine. Run with `cargo test --test parity`;
//! the reference worker is this test harness itself, started again.

use divergence::candidate::{Candidate, CandidateError, LoadOptions};
use divergence::compare::Blame;
use divergence::lockstep::{self, Mode, Prompt, RunConfig, Verdict};
use divergence::synth::{write_model, Preset, SynthConfig};
use divergence::trace::Stage;
use parity_crate::{Bug, PlainEngine};
use std::path::Path;

fn run(model: &Path, bug: Bug) -> lockstep::Outcome {
    let cfg = RunConfig {
        steps: 3,
        mode: Mode::Resync,
        ..RunConfig::new(
            model.to_path_buf(),
            Prompt::Tokens(vec![1, 407, 259, 340, 344, 332]),
            divergence::compare::Policy::default_policy(),
            divergence::reference::worker::default_exe().expect("the worker executable"),
        )
    };
    let loader = move |opts: &LoadOptions| -> Result<Box<dyn Candidate>, CandidateError> {
        Ok(Box::new(PlainEngine::load(opts, bug)?))
    };
    lockstep::run(&cfg, &loader).expect("the run completes")
}

#[test]
fn the_engine_matches_bitnet_cpp() {
    assert!(
        std::env::var_os("DIVERGENCE_EXE").is_none(),
        "this test proves the crate works without DIVERGENCE_EXE"
    );
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    let cfg = SynthConfig {
        arch: "bitnet".into(),
        seed: 1,
        ..SynthConfig::preset(Preset::Tiny)
    };
    write_model(&cfg, &model).unwrap();

    let clean = run(&model, Bug::None);
    assert_eq!(
        clean.verdict,
        Verdict::NoDivergence,
        "{:?} {:?}",
        clean.reference_failure,
        clean.first_divergence
    );

    let broken = run(&model, Bug::RopeAdjacentPairs);
    let d = broken.first_divergence.expect("the planted bug is found");
    assert_eq!(
        (d.step, d.layer, d.stage, d.blame.blame),
        (0, Some(0), Stage::QRope, Blame::Candidate)
    );
}
