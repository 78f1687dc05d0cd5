//! The tolerance policy: data, not code.
//!
//! The `local` rules decide: each side's stage against the f64 oracle on
//! that side's own inputs, in units of the stage's rounding level (see
//! `compare::local`). The side-against-side rules, one per stage with a
//! class, report how the two engines compare:
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

/// How two sides' values of one stage are compared with each other (the
/// side-against-side rules: resync agreement, free-run drift). Whatever the
/// class, the NaN and Inf counts of the two sides must match.
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
    /// Largest NMSE (`loose` and `tight` need it; `exact` has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_nmse: Option<f64>,
    /// For logits: the fraction of positions whose top-1 token must agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_top1_agreement: Option<f64>,
}

/// The bound on one stage's local error: a side against the f64 oracle on
/// its own inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalRule {
    /// The largest `Σ(side − oracle)² / Σ rounding²` an honest engine
    /// reaches (about 1 for one correctly rounded f32 computation).
    pub max_over_rounding: f64,
    /// What clean engines were measured at, for the reviewer.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub measured: String,
}

/// The bound on a stage the oracle reached across stages a side does not
/// emit (a dump of layer outputs only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GapRule {
    /// The largest NMSE against the oracle a clean engine reaches there.
    pub max_nmse: f64,
    /// What clean engines were measured at.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub measured: String,
}

/// The local rules: what decides a verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalPolicy {
    /// Why these bounds, with the measurements they rest on.
    pub notes: String,
    /// One rule per canonical stage.
    pub stages: Vec<(Stage, LocalRule)>,
    /// Stages judged across a gap of recomputed ones.
    pub across_gap: GapRule,
    /// Tokens chosen by an engine that shows no tensors (a tokens-only
    /// dump): judged by their place under the reference's logits.
    #[serde(default = "ChoiceRule::built_in")]
    pub choices: ChoiceRule,
}

/// How far below the reference's top-1 logit a token an engine chose may
/// be and still count as a near-tie flip, not a divergence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChoiceRule {
    /// The largest logit gap to the reference's top-1 that is a tie.
    pub max_tie_gap: f64,
    /// Where the number comes from.
    pub notes: String,
}

impl ChoiceRule {
    /// The built-in rule, for policy files written before it existed.
    pub fn built_in() -> ChoiceRule {
        Policy::default_policy().local.choices
    }
}

/// A tolerance policy: the local rules that decide (each side against the
/// oracle on its own inputs), and the side-against-side rules that report
/// agreement in resync and drift in free runs and dumps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The policy's name, e.g. `default`.
    pub name: String,
    /// Why these numbers: shown to reviewers with every receipt.
    pub notes: String,
    /// Each side against the f64 oracle on its own inputs: the verdict.
    pub local: LocalPolicy,
    /// Side against side on the same inputs (resync): where the two engines
    /// agree bit for bit or within these bounds. Reported, and the judge of
    /// last resort where the oracle cannot recompute a stage.
    pub resync: Vec<(Stage, Rule)>,
    /// Side against side when each fed itself (free mode, dumps): the drift
    /// bounds; a stage without one falls back to its `resync` rule.
    pub free_run: Vec<(Stage, Rule)>,
}

/// The text of the built-in policy, `policies/default.json`.
pub const DEFAULT_POLICY: &str = include_str!("../../policies/default.json");

/// The largest policy file read (a policy is a few kilobytes).
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

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
        /// The rule list it is missing from (`resync`, `local.stages`).
        mode: &'static str,
    },
    /// A rule is present but cannot be applied as written.
    #[error("policy {path}: {list} rule for `{stage}`: {message}")]
    Invalid {
        /// The file, or the name the text was given under.
        path: String,
        /// The rule list (`resync`, `free_run`, `local.stages`).
        list: &'static str,
        /// The stage (or `across_gap`).
        stage: String,
        /// What is wrong with it.
        message: String,
    },
}

impl Policy {
    /// The built-in policy, [`DEFAULT_POLICY`] parsed.
    pub fn default_policy() -> Policy {
        Self::parse(DEFAULT_POLICY, "policies/default.json").expect("the built-in policy is valid")
    }

    /// Reads and validates a policy file (at most [`MAX_POLICY_BYTES`]).
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let p = path.display().to_string();
        let text = crate::input::read_text(path, MAX_POLICY_BYTES, "policy").map_err(|source| {
            PolicyError::Io {
                path: p.clone(),
                source,
            }
        })?;
        Self::parse(&text, &p)
    }

    /// Parses a policy from JSON text and validates it: every stage has a
    /// `resync` and a local rule, no stage has two rules in one list, every
    /// bound is a finite non-negative number and every class has the bound
    /// it needs. `path` names the text in errors.
    pub fn parse(text: &str, path: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = serde_json::from_str(text).map_err(|source| PolicyError::Parse {
            path: path.into(),
            source,
        })?;
        policy.validate(path)?;
        Ok(policy)
    }

    fn validate(&self, path: &str) -> Result<(), PolicyError> {
        let invalid = |list: &'static str, stage: String, message: String| PolicyError::Invalid {
            path: path.into(),
            list,
            stage,
            message,
        };
        let bound = |list: &'static str, stage: String, what: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(invalid(
                    list,
                    stage,
                    format!("{what} is {v}: a bound must be a finite number >= 0"),
                ))
            }
        };
        for (list, rules) in [("resync", &self.resync), ("free_run", &self.free_run)] {
            let mut seen = std::collections::BTreeSet::new();
            for (stage, rule) in rules {
                let name = stage.name().to_string();
                if !seen.insert(*stage) {
                    return Err(invalid(list, name, "the stage has two rules".into()));
                }
                bound(list, name.clone(), "atol", rule.atol)?;
                bound(list, name.clone(), "rtol", rule.rtol)?;
                match (rule.class, rule.max_nmse) {
                    (Class::Tight | Class::Loose, None) => {
                        return Err(invalid(
                            list,
                            name,
                            format!("class {:?} needs `max_nmse`", rule.class).to_lowercase(),
                        ))
                    }
                    (_, Some(v)) => bound(list, name.clone(), "max_nmse", v)?,
                    (Class::Exact, None) => {}
                }
                if let Some(v) = rule.min_top1_agreement {
                    if !(0.0..=1.0).contains(&v) {
                        return Err(invalid(
                            list,
                            name,
                            format!("min_top1_agreement is {v}: it is a fraction in [0, 1]"),
                        ));
                    }
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (stage, rule) in &self.local.stages {
            let name = stage.name().to_string();
            if !seen.insert(*stage) {
                return Err(invalid(
                    "local.stages",
                    name,
                    "the stage has two rules".into(),
                ));
            }
            bound(
                "local.stages",
                name,
                "max_over_rounding",
                rule.max_over_rounding,
            )?;
        }
        bound(
            "local",
            "across_gap".into(),
            "max_nmse",
            self.local.across_gap.max_nmse,
        )?;
        bound(
            "local",
            "choices".into(),
            "max_tie_gap",
            self.local.choices.max_tie_gap,
        )?;
        for stage in Stage::ALL {
            if !self.resync.iter().any(|(s, _)| *s == stage) {
                return Err(PolicyError::Missing {
                    path: path.into(),
                    stage,
                    mode: "resync",
                });
            }
            if !self.local.stages.iter().any(|(s, _)| *s == stage) {
                return Err(PolicyError::Missing {
                    path: path.into(),
                    stage,
                    mode: "local.stages",
                });
            }
        }
        Ok(())
    }

    /// The side-against-side rule for a stage in the given mode.
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

    /// The local rule for a stage.
    pub fn local_rule(&self, stage: Stage) -> &LocalRule {
        self.local
            .stages
            .iter()
            .find(|(s, _)| *s == stage)
            .map(|(_, r)| r)
            .expect("validated at load: every stage has a local rule")
    }
}

/// Whether side-against-side metrics pass a rule: the single place that
/// reads a [`Rule`].
pub fn passes(rule: &Rule, m: &super::Metrics) -> bool {
    let finite_ok = m.nan_candidate == m.nan_reference && m.inf_candidate == m.inf_reference;
    let top1_ok = match (rule.min_top1_agreement, &m.logits) {
        (Some(min), Some(l)) if l.rows > 0 => l.top1_agree as f64 >= min * l.rows as f64,
        _ => true,
    };
    let max_nmse = rule.max_nmse.unwrap_or(0.0);
    finite_ok
        && top1_ok
        && match rule.class {
            Class::Exact => m.exact,
            Class::Tight => m.n_outside == 0 && m.nmse <= max_nmse,
            Class::Loose => m.nmse <= max_nmse,
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
            max_nmse: Some(max_nmse),
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
