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

#[derive(Debug, thiserror::Error)]
#[error("chat template: {0:#}")]
pub struct ChatError(#[from] minijinja::Error);

/// Renders `template` for `messages` as Hugging Face does.
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, ChatError> {
    let mut env = Environment::new();
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
}
