"""Prefect task: merge the adapter into the base (optional, `merge.enabled`) and attach it to the version's run."""

from __future__ import annotations

from contextlib import nullcontext

from prefect import task
from prefect.cache_policies import NO_CACHE

from loraflow.config.job import JobConfig
from loraflow.keys import merge_key
from loraflow.outputs import run_step
from loraflow.registry.register import attach_directory
from loraflow.results import MergeResult, RegisteredVersion, TrainResult
from tasks.prefect_glue import accelerator


# No Prefect cache: the content-addressed step directory already makes a repeat cheap, and the merged model must
# be attached to whichever run registered this adapter.
@task(name="merge", cache_policy=NO_CACHE)
def merge(config: JobConfig, trained: TrainResult, version: RegisteredVersion) -> MergeResult | None:
    if not config.merge.enabled:
        return None
    key = merge_key(trained.adapter_sha, config.model, config.merge)

    def produce(out_dir):
        from loraflow.training.merge import merge_adapter

        # An fp32 merge on the GPU needs 4 bytes per parameter there: the slot, as for training.
        on_gpu = (config.merge.device if config.merge.device != "auto" else config.model.device) != "cpu"
        with accelerator() if on_gpu else nullcontext():
            return merge_adapter(trained.adapter_dir, trained.adapter_sha, config.model, config.merge, out_dir)

    result = run_step("merge", key, MergeResult, produce)
    attach_directory(config.registry, version.run_id, result.merged_dir, "merged")
    return result
