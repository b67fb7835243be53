"""Session fixture `local_stack`: the real local stack (Prefect server, process worker, MLflow) on free ports.

Started and stopped through `python -m loraflow.stack up|down`, exactly like `make up` / `make down`, with
LORAFLOW_HOME in a temporary directory. deployments/prefect.yaml and tests/stackflows.yaml are deployed.
Teardown fails the session if any process the stack started is still alive.

Other modules: `pytest_plugins = ["tests.stack_fixtures"]` in conftest.py, then a `local_stack` argument.
"""

from __future__ import annotations

import json
import os
import re
import socket
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
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from loraflow.stack import REPO_ROOT, Stack, deploy, recorded_process

TEST_FLOWS_FILE = REPO_ROOT / "tests" / "stackflows.yaml"
TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningStack:
    stack: Stack
    env: dict[str, str]  # os.environ plus what a CLI needs to reach this stack
    timings: dict[str, float]  # seconds to healthy per service at the first `up`, plus `deploy`

    @property
    def home(self) -> Path:
        return self.stack.home

    def cli(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """`python -m <args>` (loraflow.stack, prefect) from the repo root, against this stack."""
        result = subprocess.run(
            [sys.executable, "-m", *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def prefect(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return self.cli("prefect", *args, check=check, timeout=timeout)

    @contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        with (
            temporary_settings({PREFECT_API_URL: self.stack.prefect_api_url}),
            get_client(sync_client=True) as client,
        ):
            yield client

    def flow_run(self, flow_run_id: UUID | str) -> FlowRun:
        with self.client() as client:
            return client.read_flow_run(UUID(str(flow_run_id)))

    def wait_for_flow_run(self, flow_run_id: UUID | str, timeout: float = 300) -> FlowRun:
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(flow_run_id)
            if run.state is not None and run.state.type in TERMINAL:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {flow_run_id} still {run.state} after {timeout} s")
            time.sleep(1)

    def mlflow(self, method: str, endpoint: str, **kwargs: Any) -> dict[str, Any]:
        response = httpx.request(
            method, f"{self.stack.mlflow_url}/api/2.0/mlflow/{endpoint}", timeout=30, **kwargs
        )
        response.raise_for_status()
        return response.json()

    def started_processes(self) -> list[psutil.Process]:
        """Every live process of the stack: the recorded leaders and all their descendants."""
        found: list[psutil.Process] = []
        for service in self.stack.services():
            leader = recorded_process(self.stack, service.name)
            if leader is not None:
                found += [leader, *leader.children(recursive=True)]
        return found

    def up(self) -> dict[str, float]:
        """`python -m loraflow.stack up`; returns the printed seconds-to-ready per service."""
        output = self.cli("loraflow.stack", "up").stdout
        return {name: float(s) for name, s in re.findall(r"^([\w-]+): ready in ([\d.]+) s$", output, re.M)}

    def down(self) -> list[int]:
        """`python -m loraflow.stack down`; fails if any process that was running before is still alive."""
        before = self.started_processes()
        self.cli("loraflow.stack", "down")
        survivors = [p.pid for p in before if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not survivors, f"still alive after `stack down`: {survivors}"
        return [p.pid for p in before]


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    home = tmp_path_factory.mktemp("loraflow-home")
    prefect_port, mlflow_port = free_port(), free_port()
    env = {
        **os.environ,
        "LORAFLOW_HOME": str(home),
        "LORAFLOW_PREFECT_PORT": str(prefect_port),
        "LORAFLOW_MLFLOW_PORT": str(mlflow_port),
    }
    # The tiny-ko base is content-addressed and reproducible: reuse this machine's build.
    shared_models = REPO_ROOT / ".loraflow" / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(shared_models, target_is_directory=True)
    running = RunningStack(Stack(home=home, prefect_port=prefect_port, mlflow_port=mlflow_port), env, {})
    running.env.update(running.stack.client_env())
    try:
        running.timings.update(running.up())
        deploy(running.stack, TEST_FLOWS_FILE)
        (home / "timings.json").write_text(json.dumps(running.timings))
        yield running
    finally:
        running.down()
