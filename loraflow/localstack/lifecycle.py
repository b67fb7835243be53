"""`loraflow up | down | status`: start what is not running, wait for health, create pool and limit, deploy, point
the plain `prefect` CLI at the server; stop exactly what was started (serving included); say what runs.

Every process is started detached in its own process group and recorded with its start time under
LORAFLOW_HOME/run/; `down` stops exactly those process groups (and their descendants) and checks nothing is left.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import psutil

from loraflow.config import load_config
from loraflow.localstack import postgres, profile, schedules
from loraflow.localstack.mlflow_auth import PASSWORD_ENV, USERNAME_ENV
from loraflow.localstack.prefect_api import ensure_pool_and_limits, worker_online
from loraflow.localstack.stack import HOST, PREFECT_FILE, REPO_ROOT, Stack, StackError
from loraflow.localstack.webhook import EVENTS, WEBHOOK_PATH
from loraflow.process import (
    ManagedProcess,
    ProcessFailed,
    answers_within,
    port_holder,
    port_in_use,
    read_record,
    recorded,
    stop_record,
    write_record,
)
from loraflow.registry.client import client_at
from loraflow.serving.records import running_endpoint, running_servers, stop_all_servers

# A recorded server that is alive may stall for a while under load (Prefect's SQLite locked): how long it may take
# to answer before it counts as not answering.
RECORDED_HEALTH_S = 60.0
# MLflow needs ~25 s to become healthy on an idle machine; give a loaded 2-core machine room.
HEALTH_TIMEOUT_S = 180.0
# Start order; `down` stops in reverse. postgres runs only when the registry is on the stack's own PostgreSQL.
SERVICE_ORDER = ("postgres", "prefect-server", "mlflow-server", "webhook", "worker")
WEBHOOK_NAME = "loraflow-serving"


def recorded_process(stack: Stack, name: str) -> psutil.Process | None:
    """The live process `up` recorded for `name`; None if it is gone or its PID was reused."""
    return recorded(read_record(stack.record_file(name)))


@contextmanager
def stack_registry(stack: Stack) -> Iterator[str | None]:
    """While the stack's MLflow server runs and no MLFLOW_TRACKING_URI says otherwise, a command of this process
    talks to that server (yields its URL; None otherwise): the stack's experiments keep their artifacts behind it
    (`mlflow-artifacts:`), which the SQLite file alone cannot reach, and only writes through it fire its webhooks.
    The environment is restored afterwards."""
    if os.environ.get("MLFLOW_TRACKING_URI") or recorded_process(stack, "mlflow-server") is None:
        yield None
        return
    added = {key: value for key, value in stack.client_env().items()
             if key in ("MLFLOW_TRACKING_URI", USERNAME_ENV, PASSWORD_ENV) and key not in os.environ}
    os.environ.update(added)
    try:
        yield stack.mlflow_url
    finally:
        for key in added:
            os.environ.pop(key, None)


def start_service(stack: Stack, name: str) -> ManagedProcess:
    service = stack.service(name)
    if service.port is not None and port_in_use(HOST, service.port):
        raise StackError(f"{name}: port {HOST}:{service.port} is taken by {port_holder(service.port)}, which this "
                         "stack did not start; stop it or choose another port (LORAFLOW_PREFECT_PORT / "
                         "LORAFLOW_MLFLOW_PORT / LORAFLOW_WEBHOOK_PORT / LORAFLOW_POSTGRES_PORT)")
    started = ManagedProcess(name, service.argv, service.env, stack.log_file(name), service.health_url,
                             cwd=REPO_ROOT).start()
    write_record(stack.record_file(name), started.record(home=str(stack.home)))
    return started


def start_postgres(stack: Stack) -> dict[str, float]:
    """The stack's own PostgreSQL, when its registry is there and it is not running: initdb the first time, start,
    create the `mlflow` database. Returns seconds to ready ({} when nothing was started)."""
    local = stack.local_postgres
    if local is None or recorded_process(stack, "postgres") is not None:
        return {}
    started = time.monotonic()
    local.initialise()
    start_service(stack, "postgres").wait_healthy(60.0, check=local.ready)
    local.ensure_database()
    return {"postgres": time.monotonic() - started}


def gpu_present() -> bool:
    import torch  # only here: `up` on a CUDA machine must know; nothing else in the stack needs torch

    return torch.cuda.is_available()


def device_present(config: str) -> bool:
    """Whether this machine has the device the job's config asks for (`model.device: cuda`)."""
    return load_config(REPO_ROOT / config).model.device != "cuda" or gpu_present()


def serving_up(config: str) -> bool:
    return running_endpoint(load_config(REPO_ROOT / config).registry.model_name) is not None


def settle_schedules(stack: Stack, before: list[schedules.Schedule]) -> list[str]:
    return schedules.settle(stack.prefect_api_url, stack.run_dir, before, device_present, serving_up)


def register_webhook(stack: Stack) -> None:
    """One MLflow webhook (by name) for alias moves, pointing at this stack's receiver: updated, never duplicated
    (`create_webhook` is not idempotent, and two would deliver each move twice)."""
    client = client_at(stack.mlflow_url)
    url = f"{stack.webhook_url}{WEBHOOK_PATH}"
    found = next((w for w in client.list_webhooks() if w.name == WEBHOOK_NAME), None)
    if found is None:
        client.create_webhook(WEBHOOK_NAME, url, events=list(EVENTS), secret=stack.webhook_secret(),
                              description="loraflow: alias moves reach vLLM (docs/serving.md)")
    else:
        client.update_webhook(found.webhook_id, url=url, events=list(EVENTS), secret=stack.webhook_secret(),
                              status="ACTIVE")


def pause_idle_polling(stack: Stack) -> list[str]:
    """After serving servers stopped: their serve/<job> polling schedules pause (else the fallback would start
    them again within a minute). Nothing to do when the stack's Prefect server is not running."""
    if recorded_process(stack, "prefect-server") is None or not answers_within(stack.prefect_api_url + "/health",
                                                                               RECORDED_HEALTH_S):
        return []
    return settle_schedules(stack, schedules.read_schedules(stack.prefect_api_url))


def deploy(stack: Stack, prefect_file: Path = PREFECT_FILE) -> list[str]:
    """`prefect deploy --all` from the repo root, exactly as a person would run it; then the schedules are put
    back the way this machine and its people want them (localstack/schedules.py). Returns what was changed."""
    before = schedules.read_schedules(stack.prefect_api_url)
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
        cwd=REPO_ROOT, env={**os.environ, **stack.client_env(), "PWD": str(REPO_ROOT)},
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StackError(f"prefect deploy failed ({prefect_file}):\n{result.stdout}\n{result.stderr}")
    return settle_schedules(stack, before)


def up(stack: Stack, prefect_file: Path | None = PREFECT_FILE) -> dict[str, float]:
    """Start whatever is not running, wait for health, create pool and limit, deploy `prefect_file`, and make
    the `loraflow` Prefect profile active. Returns seconds to healthy for each service started now (and `deploy`);
    the schedule decisions are logged to run/schedules.log."""
    for sub in ("prefect", "mlflow"):
        (stack.home / sub).mkdir(parents=True, exist_ok=True)
    postgres.remember_setting(stack.home, "backend", stack.registry)
    postgres.remember_setting(stack.home, "auth", "basic" if stack.basic_auth else "none")
    # This process registers the webhook: with basic auth, as the stack's own MLflow user.
    os.environ.update({k: v for k, v in stack.client_env().items() if k in (USERNAME_ENV, PASSWORD_ENV)})
    timings: dict[str, float] = {}
    try:
        timings.update(start_postgres(stack))
        servers = {name: (start_service(stack, name), time.monotonic())
                   for name in ("prefect-server", "mlflow-server") if recorded_process(stack, name) is None}
        for name, (process, started) in servers.items():
            process.wait_healthy(HEALTH_TIMEOUT_S)
            timings[name] = time.monotonic() - started
        for name in ("prefect-server", "mlflow-server"):
            if not answers_within(str(stack.service(name).health_url), RECORDED_HEALTH_S):
                raise StackError(f"{name} is recorded as running but does not answer; `loraflow down`, then up")
        ensure_pool_and_limits(stack.prefect_api_url)
        if recorded_process(stack, "webhook") is None:
            started = time.monotonic()
            start_service(stack, "webhook").wait_healthy(60.0)
            timings["webhook"] = time.monotonic() - started
        register_webhook(stack)
        if recorded_process(stack, "worker") is None:
            started, since = time.monotonic(), datetime.now(UTC)
            worker = start_service(stack, "worker")
            worker.wait_healthy(120.0, check=lambda: worker_online(stack.prefect_api_url, since))
            timings["worker"] = time.monotonic() - started
    except ProcessFailed as error:
        raise StackError(str(error)) from None
    if prefect_file is not None:
        started = time.monotonic()
        changes = deploy(stack, prefect_file)
        timings["deploy"] = time.monotonic() - started
        (stack.run_dir / "schedules.log").write_text("\n".join(changes) + "\n")
    profile.activate(stack)
    return timings


def down(stack: Stack) -> list[int]:
    """Stop what flows started (vLLM + router of each served model), then the worker (it owns running flows),
    then the servers; hand the `prefect` CLI back to the profile it used before `up`. Returns the PIDs stopped."""
    stopped = stop_all_servers(stack.home)
    pause_idle_polling(stack)
    for name in reversed(SERVICE_ORDER):  # the worker first: it owns running flows
        stopped += stop_record(read_record(stack.record_file(name)))
        stack.record_file(name).unlink(missing_ok=True)
    return stopped


def status(stack: Stack) -> dict[str, int | None]:
    """PID of each recorded live service, None where it is not running (postgres only where the stack has it)."""
    names = [name for name in SERVICE_ORDER if name != "postgres" or stack.local_postgres is not None]
    return {name: (process.pid if (process := recorded_process(stack, name)) else None) for name in names}


def describe(stack: Stack) -> str:
    """What `loraflow status` prints: each service, the serving servers on this machine, the URLs."""
    lines = [f"{name:15} {'running, pid ' + str(pid) if pid else 'stopped'}" for name, pid in status(stack).items()]
    for server in running_servers(stack.home):
        lines.append(f"{server.name:15} running, pid {server.pid} on port {server.port} ({server.owner})")
    lines += [
        "",
        f"Prefect UI   {stack.prefect_ui_url}",
        f"Prefect API  {stack.prefect_api_url}   (profile {profile.PROFILE!r}: {profile.state()})",
        f"MLflow UI    {stack.mlflow_url}" + ("   (basic auth)" if stack.basic_auth else ""),
        f"registry     {postgres.describe_store(*stack.mlflow_store())}",
        f"logs         {stack.log_dir}",
    ]
    return "\n".join(lines)
