"""One serving pass of a job, as the stack's reconciler (`loraflow serve --follow`) and `loraflow serve CONFIG` run
it: the plain pass (loraflow/serving/deploy.py), holding the `accelerator` while a base server starts or grows, then
recorded where a person looks. Each pass is a Prefect event, `loraflow.serving.pass` on the served model (why it
ran, what it routed, loaded and unloaded, each canary, its seconds: the Prefect UI's event feed), beside the
version's tags (`serving.canary`, ...); a pass that routed a champion with no parity verdict yet emits
`loraflow.champion.routed`, which starts `parity/<job>`.

Events go out in the background, so a pass never waits on the Prefect server: recorded as a flow run, a pass waited
up to a minute whenever the server's SQLite store held its writes (a finished run's final state, seen here).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.events import emit_event
from prefect.settings import PREFECT_API_URL

from loraflow.config import JobConfig, load_config
from loraflow.localstack.prefect_api import accelerator
from loraflow.serving.names import version_of

if TYPE_CHECKING:
    from loraflow.serving.reconcile import ReconcileReport

log = logging.getLogger(__name__)
SERVING_PASS = "loraflow.serving.pass"
CHAMPION_ROUTED = "loraflow.champion.routed"  # the trigger of `parity/<job>` (loraflow/localstack/jobs.py)


def record(event: str, model: str, payload: dict[str, Any]) -> None:
    """A Prefect event about the served model, sent in the background; none without a Prefect server (a
    `loraflow serve` of no stack: an event would start a temporary server only to drop it)."""
    if PREFECT_API_URL.value():
        emit_event(event=event, resource=served_model(model), payload=payload)


def served_model(model: str) -> dict[str, str]:
    """The Prefect resource of a served model: what its passes and announcements are about."""
    return {"prefect.resource.id": f"loraflow.served-model.{model}", "prefect.resource.name": model}


def serve_pass(config: str, overrides: dict[str, Any] | None = None, start: bool = True,
               promoted_at: datetime | None = None, why: str = "loraflow serve") -> ReconcileReport | None:
    """One pass of the job in `config`; None when serving is off (`start=False` and nothing serves, or the job was
    taken off). `promoted_at`: the alias move that started it (a version whose canary failed before is retried)."""
    from loraflow.serving.deploy import deploy_aliases  # torch: only once a pass runs

    job = load_config(config, {**(overrides or {}), "serving.enabled": True})
    model, started = job.registry.model_name, time.monotonic()
    deployed = deploy_aliases(job, str(Path(config).resolve()), overrides, start=start, promoted_at=promoted_at,
                              device_slot=accelerator)
    if deployed is None:
        log.info("%s (%s): serving is off (not started, or taken off on purpose): nothing to do", model, why)
        return None
    endpoint, report = deployed
    announced = announce_champion(job, report)
    seconds = round(time.monotonic() - started, 2)
    record(SERVING_PASS, model, {"why": why, "seconds": seconds, "endpoint": endpoint.url,
                                 "parity_requested_for": announced, **report.model_dump(mode="json")})
    for canary in report.canaries:
        log.info("%s: canary v%s %s (%s)", model, canary.version, "passed" if canary.passed else "FAILED",
                 canary.reason)
    log.info("%s (%s): routes %s on %s, loaded %s, unloaded %s in %.1f s", model, why, report.routes, report.server,
             report.loaded, report.unloaded, seconds)
    return report


def announce_champion(job: JobConfig, report: ReconcileReport) -> str | None:
    """After a pass that pointed the stable name at a version with no parity verdict under this serving set-up,
    emit CHAMPION_ROUTED for it; returns that version. A pass that routed nothing new emits nothing, so
    `parity/<job>` runs once per new champion."""
    from loraflow.evaluation.served_parity import parity_verdict

    model = job.registry.model_name
    if not report.rerouted or model not in report.routes or not job.checks_served_parity:
        return None
    version = version_of(model, report.routes[model])
    if version is None or parity_verdict(job, model, version) is not None:
        return None
    record(CHAMPION_ROUTED, model, {"version": version, "served_name": report.routes[model]})
    log.info("%s now answers as %s, not parity-checked yet: %s emitted for parity/%s", model, report.routes[model],
             CHAMPION_ROUTED, job.name)
    return version
