"""What a flow checks before any task starts (not a task itself: a bad config must fail the run with no step run)."""

from __future__ import annotations

from typing import Any

from loraflow.config import JobConfig, load_config
from loraflow.evaluation.benchmarks import validate_tasks


def validated_job(config: str, overrides: dict[str, Any] | None) -> JobConfig:
    """The config with its overrides, and the benchmark task names checked against lm-eval's index."""
    job = load_config(config, overrides)
    validate_tasks(job.eval.benchmarks)
    return job
