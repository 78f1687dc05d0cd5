//! `divergence reduce`: shrink a receipt's divergence (see `reduce/`), with
//! a progress line on a terminal and a summary at the end.

use super::{CliResult, Failure};
use anyhow::anyhow;
use divergence::receipt::Receipt;
use divergence::reduce::{Attempt, Judgement, Options, ReduceError, Reducer};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The receipt whose first divergence is to be reduced.
    receipt: PathBuf,
    /// Output folder: reduced.gguf, receipt.json, repro.sh, tokens.txt,
    /// prompt.txt, min-good.gguf, attempts.jsonl (read back to resume).
    #[arg(short = 'o', long = "out")]
    out: PathBuf,
    /// Start no attempt after this many seconds.
    #[arg(long)]
    budget_s: Option<f64>,
    /// Repeat every pass until a whole round takes nothing.
    #[arg(long)]
    keep_going: bool,
    /// Run every attempt (the original's two checking runs included) at
    /// this many threads instead of the receipt's; the threads are then
    /// not reduced.
    #[arg(long)]
    threads: Option<usize>,
    /// No progress line.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: Args) -> CliResult {
    if args.budget_s.is_some_and(|b| !(b > 0.0 && b.is_finite())) {
        return Err(anyhow!("--budget-s must be a positive number of seconds").into());
    }
    let threads = match args.threads {
        Some(t) => Some(super::threads::bounded(t, "--threads")?),
        None => None,
    };
    let original =
        Receipt::read(&args.receipt).map_err(|e| anyhow!("{}: {e}", args.receipt.display()))?;
    // Ctrl-C (the shared handler): stop after the current attempt; what is
    // written stays usable.
    let stop = super::interrupt::flag();
    let bar = (!args.quiet && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed} attempt {pos}: {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        b.enable_steady_tick(std::time::Duration::from_millis(200));
        b
    });
    let on_attempt = bar.clone().map(|b| {
        Box::new(move |a: &Attempt| {
            b.inc(1);
            b.set_message(format!(
                "{} {}",
                match a.judgement {
                    Judgement::Fails => "taken",
                    Judgement::Unresolved => "not taken",
                    Judgement::Skipped => "skipped",
                },
                a.what
            ));
        }) as Box<dyn Fn(&Attempt)>
    });
    let worker = divergence::reference::worker::default_exe().map_err(anyhow::Error::from)?;
    let policy_receipt = original.clone();
    let mut runner = move |record: &divergence::receipt::RunRecord| {
        let mut r = policy_receipt.clone();
        r.run = record.clone();
        r.rerun(worker.clone(), None, None)
            .map_err(|e| format!("{e:#}"))
    };
    let opts = Options {
        dir: args.out.clone(),
        budget_s: args.budget_s,
        keep_going: args.keep_going,
        stop,
        on_attempt,
        threads,
    };
    let summary = Reducer::new(original, opts, &mut runner)
        .and_then(Reducer::reduce)
        .map_err(|e| Failure {
            code: match e {
                ReduceError::Io(_) => 3,
                _ => 2,
            },
            error: anyhow!("{}: {e}", args.receipt.display()),
        })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    outln!("kept    {}", summary.signature);
    outln!(
        "model   {} ({} bytes, from {}), {} layer(s)",
        summary.model.display(),
        summary.model_bytes,
        summary.original_model_bytes,
        summary.n_layer.map_or("?".into(), |n| n.to_string())
    );
    outln!(
        "run     {} prompt token(s), {} decode step(s)",
        summary
            .prompt_tokens
            .map_or("text".into(), |n| n.to_string()),
        summary.steps
    );
    outln!(
        "search  {} attempt(s), {} taken{}",
        summary.attempts,
        summary.taken,
        summary
            .stopped_early
            .as_ref()
            .map(|s| format!("; stopped early: {s}"))
            .unwrap_or_default()
    );
    outln!("receipt {}", summary.receipt.display());
    if let Some(g) = &summary.min_good {
        outln!("min-good {}", g.display());
    }
    outln!("repro   {}", args.out.join("repro.sh").display());
    Ok(ExitCode::SUCCESS)
}
