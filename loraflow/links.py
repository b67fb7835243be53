"""Link a Prefect flow run and its MLflow run both ways.

MLflow side: tags `prefect.flow_run_id` / `prefect.flow_run_url` (`prefect_run_tags`).
Prefect side: a link artifact to the MLflow run page and a markdown artifact with the metrics table
(`publish_mlflow_run`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL

from loraflow.comparison import comparison_table


def prefect_flow_run_url(flow_run_id: str) -> str | None:
    """The flow run's page in the Prefect UI, or None when no UI is reachable (ephemeral mode)."""
    ui_url = PREFECT_UI_URL.value()
    return f"{ui_url.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui_url else None


def prefect_run_tags() -> dict[str, str]:
    """Tags naming the current Prefect flow run, for the MLflow run; empty outside a flow run."""
    run_id = flow_run.get_id()
    if run_id is None:
        return {}
    tags = {"prefect.flow_run_id": run_id, "prefect.flow_run_name": flow_run.get_name() or ""}
    url = prefect_flow_run_url(run_id)
    if url:
        tags["prefect.flow_run_url"] = url
    return tags


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI; None for a store without a UI (sqlite:, file:)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def publish_mlflow_run(
    *,
    tracking_uri: str,
    experiment_id: str,
    run_id: str,
    metrics: Mapping[str, float],
    name: str,
    model_version: str | None = None,
) -> str | None:
    """Create the link and metrics artifacts on the current Prefect run; returns the MLflow run URL if any.

    `name` (e.g. the registered model name) keys the artifacts, so the Artifacts page keeps a history per job.
    """
    key = artifact_key(name)
    url = mlflow_run_url(tracking_uri, experiment_id, run_id)
    if url:
        create_link_artifact(
            link=url,
            link_text=f"MLflow run {run_id}",
            key=f"{key}-mlflow-run",
            description=f"MLflow run of this flow run ({tracking_uri})",
        )
    header = [f"### {name}: MLflow run `{run_id}`"]
    header.append(f"[open in MLflow]({url})" if url else f"tracking store: `{tracking_uri}`")
    if model_version:
        header.append(f"registered version: **{model_version}**")
    create_markdown_artifact(
        markdown="\n\n".join([*header, comparison_table(metrics)]),
        key=f"{key}-metrics",
        description="Metrics logged to MLflow, base vs tuned",
    )
    return url
