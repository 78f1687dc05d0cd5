//! Tokenizer for the GGUF 'llama' (SentencePiece-style) vocab.
