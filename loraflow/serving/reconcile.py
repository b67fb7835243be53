"""Make one job's serving match what the registry's aliases say (docs/serving.md), on its base server and in its
own entry of the endpoint's table; other jobs' entries and adapters are never touched.

Each pass: read the aliases; load every aliased version not loaded yet under its immutable versioned name and put
it through the canary; point the stable name at the champion only when its canary passed (else the previous
champion keeps serving); take versions that neither an alias nor the stable name points to out of the job's entry,
then unload them once their in-flight requests drained. Idempotent: a pass with nothing changed calls no adapter
endpoint and leaves the entry as it is.

A pass never waits for a drain: a version with requests still open (a long stream, a parity check still scoring
the previous champion) is unloaded by a thread once they finish, under the job's lock and only if no pass has
made it wanted again meanwhile; a process that ends first leaves it to the next pass. (Waiting here held every pass
for as long as the previous champion's parity check ran, ~60 s: the promotion after it waited that long.)
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from pydantic import BaseModel, ConfigDict

from loraflow.config.job import JobConfig
from loraflow.process import file_lock
from loraflow.registry.download import download_version
from loraflow.serving.canary import CanaryVerdict, run_canary
from loraflow.serving.client import AdapterLoadError, EndpointClient, ServerClient
from loraflow.serving.names import version_of, versioned_name
from loraflow.serving.records import ServerRecord, job_lock
from loraflow.serving.registry_view import aliased_versions, failed_before, record_canary
from loraflow.serving.server_spec import adapter_rank

log = logging.getLogger(__name__)


class CanaryRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: str
    passed: bool
    reason: str


class ReconcileReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    server: str  # the base server the job's adapters live on
    routes: dict[str, str]  # stable name -> versioned name it answers with
    rerouted: bool  # this pass pointed the stable name elsewhere (a new champion answers, or none)
    loaded: list[str]  # versioned names of the job on its server after this pass (draining ones included)
    unloaded: list[str]
    canaries: list[CanaryRecord]
    skipped: list[str]  # aliased versions not served (canary failed now or before)


def reconcile(job: JobConfig, endpoint: EndpointClient, server: ServerRecord, registry: MlflowClient,
              tracking_uri: str, adapters_root: Path, api_key: str | None, drain_timeout_s: float = 120,
              promoted_at: datetime | None = None) -> ReconcileReport:
    model = job.registry.model_name
    vllm = ServerClient(server.url, api_key)
    served = {n: root for n, root in vllm.served_models().items() if version_of(model, n) is not None}
    # Names are unique only inside one registry: a name loaded from any other files than this registry's version
    # (another LORAFLOW_HOME's adapter, a stale copy) is not ours. Unload it; the loop below loads ours and runs
    # the canary on what will answer.
    foreign = sorted(n for n, root in served.items()
                     if not _same_path(root, adapters_root / f"v{version_of(model, n)}"))
    for name in foreign:
        vllm.unload_adapter(name)
        log.warning("%s was loaded from %s, not from this registry's version: unloaded", name, served[name])
    loaded = set(served) - set(foreign)
    entry = endpoint.job(model) or {}
    current = entry.get("stable") if entry.get("server") == server.server_id else None

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
        verdict = _load_and_check(job, server, vllm, registry, version, tracking_uri, adapters_root)
        canaries.append(CanaryRecord(version=str(version.version), passed=verdict.passed, reason=verdict.reason))
        if verdict.passed:
            ready.add(name)
            loaded.add(name)
        else:
            skipped.append(name)

    target = _stable_target(model, aliased.get("champion"), ready, current)
    keep = {versioned_name(model, v.version) for v in aliased.values()} | ({target} if target else set())
    answering = sorted(ready & keep)
    if entry != {"server": server.server_id, "stable": target, "versions": answering}:
        # One swap of this job's entry: new requests see it; those already sent finish on what they named.
        endpoint.set_job(model, server.server_id, target, answering)
        if target != current:
            log.info("stable name %s -> %s (was %s)", model, target, current)
    unloaded = _unload_drained(vllm, endpoint, model, loaded - keep, drain_timeout_s)
    return ReconcileReport(
        server=server.server_id,
        routes={model: target} if target else {},
        rerouted=target != current,
        loaded=sorted(loaded - set(unloaded)),
        unloaded=sorted({*unloaded, *foreign}),
        canaries=canaries,
        skipped=skipped,
    )


def _same_path(root: str, expected: Path) -> bool:
    return bool(root) and Path(root).resolve() == expected.resolve()


def _load_and_check(job: JobConfig, server: ServerRecord, vllm: ServerClient, registry: MlflowClient,
                    version: ModelVersion, tracking_uri: str, adapters_root: Path) -> CanaryVerdict:
    """Load the version under its versioned name and run the canary; a failing version is unloaded again."""
    name = versioned_name(job.registry.model_name, version.version)
    adapter_dir = download_version(version, adapters_root, tracking_uri)
    rank = adapter_rank(adapter_dir)
    if rank > server.max_lora_rank:
        verdict = CanaryVerdict(False, f"adapter rank {rank} > server {server.server_id} --max-lora-rank "
                                f"{server.max_lora_rank} (its next serving pass grows the server)")
    else:
        try:
            vllm.load_adapter(name, str(adapter_dir))
        except AdapterLoadError as error:
            verdict = CanaryVerdict(False, str(error))
        else:
            verdict = run_canary(vllm, name, adapter_dir, server.server_id, version.tags.get("template_sha"),
                                 server.template_sha, job.serving.canary)
            if not verdict.passed:
                vllm.unload_adapter(name)
    log.info("canary %s: %s (%s)", name, "passed" if verdict.passed else "FAILED", verdict.reason)
    record_canary(registry, version, verdict)
    return verdict


def _stable_target(model: str, champion: ModelVersion | None, ready: set[str], current: str | None) -> str | None:
    target = versioned_name(model, champion.version) if champion is not None else None
    if target in ready:
        return target
    # No champion, or its canary failed: the previous champion keeps serving if it still can.
    return current if current in ready else None


def _unload_drained(vllm: ServerClient, endpoint: EndpointClient, model: str, names: set[str],
                    drain_timeout_s: float) -> list[str]:
    """Unload now what has no open request (it is out of the job's entry already, so none can start); leave the
    others to a thread that unloads each once drained. Returns the names unloaded now."""
    inflight = endpoint.routes()["inflight"] if names else {}
    now = sorted(name for name in names if not inflight.get(name))
    for name in now:
        vllm.unload_adapter(name)
        log.info("unloaded %s", name)
    for name in sorted(names - set(now)):
        log.info("%s: unloaded once its %d open request(s) finish", name, inflight[name])
        threading.Thread(target=_unload_when_drained, args=(vllm, endpoint, model, name, drain_timeout_s),
                         name=f"drain-{name}", daemon=True).start()
    return now


def _unload_when_drained(vllm: ServerClient, endpoint: EndpointClient, model: str, name: str,
                         drain_timeout_s: float) -> None:
    try:
        endpoint.wait_drained(name, drain_timeout_s)
        with file_lock(job_lock(model)):
            entry = endpoint.job(model) or {}
            if name not in entry.get("versions", []):  # a pass since may have made it wanted again
                vllm.unload_adapter(name)
                log.info("unloaded %s (drained)", name)
    except Exception:  # the server or endpoint gone meanwhile: the next pass unloads what is left
        log.warning("%s: not unloaded after its drain; the next pass will", name, exc_info=True)
