//! What reaches the terminal: text that came from files (metadata keys,
//! tensor names, manifest fields, a policy's name, paths in errors) can
//! hold escape sequences that clear the screen, retitle the window or write
//! the clipboard (OSC 52). Everything the commands print goes through
//! [`escape`]: [`outln!`] and [`errln!`] per line, JSON output through
//! [`escape_json`].

use std::borrow::Cow;
use std::fmt::Write as _;

/// Characters that must not reach a terminal raw: the C0 and C1 controls
/// (ESC, BEL, CSI ...), DEL, and the bidirectional overrides and isolates
/// that reorder what is shown.
fn unsafe_for_terminal(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every unsafe character (newlines and tabs included) written as
/// `\u{..}`, as Rust's `{:?}` writes it: one field, safe to print.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_for_terminal) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_for_terminal(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Lines of text: each line [`escape`]d, the newlines between them kept.
pub fn escape_lines(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c != '\n' && unsafe_for_terminal(c)) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(text.split('\n').map(escape).collect::<Vec<_>>().join("\n"))
}

/// JSON text with the unsafe characters serde_json leaves raw (it escapes
/// only C0) written as `\uXXXX`: the same JSON, safe to print.
pub fn escape_json(json: &str) -> Cow<'_, str> {
    if !json.chars().any(|c| c != '\n' && unsafe_for_terminal(c)) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    for c in json.chars() {
        if c != '\n' && unsafe_for_terminal(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// An error and its causes on one line, each cause once: error types that
/// show their source in their own message (`{path}: {source}`) would
/// otherwise print it twice.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_become_visible_text() {
        let osc52 = "name\x1b]52;c;SGVsbG8=\x07\u{9b}31m\u{202e}";
        assert_eq!(
            escape(osc52),
            "name\\u{1b}]52;c;SGVsbG8=\\u{7}\\u{9b}31m\\u{202e}"
        );
        assert_eq!(escape_lines("a\x1b\nb"), "a\\u{1b}\nb");
        assert_eq!(escape("a\nb"), "a\\u{a}b");
        assert!(matches!(escape("plain é ✓"), Cow::Borrowed(_)));
        let json = serde_json::to_string(&serde_json::json!({"k": "\u{9b}\x1b"})).unwrap();
        let safe = escape_json(&json);
        assert_eq!(safe, r#"{"k":"\u009b\u001b"}"#);
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back["k"], "\u{9b}\x1b");
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("{path}: {source}")]
        struct Shown {
            path: String,
            source: std::io::Error,
        }
        let e = anyhow::Error::from(Shown {
            path: "/tmp".into(),
            source: std::io::Error::other("Is a directory"),
        });
        assert_eq!(error_chain(&e), "/tmp: Is a directory");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
