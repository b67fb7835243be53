"""The processes of serving: the stack's one endpoint, and one vLLM per base server. Both are started detached in
their own process group and recorded (serving/records.py), so they outlive the run that started them; `loraflow
serve CONFIG --stop` takes a job off, `loraflow down` stops them all."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, replace

from loraflow.base.load import resolve_base
from loraflow.config.job import JobConfig
from loraflow.config.serving import ServingConfig
from loraflow.process import ManagedProcess, ProcessFailed, free_port, port_holder, port_in_use, recorded
from loraflow.serving import records
from loraflow.serving.records import EndpointRecord, ServerRecord
from loraflow.serving.server_spec import Capacity, ServerSpec
from loraflow.serving.urls import PORT_ENV, endpoint_address, endpoint_url
from loraflow.serving.vllm_server import VllmLaunch, api_key, vllm_command, vllm_process, vllm_settings
from loraflow.templates import load_template
from loraflow.training.device import require_free_gpu_memory

ENDPOINT_START_S = 60


def start_endpoint(serving: ServingConfig) -> EndpointRecord:
    """Start the stack's endpoint where the job's settings (or the stack's environment) say; raises ProcessFailed
    naming the field to change when the port is taken."""
    host, port = endpoint_address(serving)
    if port_in_use(host, port):
        raise ProcessFailed(f"port {port} (serving.port, or {PORT_ENV} for the stack) is taken by "
                            f"{port_holder(port)}; stop it (`loraflow status` lists loraflow's servers) or choose "
                            f"another port")
    directory = records.endpoint_dir()
    directory.mkdir(parents=True, exist_ok=True)
    url = endpoint_url(host, port)
    command = [sys.executable, "-m", "loraflow.serving.endpoint", "--servers-dir",
               str(records.serving_dir() / "servers"), "--host", host, "--port", str(port), "--routes-file",
               str(directory / records.ROUTES_FILE), "--api-key-env", serving.api_key_env]
    process = ManagedProcess("endpoint", command, dict(os.environ), directory / "endpoint.log",
                             f"{url}/loraflow/health").start()
    process.wait_healthy(ENDPOINT_START_S)
    record = EndpointRecord(url=url, host=host, port=port, api_key_env=serving.api_key_env,
                            process=process.record())
    records.save_endpoint(record)
    return record


def _launch(job: JobConfig, spec: ServerSpec, capacity: Capacity, port: int) -> VllmLaunch:
    directory = records.server_dir(spec.server_id)
    template_file = directory / "chat_template.jinja"
    template_file.write_text(load_template(job.model.chat_template), encoding="utf-8")
    return VllmLaunch(spec=spec, capacity=capacity, model_path=resolve_base(job.model), served_name=spec.server_id,
                      port=port, chat_template=template_file)


def start_server(job: JobConfig, spec: ServerSpec, capacity: Capacity) -> ServerRecord:
    """Start the base's vLLM on a free private port and wait until it answers; raises ProcessFailed (with the log
    tail) if it does not."""
    directory = records.server_dir(spec.server_id)
    launch = _launch(job, spec, capacity, free_port())
    if spec.device == "cuda":
        # vLLM fails after loading for minutes when the GPU lacks `utilization x total` free; say so at once.
        require_free_gpu_memory(spec.gpu_memory_utilization, spec.tensor_parallel_size * spec.pipeline_parallel_size,
                                "serving.gpu_memory_utilization")
    vllm = vllm_process(launch, directory, api_key(job.serving)).start()
    vllm.wait_healthy(job.serving.startup_timeout_s)
    record = ServerRecord(
        server_id=spec.server_id, url=launch.url, port=launch.port, template_sha=spec.chat_template_sha,
        spec=asdict(spec), capacity=asdict(capacity),
        # What the endpoint's supervisor restarts a dead vLLM with (the key comes from its own environment).
        process=vllm.record(env=vllm_settings(spec, directory), startup_timeout_s=job.serving.startup_timeout_s))
    records.save_server(record)
    return record


def grow_server(job: JobConfig, server: ServerRecord, spec: ServerSpec, capacity: Capacity,
                reason: str) -> ServerRecord:
    """Restart a running server with more capacity: its record takes the new command and the reason; the endpoint's
    supervisor drains it (its names answer 503 + Retry-After, open requests finish), restarts it from the record and
    reloads every adapter it had. Returns the record once the new process answers."""
    command = vllm_command(_launch(job, spec, capacity, server.port))
    grown = replace(server, capacity=asdict(capacity), process={**server.process, "argv": command}, restart=reason)
    records.save_server(grown)
    return wait_restarted(grown, job.serving.startup_timeout_s + 240)


def wait_restarted(server: ServerRecord, timeout_s: float) -> ServerRecord:
    """The record once the endpoint's supervisor has a new, live vLLM in it with its adapters back."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = records.read_server(server.server_id)
        if now is None:
            raise ProcessFailed(f"base server {server.server_id} was stopped while it restarted")
        if now.process["pid"] != server.process["pid"] and recorded(now.process) is not None:
            return now
        time.sleep(1)
    raise ProcessFailed(f"base server {server.server_id} did not come back within {timeout_s:.0f} s; see "
                        f"{server.process['log']}")
