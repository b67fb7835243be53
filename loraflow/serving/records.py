"""What a job's serving servers were started with (`serving/<model>/stack.json` under LORAFLOW_HOME), so a later
reconcile can attach to them and `loraflow down` can stop them; and every loraflow server on this machine, with
the LORAFLOW_HOME that owns it. Light on purpose: no torch, so `down` and `status` stay fast.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from loraflow import paths
from loraflow.process import is_healthy, read_record, recorded, stop_record, write_record
from loraflow.serving.client import ServingClient
from loraflow.serving.names import version_of

STACK_FILE = "stack.json"
# How a server of ours shows in `ps`: vLLM's OpenAI server module, or our router module.
SERVER_MODULES = {"vllm.entrypoints.openai.api_server": "vllm", "loraflow.serving.router": "router"}


@dataclass(frozen=True)
class Endpoint:
    """A running serving stack as the reconciler sees it."""

    vllm_url: str
    router_url: str
    base_name: str
    template_sha: str
    max_lora_rank: int

    def client(self, key: str | None) -> ServingClient:
        return ServingClient(vllm_url=self.vllm_url, router_url=self.router_url, api_key=key)


@dataclass(frozen=True)
class ServedNow:
    """What a job's running servers serve at this moment."""

    router_url: str
    loaded: frozenset[str]  # the model's versioned names vLLM serves
    routed: str | None  # the versioned name the stable name answers with


@dataclass(frozen=True)
class RunningServer:
    name: str  # vllm | router
    pid: int
    port: int | None
    owner: str  # the LORAFLOW_HOME it runs for


def state_dir(model_name: str) -> Path:
    return paths.sub("serving", model_name)


def save(directory: Path, endpoint: Endpoint, processes: dict[str, dict], ports: dict[str, int]) -> None:
    write_record(directory / STACK_FILE, {"endpoint": asdict(endpoint), "processes": processes, "ports": ports})


def recorded_ports(model_name: str) -> dict[str, int]:
    """`serving.port` / `serving.vllm_port` the job's servers were last started on (a restart after a crash comes
    back where clients and the reconciler expect it), or {} when nothing is recorded."""
    file = state_dir(model_name) / STACK_FILE
    return dict(json.loads(file.read_text()).get("ports", {})) if file.is_file() else {}


def running_endpoint(model_name: str) -> Endpoint | None:
    """The endpoint of this job's servers when they are up *and* are the processes recorded here."""
    file = state_dir(model_name) / STACK_FILE
    if not file.is_file():
        return None
    record = json.loads(file.read_text())
    if any(recorded(r) is None for r in record.get("processes", {}).values()):
        return None
    endpoint = Endpoint(**record["endpoint"])
    return endpoint if is_healthy(f"{endpoint.router_url}/health") else None


def served_now(model_name: str, key: str | None) -> ServedNow | None:
    """Asked of the job's servers themselves (not of a reconcile report that may be stale by now); None when they
    do not run."""
    endpoint = running_endpoint(model_name)
    if endpoint is None:
        return None
    serving = endpoint.client(key)
    loaded = frozenset(name for name in serving.served_models() if version_of(model_name, name) is not None)
    return ServedNow(endpoint.router_url, loaded, serving.routes()["routes"].get(model_name))


def recovered_endpoint(model_name: str, timeout_s: float) -> Endpoint | None:
    """While the recorded router lives, its supervisor restarts a dead vLLM (serving/supervisor.py): wait for the
    pair to answer again. None when the router is gone too, serving was stopped, or vLLM is not back in time."""
    file = state_dir(model_name) / STACK_FILE
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = read_record(file)
        if record is None or recorded(record.get("processes", {}).get("router")) is None:
            return None
        if (endpoint := running_endpoint(model_name)) is not None:
            return endpoint
        time.sleep(1)
    return None


def stop_recorded(file: Path) -> list[int]:
    """Stop the servers a stack.json records (router first: clients get refused, not 503s for a vLLM that will
    not come back; its supervisor stops with it); then forget them."""
    if not file.is_file():
        return []
    processes = json.loads(file.read_text()).get("processes", {})
    # The record goes first: a reconcile running meanwhile must see "stopped on purpose", not "crashed, restart".
    file.unlink(missing_ok=True)
    return [pid for name in ("router", "vllm") for pid in stop_record(processes.get(name))]


def stop_job_servers(model_name: str) -> list[int]:
    return stop_recorded(state_dir(model_name) / STACK_FILE)


def stop_all_servers(home: Path) -> list[int]:
    """Stop every serving stack recorded under `home` (what `loraflow down` needs)."""
    return [pid for file in sorted((home / "serving").glob(f"*/{STACK_FILE}")) for pid in stop_recorded(file)]


def running_servers(home: Path | None = None) -> list[RunningServer]:
    """Every vLLM or router process of loraflow on this machine, whichever LORAFLOW_HOME started it."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        name = next((SERVER_MODULES[arg] for arg in cmdline if arg in SERVER_MODULES), None)
        if name is None:
            continue
        port = int(cmdline[cmdline.index("--port") + 1]) if "--port" in cmdline else None
        owner = "unknown home"
        with contextlib.suppress(psutil.Error):
            owner = process.environ().get("LORAFLOW_HOME", owner)
        if home is not None and owner == str(home):
            owner = f"{owner} (this home)"
        found.append(RunningServer(name=name, pid=process.pid, port=port, owner=owner))
    return found
