"""loraflow: a declarative pipeline from a chat dataset to a served LoRA adapter."""

__version__ = "0.1.0"
