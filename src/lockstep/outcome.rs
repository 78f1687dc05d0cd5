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
    /// Stages judged in this step.
    pub judged: usize,
    /// Stages not judged because the run stopped at the divergence.
    pub after_divergence: usize,
    /// Expected stages the reference did not produce.
    pub missing_reference: Vec<StageKey>,
    /// Expected stages the candidate did not emit.
    pub missing_candidate: Vec<StageKey>,
    /// Stages the candidate emitted that the arch does not have.
    pub unexpected_candidate: Vec<StageKey>,
}

/// Whether everything a clean verdict vouches for was judged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Coverage {
    /// Nothing missing on either side, no unmapped reference node, tokens compared.
    pub complete: bool,
    /// Per step.
    pub steps: Vec<StepCoverage>,
    /// Reference graph nodes that map to no stage and are not known
    /// auxiliaries (views, cache copies): listed, never dropped.
    pub unmapped_reference_nodes: Vec<String>,
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
    /// Local error (resync: the stage on the reference's inputs): NMSE.
    pub nmse: f64,
    /// Local error: largest absolute difference.
    pub max_abs: f64,
    /// Local error: bit-identical.
    pub exact: bool,
    /// Passed its rule.
    pub pass: bool,
    /// Free mode: the propagated error (each engine on its own inputs): NMSE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub propagated_nmse: Option<f64>,
    /// Free mode: the propagated error is within the policy's free-run rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub propagated_pass: Option<bool>,
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

/// The propagated (free-run) error of one (layer, stage) over the steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PropagatedSummary {
    /// Within the free-run rule at every step.
    pub all_pass: bool,
    /// Worst NMSE.
    pub worst_nmse: f64,
    /// Worst largest absolute difference.
    pub worst_max_abs: f64,
}

/// One (layer, stage) aggregated over the steps compared so far.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    /// The layer (none for model-level stages).
    pub layer: Option<usize>,
    /// The stage.
    pub stage: Stage,
    /// The policy class it was judged by.
    pub class: compare::Class,
    /// Steps judged.
    pub steps: usize,
    /// Passed at every step.
    pub all_pass: bool,
    /// Bit-identical at every step.
    pub all_exact: bool,
    /// Worst local NMSE.
    pub worst_nmse: f64,
    /// Worst local largest absolute difference.
    pub worst_max_abs: f64,
    /// Worst local ULP distance.
    pub worst_max_ulp: u64,
    /// Free mode: the propagated error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub propagated: Option<PropagatedSummary>,
}

/// Which error a divergence was found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Measured {
    /// The stage computed on the reference's inputs (resync, and free
    /// mode's resynced twin): where an error is born.
    Local,
    /// Each engine on its own inputs (an offline dump comparison).
    Propagated,
}

/// The first stage that failed its rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    /// The step.
    pub step: usize,
    /// Positions of the step's batch (absolute), and the worst one.
    pub positions: Vec<usize>,
    /// The position of the worst element.
    pub position: usize,
    /// The layer (none for model-level stages).
    pub layer: Option<usize>,
    /// The stage.
    pub stage: Stage,
    /// The reference's shape (canonical layout).
    pub shape: Vec<usize>,
    /// The rule it failed.
    pub rule: policy::Rule,
    /// Which error the rule judged.
    pub measured: Measured,
    /// The metrics.
    pub metrics: Metrics,
    /// Free mode: the propagated error at the same stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub propagated: Option<Metrics>,
    /// The elements that differ most, with the oracle's values.
    pub worst: Vec<WorstElement>,
    /// Which side is wrong, and why.
    pub blame: BlameReport,
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
            logit_positions: vec![],
            timings: Timings::default(),
        }
    }

    /// Records a failing stage: the first divergence, or one more after it.
    /// At the embeddings of step 0 with prompts that differ, the token
    /// check's blame replaces the oracle's.
    pub(crate) fn record_divergence(&mut self, step: usize, mut div: Divergence) {
        if step == 0 && !self.tokens.equal && div.stage == crate::trace::Stage::TokEmbd {
            div.blame = super::token_blame(&self.tokens);
        }
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
            all_exact: true,
            worst_nmse: 0.0,
            worst_max_abs: 0.0,
            worst_max_ulp: 0,
            propagated: None,
        }
    }

    /// Adds one step's local metrics.
    pub(crate) fn add_local(&mut self, pass: bool, m: &Metrics) {
        self.steps += 1;
        self.all_pass &= pass;
        self.all_exact &= m.exact;
        self.worst_nmse = metrics::finite_or_max(self.worst_nmse.max(m.nmse));
        self.worst_max_abs = metrics::finite_or_max(self.worst_max_abs.max(m.max_abs));
        self.worst_max_ulp = self.worst_max_ulp.max(m.max_ulp);
    }

    /// Adds one step's propagated metrics.
    pub(crate) fn add_propagated(&mut self, pass: bool, m: &Metrics) {
        let p = self.propagated.get_or_insert(PropagatedSummary {
            all_pass: true,
            worst_nmse: 0.0,
            worst_max_abs: 0.0,
        });
        p.all_pass &= pass;
        p.worst_nmse = metrics::finite_or_max(p.worst_nmse.max(m.nmse));
        p.worst_max_abs = metrics::finite_or_max(p.worst_max_abs.max(m.max_abs));
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
