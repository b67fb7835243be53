"""The MLflow webhook receiver: fast tests against the app with deliveries signed by MLflow's own signing code,
and one slow end-to-end test with a real `mlflow server` delivering alias changes made the way the UI makes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
from cryptography.fernet import Fernet
from mlflow import MlflowClient
from mlflow.entities.webhook import WebhookEventStr
from mlflow.webhooks import constants
from mlflow.webhooks.delivery import _generate_hmac_signature
from starlette.testclient import TestClient

from loraflow.localstack import webhook
from loraflow.localstack.webhook import (
    SECRET_ENV,
    WEBHOOK_PATH,
    create_receiver,
    emit_prefect_event,
    resource_of,
)
from loraflow.process import ManagedProcess
from tests.fixtures import free_port

SECRET = "webhook-test-secret"
CREATED = {"entity": "model_version_alias", "action": "created", "timestamp": "2026-11-23T12:00:00+00:00",
           "data": {"name": "tiny-ko", "alias": "champion", "version": "3"}}


class Recorder:
    def __init__(self, fail: int = 0) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail

    def __call__(self, event: str, payload: dict[str, Any]) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("prefect down")
        self.calls.append((event, payload))


def signed_headers(body: str, secret: str = SECRET, timestamp: int | None = None,
                   delivery_id: str | None = None) -> dict[str, str]:
    """What MLflow's delivery sends, signed by MLflow's own helper."""
    stamp, delivery = str(int(time.time()) if timestamp is None else timestamp), delivery_id or str(uuid.uuid4())
    return {"Content-Type": "application/json", constants.WEBHOOK_DELIVERY_ID_HEADER: delivery,
            constants.WEBHOOK_TIMESTAMP_HEADER: stamp,
            constants.WEBHOOK_SIGNATURE_HEADER: _generate_hmac_signature(secret, delivery, stamp, body)}


@pytest.fixture
def emit() -> Recorder:
    return Recorder()


@pytest.fixture
def client(emit: Recorder) -> Iterator[TestClient]:
    with TestClient(create_receiver(SECRET, emit)) as test_client:
        yield test_client


def test_names_match_the_installed_mlflow() -> None:
    assert (webhook.SIGNATURE_HEADER, webhook.TIMESTAMP_HEADER, webhook.DELIVERY_ID_HEADER, webhook.SIGNATURE_VERSION) \
        == (constants.WEBHOOK_SIGNATURE_HEADER, constants.WEBHOOK_TIMESTAMP_HEADER,
            constants.WEBHOOK_DELIVERY_ID_HEADER, constants.WEBHOOK_SIGNATURE_VERSION)
    assert set(webhook.EVENTS) <= set(get_args(WebhookEventStr))


def test_good_delivery_emits_once(client: TestClient, emit: Recorder) -> None:
    body = json.dumps(CREATED)
    headers = signed_headers(body)
    reply = client.post(WEBHOOK_PATH, content=body, headers=headers)
    assert reply.status_code == 200 and reply.json()["status"] == "emitted"
    [(event, payload)] = emit.calls
    assert event == "mlflow.model_version_alias.created"
    assert payload == {**CREATED, "delivery_id": headers[constants.WEBHOOK_DELIVERY_ID_HEADER]}
    assert resource_of(payload) == {"prefect.resource.id": "mlflow.registered-model.tiny-ko",
                                    "prefect.resource.name": "tiny-ko", "mlflow.alias": "champion",
                                    "mlflow.version": "3"}
    # The same delivery again (MLflow resends on 5xx): acknowledged, not emitted twice.
    assert client.post(WEBHOOK_PATH, content=body, headers=headers).json()["status"] == "duplicate"
    deleted = json.dumps({**CREATED, "action": "deleted", "data": {"name": "tiny-ko", "alias": "champion"}})
    assert client.post(WEBHOOK_PATH, content=deleted, headers=signed_headers(deleted)).status_code == 200
    assert [event for event, _ in emit.calls] == ["mlflow.model_version_alias.created",
                                                  "mlflow.model_version_alias.deleted"]
    assert "mlflow.version" not in resource_of(emit.calls[1][1])
    assert client.get("/health").status_code == 200
    assert client.get(WEBHOOK_PATH).json()["error"]["code"] == 405


def _tampered(headers: dict[str, str], name: str, value: str | None) -> dict[str, str]:
    changed = {k: v for k, v in headers.items() if k != name}
    return changed if value is None else {**changed, name: value}


@pytest.mark.parametrize("case", ["unsigned", "wrong secret", "altered body", "stale", "future", "no timestamp",
                                  "bad timestamp", "no delivery id", "other delivery id", "v2 signature"])
def test_refused_deliveries_are_401_and_emit_nothing(client: TestClient, emit: Recorder, case: str) -> None:
    body, now = json.dumps(CREATED), int(time.time())
    sig, stamp, delivery = (constants.WEBHOOK_SIGNATURE_HEADER, constants.WEBHOOK_TIMESTAMP_HEADER,
                            constants.WEBHOOK_DELIVERY_ID_HEADER)
    good = signed_headers(body, timestamp=now)
    headers, sent = {
        "unsigned": (_tampered(good, sig, None), body),
        "wrong secret": (signed_headers(body, secret="not-the-secret"), body),
        "altered body": (good, body.replace('"3"', '"4"')),
        "stale": (signed_headers(body, timestamp=now - 301), body),
        "future": (signed_headers(body, timestamp=now + 301), body),
        "no timestamp": (_tampered(good, stamp, None), body),
        "bad timestamp": (_tampered(good, stamp, "soon"), body),
        "no delivery id": (_tampered(good, delivery, None), body),
        "other delivery id": (_tampered(good, delivery, str(uuid.uuid4())), body),
        "v2 signature": (_tampered(good, sig, good[sig].replace("v1,", "v2,")), body),
    }[case]
    reply = client.post(WEBHOOK_PATH, content=sent, headers=headers)
    assert reply.status_code == 401 and reply.json()["error"]["message"], case
    assert emit.calls == []


@pytest.mark.parametrize("body", ["not json", "[]", '{"entity": "model_version_alias"}',
                                  '{"entity": 1, "action": "created", "data": {}}',
                                  '{"entity": "model_version_alias", "action": "created", "data": {"name": "m"}}',
                                  '{"entity": "model_version_alias", "action": "deleted", "data": {"alias": "a"}}'])
def test_signed_but_malformed_bodies_are_400(client: TestClient, emit: Recorder, body: str) -> None:
    reply = client.post(WEBHOOK_PATH, content=body, headers=signed_headers(body))
    assert reply.status_code == 400 and reply.json()["error"]["message"]
    assert emit.calls == []


def test_other_events_are_acknowledged_not_emitted(client: TestClient, emit: Recorder) -> None:
    body = json.dumps({**CREATED, "entity": "registered_model", "data": {"name": "m"}})
    assert client.post(WEBHOOK_PATH, content=body, headers=signed_headers(body)).json()["status"] == "ignored"
    assert emit.calls == []


def test_emit_failure_is_503_so_mlflow_retries() -> None:
    emit = Recorder(fail=1)
    body = json.dumps(CREATED)
    headers = signed_headers(body)
    with TestClient(create_receiver(SECRET, emit)) as client:
        assert client.post(WEBHOOK_PATH, content=body, headers=headers).status_code == 503
        assert client.post(WEBHOOK_PATH, content=body, headers=headers).json()["status"] == "emitted"
    assert len(emit.calls) == 1


def test_default_emit_builds_a_valid_prefect_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """What reaches Prefect's `emit_event`, validated by Prefect's own Event model (its events worker would start
    a temporary Prefect server here; test_main_... runs the real call)."""
    import prefect.events
    from prefect.events import Event

    sent: list[Event] = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kwargs: sent.append(Event(**kwargs)) or sent[-1])
    delivery = str(uuid.uuid4())
    emit_prefect_event("mlflow.model_version_alias.created", {**CREATED, "delivery_id": delivery})
    [event] = sent
    assert event.event == "mlflow.model_version_alias.created" and str(event.id) == delivery
    assert event.resource.id == "mlflow.registered-model.tiny-ko" and event.resource["mlflow.version"] == "3"
    assert event.payload["data"] == CREATED["data"] and event.occurred.isoformat().startswith("2026-11-23T12:00")


@pytest.mark.slow
def test_mlflow_server_delivers_alias_changes(tmp_path: Path) -> None:
    """A real `mlflow server` (sqlite) with a webhook to the receiver; the alias is set and deleted through the
    REST endpoint the UI calls; the receiver gets verified deliveries of both."""
    import uvicorn

    emit = Recorder()
    receiver_port, mlflow_port = free_port(), free_port()
    server = uvicorn.Server(uvicorn.Config(create_receiver(SECRET, emit), host="127.0.0.1", port=receiver_port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    env = {**os.environ, "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true", "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = ManagedProcess(
        "mlflow-server",
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers",
         "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--default-artifact-root",
         str(tmp_path / "artifacts")],
        env, tmp_path / "mlflow.log", f"http://127.0.0.1:{mlflow_port}/health")
    url = f"http://127.0.0.1:{mlflow_port}"
    try:
        thread.start()
        mlflow.start().wait_healthy(180)
        client = MlflowClient(tracking_uri=url)
        client.create_webhook(name="loraflow", url=f"http://127.0.0.1:{receiver_port}{WEBHOOK_PATH}",
                              events=list(webhook.EVENTS), secret=SECRET)
        client.create_registered_model("tiny-ko")
        run = client.create_run("0").info  # the server accepts a local source only inside a run's artifacts
        version = client.create_model_version("tiny-ko", f"{run.artifact_uri}/adapter", run_id=run.run_id).version
        alias_api = f"{url}/ajax-api/2.0/mlflow/registered-models/alias"  # what the UI's "add alias" calls
        httpx.post(alias_api, json={"name": "tiny-ko", "alias": "champion", "version": str(version)},
                   timeout=30).raise_for_status()
        wait_for(lambda: len(emit.calls) == 1, 30)
        event, payload = emit.calls[0]
        assert event == "mlflow.model_version_alias.created"
        assert payload["data"] == {"name": "tiny-ko", "alias": "champion", "version": str(version)}
        print("delivered:", json.dumps(payload))
        httpx.request("DELETE", alias_api, json={"name": "tiny-ko", "alias": "champion"},
                      timeout=30).raise_for_status()
        wait_for(lambda: len(emit.calls) == 2, 30)
        assert emit.calls[1][0] == "mlflow.model_version_alias.deleted"
        assert emit.calls[1][1]["data"] == {"name": "tiny-ko", "alias": "champion"}
    finally:
        mlflow.stop()
        server.should_exit = True
        thread.join(10)


def wait_for(condition: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_the_receiver_reads_the_secret_from_the_environment_only(tmp_path: Path) -> None:
    """The receiver as `loraflow up` runs it (a uvicorn factory): refuses to start without the secret; with it,
    verifies and answers; the secret shows nowhere in its argv or output."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "loraflow.localstack.webhook:app_from_env", "--factory",
               "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV} | {"PREFECT_API_URL":
                                                                      f"http://127.0.0.1:{free_port()}/api"}
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode != 0 and SECRET_ENV in refused.stderr
    receiver = ManagedProcess("webhook", command, {**env, SECRET_ENV: SECRET},
                              tmp_path / "webhook.log", f"http://127.0.0.1:{port}/health")
    try:
        receiver.start().wait_healthy(120)
        body = json.dumps(CREATED)
        assert httpx.post(f"http://127.0.0.1:{port}{WEBHOOK_PATH}", content=body, timeout=30,
                          headers=signed_headers(body, secret="wrong")).status_code == 401
        # Accepted: the event is queued for the (here unreachable) Prefect server.
        reply = httpx.post(f"http://127.0.0.1:{port}{WEBHOOK_PATH}", content=body, timeout=30,
                           headers=signed_headers(body))
        assert reply.status_code == 200 and reply.json()["status"] == "emitted"
    finally:
        receiver.stop()
    assert SECRET not in (tmp_path / "webhook.log").read_text() and SECRET not in " ".join(command)
