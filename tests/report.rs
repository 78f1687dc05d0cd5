//! HTML reports, rendered in a real browser: a `find` receipt (free mode, a
//! planted bug), a zoo receipt, a zoo comparison page and a sweep are
//! rendered by headless Chromium (`--dump-dom`), and the DOM it built is
//! checked against the receipt: one heatmap cell per judged (layer, stage)
//! per step, exact cells marked, the first divergence's cell marked. A
//! screenshot of each page goes under `target/report-screenshots/`. The
//! test fails when Chromium cannot render a page; without Chromium it skips
//! with a message, and under `CI` it fails (`.ci/run` installs it).
//!
//! The other tests need no browser: escaping, what a page must not contain
//! (script, network), failures and incomplete coverage, bad input.

mod common;

use divergence::receipt::Receipt;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EXE: &str = env!("CARGO_BIN_EXE_divergence");

fn run(args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .output()
        .expect("run divergence")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tiny(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    let o = run(&[
        "gen-model",
        "--preset",
        "tiny",
        "--seed",
        "1",
        "-o",
        path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    path
}

/// Runs `find` (exit 0, 1 or 5 are results) and reads the receipt.
fn find(model: &Path, receipt: &Path, extra: &[&str]) -> Receipt {
    let mut args = vec![
        "find",
        "-q",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "The quick brown fox",
        "--receipt",
        receipt.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(
        matches!(o.status.code(), Some(0 | 1 | 5)),
        "find {extra:?}: {}",
        stderr(&o)
    );
    Receipt::read(receipt).unwrap()
}

/// The browser, or None (skip) when it is not installed; under CI a missing
/// browser is a failure.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if path.is_file() {
        return Some(path);
    }
    common::skip(
        "the report's browser test",
        &format!(
            "{} not installed (apt-get install chromium): the report was not rendered in a browser",
            path.display()
        ),
    );
    None
}

/// Headless Chromium on a local file, with the flags known to work here
/// and a fresh profile; fails the test if the browser does not finish.
fn chromium_run(browser: &Path, page: &Path, extra: &[String]) -> Output {
    let profile = tempfile::tempdir().unwrap();
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    let out = Command::new("timeout")
        .arg("120")
        .arg(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(&url)
        .output()
        .expect("start chromium");
    assert!(
        out.status.success(),
        "chromium could not render {url}: {:?}\n{}",
        out.status,
        stderr(&out)
    );
    out
}

/// The DOM Chromium built from the page.
fn dump_dom(browser: &Path, page: &Path) -> String {
    let out = chromium_run(browser, page, &["--dump-dom".to_string()]);
    let dom = String::from_utf8(out.stdout).expect("the DOM is UTF-8");
    assert!(
        dom.contains("</html>") && dom.contains("divergence"),
        "chromium rendered nothing of {}:\n{}",
        page.display(),
        &dom[..dom.len().min(500)]
    );
    dom
}

/// A screenshot under target/report-screenshots/, checked to be a PNG with content.
fn screenshot(browser: &Path, page: &Path, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/report-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&png);
    chromium_run(
        browser,
        page,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1400,2400".to_string(),
            "--hide-scrollbars".to_string(),
        ],
    );
    let bytes =
        std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot {}: {e}", png.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        png.display()
    );
    // A blank page of this size compresses to a few kB.
    assert!(
        bytes.len() > 20_000,
        "{} looks blank ({} bytes)",
        png.display(),
        bytes.len()
    );
    eprintln!("screenshot {}", png.display());
    png
}

/// One start tag as Chromium serialized it: its name and attributes.
#[derive(Debug)]
struct Tag {
    attrs: BTreeMap<String, String>,
}

impl Tag {
    fn get(&self, k: &str) -> &str {
        self.attrs.get(k).map_or("", |v| v.as_str())
    }

    fn has_class(&self, c: &str) -> bool {
        self.get("class").split_whitespace().any(|x| x == c)
    }
}

/// Every start tag named `name` in `dom`, with its attributes (values
/// double-quoted, as Chromium's serializer writes them).
fn tags(dom: &str, name: &str) -> Vec<Tag> {
    let open = format!("<{name} ");
    let mut out = Vec::new();
    let mut rest = dom;
    while let Some(i) = rest.find(&open) {
        rest = &rest[i + open.len()..];
        let end = rest.find('>').expect("a closed tag");
        let mut inner = &rest[..end];
        let mut attrs = BTreeMap::new();
        while let Some(eq) = inner.find("=\"") {
            let key = inner[..eq].trim().to_string();
            let after = &inner[eq + 2..];
            let close = after.find('"').expect("a closed attribute");
            attrs.insert(key, after[..close].to_string());
            inner = &after[close + 1..];
        }
        out.push(Tag { attrs });
    }
    out
}

/// The part of the DOM inside `<section ... id="receipt-N">`.
fn section(dom: &str, n: usize) -> &str {
    let marker = format!("id=\"receipt-{n}\"");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no section receipt-{n}"));
    let end = dom[start..].find("</section>").expect("a closed section") + start;
    &dom[start..end]
}

/// The heatmap cells of a receipt's section agree with the receipt: one
/// per judged (layer, stage) per step (local, and propagated in free mode),
/// exact cells marked exact, the first divergence marked once.
fn check_heatmaps(dom_section: &str, r: &Receipt) {
    let cells = tags(dom_section, "rect");
    let cells: Vec<&Tag> = cells.iter().filter(|t| t.has_class("cell")).collect();
    let key = |layer: Option<usize>, stage: &str, step: usize| {
        (
            layer.map_or("model".to_string(), |l| l.to_string()),
            stage.to_string(),
            step.to_string(),
        )
    };
    for kind in ["local", "sides"] {
        let mut want: Vec<_> = r
            .step_results
            .iter()
            .flat_map(|st| {
                st.stages
                    .iter()
                    .filter(|x| {
                        if kind == "local" {
                            x.candidate_local_nmse.or(x.reference_local_nmse).is_some()
                        } else {
                            x.nmse.is_some()
                        }
                    })
                    .map(|x| key(x.layer, x.stage.name(), st.step))
            })
            .collect();
        let mut got: Vec<_> = cells
            .iter()
            .filter(|t| t.get("data-kind") == kind)
            .map(|t| {
                (
                    t.get("data-layer").to_string(),
                    t.get("data-stage").to_string(),
                    t.get("data-step").to_string(),
                )
            })
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{kind} cells");
    }
    // A local cell is exact where the side equals the oracle's value; a
    // side-against-side cell where the two sides are bit-identical.
    let stages = || r.step_results.iter().flat_map(|s| &s.stages);
    let exact_got = |kind: &str| {
        cells
            .iter()
            .filter(|t| t.get("data-kind") == kind && t.has_class("exact"))
            .count()
    };
    let local_exact = stages()
        .filter(|x| x.candidate_local_nmse.or(x.reference_local_nmse) == Some(0.0))
        .count();
    assert_eq!(exact_got("local"), local_exact, "exact local cells");
    let sides_exact = stages().filter(|x| x.exact && x.nmse.is_some()).count();
    assert_eq!(
        exact_got("sides"),
        sides_exact,
        "exact side-against-side cells"
    );
    let marked: Vec<&&Tag> = cells.iter().filter(|t| t.has_class("divergence")).collect();
    match &r.first_divergence {
        Some(d) => {
            assert_eq!(marked.len(), 1, "one divergence cell");
            let m = marked[0];
            assert_eq!(
                (
                    m.get("data-kind"),
                    m.get("data-step"),
                    m.get("data-layer"),
                    m.get("data-stage")
                ),
                (
                    "local",
                    d.step.to_string().as_str(),
                    d.layer
                        .map_or("model".to_string(), |l| l.to_string())
                        .as_str(),
                    d.stage.name()
                )
            );
            assert!(m.has_class("failed"));
            assert_eq!(
                tags(dom_section, "rect")
                    .iter()
                    .filter(|t| t.has_class("divergence-outline"))
                    .count(),
                1,
                "the divergence is outlined"
            );
        }
        None => assert!(marked.is_empty()),
    }
}

#[test]
fn find_and_zoo_receipts_render_in_chromium() {
    let Some(browser) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());

    // find --html: free mode, a bug planted in layer 1's o_proj.
    let (receipt, html) = (dir.path().join("find.json"), dir.path().join("find.html"));
    let r = find(
        &model,
        &receipt,
        &[
            "--mode",
            "free",
            "--steps",
            "2",
            "--inject",
            "o-proj-previous-layer",
            "--html",
            html.to_str().unwrap(),
        ],
    );
    let d = r
        .first_divergence
        .as_ref()
        .expect("the planted bug is found");
    assert_eq!(
        (d.layer, d.stage),
        (Some(1), divergence::trace::Stage::OProj)
    );
    let dom = dump_dom(&browser, &html);
    check_heatmaps(section(&dom, 0), &r);
    assert!(
        dom.contains("data-blame=\"candidate\""),
        "the blame is shown"
    );
    assert!(dom.contains("class=\"worst\""), "worst elements are shown");
    assert_eq!(
        tags(&dom, "svg")
            .iter()
            .filter(|t| t.get("data-kind") == "sides")
            .count(),
        r.step_results.len(),
        "free mode: a drift heatmap beside each step's local one"
    );
    screenshot(&browser, &html, "find-free-o-proj-previous-layer");

    // A zoo receipt (as scripts/regen-receipts.sh makes them), alone.
    let zoo = |fault: &str| {
        let path = dir.path().join(format!("zoo-{fault}.json"));
        let r = find(&model, &path, &["--steps", "2", "--inject", fault]);
        (path, r)
    };
    let (rope_path, rope) = zoo("rope-interleaved");
    let page = dir.path().join("zoo.html");
    let o = run(&[
        "report",
        rope_path.to_str().unwrap(),
        "-o",
        page.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dom = dump_dom(&browser, &page);
    check_heatmaps(section(&dom, 0), &rope);
    screenshot(&browser, &page, "zoo-rope-interleaved");

    // Several zoo receipts: one comparison row per fault, each section whole.
    let (gqa_path, gqa) = zoo("gqa-modulo");
    let (panic_path, panic) = zoo("panic-at-ffn-up");
    assert_eq!(
        panic.verdict,
        divergence::lockstep::Verdict::CandidateFailed
    );
    let page = dir.path().join("zoo-all.html");
    let o = run(&[
        "report",
        rope_path.to_str().unwrap(),
        gqa_path.to_str().unwrap(),
        panic_path.to_str().unwrap(),
        "-o",
        page.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dom = dump_dom(&browser, &page);
    let rows = tags(&dom, "tr");
    let rows: Vec<&Tag> = rows.iter().filter(|t| t.has_class("receipt-row")).collect();
    assert_eq!(
        rows.iter()
            .map(|t| t.get("data-verdict"))
            .collect::<Vec<_>>(),
        ["divergence", "divergence", "candidate_failed"]
    );
    for (i, r) in [&rope, &gqa, &panic].into_iter().enumerate() {
        check_heatmaps(section(&dom, i), r);
    }
    assert!(section(&dom, 2).contains("data-failure=\"candidate\""));
    screenshot(&browser, &page, "zoo-comparison");
}

#[test]
fn a_sweep_renders_in_chromium() {
    let Some(browser) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"What is two plus two?\", \"tag\": \"question\"}\n{\"prompt\": \"fn main() {}\", \"tag\": \"code\"}\n{\"tokens\": [1, 300, 301]}\n",
    )
    .unwrap();
    let (file, receipts) = (dir.path().join("s.json"), dir.path().join("receipts"));
    let o = run(&[
        "sweep",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--steps",
        "2",
        "--inject",
        "eps-hardcoded",
        "--receipts",
        receipts.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let sw = divergence::sweep::Sweep::read(&file).unwrap();
    let html_dir = dir.path().join("html");
    std::fs::create_dir_all(&html_dir).unwrap();
    let page = html_dir.join("sweep.html");
    let o = run(&[
        "report",
        file.to_str().unwrap(),
        "-o",
        page.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dom = dump_dom(&browser, &page);
    // The histogram counts every position once.
    let bars = tags(&dom, "rect");
    let total: usize = bars
        .iter()
        .filter(|t| t.has_class("bar"))
        .map(|t| t.get("data-count").parse::<usize>().unwrap())
        .sum();
    assert_eq!(total, sw.summary.kld.as_ref().unwrap().positions);
    // One corpus heatmap cell per (layer, stage).
    let cells = bars
        .iter()
        .filter(|t| t.has_class("cell") && t.get("data-kind") == "p99")
        .count();
    assert_eq!(cells, sw.summary.stages.len());
    // The worst prompts link to receipts that exist, relative to the page.
    let links = tags(&dom, "a");
    let links: Vec<&Tag> = links
        .iter()
        .filter(|t| t.has_class("receipt-link"))
        .collect();
    assert!(!links.is_empty());
    for l in links {
        let target = html_dir.join(l.get("href"));
        assert!(target.is_file(), "{} does not resolve", l.get("href"));
    }
    screenshot(&browser, &page, "sweep-tiny-eps-hardcoded");
}

#[test]
fn text_is_escaped_and_pages_need_no_script_or_network() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let receipt = dir.path().join("x.json");
    let html = dir.path().join("x.html");
    let o = run(&[
        "find",
        "-q",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "<script>alert('x')</script> & \"q\"",
        "--steps",
        "1",
        "--receipt",
        receipt.to_str().unwrap(),
        "--html",
        html.to_str().unwrap(),
    ]);
    assert!(matches!(o.status.code(), Some(0 | 1)), "{}", stderr(&o));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"));
    assert!(!page.contains("<script"), "no script, escaped or ours");
    for net in ["<link", " src=", "@import", "url("] {
        assert!(!page.contains(net), "the page refers to `{net}`");
    }
    // The only URL is the SVG namespace, which names and fetches nothing.
    assert_eq!(
        page.matches("http").count(),
        page.matches("xmlns=\"http://www.w3.org/2000/svg\"").count()
    );
}

#[test]
fn failures_and_incomplete_coverage_are_shown() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let r = find(
        &model,
        &dir.path().join("p.json"),
        &["--steps", "1", "--inject", "panic-at-ffn-up"],
    );
    let page = divergence::report::receipts_page(&[("p.json".into(), r.clone())]);
    assert!(page.contains("data-failure=\"candidate\"") && page.contains("injected panic"));

    // An incomplete run: the candidate did not emit a stage.
    let mut inc = find(&model, &dir.path().join("c.json"), &["--steps", "1"]);
    inc.verdict = divergence::lockstep::Verdict::Incomplete;
    inc.coverage.complete = false;
    inc.coverage.steps[0].missing_candidate = vec![divergence::trace::StageKey::new(
        Some(1),
        divergence::trace::Stage::FfnAct,
    )];
    inc.coverage.unmapped_reference_nodes = vec!["mystery-0".into()];
    let page = divergence::report::receipts_page(&[("c.json".into(), inc)]);
    for want in ["INCOMPLETE", "Not complete", "ffn_act[1]", "mystery-0"] {
        assert!(page.contains(want), "no {want}");
    }
}

#[test]
fn bad_report_input_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "{\"hello\": 1}").unwrap();
    let text = dir.path().join("t.json");
    std::fs::write(&text, "not json").unwrap();
    let out = dir.path().join("o.html");
    for (inputs, said) in [
        (vec![junk.clone()], "neither a receipt nor a sweep"),
        (vec![text.clone()], "not JSON"),
        (vec![dir.path().join("missing.json")], "missing.json"),
    ] {
        let mut args: Vec<String> = vec!["report".into()];
        args.extend(inputs.iter().map(|p| p.display().to_string()));
        args.extend(["-o".into(), out.display().to_string()]);
        let o = Command::new(EXE).args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{inputs:?}");
        assert!(stderr(&o).contains(said), "{inputs:?}: {}", stderr(&o));
    }
    assert!(!out.exists());
}
