//! Judges stages: each side's local error against the f64 oracle on its own
//! inputs ([`local`]), the two sides against each other ([`metrics`]), the
//! tolerance policy ([`policy`]), and the one judge that puts them together
//! ([`judge`]).
//!
//! Knows nothing about FFI, SIMD or how the tensors were made: it takes
//! canonical f32 tensors and the oracle's recomputation, and returns plain
//! data that a receipt stores.

pub mod judge;
pub mod local;
pub mod metrics;
pub mod policy;
pub mod tokens;

pub use metrics::{Metrics, WorstElement};
pub use policy::{Class, Policy, Rule};

use serde::{Deserialize, Serialize};

/// Which side of a divergence is wrong: the one beyond its local rule on its
/// own inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Blame {
    /// The candidate is beyond its local rule; the reference is not.
    Candidate,
    /// The reference is beyond its local rule; the candidate is not.
    Reference,
    /// Both are beyond their local rules.
    Both,
    /// The oracle could not judge this stage, or the shapes differ (the
    /// reason says why).
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
    /// The reference's squared error against the oracle on its own inputs
    /// over the stage's squared f32 rounding scale (about 1 for an honest
    /// f32 computation).
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
