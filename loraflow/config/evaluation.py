"""What is measured on the base and on base + adapter, side by side."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loraflow.config.base import Section


class PerplexityConfig(Section):
    """Token-weighted perplexity over the assistant tokens of the held-out split."""

    enabled: bool = Field(default=True, description="Measure perplexity on the base and on base + adapter.")
    max_rows: int | None = Field(default=None, gt=0, description="The first held-out rows measured (None: all).")
    batch_size: int = Field(default=4, gt=0, description="Conversations per forward pass.")


class PreferenceConfig(Section):
    """A DPO job's held-out pairs: how often each model prefers `chosen`, and by how much
    (loraflow/evaluation/preference.py)."""

    max_rows: int | None = Field(default=None, gt=0, description="The first held-out pairs measured (None: all).")
    batch_size: int = Field(default=4, gt=0, description="Pairs per forward pass (two sequences each).")


class BenchmarkConfig(Section):
    """lm-evaluation-harness tasks (e.g. kobest_boolq), run through lm-eval's own task machinery.

    `include_path` adds a folder of task YAMLs: a directory, or `embedded:tiny-kobest` (offline KoBEST-format
    tasks built from the embedded corpus). Task names are checked against lm-eval's index at flow start
    (loraflow/evaluation/benchmarks.py, `validate_tasks`), before any training.
    """

    tasks: list[str] = Field(default_factory=list, description="lm-eval task names (e.g. `kobest_boolq`); empty: "
                             "no benchmarks.")
    include_path: str | None = Field(default=None, description="A folder of task YAMLs, or `embedded:tiny-kobest`.")
    num_fewshot: int = Field(default=0, ge=0, description="Few-shot examples per prompt.")
    limit: int | None = Field(default=None, gt=0, description="Items per task (None: all).")
    batch_size: int = Field(default=8, gt=0, description="lm-eval's batch size.")
    log_samples: bool = Field(default=True, description="Write per-item requests and responses next to the "
                              "results json (debugging a score needs them).")


class HeldoutConfig(Section):
    """The task's own metric: the assistant turn of each held-out row generated greedily and scored against the
    reference, through an lm-eval `generate_until` task built from the split (loraflow/evaluation/heldout.py), in
    process and, once served, through the router. Metrics `heldout/exact_match` always; `labels`: also accuracy,
    macro-F1, per-class table, confusion matrix and the most confused pairs over the label set (every answer
    of the train and held-out splits); `text`: also chrF."""

    enabled: bool = Field(default=False, description="Score the task's own metric on the held-out rows.")
    kind: Literal["labels", "text"] = Field(default="labels", description="`labels`: accuracy, macro-F1 and "
                                            "confusion over the label set; `text`: chrF too.")
    max_rows: int | None = Field(default=None, gt=0, description="The first rows of the (hash-ordered) split, a "
                                 "fixed sample (None: all).")
    max_new_tokens: int = Field(default=32, gt=0, description="Tokens generated per answer (greedy).")
    batch_size: int = Field(default=8, gt=0, description="Rows generated per batch.")
    top_confused: int = Field(default=10, gt=0, description="How many most-confused label pairs are reported.")


class EvalConfig(Section):
    perplexity: PerplexityConfig = PerplexityConfig()
    preference: PreferenceConfig = Field(default=PreferenceConfig(), description="Preference accuracy and margin "
                                         "on the held-out pairs (training.method dpo).")
    benchmarks: BenchmarkConfig = BenchmarkConfig()
    heldout: HeldoutConfig = HeldoutConfig()
    # `serving` makes the promotion gate judge what will answer; `training` is for a GPU that cannot hold the 16-bit
    # base (a 7B base in bf16 needs ~15 GB).
    precision: Literal["serving", "training"] = Field(
        default="serving", description="`serving`: base and tuned measured as vLLM serves them (the base in "
        "model.dtype, not 4-bit, plus the adapter); `training`: as trained (the 4-bit base for QLoRA).")
    # The evaluate step runs before deploy, while the job's vLLM may already serve on the same GPU (qwen-ko: 0.45):
    # the evaluation's own vLLM must fit in what is left, hence its own fraction (0.45 + 0.4 < 0.9, vLLM's default).
    backend: Literal["auto", "hf", "vllm"] = Field(
        default="auto", description="What runs the benchmarks and the held-out task: `hf` (lm-eval `hf` over the "
        "in-process model), `vllm` (lm-eval `vllm`: the base, then the base + adapter as a LoRA, in the serving "
        "dtype; CUDA only); `auto`: vllm when model.device resolves to cuda and precision is `serving`, else hf. "
        "Perplexity is always measured in process.")
    gpu_memory_utilization: float = Field(
        default=0.4, gt=0, le=1, description="The GPU memory fraction the evaluation's vLLM takes (backend vllm): "
        "with the job's vLLM serving beside it, this plus serving.gpu_memory_utilization must stay below 1.")
    max_model_len: int | None = Field(
        default=None, gt=0, description="The evaluation's vLLM context length (backend vllm); None: the model's "
        "own (32k for Qwen2.5), which needs its KV cache for one sequence of that length.")
