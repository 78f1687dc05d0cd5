//! Shared by the integration tests: a test that cannot run here says so
//! where `cargo test` shows it, and the cross-checks of our GGUF files with
//! the llama.cpp project's own reader (the PyPI `gguf` package).
#![allow(dead_code)] // each test crate uses a part

use std::path::Path;

/// A test that cannot run on this machine: with `CI` set it fails (CI
/// installs everything the tests need, so a skip there is a broken CI);
/// otherwise it prints `SKIPPED` straight to the terminal. Straight: libtest
/// captures `eprintln!` of a passing test and never shows it, while a direct
/// write to stderr is not captured, so the skip is seen in `cargo test`'s
/// output.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: CI is set, so this test may not skip: {why}"
    );
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Whether `python3 -c "import gguf"` works here (`.ci/run` installs it).
pub fn python_gguf_available() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import gguf"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        skip(
            "a cross-check with llama.cpp's gguf reader",
            "python3 package `gguf` not installed (pip install 'gguf==0.19.*')",
        );
    }
    ok
}

/// Runs a Python script with the GGUF path as `sys.argv[1]` and parses the
/// JSON it prints.
pub fn python_json(script: &str, path: &Path) -> serde_json::Value {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gguf reader failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// No divergence, `exact` stages bit-identical at every layer and step, and
/// coverage complete with nothing unmapped.
pub fn assert_clean(r: &divergence::receipt::Receipt, what: &str) {
    use divergence::compare::Class;
    use divergence::lockstep::Verdict;
    assert!(r.tokens.equal, "{what}: token ids differ: {:?}", r.tokens);
    assert_eq!(
        r.verdict,
        Verdict::NoDivergence,
        "{what}: {} (reference failure {:?})",
        r.first_divergence
            .as_ref()
            .map(|d| format!(
                "{} [{:?}] step {}: {:?}",
                d.stage, d.layer, d.step, d.metrics
            ))
            .unwrap_or_default(),
        r.reference_failure
    );
    assert!(!r.stages.is_empty(), "{what}: nothing was compared");
    for s in &r.stages {
        if s.class == Class::Exact {
            assert!(
                s.all_exact,
                "{what}: exact stage {} [{:?}] was not bit-identical",
                s.stage, s.layer
            );
        }
    }
    assert!(
        r.coverage.unmapped_reference_nodes.is_empty() && r.coverage.complete,
        "{what}: coverage {:?}",
        r.coverage
    );
}
