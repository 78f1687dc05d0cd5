//! Compares tensor pairs: metrics, the tolerance policy, and blame.
//!
//! Knows nothing about FFI, SIMD or how the tensors were made: it takes two
//! canonical f32 tensors (reference first) and, for blame, the f64 oracle's
//! values, and returns plain data that a receipt stores.

pub mod judge;
pub mod metrics;
pub mod policy;
pub mod tokens;

pub use metrics::{Metrics, WorstElement};
pub use policy::{Class, Policy, Rule};

use serde::{Deserialize, Serialize};

/// Which side of a divergence is wrong, by distance to the f64 oracle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Blame {
    /// The candidate is measurably off the oracle; the reference is not.
    Candidate,
    /// The reference is measurably off the oracle; the candidate is not.
    Reference,
    /// Both are measurably off the oracle (or both within rounding of it,
    /// by similar amounts: then the policy is stricter than f32 rounding).
    Both,
    /// The oracle could not recompute this stage (the reason says why).
    Undetermined,
}

/// Distances of each side to the oracle, and the side they name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlameReport {
    /// The side named.
    pub blame: Blame,
    /// NMSE of the reference against the oracle.
    pub reference_nmse_vs_oracle: Option<f64>,
    /// NMSE of the candidate against the oracle.
    pub candidate_nmse_vs_oracle: Option<f64>,
    /// The reference's squared error against the oracle over the stage's
    /// squared f32 rounding scale (about 1 for an honest f32 computation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_error_over_rounding: Option<f64>,
    /// The same for the candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_error_over_rounding: Option<f64>,
    /// Both distances as numbers and the rule that decided.
    pub reason: String,
    /// When the reference is blamed and a known bug of it reproduces its
    /// output bit for bit: that bug (`oracle::reference_bugs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

/// A side whose squared error against the oracle exceeds this many times
/// the stage's squared rounding scale (an RMS error over 5 roundings) is
/// measurably off; at or below it, its error is rounding.
pub const OFF_ROUNDING: f64 = 25.0;
/// When both sides are on the same side of [`OFF_ROUNDING`], a side is
/// still named if it is this many times farther from the oracle.
pub const BLAME_RATIO: f64 = 4.0;

/// Decides blame from the oracle's recomputation of the stage (or the
/// reason it has none): a side is blamed when its error against the oracle
/// is measurably above the stage's f32 rounding level while the other's is
/// at rounding level, however small the absolute numbers.
pub fn blame(
    reference: &[f32],
    candidate: &[f32],
    oracle: Result<&crate::oracle::OracleStage, &str>,
) -> BlameReport {
    let undetermined = |reason: String| BlameReport {
        blame: Blame::Undetermined,
        reference_nmse_vs_oracle: None,
        candidate_nmse_vs_oracle: None,
        reference_error_over_rounding: None,
        candidate_error_over_rounding: None,
        reason,
        cause: None,
    };
    let oracle = match oracle {
        Err(why) => return undetermined(format!("the oracle cannot recompute this stage: {why}")),
        Ok(o) => o,
    };
    if oracle.values.len() != reference.len() || oracle.values.len() != candidate.len() {
        return undetermined(format!(
            "the oracle's {} values do not line up with the reference's {} and the candidate's {}",
            oracle.values.len(),
            reference.len(),
            candidate.len()
        ));
    }
    let r = metrics::nmse_f64(&oracle.values, reference);
    let c = metrics::nmse_f64(&oracle.values, candidate);
    let floor: f64 = oracle.rounding.iter().map(|s| s * s).sum();
    let over = |x: &[f32]| {
        let err: f64 = oracle
            .values
            .iter()
            .zip(x)
            .map(|(&o, &v)| (o - f64::from(v)).powi(2))
            .sum();
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
    let (rr, cr) = (over(reference), over(candidate));
    let numbers = format!(
        "NMSE vs oracle: reference {r:.3e} ({rr:.2e}x the stage's rounding level), candidate {c:.3e} ({cr:.2e}x)"
    );
    let (off_r, off_c) = (rr > OFF_ROUNDING, cr > OFF_ROUNDING);
    let (blame, rule) = if !c.is_finite() && r.is_finite() {
        (
            Blame::Candidate,
            "the candidate is non-finite where the oracle is finite".to_string(),
        )
    } else if !r.is_finite() && c.is_finite() {
        (
            Blame::Reference,
            "the reference is non-finite where the oracle is finite".to_string(),
        )
    } else {
        match (off_r, off_c) {
            (false, true) => (
                Blame::Candidate,
                format!("rule: the candidate is measurably off (above {OFF_ROUNDING}x rounding), the reference is at rounding level"),
            ),
            (true, false) => (
                Blame::Reference,
                format!("rule: the reference is measurably off (above {OFF_ROUNDING}x rounding), the candidate is at rounding level"),
            ),
            (true, true) => (
                Blame::Both,
                format!("rule: both sides are measurably off (above {OFF_ROUNDING}x rounding)"),
            ),
            (false, false) if cr > BLAME_RATIO * rr && cr > 1.0 => (
                Blame::Candidate,
                format!("rule: both are within {OFF_ROUNDING}x rounding, but the candidate is over {BLAME_RATIO}x farther from the oracle"),
            ),
            (false, false) if rr > BLAME_RATIO * cr && rr > 1.0 => (
                Blame::Reference,
                format!("rule: both are within {OFF_ROUNDING}x rounding, but the reference is over {BLAME_RATIO}x farther from the oracle"),
            ),
            (false, false) => (
                Blame::Both,
                "rule: both sides are within rounding of the oracle by similar amounts: the policy for this stage is stricter than f32 rounding".to_string(),
            ),
        }
    };
    BlameReport {
        blame,
        reference_nmse_vs_oracle: Some(metrics::finite_or_max(r)),
        candidate_nmse_vs_oracle: Some(metrics::finite_or_max(c)),
        reference_error_over_rounding: Some(metrics::finite_or_max(rr)),
        candidate_error_over_rounding: Some(metrics::finite_or_max(cr)),
        reason: format!("{numbers}; {rule}"),
        cause: None,
    }
}
