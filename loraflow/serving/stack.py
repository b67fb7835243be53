"""The serving stack of one job: vLLM plus the stable-name router in front of it.

Started attached (tests, bench: stopped by the caller) or detached (`make demo`, the `serve` deployment: the
processes outlive the flow run; `python -m flows.serve --stop` stops them). `stack.json` records what the
stack was started with so a later reconciler run can attach to it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from loraflow import paths
from loraflow.config.job import JobConfig
from loraflow.hashing import sha_of_text
from loraflow.modeling import device_for, resolve_base
from loraflow.process import ManagedProcess, is_healthy, stop_group
from loraflow.serving.client import ServingClient
from loraflow.serving.names import base_name
from loraflow.serving.vllm_server import VllmLaunch, adapter_rank, vllm_lora_rank, vllm_process
from loraflow.templates import load_template

STACK_FILE = "stack.json"


@dataclass(frozen=True)
class Endpoint:
    """A running stack as the reconciler sees it."""

    vllm_url: str
    router_url: str
    base_name: str
    template_sha: str
    max_lora_rank: int

    def client(self, key: str | None) -> ServingClient:
        return ServingClient(vllm_url=self.vllm_url, router_url=self.router_url, api_key=key)


@dataclass
class ServingStack:
    endpoint: Endpoint
    vllm: ManagedProcess
    router: ManagedProcess
    directory: Path

    def stop(self) -> None:
        # Router first: clients get connection errors, not 502s from a half-stopped vLLM.
        self.router.stop()
        self.vllm.stop()
        (self.directory / STACK_FILE).unlink(missing_ok=True)


def state_dir(job: JobConfig) -> Path:
    return paths.sub("serving", job.registry.model_name)


def served_dtype(job: JobConfig) -> str:
    """`auto` means fp32 on CPU (greedy output then equals transformers token for token) and bf16 on CUDA."""
    if job.serving.dtype != "auto":
        return job.serving.dtype
    return "float32" if device_for(job.model) == "cpu" else "bfloat16"


def max_lora_rank(job: JobConfig, adapter_dirs: list[str | Path]) -> int:
    if job.serving.max_lora_rank is not None:
        return vllm_lora_rank([job.serving.max_lora_rank])
    return vllm_lora_rank([job.lora.r, *(adapter_rank(d) for d in adapter_dirs)])


def start_stack(job: JobConfig, adapter_dirs: list[str | Path] = ()) -> ServingStack:
    """Start vLLM, wait for it, then the router; raises ProcessFailed (with the log tail) if either fails."""
    serving = job.serving
    directory = state_dir(job)
    template = load_template(job.model.chat_template)
    template_file = directory / "chat_template.jinja"
    template_file.write_text(template, encoding="utf-8")
    launch = VllmLaunch(
        base=resolve_base(job.model),
        revision=job.model.revision,
        served_base_name=base_name(job.registry.model_name),
        chat_template=template_file,
        dtype=served_dtype(job),
        max_lora_rank=max_lora_rank(job, list(adapter_dirs)),
    )
    vllm = vllm_process(serving, launch, directory).start()
    try:
        vllm.wait_healthy(serving.startup_timeout_s)
        router = router_process(job, directory).start()
        router.wait_healthy(60)
    except BaseException:
        vllm.stop()
        raise
    endpoint = Endpoint(
        vllm_url=f"http://127.0.0.1:{serving.vllm_port}",
        router_url=f"http://{serving.host}:{serving.port}",
        base_name=launch.served_base_name,
        template_sha=sha_of_text(template),
        max_lora_rank=launch.max_lora_rank,
    )
    (directory / STACK_FILE).write_text(
        json.dumps({"endpoint": asdict(endpoint), "pids": {"vllm": vllm.pid, "router": router.pid}}, indent=2)
    )
    return ServingStack(endpoint=endpoint, vllm=vllm, router=router, directory=directory)


def router_process(job: JobConfig, directory: Path) -> ManagedProcess:
    serving = job.serving
    command = [
        sys.executable,
        "-m",
        "loraflow.serving.router",
        "--upstream",
        f"http://127.0.0.1:{serving.vllm_port}",
        "--host",
        serving.host,
        "--port",
        str(serving.port),
        "--routes-file",
        str(directory / "routes.json"),
        "--api-key-env",
        serving.api_key_env,
    ]
    return ManagedProcess(
        name="router",
        command=command,
        env=dict(os.environ),
        log_file=directory / "router.log",
        health_url=f"http://{serving.host}:{serving.port}/health",
    )


def running_endpoint(job: JobConfig) -> Endpoint | None:
    """The endpoint of this job's stack when one is up (started by an earlier run), else None."""
    file = state_dir(job) / STACK_FILE
    if not file.is_file():
        return None
    endpoint = Endpoint(**json.loads(file.read_text())["endpoint"])
    return endpoint if is_healthy(f"{endpoint.router_url}/health") else None


def stop_detached(job: JobConfig) -> bool:
    """Stop the job's stack recorded in stack.json; False when none was recorded."""
    return _stop_recorded(state_dir(job) / STACK_FILE)


def stop_all_detached(home: Path) -> list[str]:
    """Stop every serving stack recorded under `home` (what `make down` needs); returns the model names."""
    return [file.parent.name for file in sorted((home / "serving").glob(f"*/{STACK_FILE}")) if _stop_recorded(file)]


def _stop_recorded(file: Path) -> bool:
    if not file.is_file():
        return False
    pids = json.loads(file.read_text())["pids"]
    stop_group(pids["router"])
    stop_group(pids["vllm"])
    file.unlink()
    return True
