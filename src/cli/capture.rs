//! `divergence capture`: one engine's run into a safetensors dump, and
//! `divergence compare`: two dumps judged offline.

use super::{interrupt, threads, CliResult, Failure};
use anyhow::anyhow;
use divergence::candidate::BuiltinCandidate;
use divergence::compare::Policy;
use divergence::dump::capture::{capture_candidate, capture_reference, CaptureConfig};
use divergence::dump::map::{map_dump, DumpMap};
use divergence::dump::Dump;
use divergence::dump::Manifest;
use divergence::lockstep::offline::{compare_dumps, CandidateDump, Compared, OfflineOptions};
use divergence::lockstep::{Mode, Prompt};
use divergence::receipt::{OfflineRecord, Receipt, RunRecord};
use divergence::KvType;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Which engine a capture runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineChoice {
    /// bitnet.cpp.
    Reference,
    /// This project's engine.
    Candidate,
}

#[derive(clap::Args)]
pub struct CaptureArgs {
    /// GGUF model.
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (tokenized by the engine itself).
    #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
    prompt: Option<String>,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    tokens: Option<Vec<u32>>,
    /// Greedy decode steps after the prefill.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Which engine to run.
    #[arg(long, value_enum, default_value = "reference")]
    engine: EngineChoice,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// KV cache type.
    #[arg(long, value_parser = super::find::parse_kv, default_value = "f16")]
    kv: KvType,
    /// The FFN activation instead of the arch's own (arches bitnet,
    /// bitnet-b1.58, bitnet-25), recorded in the manifest: `compare` then
    /// gives the oracle the same one.
    #[arg(long, value_enum)]
    ffn_act: Option<divergence::FfnAct>,
    /// The dump to write (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Test-only: inject a fault into the candidate engine (the bug zoo).
    #[arg(long = "inject", hide = true, value_parser = super::find::parse_fault)]
    inject: Vec<divergence::engine::Fault>,
}

pub fn capture(args: CaptureArgs) -> CliResult {
    if args.steps > super::find::MAX_STEPS {
        return Err(anyhow!(
            "--steps {} is absurd: at most {}",
            args.steps,
            super::find::MAX_STEPS
        )
        .into());
    }
    let threads = threads::bounded(args.threads, "--threads")?;
    divergence::outfile::refuse_overwriting(&args.out, &[&args.model]).map_err(|e| anyhow!(e))?;
    if !args.inject.is_empty() && args.engine == EngineChoice::Reference {
        return Err(anyhow!("--inject applies to --engine candidate only").into());
    }
    let prompt = match (&args.prompt, &args.tokens) {
        (_, Some(ids)) if ids.is_empty() => return Err(anyhow!("--tokens is empty").into()),
        (_, Some(ids)) => Prompt::Tokens(ids.clone()),
        (Some(p), None) if p.is_empty() => return Err(anyhow!("--prompt is empty").into()),
        (Some(p), None) => Prompt::Text(p.clone()),
        (None, None) => unreachable!("clap requires one"),
    };
    let cfg = CaptureConfig {
        model: args.model.clone(),
        prompt,
        steps: args.steps,
        threads,
        kv_type: args.kv,
        ffn_act: args.ffn_act,
        out: args.out.clone(),
        cancel: Some(interrupt::flag()),
    };
    let result = match args.engine {
        EngineChoice::Reference => {
            let worker =
                divergence::reference::worker::default_exe().map_err(anyhow::Error::from)?;
            capture_reference(&cfg, &worker)
        }
        EngineChoice::Candidate => capture_candidate(
            &cfg,
            &BuiltinCandidate {
                faults: args.inject.clone(),
                ..BuiltinCandidate::default()
            },
        ),
    };
    let manifest = result.map_err(|e| {
        let code = match e {
            divergence::dump::capture::CaptureError::Reference(_) => 3,
            divergence::dump::capture::CaptureError::Candidate(_) => 5,
            _ => 2,
        };
        Failure {
            code,
            error: anyhow::Error::from(e).context(format!("capturing {}", args.model.display())),
        }
    })?;
    // Counted from the file when it is one: a FIFO or `/dev/null` output
    // cannot be read back.
    let tensors = std::fs::metadata(&args.out)
        .is_ok_and(|m| m.is_file())
        .then(|| Dump::open(&args.out).map(|d| d.names().count()).ok())
        .flatten()
        .map(|n| format!(", {n} tensors"))
        .unwrap_or_default();
    outln!(
        "dump    {} ({} engine, {} step(s){tensors})",
        args.out.display(),
        manifest.engine,
        manifest.steps.len()
    );
    if manifest.interrupted {
        outln!(
            "INTERRUPTED after {} step(s): the dump holds those (its manifest says \"interrupted\")",
            manifest.steps.len()
        );
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct CompareArgs {
    /// The reference dump (from `capture --engine reference`).
    #[arg(long)]
    reference: PathBuf,
    /// The candidate's dump (ours, or another engine's with --map).
    #[arg(long)]
    candidate: PathBuf,
    /// The model: the f64 oracle then blames the first failing stage.
    #[arg(long)]
    model: Option<PathBuf>,
    /// How the candidate dump's names and layouts map onto canonical stages.
    #[arg(long)]
    map: Option<PathBuf>,
    /// Tolerance policy (JSON); its free_run rules judge.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Where to write the receipt.
    #[arg(long, default_value = "divergence-receipt.json")]
    receipt: PathBuf,
    /// Record every failing stage instead of stopping at the first.
    #[arg(long)]
    keep_going: bool,
    /// Print the receipt JSON on stdout instead of the summary.
    #[arg(long)]
    json: bool,
    /// The FFN activation the oracle runs instead of the arch's own
    /// (default: the one the reference dump's manifest records).
    #[arg(long, value_enum)]
    ffn_act: Option<divergence::FfnAct>,
}

pub fn compare(args: CompareArgs) -> CliResult {
    let mut inputs = vec![args.reference.as_path(), args.candidate.as_path()];
    inputs.extend(args.model.as_deref());
    inputs.extend(args.map.as_deref());
    inputs.extend(args.policy.as_deref());
    divergence::outfile::refuse_overwriting(&args.receipt, &inputs).map_err(|e| anyhow!(e))?;
    let policy = match &args.policy {
        Some(p) => Policy::load(p)?,
        None => Policy::default_policy(),
    };
    let reference = Dump::open(&args.reference)?;
    let map = match &args.map {
        Some(p) => Some(DumpMap::load(p)?),
        None => None,
    };
    // A candidate dump that cannot be read or mapped is the candidate's failure: a receipt.
    let (cand_dump, mapped) = match Dump::open(&args.candidate) {
        Ok(d) => {
            let m = map_dump(&d, map.as_ref()).map_err(|e| e.to_string());
            (Some(d), m)
        }
        Err(e) => (None, Err(e.to_string())),
    };
    let candidate = CandidateDump {
        stages: mapped.as_ref().map_err(|e| e.clone()),
        manifest: cand_dump.as_ref().and_then(|d| d.manifest.as_ref()),
        label: args.candidate.display().to_string(),
    };
    let opts = OfflineOptions {
        policy: policy.clone(),
        keep_going: args.keep_going,
        model: args.model.clone(),
        worker_exe: divergence::reference::worker::default_exe().ok(),
        ffn_act: args.ffn_act,
    };
    let compared = compare_dumps(&reference, &candidate, &opts)?;
    let m = reference
        .manifest
        .as_ref()
        .expect("compare_dumps checked the manifest");
    let offline = OfflineRecord {
        reference_dump: args.reference.display().to_string(),
        candidate_dump: args.candidate.display().to_string(),
        map: args.map.as_ref().map(|p| p.display().to_string()),
        model_given: compared.model.is_some(),
        note: String::new(),
        candidate_cmd: None,
    };
    let receipt = offline_receipt(
        m,
        compared,
        policy,
        args.policy.as_deref(),
        args.keep_going,
        offline,
    );
    receipt.write(&args.receipt).map_err(|e| Failure {
        code: 2,
        error: e.into(),
    })?;
    if args.json {
        json_out!(&receipt.to_json());
    } else {
        super::find::print_summary(&receipt, &args.receipt);
    }
    Ok(super::find::exit_code(&receipt))
}

/// The receipt of a comparison of dumps (`compare`, and `find` or `sweep`
/// with `--candidate-cmd`): the run as the reference dump's manifest `m`
/// records it, the model the oracle read.
pub fn offline_receipt(
    m: &Manifest,
    compared: Compared,
    policy: Policy,
    policy_path: Option<&Path>,
    keep_going: bool,
    mut offline: OfflineRecord,
) -> Receipt {
    let (model_path, sha256) = match &compared.model {
        Some((p, sha)) => (p.display().to_string(), sha.clone()),
        None => (m.model_path.clone(), m.model_sha256.clone()),
    };
    let record = RunRecord {
        model_path,
        prompt: match &m.prompt {
            Some(text) => Prompt::Text(text.clone()),
            None => Prompt::Tokens(
                m.steps
                    .first()
                    .map(|s| s.tokens.clone())
                    .unwrap_or_default(),
            ),
        },
        steps: m.steps.len().saturating_sub(1),
        mode: Mode::Free,
        threads: m.threads,
        kv_type: m.kv_type,
        keep_going,
        faults: vec![],
        token_faults: vec![],
        fault_layer: None,
        policy_path: policy_path.map(|p| p.display().to_string()),
        chat: false,
        // `divergence capture` dumps the reference as the model defines it.
        reference_ffn_act: Default::default(),
        ffn_act: compared.ffn_act,
    };
    offline.model_given = compared.model.is_some();
    offline.note = if offline.model_given {
        "offline comparison of two dumps: each engine fed itself; the f64 oracle recomputed every stage of each dump from that dump's own inputs and judged each side's local error; side against side is the drift".to_string()
    } else {
        "offline comparison of two dumps without the model: only side against side could be measured, so the verdict cannot vouch for either side (give --model)".to_string()
    };
    Receipt::offline(record, sha256, policy, compared.outcome, offline)
}
