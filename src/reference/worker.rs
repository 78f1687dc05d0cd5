//! bitnet.cpp in a child process, so that its `abort()` is a report, not our
//! death.
//!
//! The child is the running executable started again with
//! [`WORKER_ENV`] set: in the `divergence` binary, in a user's binary that
//! links this library, and in a libtest harness alike, a constructor that
//! runs before `main` (`reference_worker_hook`) sees the variable and
//! serves instead of running the program. `DIVERGENCE_EXE` overrides the
//! executable (it must link this library: `divergence` does). The
//! parent writes one JSON request per line to its stdin; the child answers on
//! stdout with frames `[kind u8][json_len u32 LE][json][blob_len u64 LE][blob]`:
//! `N` a captured node (json [`Node`], blob its f32 data) streamed while the
//! graph runs, `R` the reply to a request (blob: logits for a decode), `E` an
//! error. Streaming nodes means that when the child dies, the parent knows the
//! last node it reached. The child's stderr is kept (last 8 KiB) for the
//! crash report.
//!
//! The child never outlives us, and never hangs us: it is started with
//! `PR_SET_PDEATHSIG` (the kernel kills it when the thread that started it
//! dies, even if it is stopped or busy in a graph), and while a request is
//! pending a watchdog looks at it in `/proc`: stopped (SIGSTOP, a
//! debugger's stop) for [`STOPPED_LIMIT`], or without a frame and without
//! using any CPU time for [`IDLE_LIMIT`], it is killed, and the request
//! fails as a crash that says why.

use super::session::{Context, ContextOptions, Model, VocabSpecials};
use super::{set_ffn_act, CaptureFilter, FfnAct, GraphNode, Node, RefError};
use crate::engine::tokenizer::chat::ChatMessage;
use serde::{Deserialize, Serialize};
use std::ffi::{c_char, c_int};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The hidden subcommand that runs [`serve`] in the `divergence` binary.
pub const WORKER_ARG: &str = "__reference-worker";
/// Set to `1` in a worker's environment: the executable serves the worker
/// protocol instead of running its `main`.
pub const WORKER_ENV: &str = "DIVERGENCE_REFERENCE_WORKER";
const STDERR_TAIL: usize = 8 * 1024;
/// How long the worker may be stopped with a request pending.
pub const STOPPED_LIMIT: Duration = Duration::from_secs(5);
/// How long it may go with a request pending and no frame, no CPU time
/// used and no disk wait: a deadlock, not a slow graph.
pub const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// An entry of the ELF `.init_array`: glibc calls each with the program's
/// `argc`, `argv` and `envp` before `main`.
type InitFn = extern "C" fn(c_int, *const *const c_char, *const *const c_char);

extern "C" {
    // The bounds of the executable's `.init_array`, which the linker
    // defines (GNU ld, gold, lld and mold all do).
    static __init_array_start: [InitFn; 0];
    static __init_array_end: [InitFn; 0];
}

/// The hook's entry in `.init_array`. A constructor crate cannot be used
/// here: the hook must know its own entry (below).
#[used]
#[link_section = ".init_array"]
static REFERENCE_WORKER_HOOK: InitFn = reference_worker_hook;

/// Before `main` of any executable that links this library: when started as
/// a reference worker ([`WORKER_ENV`]), serve and exit, so that a user's
/// binary or libtest harness is its own worker with nothing to install or
/// set.
///
/// bitnet.cpp's C++ globals (its architecture and tensor name tables) are
/// built by constructors of their own, which may come after this one in
/// `.init_array` (GNU ld places them after every prioritised entry, lld in
/// link order): the hook first runs every entry after its own, exactly as
/// glibc would have, then serves, and exits without returning, so none of
/// them runs twice.
extern "C" fn reference_worker_hook(
    argc: c_int,
    argv: *const *const c_char,
    envp: *const *const c_char,
) {
    if std::env::var_os(WORKER_ENV).is_none_or(|v| v != "1") {
        return;
    }
    // SAFETY: the linker defines both bounds around the executable's
    // `.init_array`, an array of valid constructor pointers (this hook's
    // among them), which is only read here; each later entry is called once,
    // with the arguments glibc passes, as glibc would have called it after
    // this one returned; this function never returns, so glibc calls none
    // of them again. Setting SIGPIPE's disposition to SIG_IGN, as Rust's
    // runtime does before `main`, has no preconditions.
    unsafe {
        let start = std::ptr::addr_of!(__init_array_start).cast::<InitFn>();
        let end = std::ptr::addr_of!(__init_array_end).cast::<InitFn>();
        let n = (end as usize).saturating_sub(start as usize) / std::mem::size_of::<InitFn>();
        let entries = std::slice::from_raw_parts(start, n);
        let me = reference_worker_hook as InitFn as usize;
        if let Some(i) = entries.iter().position(|&f| f as usize == me) {
            for &later in &entries[i + 1..] {
                later(argc, argv, envp);
            }
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    std::process::exit(serve());
}

#[derive(Serialize, Deserialize, Debug)]
enum Request {
    Load {
        model: PathBuf,
        ctx: ContextOptions,
        filter: CaptureFilter,
        /// The FFN activation forced on the bitnet graphs (none: each
        /// arch's own), set before the model loads.
        #[serde(default)]
        ffn_act: Option<FfnAct>,
    },
    /// Loads only a vocabulary (no context): for the tokenizer requests.
    LoadVocab {
        model: PathBuf,
    },
    Tokenize {
        text: String,
        add_special: bool,
        parse_special: bool,
    },
    Detokenize {
        ids: Vec<u32>,
    },
    Decode {
        tokens: Vec<u32>,
        pos0: usize,
    },
    SetFilter {
        filter: CaptureFilter,
    },
    ClearKv,
    Pieces {
        ids: Vec<u32>,
    },
    Specials,
    ApplyChatTemplate {
        template: Option<String>,
        messages: Vec<ChatMessage>,
        add_assistant: bool,
    },
}

#[derive(Serialize, Deserialize, Debug)]
enum Reply {
    Loaded {
        n_vocab: usize,
        description: String,
    },
    Tokens(Vec<u32>),
    Text(String),
    Decoded {
        n_tokens: usize,
        graph: Vec<GraphNode>,
    },
    Done,
    Pieces(Vec<Option<Vec<u8>>>),
    Specials(VocabSpecials),
}

// ---------------------------------------------------------------- child side

/// The worker's main loop: returns the process exit code.
pub fn serve() -> i32 {
    let stdin = std::io::stdin();
    let out = Arc::new(Mutex::new(std::io::BufWriter::new(std::io::stdout())));
    let mut ctx: Option<Context> = None;
    let mut vocab: Option<Model> = None;
    for line in stdin.lock().lines() {
        let Ok(line) = line else { return 0 };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => match tokenizer_request(&req, &ctx, &mut vocab) {
                Some(answer) => answer,
                None => handle(req, &mut ctx, &out),
            },
            Err(e) => Err(RefError::Worker(format!("bad request: {e}"))),
        };
        let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
        let written = match reply {
            Ok((reply, blob)) => write_frame(&mut *w, b'R', &reply, &blob),
            Err(e) => write_frame(&mut *w, b'E', &e.to_string(), &[]),
        };
        if written.and_then(|_| w.flush()).is_err() {
            return 0; // parent went away
        }
    }
    0
}

type Out = Arc<Mutex<std::io::BufWriter<std::io::Stdout>>>;

fn handle(
    req: Request,
    ctx: &mut Option<Context>,
    out: &Out,
) -> Result<(Reply, Vec<f32>), RefError> {
    match req {
        Request::Load {
            model,
            ctx: opts,
            filter,
            ffn_act,
        } => {
            *ctx = None;
            set_ffn_act(ffn_act);
            let m = Arc::new(Model::load(&model)?);
            let description = m.describe();
            let n_vocab = m.n_vocab();
            let mut c = Context::new(m, &opts, filter)?;
            let sink = Arc::clone(out);
            c.on_node(Box::new(move |node: &Node, data: &[f32]| {
                let mut w = sink.lock().unwrap_or_else(|p| p.into_inner());
                // Nodes are read once the graph has run; the reply flushes.
                let _ = write_frame(&mut *w, b'N', node, data);
            }));
            *ctx = Some(c);
            Ok((
                Reply::Loaded {
                    n_vocab,
                    description,
                },
                Vec::new(),
            ))
        }
        Request::Decode { tokens, pos0 } => {
            let decoded = loaded(ctx)?.decode(&tokens, pos0)?;
            Ok((
                Reply::Decoded {
                    n_tokens: tokens.len(),
                    graph: decoded.graph,
                },
                decoded.logits,
            ))
        }
        Request::SetFilter { filter } => {
            loaded(ctx)?.set_filter(filter)?;
            Ok((Reply::Done, Vec::new()))
        }
        Request::ClearKv => {
            loaded(ctx)?.clear_kv();
            Ok((Reply::Done, Vec::new()))
        }
        other => Err(RefError::Worker(format!("unhandled request {other:?}"))),
    }
}

type Answer = Result<(Reply, Vec<f32>), RefError>;

/// The requests that need only a vocabulary: answered with the loaded
/// model's, else with the vocab-only one; `None` for any other request.
fn tokenizer_request(
    req: &Request,
    ctx: &Option<Context>,
    vocab: &mut Option<Model>,
) -> Option<Answer> {
    let model = || -> Result<&Model, RefError> {
        ctx.as_ref()
            .map(Context::model)
            .or(vocab.as_ref())
            .ok_or_else(|| RefError::Worker("no model loaded".into()))
    };
    let answer = match req {
        Request::LoadVocab { model: path } => {
            *vocab = None;
            Model::load_vocab_only(path).map(|m| {
                let reply = Reply::Loaded {
                    n_vocab: m.n_vocab(),
                    description: m.describe(),
                };
                *vocab = Some(m);
                (reply, Vec::new())
            })
        }
        Request::Tokenize {
            text,
            add_special,
            parse_special,
        } => model()
            .and_then(|m| m.tokenize(text, *add_special, *parse_special))
            .map(|ids| (Reply::Tokens(ids), Vec::new())),
        Request::Detokenize { ids } => {
            model().map(|m| (Reply::Text(m.detokenize(ids)), Vec::new()))
        }
        Request::Pieces { ids } => model().map(|m| {
            let pieces = ids.iter().map(|&id| m.piece(id)).collect();
            (Reply::Pieces(pieces), Vec::new())
        }),
        Request::Specials => model().map(|m| (Reply::Specials(m.specials()), Vec::new())),
        Request::ApplyChatTemplate {
            template,
            messages,
            add_assistant,
        } => model()
            .and_then(|m| m.apply_chat_template(template.as_deref(), messages, *add_assistant))
            .map(|text| (Reply::Text(text), Vec::new())),
        _ => return None,
    };
    Some(answer)
}

/// The loaded context, or the error every request but `Load` gives without one.
fn loaded(ctx: &mut Option<Context>) -> Result<&mut Context, RefError> {
    ctx.as_mut()
        .ok_or_else(|| RefError::Worker("no model loaded".into()))
}

// Blobs travel as the f32s' own bytes: both ends are this binary on this
// (little-endian) machine.
#[cfg(target_endian = "big")]
compile_error!("the worker's frames carry f32 blobs in little-endian byte order");

fn write_frame<W: Write, T: Serialize>(
    w: &mut W,
    kind: u8,
    header: &T,
    blob: &[f32],
) -> std::io::Result<()> {
    let json = serde_json::to_vec(header).map_err(std::io::Error::other)?;
    let bytes: &[u8] = bytemuck::cast_slice(blob);
    w.write_all(&[kind])?;
    w.write_all(&(json.len() as u32).to_le_bytes())?;
    w.write_all(&json)?;
    w.write_all(&(bytes.len() as u64).to_le_bytes())?;
    w.write_all(bytes)
}

// --------------------------------------------------------------- parent side

/// One decode's results: logits [T, n_vocab], the captured nodes in order,
/// and every graph node's name and op.
pub type Decoded = (Vec<f32>, Vec<Node>, Vec<GraphNode>);

/// A reference running in a child process.
pub struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr_tail: Arc<Mutex<Vec<u8>>>,
    last_node: String,
    watch: Arc<Watch>,
    pub n_vocab: usize,
    pub description: String,
}

/// What the watchdog knows of the worker, shared with it.
#[derive(Default)]
struct Watch {
    /// A request is pending.
    busy: AtomicBool,
    /// Frames received so far.
    frames: AtomicU64,
    /// The `Worker` was dropped: the watchdog ends.
    gone: AtomicBool,
    /// Why the watchdog killed the worker.
    killed: Mutex<Option<String>>,
}

/// A process's state letter and CPU ticks (user + system), from `/proc`.
fn proc_state(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold anything, so split after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((state, ticks))
}

/// Watches `pid` while `watch.busy` (see the module docs); kills it and
/// records why when it is stopped or idle too long.
fn watchdog(pid: u32, watch: Arc<Watch>) {
    let tick = Duration::from_millis(200);
    let mut seen = (0u64, 0u64); // (frames, CPU ticks) at the last progress
    let mut progress_at = Instant::now();
    let mut stopped_since: Option<Instant> = None;
    while !watch.gone.load(Ordering::SeqCst) {
        std::thread::sleep(tick);
        let Some((state, ticks)) = proc_state(pid) else {
            return; // reaped
        };
        if !watch.busy.load(Ordering::SeqCst) || state == 'Z' {
            progress_at = Instant::now();
            stopped_since = None;
            continue;
        }
        let now = (watch.frames.load(Ordering::SeqCst), ticks);
        if now != seen || state == 'D' {
            seen = now;
            progress_at = Instant::now();
        }
        if matches!(state, 'T' | 't') {
            stopped_since.get_or_insert_with(Instant::now);
        } else {
            stopped_since = None;
        }
        let why = if stopped_since.is_some_and(|t| t.elapsed() >= STOPPED_LIMIT) {
            format!(
                "it was stopped (process state {state}) for {} s with a request pending",
                STOPPED_LIMIT.as_secs()
            )
        } else if progress_at.elapsed() >= IDLE_LIMIT {
            format!(
                "it answered nothing and used no CPU time for {} s with a request pending (state {state})",
                IDLE_LIMIT.as_secs()
            )
        } else {
            continue;
        };
        *watch.killed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        // SAFETY: kill(2) on our child, not yet reaped (the Worker reaps it
        // after the request fails; `gone` is set before it is dropped).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        return;
    }
}

/// The executable to start as the worker: `DIVERGENCE_EXE` when set, else
/// the running executable, which links this library and so serves when
/// started with [`WORKER_ENV`]: a constructor serves the worker protocol.
pub fn default_exe() -> Result<PathBuf, RefError> {
    if let Some(p) = std::env::var_os("DIVERGENCE_EXE") {
        return Ok(PathBuf::from(p));
    }
    std::env::current_exe().map_err(|e| {
        RefError::Worker(format!(
            "cannot locate the running executable to start the reference worker ({e}); set DIVERGENCE_EXE to the divergence binary"
        ))
    })
}

/// Reads `stream` to its end on a thread of its own, keeping its last
/// `limit` bytes (a child's stderr, for the report when it fails).
pub(crate) fn keep_tail(
    mut stream: impl Read + Send + 'static,
    limit: usize,
) -> (Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let tail = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&tail);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut t = sink.lock().unwrap_or_else(|p| p.into_inner());
            t.extend_from_slice(&buf[..n]);
            let excess = t.len().saturating_sub(limit);
            t.drain(..excess);
        }
    });
    (tail, reader)
}

impl Worker {
    /// Starts the worker and loads the model into it (the FFN activation
    /// as the model's arch defines it).
    pub fn start(
        exe: &Path,
        model: &Path,
        ctx: &ContextOptions,
        filter: CaptureFilter,
    ) -> Result<Worker, RefError> {
        Self::start_with(exe, model, ctx, filter, None)
    }

    /// [`Worker::start`] with an FFN activation forced on the bitnet arches'
    /// graphs (`None`: each arch's own).
    pub fn start_with(
        exe: &Path,
        model: &Path,
        ctx: &ContextOptions,
        filter: CaptureFilter,
        ffn_act: Option<FfnAct>,
    ) -> Result<Worker, RefError> {
        let mut w = Worker::spawn(exe)?;
        let model = std::fs::canonicalize(model).unwrap_or_else(|_| model.to_path_buf());
        match w.call(
            &Request::Load {
                model,
                ctx: ctx.clone(),
                filter,
                ffn_act,
            },
            &mut Vec::new(),
        )? {
            (
                Reply::Loaded {
                    n_vocab,
                    description,
                },
                _,
            ) => {
                w.n_vocab = n_vocab;
                w.description = description;
                Ok(w)
            }
            (other, _) => Err(RefError::Worker(format!("unexpected reply {other:?}"))),
        }
    }

    /// Starts the worker with only the vocabulary of `model` loaded
    /// (`vocab_only`): tokenizer requests work, decoding does not. A GGUF
    /// without tensors loads.
    pub fn start_vocab_only(exe: &Path, model: &Path) -> Result<Worker, RefError> {
        let mut w = Worker::spawn(exe)?;
        let model = std::fs::canonicalize(model).unwrap_or_else(|_| model.to_path_buf());
        match w.call(&Request::LoadVocab { model }, &mut Vec::new())? {
            (
                Reply::Loaded {
                    n_vocab,
                    description,
                },
                _,
            ) => {
                w.n_vocab = n_vocab;
                w.description = description;
                Ok(w)
            }
            (other, _) => Err(RefError::Worker(format!("unexpected reply {other:?}"))),
        }
    }

    fn spawn(exe: &Path) -> Result<Worker, RefError> {
        // The hook must be linked into whichever executable this is: a
        // use of it keeps its object file in the link.
        std::hint::black_box(&REFERENCE_WORKER_HOOK);
        // Its own process group: a terminal's Ctrl-C reaches only us, and we
        // decide how to stop (the worker exits when its stdin closes).
        let mut command = Command::new(exe);
        command
            .process_group(0)
            .env(WORKER_ENV, "1")
            .arg(WORKER_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let parent = std::process::id();
        // SAFETY: runs in the child between fork and exec, and calls only
        // async-signal-safe functions (prctl, getppid, _exit) on no memory
        // of ours. The death signal follows the thread that spawns the
        // worker: every caller keeps the Worker on its own thread.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the line above: nobody to serve.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| RefError::Worker(format!("starting {}: {e}", exe.display())))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(RefError::Worker("child pipes missing".into()));
        };
        widen_pipe(&stdout);
        let (tail, _reader) = keep_tail(stderr, STDERR_TAIL);
        let watch = Arc::new(Watch::default());
        {
            let (pid, watch) = (child.id(), Arc::clone(&watch));
            std::thread::spawn(move || watchdog(pid, watch));
        }
        Ok(Worker {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            stderr_tail: tail,
            last_node: "(none: it died before the first graph node)".into(),
            watch,
            n_vocab: 0,
            description: String::new(),
        })
    }

    /// `llama_tokenize(text, add_special, parse_special)` in the worker.
    pub fn tokenize(
        &mut self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, RefError> {
        match self.call(
            &Request::Tokenize {
                text: text.into(),
                add_special,
                parse_special,
            },
            &mut Vec::new(),
        )? {
            (Reply::Tokens(t), _) => Ok(t),
            (other, _) => Err(RefError::Worker(format!("unexpected reply {other:?}"))),
        }
    }

    /// [`Model::piece`] of each id in the worker.
    pub fn pieces(&mut self, ids: &[u32]) -> Result<Vec<Option<Vec<u8>>>, RefError> {
        match self.call(&Request::Pieces { ids: ids.to_vec() }, &mut Vec::new())? {
            (Reply::Pieces(p), _) => Ok(p),
            (other, _) => Err(RefError::Worker(format!("unexpected reply {other:?}"))),
        }
    }

    /// [`Model::specials`] in the worker.
    pub fn specials(&mut self) -> Result<VocabSpecials, RefError> {
        match self.call(&Request::Specials, &mut Vec::new())? {
            (Reply::Specials(s), _) => Ok(s),
            (other, _) => Err(RefError::Worker(format!("unexpected reply {other:?}"))),
        }
    }

    /// [`Model::apply_chat_template`] in the worker.
    pub fn apply_chat_template(
        &mut self,
        template: Option<&str>,
        messages: &[ChatMessage],
        add_assistant: bool,
    ) -> Result<String, RefError> {
        let req = Request::ApplyChatTemplate {
            template: template.map(str::to_owned),
            messages: messages.to_vec(),
            add_assistant,
        };
        match self.call(&req, &mut Vec::new())? {
            (Reply::Text(t), _) => Ok(t),
            (other, _) => Err(RefError::Worker(format!("unexpected reply {other:?}"))),
        }
    }

    pub fn detokenize(&mut self, ids: &[u32]) -> Result<String, RefError> {
        match self.call(&Request::Detokenize { ids: ids.to_vec() }, &mut Vec::new())? {
            (Reply::Text(t), _) => Ok(t),
            (other, _) => Err(RefError::Worker(format!("unexpected reply {other:?}"))),
        }
    }

    /// Decodes a batch: (logits [T, n_vocab], captured nodes in order,
    /// every graph node's name and op).
    pub fn decode(&mut self, tokens: &[u32], pos0: usize) -> Result<Decoded, RefError> {
        let mut nodes = Vec::new();
        match self.call(
            &Request::Decode {
                tokens: tokens.to_vec(),
                pos0,
            },
            &mut nodes,
        )? {
            (Reply::Decoded { graph, .. }, blob) => Ok((blob, nodes, graph)),
            (other, _) => Err(RefError::Worker(format!("unexpected reply {other:?}"))),
        }
    }

    /// The worker's peak resident set (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        peak_rss_of(&format!("/proc/{}/status", self.child.id()))
    }

    pub fn set_filter(&mut self, filter: CaptureFilter) -> Result<(), RefError> {
        self.call(&Request::SetFilter { filter }, &mut Vec::new())
            .map(|_| ())
    }

    pub fn clear_kv(&mut self) -> Result<(), RefError> {
        self.call(&Request::ClearKv, &mut Vec::new()).map(|_| ())
    }

    fn call(
        &mut self,
        req: &Request,
        nodes: &mut Vec<Node>,
    ) -> Result<(Reply, Vec<f32>), RefError> {
        self.watch.busy.store(true, Ordering::SeqCst);
        let result = self.exchange(req, nodes);
        self.watch.busy.store(false, Ordering::SeqCst);
        result
    }

    fn exchange(
        &mut self,
        req: &Request,
        nodes: &mut Vec<Node>,
    ) -> Result<(Reply, Vec<f32>), RefError> {
        let mut line = serde_json::to_vec(req).map_err(|e| RefError::Worker(e.to_string()))?;
        line.push(b'\n');
        if self
            .stdin
            .write_all(&line)
            .and_then(|_| self.stdin.flush())
            .is_err()
        {
            return Err(self.crashed());
        }
        loop {
            let Some((kind, json, blob)) = self.read_frame() else {
                return Err(self.crashed());
            };
            self.watch.frames.fetch_add(1, Ordering::SeqCst);
            match kind {
                b'N' => {
                    let mut node: Node = serde_json::from_slice(&json)
                        .map_err(|e| RefError::Worker(e.to_string()))?;
                    node.data = blob;
                    self.last_node = format!("{} [{}]", node.name, node.op);
                    nodes.push(node);
                }
                b'R' => {
                    let reply: Reply = serde_json::from_slice(&json)
                        .map_err(|e| RefError::Worker(e.to_string()))?;
                    return Ok((reply, blob));
                }
                b'E' => {
                    let msg: String =
                        serde_json::from_slice(&json).unwrap_or_else(|_| "unreadable error".into());
                    return Err(RefError::Worker(msg));
                }
                other => return Err(RefError::Worker(format!("unknown frame kind {other}"))),
            }
        }
    }

    fn read_frame(&mut self) -> Option<(u8, Vec<u8>, Vec<f32>)> {
        let mut kind = [0u8; 1];
        self.stdout.read_exact(&mut kind).ok()?;
        let mut len4 = [0u8; 4];
        self.stdout.read_exact(&mut len4).ok()?;
        let mut json = vec![0u8; u32::from_le_bytes(len4) as usize];
        self.stdout.read_exact(&mut json).ok()?;
        let mut len8 = [0u8; 8];
        self.stdout.read_exact(&mut len8).ok()?;
        let blob_len = usize::try_from(u64::from_le_bytes(len8)).ok()?;
        if blob_len % 4 != 0 {
            return None;
        }
        // Read straight into the floats' memory: the one copy out of the pipe.
        let mut blob = vec![0f32; blob_len / 4];
        self.stdout
            .read_exact(bytemuck::cast_slice_mut(&mut blob))
            .ok()?;
        Some((kind[0], json, blob))
    }

    /// The child is gone: collect how it died.
    fn crashed(&mut self) -> RefError {
        self.watch.busy.store(false, Ordering::SeqCst);
        self.watch.gone.store(true, Ordering::SeqCst);
        let status = self.child.wait();
        // Give the stderr thread a moment to drain the last bytes.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let signal = match status {
            Ok(s) => {
                use std::os::unix::process::ExitStatusExt;
                match (s.signal(), s.code()) {
                    (Some(sig), _) => format!("signal {sig} ({})", signal_name(sig)),
                    (None, Some(code)) => format!("exit code {code}"),
                    _ => "unknown status".into(),
                }
            }
            Err(e) => format!("unknown ({e})"),
        };
        let tail = self
            .stderr_tail
            .lock()
            .map(|t| String::from_utf8_lossy(&t).into_owned())
            .unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(6).collect();
        let killed = self
            .watch
            .killed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let signal = match killed {
            Some(why) => format!("{signal}, sent by divergence's watchdog: {why}"),
            None => signal,
        };
        RefError::Crashed {
            signal,
            last_node: self.last_node.clone(),
            stderr_tail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        }
    }
}

/// A step's captured tensors (230 MB for a 30-token prefill of the 2B-4T)
/// cross this pipe: with the default 64 KiB buffer the two processes take
/// turns thousands of times per step. Linux lets a pipe grow to
/// `/proc/sys/fs/pipe-max-size` (1 MiB by default); a refusal only costs speed.
fn widen_pipe(pipe: &ChildStdout) {
    use std::os::fd::AsRawFd;
    const WANT: libc::c_int = 1 << 20;
    // SAFETY: F_SETPIPE_SZ on a pipe fd we own; it reads no memory of ours.
    unsafe {
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, WANT);
    }
}

/// VmHWM from a /proc status file, in bytes.
pub fn peak_rss_of(status_path: &str) -> Option<u64> {
    crate::input::proc_kb_value(Path::new(status_path), "VmHWM")
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGABRT => "SIGABRT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGKILL => "SIGKILL",
        _ => "other",
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.watch.gone.store(true, Ordering::SeqCst);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
