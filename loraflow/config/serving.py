"""Merging the adapter into the base, and serving adapters on vLLM's OpenAI-compatible API."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from loraflow.config.base import Section


class MergeConfig(Section):
    """merge_and_unload into a full-precision reload of the base (never the 4-bit training base). The merge and its
    check run in fp32; the result is saved in `dtype`."""

    enabled: bool = False
    # The saved dtype: `auto` is the model section's (the serving dtype: fp32 on CPU, bf16 on a bf16 GPU).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Where the fp32 merge runs: `auto` = model.device. fp32 weights are 4 bytes/parameter (7B: ~31 GB), so on a
    # 24 GB GPU set `cpu` (needs that much RAM).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # merged logits must match base + adapter (both fp32) within this bound on the check prompts
    max_abs_logit_diff: float = Field(default=1e-3, gt=0)


class CanaryConfig(Section):
    """What a version must show before a served name points at it (docs/serving.md)."""

    prompts: list[str] = Field(
        default_factory=lambda: [
            "대한민국 헌법 제1조는 무엇입니까?",
            "국회의 권한을 설명해 주세요.",
            "안녕하세요",
        ],
        min_length=1,
    )
    max_tokens: int = Field(default=16, gt=0)
    # At least this many prompts must give a greedy output different from the base's.
    min_changed: int = Field(default=1, gt=0)


class ParityConfig(Section):
    """After deploy, the configured benchmark tasks are scored on the served version (lm-eval `local-completions`
    through the router) and compared with the registered `tuned/...` metrics (docs/serving.md)."""

    enabled: bool = True
    # Items per task for the served run (None: all; the comparison then covers the very items that were judged).
    limit: int | None = Field(default=None, gt=0)
    # A metric is out of parity beyond this many standard errors (the larger of served and registered).
    stderr_multiple: float = Field(default=1.0, gt=0)


class ServingConfig(Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    # The public port: loraflow's router (stable name -> champion's versioned name) listens here.
    port: int = Field(default=8000, gt=0, lt=65536)
    # vLLM itself, reached only through the router (and by the reconciler for load/unload).
    vllm_port: int = Field(default=8001, gt=0, lt=65536)
    # Name of the environment variable holding the API key; the key itself never lives in a config.
    api_key_env: str = "LORAFLOW_VLLM_API_KEY"
    max_loras: int = Field(default=4, gt=0)
    # None: derived from the adapters to serve and `lora.r`, rounded up to a rank vLLM accepts.
    max_lora_rank: int | None = Field(default=None, gt=0)
    max_model_len: int | None = Field(default=None, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # vLLM's CPU KV cache in GiB (VLLM_CPU_KVCACHE_SPACE); ignored on CUDA.
    cpu_kv_cache_gib: int = Field(default=1, gt=0)
    # The fraction of each GPU's memory vLLM takes for weights + KV cache (vLLM's default 0.9 leaves no room for a
    # training on the same GPU: docs/stack.md). None: vLLM's default. Ignored on CPU.
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    # Multi-GPU serving of a large base: vLLM's tensor and pipeline parallel sizes (GPUs = their product).
    tensor_parallel_size: int = Field(default=1, gt=0)
    pipeline_parallel_size: int = Field(default=1, gt=0)
    startup_timeout_s: float = Field(default=300, gt=0)
    # Registry aliases served under their versioned names; `champion` also answers to the stable name.
    aliases: list[str] = Field(default_factory=lambda: ["champion", "challenger"], min_length=1)
    canary: CanaryConfig = CanaryConfig()
    parity: ParityConfig = ParityConfig()
    extra_args: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _distinct_ports(self) -> ServingConfig:
        if self.port == self.vllm_port:
            raise ValueError("`port` (router) and `vllm_port` must differ")
        if "champion" not in self.aliases:
            raise ValueError("`aliases` must include `champion` (the stable name follows it)")
        return self
