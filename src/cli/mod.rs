//! Command-line front end: argument parsing, exit codes, human output.
//!
//! Exit codes: 0 no divergence / success, 1 divergence found, 2 bad input or
//! usage, 3 the reference failed (crashed or refused the model). A sweep (and
//! a merge) exits with the worst of its prompts' codes (`Sweep::exit_code`).

/// `println!` that ends the process quietly when stdout is a closed pipe
/// (`divergence inspect M | head`): std's `println!` panics there.
macro_rules! outln {
    () => { $crate::cli::write_stdout(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::cli::write_stdout(format_args!($($arg)*), true) };
}

/// `print!` with [`outln!`]'s handling of a closed pipe.
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::write_stdout(format_args!($($arg)*), false) };
}

mod bench;
mod capture;
mod export_tokenizer;
mod find;
mod gen_model;
mod inspect;
mod reduce;
mod report;
mod sweep;
mod tokens;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// A failure with the exit code it maps to.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 2,
            error: e.into(),
        }
    }
}

pub type CliResult = Result<ExitCode, Failure>;

#[derive(Parser)]
#[command(
    name = "divergence",
    version,
    about = "Find the first divergence between a BitNet engine and bitnet.cpp"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run bitnet.cpp and the candidate in lockstep; report the first divergence.
    Find(find::Args),
    /// Re-run what receipts recorded and check the result is the same.
    Verify(find::VerifyArgs),
    /// Run one engine and write every stage of every step to a safetensors dump.
    Capture(capture::CaptureArgs),
    /// Judge a candidate's dump against a reference dump offline.
    Compare(capture::CompareArgs),
    /// Time both engines (or their I2_S kernels) on the same model and threads.
    Bench(bench::Args),
    /// Print a GGUF file's header, metadata, tensor table and statistics.
    Inspect(inspect::Args),
    /// Write a deterministic synthetic BitNet model.
    GenModel(gen_model::Args),
    /// Token ids from bitnet.cpp, the candidate and a tokenizer.json; where they differ.
    Tokens(tokens::Args),
    /// Write a GGUF's vocabulary as a Hugging Face tokenizer.json.
    ExportTokenizer(export_tokenizer::Args),
    /// Render receipts (or a sweep) as one self-contained HTML file.
    Report(report::Args),
    /// Shrink a receipt's divergence to the smallest model, prompt and run that still show it.
    Reduce(reduce::Args),
    /// Run every prompt of a corpus in lockstep; KL and error statistics over them.
    Sweep(sweep::SweepArgs),
    /// Merge the shard files of one sweep into what the unsharded sweep writes.
    Merge(sweep::MergeArgs),
    /// Internal: serve the reference engine over stdin/stdout (crash isolation).
    #[command(name = "__reference-worker", hide = true)]
    ReferenceWorker,
}

/// Writes to stdout; a closed pipe ends the process with exit 0 and no
/// message (the reader has what it wanted), any other error with exit 2.
pub fn write_stdout(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|_| {
            if newline {
                stdout.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|_| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: writing to stdout: {e}");
            std::process::exit(2);
        }
    }
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Find(a) => find::run(a),
        Command::Verify(a) => find::verify(a),
        Command::Capture(a) => capture::capture(a),
        Command::Compare(a) => capture::compare(a),
        Command::Bench(a) => bench::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::GenModel(a) => gen_model::run(a),
        Command::Tokens(a) => tokens::run(a),
        Command::ExportTokenizer(a) => export_tokenizer::run(a),
        Command::Report(a) => report::run(a),
        Command::Reduce(a) => reduce::run(a),
        Command::Sweep(a) => sweep::sweep(a),
        Command::Merge(a) => sweep::merge(a),
        Command::ReferenceWorker => {
            return ExitCode::from(divergence::reference::worker::serve() as u8)
        }
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
