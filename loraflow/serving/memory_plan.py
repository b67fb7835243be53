"""`loraflow plan --serving CONFIG...`: what serving a set of jobs takes, offline. Jobs are grouped into base
servers exactly as serving groups them (serving/server_spec.py); each server holds its base once, LoRA slots for
every job's adapters at the server's rank, and its KV cache. Beside it: what one server per job would take."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForCausalLM

from loraflow.config.job import JobConfig
from loraflow.config.serving import VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
from loraflow.serving.server_spec import Capacity, combined, server_spec, vllm_lora_rank
from loraflow.training.plan import load_base_config
from loraflow.training.plan_memory import GIB, GPUS_MIB

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ServerPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    server_id: str  # offline: the revision as configured; a running server's id pins the commit, so it may differ
    base: str
    device: str
    dtype: str
    jobs: list[str]
    weights_gib: float  # the base, once
    max_loras: int  # LoRA slots: every job's aliased versions plus one draining each
    max_lora_rank: int
    lora_gib: float  # vLLM's LoRA buffers: slots x rank x (in + out) of every linear layer, in the served dtype
    lora_gib_per_job: dict[str, float]
    kv_bytes_per_token: int
    kv_gib: dict[str, float]  # where the KV cache lives -> GiB: `cpu`, or each GPU the base fits on
    total_gib: dict[str, float]  # same keys: what the server takes there


class ServingPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    servers: list[ServerPlan]
    shared_gib: float  # base weights + LoRA buffers over all servers
    separate_gib: float  # the same jobs each on a server of its own
    assumptions: list[str]


def planned_dtype(job: JobConfig) -> str:
    """The served dtype without asking a GPU: `auto` is fp32 on CPU, bf16 on CUDA (fp16 on a GPU without bf16)."""
    if job.serving.dtype != "auto":
        return job.serving.dtype
    return "float32" if job.model.device == "cpu" else "bfloat16"


def _shape(job: JobConfig) -> tuple[int, int, int]:
    """(base parameters, sum of in+out features of every linear layer but the head, KV values per token)."""
    architecture, _ = load_base_config(job.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture)
    linears = sum(m.in_features + m.out_features for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    text = architecture.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return sum(p.numel() for p in model.parameters()), linears, 2 * text.num_hidden_layers * kv_heads * head_dim


def _lora_gib(capacity: Capacity, linears: int, size: int) -> float:
    return capacity.max_loras * capacity.max_lora_rank * linears * size / GIB


def plan_serving(jobs: list[JobConfig]) -> ServingPlan:
    groups: dict[str, list[JobConfig]] = {}
    for job in jobs:
        groups.setdefault(server_spec(job, pin=False).server_id, []).append(job)
    servers, separate = [], 0.0
    for server_id, members in groups.items():
        first = members[0]
        dtype, size = planned_dtype(first), DTYPE_BYTES[planned_dtype(first)]
        params, linears, kv_values = _shape(first)
        demands = {j.name: Capacity(vllm_lora_rank([j.lora.r, j.serving.max_lora_rank or 1]), j.serving.slots)
                   for j in members}
        capacity = combined(list(demands.values()))
        weights = params * size / GIB
        per_job = {j.name: round(j.serving.slots * capacity.max_lora_rank * linears * size / GIB, 4) for j in members}
        lora = _lora_gib(capacity, linears, size)
        if first.model.device == "cpu":
            kv = {"cpu": float(first.serving.cpu_kv_cache_gib)}
        else:
            share = first.serving.gpu_memory_utilization or VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
            kv = {gpu: round(share * mib / 1024 - weights - lora, 2) for gpu, mib in GPUS_MIB.items()
                  if share * mib / 1024 > weights + lora}
        servers.append(ServerPlan(
            server_id=server_id, base=first.model.base, device=first.model.device, dtype=dtype,
            jobs=[j.name for j in members], weights_gib=round(weights, 3), max_loras=capacity.max_loras,
            max_lora_rank=capacity.max_lora_rank, lora_gib=round(lora, 4), lora_gib_per_job=per_job,
            kv_bytes_per_token=kv_values * size, kv_gib=kv,
            total_gib={where: round(weights + lora + gib, 3) for where, gib in kv.items()}))
        # Alone, each job's server still rounds its slots up (combined): what one vLLM per job would really hold.
        separate += sum(weights + _lora_gib(combined([demand]), linears, size) for demand in demands.values())
    return ServingPlan(
        servers=servers, shared_gib=round(sum(s.weights_gib + s.lora_gib for s in servers), 3),
        separate_gib=round(separate, 3),
        assumptions=[
            "estimates, not measurements: weights = parameters x the served dtype; vLLM's LoRA buffers = slots x "
            "--max-lora-rank x (in + out) of every linear layer but the head; activations and CUDA graphs not counted",
            "on a GPU vLLM takes serving.gpu_memory_utilization of its memory and fills what weights and LoRA leave "
            "with KV cache; on CPU the KV cache is serving.cpu_kv_cache_gib",
            "`auto` dtype planned as fp32 on CPU, bf16 on CUDA (a GPU without bf16 serves fp16: same size)",
        ])


def format_serving_plan(plan: ServingPlan, totals: bool = True) -> str:
    """The servers with their parts; `totals`: then shared vs one server per job, and the assumptions."""
    lines = []
    for s in plan.servers:
        # No id: offline, the revision is not resolved to the commit a running server's id is made of.
        lines += [f"base server: {s.base} ({s.device}, {s.dtype}) for {', '.join(s.jobs)}",
                  f"  base weights      {s.weights_gib:9.3f} GiB (once, shared by {len(s.jobs)} job(s))",
                  f"  LoRA slots        {s.lora_gib:9.4f} GiB ({s.max_loras} slots x rank {s.max_lora_rank}: "
                  + ", ".join(f"{job} {gib:.4f}" for job, gib in s.lora_gib_per_job.items()) + ")"]
        for where, gib in s.kv_gib.items():
            tokens = int(gib * GIB / s.kv_bytes_per_token)
            lines.append(f"  KV cache on {where:<17} {gib:8.2f} GiB ({tokens:,} tokens); server total "
                         f"{s.total_gib[where]:.2f} GiB")
    if not totals:
        return "\n".join(lines)
    lines += ["", f"weights + LoRA, shared servers: {plan.shared_gib:.3f} GiB; one server per job: "
              f"{plan.separate_gib:.3f} GiB", "", "assumptions:"] + [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)
