"""LoRA adapter shape and 4-bit quantization of the frozen base (QLoRA)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loraflow.config.base import Section

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# peft's own shorthand: every linear layer but the output head (on Qwen2, exactly ALL_LINEAR).
ALL_LINEAR_SHORTHAND = "all-linear"


class LoraSettings(Section):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: list(ALL_LINEAR), min_length=1)
    bias: Literal["none", "all", "lora_only"] = "none"

    @property
    def peft_targets(self) -> str | list[str]:
        """What peft's LoraConfig takes: the shorthand as a string (a list would name a module `all-linear`)."""
        return self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)


class QuantizationConfig(Section):
    """`none` trains plain LoRA on a full-precision base; `nf4`/`fp4` is QLoRA through bitsandbytes."""

    method: Literal["none", "nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    @property
    def enabled(self) -> bool:
        return self.method != "none"
