"""The registered version a job starts from (`training.init_from`), pinned once at flow start like the base's
revision: an alias (`tiny-ko@champion`) resolved to the version it points at now, that version's adapter downloaded
(loraflow/registry/download.py) and hashed, and checked to be an adapter of the job's base, of the shape `lora`
describes. An alias moved mid-run changes nothing: every step reads this one record. The new version's lineage tags
name its parent and the chain of parents before it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlflow.exceptions import MlflowException

from loraflow import paths
from loraflow.config.job import JobConfig
from loraflow.config.training import VERSION_REFERENCE
from loraflow.errors import InputError
from loraflow.registry.client import client_for, tracking_uri
from loraflow.registry.download import adapter_sha, download_version
from loraflow.results import ParentVersion

PARENT_TAG = "parent_version"  # `tiny-ko/3`
LINEAGE_TAG = "lineage"  # the parent and its own parents, nearest first: `tiny-ko-dpo/2 <- tiny-ko/3`
REFERENCE = re.compile(VERSION_REFERENCE)
# What the registry answers for a model, version or alias it does not hold (anything else, an unreachable server
# included, is raised as it is: a retry may heal it).
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def pin_parent(job: JobConfig) -> ParentVersion:
    """`training.init_from` as the version it names now, its adapter on local disk. A name the registry does not
    hold, an adapter of another base or of another shape than `lora` fail here, before any step runs."""
    reference = job.training.init_from
    assert reference is not None
    match = REFERENCE.match(reference)
    assert match is not None  # TrainingConfig's pattern
    name, alias, number = match["model"], match["alias"], match["version"]
    client, uri = client_for(job.registry), tracking_uri(job.registry)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as error:
        if error.error_code not in NOT_FOUND:
            raise
        what = f"alias {alias!r}" if alias else f"version {number}"
        raise InputError(f"training.init_from: {reference!r}: the registry at {uri} has no {what} of model "
                         f"{name!r} ({error.message})") from None
    version = f"{name}/{found.version}"
    base = found.tags.get("base_model")
    if base is not None and base != job.model.base:
        raise InputError(f"training.init_from: {reference!r} ({version}) is an adapter of {base}; this job's "
                         f"model.base is {job.model.base}")
    adapter_dir = download_version(found, paths.sub("parents", name, found.run_id or "no-run"), uri)
    check_shape(job, reference, version, adapter_dir)
    ancestors = found.tags.get(LINEAGE_TAG)
    return ParentVersion(model_name=name, version=str(found.version), requested=reference,
                         adapter_sha=adapter_sha(adapter_dir), adapter_dir=str(adapter_dir), run_id=found.run_id,
                         lineage=f"{version} <- {ancestors}" if ancestors else version)


def check_shape(job: JobConfig, reference: str, version: str, adapter_dir: Path) -> None:
    """The parent's adapter is what trains: `lora` (which the plan, the keys and the run's params read) must say
    what it is."""
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    lora = job.lora
    targets = sorted(saved.get("target_modules") or [])
    same = saved.get("r") == lora.r and saved.get("lora_alpha") == lora.alpha and (
        isinstance(lora.target_modules, str) or sorted(lora.target_modules) == targets)
    if not same:
        raise InputError(f"lora: training.init_from {reference!r} ({version}) is an adapter of r={saved.get('r')}, "
                         f"alpha={saved.get('lora_alpha')} on {targets}; set `lora` to its shape (r={lora.r}, "
                         f"alpha={lora.alpha}, target_modules={lora.target_modules} now)")


def parent_tags(parent: ParentVersion) -> dict[str, str]:
    """The lineage tags of a version trained from `parent` (on the version and on its MLflow run)."""
    return {PARENT_TAG: parent.name, LINEAGE_TAG: parent.lineage, "parent_adapter_sha": parent.adapter_sha,
            "parent_run_id": parent.run_id or ""}
