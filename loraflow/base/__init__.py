"""The base model a job names: where it is and its tokenizer (load.py, imports transformers), and which commit a
run uses (revision.py, light: keys and the pre-flight import it)."""
