//! The comparing sink: judges a candidate's stages against the reference's
//! as they are produced, under one set of policy rules, and (in resync)
//! hands the reference's tensor back so the next stage is judged on its own
//! error. `find` runs a candidate's forward pass into it; `compare` feeds it
//! the stages of a dump in execution order. Either way the same code decides.

use super::metrics::{self, Metrics};
use super::policy::{self, Class, Policy};
use crate::trace::{Stage, StageKey, Tensor, TraceSink};
use std::collections::BTreeMap;
use std::time::Instant;

/// How many top tokens the logit metrics compare.
pub const TOP_K: usize = 5;

/// One judged stage.
#[derive(Clone, Debug, PartialEq)]
pub struct Judged {
    /// Which stage.
    pub key: StageKey,
    /// The class of the rule it was judged by.
    pub class: Class,
    /// Whether it passed that rule.
    pub pass: bool,
    /// The metrics.
    pub metrics: Metrics,
}

/// A stage that failed its rule, with both tensors kept for blame and the
/// worst elements.
#[derive(Clone, Debug)]
pub struct StageFailure {
    /// Which stage.
    pub key: StageKey,
    /// The reference's shape (the canonical layout).
    pub shape: Vec<usize>,
    /// The candidate's shape, when it differs.
    pub candidate_shape: Option<Vec<usize>>,
    /// The reference's values.
    pub reference: Vec<f32>,
    /// The candidate's values (empty when the shapes differ).
    pub candidate: Vec<f32>,
    /// The metrics that failed.
    pub metrics: Metrics,
}

/// Judges stages as a [`TraceSink`].
pub struct StageJudge<'r> {
    policy: &'r Policy,
    /// Judge by the policy's `free_run` rules (propagated error).
    free_rules: bool,
    /// Hand the reference's tensor back after judging.
    resync: bool,
    /// Stop judging after the first failure.
    stop_at_first: bool,
    n_vocab: usize,
    reference: &'r BTreeMap<StageKey, Tensor>,
    stopped: bool,
    /// Every stage judged, in order.
    pub judged: Vec<Judged>,
    /// Every failure, in order (one unless keep-going).
    pub failures: Vec<StageFailure>,
    /// Every stage the candidate emitted, in order (judged or not).
    pub emitted: Vec<StageKey>,
    /// Seconds spent comparing.
    pub compare_s: f64,
}

impl<'r> StageJudge<'r> {
    /// A judge of one forward pass against `reference` (that step's stages).
    pub fn new(
        policy: &'r Policy,
        reference: &'r BTreeMap<StageKey, Tensor>,
        n_vocab: usize,
    ) -> StageJudge<'r> {
        StageJudge {
            policy,
            free_rules: false,
            resync: false,
            stop_at_first: true,
            n_vocab,
            reference,
            stopped: false,
            judged: Vec::new(),
            failures: Vec::new(),
            emitted: Vec::new(),
            compare_s: 0.0,
        }
    }

    /// Hand the reference's values back after each stage (resync).
    pub fn resync(mut self, on: bool) -> Self {
        self.resync = on;
        self
    }

    /// Judge by the policy's `free_run` rules (propagated error).
    pub fn free_rules(mut self, on: bool) -> Self {
        self.free_rules = on;
        self
    }

    /// Keep judging after the first failure.
    pub fn keep_going(mut self, on: bool) -> Self {
        self.stop_at_first = !on;
        self
    }

    /// The last stage the candidate reached.
    pub fn last_stage(&self) -> Option<StageKey> {
        self.emitted.last().copied()
    }

    /// Judges one stage of the candidate (`data` in `shape`); in resync
    /// mode `data` is overwritten with the reference's values.
    pub fn judge(&mut self, key: StageKey, shape: &[usize], data: &mut [f32]) {
        self.emitted.push(key);
        if self.stopped {
            return;
        }
        let Some(reference) = self.reference.get(&key) else {
            // Nothing to judge against: coverage accounting reports it.
            return;
        };
        let t = Instant::now();
        let rule = self.policy.rule(key.stage, self.free_rules);
        let same_shape = reference.shape == shape;
        let mut m = if same_shape {
            metrics::compute(&reference.data, data, rule.atol, rule.rtol)
        } else {
            metrics::shape_mismatch(&reference.shape, shape)
        };
        if key.stage == Stage::Logits && same_shape {
            m.logits = Some(metrics::logit_metrics(
                &reference.data,
                data,
                self.n_vocab,
                TOP_K,
            ));
        }
        let pass = policy::passes(rule, &m);
        if !pass {
            self.failures.push(StageFailure {
                key,
                shape: reference.shape.clone(),
                candidate_shape: (!same_shape).then(|| shape.to_vec()),
                reference: reference.data.clone(),
                candidate: if same_shape { data.to_vec() } else { vec![] },
                metrics: m.clone(),
            });
            if self.stop_at_first {
                self.stopped = true;
            }
        }
        self.judged.push(Judged {
            key,
            class: rule.class,
            pass,
            metrics: m,
        });
        if self.resync && same_shape {
            data.copy_from_slice(&reference.data);
        }
        self.compare_s += t.elapsed().as_secs_f64();
    }
}

impl TraceSink for StageJudge<'_> {
    fn stage(&mut self, layer: Option<usize>, stage: Stage, shape: &[usize], data: &mut [f32]) {
        self.judge(StageKey::new(layer, stage), shape, data);
    }
}
