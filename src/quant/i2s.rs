//! I2_S: 2-bit ternary weights in 128-value blocks.
