//! The tolerance policy: data, not code. One rule per stage, with a class:
//!
//! - `exact`: both engines run the same integer or single-f32 chain given
//!   identical inputs; anything but bit equality is a divergence.
//! - `tight`: f32 chains whose summation order or libm calls may differ;
//!   every element must sit within `atol + rtol·|ref|`.
//! - `loose`: the sides use different approximations (ggml's SIMD exp, F16
//!   rounding in the KV cache and the F16 logits product); judged by NMSE.
//!
//! The default policy is `policies/default.json`, compiled in; `--policy FILE`
//! replaces it. The policy in force is printed in every receipt.

use crate::trace::Stage;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How strictly a stage is judged (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Every element equal ([`Metrics::exact`](super::Metrics::exact)).
    Exact,
    /// Every element within `atol + rtol·|ref|`, and NMSE at most `max_nmse`.
    Tight,
    /// NMSE at most `max_nmse`.
    Loose,
}

/// How one stage is judged. Whatever the class, the NaN and Inf counts of
/// the two sides must match.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Which test the metrics must pass.
    pub class: Class,
    /// Absolute tolerance per element (`tight`); 0 when absent.
    #[serde(default)]
    pub atol: f64,
    /// Tolerance relative to |reference| per element (`tight`); 0 when absent.
    #[serde(default)]
    pub rtol: f64,
    /// Largest NMSE a `loose` stage may have (also applied to `tight`).
    #[serde(default)]
    pub max_nmse: f64,
    /// For logits: the fraction of positions whose top-1 token must agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_top1_agreement: Option<f64>,
}

/// A tolerance policy: one rule per stage for resync mode, overrides for
/// free-run mode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The policy's name, e.g. `default`.
    pub name: String,
    /// Why these numbers: shown to reviewers with every receipt.
    pub notes: String,
    /// Rules keyed by canonical stage name; free-run mode uses `free_run`
    /// where present, since error legitimately accumulates there.
    pub resync: Vec<(Stage, Rule)>,
    /// Free-run overrides; a stage without one falls back to its `resync` rule.
    pub free_run: Vec<(Stage, Rule)>,
}

/// The text of the built-in policy, `policies/default.json`.
pub const DEFAULT_POLICY: &str = include_str!("../../policies/default.json");

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy file could not be read.
    #[error("reading policy {path}: {source}")]
    Io {
        /// The file, as given.
        path: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The text is not JSON of a policy (syntax, a missing field, an unknown
    /// key or stage name).
    #[error("policy {path} is not valid: {source}")]
    Parse {
        /// The file, or the name the text was given under.
        path: String,
        /// What serde_json rejected, with line and column.
        source: serde_json::Error,
    },
    /// A canonical stage has no rule.
    #[error("policy {path} has no rule for stage `{stage}` in {mode}")]
    Missing {
        /// The file, or the name the text was given under.
        path: String,
        /// The stage without a rule.
        stage: Stage,
        /// The rule list it is missing from (`resync`).
        mode: &'static str,
    },
}

impl Policy {
    /// The built-in policy, [`DEFAULT_POLICY`] parsed.
    pub fn default_policy() -> Policy {
        Self::parse(DEFAULT_POLICY, "policies/default.json").expect("the built-in policy is valid")
    }

    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let p = path.display().to_string();
        let text =
            crate::infile::read_text(path, crate::infile::Limit::POLICY).map_err(|source| {
                PolicyError::Io {
                    path: p.clone(),
                    source,
                }
            })?;
        Self::parse(&text, &p)
    }

    /// Parses a policy from JSON text and checks that every stage has a
    /// `resync` rule; `path` names the text in errors.
    pub fn parse(text: &str, path: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = serde_json::from_str(text).map_err(|source| PolicyError::Parse {
            path: path.into(),
            source,
        })?;
        for stage in Stage::ALL {
            if !policy.resync.iter().any(|(s, _)| *s == stage) {
                return Err(PolicyError::Missing {
                    path: path.into(),
                    stage,
                    mode: "resync",
                });
            }
        }
        Ok(policy)
    }

    /// The rule for a stage in the given mode.
    pub fn rule(&self, stage: Stage, free_run: bool) -> &Rule {
        fn pick(rules: &[(Stage, Rule)], stage: Stage) -> Option<&Rule> {
            rules.iter().find(|(s, _)| *s == stage).map(|(_, r)| r)
        }
        (if free_run {
            pick(&self.free_run, stage)
        } else {
            None
        })
        .or_else(|| pick(&self.resync, stage))
        .expect("validated at load: every stage has a resync rule")
    }
}

/// Whether metrics pass a rule: the single place that reads a rule.
pub fn passes(rule: &Rule, m: &super::Metrics) -> bool {
    let finite_ok = m.nan_candidate == m.nan_reference && m.inf_candidate == m.inf_reference;
    let top1_ok = match (rule.min_top1_agreement, &m.logits) {
        (Some(min), Some(l)) if l.rows > 0 => l.top1_agree as f64 >= min * l.rows as f64,
        _ => true,
    };
    finite_ok
        && top1_ok
        && match rule.class {
            Class::Exact => m.exact,
            Class::Tight => m.n_outside == 0 && m.nmse <= rule.max_nmse,
            Class::Loose => m.nmse <= rule.max_nmse,
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::metrics;

    fn tight(atol: f64, rtol: f64, max_nmse: f64) -> Rule {
        Rule {
            class: Class::Tight,
            atol,
            rtol,
            max_nmse,
            min_top1_agreement: None,
        }
    }

    #[test]
    fn tight_needs_every_element_within_atol_rtol_and_the_nmse_bound() {
        let reference = [1.0f32, -2.0, 4.0, 0.0];
        let within = [1.0f32 + 1e-6, -2.0, 4.0 - 2e-6, 0.0];
        let rule = tight(1e-6, 1e-6, 1e-9);
        let m = metrics::compute(&reference, &within, rule.atol, rule.rtol);
        assert_eq!(m.n_outside, 0);
        assert!(passes(&rule, &m));
        // One element outside atol + rtol·|ref|: fails, whatever the NMSE.
        let one_out = [1.0f32, -2.0, 4.0, 1e-3];
        let m = metrics::compute(&reference, &one_out, rule.atol, rule.rtol);
        assert_eq!(m.n_outside, 1);
        assert!(!passes(&rule, &m));
        // Every element within its tolerance but the NMSE over its bound: fails.
        let loose_tol = tight(1.0, 0.0, 1e-14);
        let m = metrics::compute(&reference, &within, loose_tol.atol, loose_tol.rtol);
        assert_eq!(m.n_outside, 0);
        assert!(m.nmse > 1e-14);
        assert!(!passes(&loose_tol, &m));
    }

    #[test]
    fn policy_files_reject_unknown_keys() {
        let mut text: serde_json::Value = serde_json::from_str(DEFAULT_POLICY).unwrap();
        text["resync"][0][1]["max_nsme"] = serde_json::json!(1e-3);
        let err = Policy::parse(&text.to_string(), "typo.json").unwrap_err();
        assert!(err.to_string().contains("max_nsme"), "{err}");
        let mut text: serde_json::Value = serde_json::from_str(DEFAULT_POLICY).unwrap();
        text["comment"] = serde_json::json!("hi");
        assert!(Policy::parse(&text.to_string(), "extra.json").is_err());
    }
}
