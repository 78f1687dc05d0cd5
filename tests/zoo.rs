//! The bug zoo: every real bug class the harness claims to catch, injected
//! into one side, and the first divergence it must be localised to.
//!
//! Each test runs the whole lockstep comparison in-process
//! (`divergence::lockstep::run`, bitnet.cpp in its worker process) on a
//! synthetic model and states, as a specification, the stage, layer, step and
//! blame of the receipt's first divergence. `docs/bug-zoo.md` is the catalogue
//! these tests back; run them with `cargo test --test zoo`.
//!
//! Most faults show on the `tiny` preset as is. Two need a crafted model:
//! `act-round-half-away` (exact .5 ties of x·s are needed, random activations
//! never hit them) and the reference's 16-bit wrap (a whole 4096-value group
//! of large, same-signed products is needed). Those models are built by
//! writing a synthetic model and overwriting a few tensors in place.

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

fn tiny(arch: &str) -> Model {
    let mut cfg = SynthConfig::preset(Preset::Tiny);
    cfg.arch = arch.to_string();
    model(&cfg)
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

/// Runs the comparison in resync mode with `faults` in the candidate.
fn run_with(model: &Path, faults: &[Fault]) -> Outcome {
    let mut cfg = config(model, 1, Mode::Resync);
    cfg.faults = faults.to_vec();
    lockstep::run(&cfg).expect("the run completes")
}

/// The receipt's first divergence, which must exist.
fn first(outcome: &Outcome) -> &Divergence {
    assert_eq!(
        outcome.verdict,
        Verdict::Divergence,
        "expected a divergence; reference failure: {:?}",
        outcome.reference_failure
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

/// A candidate fault on the unmodified tiny `bitnet` model must be caught at
/// `stage` of layer 0 in the prefill (step 0) and blamed on the candidate.
#[track_caller]
fn caught_on_tiny(fault: Fault, stage: Stage) {
    let m = tiny("bitnet");
    let outcome = run_with(&m.path, &[fault]);
    assert_first(&outcome, stage, Some(0), 0, Blame::Candidate);
}

#[test]
fn a_clean_candidate_does_not_diverge() {
    let m = tiny("bitnet");
    let outcome = run_with(&m.path, &[]);
    assert_eq!(
        outcome.verdict,
        Verdict::NoDivergence,
        "{:?}",
        outcome.first_divergence
    );
}

#[test]
fn rope_interleaved_is_caught_at_q_rope() {
    caught_on_tiny(Fault::RopeInterleaved, Stage::QRope);
}

#[test]
fn rope_halves_on_llama_are_caught_at_q_rope() {
    // llama's RoPE is NORM (adjacent pairs): the same fault flips it to NEOX halves.
    let m = tiny("llama");
    let outcome = run_with(&m.path, &[Fault::RopeInterleaved]);
    assert_first(&outcome, Stage::QRope, Some(0), 0, Blame::Candidate);
}

#[test]
fn gqa_modulo_is_caught_at_attn_scores() {
    // tiny has 4 query heads on 2 kv heads: head 1 reads kv head 1 instead of 0.
    caught_on_tiny(Fault::GqaModulo, Stage::AttnScores);
}

#[test]
fn act_scale_128_is_caught_at_q_proj() {
    caught_on_tiny(Fault::ActScale128, Stage::QProj);
}

#[test]
fn missing_row_sum_is_caught_at_q_proj() {
    caught_on_tiny(Fault::MissingRowSum, Stage::QProj);
}

#[test]
fn eps_hardcoded_is_caught_at_attn_norm() {
    // The model says 1e-5; the fault uses 1e-6. attn_norm is judged exactly,
    // so the few-ulp change (NMSE ~1e-9) is enough.
    caught_on_tiny(Fault::EpsHardcoded, Stage::AttnNorm);
}

#[test]
fn skip_attn_sub_norm_is_caught_at_attn_sub_norm() {
    caught_on_tiny(Fault::SkipAttnSubNorm, Stage::AttnSubNorm);
}

#[test]
fn silu_instead_of_relu2_is_caught_at_ffn_act() {
    // On `bitnet` (SiLU) the fault computes squared ReLU.
    caught_on_tiny(Fault::WrongFfnAct, Stage::FfnAct);
}

#[test]
fn relu2_instead_of_silu_on_llama_is_caught_at_ffn_act() {
    let m = tiny("llama");
    let outcome = run_with(&m.path, &[Fault::WrongFfnAct]);
    assert_first(&outcome, Stage::FfnAct, Some(0), 0, Blame::Candidate);
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
fn attn_scale_inv_head_dim_is_caught_at_attn_probs() {
    // attn_scores are the raw q·k (the scale is applied inside the softmax),
    // so the first stage the scale touches is attn_probs.
    caught_on_tiny(Fault::AttnScaleInvHeadDim, Stage::AttnProbs);
}

#[test]
fn no_causal_mask_is_caught_at_attn_probs_in_the_prefill() {
    // Only a multi-token batch has future keys to leak: the prefill (step 0).
    // attn_scores are compared with the future entries zeroed on both sides,
    // so the leak first shows in the probabilities.
    caught_on_tiny(Fault::NoCausalMask, Stage::AttnProbs);
}

#[test]
fn no_causal_mask_is_invisible_to_one_token_decode_steps() {
    // The specification's other half: with a one-token prompt there is never
    // a future key, so the fault changes nothing and nothing is reported.
    let m = tiny("bitnet");
    let mut cfg = config(&m.path, 2, Mode::Resync);
    cfg.prompt = Prompt::Tokens(vec![1]);
    cfg.faults = vec![Fault::NoCausalMask];
    let outcome = lockstep::run(&cfg).expect("the run completes");
    assert_eq!(
        outcome.verdict,
        Verdict::NoDivergence,
        "{:?}",
        outcome.first_divergence
    );
    assert_eq!(outcome.steps_run, 3);
}

#[test]
fn weight_scale_divide_is_caught_at_q_proj() {
    caught_on_tiny(Fault::WeightScaleDivide, Stage::QProj);
}

#[test]
fn i2s_code_off_by_one_is_caught_at_q_proj() {
    caught_on_tiny(Fault::I2sCodeOffByOne, Stage::QProj);
}

#[test]
fn duplicate_bos_is_caught_at_tok_embd_by_the_token_check() {
    let m = tiny("bitnet");
    let mut cfg = config(&m.path, 1, Mode::Resync);
    cfg.token_faults = vec![TokenFault::DuplicateBos];
    let outcome = lockstep::run(&cfg).expect("the run completes");
    assert!(!outcome.tokens.equal);
    assert_eq!(outcome.tokens.duplicate_bos_candidate, vec![1]);
    assert!(outcome.tokens.duplicate_bos_reference.is_empty());
    // The embedding has one row more on the candidate side: a shape mismatch
    // at the first stage, blamed by the token check (not the oracle).
    assert_first(&outcome, Stage::TokEmbd, None, 0, Blame::Candidate);
    let d = first(&outcome);
    assert_eq!(d.shape[0], outcome.tokens.reference.len());
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
