"""Stage 1: from raw sources to tokenized chat data (build_dataset -> format_chat)."""
