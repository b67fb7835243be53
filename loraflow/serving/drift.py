"""Does a job serve what the registry says? The stack's reconciler asks every few seconds (serving/follow.py); a
job that differs gets a pass. Reads only: the registry's aliases, the serving records and the endpoint's entry."""

from __future__ import annotations

import httpx

from loraflow.config.job import JobConfig
from loraflow.process import recorded
from loraflow.registry.client import client_for
from loraflow.serving import records
from loraflow.serving.client import EndpointClient, ServerClient
from loraflow.serving.names import versioned_name
from loraflow.serving.registry_view import aliased_versions, failed_before
from loraflow.serving.vllm_server import api_key


def drift(job: JobConfig) -> str | None:
    """Why the job needs a pass, or None. A job with a champion that nothing served yet drifts (while the stack's
    endpoint runs); a stack whose serving was stopped, or a job taken off on purpose, never does: a stop stays a
    stop."""
    model = job.registry.model_name
    endpoint = records.read_endpoint()
    if endpoint is None:
        return None
    if recorded(endpoint.process) is None:
        return "drift: the endpoint crashed"
    aliased = aliased_versions(client_for(job.registry), model, job.serving.aliases)
    record = records.read_job(model)
    if record is None:
        return "drift: not served yet" if "champion" in aliased else None
    if record.stopped:
        return None
    entry = EndpointClient(endpoint.url, api_key(job.serving)).job(model)
    server = records.read_server(record.server)
    if entry is None or server is None:
        return "drift: not on the endpoint"
    if missing := _not_loaded(server, entry["versions"], api_key(job.serving)):
        return f"drift: {', '.join(missing)} not loaded on {server.server_id}"
    for alias, version in aliased.items():
        if failed_before(version):  # its canary failed: promoting it again retries it, not every check
            continue
        name = versioned_name(model, version.version)
        if name not in entry["versions"]:
            return f"drift: {alias} v{version.version} not served"
        if alias == "champion" and entry["stable"] != name:
            return f"drift: {model} answers as {entry['stable']}, champion is v{version.version}"
    return None


def _not_loaded(server: records.ServerRecord, versions: list[str], key: str | None) -> list[str]:
    """The entry's versions its server does not hold (a restart that could not load one again). A server that is
    restarting, or does not answer, is the supervisor's to heal: nothing is reported then."""
    if server.restart is not None or recorded(server.process) is None:
        return []
    try:
        loaded = ServerClient(server.url, key, timeout_s=5).served_models()
    except httpx.HTTPError:
        return []
    return sorted(name for name in versions if name not in loaded)
