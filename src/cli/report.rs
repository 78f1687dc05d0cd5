//! `divergence report`: receipts or a sweep as one self-contained HTML file.

use super::{CliResult, Failure};
use anyhow::anyhow;
use divergence::receipt::{self, Receipt};
use divergence::report;
use divergence::sweep::{self, Sweep};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Receipts (one: its page; several: a comparison page), or one sweep file.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Where to write the HTML.
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
}

/// What an input file holds.
enum Input {
    Receipt(Box<Receipt>),
    Sweep(Box<Sweep>),
}

fn read_input(path: &Path) -> Result<Input, Failure> {
    let text = divergence::input::read_text(
        path,
        divergence::receipt::MAX_RECEIPT_BYTES.max(divergence::sweep::MAX_SWEEP_BYTES),
        "receipt or sweep file",
    )
    .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{} is not JSON: {e}", path.display()))?;
    if sweep::is_sweep(&value) {
        let s = Sweep::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        return Ok(Input::Sweep(Box::new(s)));
    }
    let r = Receipt::parse(&text).map_err(|e| {
        anyhow!(
            "{} is neither a receipt nor a sweep file: {e}",
            path.display()
        )
    })?;
    // The page draws a row per layer: a receipt's claim is checked first.
    let layers = report::receipt::n_layer(&r);
    if layers > divergence::model::MAX_LAYERS {
        return Err(anyhow!(
            "{}: its model has n_layer {layers}: at most {}",
            path.display(),
            divergence::model::MAX_LAYERS
        )
        .into());
    }
    Ok(Input::Receipt(Box::new(r)))
}

/// A file's name for headings.
fn label(path: &Path) -> String {
    path.display().to_string()
}

/// Writes the page of `receipts` to `out` (also `find --html`).
pub fn write_receipts_page(receipts: &[(String, Receipt)], out: &Path) -> Result<(), Failure> {
    let html = report::receipts_page(receipts);
    receipt::write_atomic(out, html.as_bytes())
        .map_err(|e| anyhow!("writing {}: {e}", out.display()).into())
}

pub fn run(args: Args) -> CliResult {
    let inputs: Vec<&Path> = args.inputs.iter().map(PathBuf::as_path).collect();
    divergence::outfile::refuse_overwriting(&args.out, &inputs).map_err(|e| anyhow!(e))?;
    let mut receipts = Vec::new();
    let mut sweeps = Vec::new();
    for path in &args.inputs {
        match read_input(path)? {
            Input::Receipt(r) => receipts.push((label(path), *r)),
            Input::Sweep(s) => sweeps.push((label(path), *s)),
        }
    }
    match (receipts.is_empty(), sweeps.len()) {
        (true, 1) => {
            let (name, s) = &sweeps[0];
            let dir = args
                .out
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let html = report::sweep::sweep_page(name, s, dir);
            receipt::write_atomic(&args.out, html.as_bytes())
                .map_err(|e| anyhow!("writing {}: {e}", args.out.display()))?;
        }
        (false, 0) => write_receipts_page(&receipts, &args.out)?,
        (true, _) => {
            return Err(anyhow!(
                "give one sweep file at a time (merge shards first: divergence merge)"
            )
            .into())
        }
        (false, _) => {
            return Err(anyhow!("give receipts or one sweep file, not both").into());
        }
    }
    outln!("report {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}
