"""The memory formulas of `loraflow plan`: file sizes, optimizer states, activations, and the GPUs it compares
against (less what a serving vLLM on the same GPU takes)."""

from __future__ import annotations

import json
import math

from loraflow.config.job import JobConfig
from loraflow.config.serving import VLLM_DEFAULT_GPU_MEMORY_UTILIZATION

GIB = 1024**3
# Memory as nvidia-smi reports it (MiB), less MARGIN_GIB for the CUDA context, cuBLAS workspaces and fragmentation.
GPUS_MIB = {"T4 16 GB": 15360, "L4 24 GB": 23034, "A10 24 GB": 23028, "L40S 48 GB": 46068, "A100 80 GB": 81920,
            "H100 80 GB": 81559, "H200 141 GB": 143771}
MARGIN_GIB = 1.0
# TRL 1.16's fused log-prob head (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, kernels' TOKEN_CHUNK_SIZE).
FUSED_TOKENS, FUSED_VOCAB = 4096, 32768


def serving_share(job: JobConfig) -> float:
    """The fraction of each GPU a serving vLLM holds beside the training: with serving enabled and the model not on
    the CPU, vLLM is taken to share the training's GPU (the one-GPU set-up of docs/stack.md) and keeps
    `serving.gpu_memory_utilization` of its total memory (vLLM's meaning of the field) for as long as it runs.
    Serving on a GPU of its own (CUDA_VISIBLE_DEVICES) is invisible to a config: plan then under-promises."""
    if not job.serving.enabled or job.model.device == "cpu":
        return 0.0
    utilization = job.serving.gpu_memory_utilization
    return VLLM_DEFAULT_GPU_MEMORY_UTILIZATION if utilization is None else utilization


def usable_gib(share: float) -> dict[str, float]:
    """What a training may use on each GPU: its memory less the serving share, less the margin."""
    return {gpu: round(mib / 1024 * (1 - share) - MARGIN_GIB, 2) for gpu, mib in GPUS_MIB.items()}


def safetensors_bytes(shapes: dict[str, list[int]], dtype: str, itemsize: int) -> int:
    """The size safetensors writes: 8-byte length, JSON header (compact, tensors sorted by name, padded with spaces
    to 8 bytes), then the data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in sorted(shapes):
        size = math.prod(shapes[key]) * itemsize
        header[key] = {"dtype": dtype, "shape": shapes[key], "data_offsets": [offset, offset + size]}
        offset += size
    length = len(json.dumps(header, separators=(",", ":")))
    return 8 + length + (-length % 8) + offset


def optimizer_bytes(optim: str, numels: list[int], param_bytes: int) -> float:
    """Adam-like states for the trainable tensors. bitsandbytes 8-bit (`*8bit`): m and v in 1 byte each plus an
    fp32 absmax per 256-block, tensors under 4096 elements stay fp32 (min_8bit_size); bitsandbytes 32-bit (`paged_*`,
    `*bnb*`): fp32 m, v; torch AdamW: m, v in the parameter's own dtype."""
    if "8bit" in optim:
        return sum(n * (2 + 8 / 256) if n >= 4096 else 8 * n for n in numels)
    if "bnb" in optim or optim.startswith("paged_"):
        return 8.0 * sum(numels)
    return 2.0 * param_bytes * sum(numels)


def layer_bytes(batch: int, seq: int, hidden: int, heads: int) -> float:
    """What one transformer layer keeps for backward, 16-bit: s·b·h·(34 + 5·a·s/h) (see `activation_bytes`)."""
    return seq * batch * hidden * (34 + 5 * heads * seq / hidden)


def fused_head_bytes(tokens: int, vocab: int) -> float:
    """TRL's fused LM head (DPO) projects `FUSED_TOKENS` x `FUSED_VOCAB` fp32 tiles instead of the b·s·V logits."""
    return 4.0 * min(tokens, FUSED_TOKENS) * min(vocab, FUSED_VOCAB)


def activation_bytes(batch: int, seq: int, hidden: int, layers: int, heads: int, vocab: int,
                     checkpointing: bool) -> tuple[float, float]:
    """(layer activations, logits) in bytes, an estimate with 16-bit activations.

    One transformer layer keeps s·b·h·(34 + 5·a·s/h) bytes for backward (Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models": 34·s·b·h for the linears, norms and masks, 5·a·s²·b for the
    attention scores, softmax and its dropout in eager attention). With gradient checkpointing only each layer's
    input survives (L·2·s·b·h) plus one layer being recomputed in backward; without it, all L layers. The loss reads
    the logits upcast to fp32: b·s·V·4 bytes, which a 152k vocabulary makes large."""
    per_layer = layer_bytes(batch, seq, hidden, heads)
    kept = layers * 2 * seq * batch * hidden + per_layer if checkpointing else layers * per_layer
    return kept, 4.0 * batch * seq * vocab
