"""heldout: the job's own task, judged by its own metric. The assistant turn of each held-out row is generated
greedily and scored against the reference through an lm-eval `generate_until` task built from the split (the
same task, on the same rows, in process with `HFLM` and, once served, through the router with `local-completions`).

The rows come from the tokenized split the perplexity is measured on: the prompt is the row's tokens up to its last
assistant turn (`<|im_start|>assistant\\n` included, as the chat template renders a generation prompt), the
reference that turn's text without `<|im_end|>`. lm-eval scores `exact_match` (and chrF for free text); for a
label set, `labels.py` adds accuracy, macro-F1, the per-class table and the confusion matrix from lm-eval's own
per-item samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from datasets import load_from_disk

from loraflow.config.evaluation import BenchmarkConfig, HeldoutConfig
from loraflow.data.format_chat import END_OF_TURN, assistant_spans
from loraflow.evaluation import benchmarks
from loraflow.evaluation.labels import label_metrics

TASK = "heldout"
ROWS_FILE = "heldout_rows.jsonl"
LABELS_FILE = "heldout_labels.json"
TASK_DIR = "heldout_task"
# chrF's standard error is a bootstrap over corpus scores; lm-eval's default 100,000 draws take hours on 500 rows.
BOOTSTRAP_ITERS = 200


def _last_turn(ids: list[int], mask: list[int], tokenizer: Any) -> tuple[str, str]:
    start, end = assistant_spans(mask)[-1]
    prompt = tokenizer.decode(ids[:start], skip_special_tokens=False)
    return prompt, tokenizer.decode(ids[start:end - 1], skip_special_tokens=False)  # end - 1: the <|im_end|>


def heldout_rows(tokenized_dir: str, tokenizer: Any, max_rows: int | None) -> list[dict[str, str]]:
    """The held-out rows as (prompt, reference); `max_rows` takes the first rows, a fixed sample (the split is in
    the order of a hash of each row's content)."""
    split = load_from_disk(tokenized_dir)["eval"]
    if max_rows is not None:
        split = split.select(range(min(max_rows, len(split))))
    rows = []
    for ids, mask in zip(split["input_ids"], split["assistant_masks"], strict=True):
        prompt, reference = _last_turn(ids, mask, tokenizer)
        rows.append({"prompt": prompt, "reference": reference})
    return rows


def label_set(tokenized_dir: str, tokenizer: Any) -> list[str]:
    """Every answer the model was trained or judged on, sorted: the classes of a label-set job."""
    splits = load_from_disk(tokenized_dir)
    answers = {_last_turn(ids, mask, tokenizer)[1] for name in ("train", "eval")
               for ids, mask in zip(splits[name]["input_ids"], splits[name]["assistant_masks"], strict=True)}
    return sorted(answers)


def task_yaml(rows_file: Path, heldout: HeldoutConfig) -> dict[str, Any]:
    """The lm-eval task: prompts and references are columns, used as they are (no Jinja rendering)."""
    # Surrounding whitespace is not an answer: an answer is compared stripped, here and in labels.py.
    metrics: list[dict[str, Any]] = [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                      "regexes_to_ignore": [r"^\s+", r"\s+$"]}]
    if heldout.kind == "text":
        metrics.append({"metric": "chrf", "aggregation": "chrf", "higher_is_better": True})
    return {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(rows_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "prompt",
        "doc_to_target": "reference",
        "target_delimiter": "",
        "generation_kwargs": {"until": [END_OF_TURN], "do_sample": False, "temperature": 0.0,
                              "max_gen_toks": heldout.max_new_tokens},
        "metric_list": metrics,
        "metadata": {"version": 1.0},
    }


def write_task(rows: list[dict[str, str]], labels: list[str] | None, heldout: HeldoutConfig,
               out_dir: Path) -> Path:
    """The rows, the label set and the task YAML under `out_dir/heldout_task/`; the rows and labels files are
    logged with the version, so the served check scores the very rows that were judged."""
    task_dir = out_dir / TASK_DIR
    task_dir.mkdir(parents=True, exist_ok=True)
    rows_file = task_dir / ROWS_FILE
    with rows_file.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    (task_dir / LABELS_FILE).write_text(json.dumps(labels, ensure_ascii=False, indent=1), encoding="utf-8")
    (task_dir / f"{TASK}.yaml").write_text(yaml.safe_dump(task_yaml(rows_file, heldout), allow_unicode=True),
                                           encoding="utf-8")
    return task_dir


def read_task_labels(task_dir: Path) -> list[str] | None:
    return json.loads((task_dir / LABELS_FILE).read_text(encoding="utf-8"))


def run_heldout(lm: Any, heldout: HeldoutConfig, task_dir: Path, out_dir: Path,
                label: str) -> benchmarks.BenchmarkRun:
    """Score one model (in process or served) on the task in `task_dir`: `heldout/exact_match` (+ chrF) from
    lm-eval, and for a label set `heldout/accuracy`, `heldout/macro_f1` and the confusion files
    (`<label>.heldout_confusion.png/.csv`, `<label>.heldout_per_class.csv`) from its samples."""
    bench = BenchmarkConfig(tasks=[TASK], include_path=str(task_dir), batch_size=heldout.batch_size,
                            log_samples=True)
    run = benchmarks.run_lm(lm, bench, out_dir, f"{label}.{TASK}", bootstrap_iters=BOOTSTRAP_ITERS)
    labels = read_task_labels(task_dir)
    if labels is None:
        return run
    assert run.samples_file is not None  # log_samples is on
    pairs = [(str(row["target"]), str(row["filtered_resps"][0]))
             for row in map(json.loads, Path(run.samples_file).read_text(encoding="utf-8").splitlines())]
    scores, files = label_metrics(pairs, labels, out_dir, label, top=heldout.top_confused)
    return run.model_copy(update={"metrics": {**run.metrics, **{f"{TASK}/{k}": v for k, v in scores.items()}},
                                  "extra_files": [*run.extra_files, *files]})
