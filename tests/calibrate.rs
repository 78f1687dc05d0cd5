//! The local rules are measurements. These runs of clean engines (ours in
//! process, in both modes and both KV types, and ours through dumps at
//! stage and at layer granularity) on the presets and on the real widths
//! give the largest local error each stage reaches; `policies/default.json`
//! writes the bounds with these numbers.
//!
//! `the_local_rules_hold_on_clean_runs` (always run) checks the bounds on
//! the small shapes. The measurement itself, with the 2B-4T and 0.7B widths,
//! is `cargo test --release --test calibrate -- --ignored --nocapture`.

mod common;

use divergence::candidate::BuiltinCandidate;
use divergence::compare::Policy;
use divergence::dump::capture::{capture_candidate, capture_reference, CaptureConfig};
use divergence::dump::map::map_dump;
use divergence::dump::Dump;
use divergence::lockstep::offline::{compare_dumps, CandidateDump, OfflineOptions};
use divergence::lockstep::{Mode, Prompt, Verdict};
use divergence::receipt::{Receipt, RunRecord};
use divergence::synth::{write_model, Preset, SynthConfig};
use divergence::trace::Stage;
use divergence::KvType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const EXE: &str = env!("CARGO_BIN_EXE_divergence");

/// The worst local error per stage seen, per side, and the worst NMSE of
/// stages judged across a gap.
#[derive(Default, Debug)]
struct Worst {
    by_stage: BTreeMap<Stage, (f64, f64)>,
    across_gap: f64,
    runs: usize,
}

impl Worst {
    fn add_receipt(&mut self, r: &Receipt, what: &str) {
        assert_eq!(
            r.verdict,
            Verdict::NoDivergence,
            "{what}: a clean run is not clean: {:?}",
            r.first_divergence
                .as_ref()
                .map(|d| (d.step, d.layer, d.stage, &d.blame.reason))
        );
        self.runs += 1;
        for s in &r.stages {
            let e = self.by_stage.entry(s.stage).or_default();
            e.0 = e.0.max(s.worst_candidate_over_rounding.unwrap_or(0.0));
            e.1 = e.1.max(s.worst_reference_over_rounding.unwrap_or(0.0));
        }
        for step in &r.step_results {
            for x in step.stages.iter().filter(|x| x.across_gap) {
                self.across_gap = self.across_gap.max(x.candidate_local_nmse.unwrap_or(0.0));
            }
        }
    }

    fn print(&self, title: &str) {
        eprintln!("{title}: {} clean runs", self.runs);
        for (stage, (c, r)) in &self.by_stage {
            eprintln!(
                "  {:<14} candidate {c:9.2e}  reference {r:9.2e}",
                stage.name()
            );
        }
        eprintln!("  across a gap (NMSE): {:.2e}", self.across_gap);
    }

    /// Every measured value is within the policy's bounds.
    fn check(&self, policy: &Policy) {
        for (stage, (c, r)) in &self.by_stage {
            let bound = policy.local_rule(*stage).max_over_rounding;
            assert!(
                c.max(*r) <= bound,
                "{stage}: a clean run reached {} over rounding, the bound is {bound}",
                c.max(*r)
            );
        }
        assert!(self.across_gap <= policy.local.across_gap.max_nmse);
    }
}

fn model(dir: &Path, name: &str, cfg: SynthConfig) -> PathBuf {
    let path = dir.join(format!("{name}.gguf"));
    write_model(&cfg, &path).unwrap();
    path
}

fn preset(p: Preset, arch: &str) -> SynthConfig {
    let mut c = SynthConfig::preset(p);
    c.seed = 1;
    c.arch = arch.into();
    c
}

fn find(path: &Path, prompt: &Prompt, mode: Mode, kv: KvType, threads: usize) -> Receipt {
    let record = RunRecord {
        model_path: path.display().to_string(),
        prompt: prompt.clone(),
        steps: 4,
        mode,
        threads,
        kv_type: kv,
        keep_going: true,
        faults: vec![],
        token_faults: vec![],
        fault_layer: None,
        policy_path: None,
        chat: false,
        reference_ffn_act: Default::default(),
        ffn_act: None,
    };
    Receipt::run(&record, PathBuf::from(EXE), None, None).unwrap()
}

/// Our engine through dumps: every stage, and only the layer outputs, the
/// final norm and the logits.
fn through_dumps(dir: &Path, path: &Path, tokens: &[u32], kv: KvType, worst: &mut Worst) {
    let cfg = |out: &str| CaptureConfig {
        model: path.to_path_buf(),
        prompt: Prompt::Tokens(tokens.to_vec()),
        steps: 4,
        threads: 2,
        kv_type: kv,
        ffn_act: None,
        out: dir.join(out),
        cancel: None,
    };
    let (r, c) = (cfg("ref.safetensors"), cfg("cand.safetensors"));
    capture_reference(&r, Path::new(EXE)).unwrap();
    capture_candidate(&c, &BuiltinCandidate::default()).unwrap();
    let reference = Dump::open(&r.out).unwrap();
    let cand = Dump::open(&c.out).unwrap();
    let opts = OfflineOptions {
        policy: Policy::default_policy(),
        keep_going: true,
        model: Some(path.to_path_buf()),
        worker_exe: None,
        ffn_act: None,
    };
    let full = map_dump(&cand, None).unwrap();
    for layer_only in [false, true] {
        let mut stages = map_dump(&cand, None).unwrap();
        let mut manifest = cand.manifest.clone().unwrap();
        if layer_only {
            let keep = [Stage::LOut, Stage::ResultNorm, Stage::Logits];
            stages.stages.retain(|(_, k), _| keep.contains(&k.stage));
            manifest.stages = Some(keep.to_vec());
        } else {
            assert_eq!(stages.stages.len(), full.stages.len());
        }
        let compared = compare_dumps(
            &reference,
            &CandidateDump {
                stages: Ok(&stages),
                manifest: Some(&manifest),
                label: "ours".into(),
            },
            &opts,
        )
        .unwrap();
        let receipt = Receipt::from_outcome(
            RunRecord {
                model_path: path.display().to_string(),
                prompt: Prompt::Tokens(tokens.to_vec()),
                steps: 4,
                mode: Mode::Free,
                threads: 2,
                kv_type: kv,
                keep_going: true,
                faults: vec![],
                token_faults: vec![],
                fault_layer: None,
                policy_path: None,
                chat: false,
                reference_ffn_act: Default::default(),
                ffn_act: None,
            },
            String::new(),
            Policy::default_policy(),
            compared.outcome,
        );
        worst.add_receipt(
            &receipt,
            &format!(
                "{} through dumps (layer only: {layer_only})",
                path.display()
            ),
        );
    }
}

#[test]
fn the_local_rules_hold_on_clean_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut worst = Worst::default();
    let text = Prompt::Text("The quick brown fox".into());
    for (name, cfg) in [
        ("tiny-bitnet", preset(Preset::Tiny, "bitnet")),
        ("tiny-b158", preset(Preset::Tiny, "bitnet-b1.58")),
        ("tiny-llama", preset(Preset::Tiny, "llama")),
        ("small-bitnet", preset(Preset::Small, "bitnet")),
    ] {
        let path = model(dir.path(), name, cfg);
        for mode in [Mode::Resync, Mode::Free] {
            for kv in [KvType::F16, KvType::F32] {
                let r = find(&path, &text, mode, kv, 2);
                worst.add_receipt(&r, &format!("{name} {mode:?} {kv:?}"));
            }
        }
        through_dumps(
            dir.path(),
            &path,
            &[1, 407, 259, 340, 344, 332, 326],
            KvType::F16,
            &mut worst,
        );
    }
    worst.print("presets");
    worst.check(&Policy::default_policy());
}

/// The measurement behind the policy's numbers, on the real widths too.
#[test]
#[ignore]
fn measure_the_local_rules_on_every_width() {
    let dir = tempfile::tempdir().unwrap();
    let mut worst = Worst::default();
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 500 + 1).collect();
    let prompt = Prompt::Tokens(tokens.clone());
    let mut widths = vec![
        ("tiny-bitnet", preset(Preset::Tiny, "bitnet")),
        ("tiny-b158", preset(Preset::Tiny, "bitnet-b1.58")),
        ("tiny-llama", preset(Preset::Tiny, "llama")),
        ("small-bitnet", preset(Preset::Small, "bitnet")),
    ];
    let mut b158 = preset(Preset::Bitnet2B4T, "bitnet-b1.58");
    b158.n_layer = 4;
    b158.n_vocab = 4096;
    b158.vocab = None;
    b158.vocab_source = None;
    widths.push(("2b4t-width-4-layers", b158));
    let mut large = preset(Preset::BitnetLarge, "bitnet");
    large.n_layer = 3;
    large.n_vocab = 4096;
    widths.push(("large-width-3-layers", large));
    for (name, cfg) in widths {
        let path = model(dir.path(), name, cfg);
        for mode in [Mode::Resync, Mode::Free] {
            for kv in [KvType::F16, KvType::F32] {
                let r = find(&path, &prompt, mode, kv, 2);
                worst.add_receipt(&r, &format!("{name} {mode:?} {kv:?}"));
            }
        }
        for kv in [KvType::F16, KvType::F32] {
            through_dumps(dir.path(), &path, &tokens, kv, &mut worst);
        }
        worst.print(name);
    }
    worst.check(&Policy::default_policy());
}
