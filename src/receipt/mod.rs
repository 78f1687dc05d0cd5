//! The JSON receipt: what was run, on what, with which builds and policy,
//! and what was found. Deterministic: the same run writes the same bytes,
//! apart from the `volatile` object (timestamp, timings).
//!
//! A receipt records enough to be re-run (`divergence verify`), and its
//! identity (everything but `volatile` and build-environment facts) is what
//! the parity suite compares with the checked-in copies in `receipts/`.

use crate::candidate::{BuiltinCandidate, CandidateLoader, KvSemantics};
use crate::compare::Policy;
use crate::engine::{Fault, KvType, ModelConfig};
use crate::lockstep::{
    self, CandidateFailure, ConfigMismatch, Coverage, Divergence, Mode, Outcome, Prompt, RunConfig,
    RunError, StageSummary, StepRecord, TokenCheck, TokenDisagreement, TokenFault, Verdict,
};
use crate::oracle::FileFacts;
use crate::reference::{BuildInfo, FfnAct};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub const SCHEMA_VERSION: u32 = 2;
/// The JSON Schema every receipt validates against.
pub const SCHEMA: &str = include_str!("../../receipts/schema.json");

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Receipt {
    pub schema_version: u32,
    pub tool: String,
    /// What was asked: enough for `divergence verify` to run it again.
    pub run: RunRecord,
    pub model: ModelRecord,
    pub reference: BuildInfo,
    pub candidate: CandidateRecord,
    pub policy: Policy,
    pub verdict: Verdict,
    /// Stopped by the user (Ctrl-C) after `steps_run` steps: the verdict
    /// covers only those.
    pub interrupted: bool,
    pub steps_run: usize,
    pub tokens: TokenCheck,
    pub first_divergence: Option<Divergence>,
    pub later_divergences: Vec<Divergence>,
    /// Per (layer, stage), aggregated over the steps run, up to the divergence.
    pub stages: Vec<StageSummary>,
    /// Per step, every stage judged (the report's heatmap).
    pub step_results: Vec<StepRecord>,
    /// What was and was not judged.
    pub coverage: Coverage,
    /// Hyperparameters the candidate read differently from the file.
    pub config_check: Vec<ConfigMismatch>,
    pub generated: Generated,
    /// F32/F16 weights holding NaN or Inf (the run went on).
    pub weight_warnings: Vec<String>,
    pub reference_failure: Option<String>,
    pub candidate_failure: Option<CandidateFailure>,
    /// Set when this receipt is an offline comparison of two dumps
    /// (`divergence compare`), not a lockstep run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline: Option<OfflineRecord>,
    /// Never part of the receipt's identity.
    pub volatile: Volatile,
}

/// What an offline comparison compared.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OfflineRecord {
    /// The reference dump.
    pub reference_dump: String,
    /// The candidate dump.
    pub candidate_dump: String,
    /// The map the candidate dump was read through.
    pub map: Option<String>,
    /// Whether the model file was given (the oracle could blame).
    pub model_given: bool,
    /// What an offline comparison can and cannot tell.
    pub note: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    pub model_path: String,
    pub prompt: Prompt,
    pub steps: usize,
    pub mode: Mode,
    pub threads: usize,
    pub kv_type: KvType,
    pub keep_going: bool,
    pub faults: Vec<Fault>,
    pub token_faults: Vec<TokenFault>,
    /// A policy file given with --policy, else the built-in one.
    pub policy_path: Option<String>,
    /// The prompt was formatted with each side's chat template.
    #[serde(default)]
    pub chat: bool,
    /// The reference's `bitnet-b1.58` FFN activation (`--reference-ffn-act`);
    /// absent in receipts written before it existed.
    #[serde(default)]
    pub reference_ffn_act: FfnAct,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelRecord {
    pub path: String,
    pub sha256: String,
    pub file_size: u64,
    /// Shapes and hyperparameters as the candidate read them (none: it
    /// failed to load).
    pub config: Option<ModelConfig>,
    /// The same as the file states them, read by the oracle.
    pub file: Option<FileFacts>,
    /// bitnet.cpp's own description of the model.
    pub reference_description: String,
    /// For a synthetic model: how it was made (`divergence verify` makes
    /// it again when the file is missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<crate::synth::SynthConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CandidateRecord {
    pub engine: String,
    pub build: String,
    pub threads: usize,
    pub kv_semantics: Option<KvSemantics>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Generated {
    pub reference: Vec<u32>,
    pub candidate: Vec<u32>,
    pub disagreements: Vec<TokenDisagreement>,
}

#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct Volatile {
    pub timestamp_unix: u64,
    pub timings: crate::lockstep::Timings,
}

impl Receipt {
    /// Runs what `record` describes (the lockstep comparison) and builds the
    /// receipt: the one path from a run request to a receipt, for `find`,
    /// `verify` and the tests.
    pub fn run(
        record: &RunRecord,
        worker_exe: PathBuf,
        progress: Option<Arc<dyn Fn(usize, usize) + Send + Sync>>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Receipt, RunError> {
        let builtin = BuiltinCandidate {
            faults: record.faults.clone(),
            ..BuiltinCandidate::default()
        };
        Self::run_with(record, &builtin, worker_exe, progress, cancel)
    }

    /// [`Receipt::run`] with any candidate (`record.faults` is then only recorded).
    pub fn run_with(
        record: &RunRecord,
        candidate: &dyn CandidateLoader,
        worker_exe: PathBuf,
        progress: Option<Arc<dyn Fn(usize, usize) + Send + Sync>>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Receipt, RunError> {
        let policy = match &record.policy_path {
            Some(p) => Policy::load(Path::new(p))?,
            None => Policy::default_policy(),
        };
        Self::run_with_policy(record, policy, candidate, worker_exe, progress, cancel)
    }

    /// Runs `record` again under the policy this receipt recorded (not
    /// today's default, nor whatever the policy file holds now): what
    /// `divergence verify` checks.
    pub fn rerun(
        &self,
        worker_exe: PathBuf,
        progress: Option<Arc<dyn Fn(usize, usize) + Send + Sync>>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Receipt, RunError> {
        let builtin = BuiltinCandidate {
            faults: self.run.faults.clone(),
            ..BuiltinCandidate::default()
        };
        Self::run_with_policy(
            &self.run,
            self.policy.clone(),
            &builtin,
            worker_exe,
            progress,
            cancel,
        )
    }

    fn run_with_policy(
        record: &RunRecord,
        policy: Policy,
        candidate: &dyn CandidateLoader,
        worker_exe: PathBuf,
        progress: Option<Arc<dyn Fn(usize, usize) + Send + Sync>>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Receipt, RunError> {
        let model = PathBuf::from(&record.model_path);
        let cfg = RunConfig {
            steps: record.steps,
            mode: record.mode,
            threads: record.threads,
            kv_type: record.kv_type,
            keep_going: record.keep_going,
            token_faults: record.token_faults.clone(),
            chat: record.chat,
            reference_ffn_act: record.reference_ffn_act,
            progress,
            cancel,
            ..RunConfig::new(
                model.clone(),
                record.prompt.clone(),
                policy.clone(),
                worker_exe,
            )
        };
        let outcome = lockstep::run(&cfg, candidate)?;
        let sha256 = sha256_file(&model)
            .map_err(|e| RunError::Io(format!("hashing {}: {e}", model.display())))?;
        Ok(Receipt::build(record.clone(), sha256, policy, outcome))
    }

    /// The receipt of an offline comparison: `run` describes the reference
    /// dump's run (mode free).
    pub fn offline(
        run: RunRecord,
        sha256: String,
        policy: Policy,
        outcome: Outcome,
        offline: OfflineRecord,
    ) -> Receipt {
        let mut r = Receipt::build(run, sha256, policy, outcome);
        r.offline = Some(offline);
        r
    }

    /// The receipt of a lockstep run the caller ran itself (`divergence
    /// sweep` keeps what it needs of the outcome first): `sha256` is the
    /// model file's.
    pub fn from_outcome(
        run: RunRecord,
        sha256: String,
        policy: Policy,
        outcome: Outcome,
    ) -> Receipt {
        Receipt::build(run, sha256, policy, outcome)
    }

    fn build(run: RunRecord, sha256: String, policy: Policy, outcome: Outcome) -> Receipt {
        let threads = run.threads;
        Receipt {
            schema_version: SCHEMA_VERSION,
            tool: format!("divergence {}", env!("CARGO_PKG_VERSION")),
            model: ModelRecord {
                path: run.model_path.clone(),
                sha256,
                file_size: outcome.model_file_size,
                config: outcome.model,
                file: outcome.file_facts,
                reference_description: outcome.reference_description,
                recipe: outcome.recipe,
            },
            candidate: CandidateRecord {
                engine: outcome.candidate.name,
                build: outcome.candidate.build,
                threads,
                kv_semantics: outcome.candidate.kv_semantics,
            },
            run,
            reference: BuildInfo::current(threads),
            policy,
            verdict: outcome.verdict,
            interrupted: outcome.interrupted,
            steps_run: outcome.steps_run,
            tokens: outcome.tokens,
            first_divergence: outcome.first_divergence,
            later_divergences: outcome.later_divergences,
            stages: outcome.summary,
            step_results: outcome.steps,
            coverage: outcome.coverage,
            config_check: outcome.config_check,
            generated: Generated {
                reference: outcome.generated_reference,
                candidate: outcome.generated_candidate,
                disagreements: outcome.token_disagreements,
            },
            weight_warnings: outcome.weight_warnings,
            reference_failure: outcome.reference_failure,
            candidate_failure: outcome.candidate_failure,
            offline: None,
            volatile: Volatile {
                timestamp_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                timings: outcome.timings,
            },
        }
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("receipts serialize");
        s.push('\n');
        s
    }

    pub fn read(path: &Path) -> Result<Receipt, ReceiptError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ReceiptError::Io(path.to_path_buf(), e))?;
        Self::parse(&text).map_err(|e| ReceiptError::Parse(path.to_path_buf(), e))
    }

    pub fn parse(text: &str) -> Result<Receipt, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Writes atomically: a temp file beside the target, fsync, rename. An
    /// interrupted run leaves the old receipt or the complete new one.
    pub fn write(&self, path: &Path) -> Result<(), ReceiptError> {
        write_atomic(path, self.to_json().as_bytes())
            .map_err(|e| ReceiptError::Io(path.to_path_buf(), e))
    }

    /// The identity of a run's result: what must not change between two runs
    /// of the same command (volatile fields and machine facts left out).
    pub fn identity(&self) -> serde_json::Value {
        serde_json::json!({
            "schema_version": self.schema_version,
            "run": self.run,
            "model_sha256": self.model.sha256,
            "verdict": self.verdict,
            "interrupted": self.interrupted,
            "steps_run": self.steps_run,
            "tokens": self.tokens,
            "first_divergence": self.first_divergence,
            "generated": self.generated,
            "coverage": self.coverage,
            "config_check": self.config_check,
            "reference_failed": self.reference_failure.is_some(),
            "candidate_failure": self.candidate_failure,
        })
    }

    /// Differences in identity between two receipts, as readable lines,
    /// and every stage this receipt found bit-exact that `other` does not.
    pub fn differences(&self, other: &Receipt) -> Vec<String> {
        let (a, b) = (self.identity(), other.identity());
        let mut out = Vec::new();
        for s in self.stages.iter().filter(|s| s.all_exact) {
            let now = other
                .stages
                .iter()
                .find(|o| o.layer == s.layer && o.stage == s.stage);
            match now {
                Some(o) if o.all_exact => {}
                Some(o) => out.push(format!(
                    "stage {}: was bit-exact, now worst NMSE {:.3e}",
                    crate::trace::StageKey::new(s.layer, s.stage),
                    o.worst_nmse
                )),
                None => out.push(format!(
                    "stage {}: was bit-exact, now not judged",
                    crate::trace::StageKey::new(s.layer, s.stage)
                )),
            }
        }
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, va) in a {
                let vb = b.get(k).unwrap_or(&serde_json::Value::Null);
                if va != vb {
                    out.push(format!("{k}: {} -> {}", short(va), short(vb)));
                }
            }
        }
        out
    }
}

fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.len() > 200 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(200).map(|(i, _)| i).unwrap_or(s.len())]
        )
    } else {
        s
    }
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "receipt".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("{path}: {1}", path = .0.display())]
    Io(PathBuf, std::io::Error),
    #[error("{path} is not a valid receipt: {1}", path = .0.display())]
    Parse(PathBuf, serde_json::Error),
}
