"""Small flows that exercise the stack's mechanics (worker, concurrency limit, scheduler, links) in seconds.

Deployed by tests/stackflows.yaml; each writes what it saw to LORAFLOW_HOME/stack-probe/<flow run id>.json.
"""

from __future__ import annotations

import json
import time

import mlflow
from prefect import flow, task
from prefect.runtime import flow_run

from loraflow import paths
from loraflow.localstack.prefect_api import accelerator
from tasks.prefect_glue import prefect_run_tags, publish_mlflow_run

PROBE_METRICS = {"base/perplexity": 9.0, "tuned/perplexity": 7.5, "train/loss": 1.25}


def _record(**values: object) -> None:
    (paths.sub("stack-probe") / f"{flow_run.get_id()}.json").write_text(json.dumps(values))


@task
def hold_accelerator(seconds: float) -> tuple[float, float]:
    with accelerator():
        entered = time.time()
        time.sleep(seconds)
        left = time.time()
    return entered, left


@flow(name="stack-probe")
def hold_accelerator_flow(seconds: float = 0.0) -> None:
    """Hold the `accelerator` slot for `seconds`, recording when the flow started and the slot was held."""
    started = time.time()
    entered, left = hold_accelerator(seconds)
    _record(started=started, entered=entered, left=left)


@flow(name="link-probe")
def link_probe_flow() -> None:
    """Log an MLflow run (to MLFLOW_TRACKING_URI, which the worker exports) and link it with this flow run."""
    started = time.time()
    experiment = mlflow.set_experiment("stack-probe")
    with mlflow.start_run(tags=prefect_run_tags()) as run:
        mlflow.log_metrics(PROBE_METRICS)
    url = publish_mlflow_run(
        tracking_uri=mlflow.get_tracking_uri(),
        experiment_id=experiment.experiment_id,
        run_id=run.info.run_id,
        metrics=PROBE_METRICS,
        name="stack-probe",
    )
    _record(started=started, mlflow_run_id=run.info.run_id, mlflow_url=url)
