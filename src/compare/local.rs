//! Local error: one side's stage against the f64 oracle recomputed from that
//! side's *own* inputs, in units of the stage's f32 rounding level.
//!
//! This is what decides a verdict in every mode. Where both sides saw the
//! same inputs (resync) it measures what a side-against-side comparison
//! would; where they did not (free mode, two dumps, a foreign engine that
//! drifted) it still isolates the op: a correct engine sits at rounding
//! level on its own inputs however far its inputs have drifted from the
//! reference's, and a bug is far above it at the stage it lives in.
//!
//! The measure is the blame rule's: `Σ(side − oracle)² / Σ rounding²`
//! ("over rounding"), about 1 or less for an honest f32 computation. A stage
//! the oracle had to reach across stages the side does not emit (a dump of
//! layer outputs only) cannot be held to one op's rounding: integer
//! activation codes amplify f32 differences into whole steps somewhere in
//! the span. It is judged by its NMSE against the oracle instead, under the
//! policy's `across_gap` bound, measured on clean engines.

use super::metrics::all_finite;
use crate::oracle::OracleStage;
use crate::trace::{Stage, StageKey};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Elements from which a measure sums its token rows in parallel.
const PARALLEL_FROM: usize = 1 << 15;

/// One side's stage against the oracle on its own inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalError {
    /// Σ(side − oracle)² over Σ rounding²: about 1 or below for an honest
    /// f32 computation of the stage from these inputs.
    pub over_rounding: f64,
    /// NMSE of the side against the oracle.
    pub nmse: f64,
    /// The largest |side − oracle| over the elements.
    pub max_abs: f64,
    /// I2_S stages: activation codes within an f32 rounding of a .5
    /// boundary, where either code is honest.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ties: usize,
    /// Of those, how many this side evidently rounded the other way.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ties_taken: usize,
    /// Stages the side does not emit that the oracle recomputed to reach
    /// this one (empty: judged on the side's own direct inputs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recomputed: Vec<StageKey>,
    /// Within the local rule.
    pub pass: bool,
    /// The first token row (0-based within the step) beyond the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_row_beyond: Option<usize>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The bound a local error is held to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    /// The stage on its own inputs: at most this many times the squared
    /// rounding scale.
    OverRounding(f64),
    /// Across a gap of recomputed stages: NMSE at most this.
    Nmse(f64),
}

/// Measures `side` (the stage's values, canonical layout `shape`) against
/// `oracle` under `bound`; `recomputed` lists the stages the oracle filled
/// in. Ties the side evidently rounded the other way are taken first.
pub fn measure(
    stage: Stage,
    shape: &[usize],
    side: &[f32],
    oracle: &OracleStage,
    bound: Bound,
    recomputed: Vec<StageKey>,
) -> LocalError {
    let mut values = std::borrow::Cow::Borrowed(&oracle.values);
    let mut ties_taken = 0;
    if !oracle.alternatives.is_empty() && side.len() == oracle.values.len() {
        let v = values.to_mut();
        for alt in &oracle.alternatives {
            let n = alt.delta.len();
            let range = alt.row * n..(alt.row + 1) * n;
            if range.end > v.len() {
                continue;
            }
            let (mut now, mut then) = (0f64, 0f64);
            for ((o, &x), d) in v[range.clone()]
                .iter()
                .zip(&side[range.clone()])
                .zip(&alt.delta)
            {
                let x = f64::from(x);
                now += (x - o).powi(2);
                then += (x - o - d).powi(2);
            }
            if then < now {
                for (o, d) in v[range].iter_mut().zip(&alt.delta) {
                    *o += d;
                }
                ties_taken += 1;
            }
        }
    }
    let rows = token_rows(stage, shape);
    let per_row = side.len().checked_div(rows.max(1)).unwrap_or(0);
    // Elements come in runs that share a token row: a row of [T, D], a key
    // run of [H, T, K] (row = run index mod T).
    let attention = stage.is_attention_matrix() && shape.len() == 3;
    let run = if attention { shape[2] } else { per_row }.max(1);
    let row_of_run = |k: usize| -> usize {
        if attention {
            k % shape[1].max(1)
        } else {
            k
        }
    };
    // Per token row: squared error, squared rounding, squared oracle; each
    // row summed in element order, rows in parallel (the same bits).
    let n_rows = rows.max(1);
    let mut broken = side.len() != values.len();
    let mut acc = vec![(0f64, 0f64, 0f64); n_rows];
    let mut max_abs = 0f64;
    if !broken {
        let mut runs_of_row: Vec<Vec<usize>> = vec![Vec::new(); n_rows];
        for k in 0..side.len().div_ceil(run) {
            runs_of_row[row_of_run(k).min(n_rows - 1)].push(k);
        }
        let nr = oracle.rounding.len();
        let row_sums = |runs: &Vec<usize>| -> ((f64, f64, f64), f64, bool) {
            let (mut a, mut max_abs, mut broken) = ((0f64, 0f64, 0f64), 0f64, false);
            for &k in runs {
                let span = k * run..((k + 1) * run).min(side.len());
                let (xs, os) = (&side[span.clone()], &values[span.clone()]);
                let rs = &oracle.rounding[span.start.min(nr)..span.end.min(nr)];
                if all_finite(xs, f32::is_finite) && all_finite(os, f64::is_finite) {
                    // The loop below without its branches (the usual case).
                    for ((&x, &o), &r) in xs.iter().zip(os).zip(rs) {
                        let err = (f64::from(x) - o).abs();
                        max_abs = if err > max_abs { err } else { max_abs };
                        a.0 += err * err;
                        a.1 += r * r;
                        a.2 += o * o;
                    }
                    continue;
                }
                for ((&x, &o), &r) in xs.iter().zip(os).zip(rs) {
                    let x = f64::from(x);
                    let err = if x.is_nan() && o.is_nan() {
                        0.0
                    } else if !x.is_finite() || !o.is_finite() {
                        broken = true;
                        f64::INFINITY
                    } else {
                        (x - o).abs()
                    };
                    max_abs = max_abs.max(err);
                    a.0 += err * err;
                    a.1 += r * r;
                    a.2 += if o.is_finite() { o * o } else { 0.0 };
                }
            }
            (a, max_abs, broken)
        };
        let per_row: Vec<_> = if side.len() >= PARALLEL_FROM {
            runs_of_row.par_iter().map(row_sums).collect()
        } else {
            runs_of_row.iter().map(row_sums).collect()
        };
        for (a, (sums, row_max, row_broken)) in acc.iter_mut().zip(per_row) {
            *a = sums;
            max_abs = max_abs.max(row_max);
            broken |= row_broken;
        }
    }
    let ratio = |err: f64, floor: f64| -> f64 {
        if !err.is_finite() {
            f64::INFINITY
        } else if floor > 0.0 {
            err / floor
        } else if err > 0.0 {
            f64::INFINITY
        } else {
            0.0
        }
    };
    let (err, floor, sig) = acc
        .iter()
        .fold((0f64, 0f64, 0f64), |t, a| (t.0 + a.0, t.1 + a.1, t.2 + a.2));
    let over_rounding = if broken && side.len() != values.len() {
        f64::INFINITY
    } else {
        ratio(err, floor)
    };
    let nmse = ratio(err, sig);
    let beyond = |a: &(f64, f64, f64)| match bound {
        Bound::OverRounding(max) => ratio(a.0, a.1) > max,
        Bound::Nmse(max) => ratio(a.0, a.2) > max,
    };
    let pass = match bound {
        Bound::OverRounding(max) => over_rounding <= max,
        Bound::Nmse(max) => nmse <= max,
    };
    let first_row_beyond = if pass {
        None
    } else {
        acc.iter().position(beyond).or(Some(0))
    };
    LocalError {
        over_rounding: super::metrics::finite_or_max(over_rounding),
        nmse: super::metrics::finite_or_max(nmse),
        max_abs: super::metrics::finite_or_max(max_abs),
        ties: oracle.ties,
        ties_taken,
        recomputed,
        pass,
        first_row_beyond,
    }
}

/// Token rows of a stage's canonical layout: the first axis of [T, D], the
/// second of [H, T, K].
pub fn token_rows(stage: Stage, shape: &[usize]) -> usize {
    if stage.is_attention_matrix() && shape.len() == 3 {
        shape[1]
    } else {
        shape.first().copied().unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::Alternative;

    fn oracle(values: Vec<f64>, rounding: Vec<f64>) -> OracleStage {
        OracleStage {
            values,
            rounding,
            ties: 0,
            alternatives: vec![],
        }
    }

    #[test]
    fn an_honest_rounding_passes_and_a_one_element_change_fails() {
        let o = oracle(vec![1.0, 2.0, 3.0, 4.0], vec![1e-7; 4]);
        let honest = [1.0f32, 2.0, 3.0, 4.0 + 2e-7];
        let e = measure(
            Stage::FfnUp,
            &[2, 2],
            &honest,
            &o,
            Bound::OverRounding(25.0),
            vec![],
        );
        assert!(e.pass, "{e:?}");
        let bad = [1.0f32, 2.0, 3.0, 4.0 + 0.5 * 5.0];
        let e = measure(
            Stage::FfnUp,
            &[2, 2],
            &bad,
            &o,
            Bound::OverRounding(25.0),
            vec![],
        );
        assert!(!e.pass);
        assert_eq!(e.first_row_beyond, Some(1), "the second token row");
    }

    #[test]
    fn a_tie_rounded_the_other_way_is_taken_and_passes() {
        let mut o = oracle(vec![1.0, 2.0, 3.0, 4.0], vec![1e-7; 4]);
        o.ties = 1;
        o.alternatives = vec![Alternative {
            row: 1,
            delta: vec![0.25, -0.25],
        }];
        let side = [1.0f32, 2.0, 3.25, 3.75];
        let e = measure(
            Stage::QProj,
            &[2, 2],
            &side,
            &o,
            Bound::OverRounding(25.0),
            vec![],
        );
        assert!(e.pass, "{e:?}");
        assert_eq!((e.ties, e.ties_taken), (1, 1));
        // A side that did not take it is not moved.
        let e = measure(
            Stage::QProj,
            &[2, 2],
            &[1.0, 2.0, 3.0, 4.0],
            &o,
            Bound::OverRounding(25.0),
            vec![],
        );
        assert_eq!((e.ties, e.ties_taken, e.pass), (1, 0, true));
    }

    #[test]
    fn attention_rows_are_the_middle_axis_and_non_finite_fails() {
        // [H=2, T=2, K=2]: flat 4..6 is head 1, token 0.
        let o = oracle(vec![1.0; 8], vec![1e-7; 8]);
        let mut side = [1.0f32; 8];
        side[5] = 2.0;
        let e = measure(
            Stage::AttnProbs,
            &[2, 2, 2],
            &side,
            &o,
            Bound::OverRounding(25.0),
            vec![],
        );
        assert_eq!(e.first_row_beyond, Some(0));
        side[5] = f32::NAN;
        let e = measure(
            Stage::AttnProbs,
            &[2, 2, 2],
            &side,
            &o,
            Bound::OverRounding(25.0),
            vec![],
        );
        assert!(!e.pass && e.over_rounding == f64::MAX);
    }
}
