"""The local stack: Prefect server, a process worker and an MLflow tracking server, all on 127.0.0.1.

    python -m loraflow.stack up | down | status | urls | demo

State (Prefect's and MLflow's SQLite databases, MLflow artifacts, logs, PID files) lives under LORAFLOW_HOME,
so stopping and starting again keeps schedules, runs and the model registry. Every process is started
detached in its own process group and recorded in a PID file; `down` stops exactly those process groups
(and their descendants) and checks that nothing is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.client.schemas.objects import FlowRun, WorkerStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.workers.process import ProcessWorker

from loraflow import paths
from loraflow.concurrency import ensure_limit
from loraflow.env import configure_environment
from loraflow.links import mlflow_run_url
from loraflow.process import is_healthy, log_tail

HOST = "127.0.0.1"
POOL = "loraflow"
WORKER_NAME = "loraflow-local"
REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"
DEMO_DEPLOYMENT = "finetune/tiny-ko"

# MLflow needs ~25 s to become healthy on an idle machine; give a loaded 2-core machine room.
HEALTH_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0


class StackError(RuntimeError):
    """The stack could not be started, reached or stopped; the message says what to do."""


@dataclass(frozen=True)
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str | None  # None: health is checked some other way (the worker registers with its pool)


@dataclass(frozen=True)
class Stack:
    home: Path
    prefect_port: int = 4200
    mlflow_port: int = 5000
    # How often the worker asks for due runs: the bulk of the delay from `deployment run` to flow start.
    worker_poll_seconds: float = 2.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Stack:
        return cls(
            home=paths.home(),
            prefect_port=int(os.environ.get("LORAFLOW_PREFECT_PORT", "4200")),
            mlflow_port=int(os.environ.get("LORAFLOW_MLFLOW_PORT", "5000")),
            worker_poll_seconds=float(os.environ.get("LORAFLOW_WORKER_POLL_SECONDS", "2")),
        )

    @property
    def prefect_ui_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_ui_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    def client_env(self) -> dict[str, str]:
        """What a process needs to talk to this stack: the CLI, the worker, and the flows it runs."""
        return {
            "LORAFLOW_HOME": str(self.home),
            "PREFECT_HOME": str(self.home / "prefect"),
            "PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_UI_URL": self.prefect_ui_url,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "DO_NOT_TRACK": "true",
            **self.extra_env,
        }

    def services(self) -> list[Service]:
        python = sys.executable
        env = {**os.environ, **self.client_env()}
        mlflow_dir = self.home / "mlflow"
        prefect_db = self.home / "prefect" / "prefect.db"
        prefect_server = Service(
            name="prefect-server",
            argv=[
                python,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                HOST,
                "--port",
                str(self.prefect_port),
                "--analytics-off",
            ],
            env={
                **env,
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_db}",
            },
            health_url=f"{self.prefect_api_url}/health",
        )
        mlflow_server = Service(
            name="mlflow-server",
            argv=[
                python,
                "-m",
                "mlflow",
                "server",
                "--host",
                HOST,
                "--port",
                str(self.mlflow_port),
                "--workers",
                "1",
                # Same store as the embedded default (loraflow.paths), so both modes share one registry.
                "--backend-store-uri",
                f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                "--artifacts-destination",
                str(mlflow_dir / "artifacts"),
                "--serve-artifacts",
            ],
            # Server-side jobs (GenAI scorers, trace rollups) add 8 processes; this stack has no use for them.
            env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            health_url=f"{self.mlflow_url}/health",
        )
        worker = Service(
            name="worker",
            argv=[
                python,
                "-m",
                "prefect",
                "worker",
                "start",
                "--pool",
                POOL,
                "--type",
                "process",
                "--name",
                WORKER_NAME,
            ],
            env={**env, "PREFECT_WORKER_QUERY_SECONDS": str(self.worker_poll_seconds)},
            health_url=None,
        )
        return [prefect_server, mlflow_server, worker]

    def service(self, name: str) -> Service:
        return next(service for service in self.services() if service.name == name)


# --- processes --------------------------------------------------------------------------------------------


def _pid_file(stack: Stack, name: str) -> Path:
    return stack.run_dir / f"{name}.json"


def recorded_process(stack: Stack, name: str) -> psutil.Process | None:
    """The live process `up` recorded for `name`; None if it is gone or its PID was reused."""
    pid_file = _pid_file(stack, name)
    if not pid_file.is_file():
        return None
    record = json.loads(pid_file.read_text())
    try:
        process = psutil.Process(record["pid"])
        same = abs(process.create_time() - record["create_time"]) < 0.5
    except psutil.NoSuchProcess:
        return None
    return process if same and _alive(process) else None


def _alive(process: psutil.Process) -> bool:
    # A killed process nobody has reaped yet is a zombie: it holds no resources and counts as gone.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return True
    return False


def _start(stack: Stack, service: Service, port: int | None) -> psutil.Process:
    if port is not None and _port_in_use(port):
        raise StackError(
            f"{service.name}: port {HOST}:{port} is taken by a process this stack did not start; "
            "stop it or choose another port (LORAFLOW_PREFECT_PORT / LORAFLOW_MLFLOW_PORT)"
        )
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = stack.log_dir / f"{service.name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            service.argv,
            env=service.env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group, survives our exit
        )
    process = psutil.Process(popen.pid)
    record = {
        "pid": popen.pid,
        "create_time": process.create_time(),
        "argv": service.argv,
        "log": str(log_path),
    }
    _pid_file(stack, service.name).write_text(json.dumps(record, indent=2))
    return process


def _family(leader: psutil.Process) -> list[psutil.Process]:
    """The leader, its descendants, and anything else still in its process group."""
    members = {leader.pid: leader}
    with contextlib.suppress(psutil.NoSuchProcess):
        members.update({child.pid: child for child in leader.children(recursive=True)})
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == leader.pid:
                members.setdefault(process.pid, process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return list(members.values())


def _wait_gone(processes: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    alive = [p for p in processes if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _alive(p)]
    return alive


def _signal_all(processes: Iterable[psutil.Process], sig: signal.Signals) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(sig)


def stop(stack: Stack, name: str) -> list[int]:
    """Stop the recorded process group of `name` (TERM, then KILL); returns the PIDs that were stopped."""
    leader = recorded_process(stack, name)
    _pid_file(stack, name).unlink(missing_ok=True)
    if leader is None:
        return []
    # Freeze the leader while its family is collected: a worker must not start a flow-run process between the
    # snapshot and the signal (that child would outlive it, reparented and out of reach).
    with contextlib.suppress(psutil.NoSuchProcess):
        leader.suspend()
    family = _family(leader)
    _signal_all(family, signal.SIGTERM)
    with contextlib.suppress(psutil.NoSuchProcess):
        leader.resume()
    stubborn = _wait_gone(family, STOP_TIMEOUT_S)
    _signal_all(stubborn, signal.SIGKILL)
    # Children forked while shutting down join the group late: sweep it once more (the group outlives its leader).
    stragglers = [p for p in _family(leader) if _alive(p) and p.pid not in {f.pid for f in family}]
    _signal_all(stragglers, signal.SIGKILL)
    left = _wait_gone(stubborn + stragglers, 5.0)
    if left:
        raise StackError(f"{name}: processes {[p.pid for p in left]} survived SIGKILL")
    return sorted(p.pid for p in family)


# --- health -----------------------------------------------------------------------------------------------


def _wait_until(check: Callable[[], bool], process: psutil.Process, what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if not _alive(process):
            raise StackError(f"{what} exited during startup; see {log}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} not healthy after {timeout:.0f} s; see {log}:\n{log_tail(log)}")
        time.sleep(0.5)


def _worker_online(stack: Stack, since: datetime) -> bool:
    """Our worker sent a heartbeat after `since` (a stopped worker of the same name may still look online)."""
    with temporary_settings({PREFECT_API_URL: stack.prefect_api_url}), get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(POOL)
    return any(
        w.name == WORKER_NAME and w.status == WorkerStatus.ONLINE and w.last_heartbeat_time > since for w in workers
    )


# --- up / down --------------------------------------------------------------------------------------------


def ensure_pool_and_limits(stack: Stack) -> None:
    with temporary_settings({PREFECT_API_URL: stack.prefect_api_url}):
        with get_client(sync_client=True) as client:
            try:
                client.read_work_pool(POOL)
            except ObjectNotFound:
                with contextlib.suppress(ObjectAlreadyExists):
                    client.create_work_pool(
                        WorkPoolCreate(
                            name=POOL,
                            type="process",
                            base_job_template=ProcessWorker.get_default_base_job_template(),
                        )
                    )
        ensure_limit()


def deploy(stack: Stack, prefect_file: Path = PREFECT_FILE) -> None:
    """`prefect deploy --all` from the repo root, exactly as a person would run it."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "--no-prompt",
            "deploy",
            "--all",
            "--prefect-file",
            str(prefect_file),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, **stack.client_env(), "PWD": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(f"prefect deploy failed ({prefect_file}):\n{result.stdout}\n{result.stderr}")


def up(stack: Stack, prefect_file: Path | None = PREFECT_FILE) -> dict[str, float]:
    """Start whatever is not running, wait for health, create pool and limit, deploy `prefect_file`.

    Returns seconds from start to healthy for each service started now (already running ones are left out).
    """
    stack.home.mkdir(parents=True, exist_ok=True)
    (stack.home / "prefect").mkdir(exist_ok=True)
    (stack.home / "mlflow").mkdir(exist_ok=True)
    ports = {"prefect-server": stack.prefect_port, "mlflow-server": stack.mlflow_port}
    started: dict[str, tuple[psutil.Process, float]] = {}
    for name in ("prefect-server", "mlflow-server"):
        if recorded_process(stack, name) is None:
            started[name] = (_start(stack, stack.service(name), ports[name]), time.monotonic())
    timings: dict[str, float] = {}
    for name in ("prefect-server", "mlflow-server"):
        service = stack.service(name)
        process = recorded_process(stack, name)
        if process is None:
            raise StackError(f"{name} exited during startup; see {stack.log_dir / (name + '.log')}")
        url = service.health_url
        assert url is not None
        _wait_until(lambda url=url: is_healthy(url), process, name, stack.log_dir / f"{name}.log", HEALTH_TIMEOUT_S)
        if name in started:
            timings[name] = time.monotonic() - started[name][1]
    ensure_pool_and_limits(stack)
    worker = recorded_process(stack, "worker")
    if worker is None:
        t0, since = time.monotonic(), datetime.now(UTC)
        worker = _start(stack, stack.service("worker"), None)
        _wait_until(lambda: _worker_online(stack, since), worker, "worker", stack.log_dir / "worker.log", 120.0)
        timings["worker"] = time.monotonic() - t0
    if prefect_file is not None:
        t0 = time.monotonic()
        deploy(stack, prefect_file)
        timings["deploy"] = time.monotonic() - t0
    return timings


def down(stack: Stack) -> list[int]:
    """Stop what flows started (vLLM + router of each served model), then the worker (it owns running flows),
    then the servers. Returns every PID stopped by name here; serving stacks are stopped by their own records."""
    from loraflow.serving.stack import stop_all_detached

    stop_all_detached(stack.home)
    return [pid for name in ("worker", "prefect-server", "mlflow-server") for pid in stop(stack, name)]


def status(stack: Stack) -> dict[str, int | None]:
    """PID of each recorded live service, None where it is not running."""
    return {
        service.name: (process.pid if (process := recorded_process(stack, service.name)) else None)
        for service in stack.services()
    }


def urls(stack: Stack) -> str:
    return (
        f"Prefect UI   {stack.prefect_ui_url}\n"
        f"Prefect API  {stack.prefect_api_url}\n"
        f"MLflow UI    {stack.mlflow_url}\n"
        f"logs         {stack.log_dir}\n"
        f"CLI env      export PREFECT_API_URL={stack.prefect_api_url} MLFLOW_TRACKING_URI={stack.mlflow_url}"
    )


# --- demo: the user's path --------------------------------------------------------------------------------


def latest_flow_run(stack: Stack, deployment: str) -> FlowRun | None:
    """The most recently created run of `flow/deployment`."""
    with temporary_settings({PREFECT_API_URL: stack.prefect_api_url}), get_client(sync_client=True) as client:
        try:
            target = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            return None
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[target.id])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            limit=1,
        )
    return runs[0] if runs else None


def flow_run_ui_url(stack: Stack, flow_run_id: object) -> str:
    return f"{stack.prefect_ui_url}/runs/flow-run/{flow_run_id}"


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
    """`make up`, deploy, `prefect deployment run <deployment> --watch`, then say where to look."""
    print(f"Starting the local stack under {stack.home} ...", flush=True)
    for name, seconds in up(stack).items():
        print(f"  {name}: ready in {seconds:.1f} s", flush=True)
    command = [sys.executable, "-m", "prefect", "deployment", "run", deployment, "--watch"]
    print("$ prefect deployment run", deployment, "--watch", flush=True)
    watched = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **stack.client_env()}, check=False)
    flow_run = latest_flow_run(stack, deployment)
    state = flow_run.state.type.value if flow_run and flow_run.state else "UNKNOWN"
    print(f"\nflow run: {flow_run.name if flow_run else '?'}  state: {state}")
    runs = mlflow_runs_of_flow_run(stack, flow_run.id) if flow_run else []
    if flow_run:
        print(f"Prefect  {flow_run_ui_url(stack, flow_run.id)}")
    for run in runs:
        info = run["info"]
        print(f"MLflow   {mlflow_run_url(stack.mlflow_url, info['experiment_id'], info['run_id'])}")
    if not runs:
        print(f"MLflow   {stack.mlflow_url} (no run tagged with this flow run)")
    print("Stop everything with `make down`.")
    return watched.returncode or (0 if state == "COMPLETED" and runs else 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraflow.stack", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status", "urls", "ui", "demo"])
    args = parser.parse_args(argv)
    configure_environment()  # the servers and the worker inherit the same state layout as every entry point
    stack = Stack.from_env()
    try:
        if args.command == "up":
            for name, seconds in up(stack).items():
                print(f"{name}: ready in {seconds:.1f} s")
            print(urls(stack))
        elif args.command == "down":
            stopped = down(stack)
            print(f"stopped {len(stopped)} process(es)" + (f": {stopped}" if stopped else ""))
        elif args.command == "status":
            for name, pid in status(stack).items():
                print(f"{name:15} {'running, pid ' + str(pid) if pid else 'stopped'}")
        elif args.command in ("urls", "ui"):
            print(urls(stack))
        else:
            return demo(stack)
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
