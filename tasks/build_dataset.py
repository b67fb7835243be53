from prefect import task

from loraflow.config.data import DataConfig
from loraflow.data.keys import dataset_key
from loraflow.data.sources import PinnedData, as_pinned
from loraflow.data.summary import dataset_summary, dataset_warnings
from loraflow.outputs import run_step
from loraflow.results import DatasetResult
from tasks.prefect_glue import report_step, retry_transient, step_cache


# Retries cover hub downloads; a bad local file fails the same way every time and is reported at once.
@task(name="build_dataset", **step_cache("dataset", dataset_key),
      retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_transient)
def build_dataset(data: PinnedData | DataConfig) -> DatasetResult:
    """`data` as the flow's pre-flight pinned it (tasks/validate.py): the key and the build read those very
    fingerprints. A plain DataConfig (a task called outside the finetune flow) is pinned once here."""
    pinned = as_pinned(data)
    key = dataset_key(pinned)

    def produce(out):
        from loraflow.data.build_dataset import build_dataset as build

        return build(pinned, out, key)

    dataset = run_step("dataset", key, DatasetResult, produce)
    report_step(dataset_summary(dataset.stats, dataset.path), dataset_warnings(dataset.stats, dataset.path),
                "What the data step read, kept and rejected")
    return dataset
