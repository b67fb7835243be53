"""How long a promotion takes to reach the endpoint: alias `champion` set through MLflow's REST API (what the UI
calls) -> webhook -> Prefect event -> the stack's reconciler -> the job's stable name answering with the new
version. Ten moves on a real local stack (temporary LORAFLOW_HOME, free ports) and a real vLLM, two jobs on it
(tiny-ko and tiny-intent): moves 15 s apart, two moves 3 s apart, and two moves of the two jobs at once.

    .venv/bin/python bench/promotion.py [--gap 15] [--json FILE]

Prints each move's seconds (alias call -> stable name answering with it; vLLM load of the adapter and the canary
included), the median and the max. A move overtaken by the next one 3 s later counts until the later version
answers.
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
from loraflow.localstack.running import TINY_KO, RunningStack, set_alias_like_the_ui, stable_root  # noqa: E402
from loraflow.registry.adapter_store import AdapterRegistry  # noqa: E402
from loraflow.registry.client import client_at  # noqa: E402
from loraflow.serving.names import versioned_name  # noqa: E402
from loraflow.tiny.adapters import make_adapter  # noqa: E402
from loraflow.tiny.base import tiny_ko_dir  # noqa: E402
from loraflow.tiny.shared_models import share_built_models  # noqa: E402

INTENT = "tiny-intent"
# Rounds of moves, each (model, version index, seconds after the round's previous move): ten moves, two of them 3 s
# apart (the first overtaken) and two of two jobs at once; `--gap` idle seconds between rounds.
ROUNDS = [[(TINY_KO, 1, 0)], [(TINY_KO, 0, 0)], [(INTENT, 1, 0)], [(TINY_KO, 1, 0), (TINY_KO, 0, 3)],
          [(INTENT, 0, 0)], [(TINY_KO, 1, 0), (INTENT, 1, 0)], [(TINY_KO, 0, 0)], [(TINY_KO, 1, 0)]]


def run_round(running: RunningStack, url: str, versions: dict[str, list[str]],
              moves: list[tuple[str, int, float]]) -> list[float]:
    """Seconds from each move's alias call until its job's stable name answers with the round's last version of
    that job (an overtaken move counts until the version that overtook it answers)."""
    started = []
    for model, index, after in moves:
        time.sleep(after)
        started.append(time.monotonic())
        set_alias_like_the_ui(running, versions[model][index], model=model)
    final = {model: versioned_name(model, versions[model][index]) for model, index, _ in moves}
    served: dict[str, float] = {}
    deadline = time.monotonic() + 300
    while len(served) < len(final) and time.monotonic() < deadline:
        for model, name in final.items():
            if model not in served and stable_root(url, model) == name:
                served[model] = time.monotonic()
        time.sleep(0.2)
    assert len(served) == len(final), f"not served within 300 s: {set(final) - set(served)}"
    return [round(served[model] - at, 2) for (model, _, _), at in zip(moves, started, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gap", type=float, default=15.0, help="seconds between moves (the machine idle)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="loraflow-bench-stack-"))
    share_built_models(home)
    running = RunningStack.on_free_ports(home)
    stack = running.stack
    try:
        running.up()
        experiment = client_at(stack.mlflow_url).create_experiment("bench-promotion")
        versions = {model: [AdapterRegistry(stack.mlflow_url, model, experiment).register(
            make_adapter(tiny_ko_dir(), home / f"{model}-{seed}", r=8, targets=ALL_LINEAR, seed=seed))
            for seed in (31, 32)] for model in (TINY_KO, INTENT)}
        for model in (TINY_KO, INTENT):
            set_alias_like_the_ui(running, versions[model][0], model=model)
        running.cli("loraflow", "serve", "configs/tiny-ko.yaml", "configs/tiny-intent.yaml")
        url = running.endpoint_url
        seconds: list[float] = []
        for moves in ROUNDS:
            time.sleep(args.gap)
            seconds += run_round(running, url, versions, moves)
            print("moves " + ", ".join(f"{m} -> v{versions[m][i]}" for m, i, _ in moves) + f": {seconds[-len(moves):]}",
                  flush=True)
    finally:
        running.cli("loraflow", "down", check=False)
        shutil.rmtree(home, ignore_errors=True)
    figures = {"promotion.alias_to_served_median_s": statistics.median(seconds),
               "promotion.alias_to_served_max_s": max(seconds), "promotion.moves_s": seconds}
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
