//! One receipt as a page section: the verdict and the run, the first
//! divergence with its evidence, the heatmaps, the error growth, the tokens
//! and the coverage.

use super::html::{esc, layer_name, sci};
use super::svg::{self, Cell, CellValue, Heatmap, Series};
use crate::compare::{Blame, Metrics};
use crate::lockstep::{
    Divergence, LocalBound, Measured, Mode, Prompt, StepRecord, TokenSource, Verdict,
};
use crate::receipt::Receipt;
use crate::sweep::verdict_name;
use crate::trace::Stage;
use std::fmt::Write as _;

/// Layers of the receipt's model (from the file, the candidate, or the
/// stages judged).
pub fn n_layer(r: &Receipt) -> usize {
    r.model
        .file
        .as_ref()
        .map(|f| f.n_layer)
        .or(r.model.config.as_ref().map(|c| c.n_layer))
        .unwrap_or_else(|| {
            r.step_results
                .iter()
                .flat_map(|s| s.stages.iter().filter_map(|x| x.layer))
                .max()
                .map_or(0, |l| l + 1)
        })
}

fn head_dim(r: &Receipt) -> Option<usize> {
    r.model
        .file
        .as_ref()
        .map(|f| f.head_dim)
        .or(r.model.config.as_ref().map(|c| c.head_dim))
        .filter(|&d| d > 0)
}

/// The verdict as a badge.
pub fn verdict_badge(v: Option<Verdict>) -> String {
    let name = verdict_name(v);
    format!(
        r#"<span class="verdict {name}" data-verdict="{name}">{}</span>"#,
        name.replace('_', " ").to_uppercase()
    )
}

/// Where a divergence is, in one line.
pub fn divergence_place(d: &Divergence) -> String {
    format!(
        "step {} · position {} · layer {} · {}",
        d.step,
        d.position,
        layer_name(d.layer),
        d.stage
    )
}

/// The prompt, as text or ids.
pub fn prompt_text(p: &Prompt) -> String {
    match p {
        Prompt::Text(t) => t.clone(),
        Prompt::Tokens(ids) => format!(
            "ids {}",
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

/// A worst element's multi-index in the stage's own terms (the layouts
/// of [`crate::trace::Stage`]); `pos0` is the step's first position.
pub fn decode_index(stage: Stage, index: &[usize], pos0: usize, head_dim: Option<usize>) -> String {
    if stage.is_attention_matrix() {
        if let [h, t, k] = index {
            return format!("head {h}, query position {}, key position {k}", pos0 + t);
        }
    }
    let [t, x] = index else {
        return format!("{index:?}");
    };
    let token = format!("position {}", pos0 + t);
    let split = |what: &str| match head_dim {
        Some(d) => format!("{token}, {what} {}, dim {}", x / d, x % d),
        None => format!("{token}, channel {x}"),
    };
    match stage {
        Stage::QProj | Stage::QRope | Stage::AttnOut | Stage::AttnSubNorm => split("head"),
        Stage::KProj | Stage::KRope | Stage::VProj => split("kv head"),
        Stage::FfnGate | Stage::FfnAct | Stage::FfnUp | Stage::FfnMul | Stage::FfnSubNorm => {
            format!("{token}, ffn unit {x}")
        }
        Stage::Logits => format!("{token}, token id {x}"),
        _ => format!("{token}, channel {x}"),
    }
}

fn fact(out: &mut String, name: &str, value: &str) {
    let _ = write!(out, "<dt>{}</dt><dd>{value}</dd>", esc(name));
}

/// The whole section of one receipt; `id` makes its anchors unique.
pub fn section(id: usize, label: &str, r: &Receipt) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<section class="receipt" id="receipt-{id}" data-verdict="{}">"#,
        verdict_name(Some(r.verdict))
    );
    let _ = write!(
        s,
        "<h2>{} {}</h2>",
        verdict_badge(Some(r.verdict)),
        esc(label)
    );
    s.push_str(&headline(r));
    s.push_str(&run_facts(r));
    if let Some(d) = &r.first_divergence {
        s.push_str(&first_divergence(r, d));
    }
    if !r.later_divergences.is_empty() {
        s.push_str(&later_divergences(r));
    }
    s.push_str(&heatmaps(id, r));
    s.push_str(&growth(id, r));
    s.push_str(&tokens(r));
    s.push_str(&coverage(r));
    s.push_str("</section>");
    s
}

/// The verdict in words, with what failed.
fn headline(r: &Receipt) -> String {
    let mut s = String::new();
    match r.verdict {
        Verdict::ReferenceFailed => {
            let _ = write!(
                s,
                r#"<div class="banner" data-failure="reference"><b>The reference (bitnet.cpp) failed.</b> {}</div>"#,
                esc(r.reference_failure.as_deref().unwrap_or("no message"))
            );
        }
        Verdict::CandidateFailed => {
            if let Some(f) = &r.candidate_failure {
                let _ = write!(
                    s,
                    r#"<div class="banner" data-failure="candidate"><b>The candidate failed ({})</b> at step {}, after stage {}: <span class="mono">{}</span><br><span class="muted">The steps that finished before it are shown below; the failing step's stages are not judged.</span></div>"#,
                    esc(&f.kind),
                    f.step.map_or("- (loading)".to_string(), |s| s.to_string()),
                    f.last_stage
                        .map_or("(none)".to_string(), |k| esc(&k.to_string())),
                    esc(&f.message)
                );
            }
        }
        Verdict::Divergence => match &r.first_divergence {
            Some(d) => {
                let _ = write!(
                    s,
                    r#"<div class="banner"><b>First divergence:</b> {} — {}, blame <b>{}</b></div>"#,
                    esc(&divergence_place(d)),
                    esc(&divergence_size(d)),
                    blame_name(d.blame.blame)
                );
            }
            None => s.push_str(
                r#"<div class="banner"><b>The prompt's token ids differ</b> between the two sides (see Tokens).</div>"#,
            ),
        },
        Verdict::Incomplete => s.push_str(
            r#"<div class="banner warn"><b>Incomplete:</b> nothing failed, but not everything expected was judged (see Coverage).</div>"#,
        ),
        Verdict::NoDivergence => {
            let _ = write!(
                s,
                r#"<div class="banner ok"><b>No divergence</b> in {} step(s): every stage judged is within the policy.</div>"#,
                r.steps_run
            );
        }
    }
    if r.interrupted {
        let _ = write!(
            s,
            r#"<div class="banner warn">Interrupted by the user after {} of {} steps: the verdict covers only those.</div>"#,
            r.steps_run,
            r.run.steps + 1
        );
    }
    s
}

/// How far the blamed side is off, in the unit that decided.
fn divergence_size(d: &Divergence) -> String {
    let blamed = match d.blame.blame {
        Blame::Reference => d.reference_local.as_ref(),
        _ => d
            .candidate_local
            .as_ref()
            .filter(|e| !e.pass)
            .or(d.reference_local.as_ref()),
    };
    match (d.measured, blamed) {
        (Measured::Tokens, _) => "the prompt's token ids differ".into(),
        (Measured::Choice, _) => "a generated token the reference ranks below its top-1".into(),
        (Measured::AcrossGap, Some(e)) => format!(
            "NMSE {} against the oracle across {} recomputed stage(s)",
            sci(e.nmse),
            e.recomputed.len()
        ),
        (_, Some(e)) => format!(
            "{} its rounding level on its own inputs (NMSE {} vs the oracle)",
            sci_x(e.over_rounding),
            sci(e.nmse)
        ),
        (_, None) => format!(
            "side against side NMSE {}",
            d.metrics.as_ref().map_or("-".into(), |m| sci(m.nmse))
        ),
    }
}

fn sci_x(v: f64) -> String {
    format!("{}x", sci(v))
}

fn blame_name(b: Blame) -> &'static str {
    match b {
        Blame::Candidate => "candidate",
        Blame::Reference => "reference",
        Blame::Both => "both",
        Blame::Undetermined => "undetermined",
    }
}

fn run_facts(r: &Receipt) -> String {
    let mut s = String::from("<h3>Run</h3><dl class=\"facts\">");
    fact(&mut s, "model", &esc(&r.model.path));
    fact(
        &mut s,
        "sha256",
        &format!("<code>{}</code>", esc(&r.model.sha256)),
    );
    if let Some(f) = &r.model.file {
        fact(
            &mut s,
            "arch, shape",
            &esc(&format!(
                "{}: {} layers, n_embd {}, heads {}/{} (head dim {}), n_ff {}, vocab {}, context {}, rope theta {}",
                f.arch, f.n_layer, f.n_embd, f.n_head, f.n_head_kv, f.head_dim, f.n_ff, f.n_vocab, f.n_ctx_train, f.rope_theta
            )),
        );
    } else if let Some(c) = &r.model.config {
        fact(
            &mut s,
            "arch, shape",
            &esc(&format!(
                "{} (as the candidate read it): {} layers, n_embd {}, heads {}/{}, n_ff {}, vocab {}",
                c.arch.name(),
                c.n_layer,
                c.n_embd,
                c.n_head,
                c.n_head_kv,
                c.n_ff,
                c.n_vocab
            )),
        );
    }
    fact(
        &mut s,
        "prompt",
        &format!(
            r#"<span class="prompt-text">{}</span>"#,
            esc(&prompt_text(&r.run.prompt))
        ),
    );
    fact(
        &mut s,
        "tokens",
        &format!(
            "{} prompt ids (reference), {}",
            r.tokens.reference.len(),
            match (r.tokens.source, r.tokens.equal) {
                (TokenSource::IdsGiven, _) => "given: both sides were fed these ids",
                (TokenSource::NotTokenized, _) =>
                    "none: the run stopped before the prompt was tokenized",
                (TokenSource::CandidateHasNoTokenizer, _) =>
                    "not compared: the candidate has no tokenizer and was fed the reference's ids",
                (_, true) => "each side tokenized the text; they agree",
                (_, false) => "each side tokenized the text; they DIFFER",
            }
        ),
    );
    fact(
        &mut s,
        "mode",
        match r.run.mode {
            Mode::Free if r.offline.is_some() => "offline comparison of two dumps (each engine fed itself; each side judged against the f64 oracle on its own inputs)",
            Mode::Free => "free (each engine feeds itself; each side judged against the f64 oracle on its own inputs)",
            Mode::Resync => "resync (each stage on the reference's inputs; each side also judged against the f64 oracle)",
        },
    );
    fact(
        &mut s,
        "steps",
        &format!(
            "{} decode step(s) asked, {} step(s) run (step 0 is the prefill)",
            r.run.steps, r.steps_run
        ),
    );
    fact(
        &mut s,
        "threads, KV cache",
        &esc(&format!("{}, {:?}", r.run.threads, r.run.kv_type)),
    );
    fact(
        &mut s,
        "policy",
        &esc(&format!(
            "{}{}",
            r.policy.name,
            r.run
                .policy_path
                .as_ref()
                .map_or(String::new(), |p| format!(" ({p})"))
        )),
    );
    if !r.run.faults.is_empty() || !r.run.token_faults.is_empty() {
        let names: Vec<String> = r
            .run
            .faults
            .iter()
            .map(|f| f.name().to_string())
            .chain(r.run.token_faults.iter().map(|f| format!("{f:?}")))
            .collect();
        fact(
            &mut s,
            "injected faults",
            &format!(r#"<span class="bad">{}</span>"#, esc(&names.join(", "))),
        );
    }
    if let Some(o) = &r.offline {
        fact(
            &mut s,
            "offline comparison",
            &esc(&format!(
                "reference dump {}, candidate dump {}{}; {}",
                o.reference_dump,
                o.candidate_dump,
                o.map
                    .as_ref()
                    .map_or(String::new(), |m| format!(", map {m}")),
                o.note
            )),
        );
    }
    let b = &r.reference;
    fact(
        &mut s,
        "reference build",
        &esc(&format!(
            "{} (sha256 {}…), patches [{}], {}, march {}, I2_S {}, {} thread(s); flags {}; CPU {}",
            b.source,
            &b.source_sha256[..b.source_sha256.len().min(12)],
            b.patches.join(", "),
            b.compiler,
            b.march,
            b.i2s_kernel,
            b.threads,
            b.cmake_flags,
            b.cpu_features.join(" ")
        )),
    );
    fact(
        &mut s,
        "candidate build",
        &esc(&format!(
            "{}: {}{}",
            r.candidate.engine,
            r.candidate.build,
            r.candidate
                .kv_semantics
                .map_or(String::new(), |k| format!("; KV cache {k:?}"))
        )),
    );
    fact(
        &mut s,
        "tool",
        &esc(&format!(
            "{}, receipt schema {}; took {:.2} s",
            r.tool, r.schema_version, r.volatile.timings.total_s
        )),
    );
    s.push_str("</dl>");
    s
}

fn metric_rows(m: &Metrics) -> Vec<(&'static str, String)> {
    let mut rows = vec![
        ("elements", m.n.to_string()),
        ("bit-exact", m.exact.to_string()),
        ("NMSE", sci(m.nmse)),
        ("max abs", sci(m.max_abs)),
        ("max rel", sci(m.max_rel)),
        ("cosine", format!("{:.6}", m.cosine)),
        ("max ULP", m.max_ulp.to_string()),
        ("outside tolerance", format!("{} of {}", m.n_outside, m.n)),
        (
            "NaN / Inf (reference)",
            format!("{} / {}", m.nan_reference, m.inf_reference),
        ),
        (
            "NaN / Inf (candidate)",
            format!("{} / {}", m.nan_candidate, m.inf_candidate),
        ),
    ];
    if let Some(l) = &m.logits {
        rows.push((
            "top-1 agree",
            format!("{} of {} rows", l.top1_agree, l.rows),
        ));
        rows.push((
            "top-k overlap",
            format!("{:.3} (k = {})", l.topk_overlap, l.top_k),
        ));
        rows.push(("max KL", sci(l.max_kl)));
    }
    rows
}

fn first_divergence(r: &Receipt, d: &Divergence) -> String {
    let mut s = String::from(
        r#"<div class="first-divergence"><h3>First divergence</h3><dl class="facts">"#,
    );
    fact(&mut s, "where", &esc(&divergence_place(d)));
    fact(
        &mut s,
        "batch positions",
        &esc(&match (d.positions.first(), d.positions.last()) {
            (Some(a), Some(b)) => format!("{a}..={b}"),
            _ => "-".into(),
        }),
    );
    fact(
        &mut s,
        "shape (canonical layout)",
        &esc(&format!("{:?}", d.shape)),
    );
    if let Some(shape) = d.metrics.as_ref().and_then(|m| m.candidate_shape.as_ref()) {
        fact(
            &mut s,
            "candidate shape",
            &format!(
                r#"<span class="bad">{}: the shapes differ</span>"#,
                esc(&format!("{shape:?}"))
            ),
        );
    }
    fact(
        &mut s,
        "measured",
        &esc(&match d.measured {
            Measured::Local => "each side against the f64 oracle on its own inputs".to_string(),
            Measured::AcrossGap => {
                "each side against the f64 oracle, recomputing the stages it does not emit"
                    .to_string()
            }
            Measured::SideVsSide => {
                "side against side (the oracle could not recompute the stage)".to_string()
            }
            Measured::Tokens => "the prompt's token ids".to_string(),
            Measured::Choice => {
                "the tokens it chose, under the reference's logits on its own history".to_string()
            }
        }),
    );
    if let Some(b) = &d.bound {
        fact(
            &mut s,
            "local rule",
            &esc(&match b {
                LocalBound::OverRounding { max } => {
                    format!("error over the stage's rounding level at most {max}")
                }
                LocalBound::AcrossGapNmse { max } => {
                    format!("NMSE against the oracle across the gap at most {max:e}")
                }
            }),
        );
    }
    s.push_str("</dl>");
    // Each side against the oracle on its own inputs.
    let local_rows = |e: &crate::compare::local::LocalError| {
        vec![
            ("error over rounding", sci(e.over_rounding)),
            ("NMSE vs oracle", sci(e.nmse)),
            ("max |side − oracle|", sci(e.max_abs)),
            (
                "tied codes (taken)",
                format!("{} ({})", e.ties, e.ties_taken),
            ),
            ("recomputed stages", e.recomputed.len().to_string()),
            ("within the rule", e.pass.to_string()),
        ]
    };
    if d.candidate_local.is_some() || d.reference_local.is_some() {
        s.push_str("<table class=\"metrics\"><tr><th>local error</th><th>candidate</th><th>reference</th></tr>");
        let c = d.candidate_local.as_ref().map(local_rows);
        let r_ = d.reference_local.as_ref().map(local_rows);
        let n = c.as_ref().or(r_.as_ref()).map_or(0, Vec::len);
        for i in 0..n {
            let name = c.as_ref().or(r_.as_ref()).map_or("", |v| v[i].0);
            let cell = |v: &Option<Vec<(&str, String)>>| {
                v.as_ref().map_or("-".to_string(), |v| v[i].1.clone())
            };
            let _ = write!(
                s,
                "<tr><td>{name}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(&cell(&c)),
                esc(&cell(&r_))
            );
        }
        s.push_str("</table>");
    }
    // Side against side: agreement on the same inputs (resync) or drift.
    if let Some(m) = &d.metrics {
        let _ = write!(
            s,
            "<table class=\"metrics\"><tr><th>side against side</th><th>{}</th></tr>",
            if r.run.mode == Mode::Resync {
                "same inputs (resync)"
            } else {
                "drift (each fed itself)"
            }
        );
        for (name, v) in metric_rows(m) {
            let _ = write!(
                s,
                "<tr><td>{name}</td><td class=\"num\">{}</td></tr>",
                esc(&v)
            );
        }
        let _ = write!(
            s,
            "<tr><td>rule</td><td class=\"num\">{}</td></tr></table>",
            esc(&format!(
                "class {:?}, atol {}, rtol {}, max NMSE {}{}",
                d.rule.class,
                d.rule.atol,
                d.rule.rtol,
                d.rule
                    .max_nmse
                    .map_or("-".to_string(), |v| format!("{v:e}")),
                d.rule
                    .min_top1_agreement
                    .map_or(String::new(), |t| format!(", min top-1 agreement {t}"))
            ))
        );
    }
    // Worst elements, decoded.
    if !d.worst.is_empty() {
        let pos0 = d.positions.first().copied().unwrap_or(0);
        let hd = head_dim(r);
        s.push_str(
            "<h3>Worst elements</h3><table class=\"worst\"><tr><th>index</th><th>where</th><th>reference</th><th>candidate</th><th>oracle (f64)</th><th>|difference|</th></tr>",
        );
        for w in &d.worst {
            let _ = write!(
                s,
                "<tr><td class=\"mono\">{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(&format!("{:?}", w.index)),
                esc(&decode_index(d.stage, &w.index, pos0, hd)),
                w.reference,
                w.candidate,
                w.oracle.map_or("-".to_string(), |o| format!("{o:.7}")),
                sci(w.abs_diff)
            );
        }
        s.push_str("</table>");
    }
    // Blame.
    let b = &d.blame;
    let _ = write!(
        s,
        r#"<h3>Blame: <span class="blame {0}" data-blame="{0}">{0}</span></h3><dl class="facts">"#,
        blame_name(b.blame)
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), sci);
    fact(
        &mut s,
        "NMSE vs oracle (own inputs)",
        &format!(
            "reference {}, candidate {}",
            opt(b.reference_nmse_vs_oracle),
            opt(b.candidate_nmse_vs_oracle)
        ),
    );
    if b.reference_error_over_rounding.is_some() || b.candidate_error_over_rounding.is_some() {
        fact(
            &mut s,
            "error over rounding level",
            &format!(
                "reference {}, candidate {}",
                opt(b.reference_error_over_rounding),
                opt(b.candidate_error_over_rounding)
            ),
        );
    }
    fact(&mut s, "reasoning", &esc(&b.reason));
    if let Some(c) = &b.cause {
        fact(&mut s, "cause", &esc(c));
    }
    s.push_str("</dl></div>");
    s
}

fn later_divergences(r: &Receipt) -> String {
    let mut s = format!(
        "<details><summary>{} later divergence(s) (--keep-going)</summary><table><tr><th>where</th><th>size</th><th>blame</th></tr>",
        r.later_divergences.len()
    );
    for d in r.later_divergences.iter().take(200) {
        let _ = write!(
            s,
            "<tr><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&divergence_place(d)),
            esc(&divergence_size(d)),
            blame_name(d.blame.blame)
        );
    }
    s.push_str("</table></details>");
    s
}

/// The cells of one step: the candidate's local error (against the oracle
/// on its own inputs), or side against side.
fn step_cells(r: &Receipt, step: &StepRecord, sides: bool) -> Vec<Cell> {
    let div = r.first_divergence.as_ref();
    let pair = if r.run.mode == Mode::Resync {
        "against the reference on the same inputs"
    } else {
        "drift from the reference"
    };
    step.stages
        .iter()
        .filter_map(|x| {
            let where_ = format!(
                "step {} · layer {} · {}",
                step.step,
                layer_name(x.layer),
                x.stage
            );
            let is_div = div.is_some_and(|d| {
                d.step == step.step && d.layer == x.layer && d.stage == x.stage
            });
            if sides {
                let v = x.nmse?;
                Some(Cell {
                    layer: x.layer,
                    stage: x.stage,
                    value: if x.exact {
                        CellValue::Exact
                    } else {
                        CellValue::Nmse(v)
                    },
                    failed: !x.agree,
                    divergence: false,
                    title: format!(
                        "{where_}: {pair}: {}{}",
                        if x.exact {
                            "bit-exact".to_string()
                        } else {
                            format!(
                                "NMSE {}, max abs {}",
                                sci(v),
                                x.max_abs.map_or("-".into(), sci)
                            )
                        },
                        if x.agree { "" } else { ", outside the side-against-side rule" }
                    ),
                })
            } else {
                let v = x.candidate_local_nmse.or(x.reference_local_nmse)?;
                Some(Cell {
                    layer: x.layer,
                    stage: x.stage,
                    value: if v == 0.0 {
                        CellValue::Exact
                    } else {
                        CellValue::Nmse(v)
                    },
                    failed: !x.pass,
                    divergence: is_div,
                    title: format!(
                        "{where_}: candidate NMSE {} against the oracle on its own inputs{}, reference {}{}{}",
                        sci(v),
                        if x.across_gap { " (across recomputed stages)" } else { "" },
                        x.reference_local_nmse.map_or("-".into(), sci),
                        if x.pass { "" } else { ", BEYOND its local rule" },
                        if is_div {
                            " — the first divergence"
                        } else {
                            ""
                        }
                    ),
                })
            }
        })
        .collect()
}

/// A thumbnail of the step with the first divergence (else the last step
/// judged), for the comparison table.
pub fn thumbnail(r: &Receipt) -> String {
    let step = match &r.first_divergence {
        Some(d) => r.step_results.iter().find(|s| s.step == d.step),
        None => r.step_results.last(),
    };
    let Some(step) = step else {
        return String::new();
    };
    // Every stage as a column, so that thumbnails of different receipts line up.
    let cols = Stage::ALL.to_vec();
    let cells = step_cells(r, step, false);
    Heatmap {
        n_layer: n_layer(r),
        columns: &cols,
        cells: &cells,
        kind: "thumbnail",
        step: Some(step.step),
        compact: true,
    }
    .render()
}

fn heatmaps(id: usize, r: &Receipt) -> String {
    let mut s = String::from("<h3>log10 NMSE by layer × stage, per step</h3>");
    if r.step_results.is_empty() {
        s.push_str("<p class=\"muted\">No step was judged.</p>");
        return s;
    }
    let free = r.run.mode != Mode::Resync;
    s.push_str(if free {
        "<p class=\"muted\">On the left of each pair the candidate's local error: its NMSE against the f64 oracle recomputed from its own inputs (where an error is born). On the right the drift: the candidate against the reference, each having fed itself (how far the runs grew apart; reported, not judged).</p>"
    } else {
        "<p class=\"muted\">On the left of each pair the candidate's local error: its NMSE against the f64 oracle on its inputs (the reference's, resynced). On the right the candidate against the reference on the same inputs (= where bit-identical).</p>"
    });
    s.push_str(&svg::legend());
    let cols = svg::columns(
        r.step_results
            .iter()
            .flat_map(|st| st.stages.iter().map(|x| &x.stage)),
    );
    let layers = n_layer(r);
    let _ = write!(s, r#"<div class="heatmaps" id="heatmaps-{id}">"#);
    for step in &r.step_results {
        let local = step_cells(r, step, false);
        let _ = write!(
            s,
            r#"<div class="heatmap-pair" data-step="{}"><figure><figcaption>step {} (positions {}..{}) · local</figcaption>{}</figure>"#,
            step.step,
            step.step,
            step.pos0,
            step.pos0 + step.n_tokens,
            Heatmap {
                n_layer: layers,
                columns: &cols,
                cells: &local,
                kind: "local",
                step: Some(step.step),
                compact: false,
            }
            .render()
        );
        let sides = step_cells(r, step, true);
        let _ = write!(
            s,
            r#"<figure><figcaption>step {} · {}</figcaption>{}</figure>"#,
            step.step,
            if free { "drift" } else { "side against side" },
            Heatmap {
                n_layer: layers,
                columns: &cols,
                cells: &sides,
                kind: "sides",
                step: Some(step.step),
                compact: false,
            }
            .render()
        );
        s.push_str("</div>");
    }
    s.push_str("</div>");
    s
}

/// Per layer, the worst value over the steps of one stage: local (None
/// when exact at every step) and propagated.
fn growth_series(r: &Receipt, stage: Stage) -> Vec<Series> {
    let layers = n_layer(r);
    let mut local: Vec<(usize, Option<f64>)> = Vec::new();
    let mut prop: Vec<(usize, Option<f64>)> = Vec::new();
    for l in 0..layers {
        let xs: Vec<_> = r
            .step_results
            .iter()
            .flat_map(|st| st.stages.iter())
            .filter(|x| x.layer == Some(l) && x.stage == stage)
            .collect();
        if xs.is_empty() {
            continue;
        }
        let local_worst = xs
            .iter()
            .filter_map(|x| x.candidate_local_nmse)
            .fold(0.0, f64::max);
        if xs.iter().any(|x| x.candidate_local_nmse.is_some()) {
            local.push((l, (local_worst > 0.0).then(|| svg::log10_nmse(local_worst))));
        }
        let ps: Vec<f64> = xs.iter().filter_map(|x| x.nmse).collect();
        if !ps.is_empty() {
            let worst = ps.iter().copied().fold(0.0, f64::max);
            prop.push((l, (worst > 0.0).then(|| svg::log10_nmse(worst))));
        }
    }
    let mut out = vec![Series {
        name: "candidate vs oracle, own inputs (worst step)".into(),
        color: "#1f5fa8",
        dashed: false,
        points: local,
    }];
    if !prop.is_empty() {
        out.push(Series {
            name: if r.run.mode == Mode::Resync {
                "candidate vs reference, same inputs (worst step)".into()
            } else {
                "drift: candidate vs reference (worst step)".into()
            },
            color: "#c0392b",
            dashed: true,
            points: prop,
        });
    }
    out
}

fn growth(id: usize, r: &Receipt) -> String {
    let layers = n_layer(r);
    let stages = svg::columns(r.step_results.iter().flat_map(|st| {
        st.stages
            .iter()
            .filter(|x| x.layer.is_some())
            .map(|x| &x.stage)
    }));
    if stages.is_empty() || layers == 0 {
        return String::new();
    }
    let chosen = r
        .first_divergence
        .as_ref()
        .map(|d| d.stage)
        .filter(|s| stages.contains(s))
        .or(stages.iter().copied().find(|s| *s == Stage::LOut))
        .unwrap_or(stages[0]);
    let mut s = String::from(
        "<h3>Error growth along the layers</h3><p class=\"muted\">Pick a stage (no script: the buttons are CSS).</p>",
    );
    // One radio per stage; a rule per stage shows its chart when checked.
    let mut css = String::new();
    let _ = write!(s, r#"<div class="growth" id="growth-{id}">"#);
    for st in &stages {
        let rid = format!("growth-{id}-{}", st.name());
        let _ = write!(
            s,
            r#"<input type="radio" name="growth-{id}" id="{rid}"{}><label for="{rid}">{}</label>"#,
            if *st == chosen { " checked" } else { "" },
            st.name()
        );
        let _ = writeln!(
            css,
            "#{rid}:checked ~ .charts #chart-{id}-{} {{ display: block; }}",
            st.name()
        );
    }
    let _ = write!(s, "<style>{css}</style><div class=\"charts\">");
    for st in &stages {
        let _ = write!(
            s,
            r#"<div class="chart" id="chart-{id}-{}">{}</div>"#,
            st.name(),
            svg::line_chart(layers, &growth_series(r, *st), *st)
        );
    }
    s.push_str("</div></div>");
    s
}

fn token_boxes(ids: &[u32], other: &[u32]) -> String {
    let mut s = String::from("<div class=\"tokens\">");
    for (i, id) in ids.iter().enumerate() {
        let differs = other.get(i) != Some(id);
        let _ = write!(
            s,
            r#"<span class="tok{}"><i>{i}</i>{id}</span>"#,
            if differs { " differs" } else { "" }
        );
    }
    s.push_str("</div>");
    s
}

fn tokens(r: &Receipt) -> String {
    let t = &r.tokens;
    let mut s = String::from("<h3>Tokens</h3>");
    if let Some(d) = &t.first_difference {
        let piece = |p: &Option<String>| {
            p.as_ref()
                .map_or(String::new(), |p| format!(" {}", esc(&format!("{p:?}"))))
        };
        let _ = write!(
            s,
            r#"<div class="banner">First difference at position {}: {} (reference {}{}, candidate {}{})</div>"#,
            d.position,
            esc(&d.description),
            d.reference.map_or("-".into(), |v| v.to_string()),
            piece(&d.reference_piece),
            d.candidate.map_or("-".into(), |v| v.to_string()),
            piece(&d.candidate_piece)
        );
    }
    let _ = write!(
        s,
        "<p>Prompt ids, reference ({}{}):</p>{}",
        t.reference.len(),
        t.reference_tokenizer
            .as_ref()
            .map_or(String::new(), |x| format!(", {}", esc(x))),
        token_boxes(&t.reference, &t.candidate)
    );
    if t.equal {
        let _ = write!(
            s,
            "<p>Prompt ids, candidate: the same{}.</p>",
            t.candidate_tokenizer
                .as_ref()
                .map_or(String::new(), |x| format!(" ({})", esc(x)))
        );
    } else {
        let _ = write!(
            s,
            "<p>Prompt ids, candidate ({}):</p>{}",
            t.candidate.len(),
            token_boxes(&t.candidate, &t.reference)
        );
    }
    if !t.duplicate_bos_reference.is_empty() || !t.duplicate_bos_candidate.is_empty() {
        let _ = write!(
            s,
            "<p class=\"bad\">Duplicated BOS at: reference {:?}, candidate {:?}</p>",
            t.duplicate_bos_reference, t.duplicate_bos_candidate
        );
    }
    let g = &r.generated;
    if !g.reference.is_empty() || !g.candidate.is_empty() {
        s.push_str("<table class=\"generated\"><tr><th>greedy choice after step</th><th>reference</th><th>candidate</th><th></th></tr>");
        let n = g.reference.len().max(g.candidate.len());
        // Choice i is made from step i's logits (step 0: the prefill's last position).
        for i in 0..n {
            let (a, b) = (g.reference.get(i), g.candidate.get(i));
            let agree = a.is_some() && a == b;
            let _ = write!(
                s,
                r#"<tr class="{}"><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td>{}</td></tr>"#,
                if agree { "agree" } else { "disagree" },
                i,
                a.map_or("-".into(), |v| v.to_string()),
                b.map_or("-".into(), |v| v.to_string()),
                if agree {
                    "same"
                } else {
                    r#"<span class="bad">differ</span> (both were then fed the reference's token)"#
                }
            );
        }
        s.push_str("</table>");
    }
    s
}

fn coverage(r: &Receipt) -> String {
    let c = &r.coverage;
    let stopped = matches!(
        r.verdict,
        Verdict::CandidateFailed | Verdict::ReferenceFailed
    );
    let mut s = format!(
        "<h3>Coverage</h3><p>{}</p>",
        if stopped {
            "The run stopped at the failure: coverage covers only the steps that finished."
        } else if c.complete {
            "Complete: every stage the arch implies was produced by both sides, every reference node is mapped, the tokens were compared."
        } else {
            "<span class=\"bad\">Not complete</span>: see below."
        }
    );
    let keys = |ks: &[crate::trace::StageKey]| {
        esc(&ks
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(", "))
    };
    let interesting: Vec<_> = c
        .steps
        .iter()
        .filter(|st| {
            !st.missing_reference.is_empty()
                || !st.missing_candidate.is_empty()
                || !st.unexpected_candidate.is_empty()
                || st.after_divergence > 0
                || st.judged < st.expected
        })
        .collect();
    if !interesting.is_empty() {
        s.push_str("<table class=\"coverage\"><tr><th>step</th><th>expected</th><th>judged</th><th>not judged after the divergence</th><th>missing on the reference</th><th>missing on the candidate</th><th>unexpected from the candidate</th></tr>");
        for st in interesting {
            let _ = write!(
                s,
                "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                st.step,
                st.expected,
                st.judged,
                st.after_divergence,
                keys(&st.missing_reference),
                keys(&st.missing_candidate),
                keys(&st.unexpected_candidate)
            );
        }
        s.push_str("</table>");
    }
    if !c.unmapped_reference_nodes.is_empty() {
        let _ = write!(
            s,
            "<p class=\"bad\">Reference graph nodes mapped to no stage: <code>{}</code></p>",
            esc(&c.unmapped_reference_nodes.join(", "))
        );
    }
    for n in &c.notes {
        let _ = write!(s, "<p class=\"muted\">Note: {}</p>", esc(n));
    }
    if !r.config_check.is_empty() {
        s.push_str(
            "<table><tr><th>hyperparameter</th><th>candidate read</th><th>file says</th></tr>",
        );
        for m in &r.config_check {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&m.field),
                esc(&m.candidate),
                esc(&m.file)
            );
        }
        s.push_str("</table>");
    }
    for w in &r.weight_warnings {
        let _ = write!(s, "<p class=\"bad\">Weights: {}</p>", esc(w));
    }
    s
}
