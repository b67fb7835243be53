"""What the registry says to serve (aliases -> versions) and the canary's record."""

from __future__ import annotations

from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from loraflow.serving.canary import CanaryVerdict

CANARY_TAG = "serving.canary"
REASON_TAG = "serving.reason"
CANARY_AT_TAG = "serving.canary_at"  # when the verdict was reached (UTC, ISO 8601)


def aliased_versions(client: MlflowClient, model_name: str, aliases: list[str]) -> dict[str, ModelVersion]:
    """alias -> version for the aliases that are set (a fresh registry has none)."""
    found: dict[str, ModelVersion] = {}
    for alias in aliases:
        try:
            found[alias] = client.get_model_version_by_alias(model_name, alias)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST" and "not found" not in str(error).lower():
                raise
    return found


def record_canary(client: MlflowClient, version: ModelVersion, verdict: CanaryVerdict) -> None:
    """Tags on the model version: visible next to the alias in the MLflow UI."""
    client.set_model_version_tag(version.name, version.version, CANARY_TAG, "passed" if verdict.passed else "failed")
    client.set_model_version_tag(version.name, version.version, REASON_TAG, verdict.reason[:4000])
    client.set_model_version_tag(version.name, version.version, CANARY_AT_TAG,
                                 datetime.now(UTC).isoformat(timespec="seconds"))


def failed_before(version: ModelVersion, promoted_at: datetime | None = None) -> bool:
    """A version whose canary failed is not retried on every polling pass, only when an alias was set after the
    verdict (`promoted_at`, the time of the alias event that triggered this pass): promoting it again retries it."""
    if version.tags.get(CANARY_TAG) != "failed":
        return False
    if promoted_at is None or CANARY_AT_TAG not in version.tags:
        return True
    return datetime.fromisoformat(version.tags[CANARY_AT_TAG]) >= promoted_at
