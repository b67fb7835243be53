"""Prefect task: serve the registry's aliases of a job (the finetune flow's last step, and the `serve` flow)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task

from loraflow.config.job import JobConfig
from loraflow.localstack.prefect_api import accelerator
from tasks.prefect_glue import retry_transient

if TYPE_CHECKING:  # the serving code imports torch: load it only when deploying
    from loraflow.serving.reconcile import ReconcileReport


# Not cached: what is served depends on the registry's aliases and the servers' state, not on inputs.
# A retry covers a vLLM start that failed for a passing reason (port still held by a stopping process).
@task(name="deploy", retries=1, retry_delay_seconds=30, retry_condition_fn=retry_transient)
def deploy(job: JobConfig, config: str, overrides: dict[str, Any] | None = None, start: bool = True,
           promoted_at: datetime | None = None) -> ReconcileReport | None:
    """One reconcile pass of the job on the stack's endpoint. `start`: start the endpoint if it does not run
    (a crashed one is restarted either way). `promoted_at`: the time of the alias move that triggered the pass (a
    version whose canary failed before it is tried again). A base server starts or grows only while this run
    holds the `accelerator`: never during a training."""
    if not job.serving.enabled:
        return None
    from loraflow.serving.deploy import deploy_aliases

    logger = get_run_logger()
    deployed = deploy_aliases(job, str(Path(config).resolve()), overrides, start=start, promoted_at=promoted_at,
                              device_slot=accelerator)
    if deployed is None:
        logger.info("serving %s is off (not started, or stopped on purpose): nothing to reconcile",
                    job.registry.model_name)
        return None
    endpoint, report = deployed
    logger.info("serving at %s/v1 on base server %s: routes %s, loaded %s, unloaded %s", endpoint.url,
                report.server, report.routes, report.loaded, report.unloaded)
    return report
