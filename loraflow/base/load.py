"""The base model a job names, as transformers loads it: where it is (an embedded base is built on first use) and
its tokenizer with loraflow's chat template. Shared by the data, training, evaluation and serving stages."""

from __future__ import annotations

from transformers import AutoTokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from loraflow.config.model import EMBEDDED_PREFIX, ModelConfig
from loraflow.templates import load_template


def resolve_base(model: ModelConfig) -> str:
    """A local directory or hub id that transformers can load; embedded bases are built on first use."""
    if model.is_embedded:
        name = model.base.removeprefix(EMBEDDED_PREFIX)
        if name != "tiny-ko":
            raise ValueError(f"model.base: unknown embedded model {name!r} (known: tiny-ko)")
        from loraflow.tiny.base import tiny_ko_dir

        return str(tiny_ko_dir())
    return model.base


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_base(model), revision=model.revision, trust_remote_code=model.trust_remote_code
    )
    tokenizer.chat_template = load_template(model.chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
