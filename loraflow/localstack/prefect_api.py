"""What the local stack asks of the Prefect server: its work pool, the `accelerator` limit, worker heartbeats and
the runs of a deployment. The only module under loraflow/ besides the rest of localstack/ that imports Prefect.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import UTC, datetime, timedelta
from uuid import UUID

import psutil
from prefect import get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTimestamp,
)
from prefect.client.schemas.objects import FlowRun, Log, StateType, WorkerStatus
from prefect.client.schemas.sorting import FlowRunSort, LogSort
from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Crashed
from prefect.workers.process import ProcessWorker

POOL = "loraflow"
WORKER_NAME = "loraflow-local"
# Training and serving hold a slot of this global concurrency limit, so two never share the device.
ACCELERATOR_LIMIT = "accelerator"
# A killed run keeps its slot until the lease expires; a short lease lets its retry start soon after.
# The lease is renewed in the background while the work runs, so long trainings are unaffected.
LEASE_SECONDS = 60
# A run's processes send their log lines in batches (every 2 s by default): a line may reach the server after
# lines stamped later, or after the run's final state. Reads look back this far and wait this long at the end.
LOG_LAG = timedelta(seconds=10)
LOG_PAGE = 200  # the server's default and most it returns per read



def ensure_limit(name: str = ACCELERATOR_LIMIT, slots: int = 1) -> None:
    """Create the global concurrency limit `name` with `slots` slots unless it exists. Prefect 3.7 no longer
    creates missing limits; an operator may resize it (`prefect gcl update accelerator --limit 4`), and an
    existing limit is never changed here."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # another run may create it between our read and create
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))


def ensure_pool_and_limits(api_url: str) -> None:
    with temporary_settings({PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            try:
                client.read_work_pool(POOL)
            except ObjectNotFound:
                with suppress(ObjectAlreadyExists):
                    client.create_work_pool(WorkPoolCreate(
                        name=POOL, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
        ensure_limit()


def worker_online(api_url: str, since: datetime) -> bool:
    """Our worker sent a heartbeat after `since` (a stopped worker of the same name may still look online)."""
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(POOL)
    return any(w.name == WORKER_NAME and w.status == WorkerStatus.ONLINE and w.last_heartbeat_time > since
               for w in workers)


def latest_flow_run(api_url: str, deployment: str) -> FlowRun | None:
    """The most recently created run of `flow/deployment`."""
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            target = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            return None
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[target.id])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
    return runs[0] if runs else None


def follow_flow_run(api_url: str, flow_run_id: UUID, emit: Callable[[Log, str], None],
                    poll_s: float = 2.0) -> FlowRun:
    """Hand each log line of the run (with its task run's name, "" for the flow's own) to `emit` as it arrives,
    until the run is final and its last lines are in; returns the final run."""
    seen: set[UUID] = set()
    tasks: dict[UUID, str] = {}
    since: datetime | None = None
    final_at: float | None = None
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while final_at is None or time.monotonic() - final_at < LOG_LAG.total_seconds():
            run = client.read_flow_run(flow_run_id)
            if final_at is None and run.state is not None and run.state.is_final():
                # Its last lines are in once LOG_LAG has passed since it ended (long ago for a finished run).
                ended = (datetime.now(UTC) - run.end_time).total_seconds() if run.end_time else 0.0
                final_at = time.monotonic() - max(ended, 0.0)
            for line in _logs_after(client, flow_run_id, since - LOG_LAG if since else None):
                if line.id in seen:
                    continue
                seen.add(line.id)
                since = max(since or line.timestamp, line.timestamp)
                if line.task_run_id and line.task_run_id not in tasks:
                    tasks[line.task_run_id] = client.read_task_run(line.task_run_id).name
                emit(line, tasks.get(line.task_run_id, ""))  # "" for the flow's own lines
            time.sleep(poll_s)
    return run


def _logs_after(client: SyncPrefectClient, flow_run_id: UUID, after: datetime | None) -> Iterator[Log]:
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]),
                           timestamp=LogFilterTimestamp(after_=after) if after else None)
    offset = 0
    while page := client.read_logs(log_filter, limit=LOG_PAGE, offset=offset, sort=LogSort.TIMESTAMP_ASC):
        yield from page
        offset += len(page)
        if len(page) < LOG_PAGE:
            return


def retire_deployments(api_url: str, tag: str, keep: set[str], obsolete_flows: tuple[str, ...] = ()) -> list[str]:
    """Delete the deployments tagged `tag` whose `flow/name` is not in `keep` (their job file is gone), and every
    deployment of `obsolete_flows`; returns their names."""
    retired = []
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        flows: dict[UUID, str] = {}
        for deployment in client.read_deployments():
            flow = flows.setdefault(deployment.flow_id, client.read_flow(deployment.flow_id).name)
            name = f"{flow}/{deployment.name}"
            if (tag in (deployment.tags or []) and name not in keep) or flow in obsolete_flows:
                client.delete_deployment(deployment.id)
                retired.append(name)
    return retired


def crash_orphaned_runs(api_url: str, worker_gone: bool) -> list[str]:
    """Flow runs left Running/Pending by a worker process that is gone (stopped or killed with the stack, a reboot)
    are marked Crashed, so nothing waits on them and the UI tells the truth. Only runs whose recorded infrastructure
    pid is a dead process of this machine: a run of `loraflow run` in some shell is left alone. `worker_gone`: our
    worker is not running, so a run of our pool it left Pending before it recorded a pid (it died in between) is
    one too."""
    crashed = []
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        running = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]))))
        for run in running:
            unclaimed = (worker_gone and run.state_type == StateType.PENDING and not run.infrastructure_pid
                         and run.work_pool_name == POOL)
            if unclaimed or _gone(run.infrastructure_pid):
                client.set_flow_run_state(run.id, Crashed(message="its process stopped with the local stack (or "
                                                          "was killed); marked by `loraflow up`/`down`"), force=True)
                crashed.append(f"{run.name} ({run.id})")
    return crashed


def _gone(infrastructure_pid: str | None) -> bool:
    """A worker-started run's infrastructure pid (`pid` or `hostname:pid`) names a process of this machine that no
    longer runs."""
    host, _, pid = (infrastructure_pid or "").rpartition(":")
    return host in ("", socket.gethostname()) and pid.isdigit() and not psutil.pid_exists(int(pid))


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow or task run's logger (its lines reach the Prefect UI), else this module's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@contextmanager
def holding(limit: str, timeout_seconds: float | None = None) -> Iterator[None]:
    """Hold a slot of the global concurrency limit `limit` for the body; waits (forever by default) while others
    hold every slot.

    Prefect only counts slots against a limit that exists, and with `strict=False` a missing limit silently
    lets everyone through: so the limit is created on first use (size 1) and taken with `strict=True`.
    """
    ensure_limit(limit)
    logger = run_logger()
    logger.info("Waiting for concurrency slot %r", limit)
    # A transient failure to renew the lease must not kill hours of training: keep going.
    with concurrency(limit, occupy=1, timeout_seconds=timeout_seconds, lease_duration=LEASE_SECONDS,
                     strict=True, raise_on_lease_renewal_failure=False):
        logger.info("Holding concurrency slot %r", limit)
        yield
    logger.info("Released concurrency slot %r", limit)


def accelerator(timeout_seconds: float | None = None) -> AbstractContextManager[None]:
    """Hold the machine's accelerator for the body; waits (forever by default) while another run holds it."""
    return holding(ACCELERATOR_LIMIT, timeout_seconds)
