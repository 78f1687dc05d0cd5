//! The in-process, safe face of bitnet.cpp: model, context, tokenizer,
//! decode with logits for every position, and the `cb_eval` capture.
//!
//! Everything here runs bitnet.cpp in *this* process, so a `GGML_ASSERT` in it
//! aborts us. The lockstep runner therefore uses it only inside the worker
//! child (`super::worker`); tests that want the kernels directly use it too.

use super::ffi;
use super::{CaptureFilter, GraphNode, KvType, Node, RefError};
use std::ffi::{c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Once;

static BACKEND: Once = Once::new();

fn backend_init() {
    BACKEND.call_once(|| {
        // SAFETY: called once per process before any other llama call; the
        // log callback is a plain extern "C" fn with no captured state.
        unsafe {
            ffi::llama_log_set(Some(log_callback), std::ptr::null_mut());
            ffi::llama_backend_init();
        }
    });
}

/// llama.cpp logs every tensor it loads; keep warnings and errors only
/// (level 2 = ERROR, 3 = WARN in ggml_log_level).
unsafe extern "C" fn log_callback(
    level: ffi::ggml_log_level::Type,
    text: *const std::os::raw::c_char,
    _: *mut c_void,
) {
    if (level == ffi::ggml_log_level::GGML_LOG_LEVEL_ERROR
        || level == ffi::ggml_log_level::GGML_LOG_LEVEL_WARN)
        && !text.is_null()
    {
        // SAFETY: ggml passes a NUL-terminated message that lives for the call.
        let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        eprint!("bitnet.cpp: {msg}");
    }
}

/// Forces the FFN activation of the graphs of arches `bitnet`,
/// `bitnet-b1.58` and `bitnet-25` for this whole process (`None`: each
/// arch's own; other arches are not affected). bitnet.cpp reads it when it
/// builds a graph, so set it before creating contexts. The worker calls it
/// from its `Load` request.
pub fn set_ffn_act(act: Option<super::FfnAct>) {
    // The codes of our patch 06's divergence_set_ffn_act.
    let code = match act {
        None => 0,
        Some(super::FfnAct::Silu) => 1,
        Some(super::FfnAct::Relu2) => 2,
    };
    // SAFETY: sets a plain global in our patched llama.cpp; no other state.
    unsafe { ffi::divergence_set_ffn_act(code) }
}

/// What a guarded call (`ffi/guard.h`) threw: `bitnet.cpp threw
/// std::out_of_range: _Map_base::at in llama_tokenize`.
fn threw(call: &str) -> String {
    // SAFETY: the guard returns a NUL-terminated string it owns (per
    // thread) and keeps until its next failing call on this thread.
    let what = unsafe { CStr::from_ptr(ffi::divergence_last_exception()) }.to_string_lossy();
    format!("bitnet.cpp threw {what} in {call}")
}

/// A loaded model. Dropping it frees the model.
pub struct Model {
    ptr: NonNull<ffi::llama_model>,
}

// SAFETY: a llama_model is immutable after load and llama.cpp shares it
// between contexts on different threads.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Model {
    /// Loads a GGUF the caller has already validated with `crate::gguf`
    /// (bitnet.cpp aborts on some malformed files instead of failing).
    pub fn load(path: &Path) -> Result<Model, RefError> {
        Model::load_with(path, false)
    }

    /// Loads only the vocabulary (`llama_model_params.vocab_only`), as
    /// llama.cpp's tokenizer tests do: a file without tensors, like the
    /// `ggml-vocab-*.gguf` files, loads. Tokenizing, detokenizing and chat
    /// templates work; no context can be made.
    pub fn load_vocab_only(path: &Path) -> Result<Model, RefError> {
        Model::load_with(path, true)
    }

    fn load_with(path: &Path, vocab_only: bool) -> Result<Model, RefError> {
        backend_init();
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| RefError::Load(format!("{}: path contains a NUL byte", path.display())))?;
        // SAFETY: default params are plain data; the path is NUL-terminated
        // and outlives the call; a null return means failure.
        let mut ptr = std::ptr::null_mut();
        let ok = unsafe {
            let mut params = ffi::llama_model_default_params();
            params.use_mmap = true;
            params.vocab_only = vocab_only;
            ffi::divergence_load_model_from_file(c_path.as_ptr(), params, &mut ptr)
        };
        if !ok {
            return Err(RefError::Load(threw("llama_load_model_from_file")));
        }
        NonNull::new(ptr)
            .map(|ptr| Model { ptr })
            .ok_or_else(|| RefError::Load(format!("bitnet.cpp could not load {}", path.display())))
    }

    pub fn n_vocab(&self) -> usize {
        // SAFETY: ptr is a live model.
        unsafe { ffi::llama_n_vocab(self.ptr.as_ptr()) as usize }
    }

    /// The model's own description string ("bitnet 700M I2_S - 2 bpw ternary", ...).
    pub fn describe(&self) -> String {
        let mut buf = vec![0u8; 256];
        // SAFETY: buf is writable for its length; llama writes a NUL-terminated string.
        let n =
            unsafe { ffi::llama_model_desc(self.ptr.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        buf.truncate(n.max(0) as usize);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Token ids as the reference's tokenizer makes them:
    /// `llama_tokenize(text, add_special, parse_special)`.
    pub fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, RefError> {
        let len =
            i32::try_from(text.len()).map_err(|_| RefError::Input("prompt too long".into()))?;
        let mut cap = text.len() + 8;
        loop {
            let mut out = vec![0i32; cap];
            let mut n = 0;
            // SAFETY: text is valid for text.len() bytes; out holds cap tokens.
            let ok = unsafe {
                ffi::divergence_tokenize(
                    self.ptr.as_ptr(),
                    text.as_ptr().cast(),
                    len,
                    out.as_mut_ptr(),
                    i32::try_from(cap).unwrap_or(i32::MAX),
                    add_special,
                    parse_special,
                    &mut n,
                )
            };
            if !ok {
                let mut why = threw("llama_tokenize");
                if let Some(cause) = self.missing_byte_token(text) {
                    why = format!("{why}: {cause}");
                }
                return Err(RefError::Threw(why));
            }
            if n >= 0 {
                out.truncate(n as usize);
                return Ok(out.into_iter().map(|t| t as u32).collect());
            }
            cap = n.unsigned_abs() as usize;
        }
    }

    /// Why SentencePiece's byte fallback throws on `text`, if a byte
    /// token is missing: the first character that is no token of its own
    /// and has a byte with neither a `<0xXX>` token nor a token of the
    /// byte itself (`llama_byte_to_token_impl` looks up both, the second
    /// with `.at()`).
    fn missing_byte_token(&self, text: &str) -> Option<String> {
        let n_vocab = i32::try_from(self.n_vocab()).ok()?;
        let tokens: std::collections::HashSet<Vec<u8>> = (0..n_vocab)
            .map(|id| {
                // SAFETY: id < n_vocab indexes the model's token table; the
                // text is NUL-terminated and owned by the model.
                let p = unsafe { ffi::llama_token_get_text(self.ptr.as_ptr(), id) };
                if p.is_null() {
                    Vec::new()
                } else {
                    // SAFETY: as above.
                    unsafe { CStr::from_ptr(p) }.to_bytes().to_vec()
                }
            })
            .collect();
        text.chars().find_map(|c| {
            let mut buf = [0u8; 4];
            let s = c.encode_utf8(&mut buf);
            if c == ' ' || tokens.contains(s.as_bytes()) {
                return None;
            }
            s.bytes().find_map(|b| {
                let hex = format!("<0x{b:02X}>");
                (!tokens.contains(hex.as_bytes()) && !tokens.contains(&[b][..])).then(|| {
                    format!("the vocabulary has no byte token for {hex} (byte fallback for {c:?})")
                })
            })
        })
    }

    /// Text of token ids as `llama_detokenize(ids, remove_special = false,
    /// unparse_special = false)` renders it. Ids outside the vocabulary are
    /// dropped first: `llama_token_to_piece` indexes its token table
    /// unchecked (found under ASan, docs/asan.md).
    pub fn detokenize(&self, ids: &[u32]) -> String {
        let n_vocab = self.n_vocab();
        let ids: Vec<i32> = ids
            .iter()
            .filter(|&&id| (id as usize) < n_vocab)
            .map(|&id| id as i32)
            .collect();
        let Ok(n_ids) = i32::try_from(ids.len()) else {
            return String::new();
        };
        let mut buf = vec![0u8; 64 + 16 * ids.len()];
        // A text longer than the buffer comes back as its negated length:
        // grow once and ask again.
        for _ in 0..2 {
            // SAFETY: ids holds n_ids valid token ids (< n_vocab); buf is
            // writable for its length.
            let mut n = 0;
            let ok = unsafe {
                ffi::divergence_detokenize(
                    self.ptr.as_ptr(),
                    ids.as_ptr(),
                    n_ids,
                    buf.as_mut_ptr().cast(),
                    i32::try_from(buf.len()).unwrap_or(i32::MAX),
                    false,
                    false,
                    &mut n,
                )
            };
            if !ok {
                return String::new();
            }
            match usize::try_from(n) {
                Ok(len) => return String::from_utf8_lossy(&buf[..len.min(buf.len())]).into_owned(),
                Err(_) => buf.resize(n.unsigned_abs() as usize, 0),
            }
        }
        String::new()
    }

    /// The bytes of one token, special tokens as their text:
    /// `llama_token_to_piece(id, lstrip = 0, special = true)`; `None` outside
    /// the vocabulary.
    pub fn piece(&self, id: u32) -> Option<Vec<u8>> {
        if id as usize >= self.n_vocab() {
            return None;
        }
        let mut buf = vec![0u8; 64];
        for _ in 0..2 {
            // SAFETY: buf is writable for its length; id < n_vocab <= i32::MAX,
            // so it is a valid index into the model's token table.
            let mut n = 0;
            let ok = unsafe {
                ffi::divergence_token_to_piece(
                    self.ptr.as_ptr(),
                    id as i32,
                    buf.as_mut_ptr().cast(),
                    i32::try_from(buf.len()).unwrap_or(i32::MAX),
                    0,
                    true,
                    &mut n,
                )
            };
            if !ok {
                return None;
            }
            match usize::try_from(n) {
                Ok(len) => {
                    buf.truncate(len);
                    return Some(buf);
                }
                Err(_) => buf.resize(n.unsigned_abs() as usize, 0),
            }
        }
        None
    }

    /// What the vocabulary says about specials: `llama_token_bos`,
    /// `llama_token_eos` (`None` for -1), `llama_add_bos_token`,
    /// `llama_add_eos_token`.
    pub fn specials(&self) -> VocabSpecials {
        let id = |t: i32| u32::try_from(t).ok();
        // SAFETY: ptr is a live model; these read plain fields.
        unsafe {
            VocabSpecials {
                bos: id(ffi::llama_token_bos(self.ptr.as_ptr())),
                eos: id(ffi::llama_token_eos(self.ptr.as_ptr())),
                add_bos: ffi::llama_add_bos_token(self.ptr.as_ptr()),
                add_eos: ffi::llama_add_eos_token(self.ptr.as_ptr()),
            }
        }
    }

    /// `messages` formatted by `llama_chat_apply_template`: `template` is a
    /// template text (or a name such as "llama3"), `None` the model's own
    /// `tokenizer.chat_template` (of which llama.cpp reads at most 2047
    /// bytes; none at all means "chatml"). The template is recognised by
    /// substrings, not rendered, and no BOS is written.
    pub fn apply_chat_template(
        &self,
        template: Option<&str>,
        messages: &[crate::engine::tokenizer::chat::ChatMessage],
        add_assistant: bool,
    ) -> Result<String, RefError> {
        let nul = |what: &str| RefError::Input(format!("{what} contains a NUL byte"));
        let template = template
            .map(|t| CString::new(t).map_err(|_| nul("the chat template")))
            .transpose()?;
        let mut strings = Vec::with_capacity(messages.len());
        for m in messages {
            strings.push((
                CString::new(m.role.as_str()).map_err(|_| nul("a chat role"))?,
                CString::new(m.content.as_str()).map_err(|_| nul("a chat message"))?,
            ));
        }
        let chat: Vec<ffi::llama_chat_message> = strings
            .iter()
            .map(|(role, content)| ffi::llama_chat_message {
                role: role.as_ptr(),
                content: content.as_ptr(),
            })
            .collect();
        let mut buf = vec![0u8; 1024 + 2 * messages.iter().map(|m| m.content.len()).sum::<usize>()];
        for _ in 0..2 {
            // SAFETY: every pointer in chat points into a CString of
            // `strings`, alive for the call; template is NUL-terminated or
            // null; buf is writable for its length.
            let mut n = 0;
            let ok = unsafe {
                ffi::divergence_chat_apply_template(
                    self.ptr.as_ptr(),
                    template.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()),
                    chat.as_ptr(),
                    chat.len(),
                    add_assistant,
                    buf.as_mut_ptr().cast(),
                    i32::try_from(buf.len()).unwrap_or(i32::MAX),
                    &mut n,
                )
            };
            if !ok {
                return Err(RefError::Threw(threw("llama_chat_apply_template")));
            }
            let Ok(len) = usize::try_from(n) else {
                return Err(RefError::Input(
                    "llama_chat_apply_template does not recognise this chat template".into(),
                ));
            };
            if len <= buf.len() {
                buf.truncate(len);
                return String::from_utf8(buf)
                    .map_err(|_| RefError::Input("the formatted chat is not UTF-8".into()));
            }
            // The whole text did not fit: it was cut at the buffer's end.
            buf.resize(len + 1, 0);
        }
        Err(RefError::Input("the formatted chat kept growing".into()))
    }
}

/// The vocabulary's special ids and flags as bitnet.cpp loaded them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VocabSpecials {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: we own the model; contexts hold an Arc to it, so none is alive.
        unsafe { ffi::llama_free_model(self.ptr.as_ptr()) }
    }
}

/// How to build a context.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ContextOptions {
    pub threads: usize,
    pub kv_type: KvType,
    pub n_ctx: usize,
    pub n_batch: usize,
}

/// Receives each captured node (its `data` left empty) with its values,
/// which may be a view of bitnet.cpp's own buffer, valid during the call.
pub type NodeCallback = Box<dyn FnMut(&Node, &[f32])>;

/// What the `cb_eval` callback writes into: owned by the context, boxed so its
/// address stays fixed while bitnet.cpp holds a pointer to it.
struct CaptureState {
    filter: CaptureFilter,
    /// Captured nodes, unless `on_node` takes them.
    nodes: Vec<Node>,
    /// Called with each node as it is captured (the worker streams them so
    /// that a crash still leaves the last stage reached); the node is then
    /// not kept, so a full-size step's activations are never held twice.
    on_node: Option<NodeCallback>,
    /// Every node asked about in the current decode, captured or not.
    graph: Vec<GraphNode>,
    /// The tensors of the current decode to capture, in graph order: read
    /// after llama_decode returns (they are graph outputs, see
    /// [`keep_tensors`]), so the graph runs in one piece.
    pending: Vec<*mut ffi::ggml_tensor>,
    panicked: bool,
}

/// Tells bitnet.cpp's graph builder which tensors to keep as graph outputs
/// (vendor/patches/05-keep-captured-tensors.patch): the base names of
/// `filter`, every named tensor when it restricts by pattern only, none when
/// it is off. Applies to graphs built from now on.
fn keep_tensors(filter: &CaptureFilter) -> Result<(), RefError> {
    let (names, all): (&[String], bool) = if filter.off {
        (&[], false)
    } else if filter.base_names.is_empty() {
        (&[], true)
    } else {
        (&filter.base_names, false)
    };
    let c_names = names
        .iter()
        .map(|n| CString::new(n.as_str()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| RefError::Input("a capture name contains a NUL byte".into()))?;
    let ptrs: Vec<*const std::os::raw::c_char> = c_names.iter().map(|c| c.as_ptr()).collect();
    let n =
        i32::try_from(ptrs.len()).map_err(|_| RefError::Input("too many capture names".into()))?;
    // SAFETY: `ptrs` holds `n` NUL-terminated strings that live through the
    // call; the function copies them.
    unsafe { ffi::divergence_keep_tensors(ptrs.as_ptr(), n, i32::from(all)) };
    Ok(())
}

/// A decoding context with its KV cache. Dropping it frees the context.
pub struct Context {
    ptr: NonNull<ffi::llama_context>,
    model: std::sync::Arc<Model>,
    capture: Box<CaptureState>,
    n_vocab: usize,
}

/// The result of one decode call.
pub struct Decoded {
    /// Row-major [T, n_vocab].
    pub logits: Vec<f32>,
    /// Every captured graph node, in callback order (none when a node
    /// callback streams them).
    pub nodes: Vec<Node>,
    /// Every node of the graph (name and op), in order.
    pub graph: Vec<GraphNode>,
}

impl Context {
    pub fn new(
        model: std::sync::Arc<Model>,
        opts: &ContextOptions,
        filter: CaptureFilter,
    ) -> Result<Context, RefError> {
        keep_tensors(&filter)?;
        let mut capture = Box::new(CaptureState {
            filter,
            nodes: Vec::new(),
            on_node: None,
            graph: Vec::new(),
            pending: Vec::new(),
            panicked: false,
        });
        let threads = i32::try_from(opts.threads.max(1))
            .map_err(|_| RefError::Input("thread count".into()))?;
        let kv = match opts.kv_type {
            KvType::F16 => ffi::ggml_type::GGML_TYPE_F16,
            KvType::F32 => ffi::ggml_type::GGML_TYPE_F32,
        };
        // SAFETY: params are plain data; the capture box outlives the context
        // (dropped after llama_free in Drop); the callback never unwinds.
        let ptr = unsafe {
            let mut p = ffi::llama_context_default_params();
            p.n_ctx = opts.n_ctx as u32;
            p.n_batch = opts.n_batch as u32;
            p.n_ubatch = opts.n_batch as u32;
            p.n_seq_max = 1;
            p.n_threads = threads;
            p.n_threads_batch = threads;
            p.type_k = kv;
            p.type_v = kv;
            p.flash_attn = false;
            p.no_perf = true;
            p.cb_eval = Some(eval_callback);
            p.cb_eval_user_data = (&mut *capture as *mut CaptureState).cast();
            let mut ptr = std::ptr::null_mut();
            if !ffi::divergence_new_context_with_model(model.ptr.as_ptr(), p, &mut ptr) {
                return Err(RefError::Load(threw("llama_new_context_with_model")));
            }
            ptr
        };
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| RefError::Load("bitnet.cpp could not create a context".into()))?;
        let n_vocab = model.n_vocab();
        Ok(Context {
            ptr,
            model,
            capture,
            n_vocab,
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Streams every captured node to `f` as it is captured; `decode` then
    /// returns no nodes.
    pub fn on_node(&mut self, f: NodeCallback) {
        self.capture.on_node = Some(f);
    }

    pub fn set_filter(&mut self, filter: CaptureFilter) -> Result<(), RefError> {
        keep_tensors(&filter)?;
        self.capture.filter = filter;
        Ok(())
    }

    /// Empties the KV cache.
    pub fn clear_kv(&mut self) {
        // SAFETY: live context.
        unsafe { ffi::llama_kv_cache_clear(self.ptr.as_ptr()) }
    }

    /// Decodes `tokens` at positions `pos0..`, with logits for every position.
    pub fn decode(&mut self, tokens: &[u32], pos0: usize) -> Result<Decoded, RefError> {
        let n = tokens.len();
        if n == 0 {
            return Err(RefError::Input("decode of an empty batch".into()));
        }
        let n_i32 = i32::try_from(n).map_err(|_| RefError::Input("batch too large".into()))?;
        self.capture.nodes.clear();
        self.capture.graph.clear();
        self.capture.pending.clear();
        self.capture.panicked = false;
        // SAFETY: llama_batch_init allocates arrays of n entries (one seq id
        // each) that we fill within bounds and free below.
        let rc = unsafe {
            let batch = ffi::llama_batch_init(n_i32, 0, 1);
            for (i, &t) in tokens.iter().enumerate() {
                *batch.token.add(i) = t as i32;
                *batch.pos.add(i) = (pos0 + i) as i32;
                *batch.n_seq_id.add(i) = 1;
                *(*batch.seq_id.add(i)) = 0;
                *batch.logits.add(i) = 1;
            }
            let mut b = batch;
            b.n_tokens = n_i32;
            let mut rc = 0;
            let ok = ffi::divergence_decode(self.ptr.as_ptr(), b, &mut rc);
            ffi::llama_batch_free(batch);
            ok.then_some(rc)
        };
        let Some(rc) = rc else {
            return Err(RefError::Threw(threw("llama_decode")));
        };
        if self.capture.panicked {
            return Err(RefError::Capture("the capture callback panicked".into()));
        }
        if rc != 0 {
            return Err(RefError::Decode(format!("llama_decode returned {rc}")));
        }
        // The captured tensors, now that the whole graph has run.
        for t in std::mem::take(&mut self.capture.pending) {
            // SAFETY: the tensor belongs to the graph llama_decode just built
            // and ran; llama.cpp reuses that graph's memory only when it
            // builds the next one, and as a graph output (checked here) its
            // data was never overwritten by a later node.
            let tensor = unsafe { &*t };
            let name = tensor_name(tensor);
            if tensor.flags & ffi::ggml_tensor_flag::GGML_TENSOR_FLAG_OUTPUT as i32 == 0 {
                return Err(RefError::Capture(format!(
                    "tensor {name} is not kept as a graph output: this bitnet.cpp lacks vendor/patches/05-keep-captured-tensors.patch"
                )));
            }
            match self.capture.on_node.as_mut() {
                Some(f) => {
                    // SAFETY: as above; its data lives on the CPU, and the
                    // view is used only during the call.
                    let view = unsafe { f32_view(tensor) };
                    match view {
                        Some(data) => f(&node_header(tensor, name), data),
                        None => {
                            // SAFETY: as above.
                            let mut node = unsafe { read_node(tensor, name) };
                            let data = std::mem::take(&mut node.data);
                            f(&node, &data);
                        }
                    }
                }
                None => {
                    // SAFETY: as above; its data lives on the CPU.
                    let node = unsafe { read_node(tensor, name) };
                    self.capture.nodes.push(node)
                }
            }
        }
        let mut logits = Vec::with_capacity(n * self.n_vocab);
        for i in 0..n {
            // SAFETY: logits were requested for every position; each row has n_vocab floats.
            let row = unsafe { ffi::llama_get_logits_ith(self.ptr.as_ptr(), i as i32) };
            if row.is_null() {
                return Err(RefError::Decode(format!("no logits for position {i}")));
            }
            // SAFETY: see above.
            logits.extend_from_slice(unsafe { std::slice::from_raw_parts(row, self.n_vocab) });
        }
        Ok(Decoded {
            logits,
            nodes: std::mem::take(&mut self.capture.nodes),
            graph: std::mem::take(&mut self.capture.graph),
        })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: we own the context; the capture box is dropped after this.
        unsafe { ffi::llama_free(self.ptr.as_ptr()) }
    }
}

/// `cb_eval`: asked once per node whether we want it (`ask`), then called
/// with the computed node. Never unwinds into C.
unsafe extern "C" fn eval_callback(t: *mut ffi::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    let result = catch_unwind(AssertUnwindSafe(|| {
        if t.is_null() || user.is_null() {
            return true;
        }
        // SAFETY: user is the CaptureState box of a live context, and the
        // callback runs on the thread that called llama_decode.
        let state = unsafe { &mut *(user as *mut CaptureState) };
        // SAFETY: ggml hands us a live tensor for the duration of the call.
        let tensor = unsafe { &*t };
        let name = tensor_name(tensor);
        if ask {
            // SAFETY: op names are static strings in ggml.
            let op = unsafe { CStr::from_ptr(ffi::ggml_op_name(tensor.op)) }
                .to_string_lossy()
                .into_owned();
            // Restricted to base names, every wanted tensor must have been
            // kept (decode checks it: a bitnet.cpp without patch 05 is named).
            // Capturing "everything", the tensors kept are the ones the graph
            // builder named: the views ggml names itself ("Qcur-0 (reshaped)")
            // share another tensor's memory and are listed in the graph only.
            let kept = tensor.flags & ffi::ggml_tensor_flag::GGML_TENSOR_FLAG_OUTPUT as i32 != 0;
            if state.filter.wants(&name) && (kept || !state.filter.base_names.is_empty()) {
                state.pending.push(t);
            }
            state.graph.push(GraphNode { name, op });
            // Never ask for a node: the graph then runs in one piece, and
            // the wanted tensors (graph outputs) are read after it.
            return false;
        }
        true
    }));
    match result {
        Ok(v) => v,
        Err(_) => {
            // SAFETY: as above; we only set a flag.
            if let Some(state) = unsafe { (user as *mut CaptureState).as_mut() } {
                state.panicked = true;
            }
            true
        }
    }
}

fn tensor_name(t: &ffi::ggml_tensor) -> String {
    let bytes: Vec<u8> = t
        .name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A contiguous, aligned F32 tensor's values in place (no copy); `None` for
/// any other tensor.
///
/// # Safety
/// `t.data` must point to the node's computed data on the CPU, and stay
/// valid while the returned slice is used.
unsafe fn f32_view(t: &ffi::ggml_tensor) -> Option<&[f32]> {
    // SAFETY: a live tensor; ggml_is_contiguous only reads its shape.
    let contiguous = unsafe { ffi::ggml_is_contiguous(t) };
    let ptr = t.data as *const f32;
    if t.type_ != ffi::ggml_type::GGML_TYPE_F32 || !contiguous || ptr.is_null() || !ptr.is_aligned()
    {
        return None;
    }
    let count: usize = t.ne.iter().map(|&v| v.max(0) as usize).product();
    // SAFETY: a contiguous F32 tensor holds `count` floats from its aligned
    // data pointer, valid as the caller promises.
    Some(unsafe { std::slice::from_raw_parts(ptr, count) })
}

/// A node's name, op, type and shape, without its data.
fn node_header(t: &ffi::ggml_tensor, name: String) -> Node {
    // SAFETY: op and type names are static strings in ggml.
    let (op, ty) = unsafe {
        (
            CStr::from_ptr(ffi::ggml_op_name(t.op))
                .to_string_lossy()
                .into_owned(),
            CStr::from_ptr(ffi::ggml_type_name(t.type_))
                .to_string_lossy()
                .into_owned(),
        )
    };
    let layer = super::split_layer(&name).1;
    Node {
        name,
        op,
        ty,
        ne: t.ne.map(|v| v.max(0) as usize),
        nb: t.nb,
        layer,
        data: Vec::new(),
    }
}

/// Copies a node's data to contiguous f32, whatever its strides.
///
/// # Safety
/// `t.data` must point to the node's computed data on the CPU.
unsafe fn read_node(t: &ffi::ggml_tensor, name: String) -> Node {
    // SAFETY: op names are static strings in ggml.
    let op = unsafe { CStr::from_ptr(ffi::ggml_op_name(t.op)) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: as above.
    let ty = unsafe { CStr::from_ptr(ffi::ggml_type_name(t.type_)) }
        .to_string_lossy()
        .into_owned();
    let ne: [usize; 4] = t.ne.map(|v| v.max(0) as usize);
    let nb = t.nb;
    let count = ne.iter().product::<usize>();
    let mut data = Vec::with_capacity(count);
    let base = t.data as *const u8;
    // SAFETY: a live tensor; ggml_is_contiguous only reads its shape.
    let contiguous = unsafe { ffi::ggml_is_contiguous(t) };
    if !base.is_null() && contiguous && t.type_ == ffi::ggml_type::GGML_TYPE_F32 {
        data.resize(count, 0f32);
        // SAFETY: a contiguous F32 tensor holds `count` floats from `base`;
        // copied bytewise, so no alignment is assumed.
        unsafe { std::ptr::copy_nonoverlapping(base, data.as_mut_ptr().cast::<u8>(), count * 4) };
    } else if !base.is_null() && contiguous && t.type_ == ffi::ggml_type::GGML_TYPE_F16 {
        let mut halves = vec![half::f16::ZERO; count];
        // SAFETY: a contiguous F16 tensor holds `count` halves from `base`.
        unsafe { std::ptr::copy_nonoverlapping(base, halves.as_mut_ptr().cast::<u8>(), count * 2) };
        data.resize(count, 0f32);
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(&halves[..], &mut data);
    } else if !base.is_null() {
        for i3 in 0..ne[3] {
            for i2 in 0..ne[2] {
                for i1 in 0..ne[1] {
                    for i0 in 0..ne[0] {
                        let off = i0 * nb[0] + i1 * nb[1] + i2 * nb[2] + i3 * nb[3];
                        // SAFETY: off is inside the tensor's view by its own ne/nb.
                        let v = unsafe {
                            match t.type_ {
                                ffi::ggml_type::GGML_TYPE_F32 => {
                                    (base.add(off) as *const f32).read_unaligned()
                                }
                                ffi::ggml_type::GGML_TYPE_F16 => half::f16::from_bits(
                                    (base.add(off) as *const u16).read_unaligned(),
                                )
                                .to_f32(),
                                ffi::ggml_type::GGML_TYPE_I32 => {
                                    (base.add(off) as *const i32).read_unaligned() as f32
                                }
                                ffi::ggml_type::GGML_TYPE_I8 => {
                                    *(base.add(off) as *const i8) as f32
                                }
                                _ => f32::NAN,
                            }
                        };
                        data.push(v);
                    }
                }
            }
        }
    }
    let layer = super::split_layer(&name).1;
    Node {
        name,
        op,
        ty,
        ne,
        nb,
        layer,
        data,
    }
}
