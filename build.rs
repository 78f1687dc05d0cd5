//! Builds the reference: bitnet.cpp from a pinned registry package, patched,
//! compiled with CMake, linked statically, with bindings from bindgen and a
//! small C shim (`ffi/shim.c`) that exposes internal kernels for tests.
//!
//! Steps (each one fails with a message that names the fix):
//! 0. tools: a C++ compiler and make from the machine; CMake and libclang
//!    from the machine, else from pinned PyPI wheels (`build/tools.rs`);
//! 1. source: `BITNET_CPP_DIR`, or the crates.io package in
//!    `vendor/bitnet-cpp.pin` fetched with cargo and checked against the
//!    pinned `.crate` sha256, copied to `$OUT_DIR/bitnet-src/`;
//! 2. our patches from `vendor/patches/`, applied to that copy;
//! 3. CMake (Release, static, I2_S path: TL1/TL2 off, no OpenMP);
//! 4. the shim and the exception guard (`ffi/guard.cpp`) with `cc`, bindings with `bindgen` from `ffi/wrapper.h`;
//! 5. build facts for receipts as `DIVERGENCE_REF_*` compile-time variables.

#[path = "build/tools.rs"]
mod tools;

use sha2::{Digest, Sha256};
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// CMake options, recorded verbatim in every receipt.
const CMAKE_DEFINES: &[(&str, &str)] = &[
    ("BUILD_SHARED_LIBS", "OFF"),
    ("BITNET_X86_TL2", "OFF"),
    ("BITNET_ARM_TL1", "OFF"),
    ("GGML_OPENMP", "OFF"),
    ("GGML_NATIVE", "ON"),
    ("LLAMA_BUILD_TESTS", "OFF"),
    ("LLAMA_BUILD_EXAMPLES", "OFF"),
    ("LLAMA_BUILD_SERVER", "OFF"),
    ("LLAMA_CURL", "OFF"),
    ("GGML_CCACHE", "OFF"),
];

fn main() {
    if let Err(msg) = run() {
        // A panic in a build script prints a backtrace; a plain message and
        // exit code are kinder.
        eprintln!("\nerror: building the bitnet.cpp reference failed:\n  {msg}\n");
        std::process::exit(1);
    }
}

struct Pin {
    package: String,
    version: String,
    sha256: String,
    subdir: String,
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    for p in [
        "build.rs",
        "build",
        "vendor/bitnet-cpp.pin",
        "vendor/patches",
        "ffi",
    ] {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-env-changed=BITNET_CPP_DIR");

    let tools = tools::provide(&out_dir)?;
    let pin = read_pin(&manifest_dir.join("vendor/bitnet-cpp.pin"))?;
    let patches = list_patches(&manifest_dir.join("vendor/patches"))?;

    let (src, origin, checksum) = match env::var_os("BITNET_CPP_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if !dir.join("CMakeLists.txt").is_file() {
                return Err(format!(
                    "BITNET_CPP_DIR={} has no CMakeLists.txt: point it at the folder holding bitnet.cpp's top-level CMakeLists.txt",
                    dir.display()
                ));
            }
            let dest = out_dir.join("bitnet-src");
            prepare_copy(&dir, &dest, &patches, "BITNET_CPP_DIR", true)?;
            (
                dest,
                format!("BITNET_CPP_DIR={}", dir.display()),
                String::from("unpinned"),
            )
        }
        None => {
            // In OUT_DIR: a build script writes nothing else (`cargo package`
            // verifies that the source folder is left as it was).
            let dest = out_dir.join("bitnet-src");
            let stamp_text = format!(
                "{} {} {} {}",
                pin.package,
                pin.version,
                pin.sha256,
                patches
                    .iter()
                    .map(|p| p.0.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let stamp = dest.join(".divergence-stamp");
            if fs::read_to_string(&stamp).ok().as_deref() != Some(stamp_text.as_str()) {
                let registry_dir = fetch_package(&pin, &out_dir)?;
                prepare_copy(
                    &registry_dir.join(&pin.subdir),
                    &dest,
                    &patches,
                    "pin",
                    false,
                )?;
                fs::write(&stamp, &stamp_text)
                    .map_err(|e| format!("writing {}: {e}", stamp.display()))?;
            }
            (
                dest,
                format!("crates.io {} {}", pin.package, pin.version),
                pin.sha256.clone(),
            )
        }
    };

    let mut cfg = cmake::Config::new(&src);
    cfg.profile("Release").build_target("llama");
    for (k, v) in CMAKE_DEFINES {
        cfg.define(k, v);
    }
    let dst = cfg.build();
    let build = dst.join("build");
    let includes = [
        src.join("3rdparty/llama.cpp/include"),
        src.join("3rdparty/llama.cpp/ggml/include"),
        src.join("3rdparty/llama.cpp/ggml/src"),
        src.join("include"),
    ];

    // The shim: kernel entry points with plain signatures. Built with the
    // same -march the reference gets, so the AVX2 path is compiled in.
    cc::Build::new()
        .file(manifest_dir.join("ffi/shim.c"))
        .include(manifest_dir.join("ffi"))
        .includes(&includes)
        .flag("-march=native")
        .opt_level(2)
        .warnings(false)
        .compile("divergence_shim");
    // The guard: llama.cpp calls that can throw, caught in C++ (see ffi/guard.h).
    cc::Build::new()
        .cpp(true)
        .file(manifest_dir.join("ffi/guard.cpp"))
        .include(manifest_dir.join("ffi"))
        .includes(&includes)
        .flag("-std=c++17")
        .opt_level(2)
        .warnings(false)
        .compile("divergence_guard");

    for lib_dir in ["3rdparty/llama.cpp/src", "3rdparty/llama.cpp/ggml/src"] {
        println!(
            "cargo:rustc-link-search=native={}",
            build.join(lib_dir).display()
        );
    }
    println!("cargo:rustc-link-lib=static=llama");
    println!("cargo:rustc-link-lib=static=ggml");
    println!("cargo:rustc-link-lib=dylib=stdc++");
    println!("cargo:rustc-link-lib=dylib=m");
    println!("cargo:rustc-link-lib=dylib=pthread");

    let mut bindings = bindgen::Builder::default()
        .header(manifest_dir.join("ffi/wrapper.h").to_string_lossy())
        .clang_arg(format!("-I{}", manifest_dir.join("ffi").display()))
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .allowlist_function("llama_.*")
        .allowlist_function("ggml_(op_name|op_desc|get_name|nbytes|nelements|is_contiguous|type_name|fp16_to_fp32_row)")
        .allowlist_function("divergence_.*")
        .allowlist_type("ggml_tensor")
        .allowlist_type("ggml_type")
        .allowlist_type("ggml_op")
        .allowlist_type("ggml_tensor_flag")
        .allowlist_var("GGML_MAX_DIMS")
        .default_enum_style(bindgen::EnumVariation::ModuleConsts)
        .derive_default(true)
        .layout_tests(false);
    for inc in &includes {
        bindings = bindings.clang_arg(format!("-I{}", inc.display()));
    }
    bindings = bindings.clang_args(&tools.clang_args);
    let bindings = bindings.generate().map_err(|e| {
        format!("bindgen failed ({e}); it needs libclang: `apt-get install libclang-dev` (Debian), or set LIBCLANG_PATH")
    })?;
    bindings
        .write_to_file(out_dir.join("bindings.rs"))
        .map_err(|e| format!("writing bindings: {e}"))?;

    // Facts for receipts.
    let compiler = tool_version("c++");
    println!("cargo:rustc-env=DIVERGENCE_REF_ORIGIN={origin}");
    println!("cargo:rustc-env=DIVERGENCE_REF_SHA256={checksum}");
    println!(
        "cargo:rustc-env=DIVERGENCE_REF_PATCHES={}",
        patches
            .iter()
            .map(|p| p.0.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    println!("cargo:rustc-env=DIVERGENCE_REF_COMPILER={compiler}");
    println!(
        "cargo:rustc-env=DIVERGENCE_REF_CMAKE_FLAGS={}",
        CMAKE_DEFINES
            .iter()
            .map(|(k, v)| format!("-D{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("cargo:rustc-env=DIVERGENCE_REF_MARCH=native");
    Ok(())
}

fn tool_version(tool: &str) -> String {
    Command::new(tool)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

fn read_pin(path: &Path) -> Result<Pin, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let field = |key: &str| -> Result<String, String> {
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .ok_or_else(|| format!("{}: missing `{key} = ...`", path.display()))
    };
    Ok(Pin {
        package: field("package")?,
        version: field("version")?,
        sha256: field("sha256")?,
        subdir: field("subdir")?,
    })
}

/// Fetches the pinned package through cargo (a throwaway manifest that names
/// it under a never-true target) and returns its unpacked registry folder.
fn fetch_package(pin: &Pin, out_dir: &Path) -> Result<PathBuf, String> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let dir = out_dir.join("fetch");
    fs::create_dir_all(dir.join("src")).map_err(|e| e.to_string())?;
    let manifest = dir.join("Cargo.toml");
    fs::write(
        &manifest,
        format!(
            "[package]\nname = \"divergence-reference-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n[lib]\npath = \"src/lib.rs\"\n[workspace]\n[target.'cfg(any())'.dependencies]\n{} = \"={}\"\n",
            pin.package, pin.version
        ),
    )
    .map_err(|e| e.to_string())?;
    fs::write(dir.join("src/lib.rs"), "").map_err(|e| e.to_string())?;

    let cargo_cmd = |args: &[&str]| -> Result<std::process::Output, String> {
        Command::new(&cargo)
            .args(args)
            .arg("--manifest-path")
            .arg(&manifest)
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .map_err(|e| format!("running {cargo}: {e}"))
    };
    // Offline first: a warm cargo cache needs no network.
    let fetched = cargo_cmd(&["fetch", "--offline"])?;
    if !fetched.status.success() {
        let online = cargo_cmd(&["fetch"])?;
        if !online.status.success() {
            return Err(format!(
                "cargo could not fetch {} {} from crates.io:\n{}",
                pin.package,
                pin.version,
                String::from_utf8_lossy(&online.stderr)
            ));
        }
    }
    let lock = fs::read_to_string(dir.join("Cargo.lock"))
        .map_err(|e| format!("reading fetch Cargo.lock: {e}"))?;
    let recorded = lock_checksum(&lock, &pin.package)
        .ok_or("fetch Cargo.lock has no checksum for the pinned package")?;
    if recorded != pin.sha256 {
        return Err(format!(
            "checksum mismatch for {} {}: pinned {}, cargo recorded {}",
            pin.package, pin.version, pin.sha256, recorded
        ));
    }
    let meta = cargo_cmd(&["metadata", "--format-version", "1", "--offline"])?;
    if !meta.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&meta.stderr)
        ));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&meta.stdout).map_err(|e| e.to_string())?;
    let manifest_path = json["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == pin.package.as_str()))
        .and_then(|p| p["manifest_path"].as_str())
        .ok_or("cargo metadata does not list the pinned package")?;
    let pkg_dir = Path::new(manifest_path)
        .parent()
        .ok_or("bad manifest path")?
        .to_path_buf();
    verify_crate_archive(&pkg_dir, pin)?;
    Ok(pkg_dir)
}

/// Where cargo kept the `.crate` archive beside the unpacked folder, hash it
/// ourselves too: the lock file only says what cargo checked at download.
fn verify_crate_archive(pkg_dir: &Path, pin: &Pin) -> Result<(), String> {
    let name = format!("{}-{}.crate", pin.package, pin.version);
    let (Some(index), Some(registry)) = (
        pkg_dir.parent().and_then(Path::file_name),
        pkg_dir
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent),
    ) else {
        return Ok(());
    };
    let archive = registry.join("cache").join(index).join(name);
    if let Ok(bytes) = fs::read(&archive) {
        let digest = Sha256::digest(&bytes);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        if hex != pin.sha256 {
            return Err(format!(
                "{} hashes to {hex}, pin says {}",
                archive.display(),
                pin.sha256
            ));
        }
    }
    Ok(())
}

fn lock_checksum(lock: &str, package: &str) -> Option<String> {
    let mut in_pkg = false;
    for line in lock.lines() {
        let line = line.trim();
        if line == "[[package]]" {
            in_pkg = false;
        } else if line == format!("name = \"{package}\"") {
            in_pkg = true;
        } else if in_pkg {
            if let Some(sum) = line.strip_prefix("checksum = \"") {
                return Some(sum.trim_end_matches('"').to_string());
            }
        }
    }
    None
}

/// A patch: (file name, its text).
fn list_patches(dir: &Path) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|e| e == "patch") {
            let text = fs::read_to_string(&path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push((name, text));
        }
    }
    out.sort();
    Ok(out)
}

/// Copies `from` to `dest` (replacing it) and applies every patch.
/// `lenient`: a find text that is absent is skipped (another checkout may
/// already be fixed); with the pinned source every patch must apply.
fn prepare_copy(
    from: &Path,
    dest: &Path,
    patches: &[(String, String)],
    what: &str,
    lenient: bool,
) -> Result<(), String> {
    if dest.exists() {
        fs::remove_dir_all(dest).map_err(|e| format!("clearing {}: {e}", dest.display()))?;
    }
    copy_tree(from, dest)
        .map_err(|e| format!("copying {} source {}: {e}", what, from.display()))?;
    for (name, text) in patches {
        apply_patch(dest, name, text, lenient)?;
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// One change a patch file makes: a find/replace edit of an existing file,
/// or a new file.
enum Hunk {
    Edit {
        file: String,
        find: String,
        replace: String,
    },
    Create {
        file: String,
        content: String,
    },
}

/// Splits a patch file into its hunks (format: `vendor/README.md`).
///
/// Outside a section, `#` lines and blank lines are comments; `file: P`
/// starts an edit of P and `create: P` a new file P. A section starts at
/// `--- find`, `--- replace` or `--- content` and runs to the next `--- `
/// line; `--- end` closes a hunk. Section text keeps its trailing newline.
fn parse_hunks(name: &str, text: &str) -> Result<Vec<Hunk>, String> {
    struct Pending {
        create: bool,
        file: String,
        find: Option<String>,
        replace: Option<String>,
        content: Option<String>,
    }
    fn finish(name: &str, p: Pending) -> Result<Hunk, String> {
        let missing =
            |what: &str| format!("patch {name}: `{}` has no `--- {what}` section", p.file);
        Ok(if p.create {
            Hunk::Create {
                content: p.content.clone().ok_or_else(|| missing("content"))?,
                file: p.file,
            }
        } else {
            Hunk::Edit {
                find: p.find.clone().ok_or_else(|| missing("find"))?,
                replace: p.replace.clone().ok_or_else(|| missing("replace"))?,
                file: p.file,
            }
        })
    }
    let mut hunks = Vec::new();
    let mut current: Option<Pending> = None;
    // The section being read: which one, and its text so far.
    let mut section: Option<(String, String)> = None;
    let store = |current: &mut Option<Pending>, done: Option<(String, String)>| {
        if let (Some(p), Some((which, body))) = (current.as_mut(), done) {
            match which.as_str() {
                "find" => p.find = Some(body),
                "replace" => p.replace = Some(body),
                _ => p.content = Some(body),
            }
        }
    };
    for line in text.lines() {
        if let Some(marker) = line.strip_prefix("--- ") {
            store(&mut current, section.take());
            match marker.trim() {
                "end" => {
                    let p = current
                        .take()
                        .ok_or(format!("patch {name}: `--- end` without a hunk"))?;
                    hunks.push(finish(name, p)?);
                }
                which @ ("find" | "replace" | "content") => {
                    if current.is_none() {
                        return Err(format!(
                            "patch {name}: `--- {which}` before any `file:` or `create:` line"
                        ));
                    }
                    section = Some((which.to_string(), String::new()));
                }
                other => return Err(format!("patch {name}: unknown marker `--- {other}`")),
            }
            continue;
        }
        if let Some((_, body)) = section.as_mut() {
            body.push_str(line);
            body.push('\n');
            continue;
        }
        let header = |key: &str| line.strip_prefix(key).map(|v| v.trim().to_string());
        if let Some((create, file)) = header("file:")
            .map(|f| (false, f))
            .or_else(|| header("create:").map(|f| (true, f)))
        {
            if let Some(p) = current.take() {
                hunks.push(finish(name, p)?);
            }
            current = Some(Pending {
                create,
                file,
                find: None,
                replace: None,
                content: None,
            });
        } else if !(line.trim().is_empty() || line.starts_with('#')) {
            return Err(format!(
                "patch {name}: unexpected line outside a section: {line:?}"
            ));
        }
    }
    store(&mut current, section.take());
    if let Some(p) = current.take() {
        hunks.push(finish(name, p)?);
    }
    if hunks.is_empty() {
        return Err(format!(
            "patch {name}: needs at least one `file:` or `create:` hunk"
        ));
    }
    Ok(hunks)
}

/// Applies every hunk of a patch file, in order.
fn apply_patch(root: &Path, name: &str, text: &str, lenient: bool) -> Result<(), String> {
    for hunk in parse_hunks(name, text)? {
        match hunk {
            Hunk::Create { file, content } => {
                let path = root.join(&file);
                if !path.exists() {
                    fs::write(&path, content)
                        .map_err(|e| format!("patch {name}: writing {}: {e}", path.display()))?;
                }
            }
            Hunk::Edit {
                file,
                find,
                replace,
            } => {
                let path = root.join(&file);
                let source = fs::read_to_string(&path)
                    .map_err(|e| format!("patch {name}: reading {}: {e}", path.display()))?;
                match source.matches(find.as_str()).count() {
                    1 => fs::write(&path, source.replacen(find.as_str(), &replace, 1))
                        .map_err(|e| format!("patch {name}: {e}"))?,
                    0 if lenient => {}
                    n => {
                        return Err(format!(
                            "patch {name}: expected the find text once in {file}, found it {n} times:\n{find}"
                        ))
                    }
                }
            }
        }
    }
    Ok(())
}
