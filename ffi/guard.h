// llama.cpp's entry points that can throw a C++ exception, behind a C++
// catch (ffi/guard.cpp). An exception that reaches Rust aborts the process
// ("Rust cannot catch foreign exceptions"): bitnet.cpp's SentencePiece
// tokenizer, for one, throws std::out_of_range on a byte its vocabulary has
// no token for (llama_byte_to_token_impl's token_to_id.at()).
//
// Each wrapper makes the call, stores its result through `out` and returns
// true; when the call threw, it returns false and
// divergence_last_exception() holds the exception's type and what().
#pragma once
#include <stdbool.h>
#include <stdint.h>
#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

// "std::out_of_range: _Map_base::at" for the last wrapper that returned
// false on this thread.
const char * divergence_last_exception(void);

bool divergence_load_model_from_file(const char * path, struct llama_model_params params,
                                     struct llama_model ** out);
bool divergence_new_context_with_model(struct llama_model * model,
                                       struct llama_context_params params,
                                       struct llama_context ** out);
bool divergence_tokenize(const struct llama_model * model, const char * text, int32_t text_len,
                         llama_token * tokens, int32_t n_tokens_max, bool add_special,
                         bool parse_special, int32_t * out);
bool divergence_detokenize(const struct llama_model * model, const llama_token * tokens,
                           int32_t n_tokens, char * text, int32_t text_len_max,
                           bool remove_special, bool unparse_special, int32_t * out);
bool divergence_token_to_piece(const struct llama_model * model, llama_token token, char * buf,
                               int32_t length, int32_t lstrip, bool special, int32_t * out);
bool divergence_chat_apply_template(const struct llama_model * model, const char * tmpl,
                                    const struct llama_chat_message * chat, size_t n_msg,
                                    bool add_ass, char * buf, int32_t length, int32_t * out);
bool divergence_decode(struct llama_context * ctx, struct llama_batch batch, int32_t * out);

#ifdef __cplusplus
}
#endif
