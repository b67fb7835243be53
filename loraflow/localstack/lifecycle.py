"""`loraflow up | down | status | deploy`: start what is not running, wait for health, create pool and limits,
deploy every job's deployments, point the plain `prefect` CLI at the server; stop exactly what was started
(serving included) and leave no flow run claiming to run; say what runs.

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
from loraflow.localstack import jobs, postgres, profile, schedules
from loraflow.localstack.mlflow_auth import PASSWORD_ENV, USERNAME_ENV
from loraflow.localstack.prefect_api import (
    crash_orphaned_runs,
    ensure_pool_and_limits,
    retire_deployments,
    worker_online,
)
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
from loraflow.serving.records import job_records, read_endpoint, running_servers, server_records, stop_all_serving

# A recorded server that is alive may stall for a while under load (Prefect's SQLite locked): how long it may take
# to answer before it counts as not answering.
RECORDED_HEALTH_S = 60.0
# MLflow needs ~25 s to become healthy on an idle machine; give a loaded 2-core machine room.
HEALTH_TIMEOUT_S = 180.0
# Start order; `down` stops in reverse. postgres runs only when the registry is on the stack's own PostgreSQL.
SERVICE_ORDER = ("postgres", "prefect-server", "mlflow-server", "webhook", "worker", "reconciler")
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


def settle_schedules(stack: Stack, before: list[schedules.Schedule]) -> list[str]:
    return schedules.settle(stack.prefect_api_url, stack.run_dir, before, device_present)


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


def deploy(stack: Stack, extra: list[str] = (), base_file: Path = PREFECT_FILE) -> list[str]:
    """Every job's deployments (loraflow/localstack/jobs.py) through `prefect deploy --all`, exactly as a person
    would run it; then the deployments of removed job files are retired and the schedules put back the way this
    machine and its people want them (localstack/schedules.py). Returns what changed, one line each. A job file
    that does not validate changes nothing: the error names the file and field."""
    found, errors = jobs.read_jobs(jobs.job_files(stack, list(extra)))
    if errors:
        raise StackError("job configs that do not validate (fix them, or move them out of configs/); nothing was "
                         "deployed:\n" + "\n".join(errors))
    prefect_file = jobs.write_prefect_file(stack, base_file, found, list(extra))
    before = schedules.read_schedules(stack.prefect_api_url)
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
        cwd=REPO_ROOT, env={**os.environ, **stack.client_env(), "PWD": str(REPO_ROOT)},
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StackError(f"prefect deploy failed ({prefect_file}):\n{result.stdout}\n{result.stderr}")
    # `serve/<job>` deployments of earlier loraflow versions go too: the reconciler serves every job now.
    retired = retire_deployments(stack.prefect_api_url, jobs.GENERATED_TAG, jobs.generated_names(found),
                                 obsolete_flows=("serve",))
    changes = [f"deployed {name}" for name in sorted(jobs.generated_names(found))]
    changes += [f"retired {name} (its job file is gone)" for name in retired]
    return changes + settle_schedules(stack, before)


def up(stack: Stack, deploy_jobs: bool = True, base_file: Path = PREFECT_FILE) -> dict[str, float]:
    """Start whatever is not running, wait for health, create pool and limits, mark runs left by a crash (a killed
    worker, a reboot) as Crashed, deploy every job (unless `deploy_jobs` is off), start the serving
    reconciler and make the `loraflow` Prefect profile active. Returns seconds to healthy for each service started
    now (and `deploy`); what deploying changed is logged to run/schedules.log."""
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
        # What a crash (a killed worker, a reboot) left Running is Crashed before anything waits on it.
        crash_orphaned_runs(stack.prefect_api_url, worker_gone=recorded_process(stack, "worker") is None)
        if recorded_process(stack, "worker") is None:
            started, since = time.monotonic(), datetime.now(UTC)
            worker = start_service(stack, "worker")
            worker.wait_healthy(120.0, check=lambda: worker_online(stack.prefect_api_url, since))
            timings["worker"] = time.monotonic() - started
        if deploy_jobs:
            started = time.monotonic()
            changes = deploy(stack, base_file=base_file)
            timings["deploy"] = time.monotonic() - started
            (stack.run_dir / "schedules.log").write_text("\n".join(changes) + "\n")
        if recorded_process(stack, "reconciler") is None:
            start_service(stack, "reconciler")  # reads what was deployed; alias events of the last minute replay
    except ProcessFailed as error:
        raise StackError(str(error)) from None
    profile.activate(stack)
    return timings


def down(stack: Stack) -> list[int]:
    """Stop the reconciler (no pass starts), then serving (endpoint and base servers), the worker (it owns running
    flows), mark what they left Running as Crashed, then the servers; hand the `prefect` CLI back to the profile it
    used before `up`. Returns the PIDs stopped."""
    stopped = _stop_service(stack, "reconciler")
    stopped += stop_all_serving(stack.home)
    stopped += _stop_service(stack, "worker")
    if recorded_process(stack, "prefect-server") is not None and answers_within(
            str(stack.service("prefect-server").health_url), RECORDED_HEALTH_S):
        crash_orphaned_runs(stack.prefect_api_url, worker_gone=True)
    for name in reversed(SERVICE_ORDER):
        stopped += _stop_service(stack, name)
    return list(dict.fromkeys(stopped))  # a vLLM the endpoint restarted is its child: stopped with both


def _stop_service(stack: Stack, name: str) -> list[int]:
    stopped = stop_record(read_record(stack.record_file(name)))
    stack.record_file(name).unlink(missing_ok=True)
    return stopped


def status(stack: Stack) -> dict[str, int | None]:
    """PID of each recorded live service, None where it is not running (postgres only where the stack has it)."""
    names = [name for name in SERVICE_ORDER if name != "postgres" or stack.local_postgres is not None]
    return {name: (process.pid if (process := recorded_process(stack, name)) else None) for name in names}


def describe_serving(home: Path) -> list[str]:
    """The endpoint, each base server with the jobs on it, and why a job of the same base is not on it."""
    endpoint = read_endpoint(home)
    if endpoint is None:
        return ["serving        off (a finetune run of a served job, or `loraflow serve CONFIG`, starts it)"]
    alive = recorded(endpoint.process) is not None
    lines = [f"endpoint       {endpoint.url}/v1 ({'pid ' + str(endpoint.process['pid']) if alive else 'crashed'})"]
    served = job_records(home)
    for server in server_records(home):
        on_it = [j.model for j in served if j.server == server.server_id and not j.stopped]
        state = f"pid {server.process['pid']}" if recorded(server.process) is not None else "restarting"
        lines.append(f"base server    {server.server_id} ({state}, --max-lora-rank {server.max_lora_rank}, "
                     f"--max-loras {server.capacity['max_loras']}): {', '.join(on_it) or 'no job'}")
    for job in served:
        lines += [f"  {job.model}: {note}" for note in job.notes]
        if job.stopped:
            lines.append(f"  {job.model}: taken off (`loraflow serve --stop`); `loraflow serve` serves it again")
    return lines


def describe(stack: Stack) -> str:
    """What `loraflow status` prints: each service, serving (which jobs share which server, and why not), the
    loraflow servers on this machine, the URLs."""
    lines = [f"{name:15} {'running, pid ' + str(pid) if pid else 'stopped'}" for name, pid in status(stack).items()]
    lines += describe_serving(stack.home)
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
