"""Many jobs on one base, measured in one run on tiny-ko (real endpoint, real vLLM, a temporary MLflow registry):

* memory: the vLLM processes' RSS (and USS) with one job served, with three jobs served on the one shared vLLM
  (loraflow's way), and with the same three jobs each on a vLLM of its own (one server per job, as before);
* throughput: aggregate tokens/s of the same concurrent traffic through the endpoint, spread over three jobs'
  stable names (three adapters in one batch) vs all on one job's stable name: the median of interleaved rounds.

    .venv/bin/python bench/jobs.py [--tokens 64] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["LORAFLOW_HOME"] = tempfile.mkdtemp(prefix="loraflow-bench-jobs-")

from loraflow.env import configure_environment  # noqa: E402

configure_environment()

from loraflow import paths  # noqa: E402
from loraflow.config import load_config  # noqa: E402
from loraflow.config.lora import ALL_LINEAR  # noqa: E402
from loraflow.process import free_port  # noqa: E402
from loraflow.registry.adapter_store import AdapterRegistry  # noqa: E402
from loraflow.registry.client import client_at  # noqa: E402
from loraflow.serving.deploy import deploy_aliases  # noqa: E402
from loraflow.serving.records import server_records, stop_all_serving  # noqa: E402
from loraflow.serving.urls import PORT_ENV, endpoint_url  # noqa: E402
from loraflow.tiny.adapters import make_adapter  # noqa: E402
from loraflow.tiny.base import tiny_ko_dir  # noqa: E402
from loraflow.tiny.shared_models import share_built_models  # noqa: E402

CONFIG = str(ROOT / "configs" / "tiny-ko.yaml")
JOBS = ("bench-a", "bench-b", "bench-c")
CONCURRENCY = 24
PROMPTS = [f"대한민국 헌법 제{i}조의 내용을 설명해 주세요." for i in range(1, CONCURRENCY + 1)]


def memory() -> dict[str, float]:
    """MiB of every running vLLM of this home, each with its engine process: RSS and USS (private pages)."""
    rss = uss = 0.0
    for server in server_records():
        leader = psutil.Process(server.process["pid"])
        for process in [leader, *leader.children(recursive=True)]:
            info = process.memory_full_info()
            rss, uss = rss + info.rss / 2**20, uss + info.uss / 2**20
    return {"rss_mib": round(rss, 1), "uss_mib": round(uss, 1), "servers": len(server_records())}


def serve(registries: dict[str, AdapterRegistry], separate: bool) -> None:
    for index, (model, registry) in enumerate(registries.items()):
        overrides = {"registry.model_name": model, "registry.tracking_uri": registry.tracking_uri,
                     "serving.enabled": True, "serving.max_model_len": 512,
                     # A server setting of its own puts each job on a vLLM of its own: one server per job.
                     **({"serving.extra_args": ["--seed", str(index)]} if separate else {})}
        deployed = deploy_aliases(load_config(CONFIG, overrides), CONFIG, overrides)
        assert deployed is not None and deployed[1].routes == {model: f"{model}-v1"}, deployed


async def _one(client: httpx.AsyncClient, model: str, prompt: str, tokens: int) -> int:
    reply = await client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0,
        "ignore_eos": True})  # fixed output length: every variant decodes the same count
    reply.raise_for_status()
    return reply.json()["usage"]["completion_tokens"]


async def burst(url: str, models: list[str], tokens: int) -> float:
    """tokens/s of CONCURRENCY requests at once, request i on models[i % len(models)]."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        counts = await asyncio.gather(*(_one(client, models[i % len(models)], p, tokens)
                                        for i, p in enumerate(PROMPTS)))
        return sum(counts) / (time.perf_counter() - start)


def throughput(url: str, tokens: int, rounds: int) -> tuple[float, float]:
    """Median tokens/s of one adapter's traffic and of the same traffic over three adapters, interleaved rounds
    after an untimed burst of each (the first full batches of a fresh vLLM are slower)."""
    single, mixed = [JOBS[0]], list(JOBS)
    asyncio.run(burst(url, mixed, tokens))
    asyncio.run(burst(url, single, tokens))
    figures: dict[str, list[float]] = {"single": [], "mixed": []}
    for _ in range(rounds):
        figures["single"].append(asyncio.run(burst(url, single, tokens)))
        figures["mixed"].append(asyncio.run(burst(url, mixed, tokens)))
    return statistics.median(figures["single"]), statistics.median(figures["mixed"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    home = paths.home()
    share_built_models(home)
    os.environ[PORT_ENV] = str(free_port())
    url = endpoint_url("127.0.0.1", int(os.environ[PORT_ENV]))
    uri = f"sqlite:///{home / 'bench-mlflow.db'}"
    experiment = client_at(uri).create_experiment("bench-jobs", artifact_location=(home / "artifacts").as_uri())
    registries = {}
    for seed, model in enumerate(JOBS, start=41):
        registries[model] = AdapterRegistry(uri, model, experiment)
        registries[model].set_alias("champion", registries[model].register(
            make_adapter(tiny_ko_dir(), home / model, r=16, targets=ALL_LINEAR, seed=seed)))
    try:
        serve(dict(list(registries.items())[:1]), separate=False)
        one = memory()
        serve(registries, separate=False)
        shared = memory()
        single, mixed = throughput(url, args.tokens, args.rounds)
        stop_all_serving(home)
        serve(registries, separate=True)
        separate = memory()
    finally:
        stop_all_serving(home)
    figures = {
        "jobs.memory_mib.one_job": one, "jobs.memory_mib.three_jobs_one_vllm": shared,
        "jobs.memory_mib.three_jobs_three_vllms": separate,
        "jobs.rss_three_shared_vs_one": round(shared["rss_mib"] / one["rss_mib"], 3),
        "jobs.rss_three_separate_vs_one": round(separate["rss_mib"] / one["rss_mib"], 3),
        "jobs.tokens_s.one_adapter": round(single, 1), "jobs.tokens_s.three_adapters": round(mixed, 1),
        "jobs.mixed_vs_one_adapter": round(mixed / single, 3),
        "jobs.concurrency": CONCURRENCY, "jobs.tokens": args.tokens, "jobs.rounds": args.rounds,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
