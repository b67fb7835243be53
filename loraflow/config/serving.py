"""Merging the adapter into the base, and serving adapters on vLLM's OpenAI-compatible API."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loraflow.config.base import Section


class MergeConfig(Section):
    enabled: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # merged logits must match base + adapter within this bound on the check prompts
    max_abs_logit_diff: float = Field(default=1e-3, gt=0)


class ServingConfig(Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)
    # Name of the environment variable holding the API key; the key itself never lives in a config.
    api_key_env: str = "LORAFLOW_VLLM_API_KEY"
    max_loras: int = Field(default=4, gt=0)
    max_model_len: int | None = Field(default=None, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    extra_args: list[str] = Field(default_factory=list)
