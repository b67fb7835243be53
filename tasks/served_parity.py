"""Prefect tasks: score the served version and compare it with what the gate judged (the finetune flow after its
deploy, the `parity` flow for a champion a serving pass routed: loraflow/localstack/serving_pass.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from loraflow.config.job import JobConfig
from loraflow.localstack.prefect_api import holding
from loraflow.results import RegisteredVersion
from loraflow.serving.names import versioned_name
from tasks.prefect_glue import artifact_key, retry_transient

if TYPE_CHECKING:  # lm-eval and the serving code load on use
    from loraflow.evaluation.served_parity import ParityReport
    from loraflow.serving.records import ServedNow



# Not cached: it measures the running servers; the plain function skips a version already checked under the same
# serving set-up.
@task(name="served_parity", cache_policy=NO_CACHE)
def served_parity(job: JobConfig, version: RegisteredVersion, as_champion: bool = False) -> ParityReport | None:
    """Only a version the job's servers serve now is checked; `as_champion`: only while the stable name answers
    with it (a champion that moved on meanwhile is not)."""
    from loraflow.evaluation.served_parity import check_served_parity
    from loraflow.serving.records import served_now
    from loraflow.serving.vllm_server import api_key

    logger = get_run_logger()
    name = versioned_name(version.model_name, version.version)
    if not job.checks_served_parity:
        logger.info("served parity: off for %s (serving or serving.parity off, or nothing to score)", name)
        return None
    key = api_key(job.serving)
    # One check per model at a time: the finetune flow and `parity/<job>` may reach the same version together
    # (its promotion also triggers a `serve` run); the second then finds the first's verdict and skips.
    with holding(f"served-parity-{artifact_key(version.model_name)}"):
        now = served_now(version.model_name, key)
        why = _not_answering(now, name, as_champion)
        if now is None or why is not None:
            logger.info("served parity of %s: %s: not checked", name, why)
            return None
        try:
            report = check_served_parity(job, version, now.endpoint_url, key)
        except Exception:
            # An alias move mid-check makes the reconciler unload it (lm-eval then gets 404s): not a failed check.
            # Servers down or restarting are a failure: nothing routes it anew to check it again.
            after = served_now(version.model_name, key)
            if after is None or (why := _not_answering(after, name, as_champion)) is None:
                raise
            logger.info("served parity of %s: %s (during the check): not checked", name, why)
            return None
    if report is not None:
        rows = "\n".join(f"| {m.metric} | {m.served:.4f} | {m.registered:.4f} | {m.tolerance:.4f} | "
                         f"{'ok' if m.within else '**out**'} |" for m in report.metrics)
        create_markdown_artifact(
            key=f"{artifact_key(version.model_name)}-parity",
            description=f"{name} as served vs as registered",
            markdown=f"### served parity of {name}: {'passed' if report.passed else 'FAILED'}\n\n"
                     f"| metric | served | registered | tolerance | |\n|---|---:|---:|---:|---|\n{rows}\n")
    return report


def _not_answering(now: ServedNow | None, name: str, as_champion: bool) -> str | None:
    """Why `name` is not to be checked on the job's servers; None when it answers as required."""
    if now is None:
        return "its servers do not run, or do not answer (stopped, or vLLM restarting)"
    if name not in now.loaded:
        return "not loaded (no alias on it)"
    if as_champion and now.routed != name:
        return f"the stable name answers with {now.routed} now"
    return None


# Retries: a registry that is unreachable for a while (an MLflow restart) must not lose the check.
@task(name="promoted_version", retries=2, retry_delay_seconds=[10, 30], retry_condition_fn=retry_transient)
def promoted_version(job: JobConfig, version: str) -> RegisteredVersion:
    """The registry's version `version` of the job's model, as the register step returns it."""
    from loraflow.registry.register import registered_version

    return registered_version(job.registry, job.registry.model_name, version)
