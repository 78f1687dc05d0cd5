//! Reading a prompt corpus: one prompt per line, or JSONL.
//!
//! A file whose name ends in `.jsonl` (or `.json`) holds one JSON object per
//! line: `{"prompt": "text"}` or `{"tokens": [1, 2, 3]}`, with an optional
//! `"tag"` naming the kind of prompt (`question`, `code`, ...). Any other
//! file is plain text, one prompt per line, taken as it is (a line that
//! starts with `{` or `#` is a prompt too: code is a fair prompt). Blank
//! lines are skipped in both forms, and a prompt's index counts only the
//! prompts, in file order: it is what `--shard` selects on.

use crate::lockstep::Prompt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

/// The largest prompt corpus read (`sweep --prompts`).
pub const MAX_CORPUS_BYTES: u64 = 64 << 20;

/// One prompt of a corpus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CorpusPrompt {
    /// Index among the corpus's prompts (0-based, file order).
    pub index: usize,
    /// The line it was read from (1-based).
    pub line: usize,
    /// The kind of prompt, if the corpus says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Text or token ids.
    pub prompt: Prompt,
}

/// A corpus as read.
#[derive(Clone, Debug, PartialEq)]
pub struct Corpus {
    /// The prompts, in file order.
    pub prompts: Vec<CorpusPrompt>,
    /// sha256 of the file's bytes, hex: shards of one sweep must agree on it.
    pub sha256: String,
}

/// Why a corpus could not be read: always the user's input.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// The corpus file at the path could not be read.
    #[error("{path}: {error}", path = .0.display(), error = .1)]
    Io(std::path::PathBuf, std::io::Error),
    /// A line (1-based) is not a prompt: not UTF-8, not a valid JSONL
    /// object, or an empty or doubly given prompt; the message says which.
    #[error("{path}:{line}: {message}", path = .0.display(), line = .1, message = .2)]
    Line(std::path::PathBuf, usize, String),
    /// The file holds no prompt: every line is blank.
    #[error("{path}: no prompts (every line is blank)", path = .0.display())]
    Empty(std::path::PathBuf),
}

/// A JSONL line: exactly one of `prompt` and `tokens`, and an optional tag.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    prompt: Option<String>,
    tokens: Option<Vec<u32>>,
    tag: Option<String>,
}

impl Corpus {
    /// Reads `path` (see the module docs for the two forms).
    pub fn read(path: &Path) -> Result<Corpus, CorpusError> {
        let bytes = crate::input::read_bytes(path, MAX_CORPUS_BYTES, "prompt corpus")
            .map_err(|e| CorpusError::Io(path.to_path_buf(), e))?;
        let text = String::from_utf8(bytes.clone()).map_err(|e| {
            let line = bytes[..e.utf8_error().valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            CorpusError::Line(path.to_path_buf(), line, "not valid UTF-8".into())
        })?;
        let jsonl = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"));
        let mut prompts = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let bad = |m: String| CorpusError::Line(path.to_path_buf(), line, m);
            if raw.trim().is_empty() {
                continue;
            }
            let (prompt, tag) = if jsonl {
                let j: JsonLine = serde_json::from_str(raw).map_err(|e| {
                    bad(format!(
                        "not a JSON object with \"prompt\" or \"tokens\": {e}"
                    ))
                })?;
                let prompt = match (j.prompt, j.tokens) {
                    (Some(p), None) if p.is_empty() => {
                        return Err(bad("\"prompt\" is empty".into()))
                    }
                    (Some(p), None) => Prompt::Text(p),
                    (None, Some(t)) if t.is_empty() => {
                        return Err(bad("\"tokens\" is empty".into()))
                    }
                    (None, Some(t)) => Prompt::Tokens(t),
                    (Some(_), Some(_)) => {
                        return Err(bad("give \"prompt\" or \"tokens\", not both".into()))
                    }
                    (None, None) => return Err(bad("needs \"prompt\" or \"tokens\"".into())),
                };
                (prompt, j.tag)
            } else {
                (Prompt::Text(raw.to_string()), None)
            };
            prompts.push(CorpusPrompt {
                index: prompts.len(),
                line,
                tag,
                prompt,
            });
        }
        if prompts.is_empty() {
            return Err(CorpusError::Empty(path.to_path_buf()));
        }
        let sha256 = Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Corpus { prompts, sha256 })
    }
}

/// A fixed subset of a corpus: shard `index` of `count` (1-based, as
/// `cargo nextest --partition count:I/N` counts) holds every prompt whose
/// index `i` has `i % count == index - 1`. Round-robin, so shards stay
/// balanced when long and short prompts are grouped in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// Which shard, 1..=count.
    pub index: usize,
    /// How many shards.
    pub count: usize,
}

impl Shard {
    /// Whether prompt `i` belongs to this shard.
    pub fn contains(&self, i: usize) -> bool {
        i % self.count == self.index - 1
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// `I/N`, with 1 ≤ I ≤ N.
    fn from_str(s: &str) -> Result<Shard, String> {
        let bad = || format!("`{s}` is not a shard: write I/N with 1 <= I <= N, e.g. 1/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}
