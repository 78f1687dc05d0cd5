//! `divergence inspect MODEL`: everything in a GGUF file, with numbers.
//!
//! Header, metadata (arrays summarized), the tensor table, and per-tensor
//! statistics for the tensors whose values can be read directly: F32/F16
//! (norms, embeddings) get mean, std, min, max and NaN/Inf counts; I2_S gets
//! its code histogram and scale. This is the tool that settles "are the norm
//! weights corrupt?". A tokenizer summary says what the vocab is and how
//! bitnet.cpp will read it (which pre-tokenizer it splits text with).

use super::terminal::escape;
use super::CliResult;
use divergence::gguf::{tensor_stats, GgufFile, MetaArray, MetaValue, TensorStats};
use divergence::reference::vocab::{self, VocabReading};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;

/// Array elements shown in summaries.
const ARRAY_PREVIEW: usize = 5;

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF file.
    model: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Skip per-tensor statistics (they read every byte of the file).
    #[arg(long)]
    no_stats: bool,
}

pub fn run(args: Args) -> CliResult {
    let file = GgufFile::open(&args.model)?;
    let stats: Vec<Option<TensorStats>> = if args.no_stats {
        vec![None; file.tensors().len()]
    } else {
        file.tensors()
            .iter()
            .map(|t| tensor_stats(&file, t))
            .collect()
    };
    if args.json {
        json_out!(&serde_json::to_string_pretty(&to_json(&file, &stats))?);
        outln!();
    } else {
        print_text(&file, &stats);
    }
    if let Some(w) = divergence::oracle::OracleModel::read(&file)
        .ok()
        .and_then(|m| {
            m.facts
                .relu2_trained_as_bitnet(file.get_str("general.name").ok())
        })
    {
        errln!("warning: {w}");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_text(file: &GgufFile, stats: &[Option<TensorStats>]) {
    if let Some(p) = file.path() {
        outln!("file         {}", p.display());
    }
    outln!("version      {}", file.version());
    outln!("file size    {} bytes", file.file_size());
    outln!("alignment    {}", file.alignment());
    outln!("data offset  {}", file.data_offset());
    outln!("metadata     {} keys", file.metadata().len());
    outln!("tensors      {}", file.tensors().len());

    outln!("\nmetadata:");
    for (key, value) in file.metadata() {
        // A name from the file: every control character shown, newlines too.
        let key = escape(key);
        match value {
            // An array summary starts with its own type and length.
            MetaValue::Array(_) => outln!("  {key:<48} {value}"),
            _ => outln!("  {key:<48} {:<6} {value}", value.type_description()),
        }
    }

    let t = TokenizerSummary::of(file);
    outln!("\ntokenizer:");
    outln!(
        "  model        {} ({} tokens{})",
        t.model.as_deref().unwrap_or("(none)"),
        t.n_tokens.map_or("no".into(), |n| n.to_string()),
        t.n_merges
            .map(|n| format!(", {n} merges"))
            .unwrap_or_default()
    );
    match (&t.reading, &t.pre) {
        (Ok(r), _) if r.pre_missing => outln!(
            "  pre          (absent) -> bitnet.cpp uses '{}' (it logs \"missing pre-tokenizer type, using: 'default'\")",
            r.pre_tokenizer
        ),
        (Ok(r), Some(pre)) => outln!("  pre          {pre:?} -> bitnet.cpp uses '{}'", r.pre_tokenizer),
        (Ok(r), None) => outln!(
            "  pre          (none: {} vocab) -> bitnet.cpp uses '{}'",
            r.vocab_type,
            r.pre_tokenizer
        ),
        (Err(e), _) => outln!("  pre          bitnet.cpp will refuse this vocab: {e}"),
    }
    for (label, id) in [("bos", &t.bos), ("eos", &t.eos), ("padding", &t.padding)] {
        if let Some((id, text)) = id {
            outln!(
                "  {label:<12} {id} {}",
                text.as_deref()
                    .map_or("(outside the vocab)".into(), |s| format!("{s:?}"))
            );
        }
    }
    if let Some(add) = t.add_bos {
        outln!("  add_bos      {add}");
    }
    if let Some(chars) = t.chat_template_chars {
        outln!(
            "  chat         template of {chars} chars{}",
            if t.template_writes_bos {
                " that writes {{ bos_token }} itself (rendered and tokenized with add_bos: BOS twice)"
            } else {
                ""
            }
        );
    }

    outln!("\ntensors:");
    outln!(
        "  {:<32} {:<5} {:<20} {:>12} {:>12}  stats",
        "name",
        "type",
        "dims",
        "bytes",
        "offset"
    );
    for (t, s) in file.tensors().iter().zip(stats) {
        let dims = format!("{:?}", t.dims);
        let s = s.as_ref().map(stats_text).unwrap_or_default();
        outln!(
            "  {:<32} {:<5} {:<20} {:>12} {:>12}  {s}",
            escape(&t.name),
            t.ty.name(),
            dims,
            t.n_bytes,
            t.offset
        );
    }
}

/// The tokenizer keys in brief, and how bitnet.cpp will read them.
struct TokenizerSummary {
    model: Option<String>,
    n_tokens: Option<usize>,
    n_merges: Option<usize>,
    pre: Option<String>,
    reading: Result<VocabReading, String>,
    /// (id, token text) of the special tokens the file names.
    bos: Option<(u32, Option<String>)>,
    eos: Option<(u32, Option<String>)>,
    padding: Option<(u32, Option<String>)>,
    add_bos: Option<bool>,
    chat_template_chars: Option<usize>,
    template_writes_bos: bool,
}

impl TokenizerSummary {
    fn of(file: &GgufFile) -> TokenizerSummary {
        let string = |k: &str| file.get_str(k).ok().map(str::to_owned);
        let tokens = file.get_str_array("tokenizer.ggml.tokens").ok();
        let count = |k: &str| match file.get(k) {
            Some(MetaValue::Array(a)) => Some(a.len()),
            _ => None,
        };
        let special = |k: &str| {
            let id = file.get_u32(k).ok()?;
            let text = tokens
                .as_ref()
                .and_then(|t| t.get(id as usize))
                .map(|s| s.to_string());
            Some((id, text))
        };
        let model = string("tokenizer.ggml.model");
        let pre = string("tokenizer.ggml.pre");
        let template = string("tokenizer.chat_template");
        TokenizerSummary {
            reading: match &model {
                Some(m) => vocab::reading(m, pre.as_deref()),
                None => Err("no tokenizer.ggml.model".into()),
            },
            model,
            n_tokens: count("tokenizer.ggml.tokens"),
            n_merges: count("tokenizer.ggml.merges"),
            pre,
            bos: special("tokenizer.ggml.bos_token_id"),
            eos: special("tokenizer.ggml.eos_token_id"),
            padding: special("tokenizer.ggml.padding_token_id"),
            add_bos: file.get_bool("tokenizer.ggml.add_bos_token").ok(),
            chat_template_chars: template.as_ref().map(|t| t.chars().count()),
            template_writes_bos: template.is_some_and(|t| t.contains("bos_token")),
        }
    }

    fn to_json(&self) -> Value {
        let special = |s: &Option<(u32, Option<String>)>| {
            s.as_ref()
                .map(|(id, text)| json!({ "id": id, "token": text }))
        };
        json!({
            "model": self.model,
            "tokens": self.n_tokens,
            "merges": self.n_merges,
            "pre": self.pre,
            "bitnet_cpp": match &self.reading {
                Ok(r) => json!(r),
                Err(e) => json!({ "error": e }),
            },
            "bos": special(&self.bos),
            "eos": special(&self.eos),
            "padding": special(&self.padding),
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template_chars.map(|chars| json!({
                "chars": chars,
                "writes_bos_token": self.template_writes_bos,
            })),
        })
    }
}

fn stats_text(s: &TensorStats) -> String {
    match *s {
        TensorStats::Float {
            mean,
            std,
            min,
            max,
            nan,
            inf,
            ..
        } => {
            format!("mean {mean:.4} std {std:.4} min {min:.4} max {max:.4} nan {nan} inf {inf}")
        }
        TensorStats::Ternary {
            minus_one,
            zero,
            plus_one,
            invalid,
            scale,
            ..
        } => format!(
            "-1 {:.1}% 0 {:.1}% +1 {:.1}%{} scale {scale:.6}",
            minus_one * 100.0,
            zero * 100.0,
            plus_one * 100.0,
            if invalid > 0 {
                format!(" INVALID CODES {invalid}")
            } else {
                String::new()
            }
        ),
    }
}

fn to_json(file: &GgufFile, stats: &[Option<TensorStats>]) -> Value {
    let metadata: serde_json::Map<String, Value> = file
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), value_json(v)))
        .collect();
    let tensors: Vec<Value> = file
        .tensors()
        .iter()
        .zip(stats)
        .map(|(t, s)| {
            json!({
                "name": t.name,
                "type": t.ty.name(),
                "dims": t.dims,
                "n_elements": t.n_elements(),
                "n_bytes": t.n_bytes,
                "offset": t.offset,
                "stats": s,
            })
        })
        .collect();
    json!({
        "path": file.path().map(|p| p.display().to_string()),
        "arch": file.get_str("general.architecture").ok(),
        "version": file.version(),
        "file_size": file.file_size(),
        "alignment": file.alignment(),
        "data_offset": file.data_offset(),
        "n_kv": file.metadata().len(),
        "n_tensors": file.tensors().len(),
        "metadata": metadata,
        "tokenizer": TokenizerSummary::of(file).to_json(),
        "tensors": tensors,
    })
}

/// Scalars as JSON values (non-finite floats as strings); arrays as a
/// summary: element type, length, the first few elements.
fn value_json(v: &MetaValue) -> Value {
    let float = |x: f64| {
        if x.is_finite() {
            json!(x)
        } else {
            json!(x.to_string())
        }
    };
    match v {
        MetaValue::U8(x) => json!(x),
        MetaValue::I8(x) => json!(x),
        MetaValue::U16(x) => json!(x),
        MetaValue::I16(x) => json!(x),
        MetaValue::U32(x) => json!(x),
        MetaValue::I32(x) => json!(x),
        MetaValue::U64(x) => json!(x),
        MetaValue::I64(x) => json!(x),
        MetaValue::F32(x) => float(f64::from(*x)),
        MetaValue::F64(x) => float(*x),
        MetaValue::Bool(x) => json!(x),
        MetaValue::String(s) => json!(s),
        MetaValue::Array(a) => array_json(a),
    }
}

fn array_json(a: &MetaArray) -> Value {
    let first: Vec<Value> = (0..a.len().min(ARRAY_PREVIEW))
        .filter_map(|i| a.get(i))
        .map(|v| value_json(&v))
        .collect();
    json!({
        "type": a.type_description(),
        "len": a.len(),
        "first": first,
    })
}
