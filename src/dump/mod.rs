//! Trace dumps: every stage of every step of one engine's run, as f32 in
//! its canonical logical layout, in one safetensors file (the format numpy,
//! PyTorch and JAX read), with a JSON manifest in the file's metadata.
//!
//! Tensor names are `step{S}.layer{L}.{stage}` for per-layer stages and
//! `step{S}.{stage}` for the model-level ones (`tok_embd`, `result_norm`,
//! `logits`). The manifest (metadata key [`MANIFEST_KEY`]) holds the tool
//! version, the model's sha256 and config, the token ids and positions of
//! every step, the mode, threads, KV type and the engine's build.
//!
//! [`DumpWriter`] streams: each stage's bytes go to a side file as they are
//! produced, and [`DumpWriter::finish`] writes the safetensors header (built
//! and validated by the `safetensors` crate) followed by those bytes, so a
//! 2B-4T capture never holds more than one stage in memory.

pub mod capture;
pub mod map;

use crate::lockstep::Mode;
use crate::model::{KvType, ModelConfig};
use crate::oracle::FileFacts;
use crate::reference::BuildInfo;
use crate::trace::{Stage, StageKey, Tensor, TraceSink};
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorInfo};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// The metadata key of the manifest.
pub const MANIFEST_KEY: &str = "divergence";

/// One step of a dumped run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DumpStep {
    /// The step (0 prefills the prompt).
    pub step: usize,
    /// The first position of the step's batch.
    pub pos0: usize,
    /// The step's token ids.
    pub tokens: Vec<u32>,
}

/// What a dump holds and how it was made. Only `steps` is required: a
/// manifest another engine writes may leave the rest out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// `divergence <version>` (or the writing tool's name).
    #[serde(default)]
    pub tool: String,
    /// `reference` or `candidate` (or another engine's name).
    #[serde(default)]
    pub engine: String,
    /// The engine's build description.
    #[serde(default)]
    pub engine_build: String,
    /// The model file as given.
    #[serde(default)]
    pub model_path: String,
    /// Its sha256 (hex); checked against `compare --model`.
    #[serde(default)]
    pub model_sha256: String,
    /// The model's hyperparameters as the file states them.
    #[serde(default)]
    pub model: Option<FileFacts>,
    /// The hyperparameters as the engine read them (candidates only).
    #[serde(default)]
    pub engine_config: Option<ModelConfig>,
    /// The prompt text, when the run tokenized one (each engine with its
    /// own tokenizer); absent when token ids were given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// The stages the engine emits by design, when not every stage of the
    /// arch (e.g. `["l_out", "result_norm", "logits"]`, or `[]` for an
    /// engine that only gives the tokens it chose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<Stage>>,
    /// Every step: positions and token ids.
    pub steps: Vec<DumpStep>,
    /// Always `free`: each engine fed itself.
    #[serde(default = "free")]
    pub mode: Mode,
    /// Threads the engine used.
    #[serde(default = "one")]
    pub threads: usize,
    /// The KV cache type.
    #[serde(default)]
    pub kv_type: KvType,
    /// The FFN activation the engine was told to run instead of the arch's
    /// own (`capture --ffn-act`); absent when it ran the arch's own.
    /// `compare` gives the oracle the reference dump's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_act: Option<crate::model::FfnAct>,
    /// bitnet.cpp's build, for reference dumps.
    #[serde(default)]
    pub reference_build: Option<BuildInfo>,
    /// Stopped by Ctrl-C: `steps` are the steps that finished, not all
    /// that were asked for.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
}

fn free() -> Mode {
    Mode::Free
}

fn one() -> usize {
    1
}

/// The most positions a dump's steps may cover (a run's context is at most
/// a few thousand).
pub const MAX_POSITIONS: usize = 1 << 20;

impl Manifest {
    /// Checks the steps are a run: numbered 0, 1, 2... in order, none twice,
    /// each with at least one token, each starting where the last ended.
    pub fn check_steps(&self) -> Result<(), String> {
        let mut pos = 0usize;
        for (i, s) in self.steps.iter().enumerate() {
            if s.step != i {
                return Err(if self.steps[..i].iter().any(|p| p.step == s.step) {
                    format!("step {} is listed twice", s.step)
                } else {
                    format!("the steps are not 0, 1, 2...: entry {i} is step {}", s.step)
                });
            }
            if s.tokens.is_empty() {
                return Err(format!("step {i} has no tokens"));
            }
            if s.pos0 != pos {
                return Err(format!(
                    "step {i} starts at position {}, but the steps before it end at {pos}",
                    s.pos0
                ));
            }
            pos = pos.saturating_add(s.tokens.len());
            if pos > MAX_POSITIONS {
                return Err(format!(
                    "the steps cover more than {MAX_POSITIONS} positions"
                ));
            }
        }
        if self.steps.is_empty() {
            return Err("it lists no steps".into());
        }
        Ok(())
    }
}

/// What can go wrong reading or writing a dump.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file.
    #[error("{path} is not a valid safetensors file: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor cannot be read as numbers.
    #[error("{path}: tensor {name}: {message}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// The dump name of a stage of a step.
pub fn tensor_name(step: usize, key: StageKey) -> String {
    match key.layer {
        Some(l) => format!("step{step}.layer{l}.{}", key.stage),
        None => format!("step{step}.{}", key.stage),
    }
}

/// The (step, stage) of a canonical dump name.
pub fn parse_name(name: &str) -> Option<(usize, StageKey)> {
    let rest = name.strip_prefix("step")?;
    let (step, rest) = rest.split_once('.')?;
    let step: usize = step.parse().ok()?;
    let (layer, stage) = match rest.strip_prefix("layer") {
        Some(r) => {
            let (l, s) = r.split_once('.')?;
            (Some(l.parse::<usize>().ok()?), s)
        }
        None => (None, rest),
    };
    let stage = Stage::from_name(stage)?;
    if stage.is_per_layer() != layer.is_some() {
        return None;
    }
    Some((step, StageKey::new(layer, stage)))
}

/// Writes a dump stage by stage.
pub struct DumpWriter {
    out: PathBuf,
    side: PathBuf,
    data: BufWriter<std::fs::File>,
    entries: Vec<(String, Vec<usize>)>,
    offset: usize,
}

impl DumpWriter {
    /// Starts a dump to `out` (its stages go to a side file beside it until
    /// [`DumpWriter::finish`]).
    pub fn create(out: &Path) -> Result<DumpWriter, DumpError> {
        let dest = crate::outfile::Destination::of(out, "safetensors.tmp").map_err(|source| {
            DumpError::Io {
                path: out.to_path_buf(),
                source,
            }
        })?;
        // Beside the final file, so the stages stay on its filesystem; in the
        // temp folder when the output is `/dev/null` or a pipe.
        let dir = match &dest {
            crate::outfile::Destination::Replace { tmp, .. } => tmp
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| ".".into()),
            crate::outfile::Destination::InPlace(_) => std::env::temp_dir(),
        };
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dump".into());
        // `.{name}.{pid}.stages`: a killed run's is removed by the next one.
        let side =
            crate::outfile::temporary_beside(&dir.join(&name), "stages").map_err(|source| {
                DumpError::Io {
                    path: out.to_path_buf(),
                    source,
                }
            })?;
        crate::outfile::register(&side);
        let file = std::fs::File::create(&side).map_err(|source| DumpError::Io {
            path: side.clone(),
            source,
        })?;
        Ok(DumpWriter {
            out: out.to_path_buf(),
            side,
            data: BufWriter::new(file),
            entries: Vec::new(),
            offset: 0,
        })
    }

    /// Appends one stage of one step.
    pub fn add(
        &mut self,
        step: usize,
        key: StageKey,
        shape: &[usize],
        data: &[f32],
    ) -> Result<(), DumpError> {
        self.add_named(&tensor_name(step, key), shape, data)
    }

    /// Appends a tensor under any name (another engine's naming, read back
    /// through a [`map::DumpMap`]).
    pub fn add_named(
        &mut self,
        name: &str,
        shape: &[usize],
        data: &[f32],
    ) -> Result<(), DumpError> {
        if shape.iter().product::<usize>() != data.len() {
            return Err(DumpError::Tensor {
                path: self.out.clone(),
                name: name.into(),
                message: format!("shape {shape:?} does not hold {} values", data.len()),
            });
        }
        let mut bytes = Vec::with_capacity(data.len() * 4);
        for v in data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        self.data
            .write_all(&bytes)
            .map_err(|source| DumpError::Io {
                path: self.side.clone(),
                source,
            })?;
        self.entries.push((name.to_string(), shape.to_vec()));
        self.offset += bytes.len();
        Ok(())
    }

    /// Writes the safetensors file: the header with the manifest, then every
    /// stage's bytes in the order they were added. Atomic: a temp file, then
    /// a rename.
    pub fn finish(mut self, manifest: Option<&Manifest>) -> Result<(), DumpError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DumpError::Io { path, source }
        };
        self.data.flush().map_err(io(&self.side))?;
        let mut infos = Vec::with_capacity(self.entries.len());
        let mut at = 0usize;
        for (name, shape) in std::mem::take(&mut self.entries) {
            let n = shape.iter().product::<usize>() * 4;
            infos.push((
                name,
                TensorInfo {
                    dtype: Dtype::F32,
                    shape,
                    data_offsets: (at, at + n),
                },
            ));
            at += n;
        }
        let format = |e: safetensors::SafeTensorError| DumpError::Format {
            path: self.out.clone(),
            message: e.to_string(),
        };
        let meta = manifest.map(|m| {
            HashMap::from([(
                MANIFEST_KEY.to_string(),
                serde_json::to_string(m).expect("manifests serialize"),
            )])
        });
        let header = Metadata::new(meta, infos).map_err(format)?;
        let mut header = serde_json::to_vec(&header).map_err(|e| DumpError::Format {
            path: self.out.clone(),
            message: e.to_string(),
        })?;
        // The format aligns the data to 8 bytes with spaces.
        header.resize(header.len().next_multiple_of(8), b' ');
        let dest =
            crate::outfile::Destination::of(&self.out, "safetensors.tmp").map_err(io(&self.out))?;
        let tmp = dest.writing().to_path_buf();
        let result = (|| -> Result<(), DumpError> {
            let mut f = BufWriter::new(dest.create().map_err(io(&tmp))?);
            f.write_all(&(header.len() as u64).to_le_bytes())
                .and_then(|_| f.write_all(&header))
                .map_err(io(&tmp))?;
            let mut side = std::fs::File::open(&self.side).map_err(io(&self.side))?;
            std::io::copy(&mut side, &mut f).map_err(io(&tmp))?;
            let f = f.into_inner().map_err(|e| DumpError::Io {
                path: tmp.clone(),
                source: e.into_error(),
            })?;
            dest.commit(f).map_err(io(&self.out))
        })();
        let _ = std::fs::remove_file(&self.side);
        crate::outfile::forget(&self.side);
        if result.is_err() {
            dest.abandon();
        }
        result
    }
}

impl Drop for DumpWriter {
    fn drop(&mut self) {
        // finish() removed it already; an abandoned dump leaves nothing.
        let _ = std::fs::remove_file(&self.side);
        crate::outfile::forget(&self.side);
    }
}

/// A [`TraceSink`] that writes every stage of one step to a dump (and
/// changes nothing: the engine runs free).
pub struct DumpSink<'w> {
    writer: &'w mut DumpWriter,
    step: usize,
    /// The first write error, if any.
    pub error: Option<DumpError>,
}

impl<'w> DumpSink<'w> {
    /// A sink for `step` of `writer`.
    pub fn new(writer: &'w mut DumpWriter, step: usize) -> DumpSink<'w> {
        DumpSink {
            writer,
            step,
            error: None,
        }
    }
}

impl TraceSink for DumpSink<'_> {
    fn stage(&mut self, layer: Option<usize>, stage: Stage, shape: &[usize], data: &mut [f32]) {
        if self.error.is_none() {
            if let Err(e) = self
                .writer
                .add(self.step, StageKey::new(layer, stage), shape, data)
            {
                self.error = Some(e);
            }
        }
    }
}

/// A dump read back: every tensor's place, and the manifest if it has one
/// (dumps of other engines may not).
pub struct Dump {
    path: PathBuf,
    bytes: Vec<u8>,
    tensors: BTreeMap<String, (Dtype, Vec<usize>, std::ops::Range<usize>)>,
    /// The manifest, when the dump carries one.
    pub manifest: Option<Manifest>,
}

impl Dump {
    /// Reads and validates a safetensors file (read into memory: the
    /// `safetensors` crate checks every offset and size).
    pub fn open(path: &Path) -> Result<Dump, DumpError> {
        let mut bytes = Vec::new();
        // A regular file only: a FIFO or `/dev/zero` would block or never end.
        crate::input::open_regular(path, u64::MAX, "dump")
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|source| DumpError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_bytes(path, bytes)
    }

    /// [`Dump::open`] on bytes already read; `path` names them in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Dump, DumpError> {
        let format = |message: String| DumpError::Format {
            path: path.to_path_buf(),
            message,
        };
        let parsed = SafeTensors::deserialize(&bytes).map_err(|e| format(e.to_string()))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&bytes).map_err(|e| format(e.to_string()))?;
        let data_start = 8 + header_len;
        let mut tensors = BTreeMap::new();
        for (name, info) in metadata.tensors() {
            let (a, b) = info.data_offsets;
            tensors.insert(
                name,
                (
                    info.dtype,
                    info.shape.clone(),
                    data_start + a..data_start + b,
                ),
            );
        }
        drop(parsed);
        let manifest =
            match metadata
                .metadata()
                .as_ref()
                .and_then(|m| m.get(MANIFEST_KEY))
            {
                Some(text) => Some(serde_json::from_str(text).map_err(|e| {
                    format(format!("its `{MANIFEST_KEY}` manifest is not valid: {e}"))
                })?),
                None => None,
            };
        Ok(Dump {
            path: path.to_path_buf(),
            bytes,
            tensors,
            manifest,
        })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The shape of a tensor.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(_, s, _)| s.as_slice())
    }

    /// A tensor as f32 (F32, F16, BF16 and F64 dumps are read; other dtypes
    /// are an error naming the tensor).
    pub fn tensor(&self, name: &str) -> Result<Option<Tensor>, DumpError> {
        let Some((dtype, shape, range)) = self.tensors.get(name) else {
            return Ok(None);
        };
        let bytes = &self.bytes[range.clone()];
        let data: Vec<f32> = match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|b| {
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
            other => {
                return Err(DumpError::Tensor {
                    path: self.path.clone(),
                    name: name.into(),
                    message: format!("dtype {other:?} is not a floating-point type"),
                })
            }
        };
        Ok(Some(Tensor::new(shape.clone(), data)))
    }
}
