//! HTML reports: one self-contained file (inline CSS and SVG, no script,
//! no network, no external font) that opens from disk.
//!
//! - One receipt: the verdict and the run, the first divergence with its
//!   metrics, worst elements (decoded into position, head and dimension
//!   where the stage has them), the oracle's values and the blame; a heatmap
//!   of log10 NMSE by layer × stage for every step (bit-exact cells marked,
//!   the first divergence outlined; in free mode local and propagated error
//!   side by side); the error growth along the layers for a chosen stage;
//!   the tokens; the coverage.
//! - Several receipts: one row per receipt in a comparison table (the bug
//!   zoo: one row per fault), each receipt's section below it.
//! - A sweep: the KL-divergence statistics and a histogram of per-position
//!   KL, the error distribution per (layer, stage), the worst prompts linked
//!   to their receipts, and every prompt.
//!
//! Text from receipts and corpora is escaped by [`html::esc`]; the escaping
//! is ours (five characters) rather than a templating crate's: the pages are
//! built by a few functions, and one place that escapes is easy to audit.

pub mod html;
pub mod receipt;
pub mod svg;
pub mod sweep;

use crate::receipt::Receipt;
use html::{esc, sci};
use std::fmt::Write as _;

/// The page of one receipt, or the comparison page of several. `labels`
/// name them (file names).
pub fn receipts_page(receipts: &[(String, Receipt)]) -> String {
    match receipts {
        [(label, r)] => html::page(
            &format!("divergence report: {label}"),
            &format!(
                "<h1>divergence report</h1>{}",
                receipt::section(0, label, r)
            ),
        ),
        many => {
            let mut body = format!(
                "<h1>divergence: {} receipts compared</h1>{}<h2>Receipts in full</h2>",
                many.len(),
                comparison_table(many)
            );
            for (i, (label, r)) in many.iter().enumerate() {
                let _ = write!(
                    body,
                    "<details class=\"receipt-details\"><summary>{} {}</summary>{}</details>",
                    receipt::verdict_badge(Some(r.verdict)),
                    esc(label),
                    receipt::section(i, label, r)
                );
            }
            html::page(&format!("divergence: {} receipts", many.len()), &body)
        }
    }
}

/// One row per receipt: what was injected, what was found, where, blamed on whom.
fn comparison_table(receipts: &[(String, Receipt)]) -> String {
    let mut s = String::from(
        "<table class=\"comparison\"><tr><th>#</th><th>receipt</th><th>injected</th><th>model</th><th>mode</th><th>verdict</th><th>first divergence</th><th>NMSE</th><th>blame</th><th>greedy tokens</th><th>where (step of the divergence)</th></tr>",
    );
    for (i, (label, r)) in receipts.iter().enumerate() {
        let injected: Vec<String> = r
            .run
            .faults
            .iter()
            .map(|f| f.name().to_string())
            .chain(r.run.token_faults.iter().map(|f| format!("{f:?}")))
            .collect();
        let model = std::path::Path::new(&r.model.path)
            .file_name()
            .map_or(r.model.path.clone(), |n| n.to_string_lossy().into_owned());
        let (place, nmse, blame) = match (&r.first_divergence, r.verdict) {
            (Some(d), _) => (
                receipt::divergence_place(d),
                sci(d.nmse()),
                format!("{:?}", d.blame.blame).to_lowercase(),
            ),
            (None, crate::lockstep::Verdict::CandidateFailed) => (
                r.candidate_failure
                    .as_ref()
                    .map_or("candidate failed".into(), |f| {
                        format!(
                            "candidate failed ({}) {}",
                            f.kind,
                            f.step
                                .map_or("loading".to_string(), |s| format!("at step {s}"))
                        )
                    }),
                "-".into(),
                "candidate".into(),
            ),
            (None, _) if !r.tokens.equal => {
                ("the prompt's token ids".into(), "-".into(), "-".into())
            }
            _ => ("-".into(), "-".into(), "-".into()),
        };
        let disagreements = r.generated.disagreements.len();
        let _ = write!(
            s,
            r##"<tr class="receipt-row" data-verdict="{}"><td class="num">{i}</td><td><a href="#receipt-{i}">{}</a></td><td>{}</td><td>{}</td><td>{:?}</td><td>{}</td><td>{}</td><td class="num">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"##,
            crate::sweep::verdict_name(Some(r.verdict)),
            esc(label),
            if injected.is_empty() {
                "none".to_string()
            } else {
                esc(&injected.join(", "))
            },
            esc(&model),
            r.run.mode,
            receipt::verdict_badge(Some(r.verdict)),
            esc(&place),
            nmse,
            esc(&blame),
            if disagreements == 0 {
                format!("{} agree", r.generated.reference.len())
            } else {
                format!("{disagreements} of {} differ", r.generated.reference.len())
            },
            receipt::thumbnail(r)
        );
    }
    s.push_str("</table>");
    s
}
