//! Parity: the candidate engine against bitnet.cpp on synthetic models of
//! every arch the reference knows, in both modes, 1 and 2 threads, F16 and
//! F32 KV cache. A correct candidate shows no divergence, and every stage
//! whose policy class is `exact` is bit-identical.
//!
//! Each case's receipt is written to a temp dir and compared with the
//! checked-in copy in `receipts/` (verdict, token ids, first divergence,
//! greedy tokens; volatile fields and paths excluded), so a change in
//! behaviour shows up as a receipt diff in review. Regenerate them with
//! `scripts/regen-receipts.sh`.

mod common;

use divergence::lockstep::{Mode, Prompt, Verdict};
use divergence::receipt::{Receipt, RunRecord};
use divergence::synth::{write_model, Preset, SynthConfig};
use divergence::KvType;
use std::path::{Path, PathBuf};

const PROMPT: &str = "The quick brown fox";

fn model(dir: &Path, preset: Preset, arch: &str) -> PathBuf {
    let mut cfg = SynthConfig::preset(preset);
    cfg.arch = arch.into();
    cfg.seed = 1;
    let path = dir.join(format!("{preset}-{arch}.gguf"));
    write_model(&cfg, &path).expect("synthetic model");
    path
}

fn run(model: &Path, mode: Mode, threads: usize, kv: KvType, steps: usize) -> Receipt {
    let record = RunRecord {
        model_path: model.display().to_string(),
        prompt: Prompt::Text(PROMPT.into()),
        steps,
        mode,
        threads,
        kv_type: kv,
        keep_going: false,
        faults: vec![],
        token_faults: vec![],
        fault_layer: None,
        reference_ffn_act: Default::default(),
        ffn_act: None,
        policy_path: None,
        chat: false,
    };
    Receipt::run(
        &record,
        PathBuf::from(env!("CARGO_BIN_EXE_divergence")),
        None,
        None,
    )
    .expect("the run completes")
}

/// Clean (see `common::assert_clean`), and the receipt validates against
/// the schema.
fn assert_clean(r: &Receipt, what: &str) {
    common::assert_clean(r, what);
    // Receipts validate against the schema.
    let schema: serde_json::Value = serde_json::from_str(divergence::receipt::SCHEMA).unwrap();
    let value: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: receipt fails the schema: {errors:?}"
    );
}

/// Compares a fresh receipt with the checked-in one of the same name.
fn assert_matches_checked_in(r: &Receipt, name: &str, tmp: &Path) {
    r.write(&tmp.join(format!("{name}.json"))).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("receipts")
        .join(format!("{name}.json"));
    let old = Receipt::read(&path).unwrap_or_else(|e| panic!("{e}: run scripts/regen-receipts.sh"));
    assert_eq!(
        old.model.sha256, r.model.sha256,
        "{name}: the synthetic model changed"
    );
    assert_eq!(old.verdict, r.verdict, "{name}: verdict changed");
    assert_eq!(old.tokens, r.tokens, "{name}: token ids changed");
    assert_eq!(old.generated, r.generated, "{name}: greedy tokens changed");
    let key = |d: &Option<divergence::lockstep::Divergence>| {
        d.as_ref()
            .map(|d| (d.step, d.layer, d.stage, d.position, d.blame.blame))
    };
    assert_eq!(
        key(&old.first_divergence),
        key(&r.first_divergence),
        "{name}: first divergence changed"
    );
}

#[test]
fn bitnet_tiny_all_modes_threads_and_kv_types() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), Preset::Tiny, "bitnet");
    for mode in [Mode::Resync, Mode::Free] {
        for threads in [1, 2] {
            for kv in [KvType::F16, KvType::F32] {
                let r = run(&m, mode, threads, kv, 4);
                let name = format!("parity-tiny-bitnet-{mode:?}-t{threads}-{kv:?}").to_lowercase();
                assert_clean(&r, &name);
                if threads == 1 {
                    assert_matches_checked_in(&r, &name, dir.path());
                }
            }
        }
    }
}

#[test]
fn llama_tiny_resync_and_free() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), Preset::Tiny, "llama");
    for mode in [Mode::Resync, Mode::Free] {
        for kv in [KvType::F16, KvType::F32] {
            let r = run(&m, mode, 2, kv, 4);
            assert_clean(&r, &format!("llama tiny {mode:?} {kv:?}"));
        }
    }
    let r = run(&m, Mode::Resync, 1, KvType::F16, 4);
    assert_matches_checked_in(&r, "parity-tiny-llama-resync-t1-f16", dir.path());
}

#[test]
fn bitnet_with_scale_tensors_and_f32_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = SynthConfig::preset(Preset::Tiny);
    cfg.scale_tensors = true;
    cfg.embd_type = divergence::gguf::GgmlType::F32;
    cfg.seed = 1;
    let m = dir.path().join("tiny-scales.gguf");
    write_model(&cfg, &m).unwrap();
    for mode in [Mode::Resync, Mode::Free] {
        let r = run(&m, mode, 2, KvType::F32, 3);
        assert_clean(&r, &format!("tiny with scale tensors {mode:?}"));
    }
}

#[test]
fn bitnet_small_resync_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), Preset::Small, "bitnet");
    let r = run(&m, Mode::Resync, 2, KvType::F32, 2);
    assert_clean(&r, "small bitnet resync");
    let r = run(&m, Mode::Free, 2, KvType::F16, 2);
    assert_clean(&r, "small bitnet free");
}

#[test]
fn same_run_gives_the_same_receipt_bytes_apart_from_volatile() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), Preset::Tiny, "bitnet");
    let strip = |r: &Receipt| {
        let mut v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        v.as_object_mut().unwrap().remove("volatile");
        v.to_string()
    };
    let a = run(&m, Mode::Resync, 2, KvType::F16, 2);
    let b = run(&m, Mode::Resync, 2, KvType::F16, 2);
    assert_eq!(strip(&a), strip(&b));
}

/// Issue 4's bar: free-running on `tiny` with an F32 KV cache, the two
/// engines' logits agree on the top-1 token at every position of every step
/// of a 32-step run. Enforced by a policy whose free-run logits rule demands
/// 100% top-1 agreement, so any disagreeing position is a divergence.
#[test]
fn free_run_32_steps_top1_agrees_at_every_position() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), Preset::Tiny, "bitnet");
    let mut policy = divergence::compare::Policy::default_policy();
    policy.name = "strict-top1".into();
    for (stage, rule) in policy.free_run.iter_mut() {
        if *stage == divergence::trace::Stage::Logits {
            rule.min_top1_agreement = Some(1.0);
        }
    }
    let policy_path = dir.path().join("strict.json");
    std::fs::write(&policy_path, serde_json::to_string(&policy).unwrap()).unwrap();
    let record = RunRecord {
        model_path: m.display().to_string(),
        prompt: Prompt::Text(PROMPT.into()),
        steps: 32,
        mode: Mode::Free,
        threads: 2,
        kv_type: KvType::F32,
        keep_going: false,
        faults: vec![],
        token_faults: vec![],
        fault_layer: None,
        reference_ffn_act: Default::default(),
        ffn_act: None,
        policy_path: Some(policy_path.display().to_string()),
        chat: false,
    };
    let r = Receipt::run(
        &record,
        PathBuf::from(env!("CARGO_BIN_EXE_divergence")),
        None,
        None,
    )
    .unwrap();
    assert_eq!(r.policy.name, "strict-top1");
    assert_eq!(r.steps_run, 33);
    assert!(
        r.generated.disagreements.is_empty(),
        "{:?}",
        r.generated.disagreements
    );
    assert_eq!(
        r.verdict,
        Verdict::NoDivergence,
        "{:?}",
        r.first_divergence
            .map(|d| (d.step, d.stage, d.blame.reason))
    );
    // The free-run logits rule (drift, reported) holds at every step.
    let logits: Vec<_> = r
        .step_results
        .iter()
        .flat_map(|s| s.stages.iter().map(move |x| (s.step, x)))
        .filter(|(_, x)| x.stage == divergence::trace::Stage::Logits)
        .collect();
    assert_eq!(logits.len(), 33);
    for (step, x) in logits {
        assert!(x.agree, "step {step}: the logits' top-1 disagree somewhere");
    }
}
