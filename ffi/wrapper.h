// Everything bindgen sees: the public llama.cpp API (model, context, batch,
// tokenizer, cb_eval), the ggml tensor type the callback receives, our
// shim's kernel entry points, and the guarded (exception-catching) calls.
// src/reference/ is the only Rust that uses it.
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"
#include "shim.h"
#include "guard.h"
