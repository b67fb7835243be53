"""The endpoint as a faithful pass-through: fast tests against a fake upstream that is a real HTTP server (a
Starlette app under uvicorn, as vLLM is), recorded as a base server the way serving records it. Several servers and
jobs behind it: tests/test_endpoint_jobs.py; against real vLLMs: tests/test_endpoint_vllm.py, test_serving.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from loraflow.serving.endpoint import MODEL_REQUIRED
from loraflow.serving.rewrite import forward_headers
from tests.fixtures import free_port
from tests.fixtures.fake_vllm import (
    METRICS_TYPE,
    ROUTES_PATH,
    SERVER,
    Upstream,
    inflight,
    one_server,
    raw_request,
)

KEY = "endpoint-test-key"


def test_empty_or_malformed_authorization_is_dropped_without_key(fake: Upstream, tmp_path: Path) -> None:
    # The guarantee: nothing reaches vLLM that h11 would refuse, and `Authorization` without a token is dropped.
    # Whether the server library strips `space ` to `space` first (uvicorn 0.55 / h11 0.16 do) is not ours to pin.
    with one_server(fake.url, tmp_path) as url:
        for value in ("Bearer ", "Bearer", "", "Basic  ", "bearer\t"):
            body = json.dumps({"model": "tiny", "prompt": "x"}).encode()
            headers = {"Authorization": value, "Content-Type": "application/json", "X-Trailing": "space "}
            status, seen = raw_request(url, "POST", "/v1/completions", headers, body)
            assert status == 200, (value, seen)
            assert "authorization" not in seen["headers"]
            assert seen["headers"].get("x-trailing", "space") == "space", seen["headers"]
            assert json.loads(seen["body"])["model"] == "tiny-v3"
        # A well-formed one (the openai client's `Bearer EMPTY`) passes untouched.
        status, seen = raw_request(url, "GET", "/version", {"Authorization": "Bearer EMPTY"})
        assert status == 200 and seen["headers"]["authorization"] == "Bearer EMPTY"


def test_headers_that_h11_refuses_are_not_forwarded() -> None:
    # Byte-level, below any server's normalization: what an older or other server could hand the endpoint.
    raw = [(b"x-trailing", b"space "), (b"x-tab", b"\tlead"), (b"x-ok", b"fine"), (b"bad name", b"v"),
           (b"authorization", b"Bearer "), (b"connection", b"x-hop"), (b"x-hop", b"1"), (b"x-inner", b"a b")]
    assert forward_headers(raw, keep_auth=False) == [(b"x-ok", b"fine"), (b"x-inner", b"a b")]
    assert forward_headers([(b"authorization", b"Bearer k")], keep_auth=True) == [(b"authorization", b"Bearer k")]


def test_with_a_key_every_path_but_health_needs_it(fake: Upstream, tmp_path: Path) -> None:
    with one_server(fake.url, tmp_path, key=KEY) as url:
        for path in ("/v1/completions", "/tokenize", "/metrics", "/invocations", ROUTES_PATH, "/v1/models"):
            for value in (None, "Bearer ", "Bearer", f"Basic {KEY}", "Bearer wrong", f"Bearer {KEY}x"):
                headers = {"Authorization": value} if value is not None else {}
                status, reply = raw_request(url, "POST" if path != "/v1/models" else "GET", path, headers, b"{}")
                assert status == 401, (path, value)
                assert reply["error"]["code"] == "invalid_api_key" and reply["error"]["message"]
        assert fake.seen == []  # nothing reached vLLM
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        ok = httpx.post(f"{url}/tokenize", json={"model": "tiny"}, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.json()["headers"]["authorization"] == f"Bearer {KEY}"


def test_every_vllm_path_and_method_reaches_upstream(fake: Upstream, tmp_path: Path) -> None:
    with one_server(fake.url, tmp_path) as url, httpx.Client(base_url=url, timeout=10) as client:
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"] == METRICS_TYPE
        assert metrics.text == f'# TYPE vllm:x counter\nvllm:x{{model_name="{SERVER}"}} 1\n'
        for method, path in [("GET", "/version"), ("POST", "/detokenize"), ("GET", "/ping"), ("POST", "/ping"),
                             ("POST", "/invocations"), ("POST", "/pooling"), ("POST", "/score"),
                             ("GET", "/v1/anything/deeper"), ("DELETE", "/v1/x"), ("PUT", "/v2/y"), ("PATCH", "/z")]:
            reply = client.request(method, path)
            assert reply.status_code == 200 and reply.json()["method"] == method, (method, path)
            assert reply.json()["raw_path"] == path and reply.headers["x-upstream"] == "echo"
        # Query strings byte for byte (repeated keys, escapes), escaped paths undecoded, status codes as they are.
        reply = client.get("/v1/a%2Fb?x=1&x=2&y=%20z&status=418")
        assert reply.status_code == 418
        assert (reply.json()["raw_path"], reply.json()["query"]) == ("/v1/a%2Fb", "x=1&x=2&y=%20z&status=418")
        assert client.get("/nope?status=404").status_code == 404
        data = {entry["id"]: entry["root"] for entry in client.get("/v1/models").json()["data"]}
        # The endpoint's own listing: the job's stable name (`root` = its version) and base name (`root` = server).
        assert data == {SERVER: "/m", "tiny-v3": "/adapters/tiny-v3", "tiny": "tiny-v3", "tiny-base": SERVER}


def test_model_is_rewritten_for_stable_names_only(fake: Upstream, tmp_path: Path) -> None:
    with one_server(fake.url, tmp_path) as url, httpx.Client(base_url=url, timeout=10) as client:
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "헌법"}], "temperature": 0.7}
        for path, body in [("/v1/completions", {"model": "tiny", "prompt": [1, 2]}),
                           ("/v1/chat/completions", chat), ("/tokenize", {"model": "tiny", "prompt": "안녕"})]:
            seen = json.loads(client.post(path, json=body).json()["body"].encode("latin-1"))
            assert seen == {**body, "model": "tiny-v3"}, path
        # Names that are not stable go byte for byte (no re-serialisation), as do bodies vLLM must judge.
        for raw in (b'{"model":"tiny-v3","prompt":"\\uc548"}', b"not json", b"[1]", b'{"model": 7}'):
            seen = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert seen.json()["body"].encode("latin-1") == raw
        form = client.post("/v1/audio/transcriptions", data={"model": "tiny", "language": "ko"},
                           files={"file": ("a.wav", b"RIFF\x00\xff--", "audio/wav")})
        body = form.json()["body"].encode("latin-1")
        assert b'name="model"\r\n\r\ntiny-v3\r\n' in body and b"RIFF\x00\xff--" in body
        urlencoded = client.post("/v1/audio/translations", data={"model": "tiny", "temperature": "0"})
        assert urlencoded.json()["body"] == "model=tiny-v3&temperature=0"


def test_streaming_passes_through_and_inflight_is_counted(fake: Upstream, tmp_path: Path) -> None:
    with one_server(fake.url, tmp_path) as url, httpx.Client(base_url=url, timeout=10) as client:
        with client.stream("POST", "/stream", json={"model": "tiny", "stream": True}) as reply:
            assert reply.status_code == 201 and reply.headers["content-type"].startswith("text/event-stream")
            chunks = reply.iter_raw()
            # The first event arrives while upstream still holds the stream: nothing is buffered.
            assert next(chunks) == b'data: {"n": 1}\n\n'
            assert inflight(url) == {"tiny-v3": 1}
            fake.release.set()
            assert b"".join(chunks) == b"data: [DONE]\n\n"
        assert inflight(url) == {}

        # A client that goes away mid-stream still releases its count (the reconciler drains on it).
        fake.release.clear()
        with client.stream("POST", "/stream", json={"model": "tiny-v3"}) as reply:
            chunks = reply.iter_raw()  # kept: a dropped iterator closes the connection at once
            next(chunks)
            assert inflight(url) == {"tiny-v3": 1}
        deadline = time.monotonic() + 10
        while inflight(url) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert inflight(url) == {}


def test_upstream_down_is_503_with_retry_after(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    with one_server(down, tmp_path) as url, httpx.Client(base_url=url, timeout=30) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["servers"] == {SERVER: None}
        assert health.headers["retry-after"]
        for method, path in [("POST", "/v1/completions"), ("GET", "/version")]:
            reply = client.request(method, path, json={"model": "tiny"} if method == "POST" else None)
            assert reply.status_code == 503 and int(reply.headers["retry-after"]) > 0, path
            assert "unreachable" in reply.json()["error"]["message"] and reply.json()["error"]["type"], path
        # The listing still names what the endpoint knows; a server that does not answer adds nothing to it.
        assert client.get("/v1/models").json()["data"] == []
        assert inflight(url) == {}


def test_a_request_without_model_is_400_naming_the_field(fake: Upstream, tmp_path: Path) -> None:
    # vLLM would answer it with its first model, the base: a client bug silently served untuned.
    with one_server(fake.url, tmp_path) as url, httpx.Client(base_url=url, timeout=10) as client:
        for path in sorted(MODEL_REQUIRED):
            for body in ({"prompt": "x"}, {"model": None, "messages": []}, {"model": ""}):
                reply = client.post(path, json=body)
                assert reply.status_code == 400, (path, body)
                assert reply.json()["error"]["param"] == "model" and "model" in reply.json()["error"]["message"]
                assert reply.json()["error"]["type"] == "invalid_request_error"
        form = client.post("/v1/audio/transcriptions", data={"language": "ko"}, files={"file": ("a.wav", b"RIFF")})
        assert form.status_code == 400 and form.json()["error"]["param"] == "model"
        assert fake.seen == []
        # vLLM's own paths take no model (the base answers): they pass as they are, as do bad bodies (vLLM's 400).
        for path, raw in (("/tokenize", b'{"prompt": "x"}'), ("/pooling", b'{"input": "x"}'),
                          ("/v1/completions", b"{bad json")):
            reply = client.post(path, content=raw, headers={"content-type": "application/json"})
            assert reply.status_code == 200 and reply.json()["body"].encode() == raw, path
