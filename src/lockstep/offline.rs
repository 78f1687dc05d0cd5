//! `divergence compare`: two dumps judged offline by the same judge as a
//! lockstep run.
//!
//! Each engine fed itself, so nothing can be resynced; it does not need to
//! be. With the model file the f64 oracle recomputes every stage of each
//! dump from that dump's own inputs, so each engine is judged on its local
//! error exactly as in `find`, and the difference between the two dumps is
//! reported as drift. A dump is evidence and is checked as such before it is
//! believed: its manifest's steps must be a run and agree with its tensors,
//! its model hash must be the model's, a stage must come from one tensor,
//! and a malformed reference dump is bad input, not a candidate failure.

use super::*;
use crate::dump::map::MappedDump;
use crate::dump::{parse_name, Dump, Manifest};

/// How to compare.
#[derive(Clone, Debug)]
pub struct OfflineOptions {
    /// The tolerance policy.
    pub policy: Policy,
    /// Record every failing stage instead of stopping at the first.
    pub keep_going: bool,
    /// The model file: the oracle judges each side's local error. Without
    /// it only side against side can be measured.
    pub model: Option<PathBuf>,
    /// The executable to start bitnet.cpp in (see
    /// [`crate::reference::worker::default_exe`]): a dump of tokens only is
    /// judged by feeding the reference the candidate's own tokens. Without
    /// it, its choices are judged only while they match the reference
    /// dump's.
    pub worker_exe: Option<PathBuf>,
    /// The FFN activation the oracle (and a teacher-forced reference) runs
    /// instead of the arch's own; `None`: the reference dump's (its
    /// manifest's `ffn_act`), else the arch's.
    pub ffn_act: Option<crate::model::FfnAct>,
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

/// The highest step a run can have (`find --steps` allows 4096 decode
/// steps): a tensor of a step up to this that its manifest does not list
/// means the manifest is not the run's; beyond it, the name is not a step
/// and the tensor is listed as unmapped.
const MAX_LISTED_STEP: usize = 4096;

/// The canonical shape of `stage` in a step of `t` tokens after `n_past`.
fn canonical_shape(f: &FileFacts, stage: Stage, t: usize, n_past: usize) -> Vec<usize> {
    match stage {
        Stage::KProj | Stage::VProj | Stage::KRope => vec![t, f.head_dim * f.n_head_kv],
        Stage::AttnScores | Stage::AttnProbs => vec![f.n_head, t, n_past + t],
        Stage::FfnGate | Stage::FfnAct | Stage::FfnUp | Stage::FfnMul | Stage::FfnSubNorm => {
            vec![t, f.n_ff]
        }
        Stage::Logits => vec![t, f.n_vocab],
        _ => vec![t, f.n_embd],
    }
}

/// Greedy choice at the last row of a step's logits; `fed` is consistent
/// with it when its logit is the row's largest (ties either way).
fn fed_is_greedy(logits: &Tensor, n_vocab: usize, fed: u32) -> bool {
    let row = &logits.data[logits.data.len().saturating_sub(n_vocab)..];
    let best = row[metrics::argmax(row)];
    row.get(fed as usize).is_some_and(|&v| v == best)
}

/// The reference dump's stages by step, checked: names that parse to the
/// same stage are an error, shapes must be the canonical ones, tensors of
/// steps or layers the run does not have are listed as unmapped.
fn reference_stages(
    reference: &Dump,
    manifest: &Manifest,
    facts: &FileFacts,
    unmapped: &mut Vec<String>,
) -> Result<Vec<BTreeMap<StageKey, Tensor>>, RunError> {
    let bad = |what: String| {
        RunError::Input(format!(
            "the reference dump {} is not a valid capture: {what}",
            reference.path().display()
        ))
    };
    let mut by_step: Vec<BTreeMap<StageKey, Tensor>> = vec![BTreeMap::new(); manifest.steps.len()];
    let mut names: BTreeMap<(usize, StageKey), String> = BTreeMap::new();
    for name in reference.names() {
        let Some((step, key)) = parse_name(name) else {
            unmapped.push(name.to_string());
            continue;
        };
        if step >= manifest.steps.len() && step <= MAX_LISTED_STEP {
            return Err(bad(format!(
                "it holds tensor {name} of step {step}, but its manifest lists {} step(s)",
                manifest.steps.len()
            )));
        }
        if step >= manifest.steps.len() || key.layer.is_some_and(|l| l >= facts.n_layer) {
            unmapped.push(name.to_string());
            continue;
        }
        if let Some(first) = names.insert((step, key), name.to_string()) {
            return Err(bad(format!(
                "tensors {first} and {name} are both {key} of step {step}"
            )));
        }
        let s = &manifest.steps[step];
        let want = canonical_shape(facts, key.stage, s.tokens.len(), s.pos0);
        let shape = reference.shape(name).unwrap_or_default();
        if shape != want.as_slice() {
            return Err(bad(format!(
                "tensor {name} has shape {shape:?}; {key} of step {step} is {want:?}"
            )));
        }
        let t = reference
            .tensor(name)
            .map_err(|e| bad(e.to_string()))?
            .expect("listed names exist");
        by_step[step].insert(key, t);
    }
    // The tokens each step was fed are the previous step's greedy choice.
    for (i, next) in manifest.steps.iter().enumerate().skip(1) {
        if let Some(l) = by_step[i - 1].get(&StageKey::new(None, Stage::Logits)) {
            if !fed_is_greedy(l, facts.n_vocab, next.tokens[0]) {
                return Err(bad(format!(
                    "step {i} was fed token {}, but step {} chose another",
                    next.tokens[0],
                    i - 1
                )));
            }
        }
    }
    Ok(by_step)
}

/// What a candidate's dump failed, as a candidate failure.
fn dump_failed(message: String, step: Option<usize>) -> Ended {
    Ended::Candidate {
        during: "dump",
        failed: Failed::Error(CandidateError::new(message)),
        step,
        last: None,
    }
}

/// The facts the comparison runs on: the model's, checked against what
/// each manifest says; without the model, the reference manifest's,
/// checked against its tensors.
fn facts_of(
    reference: &Dump,
    manifest: &Manifest,
    oracle: Option<&Oracle>,
) -> Result<FileFacts, RunError> {
    let from_dump = manifest.model.clone();
    match (oracle, from_dump) {
        (Some(o), Some(m)) if *o.facts() != m => Err(RunError::Input(format!(
            "the reference dump {} describes another model than the one given: {}",
            reference.path().display(),
            describe_facts_difference(&m, o.facts())
        ))),
        (Some(o), _) => Ok(o.facts().clone()),
        (None, Some(m)) => {
            // Sizes a file states are checked against what it holds.
            let layers = reference
                .names()
                .filter_map(parse_name)
                .filter_map(|(_, k)| k.layer)
                .max()
                .map_or(0, |l| l + 1);
            if m.n_layer != layers || m.n_embd == 0 || m.n_head == 0 || m.n_vocab == 0 {
                return Err(RunError::Input(format!(
                    "the reference dump {}'s manifest says {} layers (n_embd {}, {} heads, vocabulary {}) but it holds tensors of {layers}",
                    reference.path().display(),
                    m.n_layer,
                    m.n_embd,
                    m.n_head,
                    m.n_vocab
                )));
            }
            Ok(m)
        }
        (None, None) => Err(RunError::Input(format!(
            "the reference dump {} does not say what model it ran (no `model` in its manifest): give --model",
            reference.path().display()
        ))),
    }
}

fn describe_facts_difference(dump: &FileFacts, file: &FileFacts) -> String {
    let d = serde_json::to_value(dump).unwrap_or_default();
    let f = serde_json::to_value(file).unwrap_or_default();
    let mut out = Vec::new();
    if let (Some(d), Some(f)) = (d.as_object(), f.as_object()) {
        for (k, dv) in d {
            if f.get(k) != Some(dv) {
                out.push(format!(
                    "{k} {} in the dump, {} in the model",
                    dv,
                    f.get(k).cloned().unwrap_or_default()
                ));
            }
        }
    }
    out.join(", ")
}

/// The scope a candidate's dump declares: its manifest's `stages`, else
/// the stages its map names, else every stage.
fn scope_of(
    candidate: &CandidateDump<'_>,
    stages: &MappedDump,
    expected: &[StageKey],
) -> Option<BTreeSet<Stage>> {
    let declared: BTreeSet<Stage> = candidate
        .manifest
        .and_then(|m| m.stages.as_ref())
        .map(|s| s.iter().copied().collect())
        .or_else(|| stages.declared.clone())?;
    // A declaration of every stage the arch has is no restriction.
    let all = expected.iter().all(|k| declared.contains(&k.stage));
    (!all).then_some(declared)
}

/// The granularity a scope allows, in words.
pub(crate) fn describe_scope(scope: &BTreeSet<Stage>) -> Scope {
    let per_layer: Vec<Stage> = scope.iter().copied().filter(|s| s.is_per_layer()).collect();
    let granularity = if scope.is_empty() {
        "tokens"
    } else if per_layer.is_empty() {
        "model"
    } else if per_layer == [Stage::LOut] {
        "layer"
    } else {
        "stage"
    };
    let note = match granularity {
        "tokens" => "judged by the tokens it chose: no intermediate tensors to localise further".to_string(),
        "model" => "judged at model granularity: only model-level stages, a bug is placed before them, not in a layer".to_string(),
        "layer" => "judged at layer granularity: a bug is placed in the layer whose output is off on its own inputs".to_string(),
        _ => format!(
            "judged at the stages it emits ({}); the oracle recomputes across the others",
            scope.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
        ),
    };
    Scope {
        stages: scope.iter().copied().collect(),
        granularity: granularity.into(),
        note,
    }
}

/// What an offline comparison found, and the model it judged with.
pub struct Compared {
    /// The outcome, as a lockstep run's.
    pub outcome: Outcome,
    /// The model file the oracle read (given, or the one the reference
    /// dump names) and its sha256, checked against both manifests.
    pub model: Option<(PathBuf, String)>,
    /// The FFN activation the oracle ran instead of the arch's own (given,
    /// or the reference dump's).
    pub ffn_act: Option<crate::model::FfnAct>,
}

/// Judges `candidate` against the `reference` dump.
pub fn compare_dumps(
    reference: &Dump,
    candidate: &CandidateDump<'_>,
    opts: &OfflineOptions,
) -> Result<Compared, RunError> {
    let t_total = Instant::now();
    let manifest = reference.manifest.as_ref().ok_or_else(|| {
        RunError::Input(format!(
            "{} has no `{}` manifest: capture the reference with `divergence capture --engine reference`",
            reference.path().display(),
            crate::dump::MANIFEST_KEY
        ))
    })?;
    manifest.check_steps().map_err(|e| {
        RunError::Input(format!(
            "the reference dump {}: {e}",
            reference.path().display()
        ))
    })?;

    // The model: given, or the one the reference dump names if it is still
    // there; its hash must be the one each dump ran.
    let named = PathBuf::from(&manifest.model_path);
    let model = opts
        .model
        .clone()
        .or_else(|| (!manifest.model_path.is_empty() && named.is_file()).then_some(named));
    let file = match &model {
        Some(p) => {
            let f = Arc::new(GgufFile::open(p)?);
            let sha = crate::receipt::sha256_file(p)
                .map_err(|e| RunError::Io(format!("hashing {}: {e}", p.display())))?;
            let dumps = [
                ("reference", Some(manifest)),
                ("candidate", candidate.manifest),
            ];
            for (side, m) in dumps {
                let Some(m) = m.filter(|m| !m.model_sha256.is_empty()) else {
                    continue;
                };
                if !m.model_sha256.eq_ignore_ascii_case(&sha) {
                    return Err(RunError::Input(format!(
                        "the {side} dump ran a model with sha256 {}, but --model {} has sha256 {sha}",
                        m.model_sha256,
                        p.display()
                    )));
                }
            }
            Some((f, sha))
        }
        None => None,
    };
    // The activation the run was told to use: given, or the reference's.
    let ffn_act = opts.ffn_act.or(manifest.ffn_act);
    if let Some((f, _)) = &file {
        crate::lockstep::ffn_act_applies(f, ffn_act)?;
    }
    let oracle = match &file {
        Some((f, _)) => Oracle::new(f.clone(), manifest.kv_type == KvType::F16)
            .map(|o| o.with_ffn_act(ffn_act))
            .map_err(|e| e.to_string()),
        None => Err(format!(
            "compare was run without --model and the reference dump's model {:?} is not there",
            manifest.model_path
        )),
    };
    let facts = facts_of(reference, manifest, oracle.as_ref().ok())?;
    let mut unmapped_reference = Vec::new();
    let ref_steps = reference_stages(reference, manifest, &facts, &mut unmapped_reference)?;

    let mut run = Run::new(
        TokenCheck::ids_given(manifest.steps[0].tokens.clone()),
        t_total,
    );
    let o = &mut run.outcome;
    o.reference_description = manifest.engine_build.clone();
    o.model = candidate.manifest.and_then(|m| m.engine_config.clone());
    o.file_facts = Some(facts.clone());
    o.model_file_size = file.as_ref().map_or(0, |(f, _)| f.file_size());
    o.recipe = file.as_ref().and_then(|(f, _)| crate::synth::recipe_of(f));
    o.candidate = CandidateInfo {
        name: candidate
            .manifest
            .map(|m| m.engine.clone())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| format!("dump {}", candidate.label)),
        build: candidate
            .manifest
            .map(|m| m.engine_build.clone())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| candidate.label.clone()),
        kv_semantics: None,
    };
    o.coverage.unmapped_reference_nodes = unmapped_reference;
    if let Err(e) = &oracle {
        o.coverage.notes.push(format!(
            "{e}: each side's local error cannot be judged, only side against side (give --model)"
        ));
    }
    if let Some(c) = &o.model {
        o.config_check = config_mismatches(c, &facts);
    }
    let result = judge_dumps(
        &mut run,
        manifest,
        &ref_steps,
        candidate,
        &facts,
        &oracle,
        file.as_ref().map(|(f, _)| f.as_ref()),
        model.as_deref(),
        opts,
    );
    let outcome = match result {
        Ok(()) => run.finish(),
        Err(e) => run.ended(e)?,
    };
    Ok(Compared {
        outcome,
        model: model.zip(file.map(|(_, sha)| sha)),
        ffn_act,
    })
}

/// The steps of the two dumps, through the one judge.
#[allow(clippy::too_many_arguments)]
fn judge_dumps(
    run: &mut Run,
    manifest: &Manifest,
    ref_steps: &[BTreeMap<StageKey, Tensor>],
    candidate: &CandidateDump<'_>,
    facts: &FileFacts,
    oracle: &Result<Oracle, String>,
    file: Option<&GgufFile>,
    model: Option<&Path>,
    opts: &OfflineOptions,
) -> Result<(), Ended> {
    let stages = candidate
        .stages
        .as_ref()
        .map_err(|why| dump_failed(format!("its dump cannot be read: {why}"), None))?;
    let cand_manifest = candidate.manifest;
    if let Some(m) = cand_manifest {
        m.check_steps()
            .map_err(|e| dump_failed(format!("its manifest: {e}"), None))?;
    }
    let cand_steps = cand_manifest.map_or(&manifest.steps, |m| &m.steps);
    let cand_kv = cand_manifest.map_or(manifest.kv_type, |m| m.kv_type);
    // Tensors of steps the run does not have, or layers the model does not
    // have, are listed: never judged, never silently dropped.
    let mut unmapped = stages.unmapped.clone();
    let mut cand_by_step: Vec<Vec<(StageKey, &Tensor)>> = vec![Vec::new(); cand_steps.len()];
    for ((step, key), t) in &stages.stages {
        let name = stages
            .sources
            .get(&(*step, *key))
            .cloned()
            .unwrap_or_default();
        if *step >= cand_steps.len() && *step <= MAX_LISTED_STEP && cand_manifest.is_some() {
            return Err(dump_failed(
                format!(
                    "it holds tensor {name} of step {step}, but its manifest lists {} step(s)",
                    cand_steps.len()
                ),
                None,
            ));
        }
        if *step >= cand_steps.len() || key.layer.is_some_and(|l| l >= facts.n_layer) {
            unmapped.push(name);
            continue;
        }
        cand_by_step[*step].push((*key, t));
    }
    for s in &mut cand_by_step {
        s.sort_by_key(|(k, _)| k.order());
    }
    if !unmapped.is_empty() {
        let shown: Vec<&str> = unmapped.iter().take(8).map(String::as_str).collect();
        run.outcome.coverage.notes.push(format!(
            "{} tensor(s) of the candidate dump map to no stage of this run: {}{}",
            unmapped.len(),
            shown.join(", "),
            if unmapped.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        ));
    }
    let expected = facts.expected_stages();
    let scope = scope_of(candidate, stages, &expected);
    if let Some(s) = &scope {
        run.outcome.coverage.scope = Some(describe_scope(s));
    }
    if cand_kv != manifest.kv_type {
        let name = |k: KvType| if k == KvType::F16 { "f16" } else { "f32" };
        run.outcome.remarks.push(format!(
            "the candidate ran with a {} KV cache, the reference dump with {}: each side is judged on its own cache type, and their drift includes the difference; for a like-with-like reference run `divergence capture --engine reference --kv {} --model M --tokens ... --out ref.safetensors`",
            name(cand_kv),
            name(manifest.kv_type),
            name(cand_kv)
        ));
    }
    // The fed tokens of the candidate's steps are its own greedy choices.
    let logits_key = StageKey::new(None, Stage::Logits);
    for (i, next) in cand_steps.iter().enumerate().skip(1) {
        if let Some((_, l)) = cand_by_step[i - 1].iter().find(|(k, _)| *k == logits_key) {
            if l.shape.last() == Some(&facts.n_vocab)
                && !fed_is_greedy(l, facts.n_vocab, next.tokens[0])
            {
                return Err(dump_failed(
                    format!(
                        "its manifest says step {i} was fed token {}, but its logits of step {} chose another",
                        next.tokens[0],
                        i - 1
                    ),
                    Some(i),
                ));
            }
        }
    }

    // The token check.
    let (ref_tokens, cand_tokens) = (
        manifest.steps[0].tokens.clone(),
        cand_steps[0].tokens.clone(),
    );
    let tokenized = manifest.prompt.is_some() || cand_manifest.is_some_and(|m| m.prompt.is_some());
    if tokenized {
        run.outcome.tokens.source = TokenSource::EachSideTokenized;
    }
    if cand_manifest.is_none() {
        run.outcome.remarks.push(
            "the candidate dump has no manifest: its token ids are taken to be the reference's (tok_embd still shows the rows it embedded)".into(),
        );
    }
    let vocab = file.and_then(|f| crate::engine::tokenizer::Tokenizer::from_gguf(f).ok());
    let mut pieces = |ids: &[u32]| -> Vec<Option<String>> {
        ids.iter()
            .map(|&id| {
                vocab
                    .as_ref()
                    .and_then(|v| v.piece(id))
                    .map(|b| String::from_utf8_lossy(b).into_owned())
            })
            .collect()
    };
    let bos = file.and_then(bos_id);
    run.check_tokens(ref_tokens, cand_tokens, bos, &mut pieces);

    // An engine that shows no tensors, only the tokens it chose.
    if cand_manifest.is_some() && stages.stages.is_empty() && stages.unmapped.is_empty() {
        let worker = match (model, &opts.worker_exe) {
            (Some(m), Some(exe)) => Some((m, exe.as_path())),
            _ => None,
        };
        return judge_choices(run, manifest, ref_steps, cand_steps, facts, worker, opts);
    }

    let oracle_ref = oracle.as_ref().map_err(String::as_str);
    let cand_oracle = oracle
        .as_ref()
        .ok()
        .map(|o| o.with_kv(cand_kv == KvType::F16));
    let oracle_cand = match &cand_oracle {
        Some(o) => Ok(o),
        None => oracle.as_ref().map_err(String::as_str),
    };
    let mut ref_track = SideTrack::new(facts.n_layer, None);
    let mut cand_track = SideTrack::new(facts.n_layer, scope.clone());
    for (i, rstep) in manifest.steps.iter().enumerate() {
        let ref_stages = &ref_steps[i];
        let ref_keys: BTreeSet<StageKey> = ref_stages.keys().copied().collect();
        let Some(cstep) = cand_steps.get(i) else {
            run.absorb(
                &opts.policy,
                StepJudged {
                    step: i,
                    pos0: rstep.pos0,
                    n_tokens: rstep.tokens.len(),
                    judged: vec![],
                    expected: &expected,
                    reference: &ref_keys,
                    emitted: &[],
                    scope: scope.as_ref(),
                    pairing: Pairing::OwnInputs,
                    keep_going: opts.keep_going,
                },
            );
            continue;
        };
        let mut judge = StepJudge::new(
            &opts.policy,
            Pairing::OwnInputs,
            facts.n_vocab,
            (oracle_ref, oracle_cand),
            ref_stages,
            (&mut ref_track, &mut cand_track),
            StepInput {
                tokens: &rstep.tokens,
                n_past: rstep.pos0,
            },
            StepInput {
                tokens: &cstep.tokens,
                n_past: cstep.pos0,
            },
        )
        .keep_going(opts.keep_going);
        for (key, t) in &cand_by_step[i] {
            let name = stages.sources.get(&(i, *key)).cloned().unwrap_or_default();
            let want = canonical_shape(facts, key.stage, cstep.tokens.len(), cstep.pos0);
            let last_row_logits =
                key.stage == Stage::Logits && t.shape == [1, facts.n_vocab] && want[0] > 1;
            let token_shift = key.stage == Stage::TokEmbd && !run.outcome.tokens.equal;
            if t.shape != want && !last_row_logits && !token_shift {
                return Err(dump_failed(
                    format!(
                        "tensor {name} (its {key} of step {i}) has shape {:?}; the canonical layout of {} here is {want:?}",
                        t.shape, key.stage
                    ),
                    Some(i),
                ));
            }
            let mut data = t.data.clone();
            if stages.mask_future.contains(&(i, *key)) {
                mask_future(&mut data, &t.shape, cstep.pos0);
            }
            judge.judge(*key, &t.shape, &mut data);
        }
        let emitted = std::mem::take(&mut judge.emitted);
        let (judged, compare_s) = judge.finish();
        run.outcome.timings.compare_s += compare_s;
        run.absorb(
            &opts.policy,
            StepJudged {
                step: i,
                pos0: rstep.pos0,
                n_tokens: rstep.tokens.len(),
                judged,
                expected: &expected,
                reference: &ref_keys,
                emitted: &emitted,
                scope: scope.as_ref(),
                pairing: Pairing::OwnInputs,
                keep_going: opts.keep_going,
            },
        );
        run.outcome.steps_run = i + 1;
        // The greedy tokens each run chose are the next step's inputs.
        if let Some(next) = manifest.steps.get(i + 1) {
            let r = next.tokens[0];
            let c = cand_steps.get(i + 1).map_or(r, |s| s.tokens[0]);
            run.record_choices(i, r, c, true);
            if r != c {
                let d = run.outcome.drift.get_or_insert_with(Drift::default);
                d.fed_different_tokens_from.get_or_insert(i + 1);
            }
        }
        if run.outcome.first_divergence.is_some() && !opts.keep_going {
            break;
        }
    }
    Ok(())
}

/// Zeroes the future-key entries of an attention matrix [H, T, K] of a
/// step starting at `pos0`.
fn mask_future(data: &mut [f32], shape: &[usize], pos0: usize) {
    let [h, t, k] = shape else { return };
    for head in 0..*h {
        for ti in 0..*t {
            let row = &mut data[(head * t + ti) * k..(head * t + ti + 1) * k];
            for v in row.iter_mut().skip(pos0 + ti + 1) {
                *v = 0.0;
            }
        }
    }
}

/// bitnet.cpp fed the candidate's own tokens, one step at a time, as it
/// would have generated them (teacher forcing): started when first needed.
struct TeacherForced {
    worker: Worker,
    /// Steps of the candidate fed so far, and the next position.
    fed: usize,
    pos: usize,
    /// The logits of the last position fed.
    last: Vec<f32>,
}

/// A dump with tokens and no tensors: each token the candidate chose is
/// judged by the reference's logits on the candidate's own history. A token
/// the reference ranks first agrees; one within the policy's tie gap of the
/// top-1 is a near-tie flip, recorded; one beyond it is the divergence.
#[allow(clippy::too_many_arguments)]
fn judge_choices(
    run: &mut Run,
    manifest: &Manifest,
    ref_steps: &[BTreeMap<StageKey, Tensor>],
    cand_steps: &[crate::dump::DumpStep],
    facts: &FileFacts,
    worker: Option<(&Path, &Path)>,
    opts: &OfflineOptions,
) -> Result<(), Ended> {
    let margin = opts.policy.local.choices.max_tie_gap;
    run.outcome.coverage.scope = Some(Scope {
        stages: vec![],
        granularity: "tokens".into(),
        note: "tokens only: each token the candidate chose is judged by bitnet.cpp's logits on the candidate's own history (teacher forcing); there are no intermediate tensors to localise further".into(),
    });
    let n_vocab = facts.n_vocab;
    let logits_key = StageKey::new(None, Stage::Logits);
    let mut same_history = true;
    let mut forced: Option<TeacherForced> = None;
    for i in 1..cand_steps.len() {
        let step = i - 1;
        let chosen = cand_steps[i].tokens[0];
        let dumped = ref_steps
            .get(step)
            .and_then(|m| m.get(&logits_key))
            .filter(|t| t.data.len() >= n_vocab && n_vocab > 0);
        let row: Vec<f32> = match dumped {
            Some(t) if same_history => t.data[t.data.len() - n_vocab..].to_vec(),
            _ => {
                let Some((model, exe)) = worker else {
                    run.outcome.coverage.notes.push(format!(
                        "the candidate's tokens leave the reference dump's path after step {}: its later choices need bitnet.cpp run on them, which this comparison could not start (no model or worker)",
                        step.saturating_sub(1)
                    ));
                    return Ok(());
                };
                if forced.is_none() {
                    let n_ctx = cand_steps.iter().map(|s| s.tokens.len()).sum::<usize>() + 1;
                    let ctx = ContextOptions {
                        threads: manifest.threads.max(1),
                        kv_type: manifest.kv_type,
                        n_ctx,
                        n_batch: n_ctx,
                    };
                    let filter = CaptureFilter {
                        off: true,
                        ..CaptureFilter::default()
                    };
                    let act = opts.ffn_act.or(manifest.ffn_act);
                    let w = Worker::start_with(exe, model, &ctx, filter, act)
                        .map_err(Ended::Reference)?;
                    forced = Some(TeacherForced {
                        worker: w,
                        fed: 0,
                        pos: 0,
                        last: vec![],
                    });
                }
                let f = forced.as_mut().expect("started above");
                while f.fed <= step {
                    let batch = &cand_steps[f.fed].tokens;
                    let (logits, _, _) = f.worker.decode(batch, f.pos).map_err(Ended::Reference)?;
                    f.pos += batch.len();
                    f.fed += 1;
                    f.last = logits[logits.len().saturating_sub(n_vocab)..].to_vec();
                }
                f.last.clone()
            }
        };
        if (chosen as usize) >= row.len() {
            return Err(dump_failed(
                format!("its manifest says it chose token {chosen} at step {step}, outside the vocabulary of {n_vocab}"),
                Some(i),
            ));
        }
        let top1 = metrics::argmax(&row) as u32;
        run.record_choices(step, top1, chosen, true);
        let figures = choice_figures(&row, chosen);
        same_history &= manifest.steps.get(i).is_some_and(|s| s.tokens[0] == chosen);
        if figures.rank == 0 {
            continue;
        }
        let pieces = format!(
            "token {chosen} where the reference's top-1 is {top1}: the reference ranks it {} (0 = top), {:.4} below the top-1 logit, probability {:.3e}",
            figures.rank, figures.gap, figures.probability
        );
        if f64::from(figures.gap) <= margin {
            run.outcome.remarks.push(format!(
                "step {step}: a near-tie flip, not a divergence: the candidate chose {pieces} (within the policy's tie gap {margin})"
            ));
            continue;
        }
        let s = &cand_steps[step];
        let div = Divergence {
            step,
            positions: (s.pos0..s.pos0 + s.tokens.len()).collect(),
            position: s.pos0 + s.tokens.len() - 1,
            layer: None,
            stage: Stage::Logits,
            shape: vec![n_vocab],
            measured: Measured::Choice,
            bound: None,
            candidate_local: None,
            reference_local: None,
            rule: opts.policy.rule(Stage::Logits, false).clone(),
            metrics: None,
            worst: vec![],
            blame: BlameReport {
                blame: Blame::Candidate,
                reference_nmse_vs_oracle: None,
                candidate_nmse_vs_oracle: None,
                reference_error_over_rounding: None,
                candidate_error_over_rounding: None,
                reason: format!(
                    "tokens only: the first wrong token is at step {step}: the candidate chose {pieces}, beyond the policy's tie gap {margin}; no intermediate tensors to localise further"
                ),
                cause: None,
            },
        };
        run.outcome.record_divergence(step, div);
        if !opts.keep_going {
            break;
        }
    }
    Ok(())
}

/// Where a chosen token stands under a row of logits.
struct ChoiceFigures {
    /// Tokens with a strictly larger logit (0: the top-1, ties included).
    rank: usize,
    /// The top-1 logit minus the chosen token's.
    gap: f32,
    /// The chosen token's softmax probability.
    probability: f64,
}

fn choice_figures(row: &[f32], chosen: u32) -> ChoiceFigures {
    let mine = row[chosen as usize];
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
    ChoiceFigures {
        rank: row.iter().filter(|&&v| v > mine).count(),
        gap: max - mine,
        probability: f64::from(mine - max).exp() / sum,
    }
}
