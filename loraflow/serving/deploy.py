"""One reconcile pass for a job: attach to (or start) its serving stack, then make it serve the registry's
aliases. Used by the `serve` flow (scheduled reconciler) and the finetune flow's `deploy` task."""

from __future__ import annotations

from mlflow import MlflowClient

from loraflow.config.job import JobConfig
from loraflow.registry import tracking_uri
from loraflow.serving.reconcile import ReconcileReport, reconcile
from loraflow.serving.registry_view import aliased_versions, download_version
from loraflow.serving.stack import Endpoint, running_endpoint, start_stack, state_dir
from loraflow.serving.vllm_server import api_key


class ServingDown(RuntimeError):
    """No stack is running for the job and the caller asked not to start one."""


def deploy_aliases(job: JobConfig, start: bool = True) -> tuple[Endpoint, ReconcileReport]:
    uri = tracking_uri(job.registry)
    adapters_root = state_dir(job) / "adapters"
    endpoint = running_endpoint(job)
    if endpoint is None:
        if not start:
            raise ServingDown(f"no serving stack for {job.registry.model_name} (start it with start=True)")
        registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
        # Download first: --max-lora-rank must hold the adapters that are going to be served.
        adapters = [
            download_version(v, adapters_root, uri)
            for v in aliased_versions(registry, job.registry.model_name, job.serving.aliases).values()
        ]
        endpoint = start_stack(job, adapters).endpoint
    report = reconcile(job, endpoint, uri, api_key(job.serving), adapters_root)
    return endpoint, report
