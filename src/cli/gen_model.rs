//! `divergence gen-model`: write a deterministic synthetic BitNet model.
//!
//! Start from a preset, override any field, and get the same bytes for the
//! same arguments every time. Prints the path, size and sha256 so a test log
//! or a receipt can name exactly which model it ran.

use super::CliResult;
use anyhow::Context;
use divergence::gguf::GgmlType;
use divergence::synth::{self, CopiedVocab, Preset, SynthConfig};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum EmbdType {
    F16,
    F32,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model shape to start from; every other option overrides one field.
    #[arg(long, value_enum, default_value_t = Preset::Tiny)]
    preset: Preset,
    /// Architecture: bitnet, bitnet-b1.58, bitnet-25 (2B-4T under the name
    /// ik_llama.cpp gives it: the bitnet-b1.58 layout, keys `bitnet-25.*`) or llama.
    #[arg(long)]
    arch: Option<String>,
    #[arg(long)]
    n_embd: Option<usize>,
    #[arg(long)]
    n_layer: Option<usize>,
    #[arg(long)]
    n_head: Option<usize>,
    #[arg(long)]
    n_head_kv: Option<usize>,
    #[arg(long)]
    n_ff: Option<usize>,
    #[arg(long)]
    n_vocab: Option<usize>,
    #[arg(long)]
    n_ctx: Option<usize>,
    #[arg(long)]
    rope_theta: Option<f32>,
    /// RMSNorm epsilon.
    #[arg(long)]
    eps: Option<f32>,
    /// Type of token_embd.weight.
    #[arg(long, value_enum)]
    embd_type: Option<EmbdType>,
    /// Write per-tensor blk.N.<proj>.scale tensors (inline I2_S scales become 1.0).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    scale_tensors: Option<bool>,
    /// attn_norm weights around 0.01..0.05, as in the real 2B-4T.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    tiny_attn_norm: Option<bool>,
    /// Write a separate output.weight (untied logits; not for arch bitnet).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    untied_output: Option<bool>,
    /// Copy the tokenizer (every `tokenizer.*` key) of another GGUF file,
    /// e.g. llama.cpp's vocab-only ggml-vocab-llama-bpe.gguf; n_vocab becomes
    /// its token count. Arches bitnet-b1.58 and bitnet-25 drop its `tokenizer.ggml.pre`, as
    /// the published 2B-4T file has none.
    #[arg(long, value_name = "FILE.gguf")]
    vocab: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the model (replaced atomically).
    #[arg(short, long)]
    output: PathBuf,
}

impl Args {
    fn config(&self) -> anyhow::Result<SynthConfig> {
        let mut cfg = SynthConfig::preset(self.preset);
        macro_rules! override_with {
            ($($field:ident <- $arg:expr),* $(,)?) => {
                $(if let Some(v) = $arg.clone() { cfg.$field = v; })*
            };
        }
        override_with!(
            arch <- self.arch,
            n_embd <- self.n_embd,
            n_layer <- self.n_layer,
            n_head <- self.n_head,
            n_head_kv <- self.n_head_kv,
            n_ff <- self.n_ff,
            n_vocab <- self.n_vocab,
            n_ctx <- self.n_ctx,
            rope_theta <- self.rope_theta,
            rms_eps <- self.eps,
            scale_tensors <- self.scale_tensors,
            tiny_attn_norm <- self.tiny_attn_norm,
            untied_output <- self.untied_output,
        );
        if let Some(t) = self.embd_type {
            cfg.embd_type = match t {
                EmbdType::F16 => GgmlType::F16,
                EmbdType::F32 => GgmlType::F32,
            };
        }
        cfg.seed = self.seed;
        if let Some(path) = &self.vocab {
            let vocab = CopiedVocab::from_gguf(path)?;
            let n = vocab.n_tokens().unwrap_or(0);
            if let Some(asked) = self.n_vocab.filter(|&v| v != n) {
                anyhow::bail!(
                    "--n-vocab {asked} contradicts --vocab {}, which has {n} tokens",
                    path.display()
                );
            }
            cfg.n_vocab = n;
            cfg.vocab = Some(vocab);
            cfg.vocab_source = Some(synth::VocabSource {
                path: path.display().to_string(),
                sha256: divergence::receipt::sha256_file(path)
                    .with_context(|| format!("hashing {}", path.display()))?,
            });
        }
        Ok(cfg)
    }
}

pub fn run(args: Args) -> CliResult {
    if let Some(vocab) = &args.vocab {
        divergence::outfile::refuse_overwriting(&args.output, &[vocab])
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    let cfg = args.config()?;
    let started = Instant::now();
    synth::write_model(&cfg, &args.output)?;
    let elapsed = started.elapsed();
    let (size, digest) = sha256_file(&args.output)?;
    outln!("path    {}", args.output.display());
    outln!("size    {size} bytes");
    outln!("sha256  {digest}");
    outln!(
        "model   {} preset {} seed {}: n_embd {} n_layer {} heads {}/{} n_ff {} n_vocab {} ({:.1} s)",
        cfg.arch,
        args.preset,
        cfg.seed,
        cfg.n_embd,
        cfg.n_layer,
        cfg.n_head,
        cfg.n_head_kv,
        cfg.n_ff,
        cfg.n_vocab,
        elapsed.as_secs_f64()
    );
    outln!(
        "vocab   {}",
        match &cfg.vocab {
            Some(v) => format!("copied from {}", v.source),
            None => format!(
                "synthetic {}",
                match synth::VocabKind::of_arch(&cfg.arch) {
                    synth::VocabKind::ByteBpe => "gpt2 (byte-level BPE)",
                    synth::VocabKind::SentencePiece => "llama (SentencePiece)",
                }
            ),
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn sha256_file(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reopening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((size, hex))
}
