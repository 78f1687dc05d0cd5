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
    let file = GgufFile::open(&args.model)?;
    let json = hf::tokenizer_json(&file)?;
    let text = serde_json::to_string(&json)?;
    std::fs::write(&args.output, &text)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", args.output.display()))?;
    let loaded = tokenizers::Tokenizer::from_file(&args.output).map_err(|e| {
        anyhow::anyhow!(
            "wrote {}, but the tokenizers crate cannot load it: {e}",
            args.output.display()
        )
    })?;
    let tok = Tokenizer::from_gguf(&file)?;
    println!(
        "wrote {} ({} bytes): {}; the tokenizers crate loads it ({} tokens)",
        args.output.display(),
        text.len(),
        tok.describe(),
        loaded.get_vocab_size(true)
    );
    Ok(ExitCode::SUCCESS)
}
