from prefect import task

from loraflow import dataset as plain
from loraflow.config.data import DataConfig
from loraflow.results import DatasetResult
from loraflow.steps import prefect_cache_key, run_step


# Retries cover hub downloads; a bad local file fails the same way every time and is reported at once.
@task(name="build_dataset", cache_key_fn=prefect_cache_key("dataset", plain.dataset_key), persist_result=True,
      retries=2, retry_delay_seconds=[10, 60])
def build_dataset(data: DataConfig) -> DatasetResult:
    key = plain.dataset_key(data)
    return run_step("dataset", key, DatasetResult, lambda out: plain.build_dataset(data, out, key))
