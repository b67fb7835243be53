"""`loraflow demo`: the user's path. `up`, then `prefect deployment run finetune/tiny-ko`, the run's own log lines
as the Prefect UI shows them (each step's progress, not Prefect's event stream that `--watch` prints), then where to
look (the Prefect run, the MLflow run it logged to, the OpenAI endpoint)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
from prefect.client.schemas.objects import Log

from loraflow.localstack.lifecycle import up
from loraflow.localstack.prefect_api import follow_flow_run, latest_flow_run
from loraflow.localstack.stack import REPO_ROOT, Stack
from loraflow.registry.client import run_url
from loraflow.serving.records import read_endpoint

DEMO_DEPLOYMENT = "finetune/tiny-ko"


def mlflow_runs_of_flow_run(stack: Stack, flow_run_id: object) -> list[dict]:
    """MLflow runs (REST API of the stack's server) tagged with this Prefect flow run (lineage tag `flow_run_id`)."""
    api = f"{stack.mlflow_url}/api/2.0/mlflow"
    experiments = httpx.post(f"{api}/experiments/search", json={"max_results": 1000}, timeout=30).json()
    ids = [e["experiment_id"] for e in experiments.get("experiments", [])]
    if not ids:
        return []
    body = {"experiment_ids": ids, "filter": f"tags.flow_run_id = '{flow_run_id}'"}
    return httpx.post(f"{api}/runs/search", json=body, timeout=30).json().get("runs", [])


def demo(stack: Stack, deployment: str = DEMO_DEPLOYMENT) -> int:
    print(f"Starting the local stack under {stack.home} ...", flush=True)
    for name, seconds in up(stack).items():
        print(f"  {name}: ready in {seconds:.1f} s", flush=True)
    print("$ prefect deployment run", deployment, flush=True)
    started = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", deployment],
                             cwd=REPO_ROOT, env={**os.environ, **stack.client_env()}, check=False,
                             capture_output=True, text=True)
    flow_run = latest_flow_run(stack.prefect_api_url, deployment)
    if started.returncode or flow_run is None:
        print(started.stdout + started.stderr, file=sys.stderr)
        return started.returncode or 1
    print(f"flow run {flow_run.name} ({flow_run.id}); its log, as in the Prefect UI:", flush=True)
    flow_run = follow_flow_run(stack.prefect_api_url, flow_run.id, _print_line)
    state = flow_run.state.type.value if flow_run.state else "UNKNOWN"
    print(f"\nflow run: {flow_run.name}  state: {state}")
    runs = mlflow_runs_of_flow_run(stack, flow_run.id)
    print(f"Prefect  {stack.flow_run_url(flow_run.id)}")
    for run in runs:
        info = run["info"]
        print(f"MLflow   {run_url(stack.mlflow_url, info['experiment_id'], info['run_id'])}")
    if not runs:
        print(f"MLflow   {stack.mlflow_url} (no run tagged with this flow run)")
    if (endpoint := read_endpoint(stack.home)) is not None:
        print(f"OpenAI   {endpoint.url}/v1 (model=\"tiny-ko\": the champion; `loraflow status` lists every served job)")
    print("In a new shell, `source .venv/bin/activate` first: then `prefect deployment run finetune/tiny-ko` and "
          "`loraflow status` work as above. Stop everything with `make down` (or `loraflow down`).")
    return 0 if state == "COMPLETED" and runs else 1


def _print_line(line: Log, task: str) -> None:
    print(f"{line.timestamp.astimezone():%H:%M:%S} {task or 'finetune':<22} {line.message}", flush=True)
