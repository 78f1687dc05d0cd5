//! `divergence reduce`: shrink a divergence to the smallest model, prompt and
//! run that still show it (issue 23).
//!
//! The search is delta debugging with one test, [`judge`]: a candidate
//! reduction *still fails* when its run reports the same stage, the same
//! kind of measurement, the same blamed side and the same cause (numbers in
//! the cause, such as a layer index or a row length, may change). Anything
//! else (no divergence, another stage or side, a failed run) is
//! *unresolved* and counts as passing: the reduction is not taken. The
//! complaints about other minifiers (a reduced case that shows a different
//! failure, or none when rerun) are why the test is this strict, and why
//! the original is rerun twice before anything is reduced.
//!
//! Reductions are tried cheapest and surest first (see [`Reducer::reduce`]);
//! every attempt is one line of `attempts.jsonl`, which a later `reduce`
//! into the same folder reads back instead of running an attempt again.
//!
//! Running is not this module's business: the caller passes a function
//! from a run request to a receipt (the CLI runs both engines; a test can
//! script the answers).

use crate::compare::Blame;
use crate::gguf::{GgufFile, GgufWriter};
use crate::lockstep::{Measured, Prompt, Verdict};
use crate::model::KvType;
use crate::receipt::{Receipt, RunRecord};
use crate::synth::{self, SynthConfig};
use crate::trace::Stage;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What a reduction must keep: the failure's identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Signature {
    /// The stage (its kind: the layer may shift).
    pub stage: Stage,
    /// What was measured (local error, across a gap, side against side, tokens).
    pub measured: Measured,
    /// The blamed side.
    pub blame: Blame,
    /// The cause with every number replaced by `#` (a layer index or a row
    /// length may shift with the reduction; the bug's description may not).
    pub cause: Option<String>,
}

impl Signature {
    /// The signature of a receipt's first divergence, if it has one.
    pub fn of(r: &Receipt) -> Option<Signature> {
        if r.verdict != Verdict::Divergence {
            return None;
        }
        let d = r.first_divergence.as_ref()?;
        Some(Signature {
            stage: d.stage,
            measured: d.measured,
            blame: d.blame.blame,
            cause: d.blame.cause.as_deref().map(without_numbers),
        })
    }
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stage {} ({:?}), blamed {:?}{}",
            self.stage,
            self.measured,
            self.blame,
            self.cause
                .as_ref()
                .map(|c| format!(", cause \"{c}\""))
                .unwrap_or_default()
        )
    }
}

fn without_numbers(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_number = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                out.push('#');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    out
}

/// The test's answer for one attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Judgement {
    /// Same failure: the reduction is taken.
    Fails,
    /// Anything else: not taken.
    Unresolved,
    /// Not tried, for the reason logged (the reduction does not apply).
    Skipped,
}

/// Judges one run against the signature to keep.
pub fn judge(want: &Signature, run: &Result<Receipt, String>) -> (Judgement, String) {
    match run {
        Err(e) => (Judgement::Unresolved, format!("the run failed: {e}")),
        Ok(r) => match Signature::of(r) {
            Some(s) if &s == want => (Judgement::Fails, format!("same failure: {s}")),
            Some(s) => (Judgement::Unresolved, format!("another failure: {s}")),
            None if r.interrupted => (Judgement::Unresolved, "interrupted".into()),
            None => (Judgement::Unresolved, format!("verdict {:?}", r.verdict)),
        },
    }
}

/// Which model a candidate runs: the original file (optionally without its
/// last layers), or a synthetic model made again from a changed recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSpec {
    /// The original file; with `keep_layers` or `drop_first`, rewritten
    /// with only the layers `drop_first..keep_layers` (renumbered from 0).
    File {
        /// The original file.
        path: String,
        /// The end of the layers kept, in the original's numbering (all: `None`).
        keep_layers: Option<usize>,
        /// Layers removed before the divergence's layer.
        #[serde(default)]
        drop_first: usize,
    },
    /// A synthetic model made from this recipe.
    Recipe(SynthConfig),
}

/// One point of the search: a model and a run request (its `model_path`
/// is filled in when the model is written).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The model it runs.
    pub model: ModelSpec,
    /// The run request.
    pub record: RunRecord,
}

impl Candidate {
    /// The identity the attempts log is keyed by.
    fn key(&self) -> String {
        let mut c = self.clone();
        c.record.model_path.clear();
        serde_json::to_string(&c).unwrap_or_default()
    }

    fn n_layer(&self, original: &Receipt) -> Option<usize> {
        match &self.model {
            ModelSpec::Recipe(cfg) => Some(cfg.n_layer),
            ModelSpec::File {
                keep_layers,
                drop_first,
                ..
            } => keep_layers
                .or(original.model.file.as_ref().map(|f| f.n_layer))
                .map(|end| end.saturating_sub(*drop_first)),
        }
    }

    fn prompt_ids(&self) -> Option<&[u32]> {
        match &self.record.prompt {
            Prompt::Tokens(ids) => Some(ids),
            Prompt::Text(_) => None,
        }
    }
}

/// One line of `attempts.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    /// Its number (0: the two runs of the original).
    pub n: usize,
    /// The reduction, in words.
    pub what: String,
    /// The candidate's identity (JSON), what resuming matches on.
    pub key: String,
    /// Taken or not.
    pub judgement: Judgement,
    /// Why.
    pub reason: String,
    /// The run's verdict (none: it did not run).
    pub verdict: Option<Verdict>,
    /// The first divergence's step.
    pub step: Option<usize>,
    /// The first divergence's layer.
    pub layer: Option<usize>,
    /// Wall time of the run.
    pub seconds: f64,
    /// Whether this line was read back from an earlier run's log.
    #[serde(default)]
    pub resumed: bool,
}

/// Why `reduce` would not start or could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ReduceError {
    /// The receipt cannot be reduced (no divergence, model gone): exit 2.
    #[error("{0}")]
    BadInput(String),
    /// Two runs of the original disagree: nothing could be trusted.
    #[error("the original is not deterministic: {0}")]
    Nondeterministic(String),
    /// Writing the output failed.
    #[error("{0}")]
    Io(String),
}

fn io_err(what: &str, p: &Path, e: impl std::fmt::Display) -> ReduceError {
    ReduceError::Io(format!("{what} {}: {e}", p.display()))
}

/// Options of one reduction.
pub struct Options {
    /// The output folder.
    pub dir: PathBuf,
    /// Stop starting attempts after this many seconds.
    pub budget_s: Option<f64>,
    /// Repeat the passes until a whole round takes nothing.
    pub keep_going: bool,
    /// Set by Ctrl-C: stop after the current attempt.
    pub stop: Arc<AtomicBool>,
    /// Called after each attempt (the progress bar).
    pub on_attempt: Option<OnAttempt>,
    /// Every run (the original's two included) at this many threads,
    /// instead of the receipt's; the threads are then not reduced.
    pub threads: Option<usize>,
}

/// Called after each attempt.
pub type OnAttempt = Box<dyn Fn(&Attempt)>;

/// What a reduction reached.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// The failure kept.
    pub signature: Signature,
    /// Attempts made (or read back).
    pub attempts: usize,
    /// Attempts taken.
    pub taken: usize,
    /// Why the search stopped before its end, if it did.
    pub stopped_early: Option<String>,
    /// The reduced model.
    pub model: PathBuf,
    /// Its size.
    pub model_bytes: u64,
    /// The original's size.
    pub original_model_bytes: u64,
    /// Its layers.
    pub n_layer: Option<usize>,
    /// Prompt ids (none: still text).
    pub prompt_tokens: Option<usize>,
    /// Decode steps.
    pub steps: usize,
    /// The reduced run's receipt.
    pub receipt: PathBuf,
    /// The nearest passing variant's receipt.
    pub min_good: Option<PathBuf>,
}

/// Runs a request and returns its receipt (or why it could not run).
pub type Runner<'a> = dyn FnMut(&RunRecord) -> Result<Receipt, String> + 'a;

/// The search's state.
pub struct Reducer<'a> {
    original: Receipt,
    want: Signature,
    opts: Options,
    run: &'a mut Runner<'a>,
    best: Candidate,
    /// The taken candidate's receipt.
    best_receipt: Receipt,
    log: std::fs::File,
    done: HashMap<String, Attempt>,
    n: usize,
    taken: usize,
    started: Instant,
    stopped: Option<String>,
    min_good: Option<PathBuf>,
    /// Reductions logged as skipped (each once).
    skipped: Vec<String>,
}

const LOG: &str = "attempts.jsonl";
const CANDIDATE: &str = "candidate.gguf";
/// The reduced model in the output folder.
pub const REDUCED: &str = "reduced.gguf";
/// The reduced run's receipt in the output folder.
pub const RECEIPT: &str = "receipt.json";
const MIN_GOOD: &str = "min-good.gguf";
const MIN_GOOD_RECEIPT: &str = "min-good-receipt.json";

impl<'a> Reducer<'a> {
    /// Checks the receipt can be reduced, reruns the original twice, and
    /// refuses when the two runs or the receipt disagree.
    pub fn new(
        original: Receipt,
        opts: Options,
        run: &'a mut Runner<'a>,
    ) -> Result<Reducer<'a>, ReduceError> {
        let want = Signature::of(&original).ok_or_else(|| {
            ReduceError::BadInput(format!(
                "the receipt shows no divergence (verdict {:?}): nothing to reduce",
                original.verdict
            ))
        })?;
        if let Some(cmd) = original
            .offline
            .as_ref()
            .and_then(|o| o.candidate_cmd.as_ref())
        {
            return Err(ReduceError::BadInput(format!(
                "a receipt of `find --candidate-cmd` ({cmd}): reduce reruns only the built-in \
                 candidate, not an external command; reduce by hand with `find --candidate-cmd` \
                 on a smaller model or prompt, or reduce a receipt of the built-in engine"
            )));
        }
        if original.offline.is_some() {
            return Err(ReduceError::BadInput(
                "an offline comparison of two dumps: reduce the lockstep receipt of `find` instead"
                    .into(),
            ));
        }
        std::fs::create_dir_all(&opts.dir).map_err(|e| io_err("creating", &opts.dir, e))?;
        let model = ModelSpec::from_receipt(&original)?;
        let mut best = Candidate {
            model,
            record: original.run.clone(),
        };
        if let Some(t) = opts.threads {
            best.record.threads = t;
        }
        let log_path = opts.dir.join(LOG);
        let done = read_log(&log_path);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io_err("opening", &log_path, e))?;
        let mut r = Reducer {
            best_receipt: original.clone(),
            original,
            want,
            opts,
            run,
            best,
            log,
            done,
            n: 0,
            taken: 0,
            started: Instant::now(),
            stopped: None,
            min_good: None,
            skipped: Vec::new(),
        };
        r.check_deterministic()?;
        Ok(r)
    }

    fn check_deterministic(&mut self) -> Result<(), ReduceError> {
        let path = self.write_model(&self.best.model.clone())?;
        let mut record = self.best.record.clone();
        record.model_path = path.display().to_string();
        let d0 = self.original.first_divergence.clone();
        let mut seen = Vec::new();
        for i in 1..=2 {
            let t = Instant::now();
            let got = (self.run)(&record);
            let (j, reason) = judge(&self.want, &got);
            self.append(Attempt {
                n: 0,
                what: format!("original, run {i} of 2"),
                key: String::new(),
                judgement: j.clone(),
                reason: reason.clone(),
                verdict: got.as_ref().ok().map(|r| r.verdict),
                step: got
                    .as_ref()
                    .ok()
                    .and_then(|r| r.first_divergence.as_ref().map(|d| d.step)),
                layer: got
                    .as_ref()
                    .ok()
                    .and_then(|r| r.first_divergence.as_ref().and_then(|d| d.layer)),
                seconds: t.elapsed().as_secs_f64(),
                resumed: false,
            })?;
            if j != Judgement::Fails {
                return Err(ReduceError::Nondeterministic(format!(
                    "run {i} of the original does not show the receipt's failure ({}): {reason}",
                    self.want
                )));
            }
            let r = got.map_err(ReduceError::Nondeterministic)?;
            let d = r.first_divergence.clone();
            let place = |d: &Option<crate::lockstep::Divergence>| {
                d.as_ref().map(|d| (d.step, d.position, d.layer, d.stage))
            };
            if place(&d) != place(&d0) {
                return Err(ReduceError::Nondeterministic(format!(
                    "run {i} diverges at {:?}, the receipt at {:?} (step, position, layer, stage)",
                    place(&d),
                    place(&d0)
                )));
            }
            seen.push(r);
        }
        let diffs = seen[0].differences(&seen[1]);
        if !diffs.is_empty() {
            return Err(ReduceError::Nondeterministic(format!(
                "two runs of the original differ: {}",
                diffs.join("; ")
            )));
        }
        self.best_receipt = seen.swap_remove(0);
        Ok(())
    }

    /// The passes, cheapest and surest first; with `keep_going` repeated
    /// until a round takes nothing.
    pub fn reduce(mut self) -> Result<Summary, ReduceError> {
        loop {
            let before = self.taken;
            self.pass_steps()?;
            self.pass_layers()?;
            self.pass_layers_before()?;
            self.pass_prompt_as_ids()?;
            self.pass_vocab()?;
            self.pass_prompt()?;
            self.pass_run_settings()?;
            self.pass_shapes()?;
            self.pass_vocab()?;
            if !self.opts.keep_going || self.taken == before || self.stopped.is_some() {
                break;
            }
        }
        self.finish()
    }

    fn div(&self) -> &crate::lockstep::Divergence {
        self.best_receipt
            .first_divergence
            .as_ref()
            .expect("the taken receipt always fails the same way")
    }

    fn pass_steps(&mut self) -> Result<(), ReduceError> {
        let step = self.div().step;
        if self.best.record.steps > step {
            let mut c = self.best.clone();
            c.record.steps = step;
            self.attempt(&format!("steps {} -> {step}", self.best.record.steps), c)?;
        }
        Ok(())
    }

    fn pass_layers(&mut self) -> Result<(), ReduceError> {
        let (Some(layer), Some(n)) = (self.div().layer, self.best.n_layer(&self.original)) else {
            return Ok(());
        };
        // One layer beyond the divergence stays as a guard: the last layer
        // of both graphs computes only the requested rows (another path).
        let keep = layer + 2;
        if keep < n {
            let c = self.best.with_layers(keep);
            self.attempt(&format!("layers {n} -> {keep}"), c)?;
        }
        Ok(())
    }

    /// A divergence at layer L > 0: the layers before it removed, so the
    /// failing layer becomes layer 0. It then reads the prompt's embeddings
    /// instead of what the layers before it made, so whether the failure
    /// survives is the test's to say (in resync each stage is judged on its
    /// own inputs, so a bug born in that layer usually does). A fault
    /// injected into one layer (`--inject-layer`) moves with it; first all
    /// L layers, else all but the one just before.
    fn pass_layers_before(&mut self) -> Result<(), ReduceError> {
        let (Some(layer), Some(n)) = (self.div().layer, self.best.n_layer(&self.original)) else {
            return Ok(());
        };
        if layer == 0 || layer >= n {
            return Ok(());
        }
        for drop in [layer, layer - 1] {
            if drop == 0 {
                break;
            }
            let Some(c) = self.best.without_first_layers(drop) else {
                continue;
            };
            if self.attempt(
                &format!(
                    "layers {n} -> {}: the {drop} before layer {layer} removed",
                    n - drop
                ),
                c,
            )? {
                break;
            }
        }
        Ok(())
    }

    fn pass_prompt_as_ids(&mut self) -> Result<(), ReduceError> {
        if self.best.prompt_ids().is_some() || self.best.record.chat {
            return Ok(());
        }
        let ids = self.best_receipt.tokens.reference.clone();
        if ids.is_empty() {
            return Ok(());
        }
        let mut c = self.best.clone();
        c.record.prompt = Prompt::Tokens(ids.clone());
        self.attempt(&format!("prompt text -> its {} token ids", ids.len()), c)?;
        Ok(())
    }

    /// The vocabulary down to the synthetic one's base, or the largest id
    /// the prompt uses. A real vocabulary (`gen-model --vocab`) is replaced
    /// by a synthetic one only when the prompt is ids (the real tokenizer
    /// is then no longer needed to run the case, and the synthetic one
    /// still tokenizes); a file without a recipe keeps its vocabulary, with
    /// the reason logged.
    fn pass_vocab(&mut self) -> Result<(), ReduceError> {
        let d = self.div();
        if matches!(d.stage, Stage::TokEmbd | Stage::Logits) || d.measured == Measured::Tokens {
            return Ok(());
        }
        let cfg = match &self.best.model {
            ModelSpec::Recipe(cfg) => cfg.clone(),
            ModelSpec::File { .. } => {
                return self.skip(
                    "vocabulary",
                    "a file without a recipe keeps its vocabulary: keeping only the rows the \
                     prompt uses would mean remapping ids and rewriting the tokenizer's tokens, \
                     scores, types, merges and special ids consistently (not implemented)",
                );
            }
        };
        let Some(ids) = self.best.prompt_ids() else {
            return self.skip(
                "vocabulary",
                "the prompt is text (a chat prompt): its ids depend on the vocabulary",
            );
        };
        let min = synth::VocabKind::of_arch(&cfg.arch).min_vocab();
        let used = ids.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
        let target = min.max(used);
        let from = cfg.n_vocab;
        if let Some(src) = &cfg.vocab_source {
            if target >= from {
                return Ok(());
            }
            let mut c = self.best.clone();
            if let ModelSpec::Recipe(cfg) = &mut c.model {
                cfg.vocab_source = None;
                cfg.vocab = None;
                cfg.n_vocab = target;
            }
            let what = format!(
                "vocabulary: the real one of {} ({from} tokens) -> a synthetic one of {target} \
                 (the prompt is ids; the synthetic tokenizer still works, but spells them differently)",
                src.path
            );
            self.attempt(&what, c)?;
            return Ok(());
        }
        if target < from {
            let mut c = self.best.clone();
            if let ModelSpec::Recipe(cfg) = &mut c.model {
                cfg.n_vocab = target;
            }
            self.attempt(&format!("vocabulary {from} -> {target} tokens"), c)?;
        }
        Ok(())
    }

    /// Logs a reduction that does not apply, and why (once per reduction).
    fn skip(&mut self, what: &str, reason: &str) -> Result<(), ReduceError> {
        let key = format!("skip:{what}:{reason}");
        if self.skipped.contains(&key) {
            return Ok(());
        }
        self.skipped.push(key);
        self.append(Attempt {
            n: self.n,
            what: what.to_string(),
            key: String::new(),
            judgement: Judgement::Skipped,
            reason: reason.to_string(),
            verdict: None,
            step: None,
            layer: None,
            seconds: 0.0,
            resumed: false,
        })
    }

    /// ddmin over the prompt's ids, then each id replaced by one fixed id.
    fn pass_prompt(&mut self) -> Result<(), ReduceError> {
        let Some(ids) = self.best.prompt_ids().map(<[u32]>::to_vec) else {
            return Ok(());
        };
        let mut ids = ids;
        let mut n = 2usize;
        while ids.len() >= 2 && self.stopped.is_none() {
            let chunk = ids.len().div_ceil(n);
            let mut reduced = false;
            // Complements first: each removes one chunk.
            for start in (0..ids.len()).step_by(chunk) {
                let mut rest = ids[..start].to_vec();
                rest.extend_from_slice(&ids[(start + chunk).min(ids.len())..]);
                if rest.is_empty() {
                    continue;
                }
                if self.try_prompt(&ids, rest.clone())? {
                    ids = rest;
                    n = (n - 1).max(2);
                    reduced = true;
                    break;
                }
            }
            if !reduced {
                if n >= ids.len() {
                    break;
                }
                n = (2 * n).min(ids.len());
            }
        }
        let fixed = ids[0];
        for i in 1..ids.len() {
            if ids[i] != fixed && self.stopped.is_none() {
                let mut next = ids.clone();
                next[i] = fixed;
                if self.try_prompt(&ids, next.clone())? {
                    ids = next;
                }
            }
        }
        Ok(())
    }

    fn try_prompt(&mut self, from: &[u32], to: Vec<u32>) -> Result<bool, ReduceError> {
        let mut c = self.best.clone();
        let what = if to.len() == from.len() {
            format!("prompt ids {from:?} -> {to:?}")
        } else {
            format!("prompt {} -> {} ids {to:?}", from.len(), to.len())
        };
        c.record.prompt = Prompt::Tokens(to);
        // A step beyond the prefill can only fold into the prompt's ids.
        self.attempt(&what, c)
    }

    fn pass_run_settings(&mut self) -> Result<(), ReduceError> {
        if self.best.record.threads != 1 && self.opts.threads.is_none() {
            let mut c = self.best.clone();
            c.record.threads = 1;
            self.attempt(&format!("threads {} -> 1", self.best.record.threads), c)?;
        }
        if self.best.record.kv_type != KvType::F32 {
            let mut c = self.best.clone();
            c.record.kv_type = KvType::F32;
            self.attempt("KV cache f16 -> f32 (no rounding of K and V)", c)?;
        }
        if self.best.record.keep_going {
            let mut c = self.best.clone();
            c.record.keep_going = false;
            self.attempt("stop at the first divergence", c)?;
        }
        // Decode steps folded into the prompt: the greedy tokens the
        // reference chose become prompt ids, and the divergence moves to the
        // prefill.
        let step = self.div().step;
        if step > 0 {
            if let Some(ids) = self.best.prompt_ids() {
                let gen = &self.best_receipt.generated.reference;
                if gen.len() >= step {
                    let mut folded = ids.to_vec();
                    folded.extend_from_slice(&gen[..step]);
                    let mut c = self.best.clone();
                    c.record.prompt = Prompt::Tokens(folded);
                    c.record.steps = 0;
                    self.attempt(&format!("{step} decode step(s) folded into the prompt"), c)?;
                }
            }
        }
        Ok(())
    }

    /// Synthetic models only: smaller shapes through the recipe, keeping
    /// every divisibility the format and the bug need (n_ff keeps its
    /// remainder mod 128: the 3B ffn_down bug needs n_ff ≡ 64 mod 128).
    fn pass_shapes(&mut self) -> Result<(), ReduceError> {
        let ModelSpec::Recipe(cfg) = &self.best.model else {
            return Ok(());
        };
        let cfg = cfg.clone();
        let rest = cfg.n_ff % 128;
        let mut tries: Vec<(String, SynthConfig)> = Vec::new();
        for ff in [
            rest + 128,
            rest + 256,
            cfg.n_ff / 2 - (cfg.n_ff / 2) % 128 + rest,
        ] {
            if ff > 0 && ff < cfg.n_ff {
                let mut c = cfg.clone();
                c.n_ff = ff;
                tries.push((format!("n_ff {} -> {ff}", cfg.n_ff), c));
            }
        }
        for embd in [128usize, 256, 512, cfg.n_embd / 2] {
            for (h, kv) in [(cfg.n_head, cfg.n_head_kv), (2, 1), (2, 2), (4, 1)] {
                let mut c = cfg.clone();
                c.n_embd = embd;
                c.n_head = h;
                c.n_head_kv = kv;
                if embd < cfg.n_embd && embd % 128 == 0 && c.validate().is_ok() {
                    tries.push((
                        format!("n_embd {} -> {embd}, heads {h}/{kv}", cfg.n_embd),
                        c,
                    ));
                }
            }
        }
        if cfg.n_ctx > 256 {
            let mut c = cfg.clone();
            c.n_ctx = 256;
            tries.push((format!("n_ctx {} -> 256", cfg.n_ctx), c));
        }
        for (what, t) in tries {
            let ModelSpec::Recipe(now) = &self.best.model else {
                break;
            };
            // Apply the change to what has been taken so far.
            let mut next = now.clone();
            if t.n_ff != cfg.n_ff {
                if t.n_ff >= next.n_ff {
                    continue;
                }
                next.n_ff = t.n_ff;
            }
            if t.n_embd != cfg.n_embd {
                if t.n_embd >= next.n_embd {
                    continue;
                }
                next.n_embd = t.n_embd;
                next.n_head = t.n_head;
                next.n_head_kv = t.n_head_kv;
            }
            if t.n_ctx != cfg.n_ctx {
                next.n_ctx = t.n_ctx;
            }
            if next.validate().is_err() || &next == now {
                continue;
            }
            let mut c = self.best.clone();
            c.model = ModelSpec::Recipe(next);
            self.attempt(&what, c)?;
        }
        Ok(())
    }

    /// Runs one candidate (or reads its result from the log) and takes it
    /// when it still fails.
    fn attempt(&mut self, what: &str, mut c: Candidate) -> Result<bool, ReduceError> {
        if self.stopped.is_some() {
            return Ok(false);
        }
        if self.opts.stop.load(Ordering::SeqCst) {
            self.stopped = Some("interrupted".into());
            return Ok(false);
        }
        if let Some(b) = self.opts.budget_s {
            if self.started.elapsed().as_secs_f64() > b {
                self.stopped = Some(format!("the budget of {b} s is spent"));
                return Ok(false);
            }
        }
        self.n += 1;
        let key = c.key();
        let cached = self.done.get(&key).cloned();
        if let Some(a) = &cached {
            if a.judgement == Judgement::Unresolved {
                let mut a = a.clone();
                a.n = self.n;
                a.resumed = true;
                self.append(a)?;
                return Ok(false);
            }
        }
        let path = self.write_model(&c.model)?;
        c.record.model_path = path.display().to_string();
        let t = Instant::now();
        let got = (self.run)(&c.record);
        let (judgement, reason) = judge(&self.want, &got);
        let a = Attempt {
            n: self.n,
            what: what.to_string(),
            key,
            judgement: judgement.clone(),
            reason,
            verdict: got.as_ref().ok().map(|r| r.verdict),
            step: got
                .as_ref()
                .ok()
                .and_then(|r| r.first_divergence.as_ref().map(|d| d.step)),
            layer: got
                .as_ref()
                .ok()
                .and_then(|r| r.first_divergence.as_ref().and_then(|d| d.layer)),
            seconds: t.elapsed().as_secs_f64(),
            resumed: cached.is_some(),
        };
        self.append(a)?;
        match (judgement, got) {
            (Judgement::Fails, Ok(r)) => {
                self.take(c, r)?;
                Ok(true)
            }
            (_, Ok(r)) if r.verdict == Verdict::NoDivergence => {
                self.keep_min_good(&path, r)?;
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    fn take(&mut self, c: Candidate, mut r: Receipt) -> Result<(), ReduceError> {
        let dir = &self.opts.dir;
        let reduced = abs(&dir.join(REDUCED));
        let from = PathBuf::from(&c.record.model_path);
        if from != reduced {
            if from == abs(&dir.join(CANDIDATE)) {
                std::fs::rename(&from, &reduced).map_err(|e| io_err("renaming", &from, e))?;
            } else {
                std::fs::copy(&from, &reduced).map_err(|e| io_err("copying", &from, e))?;
            }
        }
        let mut c = c;
        c.record.model_path = reduced.display().to_string();
        r.run.model_path = c.record.model_path.clone();
        r.model.path = c.record.model_path.clone();
        r.write(&dir.join(RECEIPT))
            .map_err(|e| io_err("writing", &dir.join(RECEIPT), e))?;
        write_repro(dir, &c.record, &reduced)?;
        self.best = c;
        self.best_receipt = r;
        self.taken += 1;
        Ok(())
    }

    fn keep_min_good(&mut self, path: &Path, mut r: Receipt) -> Result<(), ReduceError> {
        let dir = &self.opts.dir;
        let good = abs(&dir.join(MIN_GOOD));
        if abs(path) == abs(&dir.join(CANDIDATE)) {
            std::fs::rename(path, &good).map_err(|e| io_err("renaming", path, e))?;
        } else {
            std::fs::copy(path, &good).map_err(|e| io_err("copying", path, e))?;
        }
        r.run.model_path = good.display().to_string();
        r.model.path = r.run.model_path.clone();
        r.write(&dir.join(MIN_GOOD_RECEIPT))
            .map_err(|e| io_err("writing", &dir.join(MIN_GOOD_RECEIPT), e))?;
        self.min_good = Some(dir.join(MIN_GOOD_RECEIPT));
        Ok(())
    }

    /// Writes the model a spec names into the candidate file (the original
    /// file itself when nothing about it changes).
    fn write_model(&self, spec: &ModelSpec) -> Result<PathBuf, ReduceError> {
        let out = abs(&self.opts.dir.join(CANDIDATE));
        match spec {
            ModelSpec::File {
                path,
                keep_layers: None,
                drop_first: 0,
            } => Ok(PathBuf::from(path)),
            ModelSpec::File {
                path,
                keep_layers,
                drop_first,
            } => {
                let end = keep_layers.unwrap_or(usize::MAX);
                layer_range(Path::new(path), &out, *drop_first, end)?;
                Ok(out)
            }
            ModelSpec::Recipe(cfg) => {
                if let Some(reduced) = self.taken_model_if(spec) {
                    return Ok(reduced);
                }
                let mut cfg = cfg.clone();
                if let Some(src) = &cfg.vocab_source {
                    cfg.vocab = Some(
                        synth::CopiedVocab::from_gguf(Path::new(&src.path))
                            .map_err(|e| ReduceError::BadInput(e.to_string()))?,
                    );
                }
                synth::write_model(&cfg, &out).map_err(|e| io_err("writing", &out, e))?;
                Ok(out)
            }
        }
    }

    /// The reduced file, when `spec` is what it was made from.
    fn taken_model_if(&self, spec: &ModelSpec) -> Option<PathBuf> {
        let reduced = abs(&self.opts.dir.join(REDUCED));
        (self.taken > 0 && &self.best.model == spec && reduced.exists()).then_some(reduced)
    }

    fn append(&mut self, a: Attempt) -> Result<(), ReduceError> {
        let line = serde_json::to_string(&a).unwrap_or_default();
        writeln!(self.log, "{line}")
            .and_then(|_| self.log.flush())
            .map_err(|e| io_err("writing", &self.opts.dir.join(LOG), e))?;
        if let Some(f) = &self.opts.on_attempt {
            f(&a);
        }
        if !a.key.is_empty() {
            self.done.insert(a.key.clone(), a);
        }
        Ok(())
    }

    fn finish(self) -> Result<Summary, ReduceError> {
        let dir = &self.opts.dir;
        let _ = std::fs::remove_file(dir.join(CANDIDATE));
        let reduced = abs(&dir.join(REDUCED));
        if self.taken == 0 {
            // Nothing taken: the original is the smallest case found.
            let from = PathBuf::from(&self.best_receipt.run.model_path);
            std::fs::copy(&from, &reduced).map_err(|e| io_err("copying", &from, e))?;
            let mut r = self.best_receipt.clone();
            r.run.model_path = reduced.display().to_string();
            r.model.path = r.run.model_path.clone();
            r.write(&dir.join(RECEIPT))
                .map_err(|e| io_err("writing", &dir.join(RECEIPT), e))?;
            write_repro(dir, &r.run, &reduced)?;
        }
        let ids = self.best.prompt_ids().map(<[u32]>::to_vec);
        let tokens = match &ids {
            Some(ids) => ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
            None => self
                .best_receipt
                .tokens
                .reference
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
        };
        write(&dir.join("tokens.txt"), &format!("{tokens}\n"))?;
        let text = match &self.best.record.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Tokens(ids) => pieces(&reduced, ids),
        };
        write(&dir.join("prompt.txt"), &format!("{text}\n"))?;
        let model_bytes = std::fs::metadata(&reduced).map(|m| m.len()).unwrap_or(0);
        let summary = Summary {
            signature: self.want.clone(),
            attempts: self.n,
            taken: self.taken,
            stopped_early: self.stopped.clone(),
            model: reduced,
            model_bytes,
            original_model_bytes: self.original.model.file_size,
            n_layer: self.best.n_layer(&self.original),
            prompt_tokens: ids.map(|i| i.len()),
            steps: self.best.record.steps,
            receipt: dir.join(RECEIPT),
            min_good: self.min_good.clone(),
        };
        write(
            &dir.join("summary.json"),
            &serde_json::to_string_pretty(&summary).unwrap_or_default(),
        )?;
        Ok(summary)
    }
}

impl ModelSpec {
    fn from_receipt(r: &Receipt) -> Result<ModelSpec, ReduceError> {
        let path = Path::new(&r.run.model_path);
        if let Some(cfg) = &r.model.recipe {
            return Ok(ModelSpec::Recipe(cfg.clone()));
        }
        if !path.exists() {
            return Err(ReduceError::BadInput(format!(
                "model {} is missing, and the receipt has no recipe to make it again",
                path.display()
            )));
        }
        Ok(ModelSpec::File {
            path: abs(path).display().to_string(),
            keep_layers: None,
            drop_first: 0,
        })
    }
}

impl Candidate {
    /// The first `n` layers (of what is kept now).
    fn with_layers(&self, n: usize) -> Candidate {
        let mut c = self.clone();
        match &mut c.model {
            ModelSpec::Recipe(cfg) => cfg.n_layer = n,
            ModelSpec::File {
                keep_layers,
                drop_first,
                ..
            } => *keep_layers = Some(*drop_first + n),
        }
        c
    }

    /// Without the first `drop` layers (of what is kept now); an injected
    /// fault's layer moves with them. `None` when that would remove the
    /// fault's layer or every layer.
    fn without_first_layers(&self, drop: usize) -> Option<Candidate> {
        let mut c = self.clone();
        if let Some(fl) = c.record.fault_layer {
            c.record.fault_layer = Some(fl.checked_sub(drop)?);
        }
        match &mut c.model {
            ModelSpec::Recipe(cfg) => {
                if cfg.n_layer <= drop {
                    return None;
                }
                // Made again: the layers left are new random weights of
                // the same shape (the test decides whether that matters).
                cfg.n_layer -= drop;
            }
            ModelSpec::File {
                keep_layers,
                drop_first,
                ..
            } => {
                if keep_layers.is_some_and(|end| end <= *drop_first + drop) {
                    return None;
                }
                *drop_first += drop;
            }
        }
        Some(c)
    }
}

fn abs(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn write(p: &Path, s: &str) -> Result<(), ReduceError> {
    crate::receipt::write_atomic(p, s.as_bytes()).map_err(|e| io_err("writing", p, e))
}

fn read_log(p: &Path) -> HashMap<String, Attempt> {
    let Ok(text) = std::fs::read_to_string(p) else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<Attempt>(l).ok())
        .filter(|a| !a.key.is_empty())
        .map(|a| (a.key.clone(), a))
        .collect()
}

/// The prompt's ids as the model's vocabulary spells them (for reading).
fn pieces(model: &Path, ids: &[u32]) -> String {
    let Ok(f) = GgufFile::open(model) else {
        return String::new();
    };
    let Ok(tokens) = f.get_str_array("tokenizer.ggml.tokens") else {
        return String::new();
    };
    ids.iter()
        .map(|&i| tokens.get(i as usize).copied().unwrap_or("<?>"))
        .collect::<Vec<_>>()
        .join("")
}

/// The exact command that shows the reduced case, and the check of its receipt.
fn write_repro(dir: &Path, record: &RunRecord, model: &Path) -> Result<(), ReduceError> {
    let mut cmd = vec![
        "divergence".to_string(),
        "find".into(),
        "--model".into(),
        shell(&model.display().to_string()),
    ];
    match &record.prompt {
        Prompt::Tokens(ids) => {
            cmd.push("--tokens".into());
            cmd.push(ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
        }
        Prompt::Text(t) => {
            cmd.push("--prompt".into());
            cmd.push(shell(t));
        }
    }
    cmd.extend([
        "--steps".into(),
        record.steps.to_string(),
        "--mode".into(),
        serde_json::to_value(record.mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "resync".into()),
        "--threads".into(),
        record.threads.to_string(),
        "--kv".into(),
        match record.kv_type {
            KvType::F16 => "f16".into(),
            KvType::F32 => "f32".into(),
        },
        "--reference-ffn-act".into(),
        record.reference_ffn_act.name().to_string(),
    ]);
    if let Some(act) = record.ffn_act {
        cmd.push("--ffn-act".into());
        cmd.push(act.name().into());
    }
    if record.chat {
        cmd.push("--chat".into());
    }
    if record.keep_going {
        cmd.push("--keep-going".into());
    }
    if let Some(p) = &record.policy_path {
        cmd.push("--policy".into());
        cmd.push(shell(p));
    }
    for f in &record.faults {
        cmd.push("--inject".into());
        cmd.push(f.to_string());
    }
    if let Some(l) = record.fault_layer {
        cmd.push("--inject-layer".into());
        cmd.push(l.to_string());
    }
    for f in &record.token_faults {
        cmd.push("--inject-token".into());
        cmd.push(
            serde_json::to_value(f)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        );
    }
    cmd.extend(["--receipt".into(), "repro-receipt.json".into()]);
    let script = format!(
        "#!/bin/sh\n# Written by `divergence reduce`: the reduced case, then the check that\n# the reduced receipt is reproduced. `find` exits 1 on a divergence.\ncd \"$(dirname \"$0\")\"\n{}\ndivergence verify {}\n",
        cmd.join(" "),
        RECEIPT
    );
    let p = dir.join("repro.sh");
    write(&p, &script)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755));
    }
    Ok(())
}

fn shell(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Writes `src` without its layers from `keep` on: `<arch>.block_count`
/// updated, every `blk.N.*` tensor with N ≥ keep dropped, everything else
/// (the tokenizer, a recipe aside) copied as is.
pub fn without_layers(src: &Path, dst: &Path, keep: usize) -> Result<(), ReduceError> {
    layer_range(src, dst, 0, keep)
}

/// Writes `src` with only its layers `from..to` (`to` past the last: up
/// to the last), renumbered from 0: `<arch>.block_count` updated,
/// `blk.N.*` renamed to `blk.(N - from).*`, the other tensors and the
/// metadata (the tokenizer; a recipe aside) copied as is.
pub fn layer_range(src: &Path, dst: &Path, from: usize, to: usize) -> Result<(), ReduceError> {
    let f = GgufFile::open(src)
        .map_err(|e| ReduceError::BadInput(format!("{}: {e}", src.display())))?;
    let arch = f
        .get_str("general.architecture")
        .map_err(|e| ReduceError::BadInput(format!("{}: {e}", src.display())))?
        .to_string();
    let count_key = format!("{arch}.block_count");
    let n_layer = f
        .get_u32(&count_key)
        .map_err(|e| ReduceError::BadInput(format!("{}: {e}", src.display())))?
        as usize;
    let to = to.min(n_layer);
    if from >= to {
        return Err(ReduceError::BadInput(format!(
            "{}: layers {from}..{to} of {n_layer}: none left",
            src.display()
        )));
    }
    let keep = to - from;
    let mut w = GgufWriter::new();
    w.set_alignment(f.alignment());
    for (k, v) in f.metadata() {
        if k == synth::RECIPE_KEY {
            continue; // no longer what the recipe makes
        }
        if *k == count_key {
            w.set(k, crate::gguf::MetaValue::U32(keep as u32));
        } else {
            w.set(k, v.clone());
        }
    }
    for t in f.tensors() {
        let layer = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        let name = match layer {
            Some(l) if l < from || l >= to => continue,
            Some(l) => match t.name["blk.".len()..].split_once('.') {
                Some((_, rest)) => format!("blk.{}.{rest}", l - from),
                None => format!("blk.{}", l - from),
            },
            None => t.name.clone(),
        };
        w.add_tensor(&name, &t.dims, t.ty, f.tensor_data(t).to_vec());
    }
    w.write_to(dst).map_err(|e| io_err("writing", dst, e))
}
