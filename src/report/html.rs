//! Escaping and the page frame. Every piece of text that comes from a
//! receipt or a corpus (prompts, paths, messages, build strings) goes
//! through [`esc`]; numbers the report formats itself need not.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

/// Text for HTML content and attribute values (double- or single-quoted):
/// the five characters that can end a text run or an attribute.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A path as a relative URL: each segment percent-encoded except the
/// unreserved characters, so `#`, `?`, `%` and spaces in file names stay
/// part of the path. The result still goes through [`esc`] (it is safe
/// there: no character it keeps needs escaping).
pub fn href(path: &Path) -> String {
    let mut out = String::new();
    let absolute = path.is_absolute();
    let mut first = true;
    for c in path.components() {
        let seg = match c {
            Component::RootDir => continue,
            Component::CurDir => ".".to_string(),
            Component::ParentDir => "..".to_string(),
            Component::Normal(s) => s.to_string_lossy().into_owned(),
            Component::Prefix(p) => p.as_os_str().to_string_lossy().into_owned(),
        };
        if !first || absolute {
            out.push('/');
        }
        first = false;
        for b in seg.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(b as char);
            } else {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    if absolute {
        format!("file://{out}")
    } else {
        out
    }
}

/// `target` as seen from a page in `page_dir`: relative when both are
/// relative to the same working directory or both absolute, else absolute.
pub fn relative_to(page_dir: &Path, target: &Path) -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_default();
    let abs = |p: &Path| -> PathBuf {
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            cwd.join(p)
        };
        // Lexical normalisation: `a/./b/../c` → `a/c` (no symlinks resolved).
        let mut out = PathBuf::new();
        for c in joined.components() {
            match c {
                Component::CurDir => {}
                Component::ParentDir => {
                    out.pop();
                }
                c => out.push(c.as_os_str()),
            }
        }
        out
    };
    let (from, to) = (abs(page_dir), abs(target));
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    if common == 0 {
        return to;
    }
    let mut rel = PathBuf::new();
    for _ in from.components().skip(common) {
        rel.push("..");
    }
    for c in to.components().skip(common) {
        rel.push(c.as_os_str());
    }
    rel
}

/// A number in short scientific form; "0" for zero, "max" for a value that
/// was clamped from infinity or NaN.
pub fn sci(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x >= f64::MAX || x.is_nan() {
        "max".into()
    } else {
        format!("{x:.2e}")
    }
}

/// A fraction as a percentage.
pub fn pct(x: f64) -> String {
    format!("{:.2}%", 100.0 * x)
}

/// `Option<usize>` layers as text.
pub fn layer_name(layer: Option<usize>) -> String {
    layer.map_or_else(|| "model".to_string(), |l| l.to_string())
}

const CSS: &str = r#"
:root { --ink:#1d2330; --muted:#5b6475; --line:#d5d9e0; --bad:#b3001b; --good:#1f7a35; --warn:#a05a00; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink);
       margin: 0 auto; padding: 1.2rem 1.6rem 3rem; max-width: 1500px; line-height: 1.4; background: #fff; }
h1 { font-size: 1.5rem; margin: .2rem 0 .6rem; }
h2 { font-size: 1.2rem; margin: 1.6rem 0 .5rem; border-bottom: 1px solid var(--line); padding-bottom: .2rem; }
h3 { font-size: 1.02rem; margin: 1rem 0 .4rem; }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: .88em; }
table { border-collapse: collapse; margin: .3rem 0 .8rem; font-size: .9rem; }
th, td { border: 1px solid var(--line); padding: .2rem .45rem; text-align: left; vertical-align: top; }
th { background: #f3f5f8; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15rem .9rem; margin: .3rem 0 .8rem; font-size: .92rem; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
.verdict { display: inline-block; padding: .25rem .7rem; border-radius: .3rem; font-weight: 700; color: #fff; }
.verdict.no_divergence { background: var(--good); }
.verdict.divergence, .verdict.candidate_failed, .verdict.reference_failed { background: var(--bad); }
.verdict.incomplete, .verdict.not_run { background: var(--warn); }
.banner { border-left: 5px solid var(--bad); background: #fff3f3; padding: .5rem .8rem; margin: .6rem 0; }
.banner.warn { border-color: var(--warn); background: #fff8ec; }
.banner.ok { border-color: var(--good); background: #f0faf2; }
.muted { color: var(--muted); }
.bad { color: var(--bad); font-weight: 600; }
.heatmaps { display: flex; flex-wrap: wrap; gap: 1.2rem; align-items: flex-start; }
.heatmap-pair { display: flex; gap: .8rem; flex-wrap: wrap; }
figure { margin: 0; }
figcaption { font-size: .85rem; color: var(--muted); margin-bottom: .2rem; }
svg text { font-family: system-ui, "DejaVu Sans", sans-serif; }
.tokens { display: flex; flex-wrap: wrap; gap: 3px; margin: .3rem 0 .8rem; }
.tok { display: inline-flex; flex-direction: column; border: 1px solid var(--line); padding: 1px 4px; font-size: .78rem;
       font-family: ui-monospace, "DejaVu Sans Mono", monospace; min-width: 2.6rem; }
.tok i { color: var(--muted); font-style: normal; font-size: .68rem; }
.tok.differs { border-color: var(--bad); background: #fff0f0; }
.growth > input { position: absolute; opacity: 0; pointer-events: none; }
.growth > label { display: inline-block; padding: .1rem .4rem; margin: 0 .15rem .25rem 0; border: 1px solid var(--line);
                  border-radius: .25rem; font-size: .8rem; cursor: pointer; font-family: ui-monospace, monospace; }
.growth > input:checked + label { background: var(--ink); color: #fff; border-color: var(--ink); }
.growth .chart { display: none; }
details > summary { cursor: pointer; font-weight: 600; margin: .4rem 0; }
a { color: #0b57d0; }
.prompt-text { max-width: 38rem; overflow-wrap: anywhere; white-space: pre-wrap; }
"#;

/// The whole document around `body`.
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n",
        esc(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_character_that_ends_text_or_an_attribute() {
        assert_eq!(
            esc(r#"<script>alert("x") & 'y'</script>"#),
            "&lt;script&gt;alert(&quot;x&quot;) &amp; &#39;y&#39;&lt;/script&gt;"
        );
        assert_eq!(esc("plain ü 日本"), "plain ü 日本");
    }

    #[test]
    fn hrefs_keep_odd_file_names_inside_the_path() {
        assert_eq!(href(Path::new("r/a b#1?.json")), "r/a%20b%231%3F.json");
        assert_eq!(href(Path::new("/tmp/x.json")), "file:///tmp/x.json");
        assert_eq!(href(Path::new("../x.json")), "../x.json");
    }

    #[test]
    fn relative_paths_climb_out_of_the_page_folder() {
        assert_eq!(
            relative_to(Path::new("out/html"), Path::new("out/receipts/p.json")),
            PathBuf::from("../receipts/p.json")
        );
        assert_eq!(
            relative_to(Path::new("."), Path::new("r/p.json")),
            PathBuf::from("r/p.json")
        );
    }
}
