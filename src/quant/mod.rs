//! Weight and activation quantization formats, as scalar specifications.
pub mod i2s;
pub mod act;
