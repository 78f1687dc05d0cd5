//! `divergence tokens`: the token ids of each input from bitnet.cpp's own
//! tokenizer (in the reference worker), from the candidate's, and from a
//! Hugging Face `tokenizer.json` through the `tokenizers` crate; where they
//! first differ, in words.
//!
//! Tokenized as llama-cli tokenizes a prompt (`common_tokenize(ctx, prompt,
//! add_special = true, parse_special = true)` in the pinned examples): BOS
//! (and EOS) as the vocabulary asks, special-token texts in the input are
//! those tokens. The `tokenizers` side uses `add_special_tokens = true`,
//! which adds what the tokenizer.json's post-processor names; it always
//! recognises its added tokens in text.
//!
//! With `--chat` the input is one user message, formatted by
//! `llama_chat_apply_template` on the reference side (the template
//! recognised by substrings, no BOS written) and by rendering the Jinja
//! template with minijinja on the candidate and tokenizer.json sides, as
//! Hugging Face engines do.

use super::{CliResult, Failure};
use divergence::compare::tokens::{first_difference, TokenDifference};
use divergence::engine::tokenizer::chat::{render_chat, ChatMessage};
use divergence::engine::tokenizer::Tokenizer;
use divergence::gguf::GgufFile;
use divergence::input::read_text;
use divergence::reference::worker::{default_exe, Worker};
use divergence::reference::RefError;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The largest `--inputs` file read.
const MAX_INPUTS_BYTES: u64 = 64 << 20;
/// The largest `--chat-template` file read (real ones are a few KB).
const MAX_CHAT_TEMPLATE_BYTES: u64 = 1 << 20;
/// The largest `--tokenizer-json` read (llama3's is 9 MB).
const MAX_TOKENIZER_JSON_BYTES: u64 = 256 << 20;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["text", "inputs"])))]
pub struct Args {
    /// The GGUF file (a vocabulary-only file works).
    #[arg(long)]
    model: PathBuf,
    /// One input text.
    #[arg(long)]
    text: Option<String>,
    /// A JSON array of strings, or a llama.cpp `.inp` file (cases separated
    /// by lines `__ggml_vocab_test__`).
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Also tokenize with this Hugging Face tokenizer.json.
    #[arg(long)]
    tokenizer_json: Option<PathBuf>,
    /// Format each input as one user message with the chat template.
    #[arg(long)]
    chat: bool,
    /// A file holding the chat template (Jinja) to use instead of the
    /// model's `tokenizer.chat_template`; with --chat.
    #[arg(long, requires = "chat", value_name = "FILE")]
    chat_template: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The flags both engines tokenize with (see the module doc).
const ADD_SPECIAL: bool = true;
const PARSE_SPECIAL: bool = true;

pub fn run(args: Args) -> CliResult {
    let file = GgufFile::open(&args.model)?;
    let inputs = match (&args.text, &args.inputs) {
        (Some(t), _) => vec![t.clone()],
        (None, Some(path)) => read_inputs(path)?,
        (None, None) => unreachable!("clap requires one of --text and --inputs"),
    };
    let candidate = Tokenizer::from_gguf(&file).map_err(|e| {
        anyhow::anyhow!(
            "the candidate cannot tokenize {}: {e}",
            args.model.display()
        )
    })?;
    let template = if args.chat {
        Some(match &args.chat_template {
            Some(path) => Template {
                text: read_text(path, MAX_CHAT_TEMPLATE_BYTES, "chat template")
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                from_file: false,
            },
            None => Template {
                text: Tokenizer::chat_template(&file)?.ok_or_else(|| {
                    anyhow::anyhow!(
                        "{} has no tokenizer.chat_template: pass --chat-template FILE",
                        args.model.display()
                    )
                })?,
                from_file: true,
            },
        })
    } else {
        None
    };
    let hf = match &args.tokenizer_json {
        Some(path) => {
            let text = read_text(path, MAX_TOKENIZER_JSON_BYTES, "tokenizer.json")
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let tok: tokenizers::Tokenizer = text.parse().map_err(|e| {
                anyhow::anyhow!("the tokenizers crate cannot load {}: {e}", path.display())
            })?;
            Some((tok, path.as_path()))
        }
        None => None,
    };
    let exe = default_exe().map_err(ref_failure)?;
    let mut reference = Worker::start_vocab_only(&exe, &args.model).map_err(ref_failure)?;

    let mut cases = Vec::with_capacity(inputs.len());
    for text in &inputs {
        cases.push(tokenize_case(
            text,
            &candidate,
            &mut reference,
            hf.as_ref().map(|(t, p)| (t, *p)),
            template.as_ref(),
        )?);
    }
    let differ = cases.iter().filter(|c| c.difference.is_some()).count();
    let summary = format!(
        "{} inputs: {} agree, {differ} differ (add_special = {ADD_SPECIAL}, parse_special = {PARSE_SPECIAL}{})",
        cases.len(),
        cases.len() - differ,
        if args.chat { ", chat" } else { "" }
    );
    if args.json {
        let out = json!({
            "model": args.model.display().to_string(),
            "add_special": ADD_SPECIAL,
            "parse_special": PARSE_SPECIAL,
            "chat": args.chat,
            "reference": reference.description,
            "candidate": candidate.describe(),
            "tokenizer_json": args.tokenizer_json.as_ref().map(|p| p.display().to_string()),
            "cases": cases.iter().map(Case::to_json).collect::<Vec<_>>(),
            "summary": { "inputs": cases.len(), "agree": cases.len() - differ, "differ": differ, "text": summary },
        });
        json_out!(&serde_json::to_string_pretty(&out)?);
        outln!();
    } else {
        outln!("reference:      bitnet.cpp ({})", reference.description);
        outln!("candidate:      {}", candidate.describe());
        if let Some(p) = &args.tokenizer_json {
            outln!("tokenizer.json: {}", p.display());
        }
        for (i, c) in cases.iter().enumerate() {
            c.print(i);
        }
        outln!("{summary}");
    }
    Ok(if differ == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

struct Template {
    text: String,
    /// The GGUF's own: the reference reads it itself (as llama-cli does).
    from_file: bool,
}

struct Case {
    text: String,
    /// The texts each side tokenized, when --chat formatted them.
    formatted: Option<(String, String)>,
    reference: Vec<u32>,
    candidate: Vec<u32>,
    tokenizer_json: Option<Vec<u32>>,
    difference: Option<TokenDifference>,
}

fn tokenize_case(
    text: &str,
    candidate: &Tokenizer,
    reference: &mut Worker,
    hf: Option<(&tokenizers::Tokenizer, &Path)>,
    template: Option<&Template>,
) -> Result<Case, Failure> {
    let (ref_text, cand_text, formatted) = match template {
        None => (text.to_string(), text.to_string(), None),
        Some(t) => {
            let messages = [ChatMessage::user(text)];
            let ref_text = reference
                .apply_chat_template((!t.from_file).then_some(t.text.as_str()), &messages, true)
                .map_err(|e| match e {
                    RefError::Input(_) => Failure::from(anyhow::Error::from(e)),
                    e => ref_failure(e),
                })?;
            let special_text = |id: Option<u32>| {
                id.and_then(|id| candidate.token_text(id))
                    .unwrap_or_default()
            };
            let cand_text = render_chat(
                &t.text,
                &messages,
                true,
                special_text(candidate.bos()),
                special_text(candidate.eos()),
            )?;
            (
                ref_text.clone(),
                cand_text.clone(),
                Some((ref_text, cand_text)),
            )
        }
    };
    let ref_ids = reference
        .tokenize(&ref_text, ADD_SPECIAL, PARSE_SPECIAL)
        .map_err(ref_failure)?;
    let cand_ids = candidate.encode(&cand_text, ADD_SPECIAL, PARSE_SPECIAL);
    let hf_ids = match hf {
        Some((hf, path)) => Some(hf_encode(hf, path, &cand_text)?),
        None => None,
    };

    let mut others: Vec<(&str, &[u32])> = vec![("candidate", &cand_ids)];
    if let Some(h) = &hf_ids {
        others.push(("tokenizer_json", h));
    }
    // Reference pieces from bitnet.cpp itself; the others from the
    // candidate's reading of the same vocabulary.
    let ref_pieces = reference.pieces(&ref_ids).map_err(ref_failure)?;
    let show = |side: &str, id: u32| -> String {
        let bytes = if side == "reference" {
            ref_ids
                .iter()
                .position(|&r| r == id)
                .and_then(|i| ref_pieces[i].clone())
        } else {
            None
        };
        let bytes = bytes.or_else(|| candidate.piece(id).map(<[u8]>::to_vec));
        String::from_utf8_lossy(&bytes.unwrap_or_default()).into_owned()
    };
    let difference = first_difference(("reference", &ref_ids), &others, candidate.bos(), &show);
    Ok(Case {
        text: text.to_string(),
        formatted,
        reference: ref_ids,
        candidate: cand_ids,
        tokenizer_json: hf_ids,
        difference,
    })
}

impl Case {
    fn to_json(&self) -> Value {
        let mut v = json!({
            "text": self.text,
            "reference": self.reference,
            "candidate": self.candidate,
            "equal": self.difference.is_none(),
        });
        if let Some(h) = &self.tokenizer_json {
            v["tokenizer_json"] = json!(h);
        }
        if let Some((r, c)) = &self.formatted {
            v["formatted"] = json!({ "reference": r, "candidate": c });
        }
        if let Some(d) = &self.difference {
            v["first_difference"] = json!({
                "position": d.position,
                "tokens": d.tokens.iter().map(|(side, t)| json!({ "side": side, "token": t })).collect::<Vec<_>>(),
                "before": d.before,
                "explanation": d.explanation,
            });
        }
        v
    }

    fn print(&self, index: usize) {
        outln!();
        outln!("input {}: {:?}", index + 1, self.text);
        if let Some((r, c)) = &self.formatted {
            outln!("  formatted (reference): {r:?}");
            if c != r {
                outln!("  formatted (candidate): {c:?}");
            }
        }
        outln!("  reference:      {:?}", self.reference);
        outln!("  candidate:      {:?}", self.candidate);
        if let Some(h) = &self.tokenizer_json {
            outln!("  tokenizer.json: {h:?}");
        }
        match &self.difference {
            None => outln!("  equal"),
            Some(d) => {
                let before: Vec<String> =
                    d.before.iter().map(|t| format!("{:?}", t.piece)).collect();
                outln!("  DIFFER {}", d.explanation);
                if !before.is_empty() {
                    outln!("  (after {})", before.join(" "));
                }
            }
        }
    }
}

/// The ids the Hugging Face tokenizer gives `text`. Its regex engine
/// (onig) panics when a pattern backtracks past its retry limit
/// (`(a+)+$`): that panic is the tokenizer.json's fault, so it is caught
/// and reported as an error naming the file, not printed as a crash.
fn hf_encode(hf: &tokenizers::Tokenizer, path: &Path, text: &str) -> Result<Vec<u32>, Failure> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        hf.encode(text, ADD_SPECIAL)
    }));
    std::panic::set_hook(hook);
    match result {
        Ok(Ok(encoding)) => Ok(encoding.get_ids().to_vec()),
        Ok(Err(e)) => Err(anyhow::anyhow!("{}: tokenizers: {e}", path.display()).into()),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            Err(anyhow::anyhow!(
                "{}: the tokenizers crate gave up on this input ({why}): one of its regexes backtracks past onig's limit",
                path.display()
            )
            .into())
        }
    }
}

/// A JSON array of strings, or a llama.cpp `.inp` file.
fn read_inputs(path: &Path) -> Result<Vec<String>, Failure> {
    let text = read_text(path, MAX_INPUTS_BYTES, "tokens input file")
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    const SEP: &str = "\n__ggml_vocab_test__\n";
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s),
                other => Err(anyhow::anyhow!(
                    "{}: element {i} is {other}, not a string",
                    path.display()
                )
                .into()),
            })
            .collect(),
        Ok(_) => Err(anyhow::anyhow!("{}: not a JSON array of strings", path.display()).into()),
        Err(_) if text.contains(SEP) => {
            // As test-tokenizer-0 reads it: the last case ends with the separator.
            let mut cases = Vec::new();
            let mut pos = 0;
            while pos < text.len() {
                match text[pos..].find(SEP) {
                    Some(at) => {
                        cases.push(text[pos..pos + at].to_string());
                        pos += at + SEP.len();
                    }
                    None => {
                        cases.push(text[pos..].to_string());
                        break;
                    }
                }
            }
            Ok(cases)
        }
        Err(e) => Err(anyhow::anyhow!(
            "{}: neither a JSON array of strings ({e}) nor a llama.cpp .inp file",
            path.display()
        )
        .into()),
    }
}

fn ref_failure(e: RefError) -> Failure {
    Failure {
        code: 3,
        error: e.into(),
    }
}
