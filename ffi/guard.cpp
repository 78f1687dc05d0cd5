// See guard.h: every llama.cpp call that can throw, with the exception
// caught here, at the last C++ frame, and handed to Rust as text.
#include "guard.h"

#include <cxxabi.h>
#include <cstdlib>
#include <exception>
#include <string>
#include <typeinfo>

namespace {

thread_local std::string last_exception;

// "std::out_of_range: _Map_base::at": the demangled type, then what().
void remember(const std::type_info & type, const char * what) {
    int status = 0;
    char * name = abi::__cxa_demangle(type.name(), nullptr, nullptr, &status);
    last_exception = status == 0 && name ? name : type.name();
    std::free(name);
    last_exception += ": ";
    last_exception += what ? what : "";
}

// Runs `call`; false (and the exception remembered) when it threw.
template <typename F> bool guarded(F call) {
    try {
        call();
        return true;
    } catch (const std::exception & e) {
        remember(typeid(e), e.what());
    } catch (...) {
        last_exception = "an exception that is not a std::exception";
    }
    return false;
}

} // namespace

extern "C" {

const char * divergence_last_exception(void) { return last_exception.c_str(); }

bool divergence_load_model_from_file(const char * path, struct llama_model_params params,
                                     struct llama_model ** out) {
    return guarded([&] { *out = llama_load_model_from_file(path, params); });
}

bool divergence_new_context_with_model(struct llama_model * model,
                                       struct llama_context_params params,
                                       struct llama_context ** out) {
    return guarded([&] { *out = llama_new_context_with_model(model, params); });
}

bool divergence_tokenize(const struct llama_model * model, const char * text, int32_t text_len,
                         llama_token * tokens, int32_t n_tokens_max, bool add_special,
                         bool parse_special, int32_t * out) {
    return guarded([&] {
        *out = llama_tokenize(model, text, text_len, tokens, n_tokens_max, add_special,
                              parse_special);
    });
}

bool divergence_detokenize(const struct llama_model * model, const llama_token * tokens,
                           int32_t n_tokens, char * text, int32_t text_len_max,
                           bool remove_special, bool unparse_special, int32_t * out) {
    return guarded([&] {
        *out = llama_detokenize(model, tokens, n_tokens, text, text_len_max, remove_special,
                                unparse_special);
    });
}

bool divergence_token_to_piece(const struct llama_model * model, llama_token token, char * buf,
                               int32_t length, int32_t lstrip, bool special, int32_t * out) {
    return guarded([&] { *out = llama_token_to_piece(model, token, buf, length, lstrip, special); });
}

bool divergence_chat_apply_template(const struct llama_model * model, const char * tmpl,
                                    const struct llama_chat_message * chat, size_t n_msg,
                                    bool add_ass, char * buf, int32_t length, int32_t * out) {
    return guarded([&] {
        *out = llama_chat_apply_template(model, tmpl, chat, n_msg, add_ass, buf, length);
    });
}

bool divergence_decode(struct llama_context * ctx, struct llama_batch batch, int32_t * out) {
    return guarded([&] { *out = llama_decode(ctx, batch); });
}

} // extern "C"
