"""The finetune flow, cold vs an identical cached rerun, measured in one run as a user runs it:

    .venv/bin/python bench/pipeline.py [--reruns 3] [--json FILE]

Each figure is a whole `loraflow run configs/tiny-ko.yaml --set serving.enabled=false` process (imports, Prefect's
temporary server, every step), in a fresh LORAFLOW_HOME that shares the machine's built tiny-ko base (content-
addressed, built once per machine): the cold run trains, evaluates and registers; each rerun finds every step's
result on disk and in the registry. Serving is off so that the figure is the pipeline's, not vLLM's start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loraflow.tiny.shared_models import share_built_models  # noqa: E402

COMMAND = [str(ROOT / ".venv" / "bin" / "loraflow"), "run", "configs/tiny-ko.yaml", "--set", "serving.enabled=false"]


def timed_run(home: Path) -> float:
    """Seconds for one whole `loraflow run` process; its output goes to a log beside the state it made."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "MLFLOW_", "HF_"))}
    env["LORAFLOW_HOME"] = str(home)
    with (home / "bench.log").open("a") as log:
        start = time.perf_counter()
        subprocess.run(COMMAND, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reruns", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="loraflow-bench-") as tmp:
        homes = [Path(tmp) / name for name in ("warm-up", "measured")]
        for home in homes:
            home.mkdir()
            share_built_models(home)
        timed_run(homes[0])  # builds the shared base if this machine has none yet: not a figure
        cold = timed_run(homes[1])
        reruns = [timed_run(homes[1]) for _ in range(args.reruns)]

    cached = statistics.median(reruns)
    figures = {
        "pipeline.cold_s": round(cold, 2),
        "pipeline.cached_rerun_s": round(cached, 2),
        "pipeline.cached_rerun_runs_s": [round(seconds, 2) for seconds in reruns],
        "pipeline.cached_rerun_fraction": round(cached / cold, 4),
    }
    print(f"cold {cold:.1f} s; cached reruns {', '.join(f'{s:.1f}' for s in reruns)} s "
          f"(median {cached:.1f} s = {cached / cold:.1%} of cold)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
