//! The tools the reference build needs from the machine, and how the build
//! gets the two a fresh machine lacks.
//!
//! A C++ compiler and `make` must be installed. CMake and libclang (for
//! bindgen) are taken from the machine when it has them (`CMAKE`, then
//! `cmake` on PATH; `LIBCLANG_PATH`, then clang-sys's own search, the same
//! one bindgen does). When one is missing, its PyPI wheel (CMake's official
//! `cmake` distribution; the `libclang` package, a self-contained
//! `libclang.so`) is downloaded with the machine's pip, checked against the
//! sha256 pinned below, and unpacked by pip into a cache of ours. Neither
//! step needs root. Cache: `DIVERGENCE_TOOLS_DIR`, else
//! `$XDG_CACHE_HOME/divergence/tools`, else `~/.cache/divergence/tools`
//! (else `OUT_DIR`): outside `target/` so that `cargo clean` and every
//! worktree of the repo reuse one unpacked copy; one folder per pinned
//! version and hash, so a new pin never sees an old copy; unpacked beside it
//! and renamed into place, so concurrent builds never see half a tool.
//!
//! The libclang wheel has no clang resource headers (`stddef.h`,
//! `stdbool.h`, ...), which glibc's headers and ggml's need: with it we pass
//! the C compiler's own builtin-header folder (`cc -print-file-name=include`)
//! to clang as a system include.

use sha2::{Digest, Sha256};
use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A wheel pinned by file name and sha256, for one host.
struct Wheel {
    package: &'static str,
    version: &'static str,
    /// The Rust host triple the wheel runs on.
    host: &'static str,
    file: &'static str,
    sha256: &'static str,
}

/// CMake's last 3.x release (the system one on Debian 12 is 3.25; the
/// bitnet.cpp lists need 3.14).
const CMAKE_WHEEL: Wheel = Wheel {
    package: "cmake",
    version: "3.31.10",
    host: "x86_64-unknown-linux-gnu",
    file: "cmake-3.31.10-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    sha256: "2f766bb46367e5e0559fa33184653754bce044583a06014dcaebf8e6dff8a1f1",
};

/// Where the unpacked wheel keeps the executable.
const CMAKE_IN_WHEEL: &str = "cmake/data/bin/cmake";

const LIBCLANG_WHEEL: Wheel = Wheel {
    package: "libclang",
    version: "18.1.1",
    host: "x86_64-unknown-linux-gnu",
    file: "libclang-18.1.1-py2.py3-none-manylinux2010_x86_64.whl",
    sha256: "c533091d8a3bbf7460a00cb6c1a71da93bffe148f172c7d03b1c31fbf8aa2a0b",
};

/// The folder of `libclang.so` in the unpacked wheel.
const LIBCLANG_IN_WHEEL: &str = "clang/native";

/// What bindgen needs beyond the defaults.
pub struct BuildTools {
    /// Extra clang arguments (the builtin headers, for the wheel's libclang).
    pub clang_args: Vec<String>,
}

/// Checks the compiler and `make`, finds or fetches CMake and libclang, and
/// points the `cmake` crate (env `CMAKE`) and bindgen (the loaded
/// libclang, env `LIBCLANG_PATH`) at what it found. Prints one cargo
/// warning when anything was taken from PyPI.
pub fn provide(out_dir: &Path) -> Result<BuildTools, String> {
    for var in ["CMAKE", "LIBCLANG_PATH", "DIVERGENCE_TOOLS_DIR", "CC"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    require("c++", "g++ (or clang)")?;
    if env::var_os("CMAKE_GENERATOR").is_none() {
        require("make", "make")?; // CMake's default generator on Unix
    }

    let cmake_missing = match env::var_os("CMAKE") {
        Some(cmake) if !runs(&cmake) => {
            return Err(format!(
                "CMAKE={} does not run (`--version` failed): \
                 point it at a working cmake, or unset it",
                Path::new(&cmake).display()
            ))
        }
        Some(_) => false,
        None => !runs("cmake"),
    };
    // clang-sys's search is bindgen's: what it loads here, bindgen uses.
    let libclang_missing = match clang_sys::load() {
        Ok(()) => None,
        Err(e) if env::var_os("LIBCLANG_PATH").is_some() => {
            return Err(format!(
                "LIBCLANG_PATH is set, but no usable libclang is there ({}): \
                 point it at the folder holding libclang.so, or unset it",
                search_result(&e)
            ))
        }
        Err(e) => Some(search_result(&e).to_string()),
    };
    // When a fetch fails, name every package the machine lacks at once.
    let debian: Vec<&str> = [
        (cmake_missing, "cmake"),
        (libclang_missing.is_some(), "libclang-dev"),
    ]
    .into_iter()
    .filter_map(|(missing, package)| missing.then_some(package))
    .collect();
    let failed = |what: String, error: String, variable: &str| {
        format!(
            "{what}, and fetching it from PyPI failed: {error}\n  \
             install what is missing (Debian: `apt-get install {}`), or set {variable}",
            debian.join(" ")
        )
    };

    let mut fetched = Vec::new();
    if cmake_missing {
        let cmake = unpacked(&CMAKE_WHEEL, &tool_cache(out_dir)?)
            .map(|dir| dir.join(CMAKE_IN_WHEEL))
            .and_then(|cmake| {
                if runs(&cmake) {
                    Ok(cmake)
                } else {
                    Err(format!("{} does not run", cmake.display()))
                }
            })
            .map_err(|e| failed("`cmake` was not found".into(), e, "CMAKE=/path/to/cmake"))?;
        // The cmake crate runs `$CMAKE` when set; nothing else in this
        // build script runs concurrently.
        env::set_var("CMAKE", &cmake);
        fetched.push(format!("CMake {}", CMAKE_WHEEL.version));
    }
    let mut clang_args = Vec::new();
    if let Some(not_found) = libclang_missing {
        unpacked(&LIBCLANG_WHEEL, &tool_cache(out_dir)?)
            .and_then(|dir| {
                // clang-sys searches only LIBCLANG_PATH when it is set.
                env::set_var("LIBCLANG_PATH", dir.join(LIBCLANG_IN_WHEEL));
                clang_sys::load()
            })
            .map_err(|e| {
                failed(
                    format!("libclang was not found ({not_found})"),
                    e,
                    "LIBCLANG_PATH to the folder holding libclang.so",
                )
            })?;
        let headers = compiler_builtin_headers()?;
        clang_args.push("-isystem".into());
        clang_args.push(headers.display().to_string());
        fetched.push(format!(
            "libclang {} (builtin headers from {})",
            LIBCLANG_WHEEL.version,
            headers.display()
        ));
    }

    if !fetched.is_empty() {
        println!(
            "cargo:warning=not installed on this machine, so taken from PyPI wheels \
             (pinned sha256) unpacked in {}: {}; installed ones take precedence \
             (Debian: `apt-get install {}`)",
            &tool_cache(out_dir)?.display(),
            fetched.join(", "),
            debian.join(" ")
        );
    }
    Ok(BuildTools { clang_args })
}

/// What clang-sys searched and found unusable, without its advice (to set
/// LIBCLANG_PATH), which our messages give in full.
fn search_result(error: &str) -> &str {
    let first_line = error.lines().next().unwrap_or_default();
    first_line.split(", set the").next().unwrap_or_default()
}

/// `tool --version` succeeds, or the error names the Debian package.
fn require(tool: &str, package: &str) -> Result<(), String> {
    if runs(tool) {
        Ok(())
    } else {
        Err(format!(
            "`{tool}` was not found: install it (Debian: `apt-get install {package}`)"
        ))
    }
}

fn runs(tool: impl AsRef<std::ffi::OsStr>) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The tool cache folder (see the module doc), created.
fn tool_cache(out_dir: &Path) -> Result<PathBuf, String> {
    if let Some(dir) = env::var_os("DIVERGENCE_TOOLS_DIR").map(PathBuf::from) {
        // An explicit choice must work; the defaults fall back.
        fs::create_dir_all(&dir)
            .map_err(|e| format!("DIVERGENCE_TOOLS_DIR={}: {e}", dir.display()))?;
        return Ok(dir);
    }
    let user_cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("divergence/tools"))
        .filter(|dir| fs::create_dir_all(dir).is_ok());
    let dir = user_cache.unwrap_or_else(|| out_dir.join("tools"));
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// The unpacked wheel's folder in `cache`, downloading, checking and
/// unpacking it first if it is not there yet.
fn unpacked(wheel: &Wheel, cache: &Path) -> Result<PathBuf, String> {
    let dest = cache.join(format!(
        "{}-{}-{}",
        wheel.package,
        wheel.version,
        &wheel.sha256[..12]
    ));
    if dest.is_dir() {
        return Ok(dest);
    }
    let host = env::var("HOST").unwrap_or_default();
    if host != wheel.host {
        return Err(format!(
            "no {} wheel is pinned for this host ({host}; pinned: {})",
            wheel.package, wheel.host
        ));
    }
    let staging = cache.join(format!(".staging-{}-{}", wheel.package, std::process::id()));
    let result = download_and_unpack(wheel, &staging).and_then(|tree| {
        match fs::rename(&tree, &dest) {
            Ok(()) => Ok(()),
            // Another build unpacked the same pin first: use theirs.
            Err(_) if dest.is_dir() => Ok(()),
            Err(e) => Err(format!("moving {} into place: {e}", tree.display())),
        }
    });
    let _ = fs::remove_dir_all(&staging);
    result.map(|()| dest)
}

/// `pip download` of the pinned file (pip checks the hash, and so do we),
/// then `pip install --target` of that local file (pip unpacks the zip,
/// keeping executable bits); returns the unpacked tree inside `staging`.
fn download_and_unpack(wheel: &Wheel, staging: &Path) -> Result<PathBuf, String> {
    let _ = fs::remove_dir_all(staging);
    let download = staging.join("download");
    fs::create_dir_all(&download).map_err(|e| format!("creating {}: {e}", download.display()))?;
    let requirements = staging.join("requirements.txt");
    fs::write(
        &requirements,
        format!(
            "{}=={} --hash=sha256:{}\n",
            wheel.package, wheel.version, wheel.sha256
        ),
    )
    .map_err(|e| format!("writing {}: {e}", requirements.display()))?;
    pip(&[
        "download".into(),
        "--no-deps".into(),
        "--only-binary=:all:".into(),
        "--dest".into(),
        download.clone().into(),
        "--requirement".into(),
        requirements.into(),
    ])?;
    let file = download.join(wheel.file);
    let bytes = fs::read(&file).map_err(|e| {
        format!(
            "pip did not save the pinned {} (reading it: {e})",
            file.display()
        )
    })?;
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest != wheel.sha256 {
        return Err(format!(
            "{} hashes to {digest}, the pin says {}",
            wheel.file, wheel.sha256
        ));
    }
    let tree = staging.join("tree");
    pip(&[
        "install".into(),
        "--no-deps".into(),
        "--no-index".into(),
        "--no-compile".into(),
        "--target".into(),
        tree.clone().into(),
        file.into(),
    ])?;
    Ok(tree)
}

/// Runs `python3 -m pip ARGS` quietly; its stderr tail on failure.
fn pip(args: &[OsString]) -> Result<(), String> {
    let output = Command::new("python3")
        .args(["-m", "pip", "--quiet", "--disable-pip-version-check"])
        .args(args)
        // pip's own settings could turn these commands into something
        // else (a --user install, a refusal outside a virtualenv, a
        // warning for root); everything else (index, proxy,
        // certificates) stays the machine's.
        .env("PIP_USER", "0")
        .env("PIP_REQUIRE_VIRTUALENV", "0")
        .env("PIP_ROOT_USER_ACTION", "ignore")
        .output()
        .map_err(|e| format!("running python3 -m pip (python3 with pip is needed): {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    // pip's own verdict is its ERROR lines (retries come as warnings).
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("ERROR"))
        .collect();
    let shown = if errors.is_empty() {
        &lines[lines.len().saturating_sub(3)..]
    } else {
        &errors[..]
    };
    let offline = ["NewConnectionError", "Failed to establish a new connection"]
        .iter()
        .any(|symptom| stderr.contains(symptom));
    Err(format!(
        "`python3 -m pip {}` failed{}: {}",
        args.first()
            .map(|a| a.to_string_lossy())
            .unwrap_or_default(),
        if offline {
            " (it could not reach its package index)"
        } else {
            ""
        },
        shown.join(" / ")
    ))
}

/// The C compiler's builtin-header folder (it holds `stddef.h`).
fn compiler_builtin_headers() -> Result<PathBuf, String> {
    let cc = env::var_os("CC").unwrap_or_else(|| "cc".into());
    let answer = Command::new(&cc)
        .arg("-print-file-name=include")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let dir = PathBuf::from(&answer);
    if dir.is_absolute() && dir.join("stddef.h").is_file() {
        Ok(dir)
    } else {
        Err(format!(
            "the libclang wheel has no builtin headers (stddef.h), and `{} -print-file-name=include` names none (it said {answer:?}): install libclang-dev (Debian) or gcc",
            Path::new(&cc).display()
        ))
    }
}
