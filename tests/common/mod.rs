//! Shared by the integration tests that cross-check our GGUF files with the
//! llama.cpp project's own reader (the PyPI `gguf` package).

use std::path::Path;

/// Whether `python3 -c "import gguf"` works here (`.ci/run` installs it).
pub fn python_gguf_available() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import gguf"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install the python3 package `gguf` (pip install 'gguf==0.19.*')"
        );
        eprintln!("skipped: python3 package `gguf` not installed (pip install 'gguf==0.19.*')");
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
