"""Prefect task: after promotion, make vLLM serve the registry's aliases (when `serving.enabled`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import get_run_logger, task

from loraflow.concurrency import accelerator
from loraflow.config.job import JobConfig

if TYPE_CHECKING:  # the serving stack imports torch: load it only when deploying
    from loraflow.serving.reconcile import ReconcileReport


# Not cached: what is served depends on the registry's aliases and the server's state, not on inputs.
# A retry covers a vLLM start that failed for a passing reason (port still held by a stopping process).
@task(name="deploy", retries=1, retry_delay_seconds=30)
def deploy(job: JobConfig) -> ReconcileReport | None:
    if not job.serving.enabled:
        return None
    from loraflow.serving.deploy import deploy_aliases

    with accelerator():  # vLLM takes the device: never while a training holds it
        endpoint, report = deploy_aliases(job, start=True)
    get_run_logger().info(
        "serving at %s/v1: routes %s, loaded %s, canaries %s",
        endpoint.router_url,
        report.routes,
        report.loaded,
        [c.model_dump() for c in report.canaries],
    )
    return report
