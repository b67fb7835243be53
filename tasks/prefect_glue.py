"""Prefect glue shared by the tasks: cross-run cache keys, which failures are retried, concurrency slots (the
`accelerator`), and the links between a Prefect flow run and its MLflow run. The plain functions under loraflow/
know nothing of Prefect.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, PREFECT_UI_URL
from pydantic import ValidationError

from loraflow.errors import InputError
from loraflow.evaluation.comparison import comparison_table
from loraflow.localstack.prefect_api import run_logger
from loraflow.outputs import is_done
from loraflow.registry.client import run_url


def step_cache(step: str, key_fn: Callable[..., str]) -> dict[str, Any]:
    """`@task` options that make Prefect's cross-run cache follow the step's content-addressed directory.

    The cache key is always the step's content key, so the first run's record is the one an identical rerun finds
    (state `Cached`). While the step's files are missing (never made, or deleted), a record left under that key
    is deleted first: a cached result whose files are gone is a miss, never a dead path.
    """
    accepted = set(inspect.signature(key_fn).parameters)  # a task may take more than its key depends on

    def cache_key(_context: Any, parameters: dict[str, Any]) -> str:
        key = key_fn(**{name: value for name, value in parameters.items() if name in accepted})
        if not is_done(step, key):
            (Path(PREFECT_RESULTS_LOCAL_STORAGE_PATH.value()) / f"{step}-{key}").unlink(missing_ok=True)
        return f"{step}-{key}"

    return {"cache_key_fn": cache_key, "persist_result": True}


# The same on every attempt: bad config or data (ValueError covers pydantic, JSON, the data step's DatasetError), a
# missing or unreadable file, a programming error. A retry would only delay the message.
PERMANENT = (InputError, ValidationError, ValueError, TypeError, LookupError, AttributeError, AssertionError,
             FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_transient(error: BaseException) -> bool:
    """Whether a retry can heal it: a lost connection, a server restarting (5xx, 429), a process that died."""
    if isinstance(error, MlflowException):
        return error.get_http_status_code() >= 500 or error.get_http_status_code() == 429
    status = getattr(getattr(error, "response", None), "status_code", None)  # httpx's and requests' HTTP errors
    if isinstance(status, int):
        return status >= 500 or status == 429
    return not isinstance(error, PERMANENT)


def retry_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """`retry_condition_fn` of every task with retries: Prefect hands it the failed state holding the exception."""
    error = state.data
    if isinstance(error, BaseException) and not is_transient(error):
        run_logger().info("not retried (%s: the same on every attempt): %s", type(error).__name__, error)
        return False
    return True


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


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def report_step(summary: list[str], warnings: list[str], description: str) -> None:
    """A step's summary in the run's log and as a markdown artifact of its task run, its warnings as log warnings
    (the Prefect UI shows them in the flow run's log) and at the top of the artifact."""
    logger = run_logger()
    logger.info("\n".join(summary))
    for warning in warnings:
        logger.warning(warning)
    markdown = "\n".join([*(f"> **warning:** {warning}\n" for warning in warnings), f"**{summary[0]}**\n",
                          *summary[1:]])
    create_markdown_artifact(markdown=markdown, description=description)


def publish_mlflow_run(*, tracking_uri: str, experiment_id: str, run_id: str, metrics: Mapping[str, float],
                       name: str, model_version: str | None = None) -> str | None:
    """Create the link and metrics artifacts on the current Prefect run; returns the MLflow run URL if any.

    `name` (e.g. the registered model name) keys the artifacts, so the Artifacts page keeps a history per job.
    """
    key = artifact_key(name)
    url = run_url(tracking_uri, experiment_id, run_id)
    if url:
        create_link_artifact(link=url, link_text=f"MLflow run {run_id}", key=f"{key}-mlflow-run",
                             description=f"MLflow run of this flow run ({tracking_uri})")
    header = [f"### {name}: MLflow run `{run_id}`"]
    header.append(f"[open in MLflow]({url})" if url else f"tracking store: `{tracking_uri}`")
    if model_version:
        header.append(f"registered version: **{model_version}**")
    create_markdown_artifact(markdown="\n\n".join([*header, comparison_table(metrics)]), key=f"{key}-metrics",
                             description="Metrics logged to MLflow, base vs tuned")
    return url
