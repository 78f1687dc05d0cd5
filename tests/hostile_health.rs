//! Hostile input, round 3 (issue 24): every command stays bounded in memory
//! and time and honest on the terminal, whatever its files, flags and
//! signals say. One test per class of attack; each runs the real binary
//! under a hang deadline and an address-space limit (so an attack that gets
//! through dies of the limit instead of taking the machine down), and
//! checks the exit code, a message naming the input and the limit, no
//! panic, no abort, a peak RSS under 1 GB, and nothing left beside the
//! output.

use divergence::gguf::{GgmlType, GgufFile, GgufWriter, MetaArray, MetaValue};
use divergence::synth::{generate, Preset, SynthConfig};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_divergence");
/// No attack may keep a command running past this.
const DEADLINE: Duration = Duration::from_secs(30);
/// Peak RSS an attack whose real content is small may cost.
const RSS_LIMIT_KB: i64 = 1 << 20;
/// The address space a child gets: far above what any legitimate run here
/// needs, far below what the machine has.
const AS_LIMIT: u64 = 4 << 30;

// ------------------------------------------------------------------ running

struct Ran {
    args: String,
    code: Option<i32>,
    signal: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
    max_rss_kb: i64,
}

impl Ran {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Exit `code`, no panic or abort, within the RSS limit, stderr naming
    /// every one of `needles` (case-insensitive).
    fn expect(&self, code: i32, needles: &[&str]) -> Result<(), String> {
        let err = self.stderr.to_lowercase();
        let missing: Vec<_> = needles
            .iter()
            .filter(|n| !err.contains(&n.to_lowercase()))
            .collect();
        let mut problems = Vec::new();
        if self.code != Some(code) {
            problems.push(format!(
                "exit {:?} (signal {:?}), want {code}",
                self.code, self.signal
            ));
        }
        if !missing.is_empty() {
            problems.push(format!("stderr lacks {missing:?}"));
        }
        if err.contains("panicked") {
            problems.push("it panicked".into());
        }
        if self.max_rss_kb > RSS_LIMIT_KB {
            problems.push(format!("peak RSS {} MB", self.max_rss_kb / 1024));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "divergence {}: {}\n  stderr: {}",
                self.args,
                problems.join("; "),
                self.stderr.trim()
            ))
        }
    }
}

/// The command, with the address-space limit.
fn command(args: &[&str]) -> Command {
    let mut c = Command::new(EXE);
    c.args(args).stdin(Stdio::null());
    // SAFETY: setrlimit(2) between fork and exec, touching only a local.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: AS_LIMIT,
                rlim_max: AS_LIMIT,
            };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    c
}

/// Waits for `child` (reaping it with wait4 for its peak RSS); kills it
/// and fails when it outlives `deadline`.
fn wait_bounded(child: Child, deadline: Duration, what: &str) -> (Option<i32>, Option<i32>, i64) {
    let pid = child.id() as libc::pid_t;
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value of the plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child, writing into locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
            let signal = libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status));
            return (code, signal, usage.ru_maxrss);
        }
        if start.elapsed() > deadline {
            // SAFETY: kill(2) and waitpid(2) on our own unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            panic!("divergence {what} still running after {deadline:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the binary under the deadline, stdout and stderr into files.
fn run_in(args: &[&str], deadline: Duration, setup: impl FnOnce(&mut Command)) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut c = command(args);
    c.stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    setup(&mut c);
    let what = args.join(" ");
    let child = c.spawn().expect("spawn divergence");
    let (code, signal, max_rss_kb) = wait_bounded(child, deadline, &what);
    Ran {
        args: what,
        code,
        signal,
        stdout: std::fs::read(&out).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&std::fs::read(&err).unwrap_or_default()).into_owned(),
        max_rss_kb,
    }
}

fn run(args: &[&str]) -> Ran {
    run_in(args, DEADLINE, |_| {})
}

/// Collects every case's problem and fails once, listing them all.
fn all_ok(results: Vec<Result<(), String>>) {
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        failures.is_empty(),
        "{} failing:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn mkfifo(path: &Path) {
    let made = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(made.success());
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---------------------------------------------------------------- fixtures

fn tiny() -> SynthConfig {
    let mut c = SynthConfig::preset(Preset::Tiny);
    c.seed = 1;
    c
}

fn write_tiny(dir: &Path) -> PathBuf {
    let p = dir.join("tiny.gguf");
    divergence::synth::write_model(&tiny(), &p).unwrap();
    p
}

fn write_small(dir: &Path) -> PathBuf {
    let mut cfg = SynthConfig::preset(Preset::Small);
    cfg.seed = 3;
    let p = dir.join("small.gguf");
    divergence::synth::write_model(&cfg, &p).unwrap();
    p
}

type Tensor = (String, Vec<u64>, GgmlType, Vec<u8>);

/// The tiny model with its metadata and tensor list edited.
fn tiny_edited(
    edit_meta: impl Fn(&mut Vec<(String, MetaValue)>),
    edit_tensors: impl Fn(&mut Vec<Tensor>),
) -> Vec<u8> {
    let file = GgufFile::from_bytes(generate(&tiny()).unwrap().to_bytes()).unwrap();
    let mut meta = file.metadata().to_vec();
    edit_meta(&mut meta);
    let mut tensors: Vec<Tensor> = file
        .tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.dims.clone(),
                t.ty,
                file.tensor_data(t).to_vec(),
            )
        })
        .collect();
    edit_tensors(&mut tensors);
    let mut w = GgufWriter::new();
    for (k, v) in meta {
        w.set(&k, v);
    }
    for (name, dims, ty, data) in tensors {
        w.add_tensor(&name, &dims, ty, data);
    }
    w.to_bytes()
}

/// A receipt of a one-step run on `model`.
fn receipt_of(model: &Path, dir: &Path, name: &str) -> PathBuf {
    let r = dir.join(name);
    let ran = run(&[
        "find",
        "--model",
        s(model),
        "--steps",
        "1",
        "-q",
        "--receipt",
        s(&r),
    ]);
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    r
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn write_json(p: &Path, v: &Value) {
    std::fs::write(p, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// A receipt edited by `edit`, written beside the original.
fn edited_receipt(src: &Path, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let mut v = read_json(src);
    edit(&mut v);
    let p = src.with_file_name(name);
    write_json(&p, &v);
    p
}

/// A sweep shard (1 of 2) of a two-prompt corpus on `model`.
fn sweep_shard(model: &Path, dir: &Path) -> PathBuf {
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "The quick brown fox\nHello there\n").unwrap();
    let out = dir.join("shard1.json");
    let ran = run(&[
        "sweep",
        "--model",
        s(model),
        "--prompts",
        s(&prompts),
        "--steps",
        "1",
        "--shard",
        "1/2",
        "--out",
        s(&out),
    ]);
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    out
}

/// A reference dump of a short run on `model`.
fn reference_dump(model: &Path, dir: &Path, name: &str, engine: &str) -> PathBuf {
    let out = dir.join(name);
    let ran = run(&[
        "capture",
        "--model",
        s(model),
        "--tokens",
        "1,2,3",
        "--steps",
        "1",
        "--engine",
        engine,
        "--out",
        s(&out),
    ]);
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    out
}

// ------------------------------------------------------------------ panics

/// `tokens ... | head -1` and `export-tokenizer` with stdout closed end
/// quietly (exit 0), as every command does on a closed pipe; a
/// tokenizer.json whose pre-tokenizer regex backtracks past onig's retry
/// limit is an error naming the file, not a panic.
#[test]
fn closed_stdout_and_a_runaway_tokenizer_regex_end_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path());
    let inputs = dir.path().join("many.json");
    let many: Vec<String> = (0..5000).map(|i| format!("hello world {i}")).collect();
    std::fs::write(&inputs, serde_json::to_string(&many).unwrap()).unwrap();
    let b158 = dir.path().join("b158.gguf");
    let ran = run(&["gen-model", "--arch", "bitnet-b1.58", "-o", s(&b158)]);
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    let exported = dir.path().join("tokenizer.json");
    let closed = |c: &mut Command| {
        c.stdout(Stdio::piped());
    };
    let mut results = Vec::new();
    for args in [
        vec!["tokens", "--model", s(&model), "--inputs", s(&inputs)],
        vec!["export-tokenizer", "--model", s(&b158), "-o", s(&exported)],
    ] {
        let mut c = command(&args);
        c.stderr(Stdio::piped());
        closed(&mut c);
        let mut child = c.spawn().unwrap();
        // The reader goes away before reading anything (`| head -0`).
        drop(child.stdout.take());
        let mut stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
            s
        });
        let (code, signal, max_rss_kb) = wait_bounded(child, DEADLINE, &args.join(" "));
        let ran = Ran {
            args: args.join(" "),
            code,
            signal,
            stdout: vec![],
            stderr: reader.join().unwrap(),
            max_rss_kb,
        };
        results.push(ran.expect(0, &[]));
    }

    let tokenizer = dir.path().join("backtracking.json");
    write_json(
        &tokenizer,
        &json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": false},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 1}, "unk_token": "[UNK]"}
        }),
    );
    let text = format!("{}b", "a".repeat(40));
    let ran = run(&[
        "tokens",
        "--model",
        s(&model),
        "--text",
        &text,
        "--tokenizer-json",
        s(&tokenizer),
    ]);
    results.push(ran.expect(2, &["backtracking.json", "retry-limit"]));
    all_ok(results);
}

// ------------------------------------------------- allocation before validation

/// Sizes stated by a flag or a file are checked against sane limits (and
/// against what the file holds) before anything is allocated: gen-model's
/// dimensions, a receipt's recipe rebuilt by verify (which never leaves a
/// model whose hash is wrong), a shard claiming a billion shards, a
/// receipt claiming a billion layers.
#[test]
fn sizes_stated_by_flags_and_files_are_checked_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let m = out.join("m.gguf");
    let mut results = Vec::new();
    for (flag, value, field) in [
        ("--n-vocab", "1000000000", "n_vocab"),
        ("--n-embd", "1000000000", "n_embd"),
        ("--n-ff", "1000000000", "n_ff"),
        ("--n-layer", "1000000", "n_layer"),
        ("--n-ctx", "4000000000", "n_ctx"),
    ] {
        let ran = run(&["gen-model", flag, value, "-o", s(&m)]);
        results.push(ran.expect(2, &[field, "at most"]));
    }
    assert_eq!(files_in(&out), Vec::<String>::new(), "gen-model left files");

    let model = write_tiny(dir.path());
    let receipt = receipt_of(&model, dir.path(), "r.json");
    let gone = out.join("gone.gguf");
    let huge = edited_receipt(&receipt, "huge-recipe.json", |v| {
        v["run"]["model_path"] = json!(gone.to_str().unwrap());
        v["model"]["recipe"]["n_embd"] = json!(1_000_000_000u64);
    });
    results.push(run(&["verify", s(&huge)]).expect(2, &["huge-recipe.json", "n_embd", "at most"]));
    let wrong_hash = edited_receipt(&receipt, "wrong-hash.json", |v| {
        v["run"]["model_path"] = json!(gone.to_str().unwrap());
        v["model"]["sha256"] = json!("0".repeat(64));
    });
    results.push(run(&["verify", s(&wrong_hash)]).expect(2, &["wrong-hash.json", "sha256"]));
    assert_eq!(
        files_in(&out),
        Vec::<String>::new(),
        "verify left a model whose hash is wrong"
    );

    let shard = sweep_shard(&model, dir.path());
    let mut v = read_json(&shard);
    v["shard"]["count"] = json!(1_000_000_000u64);
    let claimed = dir.path().join("billion-shards.json");
    write_json(&claimed, &v);
    let merged = out.join("merged.json");
    results.push(
        run(&["merge", s(&claimed), "-o", s(&merged)])
            .expect(2, &["billion-shards.json", "1000000000"]),
    );

    for (name, layers) in [
        ("layers-1e9.json", 1_000_000_000u64),
        ("layers-1e5.json", 100_000),
    ] {
        let r = edited_receipt(&receipt, name, |v| {
            v["model"]["file"]["n_layer"] = json!(layers);
            v["model"]["config"]["n_layer"] = json!(layers);
        });
        let html = out.join("report.html");
        results
            .push(run(&["report", s(&r), "-o", s(&html)]).expect(2, &[name, "n_layer", "at most"]));
    }

    // A reference dump (its model gone) whose manifest claims a billion layers.
    let dump = reference_dump(&model, dir.path(), "ref.safetensors", "reference");
    let claimed = dir.path().join("billion-layers.safetensors");
    rewrite_dump(&dump, &claimed, |_, m| {
        m["model_path"] = json!(gone.to_str().unwrap());
        m["model"]["n_layer"] = json!(1_000_000_000u64);
    });
    let receipt = out.join("compare.json");
    results.push(
        run(&[
            "compare",
            "--reference",
            s(&claimed),
            "--candidate",
            s(&dump),
            "--receipt",
            s(&receipt),
        ])
        .expect(2, &["billion-layers.safetensors", "1000000000 layers"]),
    );
    assert_eq!(files_in(&out), Vec::<String>::new());
    all_ok(results);
}

// ------------------------------------------------------------ unbounded reads

/// Every text or JSON input has a size limit: `/dev/zero` given for any
/// of them is refused naming the file and the limit (a model or a dump,
/// which must be mapped or read whole, as not a regular file).
#[test]
fn an_endless_input_is_read_to_its_limit_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path());
    let m = s(&model);
    let dump = reference_dump(&model, dir.path(), "ref.safetensors", "reference");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let o = |n: &str| out.join(n).to_str().unwrap().to_string();
    let (receipt, html, sweep, gguf) = (o("r.json"), o("r.html"), o("s.json"), o("m.gguf"));
    let z = "/dev/zero";
    let limit = &[z, "limit"][..];
    let not_regular = &[z, "not a regular file"][..];
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["tokens", "--model", m, "--inputs", z], limit),
        (
            vec![
                "tokens",
                "--model",
                m,
                "--text",
                "hi",
                "--tokenizer-json",
                z,
            ],
            limit,
        ),
        (
            vec![
                "tokens",
                "--model",
                m,
                "--text",
                "hi",
                "--chat",
                "--chat-template",
                z,
            ],
            limit,
        ),
        (
            vec!["sweep", "--model", m, "--prompts", z, "--out", &sweep],
            limit,
        ),
        (
            vec![
                "find",
                "--model",
                m,
                "--policy",
                z,
                "-q",
                "--receipt",
                &receipt,
            ],
            limit,
        ),
        (vec!["verify", z], limit),
        (vec!["report", z, "-o", &html], limit),
        (vec!["merge", z, "-o", &sweep], limit),
        (
            vec![
                "compare",
                "--reference",
                s(&dump),
                "--candidate",
                s(&dump),
                "--map",
                z,
                "--receipt",
                &receipt,
            ],
            limit,
        ),
        (
            vec![
                "compare",
                "--reference",
                z,
                "--candidate",
                s(&dump),
                "--receipt",
                &receipt,
            ],
            not_regular,
        ),
        (vec!["inspect", z], not_regular),
        (
            vec!["find", "--model", z, "-q", "--receipt", &receipt],
            not_regular,
        ),
        (vec!["gen-model", "--vocab", z, "-o", &gguf], not_regular),
    ];
    let results = cases
        .into_iter()
        .map(|(args, needles)| run(&args).expect(2, needles))
        .collect();
    all_ok(results);
    assert_eq!(files_in(&out), Vec::<String>::new());
}

// ------------------------------------------------------------- special files

/// A FIFO (with nobody writing) given as any input is refused at once, not
/// waited on forever; a receipt whose model is `/dev/zero` is refused, not
/// hashed forever.
#[test]
fn a_fifo_or_a_device_as_an_input_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path());
    let m = s(&model);
    let dump = reference_dump(&model, dir.path(), "ref.safetensors", "reference");
    let fifo = dir.path().join("pipe");
    mkfifo(&fifo);
    let f = s(&fifo);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let o = |n: &str| out.join(n).to_str().unwrap().to_string();
    let (receipt, html, sweep) = (o("r.json"), o("r.html"), o("s.json"));
    let cases: Vec<Vec<&str>> = vec![
        vec!["find", "--model", f, "-q", "--receipt", &receipt],
        vec!["inspect", f],
        vec![
            "find",
            "--model",
            m,
            "--policy",
            f,
            "-q",
            "--receipt",
            &receipt,
        ],
        vec!["sweep", "--model", m, "--prompts", f, "--out", &sweep],
        vec!["verify", f],
        vec!["report", f, "-o", &html],
        vec!["merge", f, "-o", &sweep],
        vec!["tokens", "--model", m, "--inputs", f],
        vec![
            "compare",
            "--reference",
            s(&dump),
            "--candidate",
            s(&dump),
            "--map",
            f,
            "--receipt",
            &receipt,
        ],
        vec![
            "compare",
            "--reference",
            f,
            "--candidate",
            s(&dump),
            "--receipt",
            &receipt,
        ],
    ];
    let mut results: Vec<_> = cases
        .into_iter()
        .map(|args| run(&args).expect(2, &["pipe", "fifo"]))
        .collect();
    let good = receipt_of(&model, dir.path(), "good.json");
    let zero_model = edited_receipt(&good, "zero-model.json", |v| {
        v["run"]["model_path"] = json!("/dev/zero");
    });
    results.push(run(&["verify", s(&zero_model)]).expect(2, &["/dev/zero", "not a regular file"]));
    all_ok(results);
    assert_eq!(files_in(&out), Vec::<String>::new());
}

/// Outputs to a FIFO (as the README promises) are written in place once
/// the result is complete, and never read back.
#[test]
fn outputs_to_a_fifo_are_written_once_complete_and_never_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path());
    let fifo = dir.path().join("out.pipe");
    mkfifo(&fifo);
    for args in [
        vec![
            "find",
            "--model",
            s(&model),
            "--steps",
            "1",
            "-q",
            "--receipt",
            s(&fifo),
        ],
        vec![
            "capture",
            "--model",
            s(&model),
            "--tokens",
            "1,2",
            "--steps",
            "1",
            "--out",
            s(&fifo),
        ],
    ] {
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        let ran = run(&args);
        let got = reader.join().unwrap();
        all_ok(vec![ran.expect(0, &[])]);
        assert!(got.len() > 100, "{}: {} bytes arrived", ran.args, got.len());
        if args[0] == "find" {
            divergence::receipt::Receipt::parse(std::str::from_utf8(&got).unwrap())
                .expect("a whole receipt came through the FIFO");
        }
    }
}

// ----------------------------------------------------- threads and the worker

/// More threads than the machine has are clamped (and the run says so);
/// `verify` checks a receipt's recorded values before rerunning it.
#[test]
fn threads_are_bounded_by_the_machine_and_recorded_values_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path());
    let cores = std::thread::available_parallelism().unwrap().get();
    let receipt = dir.path().join("r.json");
    let mut results = Vec::new();
    let ran = run(&[
        "find",
        "--model",
        s(&model),
        "--steps",
        "1",
        "--threads",
        "64",
        "-q",
        "--receipt",
        s(&receipt),
    ]);
    results.push(ran.expect(0, &["--threads 64", &format!("using {cores}")]));
    if ran.code == Some(0) {
        assert_eq!(read_json(&receipt)["run"]["threads"], json!(cores.min(64)));
    }
    let dump = dir.path().join("d.safetensors");
    let ran = run(&[
        "capture",
        "--model",
        s(&model),
        "--tokens",
        "1,2",
        "--steps",
        "1",
        "--threads",
        "256",
        "--out",
        s(&dump),
    ]);
    results.push(ran.expect(0, &["--threads 256", &format!("using {cores}")]));

    let good = receipt_of(&model, dir.path(), "good.json");
    for (name, threads) in [
        ("threads-million.json", 1_000_000u64),
        ("threads-zero.json", 0),
    ] {
        let r = edited_receipt(&good, name, |v| v["run"]["threads"] = json!(threads));
        results.push(run(&["verify", s(&r)]).expect(2, &[name, "threads", "between 1 and"]));
    }
    all_ok(results);
}

/// The reference worker of a process that is gone: every child process of
/// ours whose command line is the worker's.
fn worker_of(parent: u32) -> Option<libc::pid_t> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains("__reference-worker")
        {
            return Some(pid);
        }
    }
    None
}

/// A long `find` whose reference worker has started.
// The caller reaps it (wait_bounded's wait4, or Child::wait).
#[allow(clippy::zombie_processes)]
fn find_with_worker(model: &Path, receipt: &Path) -> (Child, libc::pid_t) {
    let child = command(&[
        "find",
        "--model",
        s(model),
        "--steps",
        "200",
        "-q",
        "--receipt",
        s(receipt),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let start = Instant::now();
    loop {
        if let Some(w) = worker_of(child.id()) {
            return (child, w);
        }
        assert!(start.elapsed() < DEADLINE, "no reference worker appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A reference worker stopped with SIGSTOP cannot hang `find`: a watchdog
/// kills it and the receipt says the reference stopped responding.
#[test]
fn a_stopped_reference_worker_is_reported_not_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_small(dir.path());
    let receipt = dir.path().join("r.json");
    let (child, worker) = find_with_worker(&model, &receipt);
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on a process of this test.
    unsafe { libc::kill(worker, libc::SIGSTOP) };
    let (code, signal, _) = wait_bounded(child, Duration::from_secs(60), "find (worker stopped)");
    // SAFETY: as above; the worker may be gone already.
    unsafe { libc::kill(worker, libc::SIGKILL) };
    assert_eq!((code, signal), (Some(3), None));
    let r = read_json(&receipt);
    assert_eq!(r["verdict"], "reference_failed", "{r}");
    let why = r["reference_failure"].as_str().unwrap();
    assert!(why.contains("stopped") && why.contains("watchdog"), "{why}");
}

/// The worker dies with its parent, even when it is stopped and nothing
/// would ever tell it (PR_SET_PDEATHSIG): this test adopts orphans (a
/// child subreaper), so the kernel's SIGHUP to orphaned stopped process
/// groups does not do the job for it.
#[test]
fn the_reference_worker_dies_with_its_parent() {
    // SAFETY: prctl(2) on this process with plain integer arguments.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    let dir = tempfile::tempdir().unwrap();
    let model = write_small(dir.path());
    let (mut child, worker) = find_with_worker(&model, &dir.path().join("r.json"));
    // SAFETY: kill(2) on processes of this test.
    unsafe {
        libc::kill(worker, libc::SIGSTOP);
        libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
    }
    child.wait().unwrap();
    let start = Instant::now();
    let died = loop {
        // SAFETY: waitpid(2) on the orphan this test adopted.
        let r = unsafe { libc::waitpid(worker, std::ptr::null_mut(), libc::WNOHANG) };
        if r == worker || r < 0 {
            break true;
        }
        if start.elapsed() > Duration::from_secs(20) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !died {
        // SAFETY: as above.
        unsafe {
            libc::kill(worker, libc::SIGKILL);
            libc::waitpid(worker, std::ptr::null_mut(), 0);
        }
    }
    assert!(died, "the reference worker outlived its parent by 20 s");
}

// ------------------------------------------------------------ chat templates

/// The tiny model with this chat template (bitnet.cpp recognises it as
/// llama3's by the marker in its comment, so the reference formats the
/// prompt and the candidate renders the Jinja).
fn tiny_with_template(dir: &Path, name: &str, template: &str) -> PathBuf {
    let template = format!("{{# <|start_header_id|> <|end_header_id|> #}}{template}");
    let bytes = tiny_edited(
        |m| {
            m.push((
                "tokenizer.chat_template".into(),
                MetaValue::String(template.clone()),
            ))
        },
        |_| {},
    );
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Chat templates run under minijinja's fuel and recursion limits, with a
/// cap on the rendered prompt: a string-doubling template, nested loops and
/// a huge output stop quickly; `tokens` refuses the template by name, and
/// `find` still leaves a receipt (the candidate could not format the prompt).
#[test]
fn chat_templates_are_bounded_in_time_memory_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let templates = [
        (
            "doubling.gguf",
            "{% set s = namespace(v='x') %}{% for i in range(64) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}",
        ),
        (
            "loops.gguf",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}hi",
        ),
        (
            "output.gguf",
            "{% for i in range(20000) %}{{ 'abcdefghij' * 10 }}{% endfor %}",
        ),
        ("recursion.gguf", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
    ];
    let mut results = Vec::new();
    for (name, template) in templates {
        let model = tiny_with_template(dir.path(), name, template);
        let ran = run(&["tokens", "--model", s(&model), "--text", "hi", "--chat"]);
        results.push(ran.expect(2, &["chat template", "limit"]));
        let receipt = out.join(format!("{name}.json"));
        let ran = run(&[
            "find",
            "--model",
            s(&model),
            "--prompt",
            "hi",
            "--chat",
            "--steps",
            "1",
            "-q",
            "--receipt",
            s(&receipt),
        ]);
        results.push(ran.expect(5, &[]));
        if receipt.exists() {
            let r = read_json(&receipt);
            let msg = r["candidate_failure"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if !(msg.contains("chat") && msg.contains("limit")) {
                results.push(Err(format!("{name}: candidate_failure {msg:?}")));
            }
        } else {
            results.push(Err(format!("{name}: find left no receipt")));
        }
    }
    all_ok(results);
}

// --------------------------------------------------- C++ exceptions (the FFI)

/// The tiny model with every `<0xXX>` byte token but `<0x0A>` renamed:
/// bitnet.cpp's SentencePiece tokenizer then throws std::out_of_range on
/// any non-ASCII byte (llama_byte_to_token_impl's `token_to_id.at()`).
fn without_byte_tokens(dir: &Path) -> PathBuf {
    let bytes = tiny_edited(
        |m| {
            let mut renamed = Vec::new();
            for (k, v) in m.iter_mut() {
                if let (true, MetaValue::Array(MetaArray::String(toks))) =
                    (k == "tokenizer.ggml.tokens", v)
                {
                    for (i, t) in toks.iter_mut().enumerate() {
                        if t.len() == 6 && t.starts_with("<0x") && t != "<0x0A>" {
                            *t = format!("<byte{}>", &t[3..5]);
                            renamed.push(i);
                        }
                    }
                }
            }
            for (k, v) in m.iter_mut() {
                if let (true, MetaValue::Array(MetaArray::I32(ty))) =
                    (k == "tokenizer.ggml.token_type", v)
                {
                    for &i in &renamed {
                        ty[i] = 1;
                    }
                }
            }
        },
        |_| {},
    );
    let p = dir.join("no-byte-tokens.gguf");
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A C++ exception thrown inside bitnet.cpp is caught at the C shim and
/// comes back as an error with its type and what(): the receipt names the
/// cause instead of "Rust cannot catch foreign exceptions" and a SIGABRT,
/// and does not claim the ids were given.
#[test]
fn a_cpp_exception_in_the_reference_is_an_error_naming_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let model = without_byte_tokens(dir.path());
    let receipt = dir.path().join("r.json");
    let ran = run(&[
        "find",
        "--model",
        s(&model),
        "--prompt",
        "café ünïcödé",
        "--steps",
        "1",
        "-q",
        "--receipt",
        s(&receipt),
    ]);
    let mut results = vec![ran.expect(3, &[])];
    let out = ran.out();
    if out.contains("given") || !out.contains("no byte token for <0xC3>") {
        results.push(Err(format!("find's summary: {out}")));
    }
    let r = read_json(&receipt);
    let failure = r["reference_failure"].as_str().unwrap_or("");
    for want in ["std::out_of_range", "no byte token for <0xC3>"] {
        if !failure.contains(want) {
            results.push(Err(format!("reference_failure lacks {want:?}: {failure}")));
        }
    }
    for not in ["foreign exception", "SIGABRT"] {
        if failure.contains(not) {
            results.push(Err(format!("reference_failure says {not:?}: {failure}")));
        }
    }
    if r["tokens"]["source"] == "ids_given" {
        results.push(Err(format!(
            "the receipt claims the ids were given: {}",
            r["tokens"]
        )));
    }
    let ran = run(&["tokens", "--model", s(&model), "--text", "café ünïcödé"]);
    results.push(ran.expect(3, &["no byte token for <0xC3>"]));
    all_ok(results);
}

// ------------------------------------------------------- terminal escapes

const ESCAPES: [u8; 3] = [0x1b, 0x07, 0x9b];

/// Raw control characters in what a command printed (C1 CSI as UTF-8 too).
fn raw_controls(ran: &Ran) -> Result<(), String> {
    let text = [ran.stdout.as_slice(), ran.stderr.as_bytes()].concat();
    let c1 = String::from_utf8_lossy(&text).contains('\u{9b}');
    if text.iter().any(|b| ESCAPES[..2].contains(b)) || c1 {
        Err(format!(
            "divergence {}: raw ESC/BEL/CSI reached the terminal:\n{}\n{}",
            ran.args.escape_debug(),
            ran.out().escape_debug(),
            ran.stderr.escape_debug()
        ))
    } else {
        Ok(())
    }
}

const OSC52: &str = "\x1b]52;c;SGVsbG8=\x07";

/// Rewrites a dump's safetensors header: `edit` gets the header and the
/// manifest (parsed), the data is kept.
fn rewrite_dump(src: &Path, dst: &Path, edit: impl FnOnce(&mut Value, &mut Value)) {
    let bytes = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let manifest = header["__metadata__"]["divergence"]
        .as_str()
        .unwrap()
        .to_string();
    let mut m: Value = serde_json::from_str(&manifest).unwrap();
    edit(&mut header, &mut m);
    header["__metadata__"]["divergence"] = json!(m.to_string());
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(dst, out).unwrap();
}

/// A dump whose manifest fields and one tensor name carry escape sequences.
fn poison_dump(src: &Path, dst: &Path) {
    rewrite_dump(src, dst, |header, m| {
        m["engine"] = json!(format!("evil{OSC52}"));
        m["engine_build"] = json!("\x1b[2Jcleared\u{9b}31m");
        m["model_path"] = json!("\x1b[31mred.gguf");
        let obj = header.as_object_mut().unwrap();
        let t = obj.remove("step0.logits").unwrap();
        obj.insert(format!("step0.\x1b[31mlogits{OSC52}"), t);
    });
}

/// Names and strings that came from a file (metadata keys, tensor names,
/// manifest fields, a policy's name, paths in errors) are escaped before
/// they reach the terminal: no ESC, BEL or C1 CSI is ever printed raw.
#[test]
fn control_characters_from_files_never_reach_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path());
    let evil_model = dir.path().join("evil.gguf");
    std::fs::write(
        &evil_model,
        tiny_edited(
            |m| m.push((format!("evil.{OSC52}key"), MetaValue::String("v".into()))),
            |ts| {
                ts.push((
                    format!("x\x1b[31mred\u{9b}0m{OSC52}"),
                    vec![4],
                    GgmlType::F32,
                    vec![0; 16],
                ))
            },
        ),
    )
    .unwrap();
    let mut policy = read_json(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/policies/default.json"
    )));
    policy["name"] = json!(format!("p{OSC52}\x1b[2J"));
    let evil_policy = dir.path().join("evil-policy.json");
    write_json(&evil_policy, &policy);
    let reference = reference_dump(&model, dir.path(), "ref.safetensors", "reference");
    let candidate = reference_dump(&model, dir.path(), "cand.safetensors", "candidate");
    let evil_dump = dir.path().join("evil.safetensors");
    poison_dump(&candidate, &evil_dump);
    let receipt = dir.path().join("r.json");
    let evil_path = dir.path().join(format!("nope{OSC52}\x1b[2J.gguf"));
    let runs = [
        run(&["inspect", s(&evil_model)]),
        run(&[
            "find",
            "--model",
            s(&model),
            "--steps",
            "1",
            "-q",
            "--policy",
            s(&evil_policy),
            "--receipt",
            s(&receipt),
        ]),
        run(&[
            "compare",
            "--reference",
            s(&reference),
            "--candidate",
            s(&evil_dump),
            "--receipt",
            s(&receipt),
        ]),
        run(&["inspect", s(&evil_path)]),
        run(&[
            "find",
            "--model",
            s(&evil_path),
            "-q",
            "--receipt",
            s(&receipt),
        ]),
    ];
    let mut results: Vec<_> = runs.iter().map(raw_controls).collect();
    // What was escaped is still there to read.
    if !runs[0].out().contains("evil.") || !runs[2].out().contains("evil") {
        results.push(Err(format!(
            "escaped names vanished:\n{}\n{}",
            runs[0].out(),
            runs[2].out()
        )));
    }
    all_ok(results);
}

// ------------------------------------------------------ signals and leftovers

fn sigint_when(child: &Child, ready: impl Fn() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < DEADLINE, "never got ready to interrupt");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
}

/// Ctrl-C stops `sweep` and `capture` as it stops `find`: exit 130, what
/// was done is kept and marked as interrupted, nothing else is left.
#[test]
fn ctrl_c_stops_sweep_and_capture_keeping_what_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_small(dir.path());
    let prompts = dir.path().join("prompts.txt");
    let lines: Vec<String> = (0..40)
        .map(|i| format!("Prompt number {i} says hello"))
        .collect();
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let receipts = out.join("receipts");
    let sweep_file = out.join("sweep.json");
    let child = command(&[
        "sweep",
        "--model",
        s(&model),
        "--prompts",
        s(&prompts),
        "--steps",
        "4",
        "-q",
        "--out",
        s(&sweep_file),
        "--receipts",
        s(&receipts),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    sigint_when(&child, || receipts.join("prompt-0000.json").exists());
    let (code, ..) = wait_bounded(child, Duration::from_secs(60), "sweep (interrupted)");
    assert_eq!(code, Some(130));
    let sweep = read_json(&sweep_file);
    assert_eq!(sweep["interrupted"], json!(true), "{}", sweep["summary"]);
    let done = sweep["prompts"].as_array().unwrap().len();
    assert!((1..40).contains(&done), "{done} prompts kept");

    let dump = out.join("d.safetensors");
    let child = command(&[
        "capture",
        "--model",
        s(&model),
        "--tokens",
        "1,2,3",
        "--steps",
        "400",
        "--out",
        s(&dump),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    sigint_when(&child, || {
        files_in(&out).iter().any(|f| f.ends_with(".stages"))
    });
    let (code, ..) = wait_bounded(child, Duration::from_secs(60), "capture (interrupted)");
    assert_eq!(code, Some(130));
    let d = divergence::dump::Dump::open(&dump).expect("the steps done are a whole dump");
    let m = d.manifest.as_ref().unwrap();
    assert!(m.steps.len() < 401, "{} steps", m.steps.len());
    let header = std::fs::read(&dump).unwrap();
    assert!(
        String::from_utf8_lossy(&header[..4096.min(header.len())]).contains("interrupted"),
        "the dump is not marked interrupted"
    );
    assert_eq!(
        files_in(&out),
        vec!["d.safetensors", "receipts", "sweep.json"]
    );
}

/// No temporary or side file outlives a run: SIGTERM (as `timeout` sends)
/// mid-capture and mid-find removes them; files left by a process that
/// could run no code (SIGKILL) are removed by the next run writing there.
#[test]
fn no_temporary_or_side_file_outlives_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_small(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let dump = out.join("d.safetensors");
    let child = command(&[
        "capture",
        "--model",
        s(&model),
        "--tokens",
        "1,2,3",
        "--steps",
        "400",
        "--out",
        s(&dump),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let start = Instant::now();
    while !files_in(&out).iter().any(|f| f.ends_with(".stages")) {
        assert!(start.elapsed() < DEADLINE, "no side file appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let (code, signal, _) = wait_bounded(child, Duration::from_secs(60), "capture (SIGTERM)");
    assert!(
        code.is_some(),
        "SIGTERM killed it (signal {signal:?}) before it cleaned up"
    );
    let left: Vec<String> = files_in(&out)
        .into_iter()
        .filter(|f| f.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "left after SIGTERM: {left:?}");

    // A dead process's leftovers (its pid is gone) are removed by the next
    // run that writes the same output.
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let receipt = out.join("r.json");
    let stale = [
        out.join(format!(".d.safetensors.{dead}.stages")),
        out.join(format!(".d.safetensors.{dead}.safetensors.tmp")),
        out.join(format!(".r.json.{dead}.tmp")),
    ];
    for f in &stale {
        std::fs::write(f, b"left by a killed run").unwrap();
    }
    let tiny = write_tiny(dir.path());
    let ran = run(&[
        "capture",
        "--model",
        s(&tiny),
        "--tokens",
        "1,2",
        "--steps",
        "1",
        "--out",
        s(&dump),
    ]);
    let ran2 = run(&[
        "find",
        "--model",
        s(&tiny),
        "--steps",
        "1",
        "-q",
        "--receipt",
        s(&receipt),
    ]);
    all_ok(vec![ran.expect(0, &[]), ran2.expect(0, &[])]);
    assert_eq!(files_in(&out), vec!["d.safetensors", "r.json"]);
}

// ---------------------------------------------------- exit codes and messages

/// `verify`: a receipt's recorded values are checked (exit 2, not "a
/// result changed"), every receipt of a list is reported, and Ctrl-C is 130.
#[test]
fn verify_reports_every_bad_receipt_with_exit_2_and_ctrl_c_with_130() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path());
    let good = receipt_of(&model, dir.path(), "good.json");
    let future = edited_receipt(&good, "future.json", |v| v["schema_version"] = json!(999));
    let zero = edited_receipt(&good, "zero-threads.json", |v| {
        v["run"]["threads"] = json!(0)
    });
    let mut results = vec![
        run(&["verify", s(&future)]).expect(2, &["future.json", "schema_version 999"]),
        run(&["verify", s(&zero)]).expect(2, &["zero-threads.json", "threads"]),
    ];
    let ran = run(&["verify", s(&future), s(&good), s(&zero)]);
    results.push(ran.expect(2, &["future.json", "zero-threads.json"]));
    if !ran.out().contains("good.json: same result") {
        results.push(Err(format!(
            "the good receipt was not verified: {}",
            ran.out()
        )));
    }

    let small = write_small(dir.path());
    let long = dir.path().join("long.json");
    let ran = run_in(
        &[
            "find",
            "--model",
            s(&small),
            "--steps",
            "200",
            "-q",
            "--receipt",
            s(&long),
        ],
        Duration::from_secs(120),
        |_| {},
    );
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    let mut child = command(&["verify", s(&long)]);
    let child = child
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    sigint_when(&child, || worker_of(child.id()).is_some());
    let (code, ..) = wait_bounded(child, Duration::from_secs(60), "verify (interrupted)");
    if code != Some(130) {
        results.push(Err(format!("verify interrupted: exit {code:?}, want 130")));
    }
    all_ok(results);
}

/// Messages say each thing once and name the right input; outputs keep a
/// replaced file's mode and never overwrite an input.
#[test]
fn messages_name_the_right_input_once_and_outputs_respect_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_tiny(dir.path());
    let mut results = Vec::new();

    // An error and its cause are not both printed in full.
    let ran = run(&[
        "compare",
        "--reference",
        s(dir.path()),
        "--candidate",
        s(dir.path()),
    ]);
    results.push(ran.expect(2, &["directory"]));
    if ran.stderr.matches("os error").count() > 1
        || ran.stderr.to_lowercase().matches("directory").count() > 1
    {
        results.push(Err(format!("said twice: {}", ran.stderr)));
    }
    // A policy error names the policy, not the model.
    let bad_policy = dir.path().join("bad-policy.json");
    std::fs::write(&bad_policy, "{ not json").unwrap();
    let receipt = dir.path().join("r.json");
    let ran = run(&[
        "find",
        "--model",
        s(&model),
        "-q",
        "--policy",
        s(&bad_policy),
        "--receipt",
        s(&receipt),
    ]);
    results.push(ran.expect(2, &["bad-policy.json"]));
    if ran.stderr.contains("model ") {
        results.push(Err(format!(
            "a policy error blamed the model: {}",
            ran.stderr
        )));
    }
    // merge names the prompt that is missing, not two equal counts.
    let shard = sweep_shard(&model, dir.path());
    let mut v = read_json(&shard);
    v["shard"] = json!({"index": 1, "count": 1});
    let first = v["prompts"][0].clone();
    v["prompts"] = json!([first.clone(), first]);
    v["config"]["corpus_prompts"] = json!(2);
    let whole = dir.path().join("dup.json");
    write_json(&whole, &v);
    let ran = run(&["merge", s(&whole), "-o", s(&dir.path().join("m.json"))]);
    results.push(ran.expect(2, &["prompt 1", "prompt 0"]));
    // --chat-template takes a file.
    let help = run(&["tokens", "--help"]).out();
    let line = help
        .lines()
        .skip_while(|l| !l.contains("--chat-template"))
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    if !line.contains("FILE") || line.contains("Jinja text") {
        results.push(Err(format!("--chat-template help: {line}")));
    }

    // A read-only receipt keeps its mode when a run replaces it.
    std::fs::write(&receipt, "{}").unwrap();
    std::fs::set_permissions(&receipt, std::fs::Permissions::from_mode(0o444)).unwrap();
    let ran = run(&[
        "find",
        "--model",
        s(&model),
        "--steps",
        "1",
        "-q",
        "--receipt",
        s(&receipt),
    ]);
    results.push(ran.expect(0, &[]));
    let mode = std::fs::metadata(&receipt).unwrap().permissions().mode() & 0o777;
    if mode != 0o444 {
        results.push(Err(format!(
            "the replaced receipt has mode {mode:o}, not 444"
        )));
    }
    // `report -o` its own input is refused, and the input is untouched.
    std::fs::set_permissions(&receipt, std::fs::Permissions::from_mode(0o644)).unwrap();
    let before = std::fs::read(&receipt).unwrap();
    let ran = run(&["report", s(&receipt), "-o", s(&receipt)]);
    results.push(ran.expect(2, &["r.json", "input"]));
    if std::fs::read(&receipt).unwrap() != before {
        results.push(Err("report overwrote its input".into()));
    }
    all_ok(results);
}

// ------------------------------------------------------------ CLI consistency

/// Every command takes `-q/--quiet`, and the README's command table lists
/// the options `capture` has.
#[test]
fn every_command_takes_quiet_and_the_readme_lists_capture_kv() {
    let mut results = Vec::new();
    for cmd in [
        "find",
        "verify",
        "capture",
        "compare",
        "tokens",
        "export-tokenizer",
        "report",
        "sweep",
        "merge",
        "inspect",
        "gen-model",
        "bench",
    ] {
        let help = run(&[cmd, "--help"]).out();
        if !help.contains("-q, --quiet") {
            results.push(Err(format!("{cmd} has no -q/--quiet")));
        }
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let row = readme
        .lines()
        .find(|l| l.starts_with("| `capture "))
        .unwrap_or("");
    if !row.contains("--kv") {
        results.push(Err(format!("README's capture row lacks --kv: {row}")));
    }
    all_ok(results);
}
