"""What serving runs under LORAFLOW_HOME/serving/, recorded so a later pass attaches to it, `loraflow down` stops
exactly it and `loraflow status` shows it: the stack's one endpoint (`endpoint/endpoint.json`), each base server
(`servers/<id>/server.json`: its vLLM, spec and capacity) and each served job (`jobs/<model>/job.json`: its config
and server). Light on purpose (no torch), so `down` and `status` stay fast.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from loraflow import paths
from loraflow.process import is_healthy, read_record, recorded, stop_record, write_record
from loraflow.serving.client import EndpointClient

ENDPOINT_FILE, ROUTES_FILE, SERVER_FILE, JOB_FILE = "endpoint.json", "routes.json", "server.json", "job.json"
# How a server of ours shows in `ps`: vLLM's OpenAI server module, or the endpoint's module.
SERVER_MODULES = {"vllm.entrypoints.openai.api_server": "vllm", "loraflow.serving.endpoint": "endpoint"}


@dataclass(frozen=True)
class EndpointRecord:
    """The stack's public OpenAI endpoint (loraflow/serving/endpoint.py) and what every job served there shares."""

    url: str  # how this machine reaches it
    host: str
    port: int
    api_key_env: str
    process: dict[str, Any]


@dataclass(frozen=True)
class ServerRecord:
    """One base's vLLM: private, on 127.0.0.1, serving the adapters of every job that shares it."""

    server_id: str  # also the base's model name on it
    url: str
    port: int
    template_sha: str
    spec: dict[str, Any]
    capacity: dict[str, int]  # max_lora_rank, max_loras
    process: dict[str, Any]  # the vLLM process: argv, env (without the key), log, startup_timeout_s
    restart: str | None = None  # why a restart with the recorded command was asked for (the supervisor does it)

    @property
    def max_lora_rank(self) -> int:
        return int(self.capacity["max_lora_rank"])


@dataclass(frozen=True)
class JobRecord:
    """A job served on this stack: how to load its config again (the endpoint's reconciler reads it) and where its
    adapters live. `stopped`: `loraflow serve CONFIG --stop` took it off on purpose; nothing serves it again until a
    finetune run or `loraflow serve` does."""

    model: str
    job: str
    config: str
    overrides: dict[str, Any]
    server: str
    demand: dict[str, int]  # max_lora_rank, max_loras: what its versions need of the server
    stopped: bool = False
    notes: list[str] = field(default_factory=list)  # why it does not share another job's server, if it does not


def serving_dir(home: Path | None = None) -> Path:
    return (home / "serving") if home is not None else paths.sub("serving")


def endpoint_dir(home: Path | None = None) -> Path:
    return serving_dir(home) / "endpoint"


def server_dir(server_id: str) -> Path:
    return paths.sub("serving", "servers", server_id)


def job_dir(model: str) -> Path:
    return paths.sub("serving", "jobs", model)


def job_lock(model: str) -> Path:
    """The lock a job's passes (and its deferred unloads) hold: one at a time, across processes."""
    return job_dir(model) / ".lock"


def read_endpoint(home: Path | None = None) -> EndpointRecord | None:
    record = read_record(endpoint_dir(home) / ENDPOINT_FILE)
    return EndpointRecord(**record) if record else None


def running_endpoint() -> EndpointRecord | None:
    """The recorded endpoint when its very process is alive and answers."""
    record = read_endpoint()
    if record is None or recorded(record.process) is None:
        return None
    return record if is_healthy(f"{record.url}/loraflow/health") else None


def save_endpoint(record: EndpointRecord) -> None:
    write_record(endpoint_dir() / ENDPOINT_FILE, asdict(record))


def read_server(server_id: str, home: Path | None = None) -> ServerRecord | None:
    record = read_record(serving_dir(home) / "servers" / server_id / SERVER_FILE)
    return ServerRecord(**record) if record else None


def server_records(home: Path | None = None) -> list[ServerRecord]:
    return [ServerRecord(**json.loads(file.read_text()))
            for file in sorted((serving_dir(home) / "servers").glob(f"*/{SERVER_FILE}"))]


def server_alive(server: ServerRecord) -> bool:
    return recorded(server.process) is not None


def save_server(record: ServerRecord) -> None:
    write_record(server_dir(record.server_id) / SERVER_FILE, asdict(record))


def read_job(model: str, home: Path | None = None) -> JobRecord | None:
    record = read_record(serving_dir(home) / "jobs" / model / JOB_FILE)
    return JobRecord(**record) if record else None


def job_records(home: Path | None = None) -> list[JobRecord]:
    return [JobRecord(**json.loads(file.read_text()))
            for file in sorted((serving_dir(home) / "jobs").glob(f"*/{JOB_FILE}"))]


def save_job(record: JobRecord) -> None:
    write_record(job_dir(record.model) / JOB_FILE, asdict(record))


def stop_server_record(server_id: str, home: Path | None = None) -> list[int]:
    """Forget a server, then stop its vLLM (the record goes first: the endpoint's supervisor must see "stopped on
    purpose", not "crashed, restart")."""
    file = serving_dir(home) / "servers" / server_id / SERVER_FILE
    record = read_record(file)
    file.unlink(missing_ok=True)
    return stop_record((record or {}).get("process"))


def stop_endpoint(home: Path | None = None) -> list[int]:
    """Forget the endpoint and its table (the record first: a pass running meanwhile must see "stopped on purpose",
    not "crashed, restart"), then stop it. The next endpoint's table is built again by the jobs' passes; a crashed
    endpoint, restarted, keeps its table."""
    directory = endpoint_dir(home)
    endpoint = read_record(directory / ENDPOINT_FILE)
    (directory / ENDPOINT_FILE).unlink(missing_ok=True)
    (directory / ROUTES_FILE).unlink(missing_ok=True)
    return stop_record((endpoint or {}).get("process"))


def stop_all_serving(home: Path) -> list[int]:
    """`loraflow down`: the endpoint first (clients get refused, not 503s for servers that will not come back; its
    supervisor stops with it), then every base server. Job records stay: while a later endpoint runs, the stack's
    reconciler serves those jobs again."""
    stopped = stop_endpoint(home)
    for server in server_records(home):
        stopped += stop_server_record(server.server_id, home)
    return stopped


@dataclass(frozen=True)
class ServedNow:
    """What the endpoint serves of a job at this moment."""

    endpoint_url: str
    loaded: frozenset[str]  # the job's versioned names it answers
    routed: str | None  # the versioned name the stable name answers with


def served_now(model: str, key: str | None) -> ServedNow | None:
    """Asked of the running endpoint itself (not of a reconcile report that may be stale by now); None when it does
    not run or does not serve the job."""
    endpoint = running_endpoint()
    if endpoint is None:
        return None
    entry = EndpointClient(endpoint.url, key).job(model)
    if entry is None:
        return None
    return ServedNow(endpoint.url, frozenset(entry["versions"]), entry["stable"])


@dataclass(frozen=True)
class RunningServer:
    name: str  # vllm | endpoint
    pid: int
    port: int | None
    owner: str  # the LORAFLOW_HOME it runs for


def running_servers(home: Path | None = None) -> list[RunningServer]:
    """Every vLLM or endpoint process of loraflow on this machine, whichever LORAFLOW_HOME started it."""
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
