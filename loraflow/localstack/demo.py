"""`loraflow demo`: the user's path. `up`, then `prefect deployment run finetune/tiny-ko --watch`, then where to
look (the Prefect run, the MLflow run it logged to)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from loraflow.localstack.lifecycle import up
from loraflow.localstack.prefect_api import latest_flow_run
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
    print("$ prefect deployment run", deployment, "--watch", flush=True)
    watched = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", deployment, "--watch"],
                             cwd=REPO_ROOT, env={**os.environ, **stack.client_env()}, check=False)
    flow_run = latest_flow_run(stack.prefect_api_url, deployment)
    state = flow_run.state.type.value if flow_run and flow_run.state else "UNKNOWN"
    print(f"\nflow run: {flow_run.name if flow_run else '?'}  state: {state}")
    runs = mlflow_runs_of_flow_run(stack, flow_run.id) if flow_run else []
    if flow_run:
        print(f"Prefect  {stack.flow_run_url(flow_run.id)}")
    for run in runs:
        info = run["info"]
        print(f"MLflow   {run_url(stack.mlflow_url, info['experiment_id'], info['run_id'])}")
    if not runs:
        print(f"MLflow   {stack.mlflow_url} (no run tagged with this flow run)")
    if (endpoint := read_endpoint(stack.home)) is not None:
        print(f"OpenAI   {endpoint.url}/v1 (model=\"tiny-ko\": the champion; `loraflow status` lists every served job)")
    print("Stop everything with `make down` (or `loraflow down`).")
    return watched.returncode or (0 if state == "COMPLETED" and runs else 1)
