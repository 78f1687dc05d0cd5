//! Chat prompts from `tokenizer.chat_template`, rendered the way Hugging
//! Face engines render it (`transformers`' `apply_chat_template`): a Jinja
//! environment with `trim_blocks` and `lstrip_blocks`, loop controls, a
//! `raise_exception` function, Python string methods (`.strip()` ...), and
//! the variables `messages`, `add_generation_prompt`, `bos_token` and
//! `eos_token`.
//!
//! This is the candidate side of the chat check. bitnet.cpp instead
//! recognises a template by substrings and formats it in C++
//! (`llama_chat_apply_template`), writing no BOS: a template that writes
//! `{{ bos_token }}` itself, tokenized with `add_bos_token`, starts with two
//! BOS tokens here and one there.

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

/// One chat turn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: &str) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// The work a template may do: minijinja charges one fuel per instruction
/// and one per 64 bytes of data it makes, so this bounds its time (well
/// under a second) and its memory (about 128 MB). A real template
/// formatting one message uses a few thousand.
pub const FUEL: u64 = 2_000_000;
/// How deep macros and blocks may nest.
pub const RECURSION_LIMIT: usize = 100;
/// What a rendered prompt may add to its messages' text.
pub const MAX_ADDED_BYTES: usize = 1 << 20;

/// Why a chat template could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template is not valid Jinja, raised an exception, or broke a limit.
    #[error("chat template: {}", describe(.0))]
    Render(#[from] minijinja::Error),
    /// The rendered prompt is larger than its messages allow.
    #[error("chat template: the rendered prompt has {bytes} bytes: the limit is {limit} (the messages' {content} bytes plus {MAX_ADDED_BYTES})")]
    TooLong {
        /// The rendered prompt's size.
        bytes: usize,
        /// The messages' text.
        content: usize,
        /// The most it may have.
        limit: usize,
    },
}

/// A render error in words; running out of fuel names the limit.
fn describe(e: &minijinja::Error) -> String {
    match e.kind() {
        ErrorKind::OutOfFuel => {
            format!("stopped at its work limit ({FUEL} fuel: instructions and bytes made): {e:#}")
        }
        _ => format!("{e:#}"),
    }
}

/// Renders `template` for `messages` as Hugging Face does.
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, ChatError> {
    let mut env = Environment::new();
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(RECURSION_LIMIT);
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    let rendered = env.render_str(
        template,
        minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        },
    )?;
    let content: usize = messages.iter().map(|m| m.content.len()).sum();
    let limit = content + MAX_ADDED_BYTES;
    if rendered.len() > limit {
        return Err(ChatError::TooLong {
            bytes: rendered.len(),
            content,
            limit,
        });
    }
    Ok(rendered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_hugging_face_whitespace_rules() {
        // The newline after a block tag and the indentation before one go.
        let template = "{% for m in messages %}\n[{{ m.role }}] {{ m.content.strip() }}\n  {% endfor %}\n  {% if add_generation_prompt %}{{ bos_token }}>{% endif %}";
        let out = render_chat(
            template,
            &[ChatMessage::user("  hi  ")],
            true,
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(out, "[user] hi\n<s>>");
        let err = render_chat(
            "{{ raise_exception('no system role') }}",
            &[],
            false,
            "",
            "",
        )
        .unwrap_err();
        assert!(err.to_string().contains("no system role"), "{err}");
    }

    #[test]
    fn runaway_templates_stop_at_a_limit() {
        for template in [
            "{% set s = namespace(v='x') %}{% for i in range(64) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "{% for i in range(20000) %}{{ 'abcdefghij' * 10 }}{% endfor %}",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        ] {
            let e = render_chat(template, &[ChatMessage::user("hi")], true, "", "").unwrap_err();
            assert!(e.to_string().contains("limit"), "{template}: {e}");
        }
    }
}
