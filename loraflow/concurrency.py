"""The `accelerator` global concurrency limit: training and serving hold it so two never share the device.

Prefect only counts slots against a limit that exists (3.7 no longer creates missing limits), and with
`strict=False` a missing limit silently lets everyone through. So the limit is created on first use
(size 1) and acquired with `strict=True`. An operator can resize it later
(`prefect gcl update accelerator --limit 4`); an existing limit is never changed here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError, ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_run_logger

ACCELERATOR_LIMIT = "accelerator"

# A killed run keeps its slot until the lease expires; a short lease lets its retry start soon after.
# The lease is renewed in the background while the work runs, so long trainings are unaffected.
LEASE_SECONDS = 60


def ensure_limit(name: str = ACCELERATOR_LIMIT, slots: int = 1) -> None:
    """Create the global concurrency limit `name` with `slots` slots unless it exists."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            # Another run may create it between our read and create.
            with suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@contextmanager
def accelerator(timeout_seconds: float | None = None) -> Iterator[None]:
    """Hold the machine's accelerator for the body; waits (forever by default) while another run holds it."""
    ensure_limit()
    logger = _logger()
    logger.info("Waiting for concurrency slot %r", ACCELERATOR_LIMIT)
    # A transient failure to renew the lease must not kill hours of training: keep going.
    with concurrency(
        ACCELERATOR_LIMIT,
        occupy=1,
        timeout_seconds=timeout_seconds,
        lease_duration=LEASE_SECONDS,
        strict=True,
        raise_on_lease_renewal_failure=False,
    ):
        logger.info("Holding concurrency slot %r", ACCELERATOR_LIMIT)
        yield
    logger.info("Released concurrency slot %r", ACCELERATOR_LIMIT)
