"""lm-evaluation-harness benchmarks on the base and on base + adapter, as a library.

Scoring is lm-eval's own: `simple_evaluate` on an `HFLM` wrapping an already-loaded model (base or PEFT), or on
CUDA (`eval.backend`) lm-eval's `vllm` model: the base, then the base with the adapter as a LoRA, as vLLM serves
them. Tasks come from lm-eval's index plus `include_path` (e.g. the offline tiny-ko KoBEST tasks).

Metrics are flattened to `{"<task>/<metric>": value}`; standard errors are kept as `<task>/<metric>_stderr`
where lm-eval computed one (it reports "N/A" for aggregations without one, which are dropped). A metric from a
non-default filter is named `<task>/<metric>:<filter>`.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from loraflow.config.evaluation import BenchmarkConfig, EvalConfig
from loraflow.config.loader import ConfigError
from loraflow.config.model import EMBEDDED_PREFIX, ModelConfig
from loraflow.logs import without_request_bars

if TYPE_CHECKING:  # torch is imported by whoever loaded the model; validation alone must stay light
    import torch

# Prefixed with the model's label (`base.lm_eval_results.json`) so base and tuned files can share a folder.
RESULTS_FILE = "lm_eval_results.json"
SAMPLES_FILE = "lm_eval_samples.jsonl"
FIELD = "eval.benchmarks"
VLLM_MODEL = "vllm"  # lm-eval's registered name of its in-process vLLM model (lm_eval/models/vllm_causallms.py)


class BenchmarkRun(BaseModel):
    """One model's lm-eval run: flat metrics and the files lm-eval's output was written to."""

    model_config = ConfigDict(frozen=True)

    metrics: dict[str, float]
    results_file: str
    samples_file: str | None
    seconds: float
    extra_files: list[str] = []  # what a caller derived from the samples (the held-out confusion matrix)


def resolve_include_path(include_path: str | None) -> str | None:
    """A folder lm-eval can scan; `embedded:tiny-kobest` is generated on first use."""
    if include_path is None:
        return None
    if include_path.startswith(EMBEDDED_PREFIX):
        name = include_path.removeprefix(EMBEDDED_PREFIX)
        from loraflow.tiny.kobest import EMBEDDED_NAME, tiny_kobest_dir

        if name != EMBEDDED_NAME:
            raise ConfigError(f"{FIELD}.include_path: unknown embedded task folder {name!r} "
                              f"(known: {EMBEDDED_NAME})")
        return str(tiny_kobest_dir())
    path = Path(include_path).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"{FIELD}.include_path: not a directory: {include_path}")
    return str(path)


@lru_cache(maxsize=8)
def _task_manager(include_path: str | None, include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager_for(tasks: list[str], include_path: str | None) -> Any:
    """The cheapest lm-eval index that knows every task: indexing only `include_path` takes milliseconds,
    lm-eval's ~15k built-in YAMLs take seconds, so the built-ins are indexed only when a task needs them.
    Cached per process."""
    if include_path is not None:
        local = _task_manager(include_path, False)
        if all(name in local.all_tasks for name in tasks):
            return local
    return _task_manager(include_path, True)


def validate_tasks(bench: BenchmarkConfig) -> None:
    """Fail before any training when a configured task is unknown to lm-eval (with include_path)."""
    if not bench.tasks:
        return
    include_path = resolve_include_path(bench.include_path)
    known = task_manager_for(bench.tasks, include_path).all_tasks
    problems = []
    for i, name in enumerate(bench.tasks):
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            where = f" in lm-eval's tasks or {include_path}" if include_path else " in lm-eval's tasks"
            problems.append(f"  {FIELD}.tasks[{i}]: unknown task {name!r}{where}{hint}")
    if problems:
        raise ConfigError(f"{len(problems)} invalid benchmark task(s)\n" + "\n".join(problems))


def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `results` section ({task: {"acc,none": 0.5, "acc_stderr,none": 0.06, ...}}) as flat names."""
    flat: dict[str, float] = {}
    for task, entries in results["results"].items():
        for key, value in entries.items():
            if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
                continue  # "alias", "N/A" stderr
            metric, filter_name = key.split(",", 1)
            suffix = "" if filter_name == "none" else f":{filter_name}"
            flat[f"{task}/{metric}{suffix}"] = float(value)
    return flat


def run_lm(lm: Any, bench: BenchmarkConfig, out_dir: Path, label: str, bootstrap_iters: int = 100000) -> BenchmarkRun:
    """The configured tasks on any lm-eval model (in-process, or an API model such as `local-completions`).
    `bootstrap_iters`: lm-eval's draws for the standard error of a corpus-level metric (chrF)."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    include_path = resolve_include_path(bench.include_path)
    started = time.perf_counter()
    results = simple_evaluate(
        model=lm,
        tasks=list(bench.tasks),
        num_fewshot=bench.num_fewshot,
        limit=bench.limit,
        log_samples=bench.log_samples,
        bootstrap_iters=bootstrap_iters,
        task_manager=task_manager_for(bench.tasks, include_path),
    )
    seconds = time.perf_counter() - started
    if results is None:  # only non-zero ranks of a distributed run get None; this runs single-process
        raise RuntimeError("lm-eval returned no results")
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None)
    results_file = out_dir / f"{label}.{RESULTS_FILE}"
    results_file.write_text(json.dumps(results, indent=2, ensure_ascii=False,
                                       default=handle_non_serializable))
    samples_file = None
    if samples is not None:
        samples_file = out_dir / f"{label}.{SAMPLES_FILE}"
        with samples_file.open("w", encoding="utf-8") as fh:
            for task, rows in samples.items():
                for row in rows:
                    fh.write(json.dumps({"task": task, **row}, ensure_ascii=False,
                                        default=handle_non_serializable) + "\n")
    return BenchmarkRun(metrics=flatten_results(results), results_file=str(results_file),
                        samples_file=str(samples_file) if samples_file else None, seconds=seconds)


def run_benchmarks(model: torch.nn.Module, tokenizer: Any, bench: BenchmarkConfig, out_dir: Path,
                   label: str) -> BenchmarkRun:
    """Run the configured tasks on an in-process model (a transformers model or a PEFT model over one).
    `label` (e.g. `base`, `tuned`) names the output files."""
    return run_lm(in_process_lm(model, tokenizer, bench.batch_size), bench, out_dir, label)


def in_process_lm(model: torch.nn.Module, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's `HFLM` over an already-loaded model (base or PEFT)."""
    from lm_eval.models.huggingface import HFLM

    return without_request_bars(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size))


def eval_backend(model: ModelConfig, evaluation: EvalConfig) -> str:
    """`hf` or `vllm` for this job on this machine (`eval.backend`)."""
    from loraflow.training.models import device_for

    if evaluation.backend == "vllm" and (device_for(model) != "cuda" or evaluation.precision != "serving"):
        raise ConfigError("eval.backend: `vllm` needs model.device cuda and eval.precision `serving` (vLLM serves "
                          "the 16-bit base); use `hf` or `auto`")
    if evaluation.backend != "auto":
        return evaluation.backend
    return "vllm" if device_for(model) == "cuda" and evaluation.precision == "serving" else "hf"


def vllm_model_args(model: ModelConfig, evaluation: EvalConfig, adapter_dir: str | Path | None) -> dict[str, Any]:
    """lm-eval `vllm` model_args for the base (`adapter_dir` None) or base + adapter: the base at its revision in
    the serving dtype, the adapter as a LoRA of the smallest rank vLLM accepts that holds it."""
    from loraflow.base.load import resolve_base
    from loraflow.serving.server_spec import adapter_rank, vllm_lora_rank
    from loraflow.training.models import device_for, dtype_for

    args: dict[str, Any] = {
        "pretrained": resolve_base(model),
        "revision": model.revision,
        "trust_remote_code": model.trust_remote_code,
        "dtype": str(dtype_for(model.dtype, device_for(model))).removeprefix("torch."),
        "gpu_memory_utilization": evaluation.gpu_memory_utilization,
        "batch_size": "auto",  # vLLM schedules its own batches
        "max_model_len": evaluation.max_model_len,
    }
    if adapter_dir is not None:
        args |= {"lora_local_path": str(adapter_dir), "max_lora_rank": vllm_lora_rank([adapter_rank(adapter_dir)])}
    return args


@contextmanager
def vllm_lm(args: dict[str, Any]) -> Iterator[Any]:
    """lm-eval's `vllm` model, its engine shut down on exit: the engine core is a process of its own that holds
    its share of the GPU until it ends. Refused before starting when the GPU lacks the memory vLLM will ask for."""
    from lm_eval.api.registry import get_model

    from loraflow.training.device import require_free_gpu_memory

    require_free_gpu_memory(args["gpu_memory_utilization"], 1, "eval.gpu_memory_utilization")
    lm = get_model(VLLM_MODEL)(**args)
    try:
        yield lm
    finally:
        lm.model.llm_engine.engine_core.shutdown()
