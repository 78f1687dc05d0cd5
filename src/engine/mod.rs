//! The candidate: a pure-Rust BitNet b1.58 forward pass (under construction).
pub mod tokenizer;
