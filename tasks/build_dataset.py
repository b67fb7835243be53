from prefect import task

from loraflow.config.data import DataConfig
from loraflow.keys import dataset_key
from loraflow.outputs import run_step
from loraflow.results import DatasetResult
from tasks.prefect_glue import retry_transient, step_cache


# Retries cover hub downloads; a bad local file fails the same way every time and is reported at once.
@task(name="build_dataset", **step_cache("dataset", dataset_key),
      retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_transient)
def build_dataset(data: DataConfig) -> DatasetResult:
    key = dataset_key(data)

    def produce(out):
        from loraflow.data.build_dataset import build_dataset as build

        return build(data, out, key)

    return run_step("dataset", key, DatasetResult, produce)
