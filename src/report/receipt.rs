//! One receipt as a page section: the verdict and the run, the first
//! divergence with its evidence, the heatmaps, the error growth, the tokens
//! and the coverage.

use super::html::{esc, layer_name, sci};
use super::svg::{self, Cell, CellValue, Heatmap, Series};
use crate::compare::{Blame, Metrics};
use crate::lockstep::{Divergence, Mode, Prompt, StepRecord, TokenSource, Verdict};
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
                    r#"<div class="banner"><b>First divergence:</b> {} — NMSE {}, blame <b>{}</b></div>"#,
                    esc(&divergence_place(d)),
                    sci(d.metrics.nmse),
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
            Mode::Free => "free (each engine feeds itself; a resynced twin measures local error)",
            Mode::Resync => "resync (each stage on the reference's inputs)",
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
    if let Some(shape) = &d.metrics.candidate_shape {
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
        "rule",
        &esc(&format!(
            "class {:?}, atol {}, rtol {}, max NMSE {}{} ({:?} error judged)",
            d.rule.class,
            d.rule.atol,
            d.rule.rtol,
            d.rule.max_nmse,
            d.rule
                .min_top1_agreement
                .map_or(String::new(), |t| format!(", min top-1 agreement {t}")),
            d.measured
        )),
    );
    s.push_str("</dl>");
    // Metrics, local and propagated side by side.
    s.push_str("<table class=\"metrics\"><tr><th>metric</th><th>local</th>");
    let prop = d.propagated.as_ref().map(metric_rows);
    if prop.is_some() {
        s.push_str("<th>propagated (free run)</th>");
    }
    s.push_str("</tr>");
    for (i, (name, v)) in metric_rows(&d.metrics).into_iter().enumerate() {
        let _ = write!(s, "<tr><td>{name}</td><td class=\"num\">{}</td>", esc(&v));
        if let Some(p) = &prop {
            let _ = write!(
                s,
                "<td class=\"num\">{}</td>",
                esc(&p.get(i).map_or(String::new(), |x| x.1.clone()))
            );
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
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
        "reference NMSE vs oracle",
        &opt(b.reference_nmse_vs_oracle),
    );
    fact(
        &mut s,
        "candidate NMSE vs oracle",
        &opt(b.candidate_nmse_vs_oracle),
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
    s.push_str("</dl></div>");
    s
}

fn later_divergences(r: &Receipt) -> String {
    let mut s = format!(
        "<details><summary>{} later divergence(s) (--keep-going)</summary><table><tr><th>where</th><th>NMSE</th><th>blame</th></tr>",
        r.later_divergences.len()
    );
    for d in r.later_divergences.iter().take(200) {
        let _ = write!(
            s,
            "<tr><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&divergence_place(d)),
            sci(d.metrics.nmse),
            blame_name(d.blame.blame)
        );
    }
    s.push_str("</table></details>");
    s
}

/// The local (and in free mode the propagated) cells of one step.
fn step_cells(r: &Receipt, step: &StepRecord, propagated: bool) -> Vec<Cell> {
    let div = r.first_divergence.as_ref();
    step.stages
        .iter()
        .filter_map(|x| {
            let where_ = format!(
                "step {} · layer {} · {}",
                step.step,
                layer_name(x.layer),
                x.stage
            );
            if propagated {
                let p = x.propagated_nmse?;
                let failed = x.propagated_pass == Some(false);
                Some(Cell {
                    layer: x.layer,
                    stage: x.stage,
                    value: if p == 0.0 {
                        CellValue::Exact
                    } else {
                        CellValue::Nmse(p)
                    },
                    failed,
                    divergence: false,
                    title: format!(
                        "{where_}: propagated NMSE {}{}",
                        sci(p),
                        if failed {
                            ", outside the free-run rule"
                        } else {
                            ""
                        }
                    ),
                })
            } else {
                let is_div = div.is_some_and(|d| {
                    d.step == step.step && d.layer == x.layer && d.stage == x.stage
                });
                Some(Cell {
                    layer: x.layer,
                    stage: x.stage,
                    value: if x.exact {
                        CellValue::Exact
                    } else {
                        CellValue::Nmse(x.nmse)
                    },
                    failed: !x.pass,
                    divergence: is_div,
                    title: format!(
                        "{where_}: {}{}{}",
                        if x.exact {
                            "bit-exact".to_string()
                        } else {
                            format!("NMSE {}, max abs {}", sci(x.nmse), sci(x.max_abs))
                        },
                        if x.pass { "" } else { ", FAILED its rule" },
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
    let free = r
        .step_results
        .iter()
        .any(|st| st.stages.iter().any(|x| x.propagated_nmse.is_some()));
    if free {
        s.push_str("<p class=\"muted\">Free mode: on the left of each pair the local error (the stage on the reference's inputs, where an error is born), on the right the propagated error (each engine on its own inputs: how it grows).</p>");
    }
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
            r#"<div class="heatmap-pair" data-step="{}"><figure><figcaption>step {} (positions {}..{}){}</figcaption>{}</figure>"#,
            step.step,
            step.step,
            step.pos0,
            step.pos0 + step.n_tokens,
            if free { " · local" } else { "" },
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
        if free {
            let prop = step_cells(r, step, true);
            let _ = write!(
                s,
                r#"<figure><figcaption>step {} · propagated</figcaption>{}</figure>"#,
                step.step,
                Heatmap {
                    n_layer: layers,
                    columns: &cols,
                    cells: &prop,
                    kind: "propagated",
                    step: Some(step.step),
                    compact: false,
                }
                .render()
            );
        }
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
        let worst = xs.iter().map(|x| x.nmse).fold(0.0, f64::max);
        let exact = xs.iter().all(|x| x.exact);
        local.push((l, (!exact).then(|| svg::log10_nmse(worst))));
        let ps: Vec<f64> = xs.iter().filter_map(|x| x.propagated_nmse).collect();
        if !ps.is_empty() {
            let worst = ps.iter().copied().fold(0.0, f64::max);
            prop.push((l, (worst > 0.0).then(|| svg::log10_nmse(worst))));
        }
    }
    let mut out = vec![Series {
        name: "local (worst step)".into(),
        color: "#1f5fa8",
        dashed: false,
        points: local,
    }];
    if !prop.is_empty() {
        out.push(Series {
            name: "propagated (worst step)".into(),
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
