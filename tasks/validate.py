"""What a flow checks before any task starts (not a task itself: a bad config must fail the run with no step run)."""

from __future__ import annotations

from typing import Any, NamedTuple

from loraflow.base.revision import pinned_model
from loraflow.config import JobConfig, load_config
from loraflow.data.sources import PinnedData, pin_data
from loraflow.evaluation.benchmarks import validate_tasks
from loraflow.registry.parent import pin_parent
from loraflow.results import ParentVersion


class PreFlight(NamedTuple):
    job: JobConfig  # with the base's revision and each hub source's pinned
    data: PinnedData  # the data's fingerprints, for build_dataset
    parent: ParentVersion | None  # training.init_from resolved, its adapter on disk; None without one


def validated_job(config: str, overrides: dict[str, Any] | None) -> PreFlight:
    """The config with its overrides, the benchmark task names checked against lm-eval's index, and every moving
    reference resolved once: the base's revision (`main`) pinned to the commit it points to now, each hub
    dataset's likewise, each local source fingerprinted by its files' contents, and `training.init_from`
    (`tiny-ko@champion`) to the version it names now and its adapter's content. Every step of this run then keys,
    loads and records those very commits, files and version, even if `main` or the alias moves mid-run (vLLM's
    --revision included)."""
    job = load_config(config, overrides)
    validate_tasks(job.eval.benchmarks)
    data = pin_data(job.data)  # a missing file or an unresolvable revision fails here, naming the field
    parent = pin_parent(job) if job.training.init_from else None  # likewise a version the registry does not hold
    return PreFlight(job.model_copy(update={"model": pinned_model(job.model), "data": data.data}), data, parent)
