"""LoRA adapter shape and 4-bit quantization of the frozen base (QLoRA)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loraflow.config.base import DtypeName, Section

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# peft's own shorthand: every linear layer but the output head (on Qwen2, exactly ALL_LINEAR).
ALL_LINEAR_SHORTHAND = "all-linear"


class LoraSettings(Section):
    r: int = Field(default=16, gt=0, description="The LoRA rank (inner dimension of each adapter matrix pair).")
    alpha: int = Field(default=32, gt=0, description="The LoRA scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(ALL_LINEAR), min_length=1,
        description="The module names that get an adapter, or `all-linear` (peft: every linear layer but the head).")
    bias: Literal["none", "all", "lora_only"] = Field(default="none", description="Which biases train (peft's "
                                                      "`bias`).")

    @property
    def peft_targets(self) -> str | list[str]:
        """What peft's LoraConfig takes: the shorthand as a string (a list would name a module `all-linear`)."""
        return self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)


class QuantizationConfig(Section):
    """`none` trains plain LoRA on a full-precision base; `nf4`/`fp4` is QLoRA through bitsandbytes."""

    method: Literal["none", "nf4", "fp4"] = Field(default="nf4", description="The 4-bit format of the frozen base "
                                                  "(bitsandbytes); `none`: plain LoRA on a full-precision base.")
    double_quant: bool = Field(default=True, description="Also quantize the quantization constants (saves ~0.4 "
                               "bit/parameter).")
    compute_dtype: DtypeName = Field(
        default="auto", description="The dtype 4-bit weights are computed in; `auto`: bf16 on a GPU that has it, "
        "fp16 on one that has not, fp32 on CPU.")

    @property
    def enabled(self) -> bool:
        return self.method != "none"
