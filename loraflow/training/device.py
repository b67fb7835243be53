"""The accelerator's memory between steps, before vLLM starts, and the bitsandbytes smoke check.

train, evaluate, merge and deploy share one flow process (and so one CUDA context): each heavy step returns its
memory (`released_device_memory`) so the next finds it free, and a vLLM start is refused here, with both numbers,
when it would be refused by vLLM later (`require_free_gpu_memory`).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from loraflow.config.serving import VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
from loraflow.errors import LoraflowError
from loraflow.training.plan_memory import GIB

# NF4 round trip of a normal tensor: mean |error| / mean |x| is ~0.09 (the 16 NF4 levels); a kernel that loads but
# computes garbage gives >= 1.
NF4_MAX_RELATIVE_ERROR = 0.15


@contextmanager
def released_device_memory() -> Iterator[None]:
    """Around a heavy step's plain function: once it has returned (its frame and the models it held are gone),
    collect reference cycles (PEFT and transformers modules hold some) and hand the CUDA caching allocator's free
    blocks back to the driver, where a vLLM started later in this process (or another process) can take them."""
    try:
        yield
    finally:
        release_device_memory()


def release_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class GpuMemoryTooLow(LoraflowError):
    """vLLM would refuse to start: it needs `utilization x total` free on each GPU it uses."""


def gpu_memory_problem(free: int, total: int, utilization: float | None, field: str) -> str | None:
    """Why vLLM would not start with `utilization` (None: vLLM's default 0.9) on a GPU with `free` of `total`
    bytes free, or None when it fits. vLLM (0.33, V1 engine) checks `free >= utilization x total` at start."""
    share = utilization or VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
    wanted = share * total
    if free >= wanted:
        return None
    return (f"{free / GIB:.1f} GiB free on the GPU, but {field}={share} x "
            f"{total / GIB:.1f} GiB total = {wanted / GIB:.1f} GiB needed to start vLLM; free the GPU (another "
            f"process, or a step of this one, holds {(total - free) / GIB:.1f} GiB) or lower {field}")


def require_free_gpu_memory(utilization: float | None, gpus: int, field: str) -> None:
    """Raise GpuMemoryTooLow before starting vLLM on CUDA when any of its first `gpus` GPUs lacks the memory."""
    release_device_memory()  # this process's own cached blocks count as used until they are handed back
    for index in range(min(gpus, torch.cuda.device_count())):
        free, total = torch.cuda.mem_get_info(index)
        problem = gpu_memory_problem(free, total, utilization, field)
        if problem:
            raise GpuMemoryTooLow(f"GPU {index}: {problem}")


def quantize_roundtrip_error(device: str) -> float:
    """bitsandbytes' NF4 quantize + dequantize of a normal tensor on `device`: mean |error| / mean |x|."""
    import bitsandbytes.functional as bnb

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=generator).to(device)
    packed, state = bnb.quantize_4bit(x, quant_type="nf4", blocksize=64)
    y = bnb.dequantize_4bit(packed, state)
    return float((y - x).abs().mean() / x.abs().mean())


def check_bitsandbytes_cuda() -> float:
    """The image's smoke check (`loraflow check-gpu`): bitsandbytes' CUDA library loads and quantizes on the GPU.
    Returns the round-trip error; raises LoraflowError without a GPU or with a broken kernel."""
    if not torch.cuda.is_available():
        raise LoraflowError(f"check-gpu: no CUDA GPU visible to torch {torch.__version__} (torch.cuda.is_available() "
                            "is False); run it on a GPU node, e.g. `docker run --gpus all IMAGE loraflow check-gpu`")
    error = quantize_roundtrip_error("cuda")
    if not error <= NF4_MAX_RELATIVE_ERROR:
        raise LoraflowError(f"check-gpu: bitsandbytes NF4 round trip on CUDA has relative error {error:.3f} > "
                            f"{NF4_MAX_RELATIVE_ERROR} (a broken CUDA kernel)")
    return error
