//! Statistics over a corpus, computed from the raw per-position and
//! per-stage values (never from other statistics), so a merge of shards
//! gives exactly what one run gives.
//!
//! Percentiles are those of `llama-perplexity --kl-divergence`
//! (`kl_divergence` in `tools/perplexity/perplexity.cpp`): over the values
//! sorted ascending, fraction f lies at rank f·(n−1), interpolated linearly
//! between the two neighbouring values; the median is the 0.5 percentile
//! (the mean of the two middle values when n is even).

use crate::lockstep::{PositionLogits, StepRecord};
use crate::trace::{Stage, StageKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The value at `fraction` (0..=1) of `sorted` (ascending, not empty), as
/// llama-perplexity's `percentile` computes it (in f64 here).
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of nothing");
    if fraction <= 0.0 {
        return sorted[0];
    }
    if fraction >= 1.0 {
        return sorted[sorted.len() - 1];
    }
    let rank = fraction * (sorted.len() - 1) as f64;
    let below = rank.floor() as usize;
    let above = (below + 1).min(sorted.len() - 1);
    let t = rank - below as f64;
    (1.0 - t) * sorted[below] + t * sorted[above]
}

/// Sorts ascending (NaN last: there are none, values are clamped finite).
fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// The distribution of one error measure over samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// How many values.
    pub samples: usize,
    /// The 0.5 percentile.
    pub median: f64,
    /// The 0.9 percentile.
    pub p90: f64,
    /// The 0.99 percentile.
    pub p99: f64,
    /// The largest value.
    pub max: f64,
}

impl Distribution {
    /// None for no values.
    pub fn of(values: Vec<f64>) -> Option<Distribution> {
        if values.is_empty() {
            return None;
        }
        let v = sorted(values);
        Some(Distribution {
            samples: v.len(),
            median: percentile(&v, 0.5),
            p90: percentile(&v, 0.9),
            p99: percentile(&v, 0.99),
            max: v[v.len() - 1],
        })
    }
}

/// One (layer, stage) over every step of every prompt that judged it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageDistribution {
    /// The layer (none for model-level stages).
    pub layer: Option<usize>,
    /// The stage.
    pub stage: Stage,
    /// The candidate's local error: NMSE against the oracle on its own inputs.
    pub local_nmse: Distribution,
    /// The fraction of samples where the two sides were bit-exact.
    pub exact_fraction: f64,
    /// The fraction of samples within the local rule.
    pub pass_fraction: f64,
    /// Side against side: NMSE (resync: on the same inputs; free: drift).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sides_nmse: Option<Distribution>,
}

/// Per (layer, stage), in execution order, over the step records of every
/// prompt (given in prompt order).
pub fn stage_distributions<'a>(
    steps: impl IntoIterator<Item = &'a StepRecord>,
) -> Vec<StageDistribution> {
    #[derive(Default)]
    struct Samples {
        local: Vec<f64>,
        n: usize,
        exact: usize,
        pass: usize,
        sides: Vec<f64>,
    }
    let mut by_key: BTreeMap<(usize, usize, usize), (StageKey, Samples)> = BTreeMap::new();
    for record in steps {
        for s in &record.stages {
            let key = StageKey::new(s.layer, s.stage);
            let (_, samples) = by_key
                .entry(key.order())
                .or_insert_with(|| (key, Samples::default()));
            samples.n += 1;
            if let Some(l) = s.candidate_local_nmse {
                samples.local.push(l);
            }
            samples.exact += usize::from(s.exact);
            samples.pass += usize::from(s.pass);
            if let Some(p) = s.nmse {
                samples.sides.push(p);
            }
        }
    }
    by_key
        .into_values()
        .filter_map(|(key, s)| {
            let n = s.n as f64;
            Some(StageDistribution {
                layer: key.layer,
                stage: key.stage,
                exact_fraction: s.exact as f64 / n,
                pass_fraction: s.pass as f64 / n,
                local_nmse: Distribution::of(s.local)?,
                sides_nmse: Distribution::of(s.sides),
            })
        })
        .collect()
}

/// The reference's top token's probability on both sides, over positions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopP {
    /// Mean of p_ref(t*), t* the reference's top token.
    pub reference_mean: f64,
    /// Mean of p_cand(t*).
    pub candidate_mean: f64,
    /// Mean of |p_ref(t*) − p_cand(t*)|.
    pub mean_abs_difference: f64,
    /// Largest |p_ref(t*) − p_cand(t*)|.
    pub max_abs_difference: f64,
}

/// KL(P_ref ‖ P_cand) over every position of every prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KldSummary {
    /// Positions compared.
    pub positions: usize,
    /// Mean KL, in nats.
    pub mean: f64,
    /// Smallest KL.
    pub min: f64,
    /// The 0.5 percentile of the KL.
    pub median: f64,
    /// The 0.9 percentile of the KL.
    pub p90: f64,
    /// The 0.99 percentile of the KL.
    pub p99: f64,
    /// The 0.999 percentile of the KL.
    pub p999: f64,
    /// Largest KL.
    pub max: f64,
    /// Fraction of positions whose top tokens agree (what llama-perplexity
    /// prints as "Same top p").
    pub top1_agreement: f64,
    /// The reference's top token's probability on both sides.
    pub same_top_p: TopP,
}

impl KldSummary {
    /// None for no positions. `positions` in prompt order, then position order.
    pub fn of<'a>(positions: impl IntoIterator<Item = &'a PositionLogits>) -> Option<KldSummary> {
        let mut kl = Vec::new();
        let (mut agree, mut p_ref, mut p_cand, mut d_sum, mut d_max) =
            (0usize, 0.0, 0.0, 0.0, 0.0f64);
        for p in positions {
            let c = &p.compared;
            kl.push(c.kl);
            agree += usize::from(c.reference_top == c.candidate_top);
            p_ref += c.reference_top_p;
            p_cand += c.candidate_top_p;
            let d = (c.reference_top_p - c.candidate_top_p).abs();
            d_sum += d;
            d_max = d_max.max(d);
        }
        if kl.is_empty() {
            return None;
        }
        let n = kl.len() as f64;
        let mean = kl.iter().sum::<f64>() / n;
        let v = sorted(kl);
        Some(KldSummary {
            positions: v.len(),
            mean,
            min: v[0],
            median: percentile(&v, 0.5),
            p90: percentile(&v, 0.9),
            p99: percentile(&v, 0.99),
            p999: percentile(&v, 0.999),
            max: v[v.len() - 1],
            top1_agreement: agree as f64 / n,
            same_top_p: TopP {
                reference_mean: p_ref / n,
                candidate_mean: p_cand / n,
                mean_abs_difference: d_sum / n,
                max_abs_difference: d_max,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.5);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 1.0), 4.0);
        // rank 0.9 * 3 = 2.7: 3 + 0.7 * (4 - 3)
        assert!((percentile(&v, 0.9) - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&[5.0], 0.99), 5.0);
    }
}
