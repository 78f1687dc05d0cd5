//! Weight and activation quantization formats, as scalar specifications.
pub mod act;
pub mod i2s;
