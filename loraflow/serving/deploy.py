"""deploy: make vLLM serve the registry's aliases for a job. Attach to the job's running servers (or start them),
then one reconcile pass. The finetune flow's last step and the `serve` flow both run it through tasks/deploy.py."""

from __future__ import annotations

from datetime import datetime

from loraflow.config.job import JobConfig
from loraflow.registry.client import client_for, tracking_uri
from loraflow.registry.download import download_version
from loraflow.serving.reconcile import ReconcileReport, reconcile
from loraflow.serving.records import (
    Endpoint,
    recorded_ports,
    recovered_endpoint,
    running_endpoint,
    state_dir,
    stop_job_servers,
)
from loraflow.serving.registry_view import aliased_versions
from loraflow.serving.servers import start_stack
from loraflow.serving.vllm_server import api_key


def deploy_aliases(job: JobConfig, start: bool = True,
                   promoted_at: datetime | None = None) -> tuple[Endpoint, ReconcileReport] | None:
    """Reconcile the job's running servers. Servers that crashed (their record is there, their processes are not)
    are restarted on their ports in any case; servers that were never started, or stopped on purpose (`loraflow
    down`, `serve --stop` drop the record first), are started only when `start`: else None, serving is off."""
    model = job.registry.model_name
    uri = tracking_uri(job.registry)
    adapters_root = state_dir(model) / "adapters"
    endpoint = running_endpoint(model)
    if endpoint is None and recorded_ports(model):
        # vLLM died under a live router: the router's supervisor is restarting it (reloading what was loaded);
        # restarting here too would race it. Startup plus reloading the adapters bounds the wait.
        endpoint = recovered_endpoint(model, job.serving.startup_timeout_s + 120)
    if endpoint is None:
        ports = recorded_ports(model)
        if not ports and not start:
            return None
        # A pair its supervisor could not heal (the router died too, or vLLM never came back) is ours to replace:
        # stop what is recorded, then start anew on the same ports.
        if ports:
            job = job.model_copy(update={"serving": job.serving.model_copy(update=ports)})
        stop_job_servers(model)
        # Download first: --max-lora-rank must hold the adapters that are going to be served.
        adapters = [download_version(v, adapters_root, uri)
                    for v in aliased_versions(client_for(job.registry), model, job.serving.aliases).values()]
        endpoint = start_stack(job, adapters).endpoint
    report = reconcile(job, endpoint, uri, api_key(job.serving), adapters_root, promoted_at=promoted_at)
    return endpoint, report
