"""The one place that knows where the registry is and builds an MLflow client for it."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from loraflow import paths
from loraflow.config.registry import RegistryConfig


def tracking_uri(registry: RegistryConfig) -> str:
    """The job's `registry.tracking_uri`, else MLFLOW_TRACKING_URI, else the embedded store under LORAFLOW_HOME."""
    return registry.tracking_uri or paths.default_tracking_uri()


def client_at(uri: str) -> MlflowClient:
    """Tracking and registry share one store: a model version's run lives where the version does."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def client_for(registry: RegistryConfig) -> MlflowClient:
    return client_at(tracking_uri(registry))


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI; None for a store without a UI (sqlite:, file:)."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def ensure_experiment(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        # An embedded store keeps artifacts beside it under LORAFLOW_HOME, not in ./mlruns.
        location = (paths.default_artifact_root() / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as error:  # another training created it a moment ago (a shared registry)
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id
