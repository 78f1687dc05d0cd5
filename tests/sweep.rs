//! Sweeps over a prompt corpus: the KL statistics as llama-perplexity
//! defines them (checked against values computed by hand), the corpus sweep
//! on `small` with exact shards (1/2 and 2/2 merged are the unsharded run,
//! byte for byte apart from `volatile`), a fault found in every prompt on
//! `tiny`, and bad input refused with exit 2.

use divergence::compare::metrics::{position_kl, PositionKl};
use divergence::lockstep::{PositionLogits, Verdict};
use divergence::sweep::{self, stats, KldSummary, Sweep};
use divergence::trace::Stage;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EXE: &str = env!("CARGO_BIN_EXE_divergence");

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/prompts.jsonl")
}

fn run(args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .output()
        .expect("run divergence")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn gen_model(dir: &Path, preset: &str) -> PathBuf {
    let path = dir.join(format!("{preset}.gguf"));
    let o = run(&[
        "gen-model",
        "--preset",
        preset,
        "--seed",
        "1",
        "-o",
        path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    path
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * (1.0 + b.abs())
}

#[test]
fn kld_statistics_match_values_computed_by_hand() {
    // Two tokens: the reference's logits (0, ln 3) give p = (1/4, 3/4); the
    // candidate's (0, 0) give q = (1/2, 1/2). KL(p ‖ q) = Σ p ln(p/q).
    let ln3 = 3f32.ln();
    let p1 = 1.0 / (1.0 + f64::from(ln3).exp());
    let p = [p1, 1.0 - p1];
    let by_hand = p[0] * (p[0] / 0.5).ln() + p[1] * (p[1] / 0.5).ln();
    let a = position_kl(&[0.0, ln3], &[0.0, 0.0]);
    assert!(close(a.kl, by_hand), "{} vs {by_hand}", a.kl);
    assert!((by_hand - 0.130812).abs() < 1e-6, "{by_hand}");
    assert_eq!(a.reference_top, 1);
    assert_eq!(a.candidate_top, 0, "a tie goes to the lower id");
    assert!(close(a.reference_top_p, p[1]) && (p[1] - 0.75).abs() < 1e-7);
    assert!(close(a.candidate_top_p, 0.5));

    // Identical rows: no divergence, same top token.
    let b = position_kl(&[1.0, -2.0, 0.5], &[1.0, -2.0, 0.5]);
    assert_eq!(b.kl, 0.0);
    assert_eq!((b.reference_top, b.candidate_top), (0, 0));

    // Three tokens, reversed: softmax by hand.
    let softmax = |x: [f64; 3]| {
        let z: f64 = x.iter().map(|v| v.exp()).sum();
        x.map(|v| v.exp() / z)
    };
    let (pr, pc) = (softmax([2.0, 1.0, 0.0]), softmax([0.0, 1.0, 2.0]));
    let by_hand: f64 = (0..3).map(|i| pr[i] * (pr[i] / pc[i]).ln()).sum();
    let c = position_kl(&[2.0, 1.0, 0.0], &[0.0, 1.0, 2.0]);
    assert!(close(c.kl, by_hand), "{} vs {by_hand}", c.kl);
    assert_eq!((c.reference_top, c.candidate_top), (0, 2));
    assert!(close(c.reference_top_p, pr[0]));
    assert!(close(c.candidate_top_p, pc[0]));

    // NaN logits on one side: the largest finite KL, never 0.
    assert_eq!(position_kl(&[1.0, 2.0], &[f32::NAN, 2.0]).kl, f64::MAX);

    // Percentiles over positions: KL values 0.4, 0.0, 0.3, 0.1, 0.2 (in
    // that order), the median is 0.2; p90 sits at rank 0.9·4 = 3.6:
    // 0.3 + 0.6·(0.4 − 0.3) = 0.36; p99 at 3.96 → 0.396; p99.9 → 0.3996.
    let kls = [0.4, 0.0, 0.3, 0.1, 0.2];
    let tops = [
        (5, 5, 0.9, 0.8),
        (1, 1, 0.5, 0.5),
        (2, 3, 0.6, 0.2),
        (4, 4, 0.7, 0.6),
        (0, 0, 0.3, 0.4),
    ];
    let positions: Vec<PositionLogits> = kls
        .iter()
        .zip(tops)
        .enumerate()
        .map(|(i, (&kl, (r, c, pr, pc)))| PositionLogits {
            step: 0,
            position: i,
            compared: PositionKl {
                kl,
                reference_top: r,
                candidate_top: c,
                reference_top_p: pr,
                candidate_top_p: pc,
            },
        })
        .collect();
    let k = KldSummary::of(&positions).unwrap();
    assert_eq!(k.positions, 5);
    assert!(close(k.mean, 0.2));
    assert_eq!((k.min, k.max), (0.0, 0.4));
    assert!(close(k.median, 0.2));
    assert!(close(k.p90, 0.36), "{}", k.p90);
    assert!(close(k.p99, 0.396), "{}", k.p99);
    assert!(close(k.p999, 0.3996), "{}", k.p999);
    assert!(close(k.top1_agreement, 0.8));
    // Same top p: the reference's top token's probability on both sides.
    assert!(close(k.same_top_p.reference_mean, 3.0 / 5.0));
    assert!(close(k.same_top_p.candidate_mean, 2.5 / 5.0));
    assert!(close(
        k.same_top_p.mean_abs_difference,
        (0.1 + 0.0 + 0.4 + 0.1 + 0.1) / 5.0
    ));
    assert!(close(k.same_top_p.max_abs_difference, 0.4));
    // An even count: the median is the mean of the two middle values.
    assert!(close(stats::percentile(&[0.1, 0.2, 0.4, 0.8], 0.5), 0.3));
    assert!(KldSummary::of(&[]).is_none());
}

#[test]
fn the_corpus_has_every_kind_of_prompt() {
    let c = sweep::Corpus::read(&corpus()).unwrap();
    assert!(c.prompts.len() >= 100, "{} prompts", c.prompts.len());
    for tag in [
        "question",
        "code",
        "numbers",
        "multilingual",
        "long",
        "short",
        "tokens",
    ] {
        assert!(
            c.prompts.iter().any(|p| p.tag.as_deref() == Some(tag)),
            "no {tag} prompt"
        );
    }
    assert!(c.prompts.iter().enumerate().all(|(i, p)| p.index == i));
}

/// The text of a sweep file without its `volatile` object (written last).
fn without_volatile(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let at = text.find("\n  \"volatile\":").expect("a volatile field");
    text[..at].to_string()
}

#[test]
fn corpus_sweep_on_small_shards_merge_to_the_unsharded_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = gen_model(dir.path(), "small");
    let receipts = dir.path().join("receipts");
    let corpus_path = corpus();
    let out = |name: &str| dir.path().join(name);
    let sweep_cmd = |shard: Option<&str>, file: &Path| {
        let mut args = vec![
            "sweep",
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            corpus_path.to_str().unwrap(),
            "--steps",
            "2",
            "--threads",
            "1",
            "--receipts",
            receipts.to_str().unwrap(),
            "--out",
            file.to_str().unwrap(),
        ];
        if let Some(s) = shard {
            args.extend(["--shard", s]);
        }
        let o = run(&args);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        );
        Sweep::read(file).unwrap()
    };
    let whole = sweep_cmd(None, &out("whole.json"));
    let one = sweep_cmd(Some("1/2"), &out("s1.json"));
    let two = sweep_cmd(Some("2/2"), &out("s2.json"));
    // Shards are a fixed subset: index % 2 == I - 1.
    assert!(one.prompts.iter().all(|p| p.index % 2 == 0));
    assert!(two.prompts.iter().all(|p| p.index % 2 == 1));
    assert_eq!(one.prompts.len() + two.prompts.len(), whole.prompts.len());
    // Given in either order, the merge is the unsharded run.
    let o = run(&[
        "merge",
        out("s2.json").to_str().unwrap(),
        out("s1.json").to_str().unwrap(),
        "-o",
        out("merged.json").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let merged = Sweep::read(&out("merged.json")).unwrap();
    assert_eq!(merged.identity(), whole.identity());
    assert_eq!(
        without_volatile(&out("merged.json")),
        without_volatile(&out("whole.json")),
        "the files differ outside volatile"
    );
    // Percentiles come from the merged raw values: not the shards' average.
    let (k, k1, k2) = (
        whole.summary.kld.clone().unwrap(),
        one.summary.kld.unwrap(),
        two.summary.kld.unwrap(),
    );
    assert_eq!(k.positions, k1.positions + k2.positions);
    assert_eq!(k.max, k1.max.max(k2.max));

    // A shard file edited to claim shard 0 of 2 is bad input, not a panic.
    let text = std::fs::read_to_string(out("s1.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["shard"]["index"] = 0.into();
    std::fs::write(out("s0.json"), v.to_string()).unwrap();
    let o = run(&[
        "merge",
        out("s0.json").to_str().unwrap(),
        out("s2.json").to_str().unwrap(),
        "-o",
        out("bad.json").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("1 <= I <= N"), "{}", stderr(&o));

    // What the sweep found: the clean engine on `small` in free mode.
    let corpus = sweep::Corpus::read(&corpus()).unwrap();
    assert_eq!(whole.prompts.len(), corpus.prompts.len());
    for p in &whole.prompts {
        assert_eq!(
            p.verdict,
            Some(Verdict::NoDivergence),
            "prompt {}: {p:?}",
            p.index
        );
        assert_eq!(p.steps_run, 3);
        // Every position of the prefill and of each decode step compared.
        assert_eq!(
            p.positions.len(),
            p.reference_tokens.len() + 2,
            "prompt {}",
            p.index
        );
        let receipt =
            divergence::receipt::Receipt::read(Path::new(p.receipt.as_ref().unwrap())).unwrap();
        assert_eq!(receipt.tokens.reference, p.reference_tokens);
    }
    assert!(k.max < 0.5 && k.top1_agreement > 0.9, "{k:?}");
    assert!(k.median <= k.p90 && k.p90 <= k.p99 && k.p99 <= k.p999 && k.p999 <= k.max);
    // Every (layer, stage) judged at every step of every prompt: 4 layers
    // of 20 stages and the 3 model-level ones.
    let s = &whole.summary;
    assert_eq!(s.stages.len(), 4 * 20 + 3);
    for d in &s.stages {
        assert_eq!(
            d.local_nmse.samples,
            3 * whole.prompts.len(),
            "{:?} {}",
            d.layer,
            d.stage
        );
        assert!(d.sides_nmse.is_some(), "free mode measures the drift");
    }
    let embd = s.stages.iter().find(|d| d.stage == Stage::TokEmbd).unwrap();
    assert_eq!(embd.exact_fraction, 1.0);
    assert_eq!(s.greedy_tokens.choices, 3 * whole.prompts.len());
}

#[test]
fn sweep_on_tiny_finds_an_injected_fault_in_every_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let model = gen_model(dir.path(), "tiny");
    let receipts = dir.path().join("r");
    let file = dir.path().join("sweep.json");
    let o = run(&[
        "sweep",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        corpus().to_str().unwrap(),
        "--steps",
        "1",
        "--mode",
        "resync",
        "--inject",
        "eps-hardcoded",
        "--receipts",
        receipts.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a divergence exits 1: {}",
        stderr(&o)
    );
    let sw = Sweep::read(&file).unwrap();
    assert_eq!(
        sw.summary.verdicts.get("divergence"),
        Some(&sw.prompts.len())
    );
    for p in &sw.prompts {
        let d = p.first_divergence.as_ref().expect("a divergence");
        assert_eq!(
            (d.step, d.layer, d.stage),
            (0, Some(0), Stage::AttnNorm),
            "prompt {}",
            p.index
        );
        assert_eq!(d.blame, divergence::compare::Blame::Candidate);
        // The sweep keeps going: every step is judged.
        assert_eq!(p.steps_run, 2);
        assert!(Path::new(p.receipt.as_ref().unwrap()).is_file());
    }
    let attn_norm = sw
        .summary
        .stages
        .iter()
        .find(|d| d.layer == Some(0) && d.stage == Stage::AttnNorm)
        .unwrap();
    assert_eq!(attn_norm.pass_fraction, 0.0);
    assert_eq!(attn_norm.exact_fraction, 0.0);
}

#[test]
fn a_plain_text_corpus_is_one_prompt_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.txt");
    std::fs::write(
        &path,
        "first prompt\n\n{\"prompt\": \"this is text here\"}\n# a comment is a prompt too\n",
    )
    .unwrap();
    let c = sweep::Corpus::read(&path).unwrap();
    let texts: Vec<String> = c
        .prompts
        .iter()
        .map(|p| match &p.prompt {
            divergence::lockstep::Prompt::Text(t) => t.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        texts,
        [
            "first prompt",
            "{\"prompt\": \"this is text here\"}",
            "# a comment is a prompt too"
        ]
    );
    assert_eq!(c.prompts[1].line, 3);
}

#[test]
fn bad_input_is_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let model = gen_model(dir.path(), "tiny");
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let sweep = |prompts: &Path, extra: &[&str], out: &str| {
        let mut args = vec![
            "sweep",
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--steps",
            "1",
            "-q",
            "--out",
        ];
        let out = dir.path().join(out);
        args.push(out.to_str().unwrap());
        args.extend_from_slice(extra);
        let o = run(&args);
        (o, out)
    };
    let good = write(
        "good.jsonl",
        "{\"prompt\": \"a b c\"}\n{\"tokens\": [1, 300]}\n{\"prompt\": \"d e\"}\n",
    );
    for shard in ["0/2", "3/2", "x", "1/0", "1-2"] {
        let (o, _) = sweep(&good, &["--shard", shard], "x.json");
        assert_eq!(o.status.code(), Some(2), "--shard {shard}: {}", stderr(&o));
    }
    for (name, text, said) in [
        (
            "bad.jsonl",
            "{\"prompt\": \"ok\"}\n{\"prompt\": 3}\n",
            "bad.jsonl:2",
        ),
        (
            "both.jsonl",
            "{\"prompt\": \"a\", \"tokens\": [1]}\n",
            "not both",
        ),
        ("typo.jsonl", "{\"promt\": \"a\"}\n", "unknown field"),
        ("emptytok.jsonl", "{\"tokens\": []}\n", "empty"),
        ("blank.txt", "\n\n", "no prompts"),
    ] {
        let (o, _) = sweep(&write(name, text), &[], "x.json");
        assert_eq!(o.status.code(), Some(2), "{name}: {}", stderr(&o));
        assert!(stderr(&o).contains(said), "{name}: {}", stderr(&o));
    }
    // A prompt the model cannot take is reported, and the rest still run.
    let (o, out) = sweep(
        &write(
            "oov.jsonl",
            "{\"tokens\": [1, 99999]}\n{\"prompt\": \"fine\"}\n",
        ),
        &[],
        "oov.json",
    );
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let sw = Sweep::read(&out).unwrap();
    assert!(sw.prompts[0]
        .not_run
        .as_deref()
        .unwrap()
        .contains("outside the vocabulary"));
    assert_eq!(sw.prompts[1].verdict, Some(Verdict::NoDivergence));

    // Merges: a missing shard, a shard twice, shards of different sweeps, a non-shard.
    let (o1, s1) = sweep(&good, &["--shard", "1/2"], "s1.json");
    let (o2, s2) = sweep(&good, &["--shard", "2/2"], "s2.json");
    assert!(o1.status.success() && o2.status.success());
    let (o3, s2_other) = sweep(&good, &["--shard", "2/2", "--mode", "resync"], "s2r.json");
    assert!(o3.status.success());
    let (o4, whole) = sweep(&good, &[], "whole.json");
    assert!(o4.status.success());
    let merged = dir.path().join("m.json");
    let junk = write("junk.json", "hello");
    for (inputs, said) in [
        (vec![&s1], "missing shard(s) 2/2"),
        (vec![&s1, &s1], "given twice"),
        (vec![&s1, &s2_other], "different sweeps: mode"),
        (vec![&whole], "not a shard"),
        (vec![&junk], "not JSON"),
    ] {
        let mut args = vec!["merge".to_string()];
        args.extend(inputs.iter().map(|p| p.display().to_string()));
        args.extend(["-o".into(), merged.display().to_string()]);
        let o = Command::new(EXE).args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{inputs:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(said), "{inputs:?}: {}", stderr(&o));
    }
    let o = run(&[
        "merge",
        s1.to_str().unwrap(),
        s2.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        Sweep::read(&merged).unwrap().identity(),
        Sweep::read(&whole).unwrap().identity()
    );
}
