"""DPO after SFT on tiny-ko, as ratios measured in one run:

* the starting point: tiny-ko's SFT adapter (configs/tiny-ko.yaml, one epoch), registered as `tiny-ko@champion` in a
  throw-away registry and pinned the way the pre-flight pins it;
* DPO (configs/tiny-ko-dpo.yaml as shipped: one epoch of the pairs from that champion) vs SFT on the same pairs'
  chosen conversations (a new adapter, tiny-ko's settings, the same steps and batch): training tokens/s (TRL's
  `num_tokens`: non-padding tokens, both sequences of a pair for DPO) and pairs/s vs conversations/s;
* preference accuracy and margin on the held-out pairs before (the starting point) and after (the tuned adapter),
  and the base's, as the evaluate step measures them.

    .venv/bin/python bench/dpo.py [--steps 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _chat(config: str, overrides: dict[str, Any]):
    from loraflow.config import load_config
    from loraflow.data.build_dataset import build_dataset
    from loraflow.data.format_chat import format_chat
    from loraflow.data.keys import chat_key, dataset_key
    from loraflow.outputs import run_step
    from loraflow.results import ChatResult, DatasetResult

    job = load_config(config, overrides)
    key = dataset_key(job.data)
    dataset = run_step("dataset", key, DatasetResult, lambda out: build_dataset(job.data, out, key))
    ckey = chat_key(dataset, job.model, job.training)
    return job, run_step("chat", ckey, ChatResult, lambda out: format_chat(dataset, job.model, job.training, out, ckey))


def _throughput(result) -> dict[str, float]:
    """The Trainer's own clock and token count: loading and tokenizing are not training."""
    history = json.loads(Path(result.log_history).read_text())
    seconds = next(entry["train_runtime"] for entry in history if "train_runtime" in entry)
    tokens = max(entry.get("num_tokens", 0) for entry in history)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
            "examples_per_second": next(e["train_samples_per_second"] for e in history if "train_runtime" in e)}


def run(steps: int, scratch: Path) -> dict[str, Any]:
    from datasets import DatasetDict, load_from_disk

    from loraflow.evaluation.evaluate import evaluate
    from loraflow.evaluation.preference import chosen_conversations
    from loraflow.outputs import run_step
    from loraflow.registry.adapter_store import AdapterRegistry
    from loraflow.registry.client import client_at
    from loraflow.registry.parent import pin_parent
    from loraflow.results import ChatResult, TrainResult
    from loraflow.training.keys import train_key
    from loraflow.training.train import train_adapter, train_here

    # The starting point: tiny-ko's SFT adapter (cached like the flow's train step), made champion of a registry.
    sft_job, sft_chat = _chat("configs/tiny-ko.yaml", {"training.epochs": 1, "serving.enabled": False})
    key = train_key(sft_chat, sft_job.model, sft_job.lora, sft_job.quantization, sft_job.training)
    start = run_step("train", key, TrainResult, lambda out: train_adapter(
        sft_chat, sft_job.model, sft_job.lora, sft_job.quantization, sft_job.training, out, key))
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    experiment = client_at(uri).create_experiment("bench-dpo", artifact_location=(scratch / "artifacts").as_uri())
    registry = AdapterRegistry(uri, "tiny-ko", experiment)
    registry.set_alias("champion", registry.register(Path(start.adapter_dir)))

    overrides = {"registry.tracking_uri": uri, "training.max_steps": steps, "training.save_steps": 10 * steps,
                 "training.logging_steps": 1, "eval.benchmarks.tasks": []}
    job, chat = _chat("configs/tiny-ko-dpo.yaml", overrides)
    parent = pin_parent(job)
    for step in ("dpo", "sft", "eval"):
        (scratch / step).mkdir()
    dpo = train_adapter(chat, job.model, job.lora, job.quantization, job.training, scratch / "dpo", "bench", None,
                        parent)
    # SFT on the same pairs' chosen conversations, from a new adapter: the cost of a step without the pair.
    pairs = load_from_disk(chat.tokenized_dir)
    conversations = scratch / "sft" / "tokenized"
    DatasetDict({name: chosen_conversations(split) for name, split in pairs.items()}).save_to_disk(str(conversations))
    sft_chat_of_pairs = ChatResult(key="bench", path=str(conversations.parent), dataset_sha="bench",
                                   template_sha=chat.template_sha, stats={
                                       "train_tokens": sum(map(len, load_from_disk(str(conversations))["train"][
                                           "input_ids"]))})
    sft_training = sft_job.training.model_copy(update={
        "max_steps": steps, "save_steps": 10 * steps, "logging_steps": 1, "batch_size": job.training.batch_size,
        "gradient_accumulation_steps": job.training.gradient_accumulation_steps})
    sft = train_here(sft_chat_of_pairs, sft_job.model, sft_job.lora, sft_job.quantization, sft_training,
                     scratch / "sft", "bench")
    measured = evaluate(chat, dpo, job.model, job.quantization, job.eval, scratch / "eval", "bench", parent)
    return {"dpo": _throughput(dpo), "sft": _throughput(sft), "metrics": measured.metrics,
            "pairs": {"train": len(pairs["train"]), "held_out": len(pairs["eval"])}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each training (30: one epoch of "
                        "the pairs at tiny-ko-dpo's batch of 8)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as scratch:
        measured = run(args.steps, Path(scratch))
    dpo, sft, metrics = measured["dpo"], measured["sft"], measured["metrics"]
    figures = {
        "dpo.tokens_per_second": dpo["tokens_per_second"],
        "dpo.pairs_per_second": dpo["examples_per_second"],
        "sft.tokens_per_second": sft["tokens_per_second"],
        "sft.conversations_per_second": sft["examples_per_second"],
        "dpo.tokens_per_second_vs_sft": dpo["tokens_per_second"] / sft["tokens_per_second"],
        "dpo.pairs_per_second_vs_sft_conversations": dpo["examples_per_second"] / sft["examples_per_second"],
        **{f"{label}.preference_accuracy": metrics[f"{label}/preference_accuracy"]
           for label in ("base", "start", "tuned")},
        **{f"{label}.preference_margin": metrics[f"{label}/preference_margin"] for label in ("base", "start", "tuned")},
        "tuned.preference_accuracy_gain": metrics["tuned/preference_accuracy"] - metrics["start/preference_accuracy"],
        "pairs": measured["pairs"],
        "steps": args.steps,
    }
    print(f"tiny-ko-dpo, {args.steps} steps of 8 pairs vs {args.steps} SFT steps of 8 of their chosen conversations, "
          f"CPU ({os.cpu_count()} cores); held-out pairs: {measured['pairs']['held_out']}\n")
    for name, value in figures.items():
        print(f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
