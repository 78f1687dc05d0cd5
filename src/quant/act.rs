//! Per-token int8 activation quantization (bitnet.cpp quantize_row_i8_s).
