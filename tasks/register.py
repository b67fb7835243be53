from prefect import task
from prefect.runtime import flow_run

from loraflow import registry as plain
from loraflow.config.job import JobConfig
from loraflow.results import ChatResult, DatasetResult, EvalResult, RegisteredVersion, TrainResult


# Not cached by Prefect: registration is idempotent on the registry side (same adapter + metrics = same version).
@task(name="register", retries=2, retry_delay_seconds=5)
def register(job: JobConfig, config_path: str, dataset: DatasetResult, chat: ChatResult, trained: TrainResult,
             evaluated: EvalResult) -> RegisteredVersion:
    return plain.register_adapter(job, config_path, dataset, chat, trained, evaluated,
                                  flow_run_id=flow_run.id or "")
