"""deploy: serve a job's aliased versions. Make sure the stack's endpoint runs (or take it as off), put the job on
the server of its base (shared with every job whose server settings agree; started, healed or grown as needed),
record the job, then one reconcile pass. The finetune flow's last step runs it through tasks/deploy.py, the stack's
reconciler and `loraflow serve` through loraflow/localstack/serving_pass.py; `stop_job` takes a job off."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from datetime import datetime
from typing import Any

import httpx

from loraflow.config import ConfigError
from loraflow.config.job import JobConfig
from loraflow.process import file_lock, recorded, wait_gone
from loraflow.registry.client import client_for, tracking_uri
from loraflow.registry.download import download_version
from loraflow.serving import records
from loraflow.serving.client import EndpointClient
from loraflow.serving.placement import detach_from, place_job
from loraflow.serving.reconcile import ReconcileReport, reconcile
from loraflow.serving.records import EndpointRecord, JobRecord, ServerRecord
from loraflow.serving.registry_view import aliased_versions
from loraflow.serving.server_spec import job_demand, server_spec
from loraflow.serving.servers import start_endpoint
from loraflow.serving.vllm_server import api_key

log = logging.getLogger(__name__)
DeviceSlot = Callable[[], AbstractContextManager[None]]
DYING_S = 10  # a killed vLLM may still answer with reset connections this long before its process is gone


def endpoint_for(job: JobConfig, start: bool) -> EndpointRecord | None:
    """The stack's running endpoint, healed after a crash (its record is there, its process is not), or started
    when `start`; None: serving is off (never started, or stopped on purpose). A job whose endpoint settings
    differ from the running endpoint's fails here, naming the field."""
    with file_lock(records.endpoint_dir() / ".lock"):
        running = records.read_endpoint()
        if running is not None and recorded(running.process) is None:
            # Crashed: start it again where clients expect it (the job's own fields must still agree).
            job = job.model_copy(update={"serving": job.serving.model_copy(
                update={"host": job.serving.host or running.host, "port": job.serving.port or running.port})})
            running = None
            start = True
        if running is None:
            return start_endpoint(job.serving) if start else None
    serving = job.serving
    for field, wanted, actual in (("serving.host", serving.host, running.host),
                                  ("serving.port", serving.port, running.port),
                                  ("serving.api_key_env", serving.api_key_env, running.api_key_env)):
        if wanted is not None and wanted != actual:
            raise ConfigError(f"{field}: {wanted!r} differs from the stack's running endpoint ({actual!r}); every "
                              f"job is served by that one endpoint: remove `{field}` or set it to {actual!r}")
    return running


def deploy_aliases(job: JobConfig, config: str, overrides: dict[str, Any] | None = None, start: bool = True,
                   promoted_at: datetime | None = None,
                   device_slot: DeviceSlot = nullcontext) -> tuple[EndpointRecord, ReconcileReport] | None:
    """Serve the job's aliased versions. `start`: start the endpoint when it does not run, and serve a job taken
    off by `serve --stop` again; without it (the endpoint's reconciler) a stopped job or stack stays stopped.
    `device_slot` is held while a base server starts or restarts (the accelerator)."""
    model = job.registry.model_name
    with file_lock(records.job_lock(model)):
        previous = records.read_job(model)
        if previous is not None and previous.stopped and not start:
            return None
        endpoint = endpoint_for(job, start)
        if endpoint is None:
            return None
        uri = tracking_uri(job.registry)
        registry = client_for(job.registry)
        adapters_root = records.job_dir(model) / "adapters"
        # Downloaded first: the server's --max-lora-rank must hold every adapter that is going to be served.
        aliased = aliased_versions(registry, model, job.serving.aliases)
        demand = job_demand(job, [download_version(v, adapters_root, uri) for v in aliased.values()])
        spec = server_spec(job)
        placed = place_job(job, spec, demand, aliased, registry, device_slot)
        records.save_job(JobRecord(model=model, job=job.name, config=config, overrides=dict(overrides or {}),
                                   server=spec.server_id, demand=asdict(demand), notes=placed.notes))
        key = api_key(job.serving)

        def reconcile_on(server: ServerRecord) -> ReconcileReport:
            return reconcile(job, EndpointClient(endpoint.url, key), server, registry, uri, adapters_root, key,
                             promoted_at=promoted_at)

        try:
            report = reconcile_on(placed.server)
        except httpx.TransportError as error:
            if not _from_server(error, placed.server):
                raise
            # Its vLLM died during the pass (killed, out of memory): the endpoint's supervisor restarts it with
            # what it held. Placing the job again waits for that; then one more pass.
            log.warning("base server %s failed during the pass (%s): waiting for its restart", spec.server_id, error)
            if (dying := recorded(placed.server.process)) is not None:
                wait_gone([dying], DYING_S)
            placed = place_job(job, spec, demand, aliased, registry, device_slot)
            report = reconcile_on(placed.server)
        if previous is not None and previous.server != spec.server_id:
            detach_from(previous.server, model, key)  # its settings changed: the old server no longer serves it
        return endpoint, report


def _from_server(error: httpx.TransportError, server: ServerRecord) -> bool:
    try:
        return str(error.request.url).startswith(server.url)
    except RuntimeError:  # an error raised without its request
        return False


def stop_job(job: JobConfig) -> list[str]:
    """`loraflow serve CONFIG --stop`: the job's names leave the endpoint, its adapters leave its server, and it
    stays off until a finetune run or `loraflow serve` serves it again. A server left with no job stops, and the
    endpoint stops with the last server. Returns what was done, one line each."""
    model = job.registry.model_name
    with file_lock(records.job_lock(model)):
        record = records.read_job(model)
        if record is None or record.stopped:
            return []
        key = api_key(job.serving)
        done = detach_from(record.server, model, key, drop_entry=True)
        records.save_job(JobRecord(**{**asdict(record), "stopped": True}))
    return done
