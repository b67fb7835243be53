"""evaluate: the base and base + adapter measured side by side on the same held-out data and benchmarks; a job that
started from a registered version (`training.init_from`) also measures that starting point, base + its adapter.

Metric names are `base/<name>`, `start/<name>` and `tuned/<name>` (e.g. `tuned/perplexity`,
`base/kobest_boolq/acc`). A DPO job's held-out split holds pairs: perplexity is measured on their chosen answers, and
preference accuracy and margin on both (loraflow/evaluation/preference.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import load_from_disk
from peft import PeftModel

from loraflow.base.load import load_tokenizer
from loraflow.config.evaluation import EvalConfig
from loraflow.config.lora import QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.evaluation import benchmarks, heldout
from loraflow.evaluation.comparison import TABLE_FILE, write_comparison
from loraflow.evaluation.perplexity import assistant_perplexity
from loraflow.evaluation.preference import chosen_conversations, is_pairs, preference_scores
from loraflow.outputs import write_json
from loraflow.results import ChatResult, EvalResult, ParentVersion, TrainResult
from loraflow.training.device import release_device_memory
from loraflow.training.models import load_base_model

log = logging.getLogger(__name__)


def _perplexity(label: str, measured, held_out, tokenizer, evaluation: EvalConfig,
                metrics: dict[str, float]) -> None:
    if evaluation.perplexity.enabled:
        scores = assistant_perplexity(measured, held_out, pad_id=tokenizer.pad_token_id,
                                      batch_size=evaluation.perplexity.batch_size,
                                      max_rows=evaluation.perplexity.max_rows)
        metrics[f"{label}/perplexity"] = scores["perplexity"]
        metrics[f"{label}/nll"] = scores["nll"]
        metrics["eval/assistant_tokens"] = scores["tokens"]


def _lm_eval(label: str, lm, heldout_lm, evaluation: EvalConfig, out_dir: Path, metrics: dict[str, float],
             files: list[str], task_dir: Path | None) -> None:
    """Adds `<label>/...` benchmark and held-out task metrics of one model through lm-eval (`hf`: one wrapper per
    configured batch size; `vllm`: one engine for both)."""
    if evaluation.benchmarks.tasks:
        run = benchmarks.run_lm(lm, evaluation.benchmarks, out_dir / "lm_eval", label)
        metrics.update({f"{label}/{name}": value for name, value in run.metrics.items()})
        metrics[f"eval/{label}_benchmark_seconds"] = run.seconds
        files += [f for f in (run.results_file, run.samples_file) if f]
    if task_dir is not None:
        run = heldout.run_heldout(heldout_lm, evaluation.heldout, task_dir, out_dir / "heldout", label)
        metrics.update({f"{label}/{name}": value for name, value in run.metrics.items()})
        metrics[f"eval/{label}_heldout_seconds"] = run.seconds
        files += [f for f in (run.results_file, run.samples_file, *run.extra_files) if f]


def _with_adapter(measured, adapter_dir: str, label: str) -> PeftModel:
    """Base + the adapter named `label`, the only one active: the base wrapped, or one more adapter loaded."""
    if isinstance(measured, PeftModel):
        measured.load_adapter(adapter_dir, adapter_name=label, is_trainable=False)
        measured.set_adapter(label)
        return measured
    return PeftModel.from_pretrained(measured, adapter_dir, adapter_name=label, is_trainable=False)


def evaluate(chat: ChatResult, trained: TrainResult, model: ModelConfig, quant: QuantizationConfig,
             evaluation: EvalConfig, out_dir: Path, key: str, parent: ParentVersion | None = None) -> EvalResult:
    metrics: dict[str, float] = {}
    files: list[str] = []
    tokenizer = load_tokenizer(model)
    held_out = load_from_disk(chat.tokenized_dir)["eval"]
    pairs = is_pairs(held_out)
    conversations = chosen_conversations(held_out) if pairs else held_out
    # Serving precision by default: the gate must judge the model vLLM serves (the 16-bit base + adapter), not the
    # 4-bit training view; on tiny-ko v1 the two differ by a few items (copa 0.633 vs 0.650). The base is measured
    # first: wrapping it with the adapter modifies it in place. The run's params record it (`eval.precision`).
    task_dir = None
    if evaluation.heldout.enabled:
        rows = heldout.heldout_rows(chat.tokenized_dir, tokenizer, evaluation.heldout.max_rows)
        labels = heldout.label_set(chat.tokenized_dir, tokenizer) if evaluation.heldout.kind == "labels" else None
        task_dir = heldout.write_task(rows, labels, evaluation.heldout, out_dir)
        metrics["eval/heldout_rows"] = float(len(rows))
        files += [str(task_dir / heldout.ROWS_FILE), str(task_dir / heldout.LABELS_FILE)]
    on_vllm = benchmarks.eval_backend(model, evaluation) == "vllm"

    def in_process(label: str, measured) -> None:
        _perplexity(label, measured, conversations, tokenizer, evaluation, metrics)
        if pairs:
            scores = preference_scores(measured, held_out, pad_id=tokenizer.pad_token_id,
                                       batch_size=evaluation.preference.batch_size,
                                       max_rows=evaluation.preference.max_rows)
            metrics.update({f"{label}/{name}": value for name, value in scores.items()})
        if not on_vllm:
            _lm_eval(label, benchmarks.in_process_lm(measured, tokenizer, evaluation.benchmarks.batch_size),
                     benchmarks.in_process_lm(measured, tokenizer, evaluation.heldout.batch_size), evaluation,
                     out_dir, metrics, files, task_dir)

    # The starting point of a job with training.init_from, then the tuned adapter, each on the base in turn.
    adapters = [*([("start", parent.adapter_dir)] if parent else []), ("tuned", trained.adapter_dir)]
    measured = load_base_model(model, quant, quantized=evaluation.precision == "training")
    in_process("base", measured)
    for label, adapter in adapters:
        measured = _with_adapter(measured, adapter, label)
        in_process(label, measured)
    del measured
    if on_vllm:  # the in-process model's memory is handed back before vLLM asks for its share
        release_device_memory()
        for label, adapter in (("base", None), *adapters):
            with benchmarks.vllm_lm(benchmarks.vllm_model_args(model, evaluation, adapter)) as lm:
                _lm_eval(label, lm, lm, evaluation, out_dir, metrics, files, task_dir)
    write_json(out_dir / "metrics.json", metrics)
    artifacts = [str(out_dir / "metrics.json"), *files, *(str(p) for p in write_comparison(metrics, out_dir))]
    log.info("evaluate:\n%s", (out_dir / TABLE_FILE).read_text())
    return EvalResult(key=key, path=str(out_dir), metrics=metrics, artifacts=artifacts)
