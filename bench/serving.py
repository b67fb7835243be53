"""Serving throughput on tiny-ko, measured in one run:

* vLLM: base (a server without LoRA, what a user would serve instead) vs base + LoRA adapter with the shipped
  serving settings vs the same with vLLM's LoRA levers changed vs the merged model (tokens/s, 32 concurrent chat
  requests, fixed output length): the LoRA overhead, what the levers and merging buy back;
* vLLM vs transformers `generate` (one batch of the same 32 prompts, greedy, same output length), for base and
  for base + adapter (PEFT).

    LORAFLOW_HOME=... .venv/bin/python bench/serving.py [--adapter DIR] [--tokens 64] [--json FILE] [--readme FILE]

Without --adapter a random r=16 all-linear adapter is made on the tiny base (throughput does not depend on
the adapter learned). Every server runs with dtype float32 on CPU, one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loraflow.config import load_config  # noqa: E402
from loraflow.config.lora import ALL_LINEAR  # noqa: E402
from loraflow.config.model import ModelConfig  # noqa: E402
from loraflow.config.serving import MergeConfig  # noqa: E402
from loraflow.process import free_port  # noqa: E402
from loraflow.serving.server_spec import SLOT_STEP, Capacity, adapter_rank, server_spec, vllm_lora_rank  # noqa: E402
from loraflow.serving.vllm_server import VllmLaunch, vllm_process  # noqa: E402
from loraflow.templates import load_template  # noqa: E402
from loraflow.tiny.adapters import make_adapter  # noqa: E402
from loraflow.tiny.base import tiny_ko_dir  # noqa: E402
from loraflow.training.merge import merge_adapter  # noqa: E402

CONCURRENCY = 32
PROMPTS = [f"대한민국 헌법 제{i}조의 내용을 설명해 주세요." for i in range(1, CONCURRENCY + 1)]


async def _one(client: httpx.AsyncClient, model: str, prompt: str, tokens: int) -> int:
    reply = await client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
        },
    )  # fixed output length: every variant decodes the same count
    reply.raise_for_status()
    return reply.json()["usage"]["completion_tokens"]


async def burst(url: str, model: str, tokens: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await _one(client, model, PROMPTS[0], 4)  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*(_one(client, model, p, tokens) for p in PROMPTS))
        return sum(counts) / (time.perf_counter() - start)


def served_throughput(model_dir: str, models: dict[str, str | None], tokens: int, state: Path, rank: int | None,
                      max_loras: int = SLOT_STEP) -> dict[str, float]:
    """tokens/s per label; `models` maps label -> adapter dir (None = the base itself); `rank` None: no LoRA;
    `max_loras`: the server's LoRA slots (a lever; a server starts with SLOT_STEP)."""
    job = load_config(ROOT / "configs" / "tiny-ko.yaml", {"serving.max_model_len": 512})
    state.mkdir(parents=True, exist_ok=True)
    template = state / "chat_template.jinja"
    template.write_text(load_template("qwen2.5"))
    launch = VllmLaunch(spec=replace(server_spec(job, pin=False), dtype="float32"),
                        capacity=Capacity(max_lora_rank=rank or 1, max_loras=max_loras), model_path=model_dir,
                        served_name="bench-base", port=free_port(), chat_template=template,
                        enable_lora=rank is not None)
    server = vllm_process(launch, state, None).start()
    url = launch.url
    try:
        server.wait_healthy(job.serving.startup_timeout_s)
        results = {}
        for label, adapter in models.items():
            name = "bench-base"
            if adapter is not None:
                name = label
                httpx.post(
                    f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": adapter}, timeout=120
                ).raise_for_status()
            results[label] = asyncio.run(burst(url, name, tokens))
        return results
    finally:
        server.stop()


def generate_throughput(model: torch.nn.Module, tokenizer, tokens: int) -> float:
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in PROMPTS
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(**{k: v[:1] for k, v in batch.items()}, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(
            **batch,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        elapsed = time.perf_counter() - start
    return (out.shape[1] - batch["input_ids"].shape[1]) * len(PROMPTS) / elapsed


# vLLM's LoRA levers, each measured against a server as loraflow starts it (SLOT_STEP slots): the batch of LoRA
# slots only as large as one job's aliases served at once (champion + challenger), and as small as one.
LEVERS = {"max_loras=2": 2, "max_loras=1": 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--readme", type=Path, default=None, help="write the figures into this README's Serving section"
    )
    args = parser.parse_args()

    base_dir = tiny_ko_dir()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        adapter = args.adapter or make_adapter(base_dir, work / "adapter", r=16, targets=ALL_LINEAR, seed=11)
        merged = merge_adapter(
            adapter,
            "bench",
            ModelConfig(base="embedded:tiny-ko", device="cpu", dtype="float32"),
            MergeConfig(enabled=True),
            work / "merge",
        )
        r = adapter_rank(adapter)
        rank = vllm_lora_rank([r])  # exactly the adapter's rank, as loraflow serves it
        both = {"base": None, "adapter": str(adapter)}
        served = served_throughput(str(base_dir), {"base": None}, args.tokens, work / "base", None)
        lora_server = served_throughput(str(base_dir), both, args.tokens, work / "lora", rank)
        served |= {"base on the LoRA server": lora_server["base"], "adapter": lora_server["adapter"]}
        for lever, slots in LEVERS.items():
            served[f"adapter, {lever}"] = served_throughput(
                str(base_dir), {"adapter": str(adapter)}, args.tokens, work / lever, rank, slots
            )["adapter"]
        served["merged"] = served_throughput(merged.merged_dir, {"merged": None}, args.tokens, work / "merged", None)[
            "merged"
        ]

        torch.set_num_threads(max(1, torch.get_num_threads()))
        tokenizer = AutoTokenizer.from_pretrained(str(adapter))
        base_model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
        hf = {"base": generate_throughput(base_model, tokenizer, args.tokens)}
        tuned = PeftModel.from_pretrained(base_model, str(adapter)).eval()
        hf["adapter"] = generate_throughput(tuned, tokenizer, args.tokens)
        print(f"measured (tokens/s): vLLM {served}, transformers generate {hf}", flush=True)

    base = served["base"]
    figures = {f"serving.vllm_tokens_s.{label}": round(value, 1) for label, value in served.items()}
    figures |= {
        "serving.lora_vs_base": round(served["adapter"] / base, 4),
        "serving.merged_vs_base": round(served["merged"] / base, 4),
        **{f"serving.lora_vs_base.{lever}": round(served[f"adapter, {lever}"] / base, 4) for lever in LEVERS},
    }
    rows = [
        f"| {label} | {value:.0f} | {value / base:.2f}x | {hf[label]:.0f} | {value / hf[label]:.2f}x |"
        if label in hf
        else f"| {label} | {value:.0f} | {value / base:.2f}x | - | - |"
        for label, value in served.items()
    ]
    lines = [
        f"tiny-ko (fp32, {platform.machine()} CPU, {torch.get_num_threads()} torch threads), "
        f"{CONCURRENCY} concurrent chat requests x {args.tokens} output tokens, adapter r={r} "
        f"(served with --max-lora-rank {rank}); a server as loraflow starts it ({SLOT_STEP} LoRA slots) unless the "
        "row names a lever",
        "",
        "| variant | vLLM tokens/s | vs base | transformers generate tokens/s | vLLM / generate |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]
    report = "\n".join(lines)
    print(report)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if args.readme is not None:
        write_section(args.readme, "Serving", report + "\n\nReproduce: `.venv/bin/python bench/serving.py`.")
    return 0


def write_section(readme: Path, title: str, body: str) -> None:
    """Replace (or append) `## <title>` in the README, leaving other sections as they are."""
    text = readme.read_text() if readme.is_file() else "# Benchmarks\n"
    head, marker, rest = text.partition(f"\n## {title}\n")
    tail = rest[rest.find("\n## ") :] if marker and "\n## " in rest else ""
    readme.write_text(f"{head.rstrip()}\n\n## {title}\n\n{body.strip()}\n{tail}")


if __name__ == "__main__":
    sys.exit(main())
