//! Mapping of bitnet.cpp graph nodes (as `cb_eval` reports them) onto
//! canonical stages.
//!
//! Names repeat in the graph (`Qcur-0` is both the MUL_MAT and the ROPE,
//! `norm-0` is every RMS_NORM), so a node is keyed by name *and* op. Where a
//! `*.scale` tensor exists the MUL after the MUL_MAT carries the name, and a
//! later node of the same stage replaces an earlier one. `llama` names its
//! attention output `kqv_merged_cont` and its FFN product `ffn_gate_par`;
//! `bitnet` renames those to `kqv_out` and `ffn_sub_out`. `bitnet-b1.58`
//! (our patch 04) keeps `bitnet`'s names; its squared ReLU is an unnamed
//! `node_N` ReLU then the `ffn_relu_sqr` SQR, which carries `ffn_act` (with
//! `--reference-ffn-act silu` it is `ffn_silu`, as for `bitnet`). Nodes that carry no
//! stage (views, reshapes, cache copies, the pre-weight `norm-N`) are listed
//! as auxiliary; anything else unmapped is reported as unknown.

use super::{Stage, StageKey, Tensor};
use crate::reference::{split_layer, GraphNode, Node};

/// The result of mapping one decode's nodes.
#[derive(Debug, Default)]
pub struct Mapped {
    /// Canonical stages, in execution order, one entry per (layer, stage).
    pub stages: Vec<(StageKey, Tensor)>,
    /// Nodes we know and deliberately do not compare.
    pub auxiliary: Vec<String>,
    /// Nodes no rule knows: reported in the receipt, never dropped silently.
    pub unknown: Vec<String>,
}

/// The stage a node carries, from its base name (without `-N`) and op.
pub fn stage_of(base: &str, op: &str) -> Option<Stage> {
    let mm = matches!(op, "MUL_MAT" | "MUL" | "ADD");
    Some(match (base, op) {
        ("inp_embd", "GET_ROWS") => Stage::TokEmbd,
        ("attn_norm", "MUL") => Stage::AttnNorm,
        ("Qcur", "ROPE") => Stage::QRope,
        ("Kcur", "ROPE") => Stage::KRope,
        ("Qcur", _) if mm => Stage::QProj,
        ("Kcur", _) if mm => Stage::KProj,
        ("Vcur", _) if mm => Stage::VProj,
        ("kq", "MUL_MAT") => Stage::AttnScores,
        ("kq_soft_max_ext", "SOFT_MAX") => Stage::AttnProbs,
        ("kqv_out" | "kqv_merged_cont", "CONT") => Stage::AttnOut,
        ("attn_sub_norm", "MUL") => Stage::AttnSubNorm,
        ("attn_o_out", _) | ("kqv_out", _) if mm => Stage::OProj,
        ("ffn_inp", "ADD") => Stage::FfnInp,
        ("ffn_norm", "MUL") => Stage::FfnNorm,
        // With a `*.scale` tensor, llm_build_ffn names the scaled product `_s`.
        ("ffn_gate" | "ffn_gate_s", _) if mm => Stage::FfnGate,
        ("ffn_silu" | "ffn_relu" | "ffn_relu_sqr" | "ffn_gelu", _) => Stage::FfnAct,
        ("ffn_up" | "ffn_up_s", _) if mm => Stage::FfnUp,
        ("ffn_sub_out" | "ffn_gate_par", "MUL") => Stage::FfnMul,
        ("ffn_sub_norm", "MUL") => Stage::FfnSubNorm,
        ("ffn_down" | "ffn_out", _) if mm => Stage::FfnDown,
        ("l_out", "ADD") => Stage::LOut,
        ("result_norm", "MUL") => Stage::ResultNorm,
        ("result_output", "MUL_MAT") => Stage::Logits,
        _ => return None,
    })
}

fn is_auxiliary(base: &str, op: &str) -> bool {
    matches!(
        op,
        "VIEW" | "RESHAPE" | "PERMUTE" | "TRANSPOSE" | "CPY" | "CONT" | "GET_ROWS"
    ) || base == "norm"
        || base.starts_with("node_")
        || matches!(
            base,
            "q" | "k" | "v" | "kqv" | "kqv_merged" | "inp_pos" | "KQ_mask"
        )
}

/// The nodes of a graph listing that map to no stage and are no known
/// auxiliary, as `name [OP]` labels, each once.
#[derive(Debug, Default)]
pub struct GraphClasses {
    /// Nodes no rule knows.
    pub unknown: Vec<String>,
}

/// Classifies every node of a decode's graph (captured or not).
pub fn classify_graph(graph: &[GraphNode]) -> GraphClasses {
    let mut out = GraphClasses::default();
    for node in graph {
        let (base, _) = split_layer(&node.name);
        if stage_of(base, &node.op).is_none() && !is_auxiliary(base, &node.op) {
            let label = format!("{} [{}]", node.name, node.op);
            if !out.unknown.contains(&label) {
                out.unknown.push(label);
            }
        }
    }
    out
}

/// Maps one decode's nodes to canonical stages.
///
/// `n_past` is the number of positions already in the cache before this
/// batch: attention matrices are cropped to the `n_past + T` keys that exist
/// and their future-key entries are zeroed, as the canonical layout says.
///
/// Takes the nodes by value: their data moves into the stages (no copy of a
/// full-size model's activations is kept twice).
pub fn map_nodes(nodes: Vec<Node>, n_past: usize) -> Mapped {
    let mut out = Mapped::default();
    for node in nodes {
        let (base, layer) = split_layer(&node.name);
        let Some(stage) = stage_of(base, &node.op) else {
            let label = format!("{} [{}]", node.name, node.op);
            if is_auxiliary(base, &node.op) {
                out.auxiliary.push(label);
            } else {
                out.unknown.push(label);
            }
            continue;
        };
        let layer = if stage.is_per_layer() { layer } else { None };
        let tensor = canonical(stage, node, n_past);
        let key = StageKey::new(layer, stage);
        match out.stages.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = tensor,
            None => out.stages.push((key, tensor)),
        }
    }
    out
}

/// Converts a node's (already contiguous) data to the stage's canonical layout.
fn canonical(stage: Stage, node: Node, n_past: usize) -> Tensor {
    let [ne0, ne1, ne2, _] = node.ne;
    if stage.is_attention_matrix() {
        // ggml: ne = [n_kv (padded), T, H] → canonical [H, T, K], K = n_past + T.
        let (n_kv, t, h) = (ne0, ne1, ne2);
        let k = (n_past + t).min(n_kv);
        let mut data = Vec::with_capacity(h * t * k);
        for hh in 0..h {
            for tt in 0..t {
                let row = &node.data[(hh * t + tt) * n_kv..][..k];
                data.extend(
                    row.iter()
                        .enumerate()
                        .map(|(key, &v)| if key > n_past + tt { 0.0 } else { v }),
                );
            }
        }
        return Tensor::new(vec![h, t, k], data);
    }
    // Every other stage is [T, D] with D = ne0 (or ne0*ne1 for RoPE'd heads).
    let t = match stage {
        Stage::QRope | Stage::KRope => ne2,
        _ => ne1,
    };
    let d = node.data.len() / t.max(1);
    Tensor::new(vec![t, d], node.data)
}

/// Every base name [`stage_of`] maps to a stage, in graph order.
pub const STAGE_NODE_NAMES: &[&str] = &[
    "inp_embd",
    "attn_norm",
    "Qcur",
    "Kcur",
    "Vcur",
    "kq",
    "kq_soft_max_ext",
    "kqv_out",
    "kqv_merged_cont",
    "attn_sub_norm",
    "attn_o_out",
    "ffn_inp",
    "ffn_norm",
    "ffn_gate",
    "ffn_gate_s",
    "ffn_silu",
    "ffn_relu",
    "ffn_relu_sqr",
    "ffn_gelu",
    "ffn_up",
    "ffn_up_s",
    "ffn_sub_out",
    "ffn_gate_par",
    "ffn_sub_norm",
    "ffn_down",
    "ffn_out",
    "l_out",
    "result_norm",
    "result_output",
];

/// The node base names the lockstep runner asks bitnet.cpp to copy: exactly
/// those that carry a stage, so full-size models stay cheap.
pub fn capture_base_names() -> Vec<String> {
    STAGE_NODE_NAMES.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_capture_name_maps_to_a_stage() {
        const OPS: [&str; 8] = [
            "GET_ROWS", "MUL", "MUL_MAT", "ROPE", "SOFT_MAX", "CONT", "ADD", "UNARY",
        ];
        for name in STAGE_NODE_NAMES {
            assert!(
                OPS.iter().any(|op| stage_of(name, op).is_some()),
                "{name} maps to no stage"
            );
        }
    }
}
