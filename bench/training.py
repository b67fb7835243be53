"""Training-side figures on tiny-ko, as ratios measured in one run (each variant in its own process, so that
peak RSS is its own):

* loraflow's QLoRA step vs the tutorials' plain recipe (fp32 model + LoRA + SFTTrainer on raw `messages`):
  training tokens/s;
* peak memory: QLoRA vs LoRA vs full fine-tuning;
* a cached rerun of the whole `finetune` flow vs its cold run.

    .venv/bin/python bench/training.py [--steps 40] [--skip-flow]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = "configs/tiny-ko.yaml"
VARIANTS = ("tutorial-lora", "loraflow-qlora", "loraflow-lora", "full")


def _prepared(overrides: dict):
    from loraflow.config import load_config
    from loraflow.data.build_dataset import build_dataset
    from loraflow.data.format_chat import format_chat
    from loraflow.keys import chat_key, dataset_key
    from loraflow.outputs import run_step
    from loraflow.results import ChatResult, DatasetResult

    job = load_config(CONFIG, overrides)
    key = dataset_key(job.data)
    dataset = run_step("dataset", key, DatasetResult, lambda out: build_dataset(job.data, out, key))
    ckey = chat_key(dataset, job.model, job.training)
    chat = run_step("chat", ckey, ChatResult, lambda out: format_chat(dataset, job.model, job.training, out, ckey))
    return job, dataset, chat


def run_variant(variant: str, steps: int) -> dict:
    """Runs in a child process; returns tokens/s and peak RSS of that process."""
    from datasets import load_from_disk
    from trl import SFTTrainer

    from loraflow.bases import load_tokenizer
    from loraflow.training.models import load_base_model
    from loraflow.training.train import peak_rss_mb, peft_config, sft_config, train_adapter

    overrides = {"training.max_steps": steps, "training.save_steps": 10_000, "training.logging_steps": 1}
    if variant in ("loraflow-lora", "tutorial-lora", "full"):
        overrides["quantization.method"] = "none"
    job, dataset, chat = _prepared(overrides)
    out = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-"))
    if variant.startswith("loraflow"):
        result = train_adapter(chat, job.model, job.lora, job.quantization, job.training, out, "bench")
        history = json.loads(Path(result.log_history).read_text())
    else:
        # The tutorials' recipe: let TRL tokenize raw conversations itself; full FT has no peft_config.
        tokenizer = load_tokenizer(job.model)
        model = load_base_model(job.model, job.quantization, quantized=False)
        trainer = SFTTrainer(
            model=model,
            args=sft_config(job.training, job.model, out),
            train_dataset=load_from_disk(dataset.dataset_dir)["train"],
            processing_class=tokenizer,
            peft_config=peft_config(job.lora) if variant == "tutorial-lora" else None,
        )
        trainer.train()
        history = trainer.state.log_history
    # The Trainer's own clock and token count for every variant: setup (loading, tokenizing) is not training.
    seconds = next(entry["train_runtime"] for entry in history if "train_runtime" in entry)
    tokens = max(entry.get("num_tokens", 0) for entry in history)
    return {"variant": variant, "steps": steps, "seconds": seconds, "tokens": tokens,
            "tokens_per_second": tokens / seconds, "peak_rss_mb": peak_rss_mb()}


def _child(variant: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps", str(steps)],
                         capture_output=True, text=True, check=True, cwd=ROOT, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def _flow_times() -> tuple[float, float]:
    env = {**os.environ, "LORAFLOW_HOME": tempfile.mkdtemp(prefix="bench-flow-")}
    models = Path(os.environ.get("LORAFLOW_HOME", ROOT / ".loraflow")).resolve() / "models"
    if models.is_dir():  # the base model build is not what this measures
        (Path(env["LORAFLOW_HOME"]) / "models").symlink_to(models, target_is_directory=True)
    times = []
    for _ in range(2):
        started = time.perf_counter()
        # Serving is off: this measures the pipeline's cache, not a vLLM start.
        subprocess.run([sys.executable, "-m", "flows.finetune", "--config", CONFIG, "--set", "serving.enabled=false"],
                       check=True, cwd=ROOT, env=env, capture_output=True)
        times.append(time.perf_counter() - started)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip-flow", action="store_true")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps)))
        return
    results = {v: _child(v, args.steps) for v in VARIANTS}
    print(f"tiny-ko, {args.steps} optimizer steps per variant, batch {8}, CPU ({os.cpu_count()} cores)\n")
    print("| variant | tokens/s | peak RSS MiB |\n|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_second']:.0f} | {r['peak_rss_mb']:.0f} |")
    tutorial, qlora, lora, full = (results[v] for v in VARIANTS)
    for name, r in (("QLoRA", qlora), ("LoRA", lora)):
        ratio = r["tokens_per_second"] / tutorial["tokens_per_second"]
        print(f"loraflow {name} vs tutorial recipe, tokens/s: {ratio:.2f}x")
    print(f"peak RSS QLoRA / LoRA / full: {qlora['peak_rss_mb'] / full['peak_rss_mb']:.2f} / "
          f"{lora['peak_rss_mb'] / full['peak_rss_mb']:.2f} / 1.00")
    if not args.skip_flow:
        cold, cached = _flow_times()
        print(f"finetune flow: cold {cold:.1f}s, cached rerun {cached:.1f}s ({cached / cold:.2%} of cold)")


if __name__ == "__main__":
    main()
