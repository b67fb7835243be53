"""A running local stack driven the way a user drives it: `loraflow up` / `down` and the `prefect` CLI as console
scripts of the venv, Prefect's API and MLflow's REST API (what the UI calls). Tests (`local_stack`) and
bench/promotion.py use it; its checks fail with AssertionError carrying the command's output, as they want it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psutil
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from loraflow.localstack.lifecycle import SERVICE_ORDER, recorded_process
from loraflow.localstack.stack import REPO_ROOT, Stack
from loraflow.process import alive, free_port
from loraflow.serving.urls import PORT_ENV

TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
TINY_KO = "tiny-ko"  # the model of configs/tiny-ko.yaml


@dataclass
class RunningStack:
    stack: Stack
    env: dict[str, str]  # os.environ plus what a CLI needs to reach this stack
    timings: dict[str, float]  # seconds to healthy per service at the first `up`, plus `deploy`

    @classmethod
    def on_free_ports(cls, home: Path) -> RunningStack:
        """A stack in `home` (not started) on free ports (its serving endpoint's too), with its own HOME: `loraflow
        up` writes the Prefect profile into HOME/.prefect, where a new shell finds it."""
        stack = Stack(home=home, prefect_port=free_port(), mlflow_port=free_port(), webhook_port=free_port())
        env = {**os.environ, "LORAFLOW_HOME": str(home), "LORAFLOW_PREFECT_PORT": str(stack.prefect_port),
               "LORAFLOW_MLFLOW_PORT": str(stack.mlflow_port), "LORAFLOW_WEBHOOK_PORT": str(stack.webhook_port),
               PORT_ENV: str(free_port()), "HOME": str(home / "user-home")}
        env.pop("PREFECT_PROFILES_PATH", None)
        return cls(stack, env | stack.client_env(), {})

    @property
    def home(self) -> Path:
        return self.stack.home

    @property
    def endpoint_url(self) -> str:
        """Where this stack's serving endpoint answers (once something serves)."""
        return f"http://127.0.0.1:{self.env[PORT_ENV]}"

    def cli(self, *args: str, check: bool = True, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A console script of the venv (`loraflow`, `prefect`) from the repo root, against this stack."""
        result = subprocess.run([str(Path(sys.executable).parent / args[0]), *args[1:]], cwd=REPO_ROOT,
                                env=env or self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def new_shell_env(self) -> dict[str, str]:
        """A new login shell of the same user: no Prefect, MLflow or loraflow variables, the same HOME."""
        return {name: os.environ[name] for name in ("PATH", "LANG") if name in os.environ} | {"HOME": self.env["HOME"]}

    def prefect(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self.cli("prefect", *args, check=check, timeout=timeout)

    @contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        with temporary_settings({PREFECT_API_URL: self.stack.prefect_api_url}), get_client(sync_client=True) as client:
            yield client

    def flow_run(self, flow_run_id: UUID | str) -> FlowRun:
        with self.client() as client:
            return client.read_flow_run(UUID(str(flow_run_id)))

    def wait_for_flow_run(self, flow_run_id: UUID | str, timeout: float = 300, after: FlowRun | None = None) -> FlowRun:
        """The run once it is in a terminal state; with `after`, a terminal state newer than `after`'s (a retried
        run must not be judged by the state it was retried from)."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(flow_run_id)
            newer = after is None or (run.state is not None and run.state.id != after.state.id
                                      and run.state.timestamp > after.state.timestamp)
            if run.state is not None and run.state.type in TERMINAL and newer:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {flow_run_id} still {run.state} after {timeout} s")
            time.sleep(1)

    def run_deployment(self, name: str, *params: str, timeout: float = 900) -> FlowRun:
        """`prefect deployment run NAME --param ...`, then the run's own state through the API: the CLI's `--watch`
        was seen to miss the end of a long run and wait forever."""
        created = re.findall(r"UUID: ([0-9a-f-]{36})", self.prefect("deployment", "run", name, *params).stdout)
        run = self.wait_for_flow_run(created[0], timeout)
        assert run.state is not None and run.state.type == StateType.COMPLETED, run.state
        return run

    def mlflow(self, method: str, endpoint: str, **kwargs: Any) -> dict[str, Any]:
        response = httpx.request(method, f"{self.stack.mlflow_url}/api/2.0/mlflow/{endpoint}", timeout=30, **kwargs)
        response.raise_for_status()
        return response.json()

    def started_processes(self) -> list[psutil.Process]:
        """Every live process of the stack: the recorded leaders and all their descendants."""
        found: list[psutil.Process] = []
        for name in SERVICE_ORDER:
            leader = recorded_process(self.stack, name)
            if leader is not None:
                found += [leader, *leader.children(recursive=True)]
        return found

    def up(self) -> dict[str, float]:
        """`loraflow up`; returns the printed seconds-to-ready per service."""
        output = self.cli("loraflow", "up").stdout
        return {name: float(s) for name, s in re.findall(r"^([\w-]+): ready in ([\d.]+) s$", output, re.M)}

    def down(self) -> list[int]:
        """`loraflow down`; fails if any process that was running before is still alive."""
        before = self.started_processes()
        self.cli("loraflow", "down")
        survivors = [p.pid for p in before if alive(p)]
        assert not survivors, f"still alive after `stack down`: {survivors}"
        return [p.pid for p in before]


def stable_root(endpoint: str, model: str = TINY_KO) -> str | None:
    """The versioned name the endpoint's stable name `model` answers with now; None while it answers no such name."""
    try:
        listing = httpx.get(f"{endpoint}/v1/models", timeout=10).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None
    return next((entry["root"] for entry in listing if entry["id"] == model), None)


def set_alias_like_the_ui(stack: RunningStack, version: str, model: str = TINY_KO) -> None:
    """Point `champion` at `version` through MLflow's REST API, the call the MLflow UI makes."""
    stack.mlflow("POST", "registered-models/alias", json={"name": model, "alias": "champion", "version": version})
