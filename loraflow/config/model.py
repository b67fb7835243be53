"""The base model and how it is loaded."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from loraflow.config.base import DeviceName, DtypeName, Section

EMBEDDED_PREFIX = "embedded:"
ATTENTION_NAMES = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3",
                   "flash_attention_4", "paged|eager")
# transformers' own pattern for a hub kernel (integrations.hub_kernels.is_kernel): org/name[@revision][:function]
HUB_KERNEL = re.compile(r"^[^/:]+/[^/:]+(?:@[^/:]+)?(?::[^/:]+)?$")


class ModelConfig(Section):
    """`base` is a hub id, a local directory, or `embedded:tiny-ko` (built by loraflow, no download)."""

    base: str = Field(description="The base model: a hub id, a local directory, or `embedded:tiny-ko` (built by "
                      "loraflow, no download).")
    # Resolved by loraflow/base/revision.py: what keys and lineage record, what serving can pass.
    revision: str | None = Field(default=None, description="A hub base's branch, tag or commit (None: `main`); a "
                                 "branch or tag is resolved to its commit at each run.")
    dtype: DtypeName = Field(
        default="auto", description="The dtype the base is loaded in; `auto`: bf16 on a GPU that has it, fp16 on "
        "one that has not, fp32 on CPU.")
    device: DeviceName = Field(default="auto", description="Where the model runs; `auto`: "
                                                   "cuda when a GPU is visible, else cpu.")
    # It replaces the tokenizer's own so that assistant-only loss works (`{% generation %}` markers) and serving
    # uses the exact template the adapter was trained with.
    chat_template: str = Field(default="qwen2.5", description="A chat template shipped in loraflow/templates (by "
                               "name) or a path to a .jinja file.")
    trust_remote_code: bool = Field(default=False, description="Let transformers run the model repository's own "
                                    "Python code (only for a base you trust).")
    # Why `auto` matters: padding-free batches on sdpa get a block-diagonal mask over the whole row, which costs
    # SDPA its flash backend (full T^2 attention); a varlen kernel attends within each conversation instead.
    attn_implementation: str = Field(
        default="auto", description="The attention kernel transformers loads the base with: `auto` (sdpa on CPU "
        "and for padded batches; on CUDA with training.padding_free, flash_attention_2 when flash_attn or kernels is "
        "installed, else sdpa with a warning), or one transformers accepts: `sdpa`, `eager`, `flex_attention`, "
        "`flash_attention_2`/`_3`/`_4`, or a hub kernel id such as `kernels-community/flash-attn2`.")

    @field_validator("attn_implementation")
    @classmethod
    def _known_attention(cls, name: str) -> str:
        if name not in ATTENTION_NAMES and not HUB_KERNEL.match(name):
            raise ValueError(f"{name!r} is neither one of {', '.join(ATTENTION_NAMES)} nor a hub kernel id "
                             "(org/name[@revision], e.g. kernels-community/flash-attn2)")
        return name

    @property
    def is_embedded(self) -> bool:
        return self.base.startswith(EMBEDDED_PREFIX)
