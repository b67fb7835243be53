"""Which server a job's adapters live on, and keeping that server able to hold them: started when no server of its
spec runs, waited for while the endpoint's supervisor restarts it, grown (a restart with a larger
`--max-lora-rank` or more LoRA slots) when the jobs on it need more, and stopped when its last job leaves."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from loraflow.config import ConfigError
from loraflow.config.job import JobConfig
from loraflow.process import ProcessFailed, file_lock, recorded
from loraflow.serving import records
from loraflow.serving.client import EndpointClient, ServerClient
from loraflow.serving.names import version_of
from loraflow.serving.records import ServerRecord
from loraflow.serving.server_spec import Capacity, ServerSpec, combined
from loraflow.serving.servers import grow_server, start_server, wait_restarted

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 120
RESTART_TAG = "serving.server_restart"  # on a version whose serving needed its server restarted, and why


@dataclass(frozen=True)
class Placement:
    server: ServerRecord
    notes: list[str]  # why the job does not share a server of the same base, one line per such server


def place_job(job: JobConfig, spec: ServerSpec, demand: Capacity, aliased: dict[str, ModelVersion],
              registry: MlflowClient, device_slot) -> Placement:
    """The running server of `spec`, able to hold this job's versions next to its other jobs'."""
    model = job.registry.model_name
    with file_lock(records.server_dir(spec.server_id) / ".lock"):
        others = [Capacity(**j.demand) for j in records.job_records()
                  if j.server == spec.server_id and j.model != model and not j.stopped]
        needed = combined([*others, demand])
        server = records.read_server(spec.server_id)
        if server is not None and recorded(server.process) is None:
            server = _recovered(server, job.serving.startup_timeout_s + 120)
        if server is None:
            _check_gpu_share(spec)
            with device_slot():
                server = start_server(job, spec, needed)
        elif not Capacity(**server.capacity).holds(needed):
            reason = (f"base server {spec.server_id} restarted for {model}: "
                      f"{Capacity(**server.capacity).growth(needed)}")
            log.warning("%s", reason)
            _tag_restart(registry, aliased, reason)
            with device_slot():
                server = grow_server(job, server, spec, needed, reason)
    return Placement(server=server, notes=sharing_notes(spec))


def _recovered(server: ServerRecord, timeout_s: float) -> ServerRecord | None:
    """A server whose vLLM died: while the endpoint runs, its supervisor is restarting it (reloading what was
    loaded), and starting another here would race it. None when it does not come back: ours to replace."""
    if records.running_endpoint() is not None:
        try:
            return wait_restarted(server, timeout_s)
        except ProcessFailed as error:
            log.warning("%s: starting it anew", error)
    records.stop_server_record(server.server_id)
    return None


def _check_gpu_share(spec: ServerSpec) -> None:
    """Servers of different bases on the same GPUs must fit together: their shares may not sum above 1."""
    if spec.device != "cuda":
        return
    taken = sum(s.spec.get("gpu_memory_utilization") or 0.9 for s in records.server_records()
                if s.spec.get("device") == "cuda" and recorded(s.process) is not None)
    mine = spec.gpu_memory_utilization or 0.9
    if taken + mine > 1.0:
        raise ConfigError(f"serving.gpu_memory_utilization: {mine} does not fit beside the running base servers, "
                          f"which take {taken:g} of each GPU (at most 1 in all): lower it, or serve this job's "
                          "adapters on a running base")


def _tag_restart(registry: MlflowClient, aliased: dict[str, ModelVersion], reason: str) -> None:
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    for version in aliased.values():
        registry.set_model_version_tag(version.name, version.version, RESTART_TAG, f"{stamp} {reason}"[:4000])


def sharing_notes(spec: ServerSpec) -> list[str]:
    """For each other server of the same base: why this job is not on it (the fields that differ)."""
    notes = []
    for other in records.server_records():
        if other.server_id != spec.server_id and other.spec.get("base") == spec.base:
            theirs = ServerSpec(**{**other.spec, "extra_args": tuple(other.spec.get("extra_args", ()))})
            notes.append(f"not on {other.server_id}: " + "; ".join(spec.differences(theirs)))
    return notes


def detach_from(server_id: str, model: str, api_key: str | None, drop_entry: bool = False) -> list[str]:
    """Take a job's versions off a server (after their requests drained); stop the server when no other job is
    on it in the endpoint's table, and the endpoint with the last server. `drop_entry`: its names also leave the
    endpoint."""
    done = []
    endpoint = records.running_endpoint()
    client = EndpointClient(endpoint.url, api_key) if endpoint is not None else None
    if drop_entry and client is not None:
        client.drop_job(model)
        done.append(f"{model}: no longer answered by the endpoint")
    table = client.routes()["jobs"] if client is not None else {}
    others = sorted(m for m, entry in table.items() if entry["server"] == server_id and m != model)
    with file_lock(records.server_dir(server_id) / ".lock"):
        server = records.read_server(server_id)
        if server is not None and recorded(server.process) is not None:
            vllm = ServerClient(server.url, api_key)
            for name in sorted(n for n in vllm.served_models() if version_of(model, n) is not None):
                if client is not None:
                    client.wait_drained(name, DRAIN_TIMEOUT_S)
                vllm.unload_adapter(name)
                done.append(f"{model}: unloaded {name} from {server_id}")
        if server is not None and not others:
            records.stop_server_record(server_id)
            done.append(f"stopped base server {server_id} (no job left on it)")
    if drop_entry and not records.server_records():
        with file_lock(records.endpoint_dir() / ".lock"):
            if records.stop_endpoint():
                done.append("stopped the endpoint (no job served)")
    return done
