"""Prefect task: merge the adapter into the base (`merge.enabled`) when the promote step made this version champion,
and attach it to the version's run. A rejected or challenger version is not merged: a merged 7B is ~15 GB per
upload. `loraflow merge CONFIG --version N` merges a version promoted later (the same plain function)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from loraflow.config.job import JobConfig
from loraflow.localstack.prefect_api import accelerator
from loraflow.registry.promote import CHAMPION, PromotionDecision
from loraflow.results import MergeResult, RegisteredVersion, TrainResult


# No Prefect cache: the content-addressed step directory already makes a repeat cheap, and the merged model must
# be attached to whichever run registered this adapter.
@task(name="merge", cache_policy=NO_CACHE)
def merge(job: JobConfig, trained: TrainResult, version: RegisteredVersion,
          decision: PromotionDecision) -> MergeResult | None:
    if not job.merge.enabled:
        return None
    if decision.alias != CHAMPION:
        get_run_logger().info("merge: %s v%s is %s, not champion: not merged (`loraflow merge CONFIG --version %s` "
                              "merges it once promoted)", version.model_name, version.version,
                              decision.alias or "rejected", version.version)
        return None
    from loraflow.training.merge import merge_registered

    # An fp32 merge on the GPU needs 4 bytes per parameter there: the slot, as for training.
    return merge_registered(job, trained.adapter_dir, trained.adapter_sha, version.run_id, slot=accelerator)
