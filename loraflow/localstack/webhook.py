"""Receiver for MLflow's model-registry webhooks: turns a verified `model_version_alias.created|deleted`
delivery into a Prefect event (`mlflow.model_version_alias.created`, resource
`mlflow.registered-model.<name>`), so an automation can reconcile serving the moment a person moves an alias
in the MLflow UI instead of at the next scheduled pass.

MLflow (mlflow/webhooks/delivery.py, 3.3+) POSTs the JSON `{entity, action, timestamp, data: {name, alias,
version}}` (`version` only on `created`) with `X-MLflow-Delivery-Id` (a uuid4), `X-MLflow-Timestamp` (unix
seconds) and, when the webhook has a secret, `X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret,
"<delivery id>.<timestamp>.<body>")>`. Unsigned, wrongly signed and stale deliveries are refused with 401.

Run: `python -m uvicorn loraflow.localstack.webhook:app_from_env --factory --host 127.0.0.1 --port N` with the
secret in LORAFLOW_WEBHOOK_SECRET (read from the environment, never from argv, and never logged).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# mlflow/webhooks/constants.py (tests check these against the installed MLflow).
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
WEBHOOK_PATH = "/mlflow"  # register f"http://{host}:{port}{WEBHOOK_PATH}" with MlflowClient.create_webhook
EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
SECRET_ENV = "LORAFLOW_WEBHOOK_SECRET"
MAX_AGE_ENV = "LORAFLOW_WEBHOOK_MAX_AGE_S"
MAX_BODY_BYTES = 64 * 1024  # an alias delivery is ~150 bytes; anything near this is not MLflow

Emit = Callable[[str, dict[str, Any]], None]
log = logging.getLogger("loraflow.localstack.webhook")  # not __main__ under `python -m`
# Never inside a flow run: Prefect's API log handler (on `loraflow`, PREFECT_LOGGING_EXTRA_LOGGERS) would warn on
# every record. main() gives it a stderr handler.
log.propagate = False


class Rejected(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def expected_signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> bytes:
    """The base64 part of MLflow's `v1,<sig>`; computed over the raw body bytes MLflow signed."""
    signed = delivery_id.encode() + b"." + timestamp.encode() + b"." + body
    return base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest())


def verify(secret: str, headers: Mapping[str, str], body: bytes, max_age_s: float, now: float) -> str:
    """The delivery id of an authentic, fresh delivery; raises Rejected(401) otherwise."""
    signature, timestamp = headers.get(SIGNATURE_HEADER), headers.get(TIMESTAMP_HEADER)
    delivery_id = headers.get(DELIVERY_ID_HEADER)
    if not signature:
        raise Rejected(401, f"unsigned delivery (no {SIGNATURE_HEADER}); create the webhook with a secret")
    if not timestamp or not delivery_id:
        raise Rejected(401, f"missing {TIMESTAMP_HEADER} or {DELIVERY_ID_HEADER}")
    try:
        sent = int(timestamp)
    except ValueError:
        raise Rejected(401, f"malformed {TIMESTAMP_HEADER}") from None
    # Both ways: an old delivery is a possible replay; one from the future is a wrong clock or a forgery.
    if abs(now - sent) > max_age_s:
        raise Rejected(401, f"timestamp outside +-{max_age_s:.0f} s of now ({now - sent:+.0f} s old)")
    expected = expected_signature(secret, delivery_id, timestamp, body)
    # Space-separated `v1,<sig>` entries, as in Standard Webhooks (MLflow sends one; rotation may send two).
    candidates = [entry.partition(",") for entry in signature.split()]
    matches = [hmac.compare_digest(sig.encode("latin-1"), expected)
               for version, _, sig in candidates if version == SIGNATURE_VERSION]
    if not any(matches):
        raise Rejected(401, "signature does not match (wrong secret, or the body was altered)")
    return delivery_id


def parse_delivery(body: bytes) -> tuple[str, dict[str, Any]] | None:
    """(Prefect event name, payload) for an alias delivery; None for another event; Rejected(400) if malformed."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Rejected(400, "body is not JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
        raise Rejected(400, "body must be an object with `entity`, `action` and a `data` object")
    entity, action, data = payload.get("entity"), payload.get("action"), payload["data"]
    if not isinstance(entity, str) or not isinstance(action, str):
        raise Rejected(400, "`entity` and `action` must be strings")
    if f"{entity}.{action}" not in EVENTS:
        return None
    required = ("name", "alias", "version") if action == "created" else ("name", "alias")
    missing = [key for key in required if not isinstance(data.get(key), str) or not data[key]]
    if missing:
        raise Rejected(400, f"`data` lacks {', '.join(missing)}")
    return f"mlflow.{entity}.{action}", payload


def create_receiver(secret: str, emit: Emit, max_age_s: float = 300) -> Starlette:
    """POST WEBHOOK_PATH: verify, then `emit(event_name, payload)` once per delivery; GET /health."""
    if not secret:
        raise ValueError("a webhook secret is required: unsigned deliveries are refused")
    seen: dict[str, float] = {}  # delivery id -> when it may be forgotten (it is stale by then)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"code": status, "message": message}}, status_code=status)

    async def receive(request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return error(413, f"body over {MAX_BODY_BYTES} bytes")
        now = time.time()
        try:
            delivery_id = verify(secret, request.headers, body, max_age_s, now)
            parsed = parse_delivery(body)
        except Rejected as rejected:
            log.warning("refused a delivery from %s: %s", request.client.host if request.client else "?",
                        rejected.message)
            return error(rejected.status, rejected.message)
        for key in [key for key, until in seen.items() if until < now]:
            del seen[key]
        if delivery_id in seen:
            # A resend of a delivery already handled (MLflow retries on 5xx/429): acknowledge, do not re-emit.
            return JSONResponse({"status": "duplicate", "delivery_id": delivery_id})
        if parsed is None:
            return JSONResponse({"status": "ignored", "delivery_id": delivery_id})
        event, payload = parsed
        try:
            await run_in_threadpool(emit, event, {**payload, "delivery_id": delivery_id})
        except Exception as exc:
            # 503 makes MLflow retry (its session retries 429/5xx with backoff); the id is not marked seen.
            log.error("could not emit %s for delivery %s: %s", event, delivery_id, exc)
            return error(503, f"could not emit {event}: {type(exc).__name__}")
        seen[delivery_id] = now + 2 * max_age_s
        data = payload["data"]
        log.info("%s: %s alias %r -> %s (delivery %s)", event, data["name"], data["alias"],
                 data.get("version", "-"), delivery_id)
        return JSONResponse({"status": "emitted", "event": event, "delivery_id": delivery_id})

    async def health(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def http_error(_request: Request, exc: Exception) -> Response:  # 404/405 in the same JSON shape
        return error(exc.status_code if isinstance(exc, HTTPException) else 500, str(getattr(exc, "detail", exc)))

    return Starlette(routes=[Route(WEBHOOK_PATH, receive, methods=["POST"]), Route("/health", health, methods=["GET"])],
                     exception_handlers={HTTPException: http_error})


def resource_of(payload: Mapping[str, Any]) -> dict[str, str]:
    """The Prefect resource an alias event is about: the registered model, labelled with alias and version."""
    data = payload["data"]
    resource = {"prefect.resource.id": f"mlflow.registered-model.{data['name']}",
                "prefect.resource.name": data["name"], "mlflow.alias": data["alias"]}
    if data.get("version"):  # `deleted` deliveries carry no version
        resource["mlflow.version"] = str(data["version"])
    return resource


def emit_prefect_event(event: str, payload: dict[str, Any]) -> None:
    """The default emit: a Prefect event on the server PREFECT_API_URL names (queued by Prefect's events worker)."""
    from prefect.events import emit_event

    try:
        occurred = datetime.fromisoformat(payload["timestamp"])
    except (KeyError, TypeError, ValueError):
        occurred = None
    try:
        event_id = UUID(payload["delivery_id"])  # one delivery, one event id, even if emitted twice
    except (KeyError, TypeError, ValueError):
        event_id = None
    if emit_event(event=event, resource=resource_of(payload), payload=payload, occurred=occurred,
                  id=event_id) is None:
        raise RuntimeError("Prefect did not accept the event (is PREFECT_API_URL set?)")


def app_from_env() -> Starlette:
    """The receiver as `loraflow up` runs it: `python -m uvicorn loraflow.localstack.webhook:app_from_env --factory
    --host 127.0.0.1 --port N`, the secret in SECRET_ENV (never argv, never logged), events to PREFECT_API_URL."""
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        raise SystemExit(f"webhook receiver: environment variable {SECRET_ENV} is unset or empty")
    # Without it Prefect would emit into a temporary in-process server that nothing watches.
    if not PREFECT_API_URL.value():
        raise SystemExit("webhook receiver: PREFECT_API_URL is not set; events would reach no Prefect server")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    app = create_receiver(secret, emit_prefect_event, float(os.environ.get(MAX_AGE_ENV, "300")))

    @contextlib.asynccontextmanager
    async def drain_on_shutdown(_app: Starlette) -> AsyncIterator[None]:
        yield
        EventsWorker.drain_all(timeout=10)  # events still queued when the receiver stops are sent, not dropped

    app.router.lifespan_context = drain_on_shutdown
    return app
