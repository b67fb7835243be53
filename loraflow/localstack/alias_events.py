"""The stack's reconciler hears alias moves as they happen: a subscription to the Prefect events the webhook
receiver emits (`mlflow.model_version_alias.created|deleted`, loraflow/localstack/webhook.py), over Prefect's event
stream. The subscriber reconnects by itself and replays the last minute's events it has not seen; when the stream
stays down, the reconciler's drift check still gets there."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from datetime import datetime

from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter

from loraflow.localstack.webhook import EVENTS

log = logging.getLogger(__name__)
RESOURCE_PREFIX = "mlflow.registered-model."
RETRY_S = 5.0

Notify = Callable[[str, datetime | None, str], None]


def moved_model(resource_id: str) -> str | None:
    """`mlflow.registered-model.tiny-ko` -> `tiny-ko`."""
    return resource_id.removeprefix(RESOURCE_PREFIX) if resource_id.startswith(RESOURCE_PREFIX) else None


async def _subscribe(notify: Notify, stop: threading.Event) -> None:
    names = [f"mlflow.{event}" for event in EVENTS]
    async with get_events_subscriber(filter=EventFilter(event=EventNameFilter(name=names))) as subscriber:
        log.info("following %s", ", ".join(names))
        async for event in subscriber:
            model = moved_model(event.resource.id)
            if model is not None:
                alias = event.resource.get("mlflow.alias", "?")
                version = event.resource.get("mlflow.version", "-")
                notify(model, event.occurred, f"{alias} -> v{version}" if version != "-" else f"{alias} removed")
            if stop.is_set():
                return


def follow_alias_events(notify: Notify, stop: threading.Event) -> None:
    """Call `notify(model, occurred, why)` for every alias move until `stop` is set (runs in its own thread)."""
    while not stop.is_set():
        try:
            asyncio.run(_subscribe(notify, stop))
        except Exception as error:  # the server restarting, a dropped stream: subscribe again
            log.warning("alias event stream lost (%s: %s); subscribing again in %.0f s", type(error).__name__,
                        error, RETRY_S)
        stop.wait(RETRY_S)
