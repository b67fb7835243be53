"""What is measured on the base and on base + adapter, side by side."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loraflow.config.base import Section


class PerplexityConfig(Section):
    """Token-weighted perplexity over the assistant tokens of the held-out split."""

    enabled: bool = True
    max_rows: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=4, gt=0)


class BenchmarkConfig(Section):
    """lm-evaluation-harness tasks (e.g. kobest_boolq), run through lm-eval's own task machinery.

    `include_path` adds a folder of task YAMLs: a directory, or `embedded:tiny-kobest` (offline KoBEST-format
    tasks built from the embedded corpus). Task names are checked against lm-eval's index at flow start
    (`loraflow.benchmarks.validate_tasks`), before any training.
    """

    tasks: list[str] = Field(default_factory=list)
    include_path: str | None = None
    num_fewshot: int = Field(default=0, ge=0)
    limit: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, gt=0)
    # Per-item requests and responses next to the results json (debugging a score needs them).
    log_samples: bool = True


class HeldoutConfig(Section):
    """The task's own metric: the assistant turn of each held-out row generated greedily and scored against the
    reference, through an lm-eval `generate_until` task built from the split (loraflow/evaluation/heldout.py), in
    process and, once served, through the router. Metrics `heldout/exact_match` always; `labels`: also accuracy,
    macro-F1, per-class table, confusion matrix and the most confused pairs over the label set (every answer
    of the train and held-out splits); `text`: also chrF."""

    enabled: bool = False
    kind: Literal["labels", "text"] = "labels"
    max_rows: int | None = Field(default=None, gt=0)  # the first rows of the (hash-ordered) split: a fixed sample
    max_new_tokens: int = Field(default=32, gt=0)
    batch_size: int = Field(default=8, gt=0)
    top_confused: int = Field(default=10, gt=0)


class EvalConfig(Section):
    perplexity: PerplexityConfig = PerplexityConfig()
    benchmarks: BenchmarkConfig = BenchmarkConfig()
    heldout: HeldoutConfig = HeldoutConfig()
    # `serving`: base and tuned are measured as vLLM serves them (the base in model.dtype, not 4-bit, plus the
    # adapter): the promotion gate judges what will answer. `training`: as trained (the 4-bit base for QLoRA), for a
    # GPU that cannot hold the 16-bit base (a 7B base in bf16 needs ~15 GB).
    precision: Literal["serving", "training"] = "serving"
