"""Prefect task: after deploy, score the served version and compare it with what the gate judged."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from loraflow.config.job import JobConfig
from loraflow.results import RegisteredVersion
from loraflow.serving.names import versioned_name
from loraflow.serving.records import running_endpoint
from tasks.prefect_glue import artifact_key

if TYPE_CHECKING:  # lm-eval and the serving code load on use
    from loraflow.evaluation.served_parity import ParityReport
    from loraflow.serving.reconcile import ReconcileReport


# Not cached: it measures the running servers; the plain function skips a version already checked under the same
# serving set-up.
@task(name="served_parity", cache_policy=NO_CACHE)
def served_parity(job: JobConfig, version: RegisteredVersion, served: ReconcileReport | None) -> ParityReport | None:
    logger = get_run_logger()
    name = versioned_name(version.model_name, version.version)
    endpoint = running_endpoint(version.model_name)
    if served is None or endpoint is None or name not in served.loaded:
        logger.info("served parity: %s is not served (serving off, or no alias on it): not checked", name)
        return None
    from loraflow.evaluation.served_parity import check_served_parity
    from loraflow.serving.vllm_server import api_key

    report = check_served_parity(job, version, endpoint.router_url, api_key(job.serving))
    if report is not None:
        rows = "\n".join(f"| {m.metric} | {m.served:.4f} | {m.registered:.4f} | {m.tolerance:.4f} | "
                         f"{'ok' if m.within else '**out**'} |" for m in report.metrics)
        create_markdown_artifact(
            key=f"{artifact_key(version.model_name)}-parity",
            description=f"{name} as served vs as registered",
            markdown=f"### served parity of {name}: {'passed' if report.passed else 'FAILED'}\n\n"
                     f"| metric | served | registered | tolerance | |\n|---|---:|---:|---:|---|\n{rows}\n")
    return report
