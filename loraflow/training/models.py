"""Loading the base model, its tokenizer (with loraflow's chat template) and base + adapter.

One code path for every config: the embedded tiny-ko on CPU and Qwen2.5-7B on CUDA differ only in the values
of `ModelConfig` / `QuantizationConfig`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from loraflow.base.load import resolve_base
from loraflow.config.lora import QuantizationConfig
from loraflow.config.model import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What `model.attn_implementation: auto` picks on CUDA for padding-free batches: transformers runs it with the
# `flash_attn` package or, without it, the `kernels` package's hub build (kernels-community/flash-attn2).
VARLEN_ATTENTION = "flash_attention_2"


def device_for(model: ModelConfig) -> str:
    if model.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return model.device


def has_bf16(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores arrived with compute capability 8.0 (Ampere). torch.cuda.is_bf16_supported() also says True
    on a T4 (7.5), where bf16 is emulated and several times slower than fp16: the capability decides."""
    return tuple(capability) >= (8, 0)


def dtype_for(name: str, device: str) -> torch.dtype:
    """`auto`: bf16 on a GPU that has it (compute capability >= 8: A10, A100, H100), fp16 on one that has not (T4,
    V100), fp32 on CPU (bf16 matmuls are slow or inexact on most CPUs). An explicit bf16 on a GPU without it fails
    here, before any weight is loaded. The one place that decides a dtype (training, merging, serving)."""
    if device == "cuda" and (name == "auto" or DTYPES[name] == torch.bfloat16):
        if has_bf16(torch.cuda.get_device_capability()):
            return torch.bfloat16
        if name != "auto":
            raise ValueError("model.dtype: bfloat16 is not supported by this GPU (e.g. a T4 or V100); set "
                             "`dtype: auto` (fp16 there) or `dtype: float16`")
        return torch.float16
    return torch.float32 if name == "auto" else DTYPES[name]


def varlen_kernel_installed() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("flash_attn", "kernels"))


def attn_implementation_for(model: ModelConfig, device: str, *, padding_free: bool,
                            varlen_installed: bool | None = None) -> str:
    """What from_pretrained gets as `attn_implementation`. `auto`: sdpa on CPU and for padded batches; on CUDA with
    padding-free batches a varlen flash kernel, which attends within each conversation of the concatenated row from
    the collator's sequence boundaries. Under sdpa, transformers builds a block-diagonal mask over the whole row
    instead (correct, but SDPA then loses its flash backend: full T² attention). Without flash_attn or kernels
    installed, `auto` stays on sdpa and says so."""
    if model.attn_implementation != "auto":
        return model.attn_implementation
    if device != "cuda" or not padding_free:
        return "sdpa"
    if varlen_installed if varlen_installed is not None else varlen_kernel_installed():
        return VARLEN_ATTENTION
    log.warning("model.attn_implementation auto: neither flash_attn nor kernels is installed; padding-free batches "
                "run on sdpa with a block-diagonal mask (full T^2 attention). Install `kernels` for %s.",
                VARLEN_ATTENTION)
    return "sdpa"


def bnb_config(quant: QuantizationConfig, device: str, *, fsdp: bool = False) -> BitsAndBytesConfig | None:
    """Under FSDP the packed 4-bit weights are stored in the compute dtype, not uint8: FSDP shards float tensors
    only, and wraps a layer whole only when all its tensors share one dtype (bitsandbytes' FSDP-QLoRA guide)."""
    if not quant.enabled:
        return None
    compute = dtype_for(quant.compute_dtype, device)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.method,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        **({"bnb_4bit_quant_storage": compute} if fsdp else {}),
    )


def fsdp_dtype(model: ModelConfig, quant: QuantizationConfig, device: str) -> torch.dtype:
    """FSDP-QLoRA loads the base in the dtype its 4-bit weights are stored in: model.dtype and
    quantization.compute_dtype must agree."""
    dtype = dtype_for(model.dtype, device)
    if quant.enabled and dtype_for(quant.compute_dtype, device) != dtype:
        raise ValueError(f"model.dtype ({model.dtype}) and quantization.compute_dtype ({quant.compute_dtype}) must "
                         "resolve to the same dtype under FSDP (training.accelerate_config)")
    return dtype


def process_device(device: str) -> str | int:
    """This process's device: under `accelerate launch` on GPUs each worker takes the GPU of its LOCAL_RANK."""
    return int(os.environ.get("LOCAL_RANK", "0")) if device == "cuda" else device


def disable_cpu_bf16_repack(model: torch.nn.Module) -> int:
    """bitsandbytes repacks 4-bit weights in place on the first no-grad forward on AVX512-BF16 CPUs; training
    afterwards crashes or silently loses gradients (seen with bitsandbytes 0.50 on CPU). Turn that path off on every
    4-bit layer."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def from_pretrained_kwargs(model: ModelConfig, quant: QuantizationConfig, *, quantized: bool = True,
                           fsdp: bool = False, padding_free: bool = False) -> dict[str, Any]:
    """Everything from_pretrained gets besides the path: what a CPU test asserts for the CUDA config."""
    device = device_for(model)
    quantization = bnb_config(quant, device, fsdp=fsdp) if quantized else None
    return dict(
        revision=model.revision,
        dtype=fsdp_dtype(model, quant, device) if fsdp else dtype_for(model.dtype, device),
        quantization_config=quantization,
        device_map={"": process_device(device)} if quantization is not None and not fsdp else None,
        attn_implementation=attn_implementation_for(model, device, padding_free=padding_free),
        trust_remote_code=model.trust_remote_code,
    )


def load_base_model(model: ModelConfig, quant: QuantizationConfig, *, quantized: bool = True,
                    fsdp: bool = False, padding_free: bool = False) -> PreTrainedModel:
    """The frozen base; 4-bit when `quantized` and the config asks for it (training, QLoRA eval), else full
    precision (merging must never happen in the 4-bit model). Under FSDP no device map: accelerate loads the
    weights on rank 0 only (fsdp_cpu_ram_efficient_loading) and shards them onto the GPUs. `padding_free`: the
    batches it will see (training.padding_free), which the attention kernel follows."""
    device = device_for(model)
    kwargs = from_pretrained_kwargs(model, quant, quantized=quantized, fsdp=fsdp, padding_free=padding_free)
    quantization = kwargs["quantization_config"]
    loaded = AutoModelForCausalLM.from_pretrained(resolve_base(model), **kwargs)
    if quantization is None and not fsdp:
        loaded.to(process_device(device))
    if quantization is not None and device == "cpu":
        disable_cpu_bf16_repack(loaded)
    return loaded
