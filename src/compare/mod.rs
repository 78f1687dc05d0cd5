//! Compares tensor pairs: metrics, the tolerance policy, and blame.
//!
//! Knows nothing about FFI, SIMD or how the tensors were made: it takes two
//! canonical f32 tensors (reference first) and, for blame, the f64 oracle's
//! values, and returns plain data that a receipt stores.

pub mod metrics;
pub mod policy;

pub use metrics::{Metrics, WorstElement};
pub use policy::{Class, Policy, Rule};

use serde::{Deserialize, Serialize};

/// Which side of a divergence is wrong, by distance to the f64 oracle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Blame {
    Candidate,
    Reference,
    /// Both are far from the oracle, by similar amounts.
    Both,
    /// The oracle could not recompute this stage from the recorded inputs.
    Undetermined,
}

/// Distances of each side to the oracle, and the side they name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlameReport {
    pub blame: Blame,
    /// NMSE of the reference against the oracle.
    pub reference_nmse_vs_oracle: Option<f64>,
    /// NMSE of the candidate against the oracle.
    pub candidate_nmse_vs_oracle: Option<f64>,
    pub reason: String,
    /// When the reference is blamed and a known bug of it reproduces its
    /// output bit for bit: that bug (`engine::reference_bugs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

/// A side is blamed when it is this many times farther from the oracle than
/// the other (and measurably off at all).
const BLAME_RATIO: f64 = 4.0;
/// Below this NMSE against the oracle a side counts as agreeing with it.
const ORACLE_AGREE_NMSE: f64 = 1e-9;

/// Decides blame from the oracle's values for the stage.
pub fn blame(reference: &[f32], candidate: &[f32], oracle: Option<&[f64]>) -> BlameReport {
    let Some(oracle) = oracle.filter(|o| o.len() == reference.len() && o.len() == candidate.len())
    else {
        return BlameReport {
            blame: Blame::Undetermined,
            reference_nmse_vs_oracle: None,
            candidate_nmse_vs_oracle: None,
            reason: "the oracle has no recomputation for this stage".into(),
            cause: None,
        };
    };
    let r = metrics::nmse_f64(oracle, reference);
    let c = metrics::nmse_f64(oracle, candidate);
    let (blame, reason) = if !c.is_finite() && r.is_finite() {
        (
            Blame::Candidate,
            "the candidate is non-finite where the oracle is finite".to_string(),
        )
    } else if !r.is_finite() && c.is_finite() {
        (
            Blame::Reference,
            "the reference is non-finite where the oracle is finite".to_string(),
        )
    } else if c > BLAME_RATIO * r && c > ORACLE_AGREE_NMSE {
        (
            Blame::Candidate,
            format!(
                "candidate NMSE vs oracle {c:.3e} is over {BLAME_RATIO}x the reference's {r:.3e}"
            ),
        )
    } else if r > BLAME_RATIO * c && r > ORACLE_AGREE_NMSE {
        (
            Blame::Reference,
            format!(
                "reference NMSE vs oracle {r:.3e} is over {BLAME_RATIO}x the candidate's {c:.3e}"
            ),
        )
    } else {
        (Blame::Both, format!("both sides are off the oracle by similar amounts (reference {r:.3e}, candidate {c:.3e})"))
    };
    BlameReport {
        blame,
        reference_nmse_vs_oracle: Some(metrics::finite_or_max(r)),
        candidate_nmse_vs_oracle: Some(metrics::finite_or_max(c)),
        reason,
        cause: None,
    }
}
