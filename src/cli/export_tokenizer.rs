//! `divergence export-tokenizer --model M -o tokenizer.json`: the GGUF's
//! vocabulary as a Hugging Face tokenizer.json (see
//! `divergence::engine::tokenizer::hf` for what is written and why), checked
//! by loading it back with the `tokenizers` crate before reporting success.

use super::CliResult;
use divergence::engine::tokenizer::{hf, Tokenizer};
use divergence::gguf::GgufFile;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF file (a vocabulary-only file works).
    #[arg(long)]
    model: PathBuf,
    /// Where to write the tokenizer.json.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(args: Args) -> CliResult {
    divergence::outfile::refuse_overwriting(&args.output, &[&args.model])
        .map_err(|e| anyhow::anyhow!(e))?;
    let file = GgufFile::open(&args.model)?;
    let json = hf::tokenizer_json(&file)?;
    let text = serde_json::to_string(&json)?;
    // Loaded back before it is written: a file the tokenizers crate
    // refuses is never left behind.
    let loaded: tokenizers::Tokenizer = text.parse().map_err(|e| {
        anyhow::anyhow!(
            "{}: the tokenizers crate cannot load the tokenizer.json made from it ({e}); nothing written",
            args.model.display()
        )
    })?;
    divergence::receipt::write_atomic(&args.output, text.as_bytes())
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", args.output.display()))?;
    let tok = Tokenizer::from_gguf(&file)?;
    outln!(
        "wrote {} ({} bytes): {}; the tokenizers crate loads it ({} tokens)",
        args.output.display(),
        text.len(),
        tok.describe(),
        loaded.get_vocab_size(true)
    );
    Ok(ExitCode::SUCCESS)
}
