"""Training throughput and quality on tiny-ko, as ratios measured in one run (each variant in its own process, so
that peak RSS is its own):

* loraflow's train step (configs/tiny-ko.yaml as shipped: QLoRA, padding-free batches) and its plain-LoRA variant
  vs the tutorials' recipe (fp32 model + LoRA + SFTTrainer tokenizing raw `messages`, padded batches): training
  tokens/s (TRL's `num_tokens`: non-padding tokens only) over the same samples (`--epochs` of the train split);
* the held-out assistant-token loss after those samples (loraflow / recipe: equal or lower is the bar);
* peak memory: QLoRA vs LoRA vs full fine-tuning.

    .venv/bin/python bench/training.py [--epochs 1] [--json FILE] [--set training.padding_free=false ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = "configs/tiny-ko.yaml"
VARIANTS = ("tutorial-lora", "loraflow-qlora", "loraflow-lora", "full")


def _prepared(overrides: dict[str, Any]):
    from loraflow.config import load_config
    from loraflow.data.build_dataset import build_dataset
    from loraflow.data.format_chat import format_chat
    from loraflow.data.keys import chat_key, dataset_key
    from loraflow.outputs import run_step
    from loraflow.results import ChatResult, DatasetResult

    job = load_config(CONFIG, overrides)
    key = dataset_key(job.data)
    dataset = run_step("dataset", key, DatasetResult, lambda out: build_dataset(job.data, out, key))
    ckey = chat_key(dataset, job.model, job.training)
    chat = run_step("chat", ckey, ChatResult, lambda out: format_chat(dataset, job.model, job.training, out, ckey))
    return job, dataset, chat


def run_variant(variant: str, epochs: float, extra: dict[str, Any]) -> dict[str, Any]:
    """Runs in a child process: tokens/s, held-out assistant loss and peak RSS of that process."""
    from datasets import load_from_disk
    from peft import PeftModel
    from trl import SFTTrainer

    from loraflow.base.load import load_tokenizer
    from loraflow.evaluation.perplexity import assistant_perplexity
    from loraflow.training.arguments import peft_config, trainer_config
    from loraflow.training.models import load_base_model
    from loraflow.training.train import peak_rss_mb, train_adapter

    overrides = {"training.epochs": epochs, "training.save_steps": 10_000, "training.logging_steps": 1, **extra}
    if variant in ("loraflow-lora", "tutorial-lora", "full"):
        overrides["quantization.method"] = "none"
    if not variant.startswith("loraflow"):  # the recipe pads every batch, as the tutorials' SFTTrainer does
        overrides["training.padding_free"] = False
    job, dataset, chat = _prepared(overrides)
    out = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-"))
    tokenizer = load_tokenizer(job.model)
    if variant.startswith("loraflow"):
        result = train_adapter(chat, job.model, job.lora, job.quantization, job.training, out, "bench")
        history = json.loads(Path(result.log_history).read_text())
        # Scored as the evaluate step scores it: the base at serving precision plus the adapter.
        model = PeftModel.from_pretrained(load_base_model(job.model, job.quantization, quantized=False),
                                          str(Path(result.path) / "adapter"))
    else:
        # The tutorials' recipe: let TRL tokenize raw conversations itself; full FT has no peft_config.
        trainer = SFTTrainer(
            model=load_base_model(job.model, job.quantization, quantized=False),
            args=trainer_config(job.training, job.model, out),
            train_dataset=load_from_disk(dataset.dataset_dir)["train"],
            processing_class=tokenizer,
            peft_config=peft_config(job.lora) if variant == "tutorial-lora" else None,
        )
        trainer.train()
        history, model = trainer.state.log_history, trainer.model
    # The Trainer's own clock and token count for every variant: setup (loading, tokenizing) is not training.
    seconds = next(entry["train_runtime"] for entry in history if "train_runtime" in entry)
    tokens = max(entry.get("num_tokens", 0) for entry in history)
    held_out = load_from_disk(chat.tokenized_dir)["eval"]
    loss = assistant_perplexity(model, held_out, pad_id=tokenizer.pad_token_id, batch_size=8)["nll"]
    return {"variant": variant, "seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / seconds,
            "eval_loss": loss, "peak_rss_mb": peak_rss_mb()}


def _child(variant: str, epochs: float, extra: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--variant", variant, "--epochs", str(epochs),
                          "--extra", json.dumps(extra)],
                         capture_output=True, text=True, check=True, cwd=ROOT, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override for the loraflow variants (a lever to compare)")
    parser.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.epochs, json.loads(args.extra))))
        return
    from loraflow.cli import parse_overrides

    extra = parse_overrides(args.set)
    results = {v: _child(v, args.epochs, extra) for v in VARIANTS}
    recipe, qlora, lora, full = (results[v] for v in VARIANTS)
    print(f"tiny-ko, {args.epochs:g} epoch(s) of the train split per variant, CPU ({os.cpu_count()} cores)"
          f"{', ' + ' '.join(args.set) if args.set else ''}\n")
    print("| variant | tokens/s | held-out loss | peak RSS MiB |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_second']:.0f} | {r['eval_loss']:.4f} | {r['peak_rss_mb']:.0f} |")
    figures = {
        "training.speedup_vs_recipe": qlora["tokens_per_second"] / recipe["tokens_per_second"],
        "training.eval_loss_ratio": qlora["eval_loss"] / recipe["eval_loss"],
        "training.lora_speedup_vs_recipe": lora["tokens_per_second"] / recipe["tokens_per_second"],
        "training.lora_eval_loss_ratio": lora["eval_loss"] / recipe["eval_loss"],
        "training.peak_rss_qlora_vs_full": qlora["peak_rss_mb"] / full["peak_rss_mb"],
        "training.variants": results,
    }
    for name, value in figures.items():
        if isinstance(value, float):
            print(f"{name}: {value:.3f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
