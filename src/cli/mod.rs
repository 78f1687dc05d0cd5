//! Command-line front end: argument parsing, exit codes, human output.
//!
//! Exit codes: 0 no divergence / success, 1 divergence found, 2 bad input or
//! usage, 3 the reference failed (crashed or refused the model), 130
//! interrupted. A sweep (and a merge) exits with the worst of its prompts'
//! codes (`Sweep::exit_code`).
//!
//! Everything printed goes through [`outln!`], [`json_out!`] or [`errln!`]: control characters from files are escaped
//! ([`terminal`]), and a closed stdout ends the process quietly.

/// `println!` that escapes control characters ([`terminal::escape_lines`])
/// and ends the process quietly when stdout is a closed pipe
/// (`divergence inspect M | head`): std's `println!` panics there.
macro_rules! outln {
    () => { $crate::cli::write_stdout("") };
    ($($arg:tt)*) => { $crate::cli::write_stdout(&format!($($arg)*)) };
}

/// JSON text on stdout, made safe for a terminal without breaking it as
/// JSON ([`terminal::escape_json`]).
macro_rules! json_out {
    ($json:expr) => {
        $crate::cli::write_stdout_raw(&$crate::cli::terminal::escape_json($json))
    };
}

/// `eprintln!` with [`outln!`]'s escaping (and no panic on a closed stderr).
macro_rules! errln {
    ($($arg:tt)*) => { $crate::cli::write_stderr(&format!($($arg)*)) };
}

mod bench;
mod capture;
mod export_tokenizer;
mod find;
mod gen_model;
mod inspect;
mod interrupt;
mod reduce;
mod report;
mod sweep;
pub mod terminal;
mod threads;
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
    /// No progress output (progress bars, notes while waiting) on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
}

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `-q/--quiet` was given.
pub fn quiet() -> bool {
    QUIET.load(std::sync::atomic::Ordering::Relaxed)
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

/// Writes a line to stdout, escaped ([`terminal::escape_lines`]).
pub fn write_stdout(text: &str) {
    write_stdout_raw(&format!("{}\n", terminal::escape_lines(text)));
}

/// Writes to stdout as is; a closed pipe ends the process with exit 0 and
/// no message (the reader has what it wanted), any other error with exit 2.
pub fn write_stdout_raw(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|_| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            write_stderr(&format!("error: writing to stdout: {e}"));
            std::process::exit(2);
        }
    }
}

/// Writes one line to stderr, escaped; a closed stderr is ignored.
pub fn write_stderr(text: &str) {
    use std::io::Write;
    let line = format!("{}\n", terminal::escape_lines(text));
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // Plain text (no colours), escaped: a bad value is echoed back.
            let text = e.render().to_string();
            write_stderr(text.trim_end_matches('\n'));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(0);
        }
    };
    QUIET.store(cli.quiet, std::sync::atomic::Ordering::Relaxed);
    if !matches!(cli.command, Command::ReferenceWorker) {
        interrupt::install();
        // A forced kernel path this CPU cannot run is a usage error, named
        // before any engine loads (the reference worker has no engine of ours).
        if let Err(e) = divergence::engine::Kernel::detect() {
            write_stderr(&format!("error: {e}"));
            return ExitCode::from(2);
        }
    }
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
            errln!("error: {}", terminal::error_chain(&f.error));
            ExitCode::from(f.code)
        }
    }
}
