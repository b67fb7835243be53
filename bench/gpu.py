"""GPU proof of a job without downloads: its base's architecture (the config.json loraflow ships for
Qwen2.5-7B-Instruct) with random weights, saved as a local base, then through loraflow's own code:

* QLoRA training at the job's worst-case batch (every row training.max_length tokens, batch_size rows): tokens/s,
  peak GPU memory and its ratio to `loraflow plan`'s estimate (loraflow/training/probe.py, what `loraflow plan
  --probe` measures);
* padded vs padding-free batches over the same rows of varied lengths: the loss of each and the speed ratio;
* vLLM with the job's serving settings, started beside what the training left in this process
  (loraflow/serving/servers.py), serving a random adapter of the job's rank: adapter vs base tokens/s through the
  OpenAI-compatible API (bench/serving.py's burst of 32 concurrent chat requests).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/gpu.py --json gpu.json      # CUDA: configs/qwen-ko.yaml, Qwen2.5-7B

Without a GPU the same code runs on the embedded tiny-ko architecture (random weights) on CPU:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/gpu.py --arch tiny --job configs/tiny-ko.yaml --steps 3 \\
        --compare-steps 3 --serve-tokens 32 --json gpu-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving import burst  # noqa: E402
from loraflow import paths  # noqa: E402
from loraflow.base.load import load_tokenizer  # noqa: E402
from loraflow.cli import parse_overrides  # noqa: E402
from loraflow.config import load_config  # noqa: E402
from loraflow.config.job import JobConfig  # noqa: E402
from loraflow.config.lora import ALL_LINEAR  # noqa: E402
from loraflow.config.model import ModelConfig  # noqa: E402
from loraflow.serving.client import ServerClient  # noqa: E402
from loraflow.serving.records import stop_server_record  # noqa: E402
from loraflow.serving.server_spec import job_demand, server_spec  # noqa: E402
from loraflow.serving.servers import start_server  # noqa: E402
from loraflow.tiny.adapters import make_adapter  # noqa: E402
from loraflow.tiny.base import tiny_ko_dir  # noqa: E402
from loraflow.training.device import release_device_memory  # noqa: E402
from loraflow.training.models import device_for, dtype_for  # noqa: E402
from loraflow.training.plan import load_base_config  # noqa: E402
from loraflow.training.probe import Measurement, measure, probe_job, random_rows  # noqa: E402

log = logging.getLogger("bench.gpu")

# Where each architecture's config.json comes from: `loraflow plan`'s lookup (hub cache, else the shipped copy in
# loraflow/training/bases/, else the embedded base).
ARCHES = {"qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
          "tiny": "embedded:tiny-ko"}
ADAPTER_NAME = "gpu-bench-adapter"


def random_base(arch: str, job: JobConfig, out_dir: Path) -> Path:
    """The architecture with random weights in the job's dtype, saved with tiny-ko's tokenizer (Qwen's special tokens
    and chat template; its 4,096 ids exist in every Qwen vocabulary): a local base that transformers and vLLM load as
    they load a downloaded one."""
    config, source = load_base_config(ModelConfig(base=ARCHES[arch]))
    device = device_for(job.model)
    log.info("random %s (%s) on %s -> %s", arch, source, device, out_dir)
    with torch.device(device):  # initializing 7B parameters takes seconds on a GPU, minutes on a CPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype_for(job.model.dtype, device))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(str(tiny_ko_dir())).save_pretrained(out_dir)
    return out_dir


def padding_comparison(job: JobConfig, steps: int) -> dict[str, Measurement]:
    """Padded and padding-free batches over the same rows (lengths uniform in [max_length / 8, max_length]). LoRA
    dropout is off in both: its masks are drawn per batch shape, so a padded batch and its padding-free row would
    drop different activations and their losses would differ by more than numerics."""
    training = job.training
    count = steps * training.batch_size * training.gradient_accumulation_steps
    generator = torch.Generator().manual_seed(training.seed)
    lengths = torch.randint(training.max_length // 8, training.max_length + 1, (count,), generator=generator)
    rows = random_rows(lengths.tolist(), len(load_tokenizer(job.model)), training.seed)
    lora = job.lora.model_copy(update={"dropout": 0.0})
    results = {}
    for name, padding_free in (("padded", False), ("padding_free", True)):
        log.info("%s batches: %d steps over %d rows of varied length", name, steps, count)
        variant = job.model_copy(update={"lora": lora,
                                         "training": training.model_copy(update={"padding_free": padding_free})})
        results[name] = measure(variant, rows)
    return results


def served_throughput(job: JobConfig, base_dir: Path, work: Path, tokens: int) -> dict[str, float]:
    """tokens/s of the base and of a random adapter (the job's rank and targets) on one vLLM, started by loraflow's
    serving code with the job's settings; the same prompts for both."""
    targets = ALL_LINEAR if isinstance(job.lora.target_modules, str) else job.lora.target_modules
    adapter = make_adapter(base_dir, work / "adapter", r=job.lora.r, targets=list(targets), seed=job.training.seed)
    release_device_memory()  # what the trainings cached goes back to the driver before vLLM asks for its share
    log.info("starting vLLM (gpu_memory_utilization %s) beside the training's process",
             job.serving.gpu_memory_utilization)
    spec = server_spec(job)
    server = start_server(job, spec, job_demand(job, [adapter]))
    try:
        ServerClient(server.url).load_adapter(ADAPTER_NAME, str(adapter))
        return {label: asyncio.run(burst(server.url, name, tokens))
                for label, name in (("base", server.server_id), ("lora", ADAPTER_NAME))}
    finally:
        stop_server_record(server.server_id)


def bench_job(config: str, overrides: dict[str, Any]) -> JobConfig:
    """The job as configured, under its own name and on a base server of its own, so that a served job on this
    machine (its serving state under LORAFLOW_HOME, the shared vLLM of its base) is left alone: a server setting
    that changes nothing (vLLM's default seed, 0) gives the bench's server another id. Its vLLM runs on a free
    private port."""
    job = load_config(config)
    return load_config(config, {"registry.model_name": f"{job.registry.model_name}-gpu-bench",
                                "serving.extra_args": [*job.serving.extra_args, "--seed", "0"], **overrides})


def run(args: argparse.Namespace) -> dict[str, Any]:
    job = bench_job(args.job, parse_overrides(args.set))
    # A bench server on loopback: bench/serving.py's burst sends no API key, so vLLM must not ask for one.
    os.environ.pop(job.serving.api_key_env, None)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-", dir=paths.sub("bench")) as tmp:
        work = Path(tmp)
        base_dir = random_base(args.arch, job, work / "base")
        release_device_memory()
        job = job.model_copy(update={"model": job.model.model_copy(update={"base": str(base_dir), "revision": None})})
        log.info("worst-case batches: %d steps of %d x %d tokens", args.steps, job.training.batch_size,
                 job.training.max_length)
        worst = probe_job(job, args.steps)
        compared = padding_comparison(job, args.compare_steps)
        served = served_throughput(job, base_dir, work, args.serve_tokens)
    padded, free = compared["padded"], compared["padding_free"]
    measured = worst.measured
    return {
        "gpu.device": measured.device,
        "gpu.arch": args.arch,
        "gpu.job": args.job,
        "gpu.attn_implementation": measured.attn_implementation,
        "gpu.steps": measured.steps,
        "gpu.batch_size": worst.batch_size,
        "gpu.max_length": worst.max_length,
        "gpu.tokens_per_s": round(measured.tokens_per_s, 1),
        "gpu.seconds_per_step": round(measured.seconds_per_step, 3),
        "gpu.peak_gib": round(measured.peak_gib, 3),
        "gpu.peak_source": measured.peak_source,
        "gpu.plan_mode": worst.plan_mode,
        "gpu.plan_gib": worst.plan_gib,
        "gpu.peak_vs_plan": round(worst.peak_vs_plan, 4),
        "gpu.loss_padded": round(padded.train_loss, 6),
        "gpu.loss_padding_free": round(free.train_loss, 6),
        "gpu.loss_rel_diff": abs(free.train_loss - padded.train_loss) / padded.train_loss,
        "gpu.tokens_per_s_padded": round(padded.tokens_per_s, 1),
        "gpu.tokens_per_s_padding_free": round(free.tokens_per_s, 1),
        "gpu.attn_implementation_padded": padded.attn_implementation,
        "gpu.padding_free_speedup": round(free.tokens_per_s / padded.tokens_per_s, 4),
        "gpu.serve_tokens": args.serve_tokens,
        "gpu.vllm_tokens_s.base": round(served["base"], 1),
        "gpu.vllm_tokens_s.lora": round(served["lora"], 1),
        "gpu.lora_vs_base": round(served["lora"] / served["base"], 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="configs/qwen-ko.yaml", help="the job whose settings are measured")
    parser.add_argument("--arch", choices=sorted(ARCHES), default="qwen2.5-7b",
                        help="the architecture built with random weights (tiny: the CPU form)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps at the worst-case batch")
    parser.add_argument("--compare-steps", type=int, default=10, help="optimizer steps of each padded/padding-free run")
    parser.add_argument("--serve-tokens", type=int, default=128, help="output tokens per request through vLLM")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="job config override")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request of every burst otherwise
    figures = run(args)
    print("\n".join(f"{name}: {value}" for name, value in figures.items()))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
