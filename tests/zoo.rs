//! The bug zoo: every real bug class the harness claims to catch, injected
//! into one side, and the first divergence it must be localised to.
//!
//! Each case runs the whole lockstep comparison in-process
//! (`divergence::lockstep::run`, bitnet.cpp in its worker process) on a
//! synthetic model and states, as a specification, the step, position,
//! layer, stage and blame of the first divergence, in resync mode and again
//! in free mode (where the resynced twin's local error must find the same
//! stage). The cases are a table ([`CASES`]) so that one self-test can
//! prove the table discriminates: a comparator that always answered
//! "layer 0, step 0" fails it. `docs/bug-zoo.md` is the catalogue these
//! tests back; run them with `cargo test --test zoo`.
//!
//! Most faults show on the `tiny` preset as is. Two need a crafted model:
//! `act-round-half-away` (exact .5 ties of x·s are needed, random activations
//! never hit them) and the reference's 16-bit wrap (a whole 4096-value group
//! of large, same-signed products is needed). Those models are built by
//! writing a synthetic model and overwriting a few tensors in place.

use divergence::candidate::BuiltinCandidate;
use divergence::compare::{Blame, Policy};
use divergence::engine::Fault;
use divergence::gguf::{GgmlType, GgufFile};
use divergence::lockstep::{
    self, Divergence, Mode, Outcome, Prompt, RunConfig, TokenFault, Verdict,
};
use divergence::quant::i2s;
use divergence::reference::kernels;
use divergence::synth::{write_model, Preset, SynthConfig};
use divergence::trace::Stage;
use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const PROMPT: &str = "The quick brown fox";

/// A synthetic model in its own temp dir (removed on drop).
struct Model {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn model(cfg: &SynthConfig) -> Model {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(format!("{}.gguf", cfg.arch));
    write_model(cfg, &path).expect("write synthetic model");
    Model { _dir: dir, path }
}

fn tiny_cfg(arch: &str) -> SynthConfig {
    SynthConfig {
        arch: arch.to_string(),
        seed: 1,
        ..SynthConfig::preset(Preset::Tiny)
    }
}

fn tiny(arch: &str) -> Model {
    model(&tiny_cfg(arch))
}

/// Overwrites the data of tensor `name` in place (same type, same size).
fn overwrite_tensor(path: &Path, name: &str, data: &[u8]) {
    let at = {
        let file = GgufFile::open(path).expect("open model");
        let t = file
            .tensor(name)
            .unwrap_or_else(|| panic!("no tensor {name}"));
        assert_eq!(
            t.n_bytes,
            data.len() as u64,
            "{name}: new data must keep the size"
        );
        file.data_offset() + t.offset
    };
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open model for writing");
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(data).unwrap();
}

fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

fn config(model: &Path, steps: usize, mode: Mode) -> RunConfig {
    RunConfig {
        steps,
        mode,
        ..RunConfig::new(
            model.to_path_buf(),
            Prompt::Text(PROMPT.into()),
            Policy::default_policy(),
            PathBuf::from(env!("CARGO_BIN_EXE_divergence")),
        )
    }
}

/// Runs `cfg` with our engine carrying `faults`.
fn run_cfg(cfg: &RunConfig, faults: &[Fault]) -> Outcome {
    let candidate = BuiltinCandidate {
        faults: faults.to_vec(),
        ..BuiltinCandidate::default()
    };
    lockstep::run(cfg, &candidate).expect("the run completes")
}

/// Runs the comparison in resync mode with `faults` in the candidate.
fn run_with(model: &Path, faults: &[Fault]) -> Outcome {
    run_cfg(&config(model, 1, Mode::Resync), faults)
}

/// The receipt's first divergence, which must exist.
fn first(outcome: &Outcome) -> &Divergence {
    assert_eq!(
        outcome.verdict,
        Verdict::Divergence,
        "expected a divergence; reference failure: {:?}, candidate failure: {:?}",
        outcome.reference_failure,
        outcome.candidate_failure
    );
    outcome
        .first_divergence
        .as_ref()
        .expect("a first divergence")
}

/// Asserts where the first divergence is and whom it blames.
#[track_caller]
fn assert_first(outcome: &Outcome, stage: Stage, layer: Option<usize>, step: usize, blame: Blame) {
    let d = first(outcome);
    let got = (d.stage, d.layer, d.step, d.blame.blame);
    assert_eq!(
        got,
        (stage, layer, step, blame),
        "first divergence (stage, layer, step, blame); blame reason: {}",
        d.blame.reason
    );
}

/// Where a case's divergence must be, as a position.
#[derive(Clone, Copy, Debug)]
enum Position {
    /// Any position of the step's batch (the fault hits every token alike;
    /// which element is worst is a detail of the data).
    InBatch,
    /// Exactly this absolute position.
    At(usize),
}

/// What a case expects.
#[derive(Clone, Copy, Debug)]
struct Expect {
    step: usize,
    position: Position,
    layer: Option<usize>,
    stage: Stage,
    blame: Blame,
}

/// The models the cases run on.
#[derive(Clone, Copy, Debug)]
enum Recipe {
    Tiny(&'static str),
    /// tiny with rope theta 500000 (so a theta read from the wrong key shows).
    TinyTheta500k,
    /// tiny llama with a separate output.weight.
    TinyLlamaUntied,
    /// tiny with per-projection `*.scale` tensors.
    TinyScaleTensors,
}

impl Recipe {
    fn build(self) -> Model {
        match self {
            Recipe::Tiny(arch) => tiny(arch),
            Recipe::TinyTheta500k => model(&SynthConfig {
                rope_theta: 500_000.0,
                ..tiny_cfg("bitnet")
            }),
            Recipe::TinyLlamaUntied => model(&SynthConfig {
                untied_output: true,
                ..tiny_cfg("llama")
            }),
            Recipe::TinyScaleTensors => model(&SynthConfig {
                scale_tensors: true,
                ..tiny_cfg("bitnet")
            }),
        }
    }
}

/// One zoo entry.
struct Case {
    name: &'static str,
    recipe: Recipe,
    faults: &'static [Fault],
    expect: Expect,
}

/// The prompt "The quick brown fox" is 15 ids on the tiny vocab: decode
/// step s runs position 14 + s.
const DECODE_STEP_1: usize = 15;

const fn at_prefill(layer: Option<usize>, stage: Stage) -> Expect {
    Expect {
        step: 0,
        position: Position::InBatch,
        layer,
        stage,
        blame: Blame::Candidate,
    }
}

/// Every injected candidate fault and where it must be found.
const CASES: &[Case] = &[
    Case {
        name: "rope-interleaved",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::RopeInterleaved],
        expect: at_prefill(Some(0), Stage::QRope),
    },
    Case {
        name: "rope-halves-on-llama",
        recipe: Recipe::Tiny("llama"),
        faults: &[Fault::RopeInterleaved],
        expect: at_prefill(Some(0), Stage::QRope),
    },
    Case {
        // 4 query heads on 2 kv heads: head 1 reads kv head 1 instead of 0.
        name: "gqa-modulo",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::GqaModulo],
        expect: at_prefill(Some(0), Stage::AttnScores),
    },
    Case {
        name: "act-scale128",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::ActScale128],
        expect: at_prefill(Some(0), Stage::QProj),
    },
    Case {
        name: "act-scale-per-batch",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::ActScalePerBatch],
        expect: at_prefill(Some(0), Stage::QProj),
    },
    Case {
        name: "missing-row-sum",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::MissingRowSum],
        expect: at_prefill(Some(0), Stage::QProj),
    },
    Case {
        // The model says 1e-5; the fault uses 1e-6: a few ulps, judged exactly.
        name: "eps-hardcoded",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::EpsHardcoded],
        expect: at_prefill(Some(0), Stage::AttnNorm),
    },
    Case {
        // NMSE ~1e-9 against the reference; the oracle tells it apart from rounding.
        name: "rms-norm-eps-outside-sqrt",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::RmsNormEpsOutsideSqrt],
        expect: at_prefill(Some(0), Stage::AttnNorm),
    },
    Case {
        name: "skip-attn-sub-norm",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::SkipAttnSubNorm],
        expect: at_prefill(Some(0), Stage::AttnSubNorm),
    },
    Case {
        // On `bitnet` (SiLU) the fault computes squared ReLU.
        name: "wrong-ffn-act",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::WrongFfnAct],
        expect: at_prefill(Some(0), Stage::FfnAct),
    },
    Case {
        name: "wrong-ffn-act-on-llama",
        recipe: Recipe::Tiny("llama"),
        faults: &[Fault::WrongFfnAct],
        expect: at_prefill(Some(0), Stage::FfnAct),
    },
    Case {
        // attn_scores are the raw q·k (the scale is applied in the softmax).
        name: "attn-scale-inv-head-dim",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::AttnScaleInvHeadDim],
        expect: at_prefill(Some(0), Stage::AttnProbs),
    },
    Case {
        // Only a multi-token batch has future keys; scores are compared with
        // future entries zeroed, so the leak shows in the probabilities.
        name: "no-causal-mask",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::NoCausalMask],
        expect: at_prefill(Some(0), Stage::AttnProbs),
    },
    Case {
        name: "weight-scale-divide",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::WeightScaleDivide],
        expect: at_prefill(Some(0), Stage::QProj),
    },
    Case {
        name: "i2s-code-off-by-one",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::I2sCodeOffByOne],
        expect: at_prefill(Some(0), Stage::QProj),
    },
    Case {
        name: "scale-tensor-ignored",
        recipe: Recipe::TinyScaleTensors,
        faults: &[Fault::ScaleTensorIgnored],
        expect: at_prefill(Some(0), Stage::QProj),
    },
    // Loading bugs: the oracle reads the file itself, so they are the candidate's.
    Case {
        name: "theta-wrong-key",
        recipe: Recipe::TinyTheta500k,
        faults: &[Fault::ThetaWrongKey],
        expect: at_prefill(Some(0), Stage::QRope),
    },
    Case {
        name: "swap-gate-up",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::SwapGateUp],
        expect: at_prefill(Some(0), Stage::FfnGate),
    },
    Case {
        name: "f16-row-stride",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::F16RowStride],
        expect: at_prefill(None, Stage::TokEmbd),
    },
    // Beyond layer 0 and step 0.
    Case {
        name: "o-proj-previous-layer",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::OProjPreviousLayer],
        expect: at_prefill(Some(1), Stage::OProj),
    },
    Case {
        name: "final-norm-wrong-weight",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::FinalNormWrongWeight],
        expect: at_prefill(None, Stage::ResultNorm),
    },
    Case {
        name: "logits-wrong-matrix",
        recipe: Recipe::TinyLlamaUntied,
        faults: &[Fault::LogitsWrongMatrix],
        expect: at_prefill(None, Stage::Logits),
    },
    Case {
        name: "rope-decode-off-by-one",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::RopeDecodeOffByOne],
        expect: Expect {
            step: 1,
            position: Position::At(DECODE_STEP_1),
            layer: Some(0),
            stage: Stage::QRope,
            blame: Blame::Candidate,
        },
    },
    Case {
        // The decode step's key lands one slot too far: its own slot is
        // stale, so the last score of every head is wrong.
        name: "kv-slot-decode-off-by-one",
        recipe: Recipe::Tiny("bitnet"),
        faults: &[Fault::KvSlotDecodeOffByOne],
        expect: Expect {
            step: 1,
            position: Position::At(DECODE_STEP_1),
            layer: Some(0),
            stage: Stage::AttnScores,
            blame: Blame::Candidate,
        },
    },
];

/// Whether a divergence's (step, position, layer, stage, blame) is what the
/// case expects; the reason when not.
fn check(
    expect: &Expect,
    got: (usize, usize, &[usize], Option<usize>, Stage, Blame),
) -> Result<(), String> {
    let (step, position, batch, layer, stage, blame) = got;
    let position_ok = match expect.position {
        Position::InBatch => batch.contains(&position),
        Position::At(p) => position == p,
    };
    if step == expect.step
        && position_ok
        && layer == expect.layer
        && stage == expect.stage
        && blame == expect.blame
    {
        Ok(())
    } else {
        Err(format!(
            "got step {step} position {position} (batch {batch:?}) layer {layer:?} {stage} blame {blame:?}; expected {expect:?}"
        ))
    }
}

fn observed(d: &Divergence) -> (usize, usize, &[usize], Option<usize>, Stage, Blame) {
    (
        d.step,
        d.position,
        &d.positions,
        d.layer,
        d.stage,
        d.blame.blame,
    )
}

/// Runs a case in both modes and checks both against its expectation.
fn zoo_case(name: &str) {
    let case = CASES
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no zoo case {name}"));
    let m = case.recipe.build();
    for mode in [Mode::Resync, Mode::Free] {
        let outcome = run_cfg(&config(&m.path, 2, mode), case.faults);
        let d = first(&outcome);
        if let Err(why) = check(&case.expect, observed(d)) {
            panic!(
                "{name} in {mode:?} mode: {why}; blame reason: {}",
                d.blame.reason
            );
        }
        if mode == Mode::Free && d.stage != divergence::trace::Stage::TokEmbd {
            // Free mode still shows how far the two runs are apart there.
            assert!(
                d.metrics.is_some(),
                "{name}: no side-against-side error recorded"
            );
        }
    }
    // The dump path: `capture --engine candidate --inject F`, then
    // `compare --model`: the same place, blamed on the candidate.
    let outcome = through_dumps(&m.path, case.faults);
    let d = first(&outcome);
    if let Err(why) = check(&case.expect, observed(d)) {
        panic!(
            "{name} through dumps: {why}; blame reason: {}",
            d.blame.reason
        );
    }
}

/// Both engines captured into dumps (the candidate with `faults`) and
/// compared offline with the model.
fn through_dumps(model: &Path, faults: &[Fault]) -> Outcome {
    use divergence::dump::capture::{capture_candidate, capture_reference, CaptureConfig};
    use divergence::dump::{map::map_dump, Dump};
    use divergence::lockstep::offline::{compare_dumps, CandidateDump, OfflineOptions};
    let dir = tempfile::tempdir().unwrap();
    let cfg = |out: &str| CaptureConfig {
        model: model.to_path_buf(),
        prompt: Prompt::Text(PROMPT.into()),
        steps: 2,
        threads: 1,
        kv_type: divergence::KvType::F16,
        ffn_act: None,
        out: dir.path().join(out),
        cancel: None,
    };
    let (r, c) = (cfg("reference.safetensors"), cfg("candidate.safetensors"));
    capture_reference(&r, Path::new(env!("CARGO_BIN_EXE_divergence"))).unwrap();
    let candidate = BuiltinCandidate {
        faults: faults.to_vec(),
        ..BuiltinCandidate::default()
    };
    capture_candidate(&c, &candidate).unwrap();
    let reference = Dump::open(&r.out).unwrap();
    let dump = Dump::open(&c.out).unwrap();
    let stages = map_dump(&dump, None).unwrap();
    let opts = OfflineOptions {
        policy: Policy::default_policy(),
        keep_going: false,
        model: Some(model.to_path_buf()),
        worker_exe: None,
        ffn_act: None,
    };
    let cand = CandidateDump {
        stages: Ok(&stages),
        manifest: dump.manifest.as_ref(),
        label: "candidate".into(),
    };
    compare_dumps(&reference, &cand, &opts).unwrap().outcome
}

macro_rules! zoo_tests {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                zoo_case($name);
            }
        )*

        /// Every case in the table has its test.
        #[test]
        fn every_case_has_a_test() {
            let tested = [$($name),*];
            for c in CASES {
                assert!(tested.contains(&c.name), "zoo case {} has no test", c.name);
            }
            assert_eq!(tested.len(), CASES.len());
        }
    };
}

zoo_tests! {
    rope_interleaved => "rope-interleaved",
    rope_halves_on_llama => "rope-halves-on-llama",
    gqa_modulo => "gqa-modulo",
    act_scale128 => "act-scale128",
    act_scale_per_batch => "act-scale-per-batch",
    missing_row_sum => "missing-row-sum",
    eps_hardcoded => "eps-hardcoded",
    rms_norm_eps_outside_sqrt => "rms-norm-eps-outside-sqrt",
    skip_attn_sub_norm => "skip-attn-sub-norm",
    wrong_ffn_act => "wrong-ffn-act",
    wrong_ffn_act_on_llama => "wrong-ffn-act-on-llama",
    attn_scale_inv_head_dim => "attn-scale-inv-head-dim",
    no_causal_mask => "no-causal-mask",
    weight_scale_divide => "weight-scale-divide",
    i2s_code_off_by_one => "i2s-code-off-by-one",
    scale_tensor_ignored => "scale-tensor-ignored",
    theta_wrong_key => "theta-wrong-key",
    swap_gate_up => "swap-gate-up",
    f16_row_stride => "f16-row-stride",
    o_proj_previous_layer => "o-proj-previous-layer",
    final_norm_wrong_weight => "final-norm-wrong-weight",
    logits_wrong_matrix => "logits-wrong-matrix",
    rope_decode_off_by_one => "rope-decode-off-by-one",
    kv_slot_decode_off_by_one => "kv-slot-decode-off-by-one",
}

#[test]
fn a_comparator_that_always_answers_layer_0_step_0_fails_the_zoo() {
    // The table must reach beyond the first layer, the prefill and the
    // per-layer stages, or a comparator that always pointed at (layer 0,
    // step 0) with the right stage name would pass it.
    let lazy = |e: &Expect| (0usize, 0usize, vec![0usize], Some(0usize), e.stage, e.blame);
    let rejected: Vec<&str> = CASES
        .iter()
        .filter(|c| {
            let (s, p, b, l, st, bl) = lazy(&c.expect);
            check(&c.expect, (s, p, &b, l, st, bl)).is_err()
        })
        .map(|c| c.name)
        .collect();
    for must in [
        "o-proj-previous-layer",
        "final-norm-wrong-weight",
        "logits-wrong-matrix",
        "f16-row-stride",
        "rope-decode-off-by-one",
        "kv-slot-decode-off-by-one",
    ] {
        assert!(
            rejected.contains(&must),
            "the lazy comparator passes {must}"
        );
    }
    assert!(CASES.iter().any(|c| c.expect.step > 0));
    assert!(CASES.iter().any(|c| c.expect.layer.is_some_and(|l| l > 0)));
    assert!(CASES.iter().any(|c| c.expect.layer.is_none()));
    // And the checker accepts the truth: a divergence exactly as expected.
    for c in CASES {
        let e = &c.expect;
        let p = match e.position {
            Position::At(p) => p,
            Position::InBatch => 3,
        };
        check(e, (e.step, p, &[p], e.layer, e.stage, e.blame)).unwrap();
    }
}

#[test]
fn a_clean_candidate_does_not_diverge() {
    for arch in ["bitnet", "llama"] {
        let m = tiny(arch);
        for mode in [Mode::Resync, Mode::Free] {
            let outcome = run_cfg(&config(&m.path, 2, mode), &[]);
            assert_eq!(
                outcome.verdict,
                Verdict::NoDivergence,
                "{arch} {mode:?}: {:?}",
                outcome.first_divergence
            );
        }
    }
}

#[test]
fn a_wrong_rms_norm_formula_is_blamed_on_the_candidate_at_every_preset_width() {
    // One layer and a small vocabulary, but each preset's widths, heads and
    // feed-forward size (and the 2B-4T's tiny attn_norm weights).
    for preset in [
        Preset::Tiny,
        Preset::Small,
        Preset::BitnetLarge,
        Preset::Bitnet2B4T,
    ] {
        let cfg = SynthConfig {
            n_layer: 1,
            n_vocab: 1024,
            n_ctx: 64,
            seed: 1,
            arch: "bitnet".into(),
            ..SynthConfig::preset(preset)
        };
        let m = model(&cfg);
        let outcome = run_cfg(
            &RunConfig {
                prompt: Prompt::Tokens(vec![1, 300, 301, 302, 303]),
                ..config(&m.path, 0, Mode::Resync)
            },
            &[Fault::RmsNormEpsOutsideSqrt],
        );
        let d = first(&outcome);
        assert_eq!(
            (d.stage, d.layer, d.blame.blame),
            (Stage::AttnNorm, Some(0), Blame::Candidate),
            "{preset}: {}",
            d.blame.reason
        );
    }
}

#[test]
fn a_loading_bug_is_named_in_the_config_check() {
    let m = Recipe::TinyTheta500k.build();
    let outcome = run_with(&m.path, &[Fault::ThetaWrongKey]);
    let check = &outcome.config_check;
    assert_eq!(check.len(), 1, "{check:?}");
    assert_eq!(check[0].field, "rope_theta");
    assert_eq!(
        (check[0].candidate.as_str(), check[0].file.as_str()),
        ("10000.0", "500000.0")
    );
}

#[test]
fn silu_instead_of_relu2_on_bitnet_b158_is_caught_at_ffn_act() {
    // The direction that matters for 2B-4T: SiLU where relu² is wanted (the
    // reference runs the arch through vendor/patches/04-arch-bitnet-b1.58.patch).
    let m = tiny("bitnet-b1.58");
    let outcome = run_with(&m.path, &[Fault::WrongFfnAct]);
    assert_first(&outcome, Stage::FfnAct, Some(0), 0, Blame::Candidate);
}

#[test]
fn no_causal_mask_is_invisible_to_one_token_decode_steps() {
    // The specification's other half: with a one-token prompt there is never
    // a future key, so the fault changes nothing and nothing is reported.
    let m = tiny("bitnet");
    let mut cfg = config(&m.path, 2, Mode::Resync);
    cfg.prompt = Prompt::Tokens(vec![1]);
    let outcome = run_cfg(&cfg, &[Fault::NoCausalMask]);
    assert_eq!(
        outcome.verdict,
        Verdict::NoDivergence,
        "{:?}",
        outcome.first_divergence
    );
    assert_eq!(outcome.steps_run, 3);
}

#[test]
fn duplicate_bos_is_caught_at_tok_embd_by_the_token_check() {
    let m = tiny("bitnet");
    let mut cfg = config(&m.path, 1, Mode::Resync);
    cfg.token_faults = vec![TokenFault::DuplicateBos];
    let outcome = run_cfg(&cfg, &[]);
    assert!(!outcome.tokens.equal);
    assert_eq!(outcome.tokens.duplicate_bos_candidate, vec![1]);
    assert!(outcome.tokens.duplicate_bos_reference.is_empty());
    let diff = outcome
        .tokens
        .first_difference
        .as_ref()
        .expect("a first difference");
    assert_eq!(diff.position, 1);
    assert!(diff.description.contains("duplicated BOS"), "{diff:?}");
    // A token divergence at the embeddings, at the duplicated BOS, blamed
    // by the token check (not the oracle: each side embedded its own ids
    // correctly).
    assert_first(&outcome, Stage::TokEmbd, None, 0, Blame::Candidate);
    let d = first(&outcome);
    assert_eq!(d.measured, divergence::lockstep::Measured::Tokens);
    assert_eq!(d.position, 1);
}

/// The tiny bitnet model, crafted so that attn_norm of layer 0 has exact .5
/// ties after activation scaling.
///
/// Every embedding value is 64, so each row's mean square is 4096 and
/// `4096 + 1e-5` rounds back to 4096 in f32: RMSNorm gives exactly 1.0 in
/// every element, and attn_norm is exactly the norm weight. The weight is
/// 127 in element 0 (so the row max is 127 and the scale `127 / 127` is
/// exactly 1.0) and 0.5, 2.5, 4.5, ... elsewhere: each of those is a tie
/// that ties-to-even rounds down and half-away rounds up.
fn half_tie_model() -> (Model, Vec<f32>) {
    let mut cfg = SynthConfig::preset(Preset::Tiny);
    cfg.embd_type = GgmlType::F32;
    let m = model(&cfg);
    let e = cfg.n_embd;
    overwrite_tensor(
        &m.path,
        "token_embd.weight",
        &f32_bytes(vec![64.0; e * cfg.n_vocab]),
    );
    let w: Vec<f32> = (0..e)
        .map(|i| {
            if i == 0 {
                127.0
            } else {
                2.0 * (i % 60) as f32 + 0.5
            }
        })
        .collect();
    overwrite_tensor(
        &m.path,
        "blk.0.attn_norm.weight",
        &f32_bytes(w.iter().copied()),
    );
    (m, w)
}

#[test]
fn the_half_tie_model_really_produces_ties_in_the_reference_quantizer() {
    // The precondition of the next test, checked with bitnet.cpp's own
    // quantize_row_i8_s: scale exactly 1, and every .5 rounded to even.
    let (_m, attn_norm) = half_tie_model();
    let (q, scale, _) = kernels::quantize_row_i8_s(&attn_norm);
    assert_eq!(scale, 1.0);
    let ties = attn_norm.iter().filter(|x| x.fract() == 0.5).count();
    assert_eq!(ties, attn_norm.len() - 1);
    for (&x, &c) in attn_norm.iter().zip(&q) {
        assert_eq!(c as f32, x.round_ties_even(), "x = {x}");
    }
    assert!(attn_norm
        .iter()
        .zip(&q)
        .any(|(&x, &c)| c as f32 != x.round()));
}

#[test]
fn act_round_half_away_is_caught_at_q_proj_on_crafted_ties() {
    let (m, _) = half_tie_model();
    let outcome = run_with(&m.path, &[Fault::ActRoundHalfAway]);
    assert_first(&outcome, Stage::QProj, Some(0), 0, Blame::Candidate);
}

#[test]
fn act_round_half_away_is_invisible_without_ties() {
    // Documented limitation: on ordinary activations x·s is essentially never
    // an exact .5, so the fault does not change a single bit.
    let m = tiny("bitnet");
    let outcome = run_with(&m.path, &[Fault::ActRoundHalfAway]);
    assert_eq!(
        outcome.verdict,
        Verdict::NoDivergence,
        "{:?}",
        outcome.first_divergence
    );
}

/// A one-layer bitnet model with 4096-wide rows whose q_proj overflows the
/// 16-bit lanes of bitnet.cpp's AVX2 `ggml_vec_dot_i2_i8_s`.
///
/// Embedding values of 64 and attn_norm weights of 1.0 make attn_norm
/// exactly 1.0 everywhere (see [`half_tie_model`]), so every activation
/// quantizes to +127; attn_q is all +1 (code 2). The kernel sums
/// `code · q = 254` per product in i16 lanes over a whole 32-block group
/// (4096 values) before widening: far past 32767.
fn wrap_model() -> Model {
    let cfg = SynthConfig {
        arch: "bitnet".into(),
        n_embd: 4096,
        n_layer: 1,
        n_head: 32,
        n_head_kv: 8,
        n_ff: 256,
        n_vocab: 512,
        n_ctx: 64,
        embd_type: GgmlType::F32,
        ..SynthConfig::preset(Preset::Tiny)
    };
    let m = model(&cfg);
    let e = cfg.n_embd;
    overwrite_tensor(
        &m.path,
        "token_embd.weight",
        &f32_bytes(vec![64.0; e * cfg.n_vocab]),
    );
    overwrite_tensor(&m.path, "blk.0.attn_norm.weight", &f32_bytes(vec![1.0; e]));
    let scale = 1.0 / (e as f32 * 2.0 / 3.0).sqrt();
    overwrite_tensor(
        &m.path,
        "blk.0.attn_q.weight",
        &i2s::pack(&vec![1i8; e * e], scale),
    );
    m
}

#[test]
fn the_wrap_model_really_wraps_in_the_reference_kernel() {
    // The precondition of the next test, checked with bitnet.cpp's own dot:
    // one all-(+1) row against all-127 activations.
    let n = 4096;
    let row = i2s::pack(&vec![1i8; n], 1.0);
    let q = vec![127i8; n];
    let exact = (2 * 127 * n) as f32;
    let got = kernels::vec_dot_i2_i8_s(&row, &q).expect("the reference kernel runs on this CPU");
    assert_ne!(got, exact, "the reference kernel did not wrap");
}

#[test]
fn the_reference_16_bit_wrap_is_caught_at_q_proj_and_blamed_on_the_reference() {
    let m = wrap_model();
    let outcome = run_with(&m.path, &[]);
    assert_first(&outcome, Stage::QProj, Some(0), 0, Blame::Reference);
    let d = first(&outcome);
    let blame = &d.blame;
    assert!(blame.candidate_nmse_vs_oracle.unwrap() < 1e-12, "{blame:?}");
    assert!(blame.reference_nmse_vs_oracle.unwrap() > 1e-2, "{blame:?}");
    // The receipt shows the f64 oracle siding with the candidate.
    let w = &d.worst[0];
    let oracle = w
        .oracle
        .expect("the worst element carries the oracle's value");
    assert!(
        (w.candidate as f64 - oracle).abs() <= 1e-3 * oracle.abs(),
        "{w:?}"
    );
    assert!(
        (w.reference as f64 - oracle).abs() > 0.5 * oracle.abs(),
        "{w:?}"
    );
}
