"""Prefect task: the promotion gate after `register` (policy in the job's `promotion` section)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from loraflow.config.job import JobConfig
from loraflow.registry import promote as plain
from loraflow.registry.client import client_for
from loraflow.results import EvalResult, RegisteredVersion


# Not cached: the decision depends on the registry (the current champion), not only on the inputs; the plain
# function is idempotent per version instead.
@task(name="promote", cache_policy=NO_CACHE)
def promote(job: JobConfig, registered: RegisteredVersion, evaluated: EvalResult) -> plain.PromotionDecision:
    decision = plain.promote(client_for(job.registry), registered.model_name, registered.version,
                             evaluated.metrics, job.promotion)
    get_run_logger().info("promotion of %s v%s: %s%s\n%s", decision.model_name, decision.version,
                          decision.alias or "no alias", "" if decision.decided_now else " (decided earlier)",
                          "\n".join(decision.reasons))
    return decision
