//! A sweep as a page: the KL-divergence statistics and their histogram, the
//! error distribution per (layer, stage), the worst prompts linked to their
//! receipts, and every prompt.

use super::html::{self, esc, href, layer_name, pct, relative_to, sci};
use super::receipt::{prompt_text, verdict_badge};
use super::svg::{self, Cell, CellValue, Heatmap};
use crate::lockstep::Mode;
use crate::sweep::{PromptResult, Sweep};
use std::fmt::Write as _;
use std::path::Path;

/// The page of a sweep; `page_dir` is where the page is written, so links
/// to receipts are relative to it.
pub fn sweep_page(label: &str, sw: &Sweep, page_dir: &Path) -> String {
    let mut s = format!("<h1>divergence sweep: {}</h1>", esc(label));
    s.push_str(&facts(sw));
    s.push_str(&verdicts(sw));
    s.push_str(&kld(sw));
    s.push_str(&stages(sw));
    s.push_str(&worst_prompts(sw, page_dir));
    s.push_str(&all_prompts(sw, page_dir));
    html::page(&format!("divergence sweep: {label}"), &s)
}

fn facts(sw: &Sweep) -> String {
    let c = &sw.config;
    let mut s = String::from("<dl class=\"facts\">");
    let mut fact = |k: &str, v: String| {
        let _ = write!(s, "<dt>{}</dt><dd>{v}</dd>", esc(k));
    };
    fact(
        "model",
        format!(
            "{} <code>{}</code>",
            esc(&c.model_path),
            esc(&c.model_sha256)
        ),
    );
    fact(
        "corpus",
        format!(
            "{} ({} prompts, sha256 <code>{}</code>)",
            esc(&c.prompts_path),
            c.corpus_prompts,
            esc(&c.prompts_sha256)
        ),
    );
    fact(
        "this file",
        match sw.shard {
            Some(sh) => format!(
                "shard {sh}: {} prompts (index % {} == {})",
                sw.prompts.len(),
                sh.count,
                sh.index - 1
            ),
            None => format!("all {} prompts", sw.prompts.len()),
        },
    );
    fact(
        "run",
        esc(&format!(
            "mode {:?}, {} decode step(s) per prompt, {} thread(s), KV {:?}, policy {}{}",
            c.mode,
            c.steps,
            c.threads,
            c.kv_type,
            c.policy.name,
            if c.faults.is_empty() {
                String::new()
            } else {
                format!(
                    ", INJECTED {}",
                    c.faults
                        .iter()
                        .map(|f| f.name())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
        )),
    );
    for b in &sw.builds {
        fact(
            "builds",
            esc(&format!(
                "reference {} ({}, {}, I2_S {}); candidate {}: {}",
                b.reference.source,
                b.reference.compiler,
                b.reference.march,
                b.reference.i2s_kernel,
                b.candidate_engine,
                b.candidate_build
            )),
        );
    }
    fact(
        "took",
        format!(
            "{:.1} s{}",
            sw.volatile.total_s,
            if sw.volatile.merged_from.is_empty() {
                String::new()
            } else {
                format!(
                    " (merged from {})",
                    esc(&sw.volatile.merged_from.join(", "))
                )
            }
        ),
    );
    s.push_str("</dl>");
    s
}

fn verdicts(sw: &Sweep) -> String {
    let mut s = String::from("<h2>Verdicts</h2><table class=\"verdicts\"><tr>");
    for (name, n) in &sw.summary.verdicts {
        let _ = write!(
            s,
            r#"<td data-verdict="{}"><span class="verdict {}">{}</span> {n}</td>"#,
            esc(name),
            esc(name),
            esc(&name.replace('_', " "))
        );
    }
    s.push_str("</tr></table>");
    let g = &sw.summary.greedy_tokens;
    let _ = write!(
        s,
        "<p>Greedy tokens{}: {} of {} choices agree ({}).</p>",
        if sw.config.mode == Mode::Free {
            " (free run: the candidate's own choice; both sides are then fed the reference's token)"
        } else {
            " (resync: the candidate's choice from its resynced logits)"
        },
        g.agreeing,
        g.choices,
        pct(g.rate)
    );
    s
}

/// The decade of a KL value for the histogram (None: exactly 0).
fn kl_bin(kl: f64) -> Option<i32> {
    (kl > 0.0).then(|| (kl.log10().floor() as i32).clamp(-16, 1))
}

fn kld(sw: &Sweep) -> String {
    let mut s = String::from("<h2>KL divergence of the next-token distributions</h2>");
    let Some(k) = &sw.summary.kld else {
        s.push_str("<p class=\"muted\">No position was compared.</p>");
        return s;
    };
    let _ = write!(
        s,
        "<p class=\"muted\">Per position KL(P<sub>ref</sub> ‖ P<sub>cand</sub>) = Σ p<sub>ref</sub> (log p<sub>ref</sub> − log p<sub>cand</sub>) in nats, from the full-precision logits through a log-softmax in f64, as <code>llama-perplexity --kl-divergence</code> defines it; percentiles over all {} positions of all prompts (linear interpolation between ranks). The candidate's logits are {}.</p>",
        k.positions,
        if sw.config.mode == Mode::Free {
            "its own (free run)"
        } else {
            "those of the resynced candidate (resync: only the output stages' own error)"
        }
    );
    s.push_str("<table class=\"kld\"><tr><th>positions</th><th>mean</th><th>min</th><th>median</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th><th>top-1 agreement</th><th>reference top p, reference</th><th>reference top p, candidate</th><th>mean |Δ top p|</th><th>max |Δ top p|</th></tr>");
    let _ = write!(
        s,
        "<tr><td class=\"num\">{}</td>{}<td class=\"num\">{}</td><td class=\"num\">{:.6}</td><td class=\"num\">{:.6}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr></table>",
        k.positions,
        [k.mean, k.min, k.median, k.p90, k.p99, k.p999, k.max]
            .iter()
            .map(|v| format!("<td class=\"num\">{}</td>", sci(*v)))
            .collect::<String>(),
        pct(k.top1_agreement),
        k.same_top_p.reference_mean,
        k.same_top_p.candidate_mean,
        sci(k.same_top_p.mean_abs_difference),
        sci(k.same_top_p.max_abs_difference)
    );
    s.push_str("<p class=\"muted\">Top-1 agreement is what llama-perplexity prints as \"Same top p\"; the reference's top token's probability is given on both sides.</p>");
    // The histogram, by decade.
    let mut bins: Vec<(String, usize)> = vec![("0".into(), 0)];
    for d in -16..=1 {
        let label = match d {
            -16 => "< 1e-15".to_string(),
            1 => "≥ 10".to_string(),
            d => format!("1e{d}"),
        };
        bins.push((label, 0));
    }
    for p in sw.prompts.iter().flat_map(|p| &p.positions) {
        let i = kl_bin(p.compared.kl).map_or(0, |d| (d + 17) as usize);
        bins[i].1 += 1;
    }
    let _ = write!(
        s,
        "<h3>Per-position KL (nats), by decade</h3>{}",
        svg::histogram(&bins, "KL divergence, lower edge of each decade")
    );
    s
}

fn stages(sw: &Sweep) -> String {
    let sum = &sw.summary;
    let mut s = String::from("<h2>Error per (layer, stage) over the corpus</h2>");
    if sum.stages.is_empty() {
        s.push_str("<p class=\"muted\">No stage was judged.</p>");
        return s;
    }
    let sides = sum.stages.iter().any(|d| d.sides_nmse.is_some());
    let n_layer = sum
        .stages
        .iter()
        .filter_map(|d| d.layer)
        .max()
        .map_or(0, |l| l + 1);
    let cols = svg::columns(sum.stages.iter().map(|d| &d.stage));
    let cells: Vec<Cell> = sum
        .stages
        .iter()
        .map(|d| Cell {
            layer: d.layer,
            stage: d.stage,
            value: if d.local_nmse.max == 0.0 {
                CellValue::Exact
            } else {
                CellValue::Nmse(d.local_nmse.p99)
            },
            failed: d.pass_fraction < 1.0,
            divergence: false,
            title: format!(
                "layer {} · {}: p99 local NMSE {} (candidate against the oracle on its own inputs), bit-exact with the reference in {}, within the local rule in {}",
                layer_name(d.layer),
                d.stage,
                sci(d.local_nmse.p99),
                pct(d.exact_fraction),
                pct(d.pass_fraction)
            ),
        })
        .collect();
    let _ = write!(
        s,
        "<p class=\"muted\">The heatmap shows each (layer, stage)'s p99 local NMSE over every step of every prompt: the candidate against the f64 oracle on its own inputs (= where it was exact; red border where some sample was beyond its local rule).</p>{}<figure>{}</figure>",
        svg::legend(),
        Heatmap {
            n_layer,
            columns: &cols,
            cells: &cells,
            kind: "p99",
            step: None,
            compact: false,
        }
        .render()
    );
    s.push_str("<table class=\"stage-distribution\"><tr><th>layer</th><th>stage</th><th>samples</th><th>local median</th><th>local p90</th><th>local p99</th><th>local max</th><th>bit-exact</th><th>passed</th>");
    if sides {
        s.push_str("<th>side vs side median</th><th>p90</th><th>p99</th><th>max</th>");
    }
    s.push_str("</tr>");
    for d in &sum.stages {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>",
            layer_name(d.layer),
            d.stage,
            d.local_nmse.samples,
            sci(d.local_nmse.median),
            sci(d.local_nmse.p90),
            sci(d.local_nmse.p99),
            sci(d.local_nmse.max),
            pct(d.exact_fraction),
            pct(d.pass_fraction)
        );
        if sides {
            match &d.sides_nmse {
                Some(p) => {
                    let _ = write!(
                        s,
                        "<td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>",
                        sci(p.median),
                        sci(p.p90),
                        sci(p.p99),
                        sci(p.max)
                    );
                }
                None => s.push_str("<td></td><td></td><td></td><td></td>"),
            }
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
    s
}

fn max_kl(p: &PromptResult) -> f64 {
    p.positions
        .iter()
        .map(|x| x.compared.kl)
        .fold(0.0, f64::max)
}

fn worst_local(p: &PromptResult) -> f64 {
    p.steps
        .iter()
        .flat_map(|s| s.stages.iter().filter_map(|x| x.candidate_local_nmse))
        .fold(0.0, f64::max)
}

fn receipt_link(p: &PromptResult, page_dir: &Path) -> String {
    match &p.receipt {
        Some(r) => format!(
            r#"<a class="receipt-link" href="{}">{}</a>"#,
            esc(&href(&relative_to(page_dir, Path::new(r)))),
            esc(&Path::new(r)
                .file_name()
                .map_or(r.clone(), |n| n.to_string_lossy().into_owned()))
        ),
        None => "-".into(),
    }
}

fn prompt_row(p: &PromptResult, page_dir: &Path, class: &str) -> String {
    let text = prompt_text(&p.prompt);
    let short: String = text.chars().take(120).collect();
    let divergence = match (&p.first_divergence, &p.not_run, &p.candidate_failure) {
        (Some(d), _, _) => format!(
            "step {} · pos {} · layer {} · {} (NMSE {}, {:?})",
            d.step,
            d.position,
            layer_name(d.layer),
            d.stage,
            sci(d.nmse),
            d.blame
        )
        .to_lowercase(),
        (None, Some(why), _) => format!("not run: {why}"),
        (None, None, Some(f)) => format!("candidate failed: {f}"),
        _ => "-".into(),
    };
    let agree = p
        .generated
        .reference
        .iter()
        .zip(&p.generated.candidate)
        .filter(|(a, b)| a == b)
        .count();
    format!(
        r#"<tr class="{class}" data-index="{}"><td class="num">{}</td><td>{}</td><td class="prompt-text">{}{}</td><td class="num">{}</td><td>{}</td><td>{}</td><td class="num">{}</td><td class="num">{}/{}</td><td>{}</td></tr>"#,
        p.index,
        p.index,
        esc(p.tag.as_deref().unwrap_or("")),
        esc(&short),
        if short.len() < text.len() { "…" } else { "" },
        p.reference_tokens.len(),
        verdict_badge(p.verdict),
        esc(&divergence),
        sci(max_kl(p)),
        agree,
        p.generated.reference.len(),
        receipt_link(p, page_dir)
    )
}

const PROMPT_HEADER: &str = "<tr><th>#</th><th>tag</th><th>prompt</th><th>ids</th><th>verdict</th><th>first divergence</th><th>max KL</th><th>greedy agree</th><th>receipt</th></tr>";

fn worst_prompts(sw: &Sweep, page_dir: &Path) -> String {
    let mut order: Vec<&PromptResult> = sw.prompts.iter().collect();
    order.sort_by(|a, b| {
        max_kl(b)
            .total_cmp(&max_kl(a))
            .then(worst_local(b).total_cmp(&worst_local(a)))
            .then(a.index.cmp(&b.index))
    });
    let mut s = format!(
        "<h2>Worst prompts</h2><p class=\"muted\">By largest per-position KL, then by worst local NMSE.</p><table class=\"worst-prompts\">{PROMPT_HEADER}"
    );
    for p in order.iter().take(10) {
        s.push_str(&prompt_row(p, page_dir, "worst-prompt"));
    }
    s.push_str("</table>");
    s
}

fn all_prompts(sw: &Sweep, page_dir: &Path) -> String {
    let mut s = format!(
        "<details><summary>All {} prompts</summary><table class=\"prompts\">{PROMPT_HEADER}",
        sw.prompts.len()
    );
    for p in &sw.prompts {
        s.push_str(&prompt_row(p, page_dir, "prompt"));
    }
    s.push_str("</table></details>");
    s
}
