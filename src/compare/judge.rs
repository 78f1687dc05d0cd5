//! The one judge. `find` (resync or free), `compare` (two dumps) and
//! `sweep` all decide through it: stages and inputs in, verdicts out.
//!
//! Each side is judged on its *local* error: its stage against the f64
//! oracle recomputed from that side's own inputs (its previous stages of the
//! step, its own K and V history; `compare::local`). The first stage where a
//! side is measurably beyond rounding is where a divergence is born, and that
//! side is the one to blame: the candidate for its bugs, the reference for
//! its own (the SiLU switch, the unaligned rows). The two sides' values are
//! also compared with each other: in resync, on the same inputs, that is
//! their agreement; when each fed itself it is the drift, reported with its
//! growth and never the divergence by itself.
//!
//! A side that does not emit every stage (a dump of layer outputs, an
//! engine with fused attention) is judged at the granularity it allows: the
//! oracle recomputes the stages it skips from its nearest own tensors, and a
//! stage reached that way is held to the policy's `across_gap` bound.
//!
//! [`StepJudge`] is a [`TraceSink`]: `find` runs the candidate's forward pass
//! into it (in resync it hands the reference's tensor back after judging, so
//! the engine continues from the reference's values), `compare` feeds it a
//! dump's tensors in execution order. [`SideTrack`] carries each side's KV
//! history from step to step.

use super::local::{self, Bound, LocalError};
use super::metrics::{self, Metrics, WorstElement};
use super::policy::{self, Class, Policy};
use super::{Blame, BlameReport};
use crate::oracle::{Oracle, OracleInputs, OracleStage};
use crate::trace::{Stage, StageKey, Tensor, TraceSink};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// How many top tokens the logit metrics compare.
pub const TOP_K: usize = 5;
/// How many worst elements a divergence lists.
pub const WORST_K: usize = 8;

/// Which engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// bitnet.cpp.
    Reference,
    /// The engine under test.
    Candidate,
}

/// One side's evidence carried from step to step: what it emits, and the
/// K and V rows its cache holds.
#[derive(Clone, Debug)]
pub struct SideTrack {
    /// The stages this side emits; `None`: every stage of the arch.
    pub scope: Option<BTreeSet<Stage>>,
    /// Per layer, the K rows and V rows of the steps before this one, as
    /// the side's cache holds them ([positions, n_embd_kv] each).
    history: Vec<(Vec<f32>, Vec<f32>)>,
}

impl SideTrack {
    /// A side at position 0 of a model with `n_layer` layers.
    pub fn new(n_layer: usize, scope: Option<BTreeSet<Stage>>) -> SideTrack {
        SideTrack {
            scope,
            history: vec![(Vec::new(), Vec::new()); n_layer],
        }
    }

    /// Whether the side emits `stage`.
    pub fn emits(&self, stage: Stage) -> bool {
        self.scope.as_ref().is_none_or(|s| s.contains(&stage))
    }

    /// Whether the side's K/V history must be kept: a stage it emits at or
    /// after the attention reads it, or the model-level stages it emits are
    /// reached through whole layers it does not emit. Where the side does
    /// not emit K or V, the oracle's rows stand in for them.
    fn needs_history(&self) -> bool {
        let attention = StageKey::new(Some(0), Stage::AttnScores).order();
        match &self.scope {
            None => true,
            Some(s) => {
                s.iter()
                    .any(|&st| st.is_per_layer() && StageKey::new(Some(0), st).order() >= attention)
                    || (s
                        .iter()
                        .any(|&st| !st.is_per_layer() && st != Stage::TokEmbd)
                        && !s.contains(&Stage::LOut))
            }
        }
    }
}

/// The judgement of one stage of one step.
#[derive(Clone, Debug)]
pub struct StageJudgement {
    /// Which stage.
    pub key: StageKey,
    /// The canonical shape (the reference's, else the candidate's).
    pub shape: Vec<usize>,
    /// The candidate's local error; `None`: it did not emit the stage;
    /// `Err`: the oracle could not recompute it (why).
    pub candidate: Option<Result<LocalError, String>>,
    /// The reference's local error, the same way.
    pub reference: Option<Result<LocalError, String>>,
    /// The two sides against each other (both emitted the stage).
    pub sides: Option<Metrics>,
    /// The side-against-side rule's class.
    pub class: Class,
    /// The two sides within the side-against-side rule.
    pub agree: bool,
    /// No side beyond its local rule (or, where the oracle could not judge,
    /// the sides agree).
    pub pass: bool,
    /// For a failing stage: the evidence a divergence is written from.
    pub evidence: Option<Box<Evidence>>,
}

/// The tensors behind a failing stage.
#[derive(Clone, Debug)]
pub struct Evidence {
    /// The reference's values.
    pub reference: Option<Vec<f32>>,
    /// The candidate's values.
    pub candidate: Option<Vec<f32>>,
    /// The candidate's shape, when it differs from the reference's.
    pub candidate_shape: Option<Vec<usize>>,
    /// The oracle on the blamed side's inputs.
    pub oracle: Option<Vec<f64>>,
    /// Which side the oracle values belong to.
    pub oracle_side: Option<Side>,
    /// Blame, with the numbers.
    pub blame: BlameReport,
}

/// Which side-against-side rules apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pairing {
    /// Both sides ran on the same inputs (resync): the `resync` rules.
    SameInputs,
    /// Each side fed itself: the `free_run` (drift) rules.
    OwnInputs,
}

/// One side's tensors of the current step, as the oracle reads them.
struct View<'v> {
    /// What the side emitted (or, in resync, continued from).
    own: &'v BTreeMap<StageKey, Tensor>,
    /// Where `own` has nothing: the reference's step (resync).
    fallback: Option<&'v BTreeMap<StageKey, Tensor>>,
    /// Stages the oracle recomputed for this side.
    chain: &'v BTreeMap<StageKey, Chained>,
    history: &'v [(Vec<f32>, Vec<f32>)],
    tokens: &'v [u32],
    n_past: usize,
}

/// A stage the oracle recomputed because a side did not emit it, and the
/// stages recomputed to reach it (itself included).
#[derive(Clone, Debug)]
struct Chained {
    data: Vec<f32>,
    span: Vec<StageKey>,
}

impl View<'_> {
    fn get(&self, key: &StageKey) -> Option<&[f32]> {
        self.own
            .get(key)
            .or_else(|| self.fallback.and_then(|f| f.get(key)))
            .map(|t| t.data.as_slice())
            .or_else(|| self.chain.get(key).map(|c| c.data.as_slice()))
    }
}

impl OracleInputs for View<'_> {
    fn current(&self, layer: Option<usize>, stage: Stage) -> Option<&[f32]> {
        self.get(&StageKey::new(layer, stage))
    }

    fn kv_history(&self, layer: usize, stage: Stage) -> Option<Vec<f32>> {
        let (k, v) = self.history.get(layer)?;
        let past = match stage {
            Stage::KRope => k,
            Stage::VProj => v,
            _ => return None,
        };
        let now = self.current(Some(layer), stage)?;
        let mut all = Vec::with_capacity(past.len() + now.len());
        all.extend_from_slice(past);
        all.extend_from_slice(now);
        Some(all)
    }

    fn tokens(&self) -> &[u32] {
        self.tokens
    }

    fn n_past(&self) -> usize {
        self.n_past
    }
}

/// A side's oracle and the stages recomputed to feed it, or why there is
/// none.
type Prepared<'a> = Result<(&'a Oracle, Vec<StageKey>), String>;

/// One side's state within a step.
struct SideStep {
    own: BTreeMap<StageKey, Tensor>,
    chain: BTreeMap<StageKey, Chained>,
    tokens: Vec<u32>,
    n_past: usize,
}

/// Judges one step of both sides (see the module docs).
pub struct StepJudge<'a> {
    policy: &'a Policy,
    pairing: Pairing,
    resync: bool,
    stop_at_first: bool,
    stopped: bool,
    n_vocab: usize,
    reference_oracle: Result<&'a Oracle, &'a str>,
    candidate_oracle: Result<&'a Oracle, &'a str>,
    /// The reference's tensors of the step (it always emits every stage).
    reference: &'a BTreeMap<StageKey, Tensor>,
    ref_track: &'a mut SideTrack,
    cand_track: &'a mut SideTrack,
    ref_step: SideStep,
    cand_step: SideStep,
    /// The candidate's history is bit for bit the reference's (resync with
    /// a cache that holds the sink's values): one oracle serves both.
    same_history: bool,
    /// Resync with a candidate whose cache keeps its own K and V
    /// (`KvSemantics::CachesOwnValues`): its own rows, kept for its history.
    kv_own: Option<BTreeMap<StageKey, Vec<f32>>>,
    judged_reference: BTreeSet<StageKey>,
    /// Every stage judged, in the order judged.
    pub judged: Vec<StageJudgement>,
    /// Every stage the candidate emitted, in order (judged or not).
    pub emitted: Vec<StageKey>,
    /// Seconds spent judging.
    pub compare_s: f64,
}

/// What a step of a side is fed.
pub struct StepInput<'t> {
    /// The step's token ids.
    pub tokens: &'t [u32],
    /// Positions cached before the step.
    pub n_past: usize,
}

impl<'a> StepJudge<'a> {
    /// A judge of one step. `reference` is the reference's step; each
    /// side's oracle reads the model with that side's KV type (or why there
    /// is none); the tracks carry the sides' histories.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        policy: &'a Policy,
        pairing: Pairing,
        n_vocab: usize,
        oracles: (Result<&'a Oracle, &'a str>, Result<&'a Oracle, &'a str>),
        reference: &'a BTreeMap<StageKey, Tensor>,
        tracks: (&'a mut SideTrack, &'a mut SideTrack),
        ref_input: StepInput<'_>,
        cand_input: StepInput<'_>,
    ) -> StepJudge<'a> {
        let same_history = tracks.0.history == tracks.1.history;
        StepJudge {
            policy,
            pairing,
            resync: false,
            stop_at_first: true,
            stopped: false,
            n_vocab,
            reference_oracle: oracles.0,
            candidate_oracle: oracles.1,
            reference,
            ref_track: tracks.0,
            cand_track: tracks.1,
            ref_step: SideStep {
                own: BTreeMap::new(),
                chain: BTreeMap::new(),
                tokens: ref_input.tokens.to_vec(),
                n_past: ref_input.n_past,
            },
            cand_step: SideStep {
                own: BTreeMap::new(),
                chain: BTreeMap::new(),
                tokens: cand_input.tokens.to_vec(),
                n_past: cand_input.n_past,
            },
            same_history,
            kv_own: None,
            judged_reference: BTreeSet::new(),
            judged: Vec::new(),
            emitted: Vec::new(),
            compare_s: 0.0,
        }
    }

    /// Hand the reference's values back after each stage (resync): the
    /// candidate then continues from them.
    pub fn resync(mut self, on: bool) -> Self {
        self.resync = on;
        self
    }

    /// The candidate's KV cache keeps its own K and V whatever the sink
    /// writes (`KvSemantics::CachesOwnValues`): in resync its history is its
    /// own rows, not the reference's.
    pub fn caches_own_values(mut self, on: bool) -> Self {
        self.kv_own = on.then(BTreeMap::new);
        self
    }

    /// Keep judging after the first failing stage.
    pub fn keep_going(mut self, on: bool) -> Self {
        self.stop_at_first = !on;
        self
    }

    /// The last stage the candidate reached.
    pub fn last_stage(&self) -> Option<StageKey> {
        self.emitted.last().copied()
    }

    /// Judges one stage the candidate emitted (`data` in `shape`); in
    /// resync mode `data` is then overwritten with the reference's values.
    pub fn judge(&mut self, key: StageKey, shape: &[usize], data: &mut [f32]) {
        let t = Instant::now();
        self.emitted.push(key);
        let reference = self.reference.get(&key);
        let same_shape = reference.is_some_and(|r| r.shape == shape);
        if !self.stopped {
            let j = self.judge_both(key, shape, data);
            let failed = !j.pass;
            self.judged.push(j);
            if failed && self.stop_at_first {
                self.stopped = true;
            }
        }
        // What the candidate continues from: its own values, or in resync
        // the reference's (then its inputs are the reference's).
        if self.resync && same_shape {
            if let Some(own) = self.kv_own.as_mut() {
                if matches!(key.stage, Stage::KRope | Stage::VProj) {
                    own.insert(key, data.to_vec());
                }
            }
            data.copy_from_slice(&reference.expect("same shape").data);
        } else {
            self.prune(key);
            self.cand_step
                .own
                .insert(key, Tensor::new(shape.to_vec(), data.to_vec()));
        }
        self.compare_s += t.elapsed().as_secs_f64();
    }

    /// Drops tensors no later stage of the step reads (earlier layers'
    /// intermediate stages), keeping layer outputs and K/V rows.
    fn prune(&mut self, key: StageKey) {
        let Some(l) = key.layer else { return };
        if l < 2 {
            return;
        }
        self.cand_step.own.retain(|k, _| {
            k.layer.is_none_or(|kl| kl + 1 >= l)
                || matches!(k.stage, Stage::LOut | Stage::KRope | Stage::VProj)
        });
    }

    /// Judges every reference stage the candidate did not emit (up to the
    /// first failure unless keep-going), sorts the judgements in execution
    /// order, appends each side's K and V rows to its history and returns
    /// the step's judgements.
    pub fn finish(mut self) -> (Vec<StageJudgement>, f64) {
        let t = Instant::now();
        let mut rest: Vec<StageKey> = self
            .reference
            .keys()
            .filter(|k| !self.judged_reference.contains(k) && !self.emitted.contains(k))
            .copied()
            .collect();
        rest.sort_by_key(|k| k.order());
        let first_fail = self
            .judged
            .iter()
            .filter(|j| !j.pass)
            .map(|j| j.key.order())
            .min();
        for key in rest {
            if self.stop_at_first && first_fail.is_some_and(|f| key.order() > f) {
                continue;
            }
            let j = self.judge_reference_only(key);
            self.judged.push(j);
        }
        self.judged.sort_by_key(|j| j.key.order());
        if self.stop_at_first {
            if let Some(i) = self.judged.iter().position(|j| !j.pass) {
                self.judged.truncate(i + 1);
            }
        }
        self.extend_histories();
        self.compare_s += t.elapsed().as_secs_f64();
        (self.judged, self.compare_s)
    }

    /// A stage only the reference has (the candidate did not emit it).
    fn judge_reference_only(&mut self, key: StageKey) -> StageJudgement {
        let r = &self.reference[&key];
        let (reference, ref_oracle) = self.local_of(Side::Reference, key, &r.shape, &r.data, false);
        self.judged_reference.insert(key);
        let class = self.side_rule(key.stage).class;
        // Without an oracle (`Err`) there is nothing to hold it to here.
        let pass = !matches!(&reference, Some(Ok(e)) if !e.pass);
        let mut j = StageJudgement {
            key,
            shape: r.shape.clone(),
            candidate: None,
            reference,
            sides: None,
            class,
            agree: true,
            pass,
            evidence: None,
        };
        if !pass {
            j.evidence = Some(Box::new(self.evidence(&j, None, None, ref_oracle, None)));
        }
        j
    }

    fn side_rule(&self, stage: Stage) -> &'a policy::Rule {
        self.policy.rule(stage, self.pairing == Pairing::OwnInputs)
    }

    /// Both sides' local errors, their agreement, and the verdict.
    fn judge_both(&mut self, key: StageKey, shape: &[usize], data: &[f32]) -> StageJudgement {
        let rule = self.side_rule(key.stage);
        let reference = self.reference.get(&key);
        // An engine that gives only the last position's logits ([1, V] of
        // a longer step) is judged on that row.
        let last_row = key.stage == Stage::Logits
            && shape.first() == Some(&1)
            && reference.is_some_and(|r| {
                r.shape.first().is_some_and(|&t| t > 1) && r.shape[1..] == shape[1..]
            });
        let reference_row = |r: &'a Tensor| -> std::borrow::Cow<'a, [f32]> {
            if last_row {
                std::borrow::Cow::Borrowed(&r.data[r.data.len() - data.len()..])
            } else {
                std::borrow::Cow::Borrowed(&r.data)
            }
        };
        let n_vocab = self.n_vocab;
        let sides_of = || {
            reference.map(|r| {
                if r.shape == shape || last_row {
                    let rd = reference_row(r);
                    let mut m = metrics::compute(&rd, data, rule.atol, rule.rtol);
                    if key.stage == Stage::Logits {
                        m.logits = Some(metrics::logit_metrics(&rd, data, n_vocab, TOP_K));
                    }
                    m
                } else {
                    metrics::shape_mismatch(&r.shape, shape)
                }
            })
        };
        // In resync with identical histories the candidate's inputs are the
        // reference's: the same oracle values judge it.
        let reuse = self.resync && self.same_history && reference.is_some_and(|r| r.shape == shape);
        // Each side's inputs made available first (usually all its own);
        // then the sides against each other (one thread) while both
        // oracles recompute the stage (all of them), so that one side's
        // serial parts overlap the other's parallel ones.
        let ref_prepared = reference.map(|_| {
            self.judged_reference.insert(key);
            self.prepare(Side::Reference, key)
        });
        let cand_prepared = (!reuse).then(|| self.prepare(Side::Candidate, key));
        let this = &*self;
        let ((sides, (ref_local, ref_oracle)), cand_own) = rayon::join(
            || {
                rayon::join(sides_of, || match (reference, ref_prepared) {
                    (Some(r), Some(p)) => {
                        this.evaluate(Side::Reference, key, &r.shape, &r.data, false, p)
                    }
                    _ => (None, None),
                })
            },
            || cand_prepared.map(|p| this.evaluate(Side::Candidate, key, shape, data, last_row, p)),
        );
        let agree = sides.as_ref().is_none_or(|m| policy::passes(rule, m));
        // The candidate's oracle values: its own, or (reused) the reference's.
        let reused = reuse && ref_oracle.is_some();
        let (cand_local, cand_oracle) = if let Some(own) = cand_own {
            own
        } else if reused {
            // Bit-identical values on the same oracle measure the same.
            let identical = reference.is_some_and(|r| bit_identical(&r.data, data));
            let e = match (&ref_local, identical) {
                (Some(Ok(e)), true) => e.clone(),
                _ => self.measure(
                    key,
                    shape,
                    data,
                    ref_oracle.as_ref().expect("checked"),
                    vec![],
                ),
            };
            (Some(Ok(e)), None)
        } else {
            self.local_of(Side::Candidate, key, shape, data, last_row)
        };
        let local_ok = |l: &Option<Result<LocalError, String>>| match l {
            None => true,
            Some(Ok(e)) => e.pass,
            Some(Err(_)) => true,
        };
        let undetermined = matches!(cand_local, Some(Err(_))) || matches!(ref_local, Some(Err(_)));
        let shapes_differ = reference.is_some_and(|r| r.shape != shape) && !last_row;
        let pass = local_ok(&cand_local)
            && local_ok(&ref_local)
            && (!undetermined || agree)
            && !shapes_differ;
        let mut j = StageJudgement {
            key,
            shape: reference.map_or_else(|| shape.to_vec(), |r| r.shape.clone()),
            candidate: cand_local,
            reference: ref_local,
            sides,
            class: rule.class,
            agree,
            pass,
            evidence: None,
        };
        if !pass {
            let cand_shape = shapes_differ.then(|| shape.to_vec());
            let cand_oracle = if reused {
                ref_oracle.clone()
            } else {
                cand_oracle
            };
            j.evidence = Some(Box::new(self.evidence(
                &j,
                Some(data),
                cand_shape,
                ref_oracle,
                cand_oracle,
            )));
        }
        j
    }

    /// A side's local error at `key` on its own inputs: the oracle's
    /// recomputation (filling in stages the side did not emit), measured.
    /// `None` when the side's oracle is unavailable is never returned: the
    /// reason is the `Err`.
    fn local_of(
        &mut self,
        side: Side,
        key: StageKey,
        shape: &[usize],
        data: &[f32],
        last_row: bool,
    ) -> (Option<Result<LocalError, String>>, Option<OracleStage>) {
        let prepared = self.prepare(side, key);
        self.evaluate(side, key, shape, data, last_row, prepared)
    }

    /// The side's oracle, with every input of `key` made available to it
    /// (`fill_inputs`) and the stages recomputed on the way; or why not.
    fn prepare(&mut self, side: Side, key: StageKey) -> Prepared<'a> {
        let oracle = match side {
            Side::Reference => self.reference_oracle,
            Side::Candidate => self.candidate_oracle,
        }
        .map_err(str::to_string)?;
        let span = self.fill_inputs(side, oracle, key)?;
        Ok((oracle, span))
    }

    /// [`StepJudge::local_of`] once the inputs are prepared: the stage
    /// recomputed on them, and the side measured against it.
    fn evaluate(
        &self,
        side: Side,
        key: StageKey,
        shape: &[usize],
        data: &[f32],
        last_row: bool,
        prepared: Prepared<'a>,
    ) -> (Option<Result<LocalError, String>>, Option<OracleStage>) {
        let (oracle, span) = match prepared {
            Ok(p) => p,
            Err(why) => return (Some(Err(why)), None),
        };
        let recomputed = {
            let view = self.view(side);
            oracle.recompute(key.layer, key.stage, &view)
        };
        match recomputed {
            Ok(o) => {
                let o = if last_row { o.last_rows(data.len()) } else { o };
                let e = self.measure(key, shape, data, &o, span);
                (Some(Ok(e)), Some(o))
            }
            Err(why) => (Some(Err(why)), None),
        }
    }

    fn measure(
        &self,
        key: StageKey,
        shape: &[usize],
        data: &[f32],
        o: &OracleStage,
        span: Vec<StageKey>,
    ) -> LocalError {
        let bound = if span.is_empty() {
            Bound::OverRounding(self.policy.local_rule(key.stage).max_over_rounding)
        } else {
            Bound::Nmse(self.policy.local.across_gap.max_nmse)
        };
        // The oracle's logits are the step's last position only.
        if key.stage == Stage::Logits && o.values.len() < data.len() && !o.values.is_empty() {
            let n = o.values.len();
            let skipped_rows = (data.len() - n) / n;
            let mut row_shape = shape.to_vec();
            if let Some(t) = row_shape.first_mut() {
                *t = 1;
            }
            let mut e = local::measure(
                key.stage,
                &row_shape,
                &data[data.len() - n..],
                o,
                bound,
                span,
            );
            e.first_row_beyond = e.first_row_beyond.map(|r| r + skipped_rows);
            return e;
        }
        local::measure(key.stage, shape, data, o, bound, span)
    }

    fn view(&self, side: Side) -> View<'_> {
        let (step, track) = match side {
            Side::Reference => (&self.ref_step, &*self.ref_track),
            Side::Candidate => (&self.cand_step, &*self.cand_track),
        };
        let fallback = match side {
            Side::Reference => Some(self.reference),
            Side::Candidate if self.resync => Some(self.reference),
            Side::Candidate => None,
        };
        View {
            own: &step.own,
            fallback,
            chain: &step.chain,
            history: &track.history,
            tokens: &step.tokens,
            n_past: step.n_past,
        }
    }

    /// Makes every input of `key` available to the side's oracle,
    /// recomputing those the side did not emit; returns the stages
    /// recomputed on the way (empty: all inputs are the side's own).
    fn fill_inputs(
        &mut self,
        side: Side,
        oracle: &Oracle,
        key: StageKey,
    ) -> Result<Vec<StageKey>, String> {
        let mut span: Vec<StageKey> = Vec::new();
        for dep in oracle.inputs_of(key.layer, key.stage) {
            let available = self.view(side).get(&dep).is_some();
            if available {
                let step = match side {
                    Side::Reference => &self.ref_step,
                    Side::Candidate => &self.cand_step,
                };
                if let Some(c) = step.chain.get(&dep) {
                    span.extend(c.span.iter().copied());
                }
                continue;
            }
            let inner = self.fill_inputs(side, oracle, dep)?;
            let computed = {
                let view = self.view(side);
                oracle.recompute(dep.layer, dep.stage, &view)
            }
            .map_err(|e| format!("recomputing {dep} the side did not emit: {e}"))?;
            let mut dep_span = inner;
            dep_span.push(dep);
            span.extend(dep_span.iter().copied());
            let step = match side {
                Side::Reference => &mut self.ref_step,
                Side::Candidate => &mut self.cand_step,
            };
            step.chain.insert(
                dep,
                Chained {
                    data: computed.as_f32(),
                    span: dep_span,
                },
            );
        }
        span.sort_by_key(|k| k.order());
        span.dedup();
        Ok(span)
    }

    /// Appends this step's K and V rows of each layer to each side's
    /// history: what its cache now holds (its own rows, the reference's in
    /// resync when the candidate caches the sink's values, or the oracle's
    /// where the side does not emit them).
    fn extend_histories(&mut self) {
        let n_layer = self.ref_track.history.len();
        for side in [Side::Reference, Side::Candidate] {
            let oracle = match side {
                Side::Reference => self.reference_oracle,
                Side::Candidate => self.candidate_oracle,
            };
            for l in 0..n_layer {
                let track = match side {
                    Side::Reference => &*self.ref_track,
                    Side::Candidate => &*self.cand_track,
                };
                if !track.needs_history() {
                    continue;
                }
                let mut rows: [Option<Vec<f32>>; 2] = [None, None];
                for (i, stage) in [Stage::KRope, Stage::VProj].into_iter().enumerate() {
                    let key = StageKey::new(Some(l), stage);
                    let kept = match (side, &self.kv_own) {
                        (Side::Candidate, Some(own)) => own.get(&key).cloned(),
                        _ => None,
                    };
                    if kept.is_some() {
                        rows[i] = kept;
                        continue;
                    }
                    if let Some(d) = self.view(side).get(&key) {
                        rows[i] = Some(d.to_vec());
                        continue;
                    }
                    let Ok(o) = oracle else { continue };
                    if self.fill_inputs(side, o, key).is_err() {
                        continue;
                    }
                    let computed = {
                        let view = self.view(side);
                        o.recompute(key.layer, key.stage, &view)
                    };
                    if let Ok(c) = computed {
                        rows[i] = Some(c.as_f32());
                    }
                }
                let track = match side {
                    Side::Reference => &mut *self.ref_track,
                    Side::Candidate => &mut *self.cand_track,
                };
                let [k, v] = rows;
                if let Some(k) = k {
                    track.history[l].0.extend_from_slice(&k);
                }
                if let Some(v) = v {
                    track.history[l].1.extend_from_slice(&v);
                }
            }
        }
    }

    /// The evidence of a failing stage: the values, the oracle of the blamed
    /// side, and the blame with its numbers.
    fn evidence(
        &self,
        j: &StageJudgement,
        candidate: Option<&[f32]>,
        candidate_shape: Option<Vec<usize>>,
        ref_oracle: Option<OracleStage>,
        cand_oracle: Option<OracleStage>,
    ) -> Evidence {
        let failed = |l: &Option<Result<LocalError, String>>| matches!(l, Some(Ok(e)) if !e.pass);
        let (c_off, r_off) = (failed(&j.candidate), failed(&j.reference));
        let blame = match (c_off, r_off) {
            (true, false) => Blame::Candidate,
            (false, true) => Blame::Reference,
            (true, true) => Blame::Both,
            (false, false) => Blame::Undetermined,
        };
        let of = |l: &Option<Result<LocalError, String>>| match l {
            Some(Ok(e)) => Some(e.clone()),
            _ => None,
        };
        let (ce, re) = (of(&j.candidate), of(&j.reference));
        let side_text = |name: &str, l: &Option<Result<LocalError, String>>| match l {
            None => format!("{name} did not emit it"),
            Some(Err(why)) => format!("{name}: the oracle cannot recompute it ({why})"),
            Some(Ok(e)) if e.recomputed.is_empty() => format!(
                "{name} {:.2e}x its rounding level on its own inputs (NMSE {:.3e} vs the oracle){}",
                e.over_rounding,
                e.nmse,
                if e.ties > 0 {
                    format!(
                        ", {} tied activation code(s), {} taken the other way",
                        e.ties, e.ties_taken
                    )
                } else {
                    String::new()
                }
            ),
            Some(Ok(e)) => format!(
                "{name} NMSE {:.3e} vs the oracle across {} recomputed stage(s)",
                e.nmse,
                e.recomputed.len()
            ),
        };
        let rule = match blame {
            Blame::Candidate => "the candidate is beyond its local rule on its own inputs, the reference is within it",
            Blame::Reference => "the reference is beyond its local rule on its own inputs, the candidate is within it",
            Blame::Both => "both sides are beyond their local rules on their own inputs",
            Blame::Undetermined if candidate_shape.is_some() => "the two sides' shapes differ",
            Blame::Undetermined => "the oracle could not judge the stage and the two sides disagree beyond the side-against-side rule",
        };
        let mut cause = None;
        if matches!(blame, Blame::Reference | Blame::Both) {
            if let Ok(o) = self.reference_oracle {
                let view = self.view(Side::Reference);
                cause = o.explain_reference(
                    j.key.layer,
                    j.key.stage,
                    &view,
                    &self.reference[&j.key].data,
                );
            }
        }
        let (oracle, oracle_side) = match blame {
            Blame::Reference => (ref_oracle.map(|o| o.values), Some(Side::Reference)),
            _ => match cand_oracle {
                Some(o) => (Some(o.values), Some(Side::Candidate)),
                None => (ref_oracle.map(|o| o.values), Some(Side::Reference)),
            },
        };
        Evidence {
            reference: self.reference.get(&j.key).map(|t| t.data.clone()),
            candidate: candidate.map(<[f32]>::to_vec),
            candidate_shape: candidate_shape.clone(),
            oracle,
            oracle_side,
            blame: BlameReport {
                blame,
                reference_nmse_vs_oracle: re.as_ref().map(|e| e.nmse),
                candidate_nmse_vs_oracle: ce.as_ref().map(|e| e.nmse),
                reference_error_over_rounding: re.as_ref().map(|e| e.over_rounding),
                candidate_error_over_rounding: ce.as_ref().map(|e| e.over_rounding),
                reason: format!(
                    "{}; {}; rule: {rule}",
                    side_text("candidate", &j.candidate),
                    side_text("reference", &j.reference)
                ),
                cause,
            },
        }
    }
}

impl TraceSink for StepJudge<'_> {
    fn stage(&mut self, layer: Option<usize>, stage: Stage, shape: &[usize], data: &mut [f32]) {
        self.judge(StageKey::new(layer, stage), shape, data);
    }
}

/// The same f32 bits, element by element.
fn bit_identical(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The worst elements of a failing stage: where the blamed side is farthest
/// from the oracle on its own inputs (both sides' values listed), or where
/// the two sides differ most when there is no oracle.
pub fn worst_elements(e: &Evidence, shape: &[usize]) -> Vec<WorstElement> {
    let (Some(r), Some(c)) = (&e.reference, &e.candidate) else {
        return vec![];
    };
    if e.candidate_shape.is_some() || r.len() != c.len() {
        return vec![];
    }
    let Some(o) = e.oracle.as_ref().filter(|o| o.len() == r.len()) else {
        return metrics::worst_elements(r, c, shape, None, WORST_K);
    };
    let blamed: &[f32] = match e.oracle_side {
        Some(Side::Reference) => r,
        _ => c,
    };
    let dist = |i: usize| {
        let d = (f64::from(blamed[i]) - o[i]).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            d
        }
    };
    let mut idx: Vec<usize> = (0..r.len()).filter(|&i| dist(i) > 0.0).collect();
    let order = |&i: &usize, &j: &usize| dist(j).total_cmp(&dist(i)).then(i.cmp(&j));
    if WORST_K < idx.len() {
        idx.select_nth_unstable_by(WORST_K - 1, order);
    }
    idx.truncate(WORST_K);
    idx.sort_by(order);
    idx.into_iter()
        .map(|i| {
            let mut w = metrics::worst_elements(&r[i..=i], &c[i..=i], &[1], None, 1)
                .pop()
                .unwrap_or(WorstElement {
                    flat_index: 0,
                    index: vec![],
                    reference: r[i],
                    candidate: c[i],
                    oracle: None,
                    abs_diff: 0.0,
                });
            w.flat_index = i;
            w.index = metrics::unravel(i, shape);
            w.oracle = Some(o[i]);
            w
        })
        .collect()
}
