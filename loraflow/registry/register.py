"""register: one MLflow run per training (params, config, loss curve, metrics, artifacts) and the adapter
directory registered as a new version of the job's registered model, tagged with its lineage.

Idempotent: a version carrying the same `loraflow.run_key` is reused, so a cached rerun registers nothing new, and
a retry after a partial success (MLflow restarted mid-way) registers the adapter once. Several trainings may register
versions of one model at once (a shared PostgreSQL registry): MLflow numbers them, and the model is created once.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

import loraflow
from loraflow.config.job import JobConfig
from loraflow.config.registry import RegistryConfig
from loraflow.errors import InputError
from loraflow.hashing import sha_of, sha_of_files
from loraflow.registry.client import client_for, ensure_experiment, tracking_uri
from loraflow.registry.lineage import base_revision_tag, source_tags
from loraflow.registry.parent import parent_tags
from loraflow.results import ChatResult, DatasetResult, EvalResult, ParentVersion, RegisteredVersion, TrainResult

log = logging.getLogger(__name__)

RUN_KEY_TAG = "loraflow.run_key"
TAG_VALUE_LIMIT = 5000
TRAINING_RUN_TAG = "loraflow.training_run_id"  # the live run of the training, when this version has a run of its own
WARNINGS_TAG = "loraflow.warnings"  # what a person should look at before trusting the version; absent: nothing
NOTE_TAG = "mlflow.note.content"  # the run's description, shown at the top of its page in the MLflow UI


def code_version() -> str:
    """The git commit (with `-dirty`) when run from a checkout, else the package version + source hash."""
    root = Path(loraflow.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                                capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        if commit:
            return commit
    except (OSError, subprocess.SubprocessError):
        pass
    sources = sorted(Path(loraflow.__file__).resolve().parent.rglob("*.py"))
    return f"{loraflow.__version__}+{sha_of_files(sources)[:12]}"


def config_sha(job: JobConfig) -> str:
    return sha_of(job)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value, ensure_ascii=False) if isinstance(value, list) else str(value)
    return flat


def loss_curve(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if points:
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, marker=".", color="#4c72b0")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.set_title("SFT loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def find_version(client: MlflowClient, model_name: str, run_key: str):
    """The version registered for this run key, if any. An unreachable registry raises: "not found" would register
    the adapter a second time once it answers again."""
    versions = client.search_model_versions(f"name='{model_name}' and tags.`{RUN_KEY_TAG}`='{run_key}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def ensure_registered_model(client: MlflowClient, name: str, description: str) -> None:
    """Create the registered model unless it exists; another training may create it at the same moment."""
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def first_version(client: MlflowClient, name: str, run_key: str, created: ModelVersion) -> ModelVersion:
    """The version that holds this run key: the lowest. MLflow's client retries every request, POSTs included, so a
    create whose answer was lost (the server died after committing it) is sent again and makes a second version of
    the same adapter; any such later version is deleted."""
    found = {int(v.version): v for v in [created, *client.search_model_versions(
        f"name='{name}' and tags.`{RUN_KEY_TAG}`='{run_key}'")]}
    first, *duplicates = sorted(found)
    for number in duplicates:
        log.warning("register: %s version %s duplicates version %s (a retried request): deleted", name, number, first)
        try:
            client.delete_model_version(name, str(number))
        except MlflowException as error:  # the same adapter registered at once elsewhere deleted it first
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    return found[first]


def register_adapter(
    job: JobConfig,
    config_path: str,
    dataset: DatasetResult,
    chat: ChatResult,
    trained: TrainResult,
    evaluated: EvalResult,
    *,
    flow_run_id: str = "",
    extra_tags: dict[str, str] | None = None,
    extra_artifacts: list[str] | None = None,
    parent: ParentVersion | None = None,
) -> RegisteredVersion:
    """`parent`: the version the job started from (training.init_from, pinned by the pre-flight); its name, adapter
    and own parents become lineage tags of the version and its run."""
    client = client_for(job.registry)
    name = job.registry.model_name
    run_key = sha_of(trained.key, evaluated.key)[:16]
    existing = find_version(client, name, run_key)
    if existing is not None:
        log.info("register: %s version %s already holds this adapter and these metrics", name, existing.version)
        return _existing(client, job.registry, existing)

    lineage = {
        "dataset_sha": dataset.dataset_sha,
        "template_sha": chat.template_sha,
        "base_model": job.model.base,
        # The commit the base's revision resolves to (not the literal `main`), and each data source's resolved
        # commit or manifest sha as the dataset step recorded them: what was trained on, not what the config says.
        "base_revision": base_revision_tag(job.model),
        **source_tags(dataset.manifest),
        "config_sha": config_sha(job),
        "code_version": code_version(),
        "flow_run_id": flow_run_id,
        "adapter_sha": trained.adapter_sha,
        "training.method": job.training.method,
        **(parent_tags(parent) if parent else {}),
        RUN_KEY_TAG: run_key,
        **(extra_tags or {}),
    }
    experiment_id = ensure_experiment(client, job.registry.experiment or job.name)
    # The run that watched the training live, when there was one and no version holds it yet: MLflow params are
    # immutable, so the same adapter registered again with another config (a re-evaluation, another model name)
    # gets a run of its own, which points back at the training run.
    live_run = trained.run_id if trained.run_id and not client.search_model_versions(
        f"run_id = '{trained.run_id}'") else None
    if live_run:
        run = client.get_run(live_run)
        client.log_batch(live_run, tags=[RunTag(k, v) for k, v in lineage.items()])
    else:
        lineage_of_run = {**lineage, **({TRAINING_RUN_TAG: trained.run_id} if trained.run_id else {})}
        run = client.create_run(experiment_id, tags={**lineage_of_run, "mlflow.runName": f"{job.name}-{run_key[:8]}"})
    run_id = run.info.run_id
    try:
        params = [Param(k, v[:6000]) for k, v in flatten(job.model_dump(mode="json")).items()]
        client.log_batch(run_id, params=params)
        history = json.loads(Path(trained.log_history).read_text())
        metrics = [Metric(f"train/{k}", float(v), 0, 0) for k, v in trained.metrics.items()]
        if not live_run:  # a live run has its loss curve already, point by point
            metrics += [Metric("train/loss", float(e["loss"]), 0, int(e["step"])) for e in history if "loss" in e]
        metrics += [Metric(k, float(v), 0, 0) for k, v in evaluated.metrics.items()]
        for start in range(0, len(metrics), 900):
            client.log_batch(run_id, metrics=metrics[start : start + 900])
        with tempfile.TemporaryDirectory() as scratch:
            work = Path(scratch)
            (work / "job.yaml").write_text(yaml.safe_dump(job.model_dump(mode="json"), allow_unicode=True,
                                                          sort_keys=False))
            loss_curve(history, work / "loss_curve.png")
            client.log_artifact(run_id, str(work / "job.yaml"), "config")
            client.log_artifact(run_id, str(work / "loss_curve.png"), "plots")
        client.log_artifact(run_id, config_path, "config")
        for file in ("stats.json", "rejected.jsonl"):
            client.log_artifact(run_id, str(Path(dataset.path) / file), "data")
        # data/manifest.json (files, shas, rows): what a later run diffs against. Older dataset outputs lack it.
        if (Path(dataset.path) / "manifest.json").is_file():
            client.log_artifact(run_id, str(Path(dataset.path) / "manifest.json"), "data")
        client.log_artifact(run_id, str(Path(chat.path) / "stats.json"), "data/chat")
        client.log_artifact(run_id, str(Path(chat.path) / "token_lengths.png"), "plots")
        client.log_artifact(run_id, trained.log_history, "train")
        for file in [*evaluated.artifacts, *(extra_artifacts or [])]:
            client.log_artifact(run_id, file, "eval")
        client.log_artifacts(run_id, trained.adapter_dir, "adapter")
        ensure_registered_model(client, name, f"LoRA adapters of job {job.name} on {job.model.base}")
        source = f"{run.info.artifact_uri}/adapter"
        version = client.create_model_version(name, source=source, run_id=run_id, tags=lineage,
                                              description=_describe(evaluated.metrics))
        version = first_version(client, name, run_key, version)
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    log.info("register: %s version %s from run %s", name, version.version, run_id)
    return RegisteredVersion(model_name=name, version=str(version.version), run_id=run_id,
                             experiment_id=experiment_id, source=source, tracking_uri=tracking_uri(job.registry),
                             created=True)


def registered_version(registry: RegistryConfig, model_name: str, version: str) -> RegisteredVersion:
    """A version already in the registry (one a person promoted), as the register step returns it."""
    client = client_for(registry)
    try:
        found = client.get_model_version(model_name, version)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise InputError(f"version {version!r}: {model_name} has no such version ({error.message})") from None
    if not found.run_id:
        raise InputError(f"version {version!r}: {model_name} v{version} has no run (not registered from a run)")
    return _existing(client, registry, found)


def _existing(client: MlflowClient, registry: RegistryConfig, version: ModelVersion) -> RegisteredVersion:
    return RegisteredVersion(model_name=version.name, version=str(version.version), run_id=version.run_id,
                             experiment_id=client.get_run(version.run_id).info.experiment_id,
                             source=version.source, tracking_uri=tracking_uri(registry), created=False)


def attach_directory(registry: RegistryConfig, run_id: str, directory: str, artifact_path: str) -> None:
    """Log a directory into a finished run once (a repeat finds it there and does nothing)."""
    client = client_for(registry)
    if not client.list_artifacts(run_id, artifact_path):
        client.log_artifacts(run_id, directory, artifact_path)


def record_warnings(registry: RegistryConfig, run_id: str, warnings: list[str]) -> None:
    """The warnings on the version's run: tag `loraflow.warnings` (searchable, `tags."loraflow.warnings" != ''`)
    and the run's note, which the MLflow UI shows at the top of the run. Nothing when there are none."""
    if not warnings:
        return
    text = "\n".join(f"- {warning}" for warning in warnings)
    client = client_for(registry)
    client.set_tag(run_id, WARNINGS_TAG, text[:TAG_VALUE_LIMIT])
    client.set_tag(run_id, NOTE_TAG, f"**loraflow warnings**\n\n{text}")


def _describe(metrics: dict[str, float]) -> str:
    base, tuned = metrics.get("base/perplexity"), metrics.get("tuned/perplexity")
    if base is None or tuned is None:
        return "LoRA adapter registered by loraflow."
    return f"LoRA adapter registered by loraflow. Held-out assistant perplexity {base:.3f} -> {tuned:.3f}."
