//! The plain example engine (`examples/plain_engine/`) driven through
//! divergence's public API alone: clean on the tiny and small presets in
//! resync mode, and its deliberately broken variants are localised. This is
//! the seam a user's own engine plugs into.

#[path = "../examples/plain_engine/engine.rs"]
mod engine;

use divergence::candidate::{Candidate, CandidateError, LoadOptions};
use divergence::compare::Blame;
use divergence::lockstep::{self, Mode, Prompt, RunConfig, Verdict};
use divergence::synth::{write_model, Preset, SynthConfig};
use divergence::trace::Stage;
use engine::{Bug, PlainEngine};
use std::path::{Path, PathBuf};

fn model(preset: Preset, arch: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let cfg = SynthConfig {
        arch: arch.into(),
        seed: 1,
        ..SynthConfig::preset(preset)
    };
    write_model(&cfg, &path).unwrap();
    (dir, path)
}

fn run(model: &Path, bug: Bug, kv: divergence::KvType) -> lockstep::Outcome {
    let cfg = RunConfig {
        steps: 3,
        mode: Mode::Resync,
        kv_type: kv,
        ..RunConfig::new(
            model.to_path_buf(),
            Prompt::Tokens(vec![1, 407, 259, 340, 344, 332, 326, 334]),
            divergence::compare::Policy::default_policy(),
            PathBuf::from(env!("CARGO_BIN_EXE_divergence")),
        )
    };
    let loader = move |opts: &LoadOptions| -> Result<Box<dyn Candidate>, CandidateError> {
        Ok(Box::new(PlainEngine::load(opts, bug)?))
    };
    lockstep::run(&cfg, &loader).expect("the run completes")
}

#[test]
fn the_plain_engine_is_clean_in_resync_on_tiny_and_small() {
    for (preset, arch) in [
        (Preset::Tiny, "bitnet"),
        (Preset::Tiny, "llama"),
        (Preset::Small, "bitnet"),
    ] {
        let (_d, m) = model(preset, arch);
        for kv in [divergence::KvType::F16, divergence::KvType::F32] {
            let o = run(&m, Bug::None, kv);
            assert_eq!(
                o.verdict,
                Verdict::NoDivergence,
                "{preset} {arch} {kv:?}: {:?}",
                o.first_divergence
                    .map(|d| (d.step, d.layer, d.stage, d.nmse()))
            );
            // Bit-exact wherever the policy says exact.
            for s in &o.summary {
                if s.class == divergence::compare::Class::Exact {
                    assert!(s.all_exact, "{preset} {arch}: {} [{:?}]", s.stage, s.layer);
                }
            }
        }
    }
}

#[test]
fn the_broken_plain_engine_is_localised() {
    let (_d, m) = model(Preset::Tiny, "bitnet");
    for (bug, stage, layer) in [
        (Bug::RopeAdjacentPairs, Stage::QRope, Some(0)),
        (
            Bug::FfnSubNormWeightsOfAttention,
            Stage::FfnSubNorm,
            Some(0),
        ),
    ] {
        let o = run(&m, bug, divergence::KvType::F16);
        let d = o
            .first_divergence
            .as_ref()
            .unwrap_or_else(|| panic!("{bug:?}: no divergence"));
        assert_eq!(
            (d.step, d.layer, d.stage, d.blame.blame),
            (0, layer, stage, Blame::Candidate),
            "{bug:?}: {}",
            d.blame.reason
        );
    }
}
