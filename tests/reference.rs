//! The reference engine through FFI: load, tokenize, decode, capture every
//! node of the graph, threads; and bitnet.cpp's own I2_S kernels, called
//! through the shim, against our scalar specification.

use divergence::engine::kernels::scalar;
use divergence::quant::act::{quantize_row_i8_s, ActQuantVariant};
use divergence::reference::{kernels, CaptureFilter, Context, ContextOptions, KvType, Model};
use divergence::synth::{write_model, Preset, SynthConfig};
use divergence::trace::reference_map::map_nodes;
use divergence::trace::{Stage, StageKey};
use proptest::prelude::*;
use std::sync::Arc;

fn opts(threads: usize) -> ContextOptions {
    ContextOptions {
        threads,
        kv_type: KvType::F16,
        n_ctx: 64,
        n_batch: 64,
    }
}

/// The (stage, shape) pairs one decode captured.
type StageShapes = Vec<(StageKey, Vec<usize>)>;

/// Prefill 5 tokens, then decode 3 greedy tokens: (logits of every step, mapped stages of every step).
fn run(model: &Arc<Model>, threads: usize, prompt: &[u32]) -> (Vec<Vec<f32>>, Vec<StageShapes>) {
    let mut ctx = Context::new(model.clone(), &opts(threads), CaptureFilter::all()).unwrap();
    let n_vocab = model.n_vocab();
    let (mut logits, mut stages) = (Vec::new(), Vec::new());
    let mut batch = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..4 {
        let out = ctx.decode(&batch, pos).unwrap();
        let mapped = map_nodes(out.nodes, pos);
        assert!(
            mapped.unknown.is_empty(),
            "unmapped nodes: {:?}",
            mapped.unknown
        );
        stages.push(
            mapped
                .stages
                .iter()
                .map(|(k, t)| (*k, t.shape.clone()))
                .collect(),
        );
        pos += batch.len();
        let last = &out.logits[out.logits.len() - n_vocab..];
        batch = vec![divergence::compare::metrics::argmax(last) as u32];
        logits.push(out.logits);
    }
    (logits, stages)
}

#[test]
fn tiny_decode_captures_every_stage_with_config_shapes_and_threads_agree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let cfg = SynthConfig::preset(Preset::Tiny);
    write_model(&cfg, &path).unwrap();
    let model = Arc::new(Model::load(&path).expect("the reference loads the tiny model"));
    let prompt = model.tokenize("hello", true, false).unwrap();
    let prompt: Vec<u32> = prompt
        .into_iter()
        .chain([300, 301, 302, 303, 304])
        .take(5)
        .collect();
    assert_eq!(prompt.len(), 5);

    let (logits1, stages) = run(&model, 1, &prompt);
    let head_dim = cfg.n_embd / cfg.n_head;
    for (step, got) in stages.iter().enumerate() {
        let t = if step == 0 { 5 } else { 1 };
        let k = if step == 0 { 5 } else { 5 + step };
        for layer in 0..cfg.n_layer {
            for stage in Stage::per_layer() {
                let shape = got
                    .iter()
                    .find(|(key, _)| *key == StageKey::new(Some(layer), stage))
                    .map(|(_, s)| s.clone())
                    .unwrap_or_else(|| panic!("step {step}: no {stage} for layer {layer}"));
                let kv = head_dim * cfg.n_head_kv;
                let want = match stage {
                    Stage::KProj | Stage::VProj | Stage::KRope => vec![t, kv],
                    Stage::AttnScores | Stage::AttnProbs => vec![cfg.n_head, t, k],
                    Stage::FfnGate
                    | Stage::FfnAct
                    | Stage::FfnUp
                    | Stage::FfnMul
                    | Stage::FfnSubNorm => vec![t, cfg.n_ff],
                    _ => vec![t, cfg.n_embd],
                };
                assert_eq!(shape, want, "step {step} layer {layer} {stage}");
            }
        }
        for stage in [Stage::TokEmbd, Stage::ResultNorm, Stage::Logits] {
            assert!(
                got.iter()
                    .any(|(key, _)| *key == StageKey::new(None, stage)),
                "step {step}: no {stage}"
            );
        }
    }
    assert!(logits1.iter().flatten().all(|x| x.is_finite()));
    let (logits2, _) = run(&model, 2, &prompt);
    assert_eq!(logits1, logits2, "1 and 2 threads give different logits");
}

#[test]
fn build_info_names_the_pin_and_the_flags() {
    let info = divergence::reference::BuildInfo::current(2);
    assert!(
        info.source.contains("bitnet-cpp-sys 0.0.5") || info.source.starts_with("BITNET_CPP_DIR")
    );
    assert!(info.cmake_flags.contains("-DBITNET_X86_TL2=OFF"));
    assert!(info.patches.len() >= 3, "{:?}", info.patches);
    assert_eq!(info.threads, 2);
}

#[test]
fn the_reference_kernel_wraps_at_4096_values() {
    // All codes 2 (+1) and q = 127 over 4096 values: the true sum is
    // 2*127*4096 = 1,040,384; the 16-bit lanes wrap (BitNet issue 629).
    let codes = vec![0xAAu8; 1024];
    let q = vec![127i8; 4096];
    assert_eq!(kernels::vec_dot_i2_i8_s(&codes, &q), Some(-8192.0));
    assert_eq!(scalar::dot_reference_wrap(&codes, &q), -8192);
    assert_eq!(scalar::dot_exact(&codes, &q), 1_040_384);
}

fn row_len() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..=8, 30usize..=34, 40usize..=48].prop_map(|blocks| blocks * 128)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn quantize_row_i8_s_is_bit_identical(x in row_len().prop_flat_map(|n| proptest::collection::vec(-50f32..50.0, n))) {
        let (q_ref, scale_ref, sum_ref) = kernels::quantize_row_i8_s(&x);
        let mut q = vec![0i8; x.len()];
        let row = quantize_row_i8_s(&x, &mut q, ActQuantVariant::REFERENCE);
        prop_assert_eq!(q, q_ref);
        prop_assert_eq!(row.scale.to_bits(), scale_ref.to_bits());
        prop_assert_eq!(row.sum, sum_ref);
    }

    #[test]
    fn vec_dot_i2_i8_s_equals_our_wrap_model(
        (codes, q) in row_len().prop_flat_map(|n| (
            proptest::collection::vec(prop_oneof![Just(0u8), Just(1), Just(2)], n),
            proptest::collection::vec(any::<i8>(), n),
        )),
        saturate in any::<bool>(),
    ) {
        // Half the cases push every lane toward overflow: large same-signed q.
        let q: Vec<i8> = if saturate { q.iter().map(|&v| if v >= 0 { 127 } else { 120 }).collect() } else { q };
        let ternary: Vec<i8> = codes.iter().map(|&c| c as i8 - 1).collect();
        let packed = divergence::quant::i2s::pack(&ternary, 1.0);
        let row = &packed[..codes.len() / 4];
        let reference = kernels::vec_dot_i2_i8_s(row, &q).expect("AVX2 kernel");
        prop_assert_eq!(reference, scalar::dot_reference_wrap(row, &q) as f32);
        if codes.len() <= 4096 && !saturate {
            prop_assert_eq!(reference, scalar::dot_exact(row, &q) as f32);
        }
    }
}

#[test]
fn detokenize_skips_ids_outside_the_vocabulary() {
    // llama_token_to_piece indexes its token table unchecked: out-of-range
    // ids must never reach it (an ASan SEGV before the fix, docs/asan.md).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_model(&SynthConfig::preset(Preset::Tiny), &path).unwrap();
    let model = Model::load(&path).unwrap();
    let n = model.n_vocab() as u32;
    let valid = model.detokenize(&[300, 301]);
    assert_eq!(
        model.detokenize(&[n, 300, u32::MAX, 301, i32::MAX as u32 + 1]),
        valid
    );
}
