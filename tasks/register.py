import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from loraflow.config.job import JobConfig
from loraflow.data.summary import chat_warnings, dataset_warnings, heldout_hint
from loraflow.registry import register as plain
from loraflow.registry.client import client_for
from loraflow.registry.lineage import data_report
from loraflow.results import ChatResult, DatasetResult, EvalResult, ParentVersion, RegisteredVersion, TrainResult
from loraflow.training.loss_check import loss_warning
from tasks.prefect_glue import artifact_key, prefect_run_tags, publish_mlflow_run, retry_transient


# Not cached by Prefect: registration is idempotent on the registry side (same adapter + metrics = same version).
# Retries cover a tracking server that is unreachable for a while: the last one comes 100 s after the first failure,
# past an MLflow restart on a busy machine (10-30 s measured) even when MLflow's own request retries are exhausted.
@task(name="register", retries=3, retry_delay_seconds=[10, 30, 60], retry_condition_fn=retry_transient)
def register(job: JobConfig, config_path: str, dataset: DatasetResult, chat: ChatResult, trained: TrainResult,
             evaluated: EvalResult, parent: ParentVersion | None = None) -> RegisteredVersion:
    version = plain.register_adapter(job, config_path, dataset, chat, trained, evaluated,
                                     flow_run_id=flow_run.id or "", extra_tags=prefect_run_tags(), parent=parent)
    # Both ways: the MLflow run is tagged with this flow run; this flow run gets a link + metrics table artifact.
    publish_mlflow_run(tracking_uri=version.tracking_uri, experiment_id=version.experiment_id,
                       run_id=version.run_id, metrics=evaluated.metrics, name=job.registry.model_name,
                       model_version=version.version)
    # Which data this version saw, and what is new since the champion ("no new data" on an unchanged run).
    report = data_report(client_for(job.registry), version.model_name, version.version, version.run_id,
                         dataset.manifest, version.created)
    create_markdown_artifact(markdown=report, key=f"{artifact_key(job.registry.model_name)}-data",
                             description="Rows per source and what is new since the champion")
    get_run_logger().info(report.splitlines()[0].removeprefix("### "))
    # The warnings of the steps before (each logged by its task) and the hint that a label set could be judged by its
    # own metric (logged here) go on the MLflow run.
    hint = heldout_hint(dataset.stats, job.eval.heldout)
    if hint:
        get_run_logger().warning(hint)
    plain.record_warnings(job.registry, version.run_id,
                          [*step_warnings(dataset, chat, trained), *([hint] if hint else [])])
    return version


def step_warnings(dataset: DatasetResult, chat: ChatResult, trained: TrainResult) -> list[str]:
    """What the steps before warned about (each logged by its own task): a data step that dropped more than half of
    its rows, a training whose loss did not fall."""
    history = json.loads(Path(trained.log_history).read_text())
    return [*dataset_warnings(dataset.stats, dataset.path), *chat_warnings(chat.stats),
            *filter(None, [loss_warning(history)])]
