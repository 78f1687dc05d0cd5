//! What a lockstep run (or an offline comparison) found: plain data that a
//! receipt stores and a report renders.

use crate::candidate::KvSemantics;
use crate::compare::{self, metrics, policy, BlameReport, Metrics, WorstElement};
use crate::model::ModelConfig;
use crate::oracle::FileFacts;
use crate::trace::{Stage, StageKey};
use serde::{Deserialize, Serialize};

/// The run's result in one word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every expected stage of every step was judged and passed.
    NoDivergence,
    /// A stage failed its rule (or the prompt's token ids differ).
    Divergence,
    /// Nothing failed, but something expected was not judged (a stage one
    /// side did not emit, a reference node that maps to no stage, tokens
    /// the candidate could not produce): the run cannot vouch for it.
    Incomplete,
    /// bitnet.cpp refused the model or crashed.
    ReferenceFailed,
    /// The candidate failed to load, returned an error or panicked.
    CandidateFailed,
}

/// How the prompt's ids were obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenSource {
    /// `--tokens`: both engines got the given ids; no tokenizer ran.
    IdsGiven,
    /// A text prompt the run stopped before tokenizing (the reference
    /// failed first): there are no ids to compare.
    NotTokenized,
    /// Each side tokenized the text with its own tokenizer.
    EachSideTokenized,
    /// The candidate has no tokenizer for this vocabulary: it was fed the
    /// reference's ids, and the ids were not compared.
    CandidateHasNoTokenizer,
}

/// The first position where the two sides' prompt ids differ, in words.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenDifference {
    /// Index into the id lists.
    pub position: usize,
    /// The reference's id there (none: its list is shorter).
    pub reference: Option<u32>,
    /// The candidate's id there.
    pub candidate: Option<u32>,
    /// The reference's piece for its id, as bitnet.cpp renders it.
    pub reference_piece: Option<String>,
    /// The reference tokenizer's piece for the candidate's id.
    pub candidate_piece: Option<String>,
    /// What differs, e.g. "the candidate has an extra BOS".
    pub description: String,
}

/// The token check that precedes every run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenCheck {
    /// The reference's prompt ids.
    pub reference: Vec<u32>,
    /// The candidate's prompt ids.
    pub candidate: Vec<u32>,
    /// Both lists are the same.
    pub equal: bool,
    /// Positions where a BOS directly follows a BOS, per side.
    pub duplicate_bos_reference: Vec<usize>,
    /// The same for the candidate.
    pub duplicate_bos_candidate: Vec<usize>,
    /// How the ids were obtained.
    pub source: TokenSource,
    /// The reference's tokenizer (bitnet.cpp's, with its pre-tokenizer).
    #[serde(default)]
    pub reference_tokenizer: Option<String>,
    /// The candidate's tokenizer, if it has one.
    #[serde(default)]
    pub candidate_tokenizer: Option<String>,
    /// The first difference, named in words.
    #[serde(default)]
    pub first_difference: Option<TokenDifference>,
    /// With `--chat`: each side's formatted prompt (none on the candidate
    /// side when it has no chat formatting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatPrompts>,
}

/// The chat prompts each side formatted before tokenizing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatPrompts {
    /// bitnet.cpp's `llama_chat_apply_template` output.
    pub reference: String,
    /// The candidate's (its Jinja rendering of the template).
    pub candidate: Option<String>,
}

/// Where one side's stages did not cover what the arch implies.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepCoverage {
    /// The step.
    pub step: usize,
    /// Stages the arch implies for a step.
    pub expected: usize,
    /// Stages judged in this step on the candidate's side.
    pub judged: usize,
    /// Stages not judged because the run stopped at the divergence.
    pub after_divergence: usize,
    /// Expected stages the candidate does not emit by design (outside the
    /// verdict's scope: the oracle recomputes across them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub outside_scope: usize,
    /// Expected stages the reference did not produce.
    pub missing_reference: Vec<StageKey>,
    /// Expected stages the candidate declares (or, without a declaration,
    /// every stage) but did not emit.
    pub missing_candidate: Vec<StageKey>,
    /// Stages the candidate emitted that the arch does not have.
    pub unexpected_candidate: Vec<StageKey>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What the candidate emits when it is not every stage: the finest unit its
/// verdict can name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scope {
    /// The stages it emits (declared in its manifest or inferred from the map).
    pub stages: Vec<Stage>,
    /// `stage` (every stage), `layer` (layer outputs: a bug is placed in
    /// its layer), `model` (only model-level stages), `tokens` (only the
    /// tokens it chose: judged by their ranks under the reference).
    pub granularity: String,
    /// The sentence a reader sees, e.g. "judged at layer granularity".
    pub note: String,
}

/// Whether everything a clean verdict vouches for was judged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Coverage {
    /// Nothing missing on either side, no unmapped reference node, tokens compared.
    pub complete: bool,
    /// Per step.
    pub steps: Vec<StepCoverage>,
    /// Reference graph nodes (or reference dump tensors) that map to no
    /// stage and are not known auxiliaries (views, cache copies): listed,
    /// never dropped.
    pub unmapped_reference_nodes: Vec<String>,
    /// What the candidate emits, when not every stage: outside it the
    /// verdict says nothing stage by stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// What else was not judged, in words.
    pub notes: Vec<String>,
}

/// One (layer, stage) of one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageResult {
    /// The layer (none for model-level stages).
    pub layer: Option<usize>,
    /// The stage.
    pub stage: Stage,
    /// No side beyond its local rule.
    pub pass: bool,
    /// The candidate's local error: its NMSE against the oracle on its own
    /// inputs (none: it did not emit the stage, or the oracle could not
    /// recompute it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_local_nmse: Option<f64>,
    /// The reference's local error, the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_local_nmse: Option<f64>,
    /// The candidate's local error was measured across stages it does not
    /// emit (recomputed by the oracle).
    #[serde(default, skip_serializing_if = "is_false")]
    pub across_gap: bool,
    /// Side against side: NMSE (resync: on the same inputs; free mode and
    /// dumps: the drift). None when one side did not emit the stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nmse: Option<f64>,
    /// Side against side: the largest absolute difference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_abs: Option<f64>,
    /// Side against side: bit-identical.
    pub exact: bool,
    /// Side against side within the policy's resync (or free-run) rule.
    pub agree: bool,
}

/// Every stage judged in one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step (0 prefills the prompt).
    pub step: usize,
    /// The first position of the step's batch.
    pub pos0: usize,
    /// Tokens in the batch.
    pub n_tokens: usize,
    /// Judged stages, in execution order.
    pub stages: Vec<StageResult>,
}

/// One (layer, stage) aggregated over the steps compared so far.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    /// The layer (none for model-level stages).
    pub layer: Option<usize>,
    /// The stage.
    pub stage: Stage,
    /// The class of its side-against-side rule.
    pub class: compare::Class,
    /// Steps judged.
    pub steps: usize,
    /// No side beyond its local rule at any step.
    pub all_pass: bool,
    /// The candidate's worst local error over the stage's rounding level
    /// (its own inputs; stages judged across a gap are not counted here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_candidate_over_rounding: Option<f64>,
    /// The reference's, the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_reference_over_rounding: Option<f64>,
    /// Tied activation codes over the steps, both sides (I2_S stages).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ties: usize,
    /// Side against side: bit-identical at every step.
    pub all_exact: bool,
    /// Side against side: within its rule at every step.
    pub all_agree: bool,
    /// Side against side: worst NMSE.
    pub worst_nmse: f64,
    /// Side against side: worst largest absolute difference.
    pub worst_max_abs: f64,
    /// Side against side: worst ULP distance.
    pub worst_max_ulp: u64,
}

/// How far the two runs grew apart when each fed itself (free mode,
/// dumps): reported, never the divergence by itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    /// Per layer, the worst side-against-side NMSE of `l_out` over the steps.
    pub l_out_by_layer: Vec<f64>,
    /// Per step, the side-against-side NMSE of the logits.
    pub logits_by_step: Vec<f64>,
    /// Stages whose drift exceeds the policy's free-run bound (first eight).
    pub beyond_free_run_bound: Vec<StageKey>,
    /// From this step on the two sides were fed different tokens (their
    /// greedy choices differed): side against side compares different
    /// computations from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fed_different_tokens_from: Option<usize>,
}

/// Which error a divergence was found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measured {
    /// A side against the oracle on its own direct inputs: where an error
    /// is born.
    Local,
    /// A side against the oracle across stages it does not emit: the
    /// divergence is placed at the granularity the side allows.
    AcrossGap,
    /// The oracle could not recompute the stage: side against side.
    SideVsSide,
    /// The prompt's token ids differ.
    Tokens,
    /// A token an engine chose (it showed no tensors), under the
    /// reference's logits on the engine's own history.
    Choice,
}

/// The local bound a divergence failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LocalBound {
    /// Error over rounding at most `max`.
    OverRounding {
        /// The bound.
        max: f64,
    },
    /// NMSE against the oracle across a gap at most `max`.
    AcrossGapNmse {
        /// The bound.
        max: f64,
    },
}

/// The first stage that failed its rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    /// The step.
    pub step: usize,
    /// Positions of the step's batch (absolute).
    pub positions: Vec<usize>,
    /// The first position beyond the rule (absolute).
    pub position: usize,
    /// The layer (none for model-level stages).
    pub layer: Option<usize>,
    /// The stage.
    pub stage: Stage,
    /// The reference's shape (canonical layout).
    pub shape: Vec<usize>,
    /// What was measured.
    pub measured: Measured,
    /// The local bound that decided (none for token and side-against-side
    /// divergences).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound: Option<LocalBound>,
    /// The candidate against the oracle on its own inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_local: Option<compare::local::LocalError>,
    /// The reference against the oracle on its own inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_local: Option<compare::local::LocalError>,
    /// The side-against-side rule at this stage.
    pub rule: policy::Rule,
    /// The two sides against each other (none when one did not emit it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// The elements where the blamed side is farthest from the oracle, with
    /// both sides' values and the oracle's.
    pub worst: Vec<WorstElement>,
    /// Which side is wrong, and why.
    pub blame: BlameReport,
}

impl Divergence {
    /// The blamed side's local error: beyond its rule on its own inputs.
    pub fn blamed_local(&self) -> Option<&compare::local::LocalError> {
        match self.blame.blame {
            compare::Blame::Reference => self.reference_local.as_ref(),
            _ => self
                .candidate_local
                .as_ref()
                .filter(|e| !e.pass)
                .or(self.reference_local.as_ref().filter(|e| !e.pass))
                .or(self.candidate_local.as_ref()),
        }
    }

    /// One number for how large the divergence is: the blamed side's NMSE
    /// against the oracle, else the two sides' NMSE (0 for token divergences).
    pub fn nmse(&self) -> f64 {
        self.blamed_local()
            .map(|e| e.nmse)
            .or(self.metrics.as_ref().map(|m| m.nmse))
            .unwrap_or(0.0)
    }
}

/// A greedy decode choice that differed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenDisagreement {
    /// The step whose logits chose.
    pub step: usize,
    /// The reference's token.
    pub reference: u32,
    /// The candidate's token.
    pub candidate: u32,
}

/// How the candidate failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateFailure {
    /// `load`, `error` or `panic`.
    pub kind: String,
    /// The engine's message (a panic's message and location).
    pub message: String,
    /// The step it failed in (none: at load).
    pub step: Option<usize>,
    /// The last stage it handed to the harness before failing.
    pub last_stage: Option<StageKey>,
}

/// A hyperparameter the candidate read differently from the file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigMismatch {
    /// The field, as named in [`ModelConfig`].
    pub field: String,
    /// The candidate's value.
    pub candidate: String,
    /// The file's value, as the oracle read it.
    pub file: String,
}

/// The candidate's self-description.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CandidateInfo {
    /// Its name.
    pub name: String,
    /// Its build description.
    pub build: String,
    /// Its KV-cache semantics under resync.
    pub kv_semantics: Option<KvSemantics>,
}

/// Volatile: never part of a receipt's identity.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timings {
    /// Loading the reference (worker start, model, context).
    pub reference_load_s: f64,
    /// Loading the candidate.
    pub candidate_load_s: f64,
    /// Reference decodes, including the transfer of its nodes.
    pub reference_s: f64,
    /// Candidate forward passes (comparison excluded).
    pub candidate_s: f64,
    /// Comparing.
    pub compare_s: f64,
    /// The whole run.
    pub total_s: f64,
    /// Peak resident set (VmHWM) of this process (candidate + comparator).
    pub harness_peak_rss_bytes: Option<u64>,
    /// Peak resident set of the reference's worker process.
    pub reference_peak_rss_bytes: Option<u64>,
}

/// Everything a run found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    /// The result in one word.
    pub verdict: Verdict,
    /// The prompt's ids on both sides.
    pub tokens: TokenCheck,
    /// The first failing stage.
    pub first_divergence: Option<Divergence>,
    /// With `--keep-going`: every failing stage after the first.
    pub later_divergences: Vec<Divergence>,
    /// Per (layer, stage), aggregated over the steps.
    pub summary: Vec<StageSummary>,
    /// Per step, every stage judged.
    pub steps: Vec<StepRecord>,
    /// What was and was not judged.
    pub coverage: Coverage,
    /// Hyperparameters the candidate read differently from the file.
    pub config_check: Vec<ConfigMismatch>,
    /// Free mode and dumps: how far the two runs grew apart.
    pub drift: Option<Drift>,
    /// The reference's greedy tokens.
    pub generated_reference: Vec<u32>,
    /// The candidate's greedy tokens.
    pub generated_candidate: Vec<u32>,
    /// Steps where the greedy tokens differed.
    pub token_disagreements: Vec<TokenDisagreement>,
    /// Steps that ran.
    pub steps_run: usize,
    /// The run was stopped by the user before all steps ran.
    pub interrupted: bool,
    /// Why the reference failed.
    pub reference_failure: Option<String>,
    /// How the candidate failed.
    pub candidate_failure: Option<CandidateFailure>,
    /// bitnet.cpp's own description of the model.
    pub reference_description: String,
    /// The model as the candidate read it.
    pub model: Option<ModelConfig>,
    /// The model as the file states it (the oracle's reading).
    pub file_facts: Option<FileFacts>,
    /// The file's size.
    pub model_file_size: u64,
    /// The synthetic model's recipe, when the file carries one.
    pub recipe: Option<crate::synth::SynthConfig>,
    /// The candidate's self-description.
    pub candidate: CandidateInfo,
    /// F32/F16 tensors holding NaN or Inf: a warning, the run goes on.
    pub weight_warnings: Vec<String>,
    /// What a reader should know that does not change the verdict (e.g.
    /// the two dumps used different KV cache types, and how to match them).
    #[serde(default)]
    pub remarks: Vec<String>,
    /// Per position, the two sides' next-token distributions compared (KL,
    /// top tokens): a few numbers per position, never the vocabulary. Not
    /// part of a receipt; `divergence sweep` gathers them over a corpus.
    #[serde(default)]
    pub logit_positions: Vec<PositionLogits>,
    /// Volatile timings.
    pub timings: Timings,
}

impl TokenCheck {
    /// The check before tokenizing: the reference's `ids` as given, nothing
    /// compared yet.
    pub(crate) fn ids_given(reference: Vec<u32>) -> TokenCheck {
        TokenCheck {
            reference,
            candidate: vec![],
            equal: true,
            duplicate_bos_reference: vec![],
            duplicate_bos_candidate: vec![],
            source: TokenSource::IdsGiven,
            reference_tokenizer: None,
            candidate_tokenizer: None,
            first_difference: None,
            chat: None,
        }
    }
}

impl Outcome {
    /// A run's outcome before its first step: nothing found, nothing run.
    /// The callers fill in what they know of the model and the engines.
    pub(crate) fn starting(tokens: TokenCheck) -> Outcome {
        Outcome {
            verdict: Verdict::NoDivergence,
            tokens,
            first_divergence: None,
            later_divergences: vec![],
            summary: vec![],
            steps: vec![],
            coverage: Coverage::default(),
            config_check: vec![],
            drift: None,
            generated_reference: vec![],
            generated_candidate: vec![],
            token_disagreements: vec![],
            steps_run: 0,
            interrupted: false,
            reference_failure: None,
            candidate_failure: None,
            reference_description: String::new(),
            model: None,
            file_facts: None,
            model_file_size: 0,
            recipe: None,
            candidate: CandidateInfo::default(),
            weight_warnings: vec![],
            remarks: vec![],
            logit_positions: vec![],
            timings: Timings::default(),
        }
    }

    /// Records a failing stage: the first divergence, or one more after it.
    pub(crate) fn record_divergence(&mut self, _step: usize, div: Divergence) {
        if self.first_divergence.is_none() {
            self.first_divergence = Some(div);
        } else {
            self.later_divergences.push(div);
        }
    }
}

/// One position's logits, reference against candidate: the logits the
/// greedy choice was made from on each side (in free mode the candidate's
/// own, in resync the resynced candidate's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PositionLogits {
    /// The step.
    pub step: usize,
    /// The absolute position.
    pub position: usize,
    /// KL(P_ref ‖ P_cand) and the top tokens.
    #[serde(flatten)]
    pub compared: metrics::PositionKl,
}

impl StageSummary {
    fn new(key: StageKey, class: compare::Class) -> StageSummary {
        StageSummary {
            layer: key.layer,
            stage: key.stage,
            class,
            steps: 0,
            all_pass: true,
            worst_candidate_over_rounding: None,
            worst_reference_over_rounding: None,
            ties: 0,
            all_exact: true,
            all_agree: true,
            worst_nmse: 0.0,
            worst_max_abs: 0.0,
            worst_max_ulp: 0,
        }
    }

    /// Adds one step's judgement of the stage.
    pub(crate) fn add(&mut self, j: &compare::judge::StageJudgement) {
        let worst =
            |acc: Option<f64>, l: &Option<Result<compare::local::LocalError, String>>| match l {
                Some(Ok(e)) if e.recomputed.is_empty() => Some(metrics::finite_or_max(
                    acc.unwrap_or(0.0).max(e.over_rounding),
                )),
                _ => acc,
            };
        let ties = |l: &Option<Result<compare::local::LocalError, String>>| match l {
            Some(Ok(e)) => e.ties,
            _ => 0,
        };
        self.steps += 1;
        self.all_pass &= j.pass;
        self.worst_candidate_over_rounding =
            worst(self.worst_candidate_over_rounding, &j.candidate);
        self.worst_reference_over_rounding =
            worst(self.worst_reference_over_rounding, &j.reference);
        self.ties += ties(&j.candidate) + ties(&j.reference);
        self.all_agree &= j.agree;
        match &j.sides {
            Some(m) => {
                self.all_exact &= m.exact;
                self.worst_nmse = metrics::finite_or_max(self.worst_nmse.max(m.nmse));
                self.worst_max_abs = metrics::finite_or_max(self.worst_max_abs.max(m.max_abs));
                self.worst_max_ulp = self.worst_max_ulp.max(m.max_ulp);
            }
            None => self.all_exact = false,
        }
    }
}

/// The summary entry of `key`, created on first use.
pub(crate) fn summary_slot(
    summary: &mut Vec<StageSummary>,
    key: StageKey,
    class: compare::Class,
) -> &mut StageSummary {
    match summary
        .iter()
        .position(|s| s.layer == key.layer && s.stage == key.stage)
    {
        Some(i) => &mut summary[i],
        None => {
            summary.push(StageSummary::new(key, class));
            summary.last_mut().expect("just pushed")
        }
    }
}

/// Fields of the candidate's config that differ from the file's.
pub fn config_mismatches(candidate: &ModelConfig, file: &FileFacts) -> Vec<ConfigMismatch> {
    let mut out = Vec::new();
    let mut check = |field: &str, c: String, f: String| {
        if c != f {
            out.push(ConfigMismatch {
                field: field.into(),
                candidate: c,
                file: f,
            });
        }
    };
    check("arch", candidate.arch.name().into(), file.arch.clone());
    let pairs: [(&str, usize, usize); 8] = [
        ("n_embd", candidate.n_embd, file.n_embd),
        ("n_layer", candidate.n_layer, file.n_layer),
        ("n_head", candidate.n_head, file.n_head),
        ("n_head_kv", candidate.n_head_kv, file.n_head_kv),
        ("n_ff", candidate.n_ff, file.n_ff),
        ("n_vocab", candidate.n_vocab, file.n_vocab),
        ("n_ctx_train", candidate.n_ctx_train, file.n_ctx_train),
        ("head_dim", candidate.head_dim, file.head_dim),
    ];
    for (field, c, f) in pairs {
        check(field, c.to_string(), f.to_string());
    }
    // Bitwise: a theta read from the wrong key must show however close it is.
    check(
        "rope_theta",
        format!("{:?}", candidate.rope_theta),
        format!("{:?}", file.rope_theta),
    );
    check(
        "rms_eps",
        format!("{:?}", candidate.rms_eps),
        format!("{:?}", file.rms_eps),
    );
    check(
        "tied_output",
        candidate.tied_output.to_string(),
        file.tied_output.to_string(),
    );
    out
}
