from prefect import task

from loraflow import dataset as plain
from loraflow.config.data import DataConfig
from loraflow.results import DatasetResult
from loraflow.steps import prefect_cache_key, run_step


@task(name="build_dataset", cache_key_fn=prefect_cache_key("dataset", plain.dataset_key), persist_result=True)
def build_dataset(data: DataConfig) -> DatasetResult:
    key = plain.dataset_key(data)
    return run_step("dataset", key, DatasetResult, lambda out: plain.build_dataset(data, out, key))
