"""The embedded `tiny-ko` default: Korean corpus, tokenizer and small Qwen2 model built locally, no downloads."""
