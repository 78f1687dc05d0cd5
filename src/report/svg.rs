//! Inline SVG pictures: the layer × stage heatmap, the error-growth line
//! chart and the histogram. Plain markup, no script: titles on the shapes
//! give the numbers on hover, `data-*` attributes give them to tests.

use super::html::esc;
use crate::trace::Stage;
use std::fmt::Write as _;

/// The lowest log10 NMSE drawn; smaller values (and 0) sit at this floor.
pub const FLOOR: f64 = -18.0;

/// log10 of an NMSE, clamped to [`FLOOR`]..=2 (a clamped infinity is 2).
pub fn log10_nmse(nmse: f64) -> f64 {
    if nmse <= 0.0 {
        FLOOR
    } else if nmse >= f64::MAX || nmse.is_nan() {
        2.0
    } else {
        nmse.log10().clamp(FLOOR, 2.0)
    }
}

/// The colour of a log10 NMSE: pale blue at rounding level, through blue
/// and orange, to dark red at NMSE 1 and above.
pub fn color(log10: f64) -> String {
    const STOPS: [(f64, [u8; 3]); 8] = [
        (-18.0, [0xf2, 0xf7, 0xfb]),
        (-14.0, [0xc6, 0xdb, 0xef]),
        (-11.0, [0x6b, 0xae, 0xd6]),
        (-8.0, [0x21, 0x71, 0xb5]),
        (-6.0, [0xfd, 0xd4, 0x9e]),
        (-4.0, [0xfc, 0x8d, 0x59]),
        (-2.0, [0xd7, 0x30, 0x1f]),
        (0.0, [0x7f, 0x00, 0x00]),
    ];
    let v = log10.clamp(STOPS[0].0, STOPS[STOPS.len() - 1].0);
    let i = STOPS
        .windows(2)
        .position(|w| v <= w[1].0)
        .unwrap_or(STOPS.len() - 2);
    let ((x0, c0), (x1, c1)) = (STOPS[i], STOPS[i + 1]);
    let t = if x1 > x0 { (v - x0) / (x1 - x0) } else { 0.0 };
    let mix = |a: u8, b: u8| (f64::from(a) + t * (f64::from(b) - f64::from(a))).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        mix(c0[0], c1[0]),
        mix(c0[1], c1[1]),
        mix(c0[2], c1[2])
    )
}

/// The fill of bit-exact cells.
pub const EXACT_FILL: &str = "#dcefd8";

/// What a heatmap cell shows.
#[derive(Clone, Debug, PartialEq)]
pub enum CellValue {
    /// Bit-identical.
    Exact,
    /// An NMSE (not bit-identical).
    Nmse(f64),
}

/// One judged (layer, stage).
#[derive(Clone, Debug)]
pub struct Cell {
    /// The layer, which picks the row (none for model-level stages).
    pub layer: Option<usize>,
    /// The stage, which picks the column.
    pub stage: Stage,
    /// What the cell shows, which sets its colour.
    pub value: CellValue,
    /// Failed its rule.
    pub failed: bool,
    /// The first divergence: outlined.
    pub divergence: bool,
    /// The hover text.
    pub title: String,
}

/// A heatmap of one step (or of corpus statistics).
pub struct Heatmap<'a> {
    /// Layers of the model (rows between the input and output rows).
    pub n_layer: usize,
    /// The columns, in execution order.
    pub columns: &'a [Stage],
    /// The judged cells; a slot without one stays grey, a cell outside the
    /// columns or rows is not drawn.
    pub cells: &'a [Cell],
    /// `data-kind` of the cells: `local`, `sides`, `p99`, ...
    pub kind: &'a str,
    /// `data-step` of the cells (none for corpus statistics).
    pub step: Option<usize>,
    /// A thumbnail: small cells, no labels (the comparison table).
    pub compact: bool,
}

/// Cell width and height, left and top margins (labels).
fn geometry(compact: bool) -> (usize, usize, usize, usize) {
    if compact {
        (8, 7, 1, 1)
    } else {
        (20, 15, 58, 92)
    }
}

/// The row of a cell: 0 the model input, 1 + layer, then the model output.
fn row_of(layer: Option<usize>, stage: Stage, n_layer: usize) -> usize {
    match (layer, stage) {
        (Some(l), _) => 1 + l,
        (None, Stage::TokEmbd) => 0,
        (None, _) => n_layer + 1,
    }
}

/// The stages a heatmap needs as columns, in execution order.
pub fn columns<'a>(stages: impl IntoIterator<Item = &'a Stage>) -> Vec<Stage> {
    let present: std::collections::BTreeSet<Stage> = stages.into_iter().copied().collect();
    Stage::ALL
        .into_iter()
        .filter(|s| present.contains(s))
        .collect()
}

impl Heatmap<'_> {
    /// The SVG.
    pub fn render(&self) -> String {
        let (cw, ch, left, top) = geometry(self.compact);
        let rows = self.n_layer + 2;
        let (w, h) = (left + self.columns.len() * cw + 4, top + rows * ch + 4);
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg class="heatmap" data-kind="{}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">"#,
            esc(self.kind)
        );
        // Column labels, rotated (none on a thumbnail).
        let labelled = if self.compact { &[][..] } else { self.columns };
        for (c, stage) in labelled.iter().enumerate() {
            let x = left + c * cw + cw / 2 + 4;
            let _ = write!(
                s,
                r##"<text x="{x}" y="{}" font-size="10" transform="rotate(-60 {x} {})" fill="#333">{}</text>"##,
                top - 4,
                top - 4,
                stage.name()
            );
        }
        // Row labels.
        for r in (0..rows).filter(|_| !self.compact) {
            let label = match r {
                0 => "input".to_string(),
                r if r == rows - 1 => "output".to_string(),
                r => format!("layer {}", r - 1),
            };
            let _ = write!(
                s,
                r##"<text x="{}" y="{}" font-size="10" text-anchor="end" fill="#333">{label}</text>"##,
                left - 4,
                top + r * ch + ch - 3
            );
        }
        // Slots: where a stage could be judged (grey until a cell covers it).
        for (c, stage) in self.columns.iter().enumerate() {
            let slot_rows: Vec<usize> = if stage.is_per_layer() {
                (1..=self.n_layer).collect()
            } else {
                vec![row_of(None, *stage, self.n_layer)]
            };
            for r in slot_rows {
                let _ = write!(
                    s,
                    r##"<rect class="slot" x="{}" y="{}" width="{}" height="{}" fill="#f4f4f4" stroke="#e2e2e2" stroke-width="0.5"/>"##,
                    left + c * cw,
                    top + r * ch,
                    cw,
                    ch
                );
            }
        }
        let mut outline = String::new();
        for cell in self.cells {
            let Some(c) = self.columns.iter().position(|s| *s == cell.stage) else {
                continue;
            };
            let r = row_of(cell.layer, cell.stage, self.n_layer);
            if r >= rows {
                continue;
            }
            let (x, y) = (left + c * cw, top + r * ch);
            let (fill, log10) = match cell.value {
                CellValue::Exact => (EXACT_FILL.to_string(), None),
                CellValue::Nmse(v) => {
                    let l = log10_nmse(v);
                    (color(l), Some(l))
                }
            };
            let mut class = String::from("cell");
            if cell.value == CellValue::Exact {
                class.push_str(" exact");
            }
            if cell.failed {
                class.push_str(" failed");
            }
            if cell.divergence {
                class.push_str(" divergence");
            }
            let (stroke, width) = match (cell.failed, self.compact) {
                (true, false) => ("#b3001b", 1.5),
                (true, true) => ("#b3001b", 0.8),
                (false, _) => ("#ffffff", 0.5),
            };
            let _ = write!(
                s,
                r#"<rect class="{class}" data-kind="{}" data-step="{}" data-layer="{}" data-stage="{}" data-log10-nmse="{}" x="{x}" y="{y}" width="{cw}" height="{ch}" fill="{fill}" stroke="{stroke}" stroke-width="{width}"><title>{}</title></rect>"#,
                esc(self.kind),
                self.step.map_or(String::new(), |s| s.to_string()),
                cell.layer.map_or("model".to_string(), |l| l.to_string()),
                cell.stage.name(),
                log10.map_or("exact".to_string(), |l| format!("{l:.2}")),
                esc(&cell.title)
            );
            if cell.value == CellValue::Exact && !self.compact {
                let _ = write!(
                    s,
                    r##"<text x="{}" y="{}" font-size="9" text-anchor="middle" fill="#3c7a3c" pointer-events="none">=</text>"##,
                    x + cw / 2,
                    y + ch - 3
                );
            }
            if cell.divergence {
                let _ = write!(
                    outline,
                    r##"<rect class="divergence-outline" x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#000" stroke-width="{}" pointer-events="none"/>"##,
                    x as f64 - 1.0,
                    y as f64 - 1.0,
                    cw + 2,
                    ch + 2,
                    if self.compact { 1.5 } else { 2.5 }
                );
            }
        }
        s.push_str(&outline);
        s.push_str("</svg>");
        s
    }
}

/// The colour key of the heatmaps.
pub fn legend() -> String {
    let mut s = String::new();
    let steps: Vec<i32> = (-18..=0).collect();
    let w = 70 + steps.len() * 22 + 16 + 70 + 100 + 200;
    let _ = write!(
        s,
        r#"<svg class="legend" xmlns="http://www.w3.org/2000/svg" width="{w}" height="40" viewBox="0 0 {w} 40">"#
    );
    s.push_str(r##"<text x="0" y="22" font-size="11" fill="#333">log10 NMSE</text>"##);
    for (i, v) in steps.iter().enumerate() {
        let x = 70 + i * 22;
        let _ = write!(
            s,
            r##"<rect x="{x}" y="8" width="22" height="14" fill="{}"/>"##,
            color(f64::from(*v))
        );
        if v % 3 == 0 {
            let _ = write!(
                s,
                r##"<text x="{}" y="35" font-size="10" text-anchor="middle" fill="#333">{v}</text>"##,
                x + 11
            );
        }
    }
    let x0 = 70 + steps.len() * 22 + 16;
    let _ = write!(
        s,
        r##"<rect x="{x0}" y="8" width="17" height="14" fill="{EXACT_FILL}"/><text x="{}" y="19" font-size="9" text-anchor="middle" fill="#3c7a3c">=</text><text x="{}" y="20" font-size="11" fill="#333">exact</text>"##,
        x0 + 8,
        x0 + 22
    );
    let x1 = x0 + 70;
    let _ = write!(
        s,
        r##"<rect x="{x1}" y="8" width="17" height="14" fill="#f4f4f4" stroke="#e2e2e2"/><text x="{}" y="20" font-size="11" fill="#333">not judged</text>"##,
        x1 + 22
    );
    let x2 = x1 + 100;
    let _ = write!(
        s,
        r##"<rect x="{x2}" y="8" width="17" height="14" fill="#fff" stroke="#b3001b" stroke-width="1.5"/><text x="{}" y="20" font-size="11" fill="#333">failed</text><rect x="{}" y="7" width="19" height="16" fill="none" stroke="#000" stroke-width="2.5"/><text x="{}" y="20" font-size="11" fill="#333">first divergence</text>"##,
        x2 + 22,
        x2 + 66,
        x2 + 90
    );
    s.push_str("</svg>");
    s
}

/// One line of a line chart: a value per layer (None: bit-exact).
pub struct Series {
    /// The legend label, also shown in the points' hover text.
    pub name: String,
    /// SVG colour of the line and its points, e.g. `#1f5fa8`.
    pub color: &'static str,
    /// Draw the line dashed.
    pub dashed: bool,
    /// (layer, log10 NMSE or None for exact).
    pub points: Vec<(usize, Option<f64>)>,
}

/// log10 NMSE along the layers, one line per series; exact points sit on
/// the floor as hollow circles.
pub fn line_chart(n_layer: usize, series: &[Series], stage: Stage) -> String {
    let (w, h) = (720usize, 260usize);
    let (left, right, top, bottom) = (58.0, 190.0, 12.0, 34.0);
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().filter_map(|p| p.1))
        .fold(0.0f64, f64::max)
        .ceil()
        .max(0.0);
    let ymin = FLOOR;
    let plot_w = w as f64 - left - right;
    let plot_h = h as f64 - top - bottom;
    let xs = |layer: usize| {
        if n_layer <= 1 {
            left + plot_w / 2.0
        } else {
            left + plot_w * layer as f64 / (n_layer - 1) as f64
        }
    };
    let ys = |v: f64| top + plot_h * (ymax - v) / (ymax - ymin);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="line-chart" data-stage="{}" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">"#,
        stage.name()
    );
    // Axes and grid: a line every 2 decades.
    let mut v = ymin;
    while v <= ymax + 1e-9 {
        let y = ys(v);
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#e6e6e6"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end" fill="#555">{}</text>"##,
            left + plot_w,
            left - 4.0,
            y + 3.0,
            if v == ymin {
                "exact".to_string()
            } else {
                format!("{v:.0}")
            }
        );
        v += 2.0;
    }
    let label_every = n_layer.div_ceil(15).max(1);
    for l in (0..n_layer).step_by(label_every) {
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="#555">{l}</text>"##,
            xs(l),
            top + plot_h + 13.0
        );
    }
    let _ = write!(
        s,
        r##"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle" fill="#333">layer</text><text x="11" y="{:.1}" font-size="11" fill="#333" transform="rotate(-90 11 {:.1})" text-anchor="middle">log10 NMSE of {}</text>"##,
        left + plot_w / 2.0,
        h - 4,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        stage.name()
    );
    for (i, line) in series.iter().enumerate() {
        let pts: Vec<String> = line
            .points
            .iter()
            .map(|&(l, v)| format!("{:.1},{:.1}", xs(l), ys(v.unwrap_or(ymin))))
            .collect();
        let dash = if line.dashed {
            r#" stroke-dasharray="5 3""#
        } else {
            ""
        };
        let _ = write!(
            s,
            r#"<polyline class="series" data-series="{}" points="{}" fill="none" stroke="{}" stroke-width="1.8"{dash}/>"#,
            esc(&line.name),
            pts.join(" "),
            line.color
        );
        for &(l, v) in &line.points {
            let fill = if v.is_some() { line.color } else { "#fff" };
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{fill}" stroke="{}"><title>{}: layer {l}: {}</title></circle>"#,
                xs(l),
                ys(v.unwrap_or(ymin)),
                line.color,
                esc(&line.name),
                v.map_or("bit-exact".to_string(), |v| format!("log10 NMSE {v:.2}"))
            );
        }
        let ly = top + 12.0 + 16.0 * i as f64;
        let _ = write!(
            s,
            r##"<line x1="{:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}" font-size="11" fill="#333">{}</text>"##,
            left + plot_w + 8.0,
            left + plot_w + 28.0,
            line.color,
            left + plot_w + 32.0,
            ly + 4.0,
            esc(&line.name)
        );
    }
    s.push_str("</svg>");
    s
}

/// Bars: one per (label, count).
pub fn histogram(bins: &[(String, usize)], x_label: &str) -> String {
    let (bar_w, gap, h) = (34usize, 4usize, 230usize);
    let (left, top, bottom) = (44usize, 10usize, 58usize);
    let w = left + bins.len() * (bar_w + gap) + 10;
    let max = bins.iter().map(|b| b.1).max().unwrap_or(0).max(1);
    let plot_h = (h - top - bottom) as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">"#
    );
    let _ = write!(
        s,
        r##"<text x="{}" y="{}" font-size="10" text-anchor="end" fill="#555">{max}</text><text x="{}" y="{}" font-size="10" text-anchor="end" fill="#555">0</text>"##,
        left - 4,
        top + 8,
        left - 4,
        h - bottom
    );
    for (i, (label, count)) in bins.iter().enumerate() {
        let x = left + i * (bar_w + gap);
        let bh = plot_h * *count as f64 / max as f64;
        let y = (h - bottom) as f64 - bh;
        let _ = write!(
            s,
            r##"<rect class="bar" data-label="{}" data-count="{count}" x="{x}" y="{y:.1}" width="{bar_w}" height="{bh:.1}" fill="#4a78b5"><title>{}: {count}</title></rect>"##,
            esc(label),
            esc(label)
        );
        if *count > 0 {
            let _ = write!(
                s,
                r##"<text x="{}" y="{:.1}" font-size="9" text-anchor="middle" fill="#333">{count}</text>"##,
                x + bar_w / 2,
                y - 2.0
            );
        }
        let lx = x + bar_w / 2;
        let ly = h - bottom + 10;
        let _ = write!(
            s,
            r##"<text x="{lx}" y="{ly}" font-size="9" text-anchor="end" fill="#333" transform="rotate(-45 {lx} {ly})">{}</text>"##,
            esc(label)
        );
    }
    let _ = write!(
        s,
        r##"<line x1="{left}" x2="{}" y1="{}" y2="{}" stroke="#999"/><text x="{}" y="{}" font-size="11" text-anchor="middle" fill="#333">{}</text>"##,
        w - 10,
        h - bottom,
        h - bottom,
        left + (w - left) / 2,
        h - 4,
        esc(x_label)
    );
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_run_from_pale_to_dark_and_clamp() {
        assert_eq!(color(-30.0), "#f2f7fb");
        assert_eq!(color(5.0), "#7f0000");
        assert_eq!(color(-8.0), "#2171b5");
        assert_eq!(log10_nmse(0.0), FLOOR);
        assert_eq!(log10_nmse(f64::MAX), 2.0);
        assert!((log10_nmse(1e-5) + 5.0).abs() < 1e-12);
    }
}
