//! `divergence compare`: two dumps judged offline with the same metrics,
//! policy, coverage accounting and receipt as a lockstep run.
//!
//! An offline dump cannot be resynced: each engine fed itself, so what is
//! judged is the *propagated* error under the policy's `free_run` rules, and
//! the receipt says so. With the model file, the f64 oracle recomputes the
//! first failing stage from the reference dump's inputs and blames a side.

use super::*;
use crate::dump::map::MappedDump;
use crate::dump::{Dump, Manifest};

/// How to compare.
#[derive(Clone, Debug)]
pub struct OfflineOptions {
    /// The tolerance policy (its `free_run` rules judge).
    pub policy: Policy,
    /// Record every failing stage instead of stopping at the first.
    pub keep_going: bool,
    /// The model file, for the oracle's blame.
    pub model: Option<PathBuf>,
}

/// The candidate side of an offline comparison.
pub struct CandidateDump<'a> {
    /// Its stages (read directly or through a map), or why it could not be read.
    pub stages: Result<&'a MappedDump, String>,
    /// Its manifest, if it has one (dumps of other engines may not).
    pub manifest: Option<&'a Manifest>,
    /// How it was named in the command (for the receipt).
    pub label: String,
}

/// Judges `candidate` against the `reference` dump.
pub fn compare_dumps(
    reference: &Dump,
    candidate: &CandidateDump<'_>,
    opts: &OfflineOptions,
) -> Result<Outcome, RunError> {
    let t_total = Instant::now();
    let manifest = reference.manifest.as_ref().ok_or_else(|| {
        RunError::Input(format!(
            "{} has no `{}` manifest: capture the reference with `divergence capture --engine reference`",
            reference.path().display(),
            crate::dump::MANIFEST_KEY
        ))
    })?;
    let mut run = Run {
        weight_scan: None,
        outcome: Outcome {
            reference_description: manifest.engine_build.clone(),
            model: candidate.manifest.and_then(|m| m.engine_config.clone()),
            file_facts: manifest.model.clone(),
            candidate: CandidateInfo {
                name: candidate
                    .manifest
                    .map_or_else(|| format!("dump {}", candidate.label), |m| m.engine.clone()),
                build: candidate
                    .manifest
                    .map_or_else(|| candidate.label.clone(), |m| m.engine_build.clone()),
                kv_semantics: None,
            },
            ..Outcome::starting(TokenCheck::ids_given(
                manifest
                    .steps
                    .first()
                    .map(|s| s.tokens.clone())
                    .unwrap_or_default(),
            ))
        },
        t_total,
    };
    run.outcome.coverage.notes.clear();
    let stages = match &candidate.stages {
        Ok(s) => *s,
        Err(why) => {
            let f = Failed::Error(CandidateError::new(format!(
                "its dump cannot be read: {why}"
            )));
            return Ok(run.candidate_failed("dump", f, None, None));
        }
    };
    if !stages.unmapped.is_empty() {
        let shown: Vec<&str> = stages.unmapped.iter().take(8).map(String::as_str).collect();
        run.outcome.coverage.notes.push(format!(
            "{} tensor(s) of the candidate dump map to no stage: {}{}",
            stages.unmapped.len(),
            shown.join(", "),
            if stages.unmapped.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        ));
    }
    if let (Some(f), Some(c)) = (&manifest.model, &run.outcome.model) {
        run.outcome.config_check = config_mismatches(c, f);
    }

    // The reference dump's stages, per step.
    let mut by_step: BTreeMap<usize, BTreeMap<StageKey, Tensor>> = BTreeMap::new();
    for name in reference.names() {
        match crate::dump::parse_name(name) {
            Some((step, key)) => {
                let t = reference
                    .tensor(name)
                    .map_err(|e| RunError::Io(e.to_string()))?
                    .expect("listed names exist");
                by_step.entry(step).or_default().insert(key, t);
            }
            None => run
                .outcome
                .coverage
                .unmapped_reference_nodes
                .push(name.to_string()),
        }
    }

    // The token ids of both runs.
    let cand_tokens = candidate
        .manifest
        .and_then(|m| m.steps.first())
        .map(|s| s.tokens.clone());
    if let Some(c) = &cand_tokens {
        run.outcome.tokens.candidate = c.clone();
        run.outcome.tokens.equal = *c == run.outcome.tokens.reference;
        if !run.outcome.tokens.equal {
            let (r, c) = (&run.outcome.tokens.reference, c);
            let at = r
                .iter()
                .zip(c)
                .position(|(a, b)| a != b)
                .unwrap_or(r.len().min(c.len()));
            run.outcome.tokens.first_difference = Some(TokenDifference {
                position: at,
                reference: r.get(at).copied(),
                candidate: c.get(at).copied(),
                reference_piece: None,
                candidate_piece: None,
                description: describe_token_difference(r, c, at, None),
            });
        }
    } else {
        // No manifest: the ids are not known, but tok_embd (the embedding
        // rows of whatever ids the candidate ran) still compares them.
        run.outcome.tokens.candidate = run.outcome.tokens.reference.clone();
    }

    let file = match &opts.model {
        Some(p) => Some(GgufFile::open(p)?),
        None => None,
    };
    let oracle = match &file {
        Some(f) => Oracle::new(f, manifest.kv_type == KvType::F16).map_err(|e| e.to_string()),
        None => Err("compare was run without --model".to_string()),
    };
    let n_vocab = manifest.model.as_ref().map_or(0, |f| f.n_vocab);
    let n_layer = manifest.model.as_ref().map_or(0, |f| f.n_layer);
    let mut kv_history: Vec<(Vec<f32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); n_layer];
    let expected_of = |stages: &BTreeMap<StageKey, Tensor>| -> Vec<StageKey> {
        match &manifest.model {
            Some(f) => f.expected_stages(),
            None => {
                let mut keys: Vec<StageKey> = stages.keys().copied().collect();
                keys.sort_by_key(|k| k.order());
                keys
            }
        }
    };
    let empty = BTreeMap::new();
    for (i, dstep) in manifest.steps.iter().enumerate() {
        let step = dstep.step;
        let ref_stages = by_step.get(&step).unwrap_or(&empty);
        let expected = expected_of(ref_stages);
        let mut judge = StageJudge::new(&opts.policy, ref_stages, n_vocab)
            .free_rules(true)
            .keep_going(opts.keep_going);
        for key in &expected {
            let Some(t) = stages.stages.get(&(step, *key)) else {
                continue;
            };
            if let Some(r) = ref_stages.get(key) {
                let token_shift = key.stage == Stage::TokEmbd && !run.outcome.tokens.equal;
                if r.shape != t.shape && !token_shift {
                    let f = Failed::Error(CandidateError::new(format!(
                        "tensor {} has shape {:?}; the canonical layout of {} here is {:?}",
                        crate::dump::tensor_name(step, *key),
                        t.shape,
                        key.stage,
                        r.shape
                    )));
                    let last = judge.last_stage();
                    return Ok(run.candidate_failed("dump", f, Some(step), last));
                }
            }
            let mut data = t.data.clone();
            judge.judge(*key, &t.shape, &mut data);
        }
        run.outcome.timings.compare_s += judge.compare_s;
        let judged = std::mem::take(&mut judge.judged);
        let failures = std::mem::take(&mut judge.failures);
        let emitted = std::mem::take(&mut judge.emitted);
        drop(judge);
        run.outcome.coverage.steps.push(step_coverage(
            step,
            &expected,
            ref_stages,
            &emitted,
            &judged,
            !failures.is_empty() && !opts.keep_going,
        ));
        // Offline, the judged error is the propagated one: record it as such.
        run.absorb(step, dstep.pos0, dstep.tokens.len(), &judged, &[]);
        let inputs = StepInputs {
            stages: ref_stages,
            history: &kv_history,
            tokens: &dstep.tokens,
            n_past: dstep.pos0,
        };
        for f in failures {
            let mut div = divergence(
                &opts.policy,
                step,
                f,
                oracle.as_ref().map_err(|e| e.clone()),
                &inputs,
                dstep.pos0,
                dstep.tokens.len(),
            );
            div.measured = Measured::Propagated;
            div.rule = opts.policy.rule(div.stage, true).clone();
            run.outcome.record_divergence(step, div);
        }
        super::extend_kv_history(&mut kv_history, ref_stages);
        run.outcome.steps_run = i + 1;
        // The greedy tokens each run chose are the next step's inputs.
        if let Some(next) = manifest.steps.get(i + 1) {
            let r = next.tokens.first().copied().unwrap_or(0);
            let c = candidate
                .manifest
                .and_then(|m| m.steps.get(i + 1))
                .and_then(|s| s.tokens.first().copied())
                .unwrap_or(r);
            run.outcome.generated_reference.push(r);
            run.outcome.generated_candidate.push(c);
            if r != c {
                run.outcome.token_disagreements.push(TokenDisagreement {
                    step,
                    reference: r,
                    candidate: c,
                });
            }
        }
        if run.outcome.first_divergence.is_some() && !opts.keep_going {
            break;
        }
    }
    // Offline results are propagated errors: move them to where free mode keeps them.
    for s in &mut run.outcome.steps {
        for r in &mut s.stages {
            r.propagated_nmse = Some(r.nmse);
            r.propagated_pass = Some(r.pass);
        }
    }
    Ok(run.finish())
}
