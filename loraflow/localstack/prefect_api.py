"""What the local stack asks of the Prefect server: its work pool, the `accelerator` limit, worker heartbeats and
the runs of a deployment. The only module under loraflow/ besides the rest of localstack/ that imports Prefect.
"""

from __future__ import annotations

from contextlib import suppress
from datetime import datetime

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
from prefect.client.schemas.objects import FlowRun, WorkerStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.workers.process import ProcessWorker

POOL = "loraflow"
WORKER_NAME = "loraflow-local"
# Training and serving hold a slot of this global concurrency limit, so two never share the device.
ACCELERATOR_LIMIT = "accelerator"


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
