"""Make vLLM serve exactly what the registry's aliases say (docs/serving.md).

Each run: read the aliases; load every aliased version not loaded yet under its immutable versioned name
and put it through the canary; point the stable name at the champion only when its canary passed (else the
previous champion keeps serving); unload loaded versions that neither an alias nor the stable name points to,
after their in-flight requests have drained. Versions whose canary failed are
unloaded at once. Idempotent: a run with nothing changed calls no adapter endpoint.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from pydantic import BaseModel, ConfigDict

from loraflow.config.job import JobConfig
from loraflow.registry.client import client_at
from loraflow.registry.download import download_version
from loraflow.serving.canary import CanaryVerdict, run_canary
from loraflow.serving.client import AdapterLoadError, ServingClient
from loraflow.serving.names import version_of, versioned_name
from loraflow.serving.records import Endpoint
from loraflow.serving.registry_view import aliased_versions, failed_before, record_canary
from loraflow.serving.vllm_server import adapter_rank

log = logging.getLogger(__name__)


class CanaryRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: str
    passed: bool
    reason: str


class ReconcileReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    routes: dict[str, str]  # stable name -> versioned name it answers with
    rerouted: bool  # this pass pointed the stable name elsewhere (a new champion answers, or none)
    loaded: list[str]  # versioned names vLLM serves after this run
    unloaded: list[str]
    canaries: list[CanaryRecord]
    skipped: list[str]  # aliased versions not served (canary failed now or before)


def reconcile(
    job: JobConfig,
    endpoint: Endpoint,
    tracking_uri: str,
    api_key: str | None,
    adapters_root: Path,
    drain_timeout_s: float = 120,
    promoted_at: datetime | None = None,
) -> ReconcileReport:
    model = job.registry.model_name
    registry = client_at(tracking_uri)
    serving = endpoint.client(api_key)
    served = {n: root for n, root in serving.served_models().items() if version_of(model, n) is not None}
    # Names are unique only inside one registry: a name loaded from any other files than this registry's version
    # (another LORAFLOW_HOME's adapter, a stale copy) is not ours. Unload it; the loop below loads ours and runs
    # the canary on what will answer.
    foreign = sorted(n for n, root in served.items()
                     if not _same_path(root, adapters_root / f"v{version_of(model, n)}"))
    for name in foreign:
        serving.unload_adapter(name)
        log.warning("%s was loaded from %s, not from this registry's version: unloaded", name, served[name])
    loaded = set(served) - set(foreign)
    current = serving.routes()["routes"].get(model)

    aliased = aliased_versions(registry, model, job.serving.aliases)
    candidates = list(aliased.values())
    # The version the stable name points at now stays a candidate: it must be loaded (vLLM may have restarted)
    # so that a failed canary of the new champion still leaves it answering.
    if current is not None and (current_version := version_of(model, current)) is not None:
        candidates.append(registry.get_model_version(model, current_version))

    canaries: list[CanaryRecord] = []
    skipped: list[str] = []
    ready: set[str] = set()
    for version in candidates:
        name = versioned_name(model, version.version)
        if name in loaded or name in ready:
            ready.add(name)
            continue
        if failed_before(version, promoted_at):
            skipped.append(name)
            continue
        verdict = _load_and_check(job, endpoint, serving, registry, version, tracking_uri, adapters_root)
        canaries.append(CanaryRecord(version=str(version.version), passed=verdict.passed, reason=verdict.reason))
        if verdict.passed:
            ready.add(name)
            loaded.add(name)
        else:
            skipped.append(name)

    routes = _route_stable_name(serving, model, aliased.get("champion"), ready, current)
    keep = {versioned_name(model, v.version) for v in aliased.values()} | set(routes.values())
    unloaded = _unload_unused(serving, loaded - keep, drain_timeout_s)
    return ReconcileReport(
        routes=routes,
        rerouted=routes.get(model) != current,
        loaded=sorted(loaded - set(unloaded)),
        unloaded=sorted({*unloaded, *foreign}),
        canaries=canaries,
        skipped=skipped,
    )


def _same_path(root: str, expected: Path) -> bool:
    return bool(root) and Path(root).resolve() == expected.resolve()


def _load_and_check(
    job: JobConfig,
    endpoint: Endpoint,
    serving: ServingClient,
    registry: MlflowClient,
    version: ModelVersion,
    tracking_uri: str,
    adapters_root: Path,
) -> CanaryVerdict:
    """Load the version under its versioned name and run the canary; a failing version is unloaded again."""
    name = versioned_name(job.registry.model_name, version.version)
    adapter_dir = download_version(version, adapters_root, tracking_uri)
    rank = adapter_rank(adapter_dir)
    if rank > endpoint.max_lora_rank:
        verdict = CanaryVerdict(
            False,
            f"adapter rank {rank} > server --max-lora-rank {endpoint.max_lora_rank} "
            "(restart serving with a larger serving.max_lora_rank)",
        )
    else:
        try:
            serving.load_adapter(name, str(adapter_dir))
        except AdapterLoadError as error:
            verdict = CanaryVerdict(False, str(error))
        else:
            verdict = run_canary(
                serving,
                name,
                adapter_dir,
                endpoint.base_name,
                version.tags.get("template_sha"),
                endpoint.template_sha,
                job.serving.canary,
            )
            if not verdict.passed:
                serving.unload_adapter(name)
    log.info("canary %s: %s (%s)", name, "passed" if verdict.passed else "FAILED", verdict.reason)
    record_canary(registry, version, verdict)
    return verdict


def _route_stable_name(
    serving: ServingClient, model: str, champion: ModelVersion | None, ready: set[str], current: str | None
) -> dict[str, str]:
    target = versioned_name(model, champion.version) if champion is not None else None
    if target not in ready:
        # No champion, or its canary failed: the previous champion keeps serving if it still can.
        target = current if current in ready else None
    routes = {model: target} if target is not None else {}
    if target != current:
        serving.set_routes(routes)
        log.info("stable name %s -> %s (was %s)", model, target, current)
    return routes


def _unload_unused(serving: ServingClient, names: set[str], drain_timeout_s: float) -> list[str]:
    """Unload once the router reports no open request for a name (vLLM fails requests of an unloaded one)."""
    deadline = time.monotonic() + drain_timeout_s
    for name in sorted(names):
        while serving.routes()["inflight"].get(name, 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        serving.unload_adapter(name)
        log.info("unloaded %s", name)
    return sorted(names)
