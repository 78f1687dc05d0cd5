//! Dumps and offline comparison: `divergence capture` writes every stage of
//! every step into a safetensors file, `divergence compare` judges one dump
//! against another (directly, or through a map for another engine's
//! naming), and a broken dump is a result with a receipt, not a crash.

mod common;

use divergence::dump::{Dump, DumpWriter, Manifest};
use divergence::lockstep::Verdict;
use divergence::receipt::Receipt;
use divergence::synth::{write_model, Preset, SynthConfig};
use divergence::trace::Stage;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Runs our binary; (exit code, stdout + stderr).
fn cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_divergence"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
    reference: PathBuf,
    candidate: PathBuf,
}

/// The small preset, its reference dump and our engine's dump (3 decode
/// steps), made once for every test here.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("small.gguf");
        let cfg = SynthConfig {
            seed: 1,
            ..SynthConfig::preset(Preset::Small)
        };
        write_model(&cfg, &model).unwrap();
        let [reference, candidate] = ["reference", "candidate"].map(|e| {
            let out = dir.path().join(format!("{e}.safetensors"));
            let (code, log) = cli(&[
                "capture",
                "--model",
                model.to_str().unwrap(),
                "--prompt",
                "The quick brown fox",
                "--steps",
                "3",
                "--engine",
                e,
                "--out",
                out.to_str().unwrap(),
            ]);
            assert_eq!(code, 0, "capture {e}: {log}");
            out
        });
        Fixture {
            dir,
            model,
            reference,
            candidate,
        }
    })
}

fn compare(candidate: &Path, extra: &[&str]) -> (i32, Receipt, String) {
    let f = fixture();
    let receipt = f.dir.path().join(format!(
        "receipt-{}.json",
        candidate.file_stem().unwrap().to_string_lossy()
    ));
    let mut args = vec![
        "compare",
        "--reference",
        f.reference.to_str().unwrap(),
        "--candidate",
        candidate.to_str().unwrap(),
        "--receipt",
        receipt.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, log) = cli(&args);
    let r = Receipt::read(&receipt).unwrap_or_else(|e| panic!("no receipt ({e}): {log}"));
    (code, r, log)
}

/// Rewrites `from` into `to` through `edit(name, shape, data)`, which may
/// rename, reshape, change or drop (None) each tensor.
fn rewrite(
    from: &Path,
    to: &Path,
    keep_manifest: bool,
    mut edit: impl FnMut(&str, Vec<usize>, Vec<f32>) -> Vec<(String, Vec<usize>, Vec<f32>)>,
) {
    let d = Dump::open(from).unwrap();
    let mut w = DumpWriter::create(to).unwrap();
    let names: Vec<String> = d.names().map(str::to_owned).collect();
    for name in names {
        let t = d.tensor(&name).unwrap().unwrap();
        for (n, shape, data) in edit(&name, t.shape, t.data) {
            w.add_named(&n, &shape, &data).unwrap();
        }
    }
    let manifest: Option<Manifest> = keep_manifest.then(|| d.manifest.clone().unwrap());
    w.finish(manifest.as_ref()).unwrap();
}

#[test]
fn a_dump_holds_every_stage_of_every_step_and_a_manifest() {
    let f = fixture();
    let d = Dump::open(&f.reference).unwrap();
    let m = d.manifest.as_ref().unwrap();
    assert_eq!(m.engine, "reference");
    assert_eq!(m.steps.len(), 4);
    assert_eq!(m.steps[1].pos0, m.steps[0].tokens.len());
    assert_eq!(m.model_sha256.len(), 64);
    let facts = m.model.as_ref().unwrap();
    let per_step = facts.expected_stages().len();
    assert_eq!(d.names().count(), 4 * per_step);
    // Names and canonical layouts.
    let t = facts.n_ff;
    assert_eq!(d.shape("step1.layer2.ffn_up"), Some(&[1, t][..]));
    let n0 = m.steps[0].tokens.len();
    assert_eq!(
        d.shape("step0.layer0.attn_scores"),
        Some(&[facts.n_head, n0, n0][..])
    );
    assert_eq!(d.shape("step2.logits"), Some(&[1, facts.n_vocab][..]));
}

#[test]
fn the_pypi_safetensors_reader_reads_a_dump() {
    let ok = Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        common::skip(
            "the_pypi_safetensors_reader_reads_a_dump",
            "python3 packages safetensors/numpy not installed (pip install numpy safetensors)",
        );
        return;
    }
    let f = fixture();
    let script = "import sys, json\nfrom safetensors.numpy import load_file\nfrom safetensors import safe_open\nt = load_file(sys.argv[1])\nwith safe_open(sys.argv[1], 'np') as f: m = json.loads(f.metadata()['divergence'])\nprint(json.dumps({'n': len(t), 'shape': list(t['step0.layer1.q_proj'].shape), 'dtype': str(t['step0.layer1.q_proj'].dtype), 'steps': len(m['steps'])}))";
    let out = Command::new("python3")
        .args(["-c", script, f.reference.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = Dump::open(&f.reference).unwrap();
    assert_eq!(v["n"], d.names().count());
    assert_eq!(v["dtype"], "float32");
    assert_eq!(v["steps"], 4);
    let shape: Vec<usize> = serde_json::from_value(v["shape"].clone()).unwrap();
    assert_eq!(shape, d.shape("step0.layer1.q_proj").unwrap());
}

#[test]
fn a_dump_compared_with_itself_is_clean() {
    let (code, r, log) = compare(&fixture().reference, &[]);
    assert_eq!(code, 0, "{log}");
    assert_eq!(r.verdict, Verdict::NoDivergence);
    assert!(r.coverage.complete);
    assert!(r.offline.as_ref().unwrap().note.contains("local error"));
    assert!(
        r.offline.as_ref().unwrap().model_given,
        "the dump's own model is used"
    );
    assert!(r.stages.iter().all(|s| s.all_exact));
}

#[test]
fn one_changed_element_is_found_at_its_step_layer_and_stage() {
    let f = fixture();
    let changed = f.dir.path().join("one-changed.safetensors");
    rewrite(&f.reference, &changed, true, |name, shape, mut data| {
        if name == "step1.layer2.ffn_up" {
            data[7] += 10.0;
        }
        vec![(name.to_string(), shape, data)]
    });
    let model = f.model.to_str().unwrap();
    let (code, r, log) = compare(&changed, &["--model", model]);
    assert_eq!(code, 1, "{log}");
    let d = r.first_divergence.as_ref().unwrap();
    assert_eq!(
        (d.step, d.layer, d.stage),
        (1, Some(2), Stage::FfnUp),
        "{log}"
    );
    assert_eq!(d.worst[0].flat_index, 7);
    // With the model the oracle recomputes the stage from the reference
    // dump's inputs: the changed side is the candidate.
    assert_eq!(
        d.blame.blame,
        divergence::compare::Blame::Candidate,
        "{}",
        d.blame.reason
    );
}

#[test]
fn our_engines_dump_matches_the_references_within_the_free_run_policy() {
    let f = fixture();
    let (code, r, log) = compare(&f.candidate, &["--model", f.model.to_str().unwrap()]);
    assert_eq!(code, 0, "{log}");
    assert!(r.coverage.complete);
    // Before any loose stage, the free run is still bit-exact.
    let first_layer_q = r
        .stages
        .iter()
        .find(|s| s.layer == Some(0) && s.stage == Stage::QProj)
        .unwrap();
    assert!(first_layer_q.all_exact);
}

#[test]
fn a_truncated_dump_is_a_candidate_failure_with_a_receipt() {
    let f = fixture();
    let bytes = std::fs::read(&f.candidate).unwrap();
    let cut = f.dir.path().join("truncated.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (code, r, log) = compare(&cut, &[]);
    assert_eq!(code, 5, "{log}");
    assert_eq!(r.verdict, Verdict::CandidateFailed);
    assert!(r
        .candidate_failure
        .unwrap()
        .message
        .contains("cannot be read"));
}

#[test]
fn a_dump_with_a_wrong_shape_is_a_candidate_failure_naming_it() {
    let f = fixture();
    let wrong = f.dir.path().join("wrong-shape.safetensors");
    rewrite(&f.candidate, &wrong, true, |name, shape, data| {
        let shape = if name == "step0.layer1.attn_out" {
            shape.iter().rev().copied().collect() // [T, E] written as [E, T]
        } else {
            shape
        };
        vec![(name.to_string(), shape, data)]
    });
    let (code, r, log) = compare(&wrong, &[]);
    assert_eq!(code, 5, "{log}");
    let msg = r.candidate_failure.unwrap().message;
    assert!(
        msg.contains("step0.layer1.attn_out") && msg.contains("canonical layout"),
        "{msg}"
    );
}

#[test]
fn a_dump_that_lacks_a_stage_is_incomplete() {
    let f = fixture();
    let lacking = f.dir.path().join("lacking.safetensors");
    rewrite(&f.reference, &lacking, true, |name, shape, data| {
        if name.ends_with("layer3.ffn_sub_norm") {
            vec![]
        } else {
            vec![(name.to_string(), shape, data)]
        }
    });
    let (code, r, log) = compare(&lacking, &[]);
    assert_eq!(code, 4, "{log}");
    assert_eq!(r.verdict, Verdict::Incomplete);
    for s in &r.coverage.steps {
        assert_eq!(s.missing_candidate.len(), 1);
        assert_eq!(s.missing_candidate[0].stage, Stage::FfnSubNorm);
    }
}

/// Our candidate dump renamed into a plausible foreign scheme: per-stage
/// names of its own, q_rope split per head, attention scores stored [T, K, H],
/// an extra tensor with no stage, no manifest.
fn foreign_dump(to: &Path) {
    let f = fixture();
    let d = Dump::open(&f.candidate).unwrap();
    let facts = d.manifest.as_ref().unwrap().model.clone().unwrap();
    let (h, hd) = (facts.n_head, facts.head_dim);
    rewrite(&f.candidate, to, false, |name, shape, data| {
        let (step, key) = divergence::dump::parse_name(name).unwrap();
        let stage = key.stage.name();
        let base = match key.layer {
            Some(l) => format!("s{step}.layers.{l}."),
            None => format!("s{step}."),
        };
        match key.stage {
            Stage::QProj => vec![(format!("{base}attention.q_proj"), shape, data)],
            Stage::FfnSubNorm => vec![(format!("{base}post_ffn_subnorm"), shape, data)],
            Stage::QRope => {
                let t = shape[0];
                (0..h)
                    .map(|head| {
                        let part: Vec<f32> = (0..t)
                            .flat_map(|ti| data[ti * h * hd + head * hd..][..hd].to_vec())
                            .collect();
                        (
                            format!("{base}attention.q_rope.head{head}"),
                            vec![t, hd],
                            part,
                        )
                    })
                    .collect()
            }
            Stage::AttnScores => {
                // [H, T, K] → [T, K, H]
                let (nh, t, k) = (shape[0], shape[1], shape[2]);
                let mut out = vec![0f32; data.len()];
                for a in 0..nh {
                    for b in 0..t {
                        for c in 0..k {
                            out[(b * k + c) * nh + a] = data[(a * t + b) * k + c];
                        }
                    }
                }
                let mut v = vec![(format!("{base}attention.scores"), vec![t, k, nh], out)];
                v.push((format!("{base}kv_cache_bytes"), vec![1], vec![0.0]));
                v
            }
            _ => vec![(format!("{base}{stage}"), shape, data)],
        }
    });
}

#[test]
fn a_foreign_dump_is_read_through_a_map() {
    let f = fixture();
    let foreign = f.dir.path().join("foreign.safetensors");
    foreign_dump(&foreign);
    let map = f.dir.path().join("map.json");
    let mut rules = vec![
        serde_json::json!({"name": "s{S}.layers.{L}.attention.q_proj", "stage": "q_proj"}),
        serde_json::json!({"name": "s{S}.layers.{L}.post_ffn_subnorm", "stage": "ffn_sub_norm"}),
        serde_json::json!({"name": "s{S}.layers.{L}.attention.q_rope.head{H}", "stage": "q_rope", "heads": "concat"}),
        serde_json::json!({"name": "s{S}.layers.{L}.attention.scores", "stage": "attn_scores", "transpose": [2, 0, 1]}),
        serde_json::json!({"name": "s{S}.layers.{L}.kv_cache_bytes", "skip": true}),
    ];
    for s in Stage::ALL {
        if matches!(
            s,
            Stage::QProj | Stage::FfnSubNorm | Stage::QRope | Stage::AttnScores
        ) {
            continue;
        }
        let name = if s.is_per_layer() {
            format!("s{{S}}.layers.{{L}}.{s}")
        } else {
            format!("s{{S}}.{s}")
        };
        rules.push(serde_json::json!({"name": name, "stage": s.name()}));
    }
    std::fs::write(
        &map,
        serde_json::to_string_pretty(&serde_json::json!({"description": "test", "tensors": rules}))
            .unwrap(),
    )
    .unwrap();
    let (code, r, log) = compare(&foreign, &["--map", map.to_str().unwrap()]);
    assert_eq!(code, 0, "{log}");
    assert!(r.coverage.complete, "{:?}", r.coverage);
    // The same verdict and the same per-stage errors as the dump read directly.
    let (_, direct, _) = compare(&f.candidate, &[]);
    assert_eq!(r.stages.len(), direct.stages.len());
    for (a, b) in r.stages.iter().zip(&direct.stages) {
        assert_eq!(
            (
                a.layer,
                a.stage,
                a.worst_nmse,
                a.worst_candidate_over_rounding
            ),
            (
                b.layer,
                b.stage,
                b.worst_nmse,
                b.worst_candidate_over_rounding
            )
        );
    }
    // Without the map nothing matches: every tensor unmapped, nothing judged.
    let (code, r, _) = compare(&foreign, &[]);
    assert_eq!(code, 4);
    assert!(r
        .coverage
        .notes
        .iter()
        .any(|n| n.contains("map to no stage")));
}

/// Rewrites `from` into `to` with its manifest edited.
fn with_manifest(from: &Path, to: &Path, edit: impl FnOnce(&mut Manifest)) {
    let d = Dump::open(from).unwrap();
    let mut w = DumpWriter::create(to).unwrap();
    for name in d.names() {
        let t = d.tensor(name).unwrap().unwrap();
        w.add_named(name, &t.shape, &t.data).unwrap();
    }
    let mut m = d.manifest.clone().unwrap();
    edit(&mut m);
    w.finish(Some(&m)).unwrap();
}

#[test]
fn one_element_off_by_half_its_magnitude_is_found_at_exactly_its_place() {
    let f = fixture();
    let changed = f.dir.path().join("half-off.safetensors");
    rewrite(&f.reference, &changed, true, |name, shape, mut data| {
        if name == "step1.layer2.ffn_up" {
            data[3] += 0.5 * (data[3].abs() + 1.0);
        }
        vec![(name.to_string(), shape, data)]
    });
    let (code, r, log) = compare(&changed, &[]);
    assert_eq!(code, 1, "{log}");
    let d = r.first_divergence.as_ref().unwrap();
    assert_eq!(
        (d.step, d.layer, d.stage),
        (1, Some(2), Stage::FfnUp),
        "{log}"
    );
    assert_eq!(d.blame.blame, divergence::compare::Blame::Candidate);
    assert_eq!(d.worst[0].flat_index, 3);
}

#[test]
fn a_reference_manifest_that_does_not_list_its_steps_is_bad_input() {
    let f = fixture();
    // Only step 0 listed: the tensors of steps 1-3 are not accounted for.
    let short = f.dir.path().join("ref-one-step.safetensors");
    with_manifest(&f.reference, &short, |m| m.steps.truncate(1));
    let (code, log) = cli(&[
        "compare",
        "--reference",
        short.to_str().unwrap(),
        "--candidate",
        f.candidate.to_str().unwrap(),
        "--receipt",
        f.dir.path().join("short.json").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("step 1") && log.contains("reference"), "{log}");
    // Step 0 twice.
    let twice = f.dir.path().join("ref-step0-twice.safetensors");
    with_manifest(&f.reference, &twice, |m| {
        let s0 = m.steps[0].clone();
        m.steps.insert(1, s0);
    });
    let (code, log) = cli(&[
        "compare",
        "--reference",
        twice.to_str().unwrap(),
        "--candidate",
        f.candidate.to_str().unwrap(),
        "--receipt",
        f.dir.path().join("twice.json").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("step 0 is listed twice"), "{log}");
}

#[test]
fn two_tensors_for_one_stage_are_an_error_naming_both() {
    let f = fixture();
    let doubled = f.dir.path().join("doubled.safetensors");
    rewrite(&f.candidate, &doubled, true, |name, shape, data| {
        if name == "step0.layer0.q_proj" {
            let zeros = vec![0.0; data.len()];
            vec![
                (name.to_string(), shape.clone(), zeros),
                ("step00.layer00.q_proj".to_string(), shape, data),
            ]
        } else {
            vec![(name.to_string(), shape, data)]
        }
    });
    let (code, r, log) = compare(&doubled, &[]);
    assert_eq!(code, 5, "{log}");
    let msg = r.candidate_failure.unwrap().message;
    assert!(
        msg.contains("step0.layer0.q_proj") && msg.contains("step00.layer00.q_proj"),
        "{msg}"
    );
    // Two map rules that land on one stage.
    let map = f.dir.path().join("two-rules.json");
    std::fs::write(
        &map,
        r#"{"tensors": [
            {"name": "step{S}.layer{L}.q_proj", "stage": "q_proj"},
            {"name": "step{S}.layer{L}.k_proj", "stage": "q_proj"},
            {"name": "step{S}.layer{L}.*", "skip": true},
            {"name": "step{S}.*", "skip": true}
        ]}"#,
    )
    .unwrap();
    let (code, r, log) = compare(&f.candidate, &["--map", map.to_str().unwrap()]);
    assert_eq!(code, 5, "{log}");
    let msg = r.candidate_failure.unwrap().message;
    assert!(msg.contains("q_proj") && msg.contains("k_proj"), "{msg}");
}

#[test]
fn a_malformed_reference_dump_is_bad_input_about_the_reference() {
    let f = fixture();
    for (what, edit) in [("wrong shape", 0usize), ("zero elements", 1usize)] {
        let bad = f.dir.path().join(format!("ref-{edit}.safetensors"));
        rewrite(&f.reference, &bad, true, |name, shape, data| {
            if name == "step0.layer1.attn_out" {
                if edit == 0 {
                    return vec![(
                        name.to_string(),
                        shape.iter().rev().copied().collect(),
                        data,
                    )];
                }
                return vec![(name.to_string(), vec![0, shape[1]], vec![])];
            }
            vec![(name.to_string(), shape, data)]
        });
        let (code, log) = cli(&[
            "compare",
            "--reference",
            bad.to_str().unwrap(),
            "--candidate",
            f.candidate.to_str().unwrap(),
            "--receipt",
            f.dir.path().join("bad-ref.json").to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "{what}: {log}");
        assert!(
            log.contains("reference dump") && log.contains("step0.layer1.attn_out"),
            "{what}: {log}"
        );
    }
}

#[test]
fn compare_refuses_a_model_the_dumps_did_not_run() {
    let f = fixture();
    let other = f.dir.path().join("other.gguf");
    let cfg = SynthConfig {
        seed: 2,
        ..SynthConfig::preset(Preset::Small)
    };
    write_model(&cfg, &other).unwrap();
    let (code, log) = cli(&[
        "compare",
        "--reference",
        f.reference.to_str().unwrap(),
        "--candidate",
        f.candidate.to_str().unwrap(),
        "--model",
        other.to_str().unwrap(),
        "--receipt",
        f.dir.path().join("other.json").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{log}");
    let want = Dump::open(&f.reference)
        .unwrap()
        .manifest
        .unwrap()
        .model_sha256;
    assert!(log.contains(&want), "names the dump's hash: {log}");
    assert!(log.contains("sha256"), "{log}");
}

#[test]
fn tensors_of_layers_or_steps_a_run_cannot_have_are_listed() {
    let f = fixture();
    let extra = f.dir.path().join("extra.safetensors");
    rewrite(&f.candidate, &extra, true, |name, shape, data| {
        let mut out = vec![(name.to_string(), shape.clone(), data.clone())];
        if name == "step0.layer0.q_proj" {
            out.push(("step0.layer99.q_proj".into(), shape.clone(), data.clone()));
            out.push(("step1000000000.layer0.q_proj".into(), shape, data));
        }
        out
    });
    let (code, r, log) = compare(&extra, &[]);
    assert_eq!(code, 4, "{log}");
    let notes = r.coverage.notes.join(" ");
    assert!(
        notes.contains("step0.layer99.q_proj") && notes.contains("step1000000000.layer0.q_proj"),
        "{notes}"
    );
}

#[test]
fn a_reference_manifest_claiming_a_billion_layers_is_refused() {
    let f = fixture();
    let huge = f.dir.path().join("ref-huge.safetensors");
    with_manifest(&f.reference, &huge, |m| {
        m.model.as_mut().unwrap().n_layer = 1_000_000_000;
        m.model_path = String::new();
    });
    let (code, log) = cli(&[
        "compare",
        "--reference",
        huge.to_str().unwrap(),
        "--candidate",
        f.candidate.to_str().unwrap(),
        "--receipt",
        f.dir.path().join("huge.json").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("1000000000"), "{log}");
    // With the model, the file's facts decide and the manifest is checked against them.
    let (code, log) = cli(&[
        "compare",
        "--reference",
        huge.to_str().unwrap(),
        "--candidate",
        f.candidate.to_str().unwrap(),
        "--model",
        f.model.to_str().unwrap(),
        "--receipt",
        f.dir.path().join("huge2.json").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("n_layer"), "{log}");
}

#[test]
fn different_prompt_ids_are_a_token_divergence_in_words() {
    let f = fixture();
    let r0 = Dump::open(&f.reference).unwrap();
    let ids = r0.manifest.unwrap().steps[0].tokens.clone();
    // Our engine fed a duplicated BOS.
    let mut dup = vec![ids[0]];
    dup.extend(&ids);
    let dup_s: Vec<String> = dup.iter().map(|t| t.to_string()).collect();
    let cand = f.dir.path().join("dup-bos.safetensors");
    let (code, log) = cli(&[
        "capture",
        "--model",
        f.model.to_str().unwrap(),
        "--tokens",
        &dup_s.join(","),
        "--steps",
        "3",
        "--engine",
        "candidate",
        "--out",
        cand.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{log}");
    let (code, r, log) = compare(&cand, &[]);
    assert_eq!(code, 1, "{log}");
    assert_eq!(r.verdict, Verdict::Divergence);
    let d = r.first_divergence.as_ref().unwrap();
    assert_eq!(d.measured, divergence::lockstep::Measured::Tokens);
    assert_eq!(d.blame.blame, divergence::compare::Blame::Candidate);
    let diff = r.tokens.first_difference.as_ref().unwrap();
    assert!(diff.description.contains("duplicated BOS"), "{diff:?}");
    // The reference dump was captured from text: its ids were not "given".
    assert!(!log.contains("given"), "{log}");
}

/// An honest engine with an f32 KV cache against a reference dump made with
/// the default f16 cache, on the 2B-4T widths with 12 layers: the two runs
/// drift apart (reported, with its growth), and nothing is blamed.
#[test]
fn an_f32_cache_candidate_against_an_f16_reference_drifts_but_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("2b4t-12.gguf");
    let mut cfg = SynthConfig::preset(Preset::Bitnet2B4T);
    cfg.seed = 1;
    cfg.n_layer = 12;
    cfg.n_vocab = 1024;
    write_model(&cfg, &model).unwrap();
    let capture = |engine: &str, kv: &str| {
        let out = dir.path().join(format!("{engine}-{kv}.safetensors"));
        let (code, log) = cli(&[
            "capture",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            "1,17,300,42,5,99,250,7",
            "--steps",
            "3",
            "--threads",
            "2",
            "--kv",
            kv,
            "--engine",
            engine,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{log}");
        out
    };
    let reference = capture("reference", "f16");
    let candidate = capture("candidate", "f32");
    let receipt = dir.path().join("r.json");
    let (code, log) = cli(&[
        "compare",
        "--reference",
        reference.to_str().unwrap(),
        "--candidate",
        candidate.to_str().unwrap(),
        "--receipt",
        receipt.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{log}");
    let r = Receipt::read(&receipt).unwrap();
    let drift = r.drift.as_ref().expect("the drift is reported");
    assert_eq!(drift.l_out_by_layer.len(), 12);
    assert!(drift.l_out_by_layer.iter().any(|&v| v > 0.0), "{drift:?}");
    assert!(log.contains("drift"), "{log}");
    assert!(
        r.remarks.iter().any(|m| m.contains("--kv f32")),
        "the matching capture command is named: {:?}",
        r.remarks
    );
}

/// A dump of the tokens only (a black-box engine): `from`'s manifest, its
/// steps' tokens edited by `edit`, no tensors.
fn tokens_only(from: &Path, to: &Path, edit: impl FnOnce(&mut Manifest)) {
    let d = Dump::open(from).unwrap();
    let mut m = d.manifest.clone().unwrap();
    m.engine = "black box".into();
    edit(&mut m);
    DumpWriter::create(to).unwrap().finish(Some(&m)).unwrap();
}

/// The reference's logits at the last position of `step`, from its dump.
fn reference_logits(step: usize) -> Vec<f32> {
    let d = Dump::open(&fixture().reference).unwrap();
    let t = d
        .tensor(&divergence::dump::tensor_name(
            step,
            divergence::trace::StageKey::new(None, Stage::Logits),
        ))
        .unwrap()
        .unwrap();
    let n = *t.shape.last().unwrap();
    t.data[t.data.len() - n..].to_vec()
}

#[test]
fn a_tokens_only_dump_of_our_engines_greedy_tokens_is_clean() {
    let f = fixture();
    let dump = f.dir.path().join("tokens-ours.safetensors");
    tokens_only(&f.candidate, &dump, |_| {});
    let model = f.model.to_str().unwrap();
    let (code, r, log) = compare(&dump, &["--model", model]);
    assert_eq!(code, 0, "{log}");
    assert_eq!(r.verdict, Verdict::NoDivergence);
    let scope = r.coverage.scope.as_ref().expect("the depth is said");
    assert_eq!(scope.granularity, "tokens", "{log}");
    assert!(log.contains("tokens only"), "{log}");
}

#[test]
fn a_wrong_token_is_a_divergence_with_its_rank_gap_and_probability_and_a_near_tie_is_a_tie() {
    let f = fixture();
    let model = f.model.to_str().unwrap();
    // At step 1 the black box picks the reference's second choice.
    let row = reference_logits(1);
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
    let (top, second) = (order[0], order[1]);
    let gap = row[top] - row[second];
    let dump = f.dir.path().join("tokens-second.safetensors");
    tokens_only(&f.reference, &dump, |m| {
        m.steps[2].tokens = vec![second as u32];
        m.steps.truncate(3);
    });
    // With a tie gap below the real gap: a divergence at step 1, blamed on
    // the candidate, with the figures.
    let policy = |max_tie_gap: f64, name: &str| {
        let mut p: serde_json::Value =
            serde_json::from_str(divergence::compare::policy::DEFAULT_POLICY).unwrap();
        p["local"]["choices"]["max_tie_gap"] = serde_json::json!(max_tie_gap);
        let path = f.dir.path().join(name);
        std::fs::write(&path, p.to_string()).unwrap();
        path
    };
    let strict = policy(f64::from(gap) / 2.0, "strict.json");
    let (code, r, log) = compare(
        &dump,
        &["--model", model, "--policy", strict.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{log}");
    let d = r.first_divergence.as_ref().unwrap();
    assert_eq!(d.step, 1);
    assert_eq!(d.stage, Stage::Logits);
    assert_eq!(d.measured, divergence::lockstep::Measured::Choice);
    assert_eq!(d.blame.blame, divergence::compare::Blame::Candidate);
    assert!(
        d.blame.reason.contains("ranks it 1") && d.blame.reason.contains("probability"),
        "{}",
        d.blame.reason
    );
    assert!(
        d.blame
            .reason
            .contains("the first wrong token is at step 1"),
        "{}",
        d.blame.reason
    );
    // With a tie gap above it: a recorded near-tie flip, not a divergence;
    // the step after it is judged on the black box's own history (bitnet.cpp
    // fed its tokens).
    let lenient = policy(f64::from(gap) * 2.0, "lenient.json");
    let (code, r, log) = compare(
        &dump,
        &["--model", model, "--policy", lenient.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{log}");
    assert!(
        r.remarks.iter().any(|x| x.contains("near-tie flip")),
        "{:?}",
        r.remarks
    );

    // The step after the flip is judged on the black box's own history:
    // bitnet.cpp fed its tokens (teacher forcing). Its top-1 there, read
    // from a first run, is then a clean choice.
    let forced = |token: u32, name: &str| {
        let path = f.dir.path().join(name);
        tokens_only(&f.reference, &path, |m| {
            m.steps[2].tokens = vec![second as u32];
            m.steps[3].tokens = vec![token];
            m.steps.truncate(4);
        });
        path
    };
    let probe = forced(0, "tokens-probe.safetensors");
    let (_, r, log) = compare(
        &probe,
        &["--model", model, "--policy", lenient.to_str().unwrap()],
    );
    let top1 = *r
        .generated
        .reference
        .get(2)
        .unwrap_or_else(|| panic!("{log}"));
    let followed = forced(top1, "tokens-followed.safetensors");
    let (code, r, log) = compare(
        &followed,
        &["--model", model, "--policy", lenient.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{log}");
    let first = Dump::open(&f.reference).unwrap().manifest.unwrap().steps[1].tokens[0];
    assert_eq!(r.generated.candidate, [first, second as u32, top1], "{log}");
}
