"""What a flow checks before any task starts (not a task itself: a bad config must fail the run with no step run)."""

from __future__ import annotations

from typing import Any

from loraflow.config import JobConfig, load_config
from loraflow.data.sources import pinned_model
from loraflow.evaluation.benchmarks import validate_tasks


def validated_job(config: str, overrides: dict[str, Any] | None) -> JobConfig:
    """The config with its overrides, the benchmark task names checked against lm-eval's index, and the base's
    moving revision (`main`) pinned to the commit it points to now: every step of this run then keys, loads and
    records that one commit, even if `main` moves mid-run (vLLM's --revision included)."""
    job = load_config(config, overrides)
    validate_tasks(job.eval.benchmarks)
    return job.model_copy(update={"model": pinned_model(job.model)})
