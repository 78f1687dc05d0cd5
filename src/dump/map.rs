//! Reading another engine's trace dump: a map from its tensor names and
//! layouts onto canonical stages.
//!
//! A map is JSON (`--map MAP.json`):
//!
//! ```json
//! {
//!   "description": "our engine's BITNET_TRACE_DIR dump",
//!   "tensors": [
//!     {"name": "s{S}.layers.{L}.attention.q_proj", "stage": "q_proj"},
//!     {"name": "s{S}.layers.{L}.post_ffn_subnorm", "stage": "ffn_sub_norm"},
//!     {"name": "s{S}.layers.{L}.attention.scores", "stage": "attn_scores", "transpose": [2, 0, 1]},
//!     {"name": "s{S}.layers.{L}.attention.q_rope.head{H}", "stage": "q_rope", "heads": "concat"},
//!     {"name": "s{S}.embed", "stage": "tok_embd", "reshape": [-1, 2560]},
//!     {"name": "s{S}.layers.{L}.kv_cache", "skip": true}
//!   ]
//! }
//! ```
//!
//! - `name` is the foreign name with placeholders: `{S}` the step, `{L}`
//!   the layer, `{H}` a head (each matches a decimal number), and `*` (any
//!   run of characters, for skip rules that cover a family of tensors).
//!   Without `{S}` a tensor belongs to step 0.
//! - `stage` is the canonical stage; `skip: true` marks a tensor that has
//!   no stage (listed as skipped, never reported as unmapped).
//! - `transpose` permutes the axes (numpy's `transpose(axes)`), then
//!   `reshape` sets the shape (one `-1` is inferred, a `0` keeps that axis
//!   of the tensor as it is, so one map serves every model width).
//! - `mask_future: true` (attention scores and probabilities): the engine
//!   stores the raw q·k (or anything) of future keys; they are set to 0 as
//!   the canonical layout has them.
//!
//! Two tensors that land on one stage of one step are an error naming both.
//! - `heads` joins per-head tensors (ordered by `{H}`): `concat` along the
//!   last axis (`[T, hd]` per head → `[T, H·hd]`), `stack` on a new first
//!   axis (`[T, K]` per head → `[H, T, K]`).
//!
//! A dump without a map must use the canonical names (`step{S}.layer{L}.{stage}`).

use super::{parse_name, Dump, DumpError};
use crate::trace::{Stage, StageKey, Tensor};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// How per-head tensors are joined into one stage tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadJoin {
    /// Along the last axis.
    Concat,
    /// On a new first axis.
    Stack,
}

/// One rule of a map.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapRule {
    /// The foreign name pattern.
    pub name: String,
    /// The canonical stage it holds.
    #[serde(default)]
    pub stage: Option<Stage>,
    /// The tensor has no stage.
    #[serde(default)]
    pub skip: bool,
    /// Axis permutation, applied first.
    #[serde(default)]
    pub transpose: Option<Vec<usize>>,
    /// The shape after the permutation (one -1 inferred).
    #[serde(default)]
    pub reshape: Option<Vec<i64>>,
    /// Per-head tensors and how to join them.
    #[serde(default)]
    pub heads: Option<HeadJoin>,
    /// Attention matrices: zero the entries of future keys.
    #[serde(default)]
    pub mask_future: bool,
}

/// A map from another engine's dump onto canonical stages.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpMap {
    /// What dump this maps, for the receipt.
    #[serde(default)]
    pub description: String,
    /// The rules, tried in order; the first whose pattern matches wins.
    pub tensors: Vec<MapRule>,
}

/// A dump's tensors as canonical stages.
#[derive(Debug, Default)]
pub struct MappedDump {
    /// (step, stage) → tensor in its canonical layout.
    pub stages: BTreeMap<(usize, StageKey), Tensor>,
    /// Tensors no rule (or canonical name) matched: listed, never dropped.
    pub unmapped: Vec<String>,
    /// Tensors a rule marked `skip`.
    pub skipped: Vec<String>,
    /// The dump's own name of each stage's tensor (the rule's pattern for
    /// joined heads), for messages about it.
    pub sources: BTreeMap<(usize, StageKey), String>,
    /// Stages whose future-key entries are to be zeroed (`mask_future`).
    pub mask_future: BTreeSet<(usize, StageKey)>,
    /// The stages the map's rules name: what the engine emits by design.
    pub declared: Option<BTreeSet<Stage>>,
}

/// Why a dump could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The map file is unreadable or invalid.
    #[error("map {path}: {message}")]
    Map {
        /// The map file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor of the dump cannot be read.
    #[error(transparent)]
    Dump(#[from] DumpError),
    /// Two tensors (or two rules) land on one stage of one step.
    #[error("tensors {first} and {second} both map to {stage} of step {step}: a stage must come from one tensor")]
    Duplicate {
        /// The first tensor's name.
        first: String,
        /// The second tensor's name.
        second: String,
        /// The stage, with its layer.
        stage: StageKey,
        /// The step.
        step: usize,
    },
    /// A tensor cannot be transformed as the map says.
    #[error("tensor {name}: {message}")]
    Transform {
        /// The tensor.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// The largest map file read.
pub const MAX_MAP_BYTES: u64 = 4 << 20;

impl DumpMap {
    /// Reads a map file.
    pub fn load(path: &Path) -> Result<DumpMap, MapError> {
        let p = path.display().to_string();
        let text =
            crate::input::read_text(path, MAX_MAP_BYTES, "map").map_err(|e| MapError::Map {
                path: p.clone(),
                message: e.to_string(),
            })?;
        Self::parse(&text, &p)
    }

    /// Parses and checks a map's JSON text; `path` names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<DumpMap, MapError> {
        let p = path.to_string();
        let map: DumpMap = serde_json::from_str(text).map_err(|e| MapError::Map {
            path: p.clone(),
            message: e.to_string(),
        })?;
        for rule in &map.tensors {
            if rule.skip == rule.stage.is_some() {
                return Err(MapError::Map {
                    path: p,
                    message: format!(
                        "rule {:?} needs exactly one of `stage` and `skip: true`",
                        rule.name
                    ),
                });
            }
            if let Some(stage) = rule.stage {
                if stage.is_per_layer() != rule.name.contains("{L}") {
                    return Err(MapError::Map {
                        path: p,
                        message: format!(
                            "rule {:?}: {stage} is {} stage, so the name {} a {{L}}",
                            rule.name,
                            if stage.is_per_layer() {
                                "a per-layer"
                            } else {
                                "a model-level"
                            },
                            if stage.is_per_layer() {
                                "needs"
                            } else {
                                "must not have"
                            }
                        ),
                    });
                }
            }
            if rule.mask_future && !rule.stage.is_some_and(Stage::is_attention_matrix) {
                return Err(MapError::Map {
                    path: p,
                    message: format!(
                        "rule {:?}: `mask_future` applies to attn_scores and attn_probs only",
                        rule.name
                    ),
                });
            }
            if rule.heads.is_some() != rule.name.contains("{H}") {
                return Err(MapError::Map {
                    path: p,
                    message: format!(
                        "rule {:?}: `heads` and a {{H}} placeholder go together",
                        rule.name
                    ),
                });
            }
        }
        Ok(map)
    }
}

/// The numbers a pattern's placeholders matched.
#[derive(Default)]
struct Captures {
    step: Option<usize>,
    layer: Option<usize>,
    head: Option<usize>,
}

/// Matches `name` against a pattern with `{S}`, `{L}`, `{H}` placeholders
/// (each a run of decimal digits) and `*` (any run of characters).
fn matches(pattern: &str, name: &str) -> Option<Captures> {
    let mut caps = Captures::default();
    match_from(pattern, name, &mut caps).then_some(caps)
}

fn match_from(p: &str, n: &str, caps: &mut Captures) -> bool {
    if p.is_empty() {
        return n.is_empty();
    }
    if let Some(rest) = p.strip_prefix('*') {
        // Shortest first; a later literal decides.
        return (0..=n.len())
            .filter(|&i| n.is_char_boundary(i))
            .any(|i| match_from(rest, &n[i..], caps));
    }
    if let Some(rest) = p.strip_prefix('{') {
        let Some((tag, after)) = rest.split_once('}') else {
            return false;
        };
        let digits = n.len() - n.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return false;
        }
        let Ok(value) = n[..digits].parse::<usize>() else {
            return false;
        };
        match tag {
            "S" => caps.step = Some(value),
            "L" => caps.layer = Some(value),
            "H" => caps.head = Some(value),
            _ => return false,
        }
        return match_from(after, &n[digits..], caps);
    }
    let lit_len = p.find(['{', '*']).unwrap_or(p.len());
    match n.strip_prefix(&p[..lit_len]) {
        Some(rest) => match_from(&p[lit_len..], rest, caps),
        None => false,
    }
}

/// Permutes the axes of a row-major tensor.
fn transpose(t: &Tensor, axes: &[usize]) -> Result<Tensor, String> {
    let rank = t.shape.len();
    let mut seen = vec![false; rank];
    if axes.len() != rank
        || axes
            .iter()
            .any(|&a| a >= rank || std::mem::replace(&mut seen[a], true))
    {
        return Err(format!(
            "transpose {axes:?} is not a permutation of the {rank} axes of shape {:?}",
            t.shape
        ));
    }
    let shape: Vec<usize> = axes.iter().map(|&a| t.shape[a]).collect();
    let mut in_strides = vec![1usize; rank];
    for i in (0..rank.saturating_sub(1)).rev() {
        in_strides[i] = in_strides[i + 1] * t.shape[i + 1];
    }
    let mut data = Vec::with_capacity(t.data.len());
    let mut idx = vec![0usize; rank];
    for _ in 0..t.data.len() {
        let src: usize = idx
            .iter()
            .enumerate()
            .map(|(i, &v)| v * in_strides[axes[i]])
            .sum();
        data.push(t.data[src]);
        for d in (0..rank).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(Tensor::new(shape, data))
}

/// Sets the shape: one `-1` is inferred, a `0` keeps that axis as it is.
fn reshape(t: Tensor, dims: &[i64]) -> Result<Tensor, String> {
    let n = t.data.len();
    if dims.iter().any(|&d| d < -1) || dims.iter().filter(|&&d| d == -1).count() > 1 {
        return Err(format!("reshape {dims:?} is not a shape"));
    }
    let mut kept = Vec::with_capacity(dims.len());
    for (i, &d) in dims.iter().enumerate() {
        kept.push(if d == 0 {
            match t.shape.get(i) {
                Some(&axis) => axis as i64,
                None => {
                    return Err(format!(
                        "reshape {dims:?} keeps axis {i}, but shape {:?} has no such axis",
                        t.shape
                    ))
                }
            }
        } else {
            d
        });
    }
    if kept.contains(&0) {
        return Err(format!(
            "reshape {dims:?} of shape {:?} has an empty axis",
            t.shape
        ));
    }
    // Checked: a map file can state any sizes.
    let known = kept
        .iter()
        .filter(|&&d| d != -1)
        .try_fold(1i64, |a, &d| a.checked_mul(d))
        .filter(|&k| k as u64 <= n as u64)
        .ok_or_else(|| format!("reshape {dims:?} holds more than the tensor's {n} values"))?;
    let shape: Vec<usize> = kept
        .iter()
        .map(|&d| {
            if d == -1 {
                n / known as usize
            } else {
                d as usize
            }
        })
        .collect();
    if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(n) {
        return Err(format!(
            "reshape {dims:?} does not hold the {n} values of shape {:?}",
            t.shape
        ));
    }
    Ok(Tensor::new(shape, t.data))
}

fn join_heads(
    name: &str,
    mut heads: Vec<(usize, Tensor)>,
    how: HeadJoin,
) -> Result<Tensor, MapError> {
    heads.sort_by_key(|(h, _)| *h);
    let err = |message: String| MapError::Transform {
        name: name.into(),
        message,
    };
    for (i, (h, _)) in heads.iter().enumerate() {
        if *h != i {
            return Err(err(format!(
                "head {i} is missing (heads found: {:?})",
                heads.iter().map(|(h, _)| *h).collect::<Vec<_>>()
            )));
        }
    }
    let shape = heads[0].1.shape.clone();
    if heads.iter().any(|(_, t)| t.shape != shape) {
        return Err(err("the heads have different shapes".into()));
    }
    let n_heads = heads.len();
    Ok(match how {
        HeadJoin::Stack => {
            let mut data = Vec::with_capacity(n_heads * heads[0].1.data.len());
            for (_, t) in &heads {
                data.extend_from_slice(&t.data);
            }
            let mut s = vec![n_heads];
            s.extend(&shape);
            Tensor::new(s, data)
        }
        HeadJoin::Concat => {
            let last = *shape
                .last()
                .ok_or_else(|| err("a head tensor has no axes".into()))?;
            let rows = heads[0].1.data.len() / last.max(1);
            let mut data = Vec::with_capacity(rows * last * n_heads);
            for r in 0..rows {
                for (_, t) in &heads {
                    data.extend_from_slice(&t.data[r * last..(r + 1) * last]);
                }
            }
            let mut s = shape.clone();
            *s.last_mut().expect("checked above") = last * n_heads;
            Tensor::new(s, data)
        }
    })
}

/// Per-head parts of one stage, by (step, key): (rule, [(head, tensor)]).
type HeadParts = BTreeMap<(usize, StageKey), (usize, Vec<(usize, Tensor)>)>;

/// Reads every tensor of `dump` as a canonical stage, through `map` when
/// given (else by canonical names). Two tensors that land on one stage of
/// one step are an error naming both.
pub fn map_dump(dump: &Dump, map: Option<&DumpMap>) -> Result<MappedDump, MapError> {
    let mut out = MappedDump {
        declared: map.map(|m| m.tensors.iter().filter_map(|r| r.stage).collect()),
        ..MappedDump::default()
    };
    // Per-head parts waiting to be joined: (step, key) → (rule, [(head, tensor)]).
    let mut parts: HeadParts = BTreeMap::new();
    let names: Vec<String> = dump.names().map(str::to_owned).collect();
    for name in names {
        let Some(map) = map else {
            match parse_name(&name) {
                Some(at) => {
                    let tensor = dump.tensor(&name)?.expect("listed names exist");
                    out.insert(at, tensor, name)?;
                }
                None => out.unmapped.push(name),
            }
            continue;
        };
        let found = map
            .tensors
            .iter()
            .enumerate()
            .find_map(|(i, r)| matches(&r.name, &name).map(|c| (i, r, c)));
        let Some((i, rule, caps)) = found else {
            out.unmapped.push(name);
            continue;
        };
        if rule.skip {
            out.skipped.push(name);
            continue;
        }
        let stage = rule.stage.expect("validated at load: stage or skip");
        let mut t = dump.tensor(&name)?.expect("listed names exist");
        let transform = |message: String| MapError::Transform {
            name: name.clone(),
            message,
        };
        if let Some(axes) = &rule.transpose {
            t = transpose(&t, axes).map_err(transform)?;
        }
        if let Some(dims) = &rule.reshape {
            t = reshape(t, dims).map_err(transform)?;
        }
        let key = StageKey::new(caps.layer, stage);
        let at = (caps.step.unwrap_or(0), key);
        if rule.mask_future {
            out.mask_future.insert(at);
        }
        match caps.head {
            Some(h) => {
                let entry = parts.entry(at).or_insert_with(|| (i, Vec::new()));
                if entry.0 != i {
                    return Err(MapError::Duplicate {
                        first: map.tensors[entry.0].name.clone(),
                        second: name,
                        stage: key,
                        step: at.0,
                    });
                }
                if entry.1.iter().any(|(seen, _)| *seen == h) {
                    return Err(MapError::Duplicate {
                        first: format!("{} (head {h})", rule.name),
                        second: name,
                        stage: key,
                        step: at.0,
                    });
                }
                entry.1.push((h, t));
            }
            None => out.insert(at, t, name)?,
        }
    }
    for (at, (rule, heads)) in parts {
        let map = map.expect("parts only come from a map");
        let how = map.tensors[rule]
            .heads
            .expect("validated: {H} goes with heads");
        let joined = join_heads(&map.tensors[rule].name, heads, how)?;
        out.insert(at, joined, map.tensors[rule].name.clone())?;
    }
    Ok(out)
}

impl MappedDump {
    /// Adds a stage's tensor, refusing a second one for the same place.
    fn insert(&mut self, at: (usize, StageKey), t: Tensor, name: String) -> Result<(), MapError> {
        if let Some(first) = self.sources.get(&at) {
            return Err(MapError::Duplicate {
                first: first.clone(),
                second: name,
                stage: at.1,
                step: at.0,
            });
        }
        self.sources.insert(at, name);
        self.stages.insert(at, t);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_capture_step_layer_and_head() {
        let c = matches("s{S}.layers.{L}.q.head{H}", "s12.layers.3.q.head7").unwrap();
        assert_eq!((c.step, c.layer, c.head), (Some(12), Some(3), Some(7)));
        assert!(matches("layers.{L}.q", "layers.x.q").is_none());
        assert!(matches("layers.{L}.q", "layers.3.qq").is_none());
        assert!(matches("embed", "embed").is_some());
    }

    #[test]
    fn transpose_is_numpys() {
        // [2, 3] → [3, 2]
        let t = Tensor::new(vec![2, 3], vec![0., 1., 2., 3., 4., 5.]);
        let u = transpose(&t, &[1, 0]).unwrap();
        assert_eq!(u.shape, vec![3, 2]);
        assert_eq!(u.data, vec![0., 3., 1., 4., 2., 5.]);
        // [2, 2, 2] with axes (2, 0, 1): out[i][j][k] = in[j][k][i]
        let t = Tensor::new(vec![2, 2, 2], (0..8).map(|v| v as f32).collect());
        let u = transpose(&t, &[2, 0, 1]).unwrap();
        assert_eq!(u.data, vec![0., 2., 4., 6., 1., 3., 5., 7.]);
        assert!(transpose(&t, &[0, 0, 1]).is_err());
    }

    #[test]
    fn heads_concat_and_stack() {
        let h0 = Tensor::new(vec![2, 2], vec![1., 2., 3., 4.]);
        let h1 = Tensor::new(vec![2, 2], vec![5., 6., 7., 8.]);
        let c = join_heads(
            "x",
            vec![(1, h1.clone()), (0, h0.clone())],
            HeadJoin::Concat,
        )
        .unwrap();
        assert_eq!(c.shape, vec![2, 4]);
        assert_eq!(c.data, vec![1., 2., 5., 6., 3., 4., 7., 8.]);
        let s = join_heads("x", vec![(0, h0), (1, h1)], HeadJoin::Stack).unwrap();
        assert_eq!(s.shape, vec![2, 2, 2]);
        assert_eq!(s.data, vec![1., 2., 3., 4., 5., 6., 7., 8.]);
    }

    #[test]
    fn reshape_infers_one_axis_and_zero_keeps_one() {
        let t = Tensor::new(vec![6], vec![0.; 6]);
        assert_eq!(reshape(t.clone(), &[-1, 3]).unwrap().shape, vec![2, 3]);
        assert!(reshape(t.clone(), &[4, -1]).is_err());
        let t = Tensor::new(vec![2, 3, 4], vec![0.; 24]);
        assert_eq!(reshape(t.clone(), &[0, -1]).unwrap().shape, vec![2, 12]);
        assert_eq!(
            reshape(t.clone(), &[0, 0, 2, 2]).unwrap().shape,
            vec![2, 3, 2, 2]
        );
        assert!(reshape(t, &[0, 0, 0, 0]).is_err(), "no fourth axis to keep");
    }

    #[test]
    fn a_star_matches_any_run_and_backtracks() {
        assert!(matches("*.kv_cache", "s1.layers.3.kv_cache").is_some());
        assert!(matches("s{S}.*.k*", "s2.layers.4.kv").is_some_and(|c| c.step == Some(2)));
        assert!(matches("a*b*c", "axxbyyc").is_some());
        assert!(matches("a*b*c", "axxbyy").is_none());
        assert!(matches("*", "").is_some());
    }
}
