//! An engine outside this process, run as a command: `--candidate-cmd`.
//!
//! The harness captures bitnet.cpp's run into a dump, runs the command with
//! the run's facts substituted for placeholders, and judges the dump the
//! command wrote (any subset of the stages, in the documented format or
//! through a map) with the same judge as `divergence compare`. The command
//! is split into words like a POSIX shell would (quotes, backslashes) and
//! then each placeholder is substituted inside a word, so a prompt's text
//! is always one argument and never reaches a shell:
//!
//! | placeholder | value |
//! |---|---|
//! | `{model}` | the GGUF path |
//! | `{tokens}` | the prompt's token ids, comma-separated (tokenized by bitnet.cpp) |
//! | `{steps}` | greedy decode steps after the prefill |
//! | `{kv}` | the KV cache type, `f16` or `f32` |
//! | `{threads}` | threads |
//! | `{out}` | the dump to write (safetensors) |
//! | `{prompt}` | the prompt's text (empty for a token-id prompt) |
//! | `{ffn_act}` | the FFN activation to run, `relu2` or `silu` (`--ffn-act`, else the arch's own) |
//!
//! A command that cannot start, exits non-zero, is killed, outlives its
//! timeout, or writes no readable dump is the candidate's failure: the
//! receipt says which, with its exit status and the tail of its stderr.

use crate::dump::capture::{capture_reference, CaptureConfig, CaptureError};
use crate::dump::map::{map_dump, DumpMap};
use crate::dump::Dump;
use crate::gguf::GgufFile;
use crate::lockstep::offline::{compare_dumps, CandidateDump, Compared, OfflineOptions};
use crate::lockstep::{Prompt, RunError};
use crate::model::{Arch, FfnAct, KvType};
use crate::reference::worker::keep_tail;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The placeholders a command may use.
pub const PLACEHOLDERS: [&str; 8] = [
    "model", "tokens", "steps", "kv", "threads", "out", "prompt", "ffn_act",
];

/// How much of the command's stderr a failure keeps.
const STDERR_TAIL: usize = 4 * 1024;

/// The default for `--candidate-timeout`: generous, for an engine that
/// loads a large model in a slow language.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// An external engine's command line, checked.
#[derive(Clone, Debug)]
pub struct CandidateCommand {
    /// As given.
    pub template: String,
    words: Vec<String>,
    /// How long a run may take before it is killed.
    pub timeout: Duration,
}

/// What one run of the command is given.
#[derive(Clone, Debug)]
pub struct CommandInputs<'a> {
    /// `{model}`.
    pub model: &'a Path,
    /// `{tokens}`.
    pub tokens: &'a [u32],
    /// `{steps}`.
    pub steps: usize,
    /// `{kv}`.
    pub kv_type: KvType,
    /// `{threads}`.
    pub threads: usize,
    /// `{out}`.
    pub out: &'a Path,
    /// `{prompt}` (empty when `None`).
    pub prompt: Option<&'a str>,
    /// `{ffn_act}`.
    pub ffn_act: FfnAct,
}

impl CandidateCommand {
    /// Splits `template` into words and checks its placeholders: every
    /// `{name}` must be one of [`PLACEHOLDERS`] (`{{` and `}}` are literal
    /// braces), and `{out}` must appear, since the dump is the result.
    pub fn parse(template: &str, timeout: Duration) -> Result<CandidateCommand, String> {
        let words = shell_words::split(template)
            .map_err(|e| format!("--candidate-cmd {template:?}: {e}"))?;
        if words.is_empty() {
            return Err("--candidate-cmd is empty".into());
        }
        let mut has_out = false;
        for w in &words {
            for name in placeholders_in(w)? {
                if !PLACEHOLDERS.contains(&name.as_str()) {
                    return Err(format!(
                        "--candidate-cmd: unknown placeholder {{{name}}} (known: {})",
                        PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(" ")
                    ));
                }
                has_out |= name == "out";
            }
        }
        if !has_out {
            return Err(
                "--candidate-cmd must write its dump to {out}: the placeholder is missing".into(),
            );
        }
        if timeout.is_zero() {
            return Err("--candidate-timeout must be more than 0 seconds".into());
        }
        Ok(CandidateCommand {
            template: template.to_string(),
            words,
            timeout,
        })
    }

    /// The argument vector for `inputs`.
    pub fn argv(&self, inputs: &CommandInputs<'_>) -> Vec<String> {
        let tokens: Vec<String> = inputs.tokens.iter().map(u32::to_string).collect();
        let value = |name: &str| -> String {
            match name {
                "model" => inputs.model.display().to_string(),
                "tokens" => tokens.join(","),
                "steps" => inputs.steps.to_string(),
                "kv" => match inputs.kv_type {
                    KvType::F16 => "f16".into(),
                    KvType::F32 => "f32".into(),
                },
                "threads" => inputs.threads.to_string(),
                "out" => inputs.out.display().to_string(),
                "prompt" => inputs.prompt.unwrap_or_default().to_string(),
                "ffn_act" => inputs.ffn_act.name().to_string(),
                _ => unreachable!("checked in parse"),
            }
        };
        self.words.iter().map(|w| substitute(w, &value)).collect()
    }

    /// Runs the command once: `Ok` when it exited 0 within its time.
    /// `interrupt`, when set, stops it like a timeout.
    pub fn run(
        &self,
        inputs: &CommandInputs<'_>,
        interrupt: Option<&AtomicBool>,
    ) -> Result<(), CommandFailure> {
        let argv = self.argv(inputs);
        let fail = |message: String, status: Option<i32>, tail: &Mutex<Vec<u8>>| CommandFailure {
            message,
            status,
            stderr_tail: printable_tail(&tail.lock().unwrap_or_else(|p| p.into_inner())),
        };
        let none = Mutex::new(Vec::new());
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            // Its own process group, so a timeout stops its children too.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot start `{}`: {e}", argv[0]), None, &none))?;
        let (tail, reader) = match child.stderr.take() {
            Some(stderr) => {
                let (tail, reader) = keep_tail(stderr, STDERR_TAIL);
                (tail, Some(reader))
            }
            None => (Arc::new(Mutex::new(Vec::new())), None),
        };
        let t0 = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => return Err(fail(format!("waiting for it: {e}"), None, &tail)),
            }
            let interrupted = interrupt.is_some_and(|f| f.load(Ordering::Relaxed));
            if interrupted || t0.elapsed() > self.timeout {
                // SAFETY: kill(2) on the child's process group (its pid, as
                // process_group(0) made it) only sends a signal.
                unsafe {
                    libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
                }
                let _ = child.wait();
                if let Some(r) = reader {
                    let _ = r.join();
                }
                let why = if interrupted {
                    "interrupted".to_string()
                } else {
                    format!(
                        "timed out after {} s (--candidate-timeout)",
                        self.timeout.as_secs()
                    )
                };
                return Err(fail(why, None, &tail));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(r) = reader {
            let _ = r.join();
        }
        if status.success() {
            return Ok(());
        }
        let message = match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => "ended abnormally".to_string(),
        };
        Err(fail(message, status.code(), &tail))
    }
}

/// Why a run of the command gave no dump.
#[derive(Clone, Debug)]
pub struct CommandFailure {
    /// What happened (`exited with status 3`, `timed out after 60 s`).
    pub message: String,
    /// Its exit status, when it exited.
    pub status: Option<i32>,
    /// The end of its stderr, control characters escaped.
    pub stderr_tail: String,
}

impl std::fmt::Display for CommandFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the candidate command {}", self.message)?;
        let tail = self.stderr_tail.trim_end();
        if !tail.is_empty() {
            write!(f, "; the end of its stderr:\n{tail}")?;
        }
        Ok(())
    }
}

/// The `{name}` placeholders of one word (`{{`/`}}` are literal braces).
fn placeholders_in(word: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let mut rest = word;
    while let Some(i) = rest.find(['{', '}']) {
        let after = &rest[i + 1..];
        if rest[i..].starts_with("{{") || rest[i..].starts_with("}}") {
            rest = &rest[i + 2..];
            continue;
        }
        if rest.as_bytes()[i] == b'}' {
            return Err(format!(
                "--candidate-cmd: a lone `}}` in {word:?} (write `}}}}` for a brace)"
            ));
        }
        let Some(end) = after.find('}') else {
            return Err(format!(
                "--candidate-cmd: an unclosed `{{` in {word:?} (write `{{{{` for a brace)"
            ));
        };
        names.push(after[..end].to_string());
        rest = &after[end + 1..];
    }
    Ok(names)
}

/// `word` with each placeholder replaced by its value.
fn substitute(word: &str, value: &dyn Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(word.len());
    let mut rest = word;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        if rest[i..].starts_with("{{") || rest[i..].starts_with("}}") {
            out.push_str(&rest[i..i + 1]);
            rest = &rest[i + 2..];
            continue;
        }
        let end = rest[i..].find('}').map_or(rest.len(), |e| i + e);
        out.push_str(&value(&rest[i + 1..end]));
        rest = &rest[(end + 1).min(rest.len())..];
    }
    out.push_str(rest);
    out
}

/// Bytes of a foreign program's stderr as text safe for a terminal and a
/// receipt: invalid UTF-8 replaced, control characters other than newline
/// and tab shown as `\u{..}`.
fn printable_tail(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// One run of an external engine against bitnet.cpp.
#[derive(Clone, Debug)]
pub struct ExternalRun {
    /// The GGUF both engines run.
    pub model: PathBuf,
    /// Text (tokenized by bitnet.cpp) or token ids.
    pub prompt: Prompt,
    /// Greedy decode steps after the prefill.
    pub steps: usize,
    /// Threads for each engine.
    pub threads: usize,
    /// KV cache type of both engines.
    pub kv_type: KvType,
    /// The command's dump read through this map, if its names are its own.
    pub map: Option<DumpMap>,
    /// How the dumps are judged.
    pub options: OfflineOptions,
    /// Where both dumps are written (kept: they are the evidence).
    pub dir: PathBuf,
}

/// The judged run, and the two dumps it judged.
pub struct ExternalOutcome {
    /// The judgement, as `compare`'s.
    pub compared: Compared,
    /// bitnet.cpp's dump.
    pub reference_dump: PathBuf,
    /// The command's dump (it may be missing or unusable: then the outcome
    /// says `candidate_failed`).
    pub candidate_dump: PathBuf,
}

/// Captures the reference, runs `cmd` on the same token ids, and judges its
/// dump as `divergence compare` would. A reference that fails is an error
/// (exit 3 in the command line); a command that fails is a
/// `candidate_failed` outcome.
pub fn judge(
    cmd: &CandidateCommand,
    run: &ExternalRun,
    worker_exe: &Path,
    interrupt: Option<&AtomicBool>,
) -> Result<ExternalOutcome, ExternalError> {
    let reference_dump = run.dir.join("reference.safetensors");
    let candidate_dump = run.dir.join("candidate.safetensors");
    let _ = std::fs::remove_file(&candidate_dump);
    let manifest = capture_reference(
        &CaptureConfig {
            model: run.model.clone(),
            prompt: run.prompt.clone(),
            steps: run.steps,
            threads: run.threads,
            kv_type: run.kv_type,
            ffn_act: run.options.ffn_act,
            out: reference_dump.clone(),
            // `interrupt` stops the command; the reference capture runs whole.
            cancel: None,
        },
        worker_exe,
    )?;
    let tokens = manifest
        .steps
        .first()
        .map(|s| s.tokens.clone())
        .unwrap_or_default();
    let text = match &run.prompt {
        Prompt::Text(t) => Some(t.as_str()),
        Prompt::Tokens(_) => None,
    };
    // The activation the command is to run: forced, else the arch's own.
    let arch_act = GgufFile::open(&run.model)
        .ok()
        .and_then(|f| {
            f.get_str("general.architecture")
                .ok()
                .and_then(Arch::from_name)
        })
        .map_or(FfnAct::Silu, Arch::ffn_act);
    let inputs = CommandInputs {
        model: &run.model,
        tokens: &tokens,
        steps: run.steps,
        kv_type: run.kv_type,
        threads: run.threads,
        out: &candidate_dump,
        prompt: text,
        ffn_act: run.options.ffn_act.unwrap_or(arch_act),
    };
    let reference = Dump::open(&reference_dump).map_err(CaptureError::from)?;
    let ran = cmd.run(&inputs, interrupt);
    let opened = ran.map_err(|f| f.to_string()).and_then(|()| {
        Dump::open(&candidate_dump).map_err(|e| {
            format!(
                "the candidate command exited 0 but its dump {} is not usable: {e}",
                candidate_dump.display()
            )
        })
    });
    let mapped = opened
        .as_ref()
        .map_err(String::clone)
        .and_then(|d| map_dump(d, run.map.as_ref()).map_err(|e| e.to_string()));
    let candidate = CandidateDump {
        stages: mapped.as_ref().map_err(String::clone),
        manifest: opened.as_ref().ok().and_then(|d| d.manifest.as_ref()),
        label: format!("--candidate-cmd {}", cmd.template),
    };
    let mut options = run.options.clone();
    options.model = Some(run.model.clone());
    options.worker_exe = Some(worker_exe.to_path_buf());
    let compared = compare_dumps(&reference, &candidate, &options)?;
    Ok(ExternalOutcome {
        compared,
        reference_dump,
        candidate_dump,
    })
}

/// Why an external run could not be judged at all.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    /// The reference's capture failed (or the request was bad input).
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The comparison could not be made.
    #[error(transparent)]
    Run(#[from] RunError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_substituted_inside_words_and_braces_escape() {
        let cmd = CandidateCommand::parse(
            "python3 eng.py --model={model} --tokens {tokens} --kv {kv} '{prompt}' {{x}} --act={ffn_act} --out {out}",
            Duration::from_secs(1),
        )
        .unwrap();
        let argv = cmd.argv(&CommandInputs {
            model: Path::new("/m.gguf"),
            tokens: &[1, 2, 3],
            steps: 4,
            kv_type: KvType::F32,
            threads: 2,
            out: Path::new("/d.safetensors"),
            prompt: Some("it's a \"prompt\"; rm -rf /"),
            ffn_act: FfnAct::Relu2,
        });
        assert_eq!(
            argv,
            [
                "python3",
                "eng.py",
                "--model=/m.gguf",
                "--tokens",
                "1,2,3",
                "--kv",
                "f32",
                "it's a \"prompt\"; rm -rf /",
                "{x}",
                "--act=relu2",
                "--out",
                "/d.safetensors"
            ]
        );
    }

    #[test]
    fn bad_templates_are_refused() {
        let t = Duration::from_secs(1);
        for (bad, why) in [
            ("", "empty"),
            ("eng {out} {modle}", "unknown placeholder {modle}"),
            ("eng --model {model}", "{out}"),
            ("eng {out", "unclosed"),
            ("eng } {out}", "lone"),
            ("eng 'unterminated {out}", "--candidate-cmd"),
        ] {
            let e = CandidateCommand::parse(bad, t).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(CandidateCommand::parse("eng {out}", Duration::ZERO).is_err());
    }

    #[test]
    fn a_failing_command_reports_its_status_and_stderr_tail() {
        let cmd = CandidateCommand::parse(
            "sh -c 'printf \"loading\\033[31m\\nboom\\n\" >&2; exit 3' {out}",
            Duration::from_secs(20),
        )
        .unwrap();
        let inputs = CommandInputs {
            model: Path::new("m"),
            tokens: &[1],
            steps: 0,
            kv_type: KvType::F16,
            threads: 1,
            out: Path::new("o"),
            prompt: None,
            ffn_act: FfnAct::Silu,
        };
        let f = cmd.run(&inputs, None).unwrap_err();
        assert_eq!(f.status, Some(3));
        assert!(f.message.contains("status 3"), "{f}");
        assert!(f.stderr_tail.contains("boom"), "{f:?}");
        assert!(
            !f.stderr_tail.contains('\u{1b}'),
            "escape codes are escaped: {f:?}"
        );

        let slow =
            CandidateCommand::parse("sh -c 'sleep 30' {out}", Duration::from_millis(300)).unwrap();
        let t0 = Instant::now();
        let f = slow.run(&inputs, None).unwrap_err();
        assert!(f.message.contains("timed out"), "{f}");
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the command was killed"
        );

        let missing =
            CandidateCommand::parse("/nonexistent/engine {out}", Duration::from_secs(5)).unwrap();
        let f = missing.run(&inputs, None).unwrap_err();
        assert!(f.message.contains("cannot start"), "{f}");
    }
}
