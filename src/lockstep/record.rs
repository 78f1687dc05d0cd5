//! The outcome under construction, shared by `find`, `compare` and `sweep`:
//! each step's judgements become coverage, step records, the summary, the
//! drift and the divergences, the same way whatever produced the stages.

use super::*;
use crate::compare::judge::{self, Pairing, StageJudgement};
use crate::compare::local::LocalError;

/// The outcome under construction.
pub(crate) struct Run {
    pub outcome: Outcome,
    pub t_total: Instant,
    /// The NaN/Inf weight scan running beside the run.
    pub weight_scan: Option<std::thread::JoinHandle<Vec<String>>>,
}

/// How a run ended before its last step, as something to write a receipt of
/// (or bad input: no receipt).
pub(crate) enum Ended {
    /// The request is wrong: an error, exit 2.
    Bad(RunError),
    /// bitnet.cpp failed.
    Reference(RefError),
    /// The candidate failed.
    Candidate {
        during: &'static str,
        failed: Failed,
        step: Option<usize>,
        last: Option<StageKey>,
    },
}

impl From<RunError> for Ended {
    fn from(e: RunError) -> Self {
        Ended::Bad(e)
    }
}

/// One step's judged stages and what each side produced.
pub(crate) struct StepJudged<'s> {
    pub step: usize,
    pub pos0: usize,
    pub n_tokens: usize,
    pub judged: Vec<StageJudgement>,
    /// Stages the arch implies for a step.
    pub expected: &'s [StageKey],
    /// Stages the reference produced.
    pub reference: &'s BTreeSet<StageKey>,
    /// Stages the candidate emitted.
    pub emitted: &'s [StageKey],
    /// The stages the candidate emits by design (`None`: all).
    pub scope: Option<&'s BTreeSet<Stage>>,
    pub pairing: Pairing,
    pub keep_going: bool,
}

impl Run {
    /// An outcome starts with the token check of `tokens`.
    pub fn new(tokens: TokenCheck, t_total: Instant) -> Run {
        Run {
            outcome: Outcome::starting(tokens),
            t_total,
            weight_scan: None,
        }
    }

    /// The outcome of a run that ended early: reference or candidate
    /// failure (bad input is the caller's error).
    pub fn ended(mut self, e: Ended) -> Result<Outcome, RunError> {
        match e {
            Ended::Bad(e) => Err(e),
            Ended::Reference(e) => {
                self.outcome.reference_failure = Some(e.to_string());
                let mut o = self.finish();
                o.verdict = Verdict::ReferenceFailed;
                Ok(o)
            }
            Ended::Candidate {
                during,
                failed,
                step,
                last,
            } => {
                let (kind, message) = match failed {
                    Failed::Error(e) => (
                        if during == "load" { "load" } else { "error" },
                        format!("{during}: {e}"),
                    ),
                    Failed::Panic(msg) => ("panic", format!("{during} panicked: {msg}")),
                };
                self.outcome.candidate_failure = Some(CandidateFailure {
                    kind: kind.into(),
                    message,
                    step,
                    last_stage: last,
                });
                let mut o = self.finish();
                o.verdict = Verdict::CandidateFailed;
                Ok(o)
            }
        }
    }

    /// The token check: ids of both sides, BOS duplicates, the first
    /// difference in words (`pieces` renders ids as the reference's
    /// vocabulary spells them), and when they differ a token divergence.
    pub fn check_tokens(
        &mut self,
        reference: Vec<u32>,
        candidate: Vec<u32>,
        bos: Option<u32>,
        pieces: &mut dyn FnMut(&[u32]) -> Vec<Option<String>>,
    ) {
        let dup = |ids: &[u32]| -> Vec<usize> {
            ids.windows(2)
                .enumerate()
                .filter(|(_, w)| Some(w[0]) == bos && w[1] == w[0])
                .map(|(i, _)| i + 1)
                .collect()
        };
        let t = &mut self.outcome.tokens;
        t.equal = reference == candidate;
        t.duplicate_bos_reference = dup(&reference);
        t.duplicate_bos_candidate = dup(&candidate);
        if !t.equal {
            let (ref_pieces, cand_pieces) = (pieces(&reference), pieces(&candidate));
            let show = |side: &str, id: u32| {
                let (ids, ps) = if side == "reference" {
                    (&reference, &ref_pieces)
                } else {
                    (&candidate, &cand_pieces)
                };
                ids.iter()
                    .position(|&i| i == id)
                    .and_then(|i| ps.get(i).cloned().flatten())
                    .unwrap_or_default()
            };
            if let Some(d) = crate::compare::tokens::first_difference(
                ("reference", &reference),
                &[("candidate", &candidate)],
                bos,
                &show,
            ) {
                let at = d.position;
                t.first_difference = Some(TokenDifference {
                    position: at,
                    reference: reference.get(at).copied(),
                    candidate: candidate.get(at).copied(),
                    reference_piece: reference.get(at).map(|&id| show("reference", id)),
                    candidate_piece: candidate.get(at).map(|&id| show("candidate", id)),
                    description: d.explanation,
                });
            }
        }
        t.reference = reference;
        t.candidate = candidate;
        if !self.outcome.tokens.equal {
            let at = self
                .outcome
                .tokens
                .first_difference
                .as_ref()
                .map_or(0, |d| d.position);
            let div = Divergence {
                step: 0,
                positions: (0..self.outcome.tokens.reference.len()).collect(),
                position: at,
                layer: None,
                stage: Stage::TokEmbd,
                shape: vec![],
                measured: Measured::Tokens,
                bound: None,
                candidate_local: None,
                reference_local: None,
                rule: Policy::default_policy().rule(Stage::TokEmbd, false).clone(),
                metrics: None,
                worst: vec![],
                blame: token_blame(&self.outcome.tokens),
            };
            self.outcome.record_divergence(0, div);
        }
    }

    /// Compares the two sides' logits position by position (the sweep's
    /// KL statistics). Skipped for a step whose two sides have different
    /// row counts (the prompts' ids differ): no row pairs with another.
    pub fn compare_position_logits(
        &mut self,
        step: usize,
        pos0: usize,
        reference: &[f32],
        candidate: &[f32],
        n_vocab: usize,
    ) {
        if n_vocab == 0 || reference.len() != candidate.len() {
            return;
        }
        for (row, (r, c)) in reference
            .chunks_exact(n_vocab)
            .zip(candidate.chunks_exact(n_vocab))
            .enumerate()
        {
            self.outcome.logit_positions.push(PositionLogits {
                step,
                position: pos0 + row,
                compared: metrics::position_kl(r, c),
            });
        }
    }

    /// Records one step: coverage, the step record, the summary, the drift
    /// and, for each failing stage, a divergence.
    pub fn absorb(&mut self, policy: &Policy, s: StepJudged<'_>) {
        let failures = s.judged.iter().filter(|j| !j.pass).count();
        self.outcome
            .coverage
            .steps
            .push(step_coverage(&s, failures > 0 && !s.keep_going));
        let mut record = StepRecord {
            step: s.step,
            pos0: s.pos0,
            n_tokens: s.n_tokens,
            stages: Vec::with_capacity(s.judged.len()),
        };
        for j in &s.judged {
            summary_slot(&mut self.outcome.summary, j.key, j.class).add(j);
            record.stages.push(stage_result(j));
            if s.pairing == Pairing::OwnInputs {
                self.add_drift(policy, s.step, j);
            }
        }
        self.outcome.steps.push(record);
        for j in s.judged.into_iter().filter(|j| !j.pass) {
            if !s.keep_going && self.outcome.first_divergence.is_some() {
                break;
            }
            let div = divergence(policy, s.step, s.pos0, s.n_tokens, j, s.pairing);
            self.outcome.record_divergence(s.step, div);
        }
    }

    fn add_drift(&mut self, policy: &Policy, step: usize, j: &StageJudgement) {
        let Some(m) = &j.sides else { return };
        let d = self.outcome.drift.get_or_insert_with(Drift::default);
        let nmse = metrics::finite_or_max(m.nmse);
        match (j.key.stage, j.key.layer) {
            (Stage::LOut, Some(l)) => {
                if d.l_out_by_layer.len() <= l {
                    d.l_out_by_layer.resize(l + 1, 0.0);
                }
                d.l_out_by_layer[l] = d.l_out_by_layer[l].max(nmse);
            }
            (Stage::Logits, _) => {
                if d.logits_by_step.len() <= step {
                    d.logits_by_step.resize(step + 1, 0.0);
                }
                d.logits_by_step[step] = nmse;
            }
            _ => {}
        }
        if !policy::passes(policy.rule(j.key.stage, true), m)
            && d.beyond_free_run_bound.len() < 8
            && !d.beyond_free_run_bound.contains(&j.key)
        {
            d.beyond_free_run_bound.push(j.key);
        }
    }

    /// The greedy tokens each side chose at a step (and the step from which
    /// they were fed different ones).
    pub fn record_choices(&mut self, step: usize, reference: u32, candidate: u32, decoding: bool) {
        if decoding {
            self.outcome.generated_reference.push(reference);
            self.outcome.generated_candidate.push(candidate);
        }
        if reference != candidate {
            self.outcome.token_disagreements.push(TokenDisagreement {
                step,
                reference,
                candidate,
            });
        }
    }

    /// The verdict, the summary in execution order, coverage completeness
    /// and the volatile figures.
    pub fn finish(mut self) -> Outcome {
        if let Some(scan) = self.weight_scan.take() {
            self.outcome.weight_warnings = scan
                .join()
                .unwrap_or_else(|_| vec!["the NaN/Inf weight scan panicked".into()]);
        }
        let o = &mut self.outcome;
        o.summary
            .sort_by_key(|s| StageKey::new(s.layer, s.stage).order());
        let c = &mut o.coverage;
        c.complete = c.unmapped_reference_nodes.is_empty()
            && c.notes.is_empty()
            && c.steps
                .iter()
                .all(|s| s.missing_reference.is_empty() && s.missing_candidate.is_empty());
        o.verdict = if o.first_divergence.is_some() || !o.tokens.equal {
            Verdict::Divergence
        } else if !c.complete {
            Verdict::Incomplete
        } else {
            Verdict::NoDivergence
        };
        o.timings.harness_peak_rss_bytes =
            crate::reference::worker::peak_rss_of("/proc/self/status");
        o.timings.total_s = self.t_total.elapsed().as_secs_f64();
        self.outcome
    }
}

/// The coverage of one step: expected stages against what each side
/// produced and what the candidate emits by design.
fn step_coverage(s: &StepJudged<'_>, stopped: bool) -> StepCoverage {
    let emitted: BTreeSet<StageKey> = s.emitted.iter().copied().collect();
    // Judged means judged on the candidate's side: a stage it did not emit is
    // judged on the reference's side only (its local error), and missing.
    let judged: BTreeSet<StageKey> = s
        .judged
        .iter()
        .map(|j| j.key)
        .filter(|k| emitted.contains(k))
        .collect();
    let in_scope = |k: &StageKey| s.scope.is_none_or(|sc| sc.contains(&k.stage));
    let both = s
        .expected
        .iter()
        .filter(|k| s.reference.contains(k) && emitted.contains(k))
        .count();
    StepCoverage {
        step: s.step,
        expected: s.expected.len(),
        judged: judged.len(),
        after_divergence: if stopped {
            both.saturating_sub(judged.len())
        } else {
            0
        },
        outside_scope: s.expected.iter().filter(|k| !in_scope(k)).count(),
        missing_reference: s
            .expected
            .iter()
            .filter(|k| !s.reference.contains(k))
            .copied()
            .collect(),
        missing_candidate: s
            .expected
            .iter()
            .filter(|k| in_scope(k) && !emitted.contains(k))
            .copied()
            .collect(),
        unexpected_candidate: emitted
            .iter()
            .filter(|k| !s.expected.contains(k))
            .copied()
            .collect(),
    }
}

/// A side's local error as a record shows it: its NMSE against the oracle.
fn local_nmse(l: &Option<Result<LocalError, String>>) -> Option<f64> {
    match l {
        Some(Ok(e)) => Some(metrics::finite_or_max(e.nmse)),
        _ => None,
    }
}

fn stage_result(j: &StageJudgement) -> StageResult {
    StageResult {
        layer: j.key.layer,
        stage: j.key.stage,
        pass: j.pass,
        candidate_local_nmse: local_nmse(&j.candidate),
        reference_local_nmse: local_nmse(&j.reference),
        across_gap: matches!(&j.candidate, Some(Ok(e)) if !e.recomputed.is_empty()),
        nmse: j.sides.as_ref().map(|m| metrics::finite_or_max(m.nmse)),
        max_abs: j.sides.as_ref().map(|m| metrics::finite_or_max(m.max_abs)),
        exact: j.sides.as_ref().is_some_and(|m| m.exact),
        agree: j.agree,
    }
}

/// A failing stage turned into a divergence: where, what was measured, the
/// worst elements and the blame.
fn divergence(
    policy: &Policy,
    step: usize,
    pos0: usize,
    t: usize,
    j: StageJudgement,
    pairing: Pairing,
) -> Divergence {
    let evidence = j.evidence.as_deref().cloned();
    let blame = evidence
        .as_ref()
        .map(|e| e.blame.clone())
        .unwrap_or_else(|| BlameReport {
            blame: Blame::Undetermined,
            reference_nmse_vs_oracle: None,
            candidate_nmse_vs_oracle: None,
            reference_error_over_rounding: None,
            candidate_error_over_rounding: None,
            reason: "no evidence was kept".into(),
            cause: None,
        });
    let ok = |l: &Option<Result<LocalError, String>>| match l {
        Some(Ok(e)) => Some(e.clone()),
        _ => None,
    };
    let (cand, refr) = (ok(&j.candidate), ok(&j.reference));
    let blamed = match blame.blame {
        Blame::Reference => refr.as_ref(),
        _ => cand.as_ref().filter(|e| !e.pass).or(refr.as_ref()),
    };
    let (measured, bound) = match blamed.filter(|e| !e.pass) {
        Some(e) if !e.recomputed.is_empty() => (
            Measured::AcrossGap,
            Some(LocalBound::AcrossGapNmse {
                max: policy.local.across_gap.max_nmse,
            }),
        ),
        Some(_) => (
            Measured::Local,
            Some(LocalBound::OverRounding {
                max: policy.local_rule(j.key.stage).max_over_rounding,
            }),
        ),
        None => (Measured::SideVsSide, None),
    };
    let worst = evidence
        .as_ref()
        .map(|e| judge::worst_elements(e, &j.shape))
        .unwrap_or_default();
    // The first token row beyond the rule; without one, the worst element's.
    let tok_axis = usize::from(j.key.stage.is_attention_matrix());
    let row = blamed
        .and_then(|e| e.first_row_beyond)
        .or_else(|| worst.first().and_then(|w| w.index.get(tok_axis).copied()))
        .unwrap_or(0);
    Divergence {
        step,
        positions: (pos0..pos0 + t).collect(),
        position: pos0 + row,
        layer: j.key.layer,
        stage: j.key.stage,
        shape: j.shape.clone(),
        measured,
        bound,
        candidate_local: cand,
        reference_local: refr,
        rule: policy
            .rule(j.key.stage, pairing == Pairing::OwnInputs)
            .clone(),
        metrics: j.sides.clone(),
        worst,
        blame,
    }
}

/// Blame when the two sides saw different prompt token ids: a side with a
/// duplicated BOS is wrong; otherwise the tokenizers disagree and the ids
/// alone cannot say which is right.
pub(crate) fn token_blame(tokens: &TokenCheck) -> BlameReport {
    let (blame, reason) = match (
        tokens.duplicate_bos_reference.is_empty(),
        tokens.duplicate_bos_candidate.is_empty(),
    ) {
        (true, false) => (
            Blame::Candidate,
            "the candidate's prompt has a duplicated BOS token".to_string(),
        ),
        (false, true) => (
            Blame::Reference,
            "the reference's prompt has a duplicated BOS token".to_string(),
        ),
        _ => (
            Blame::Undetermined,
            format!(
                "the tokenizers produce different ids for the prompt: {}",
                tokens
                    .first_difference
                    .as_ref()
                    .map_or("", |d| d.description.as_str())
            ),
        ),
    };
    BlameReport {
        blame,
        reference_nmse_vs_oracle: None,
        candidate_nmse_vs_oracle: None,
        reference_error_over_rounding: None,
        candidate_error_over_rounding: None,
        reason,
        cause: None,
    }
}
