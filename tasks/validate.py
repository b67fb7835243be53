"""What a flow checks before any task starts (not a task itself: a bad config must fail the run with no step run)."""

from __future__ import annotations

from typing import Any

from loraflow.base.revision import pinned_model
from loraflow.config import JobConfig, load_config
from loraflow.data.sources import PinnedData, pin_data
from loraflow.evaluation.benchmarks import validate_tasks


def validated_job(config: str, overrides: dict[str, Any] | None) -> tuple[JobConfig, PinnedData]:
    """The config with its overrides, the benchmark task names checked against lm-eval's index, and every moving
    reference resolved once: the base's revision (`main`) pinned to the commit it points to now, each hub
    dataset's likewise, each local source fingerprinted by its files' contents. Every step of this run then keys,
    loads and records those very commits and files, even if `main` moves mid-run (vLLM's --revision included):
    the job carries the pinned revisions, the PinnedData (for build_dataset) the fingerprints."""
    job = load_config(config, overrides)
    validate_tasks(job.eval.benchmarks)
    data = pin_data(job.data)  # a missing file or an unresolvable revision fails here, naming the field
    return job.model_copy(update={"model": pinned_model(job.model), "data": data.data}), data
