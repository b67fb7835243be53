"""Prefect task: make vLLM serve the registry's aliases (the finetune flow's last step, and the `serve` flow)."""

from __future__ import annotations

from contextlib import nullcontext
from datetime import datetime
from typing import TYPE_CHECKING

from prefect import get_client, get_run_logger, task
from prefect.exceptions import ObjectNotFound

from loraflow.config.job import JobConfig
from loraflow.serving.records import recorded_ports, running_endpoint
from tasks.prefect_glue import accelerator, retry_transient


def resume_polling(job_name: str) -> int:
    """Activate the `serve/<job>` fallback schedules (when deployed: not in Prefect's temporary server); returns
    how many were activated."""
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(f"serve/{job_name}")
        except ObjectNotFound:
            return 0
        for schedule in deployment.schedules:
            client.update_deployment_schedule(deployment.id, schedule.id, active=True)
    return len(deployment.schedules)


if TYPE_CHECKING:  # the serving code imports torch: load it only when deploying
    from loraflow.serving.reconcile import ReconcileReport


# Not cached: what is served depends on the registry's aliases and the servers' state, not on inputs.
# A retry covers a vLLM start that failed for a passing reason (port still held by a stopping process).
@task(name="deploy", retries=1, retry_delay_seconds=30, retry_condition_fn=retry_transient)
def deploy(job: JobConfig, start: bool = True, promoted_at: datetime | None = None) -> ReconcileReport | None:
    """One reconcile pass; starts vLLM + router first when `start` and they are not running (a crashed pair is
    restarted either way). `promoted_at`: the
    time of the alias move that triggered the pass (a version whose canary failed before it is tried again)."""
    if not job.serving.enabled:
        return None
    from loraflow.serving.deploy import deploy_aliases

    model = job.registry.model_name
    starting = running_endpoint(model) is None and (start or bool(recorded_ports(model)))
    with accelerator() if starting else nullcontext():  # starting vLLM takes the device: never during a training
        deployed = deploy_aliases(job, start=start, promoted_at=promoted_at)
    logger = get_run_logger()
    if deployed is None:
        logger.info("serving %s is off (not started, or stopped on purpose): nothing to reconcile", model)
        return None
    endpoint, report = deployed
    if starting and (resumed := resume_polling(job.name)):
        logger.info("serve/%s: %d polling schedule(s) active while its servers run", job.name, resumed)
    for canary in report.canaries:
        logger.info("canary %s-v%s: %s (%s)", job.registry.model_name, canary.version,
                    "passed" if canary.passed else "FAILED", canary.reason)
    logger.info("serving at %s/v1: routes %s, loaded %s, unloaded %s", endpoint.router_url, report.routes,
                report.loaded, report.unloaded)
    return report
