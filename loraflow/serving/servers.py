"""The serving servers of one job: vLLM plus the stable-name router in front of it.

Started attached (tests, bench: stopped by the caller) or detached (`loraflow demo`, the `serve` deployment: the
processes outlive the flow run; `loraflow serve CONFIG --stop` or `loraflow down` stops them). `stack.json`
records what they were started with (serving/records.py) so a later reconcile can attach to them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from loraflow.base.load import resolve_base
from loraflow.base.revision import resolve_model_revision
from loraflow.config.job import JobConfig
from loraflow.hashing import sha_of_text
from loraflow.process import ManagedProcess, ProcessFailed, port_holder, port_in_use
from loraflow.serving import records
from loraflow.serving.names import base_name
from loraflow.serving.records import Endpoint
from loraflow.serving.urls import VLLM_HOST, router_url, vllm_url
from loraflow.serving.vllm_server import VllmLaunch, adapter_rank, vllm_lora_rank, vllm_process, vllm_settings
from loraflow.templates import load_template
from loraflow.training.device import require_free_gpu_memory
from loraflow.training.models import device_for, dtype_for


@dataclass
class ServingStack:
    endpoint: Endpoint
    vllm: ManagedProcess
    router: ManagedProcess
    directory: Path

    def stop(self) -> None:
        """The one way a serving pair is stopped (`loraflow down` takes it too): record first, router, then vLLM."""
        records.stop_recorded(self.directory / records.STACK_FILE)


def served_dtype(job: JobConfig) -> str:
    """`auto` is the model's dtype on its device: fp32 on CPU (greedy output then equals transformers token for
    token), bf16 on a GPU that has it, fp16 on one that has not."""
    if job.serving.dtype != "auto":
        return job.serving.dtype
    return str(dtype_for(job.model.dtype, device_for(job.model))).removeprefix("torch.")


def max_lora_rank(job: JobConfig, adapter_dirs: list[str | Path]) -> int:
    if job.serving.max_lora_rank is not None:
        return vllm_lora_rank([job.serving.max_lora_rank])
    return vllm_lora_rank([job.lora.r, *(adapter_rank(d) for d in adapter_dirs)])


def start_stack(job: JobConfig, adapter_dirs: list[str | Path] = ()) -> ServingStack:
    """Start vLLM, wait for it, then the router; raises ProcessFailed (with the log tail) if either fails."""
    serving = job.serving
    for port, field in ((serving.vllm_port, "serving.vllm_port"), (serving.port, "serving.port")):
        if port_in_use(serving.host if field == "serving.port" else VLLM_HOST, port):
            raise ProcessFailed(f"port {port} ({field}) is taken by {port_holder(port)}; stop it (`loraflow status` "
                                f"lists loraflow's servers) or choose another port with --set {field}=...")
    directory = records.state_dir(job.registry.model_name)
    template = load_template(job.model.chat_template)
    template_file = directory / "chat_template.jinja"
    template_file.write_text(template, encoding="utf-8")
    launch = VllmLaunch(
        base=resolve_base(job.model),
        revision=resolve_model_revision(job.model),  # the commit, never a branch that may have moved
        served_base_name=base_name(job.registry.model_name),
        chat_template=template_file,
        dtype=served_dtype(job),
        max_lora_rank=max_lora_rank(job, list(adapter_dirs)),
    )
    if device_for(job.model) == "cuda":
        # vLLM fails after loading for minutes when the GPU lacks `utilization x total` free; say so at once.
        require_free_gpu_memory(serving.gpu_memory_utilization,
                                serving.tensor_parallel_size * serving.pipeline_parallel_size,
                                "serving.gpu_memory_utilization")
    vllm = vllm_process(serving, launch, directory).start()
    try:
        vllm.wait_healthy(serving.startup_timeout_s)
        router = router_process(job, directory).start()
        router.wait_healthy(60)
    except BaseException:
        vllm.stop()
        raise
    endpoint = Endpoint(
        vllm_url=vllm_url(serving),
        router_url=router_url(serving),
        base_name=launch.served_base_name,
        template_sha=sha_of_text(template),
        max_lora_rank=launch.max_lora_rank,
    )
    # What the router's supervisor restarts a dead vLLM with (the key comes from the router's own environment).
    vllm_record = vllm.record(env=vllm_settings(serving, directory), startup_timeout_s=serving.startup_timeout_s)
    records.save(directory, endpoint, {"vllm": vllm_record, "router": router.record()},
                 {"port": serving.port, "vllm_port": serving.vllm_port})
    return ServingStack(endpoint=endpoint, vllm=vllm, router=router, directory=directory)


def router_process(job: JobConfig, directory: Path) -> ManagedProcess:
    serving = job.serving
    command = [
        sys.executable,
        "-m",
        "loraflow.serving.router",
        "--upstream",
        vllm_url(serving),
        "--host",
        serving.host,
        "--port",
        str(serving.port),
        "--routes-file",
        str(directory / "routes.json"),
        "--api-key-env",
        serving.api_key_env,
        "--supervise",
        str(directory / records.STACK_FILE),
    ]
    return ManagedProcess(
        name="router",
        command=command,
        env=dict(os.environ),
        log_file=directory / "router.log",
        health_url=f"{router_url(serving)}/health",
    )
