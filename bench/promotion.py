"""How long a promotion takes to reach vLLM: alias `champion` set through MLflow's REST API (what the UI calls) ->
webhook -> Prefect event -> `serve/tiny-ko` run -> the router's stable name serving the new version. Five moves
between two registered versions, on a real local stack (temporary LORAFLOW_HOME, free ports) and a real vLLM.

    .venv/bin/python bench/promotion.py [--moves 5] [--json FILE]

Prints each move's seconds, the median and the max (vLLM load of the adapter and the canary included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LORAFLOW_HOME", tempfile.mkdtemp(prefix="loraflow-bench-"))

from loraflow.env import configure_environment  # noqa: E402

configure_environment()

from loraflow.config.lora import ALL_LINEAR  # noqa: E402
from loraflow.localstack.running import TINY_KO, RunningStack, set_alias_like_the_ui, stable_root, stack_record  # noqa: E402
from loraflow.process import free_port, wait_for  # noqa: E402
from loraflow.registry.adapter_store import AdapterRegistry  # noqa: E402
from loraflow.registry.client import client_at  # noqa: E402
from loraflow.serving.names import versioned_name  # noqa: E402
from loraflow.tiny.adapters import make_adapter  # noqa: E402
from loraflow.tiny.base import tiny_ko_dir  # noqa: E402
from loraflow.tiny.shared_models import share_built_models  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moves", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="loraflow-bench-stack-"))
    share_built_models(home)
    running = RunningStack.on_free_ports(home)
    stack = running.stack
    try:
        running.up()
        experiment = client_at(stack.mlflow_url).create_experiment("bench-promotion")
        registry = AdapterRegistry(stack.mlflow_url, TINY_KO, experiment)
        versions = [registry.register(make_adapter(tiny_ko_dir(), home / f"adapter-{seed}", r=8, targets=ALL_LINEAR,
                                                   seed=seed)) for seed in (31, 32)]
        overrides = json.dumps({"serving.port": free_port(), "serving.vllm_port": free_port()})
        running.run_deployment("serve/tiny-ko", "--param", f"overrides={overrides}", "--param", "start=true")
        router = stack_record(running)["endpoint"]["router_url"]
        seconds = []
        for move in range(args.moves):
            target = versions[move % 2]
            started = time.monotonic()
            set_alias_like_the_ui(running, target)
            wait_for(lambda t=target: stable_root(router) == versioned_name(TINY_KO, t), 300)
            seconds.append(round(time.monotonic() - started, 2))
            print(f"move {move + 1}: champion -> v{target}: {seconds[-1]:.1f} s", flush=True)
    finally:
        running.cli("loraflow", "serve", "configs/tiny-ko.yaml", "--stop", check=False)
        running.down()
        shutil.rmtree(home, ignore_errors=True)
    figures = {"promotion.alias_to_served_median_s": statistics.median(seconds),
               "promotion.alias_to_served_max_s": max(seconds), "promotion.moves_s": seconds}
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
