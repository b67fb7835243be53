"""Which server a job's adapters live on. Jobs whose base resolves to the same model and revision and whose
server settings agree (dtype, max_model_len, parallelism, chat template, ...) share one vLLM; a job that differs
in any of them gets its own, and `differences` says in which fields. What a server must hold for its jobs (the
largest LoRA rank, the adapters kept ready) is its `Capacity`, grown by a restart when a job needs more."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from loraflow.base.revision import resolve_model_revision
from loraflow.config.job import JobConfig
from loraflow.hashing import sha_of, sha_of_text
from loraflow.serving.names import server_name
from loraflow.templates import load_template
from loraflow.training.models import device_for, dtype_for

# Ranks vLLM's LoRAConfig accepts (vllm/config/lora.py `MaxLoRARanks`).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(adapter_dir: str | Path) -> int:
    """The largest rank in a PEFT adapter (`r` and any per-module `rank_pattern`)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def vllm_lora_rank(ranks: Iterable[int]) -> int:
    """The smallest rank vLLM accepts that holds every adapter (its default 16 rejects r=32/64)."""
    needed = max(ranks, default=1)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= needed:
            return allowed
    raise ValueError(f"LoRA rank {needed} exceeds vLLM's maximum {VLLM_LORA_RANKS[-1]}")


SLOT_STEP = 8  # LoRA slots a server is started or grown with come in steps of this many
# Spec field -> the job config field it comes from (what a person changes to make two jobs share).
FIELD_OF = {
    "base": "model.base", "revision": "model.revision", "device": "model.device",
    "chat_template_sha": "model.chat_template", "dtype": "serving.dtype", "max_model_len": "serving.max_model_len",
    "tensor_parallel_size": "serving.tensor_parallel_size", "pipeline_parallel_size": "serving.pipeline_parallel_size",
    "gpu_memory_utilization": "serving.gpu_memory_utilization", "cpu_kv_cache_gib": "serving.cpu_kv_cache_gib",
    "extra_args": "serving.extra_args",
}


@dataclass(frozen=True)
class ServerSpec:
    """What a base server is started with, besides its capacity: equal specs share one vLLM."""

    base: str  # as the job names it (`embedded:tiny-ko`, a hub id, a directory)
    revision: str | None  # the commit a hub base's revision resolved to
    device: str
    chat_template_sha: str
    dtype: str
    max_model_len: int | None
    tensor_parallel_size: int
    pipeline_parallel_size: int
    gpu_memory_utilization: float | None
    cpu_kv_cache_gib: int
    extra_args: tuple[str, ...]

    @property
    def server_id(self) -> str:
        return server_name(self.base, sha_of(asdict(self)))

    def differences(self, other: ServerSpec) -> list[str]:
        """`serving.max_model_len: 512 here, 1024 there` for every field that keeps two jobs apart."""
        return [f"{FIELD_OF[f.name]}: {getattr(self, f.name)!r} here, {getattr(other, f.name)!r} there"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


@dataclass(frozen=True)
class Capacity:
    """`--max-lora-rank` and `--max-loras`/`--max-cpu-loras` of a server."""

    max_lora_rank: int
    max_loras: int

    def holds(self, needed: Capacity) -> bool:
        return self.max_lora_rank >= needed.max_lora_rank and self.max_loras >= needed.max_loras

    def growth(self, needed: Capacity) -> str:
        """What a restart to `needed` changes, e.g. `--max-lora-rank 16 -> 64`."""
        grown = []
        if needed.max_lora_rank > self.max_lora_rank:
            grown.append(f"--max-lora-rank {self.max_lora_rank} -> {needed.max_lora_rank}")
        if needed.max_loras > self.max_loras:
            grown.append(f"--max-loras {self.max_loras} -> {needed.max_loras}")
        return ", ".join(grown)


def served_dtype(job: JobConfig) -> str:
    """`auto` is the model's dtype on its device: fp32 on CPU (greedy output then equals transformers token for
    token), bf16 on a GPU that has it, fp16 on one that has not."""
    if job.serving.dtype != "auto":
        return job.serving.dtype
    return str(dtype_for(job.model.dtype, device_for(job.model))).removeprefix("torch.")


def server_spec(job: JobConfig, pin: bool = True) -> ServerSpec:
    """`pin`: the base's revision resolved to its commit (what a server is started with); without it the revision as
    configured and the device and dtype as configured (`loraflow plan`, offline, on any machine)."""
    serving = job.serving
    return ServerSpec(
        base=job.model.base,
        # The commit, never a branch that may have moved.
        revision=resolve_model_revision(job.model) if pin else job.model.revision,
        device=device_for(job.model) if pin else job.model.device,
        chat_template_sha=sha_of_text(load_template(job.model.chat_template)),
        dtype=served_dtype(job) if pin else job.serving.dtype,
        max_model_len=serving.max_model_len,
        tensor_parallel_size=serving.tensor_parallel_size,
        pipeline_parallel_size=serving.pipeline_parallel_size,
        gpu_memory_utilization=serving.gpu_memory_utilization,
        cpu_kv_cache_gib=serving.cpu_kv_cache_gib,
        extra_args=tuple(serving.extra_args),
    )


def job_demand(job: JobConfig, adapter_dirs: list[Path]) -> Capacity:
    """What the job's versions need of their server: a rank holding `lora.r`, `serving.max_lora_rank` and every
    adapter to serve; slots for its aliased versions plus one draining."""
    ranks = [job.lora.r, *(adapter_rank(d) for d in adapter_dirs)]
    if job.serving.max_lora_rank is not None:
        ranks.append(job.serving.max_lora_rank)
    return Capacity(max_lora_rank=vllm_lora_rank(ranks), max_loras=job.serving.slots)


def combined(demands: list[Capacity]) -> Capacity:
    """A server's capacity for all its jobs: the largest rank, and their slots summed and rounded up to a multiple
    of SLOT_STEP, so that a job joining a running server rarely needs it restarted (a slot costs rank x (in + out)
    of each linear layer: 0.08 GiB for Qwen2.5-7B at rank 16 in bf16)."""
    slots = sum(d.max_loras for d in demands)
    return Capacity(max_lora_rank=vllm_lora_rank(d.max_lora_rank for d in demands),
                    max_loras=max(SLOT_STEP, -(-slots // SLOT_STEP) * SLOT_STEP))
