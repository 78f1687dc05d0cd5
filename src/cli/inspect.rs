//! `divergence inspect MODEL`: everything in a GGUF file, with numbers.
//!
//! Header, metadata (arrays summarized), the tensor table, and per-tensor
//! statistics for the tensors whose values can be read directly: F32/F16
//! (norms, embeddings) get mean, std, min, max and NaN/Inf counts; I2_S gets
//! its code histogram and scale. This is the tool that settles "are the norm
//! weights corrupt?".

use super::CliResult;
use divergence::gguf::{tensor_stats, GgufFile, MetaArray, MetaValue, TensorStats};
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
        outln!("{}", serde_json::to_string_pretty(&to_json(&file, &stats))?);
    } else {
        print_text(&file, &stats);
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
        match value {
            // An array summary starts with its own type and length.
            MetaValue::Array(_) => outln!("  {key:<48} {value}"),
            _ => outln!("  {key:<48} {:<6} {value}", value.type_description()),
        }
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
            t.name,
            t.ty.name(),
            dims,
            t.n_bytes,
            t.offset
        );
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
        "version": file.version(),
        "file_size": file.file_size(),
        "alignment": file.alignment(),
        "data_offset": file.data_offset(),
        "n_kv": file.metadata().len(),
        "n_tensors": file.tensors().len(),
        "metadata": metadata,
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
