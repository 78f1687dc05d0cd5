//! The JSON receipt: what was run, on what, with which builds and policy,
//! and what was found. Deterministic: the same run writes the same bytes,
//! apart from the `volatile` object (timestamp, timings).
//!
//! A receipt records enough to be re-run (`divergence verify`), and its
//! identity (everything but `volatile` and build-environment facts) is what
//! the parity suite compares with the checked-in copies in `receipts/`.

use crate::candidate::{BuiltinCandidate, CandidateLoader, KvSemantics};
use crate::compare::Policy;
use crate::engine::Fault;
use crate::lockstep::{
    self, CandidateFailure, ConfigMismatch, Coverage, Divergence, Drift, Mode, Outcome, Prompt,
    RunConfig, RunError, StageSummary, StepRecord, TokenCheck, TokenDisagreement, TokenFault,
    Verdict,
};
use crate::model::{KvType, ModelConfig};
use crate::oracle::FileFacts;
use crate::reference::{BuildInfo, FfnAct};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The receipt format's version, written as `schema_version`.
pub const SCHEMA_VERSION: u32 = 3;
/// The JSON Schema every receipt validates against.
pub const SCHEMA: &str = include_str!("../../receipts/schema.json");

/// One run's receipt, as written to JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Receipt {
    /// The format version, [`SCHEMA_VERSION`] when written.
    pub schema_version: u32,
    /// The tool that wrote it, `divergence` and its version.
    pub tool: String,
    /// What was asked: enough for `divergence verify` to run it again.
    pub run: RunRecord,
    /// The model file: path, hash, size and hyperparameters.
    pub model: ModelRecord,
    /// How the bitnet.cpp reference was built (source, patches, compiler
    /// flags) and the CPU features it ran with.
    pub reference: BuildInfo,
    /// The candidate engine.
    pub candidate: CandidateRecord,
    /// The tolerance policy in force, in full.
    pub policy: Policy,
    /// The result in one word.
    pub verdict: Verdict,
    /// Stopped by the user (Ctrl-C) after `steps_run` steps: the verdict
    /// covers only those.
    pub interrupted: bool,
    /// Steps that ran, the prefill (step 0) included.
    pub steps_run: usize,
    /// The prompt's ids on both sides and how they were obtained.
    pub tokens: TokenCheck,
    /// The first stage that failed its rule, if any.
    pub first_divergence: Option<Divergence>,
    /// With `keep_going`: every failing stage after the first.
    pub later_divergences: Vec<Divergence>,
    /// Per (layer, stage), aggregated over the steps run, up to the divergence.
    pub stages: Vec<StageSummary>,
    /// Per step, every stage judged (the report's heatmap).
    pub step_results: Vec<StepRecord>,
    /// What was and was not judged.
    pub coverage: Coverage,
    /// Hyperparameters the candidate read differently from the file.
    pub config_check: Vec<ConfigMismatch>,
    /// Free mode and dumps: how far the two runs grew apart (reported, never
    /// the divergence by itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<Drift>,
    /// The greedy tokens each side chose.
    pub generated: Generated,
    /// F32/F16 weights holding NaN or Inf (the run went on).
    pub weight_warnings: Vec<String>,
    /// What a reader should know that does not change the verdict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remarks: Vec<String>,
    /// Why bitnet.cpp failed, if it did.
    pub reference_failure: Option<String>,
    /// How the candidate failed, if it did.
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
    /// The command that ran the candidate and wrote its dump
    /// (`--candidate-cmd`), when the harness ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_cmd: Option<String>,
}

/// The run request a receipt records, and `divergence verify` repeats.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunRecord {
    /// The GGUF both engines ran, as given.
    pub model_path: String,
    /// The prompt, as text or token ids.
    pub prompt: Prompt,
    /// Greedy decode steps after the prefill.
    pub steps: usize,
    /// Resync or free.
    pub mode: Mode,
    /// Threads for each engine.
    pub threads: usize,
    /// KV cache type of both engines.
    pub kv_type: KvType,
    /// Record every divergence instead of stopping at the first.
    pub keep_going: bool,
    /// Faults injected into the built-in candidate (the bug zoo).
    pub faults: Vec<Fault>,
    /// The one layer the injected faults act in (`find --inject-layer`;
    /// absent: every layer, and outside them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_layer: Option<usize>,
    /// Tokenizer-path faults (the bug zoo).
    pub token_faults: Vec<TokenFault>,
    /// A policy file given with --policy, else the built-in one.
    pub policy_path: Option<String>,
    /// The prompt was formatted with each side's chat template.
    #[serde(default)]
    pub chat: bool,
    /// The reference's own FFN activation (`--reference-ffn-act`): `silu`
    /// is upstream bitnet.cpp's `bitnet-b1.58` bug, on demand; absent in
    /// receipts written before it existed.
    #[serde(default)]
    pub reference_ffn_act: FfnAct,
    /// The FFN activation forced on both engines and the oracle instead of
    /// the arch's own (`--ffn-act`); absent when none was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_act: Option<FfnAct>,
}

/// The model file a run used.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelRecord {
    /// The file, as given (the same as `run.model_path`).
    pub path: String,
    /// sha256 of the file's bytes, hex.
    pub sha256: String,
    /// Size of the file in bytes (0 for an offline comparison).
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

/// The candidate engine that ran.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CandidateRecord {
    /// Its name (for a dump, the manifest's engine).
    pub engine: String,
    /// Its build description.
    pub build: String,
    /// Threads it ran with (the run's `threads`).
    pub threads: usize,
    /// Its KV-cache semantics under resync; `None` when it did not load, or
    /// for an offline comparison.
    pub kv_semantics: Option<KvSemantics>,
}

/// The greedy tokens the two sides chose.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Generated {
    /// The reference's greedy token after each step run (empty when no
    /// decode step was asked for).
    pub reference: Vec<u32>,
    /// The candidate's, from its own logits in free mode.
    pub candidate: Vec<u32>,
    /// Steps where the two chose differently.
    pub disagreements: Vec<TokenDisagreement>,
}

/// What differs between two runs of the same command: never part of a
/// receipt's identity.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct Volatile {
    /// When the receipt was built, in seconds since the Unix epoch.
    pub timestamp_unix: u64,
    /// Wall times of the run's phases and peak memory.
    pub timings: crate::lockstep::Timings,
}

/// The largest receipt read: the largest checked in is 120 KB, and
/// `--keep-going` over thousands of steps stays well below this.
pub const MAX_RECEIPT_BYTES: u64 = 64 << 20;

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
            fault_layer: record.fault_layer,
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
            fault_layer: self.run.fault_layer,
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
            ffn_act: record.ffn_act,
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
        // The model's hash, read beside the run: the engines leave a core
        // idle in their serial phases (the reference's node transfer, the
        // comparison), and a 1.2 GB file takes most of a second to hash.
        let hashing = {
            let model = model.clone();
            std::thread::spawn(move || sha256_file(&model))
        };
        let outcome = lockstep::run(&cfg, candidate)?;
        let sha256 = hashing
            .join()
            .map_err(|_| RunError::Io(format!("hashing {} panicked", model.display())))?
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
            drift: outcome.drift,
            generated: Generated {
                reference: outcome.generated_reference,
                candidate: outcome.generated_candidate,
                disagreements: outcome.token_disagreements,
            },
            weight_warnings: outcome.weight_warnings,
            remarks: outcome.remarks,
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

    /// The receipt as pretty-printed JSON, ending in a newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("receipts serialize");
        s.push('\n');
        s
    }

    /// Reads and parses a receipt file (at most [`MAX_RECEIPT_BYTES`]).
    pub fn read(path: &Path) -> Result<Receipt, ReceiptError> {
        let text = crate::input::read_text(path, MAX_RECEIPT_BYTES, "receipt")
            .map_err(|e| ReceiptError::Io(path.to_path_buf(), e))?;
        Self::parse(&text).map_err(|e| ReceiptError::Parse(path.to_path_buf(), e))
    }

    /// Parses a receipt from JSON text.
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
        let portable = !self.same_machine(other);
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, va) in a {
                let vb = b.get(k).unwrap_or(&serde_json::Value::Null);
                if !portable && va != vb {
                    out.push(format!("{k}: {} -> {}", short(va), short(vb)));
                } else if let Some((at, x, y)) = portable
                    .then(|| first_real_difference(va, vb, String::new()))
                    .flatten()
                {
                    out.push(format!("{k}{at}: {} -> {}", short(x), short(y)));
                }
            }
        }
        out
    }

    /// Whether `other` ran where the same command gives the same bits: the
    /// same CPU features, which choose both engines' SIMD paths (bitnet.cpp
    /// is built with `-march=native`, our kernels dispatch at run time).
    pub fn same_machine(&self, other: &Receipt) -> bool {
        self.reference.cpu_features == other.reference.cpu_features
    }
}

/// Floats that differ by less than this, relatively, are the same result
/// on another CPU (see [`first_real_difference`]).
const PORTABLE_RTOL: f64 = 1e-3;
/// Values this small are rounding noise: an NMSE of a stage both engines
/// compute right is 1e-15 on one CPU and 3e-15 on another.
const PORTABLE_NOISE: f64 = 1e-9;

/// Metrics set by rounding: how many elements differ at all, the largest
/// ULP distance, the largest relative error (on an element near zero).
const NOISE_METRICS: [&str; 3] = ["n_outside", "max_ulp", "max_rel"];

/// Where `a` and `b` first differ as results: the JSON path below `at` and
/// the two values there, or `None`. Two receipts from different CPUs are compared so: on another
/// machine the SIMD paths round differently, so the inexact stages' values
/// and every metric derived from them move in their last bits. Everything
/// else must be equal: verdict, tokens, the first divergence's step,
/// position, layer and stage, its rule, which side is blamed and whether a
/// cause is named, strings, coverage. Floats agree to [`PORTABLE_RTOL`] or
/// are both below [`PORTABLE_NOISE`]. Not compared: the metrics that count
/// or scale rounding itself ([`NOISE_METRICS`]), the order of the worst
/// elements (near-equal errors trade places), the blame's sizes relative
/// to rounding (the reference's at noise level by design) and its reason
/// text, which prints them.
fn first_real_difference<'v>(
    a: &'v serde_json::Value,
    b: &'v serde_json::Value,
    at: String,
) -> Option<(String, &'v serde_json::Value, &'v serde_json::Value)> {
    use serde_json::Value;
    let here = |at: String| Some((if at.is_empty() { ".".into() } else { at }, a, b));
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            let close = x == y
                || (x.abs() < PORTABLE_NOISE && y.abs() < PORTABLE_NOISE)
                || (x - y).abs() <= PORTABLE_RTOL * x.abs().max(y.abs());
            if close {
                None
            } else {
                here(at)
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            if x.len() != y.len() {
                return here(at);
            }
            x.iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (x, y))| first_real_difference(x, y, format!("{at}[{i}]")))
        }
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let (vx, vy) = (
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                );
                let at = format!("{at}.{k}");
                let differ = match k.as_str() {
                    k if NOISE_METRICS.contains(&k) => false,
                    // Which of several near-equal errors ranks first is
                    // rounding too: how many are listed is compared.
                    "worst" => vx.as_array().map(Vec::len) != vy.as_array().map(Vec::len),
                    // The blame's verdict, without its noise-level sizes.
                    "blame" if vx.is_object() && vy.is_object() => {
                        vx.get("blame") != vy.get("blame")
                            || vx.get("cause").is_some() != vy.get("cause").is_some()
                    }
                    _ => return first_real_difference(vx, vy, at),
                };
                differ.then_some((at, vx, vy))
            })
        }
        _ if a != b => here(at),
        _ => None,
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

/// Files this large have their sha256 remembered (see [`sha256_file`]).
const HASH_CACHE_MIN_BYTES: u64 = 64 << 20;

/// The remembered hash of a large file: valid while the file is the same
/// inode with the same size, modification and change times (any write
/// changes the change time, which no user can set back).
#[derive(Serialize, Deserialize)]
struct CachedHash {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    sha256: String,
}

impl CachedHash {
    fn same_file(&self, other: &CachedHash) -> bool {
        (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns)
            == (
                other.dev,
                other.ino,
                other.size,
                other.mtime_ns,
                other.ctime_ns,
            )
    }
}

fn hash_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DIVERGENCE_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("divergence"))
}

/// sha256 of a file, hex. A model file of 64 MiB or more is hashed once per
/// machine: the hash is kept (under `$DIVERGENCE_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/divergence`, else `~/.cache/divergence`) with the file's
/// identity and times, and hashed again whenever any of them changed. A
/// repeated `find` on a 1.2 GB model then skips most of a second of hashing.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    // A FIFO or a device (`/dev/zero`) would be read forever.
    let file = crate::input::open_regular(path, u64::MAX, "model")?;
    let meta = file.metadata()?;
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    let key = CachedHash {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
        ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        sha256: String::new(),
    };
    let slot = (meta.size() >= HASH_CACHE_MIN_BYTES)
        .then(hash_cache_dir)
        .flatten()
        .map(|d| {
            d.join("sha256")
                .join(format!("{}-{}.json", key.dev, key.ino))
        });
    if let Some(slot) = &slot {
        if let Some(hit) = std::fs::read_to_string(slot)
            .ok()
            .and_then(|t| serde_json::from_str::<CachedHash>(&t).ok())
            .filter(|c| key.same_file(c))
        {
            return Ok(hit.sha256);
        }
    }
    let sha256 = sha256_of_contents(file)?;
    if let Some(slot) = slot {
        // A cache that cannot be written only costs the next run the hashing.
        let entry = CachedHash {
            sha256: sha256.clone(),
            ..key
        };
        if let Some(dir) = slot.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = write_atomic(
            &slot,
            serde_json::to_string(&entry).unwrap_or_default().as_bytes(),
        );
    }
    Ok(sha256)
}

/// sha256 of a file's bytes, hex, read in 1 MiB blocks.
fn sha256_of_contents(mut f: std::fs::File) -> std::io::Result<String> {
    use std::io::Read;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `bytes` to `path` whole or not at all: a temporary file beside
/// it, fsync, rename; `/dev/null`, a FIFO or a terminal is written in place
/// (see `crate::outfile`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::outfile::Destination::of(path, "tmp")?.write_all(bytes)
}

/// Why a receipt file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    /// The file at the path could not be read or written.
    #[error("{path}: {1}", path = .0.display())]
    Io(PathBuf, std::io::Error),
    /// The file at the path is not a receipt: not JSON, or not of this schema.
    #[error("{path} is not a valid receipt: {1}", path = .0.display())]
    Parse(PathBuf, serde_json::Error),
}

#[cfg(test)]
mod tests {
    use super::first_real_difference;

    fn same_but_rounding(a: &serde_json::Value, b: &serde_json::Value) -> bool {
        first_real_difference(a, b, String::new()).is_none()
    }
    use serde_json::json;

    fn divergence(ref_nmse: f64, cand_nmse: f64, blame: &str, stage: &str) -> serde_json::Value {
        json!({
            "step": 0, "position": 14, "layer": 0, "stage": stage,
            "metrics": {"n": 900, "exact": false, "nmse": cand_nmse, "max_ulp": 2200631447u64 + (ref_nmse > 3.9e-15) as u64},
            "worst": [{"flat_index": 439, "reference": -30.906609, "candidate": 10.104137}],
            "blame": {
                "blame": blame,
                "reference_nmse_vs_oracle": ref_nmse,
                "reference_error_over_rounding": ref_nmse * 3.7e12,
                "reason": format!("NMSE vs oracle: reference {ref_nmse:.3e}"),
            }
        })
    }

    #[test]
    fn another_cpus_rounding_is_the_same_result() {
        let here = divergence(3.984e-15, 0.8628372221742541, "candidate", "attn_scores");
        let there = divergence(3.891e-15, 0.8628372200929639, "candidate", "attn_scores");
        assert!(same_but_rounding(&here, &there));
    }

    #[test]
    fn a_different_place_side_or_size_is_a_different_result() {
        let here = divergence(3.984e-15, 0.8628, "candidate", "attn_scores");
        for there in [
            divergence(3.984e-15, 0.8628, "candidate", "attn_probs"),
            divergence(3.984e-15, 0.8628, "both", "attn_scores"),
            divergence(3.984e-15, 0.8650, "candidate", "attn_scores"),
            divergence(3.984e-6, 0.8628, "candidate", "attn_scores")
                .as_object()
                .map(|o| {
                    let mut o = o.clone();
                    o.insert("position".into(), json!(13));
                    serde_json::Value::Object(o)
                })
                .unwrap(),
        ] {
            assert!(!same_but_rounding(&here, &there), "{there}");
        }
    }
}
