"""The base model and how it is loaded."""

from __future__ import annotations

from typing import Literal

from loraflow.config.base import Section

EMBEDDED_PREFIX = "embedded:"


class ModelConfig(Section):
    """`base` is a hub id, a local directory, or `embedded:tiny-ko` (built by loraflow, no download)."""

    base: str
    # A hub base's branch, tag or commit (default `main`); a branch or tag is resolved to its commit at each run
    # (loraflow.data.sources.resolve_model_revision): what keys and lineage record, and what serving can pass.
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # A template shipped in loraflow/templates (by name) or a path to a .jinja file. It replaces the
    # tokenizer's own so that assistant-only loss works (`{% generation %}` markers) and serving uses the
    # exact template the adapter was trained with.
    chat_template: str = "qwen2.5"
    trust_remote_code: bool = False

    @property
    def is_embedded(self) -> bool:
        return self.base.startswith(EMBEDDED_PREFIX)
