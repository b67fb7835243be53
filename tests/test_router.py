"""The router as a faithful pass-through: fast tests against a fake upstream that is a real HTTP server (a
Starlette app under uvicorn, as vLLM is), and one slow test against a real vLLM stack, with lm-eval going
through the router on the stable name."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from loraflow.config import load_config
from loraflow.serving.client import ServingClient
from loraflow.serving.router import METHODS, ROUTES_PATH, create_app, forward_headers
from loraflow.serving.servers import start_stack
from loraflow.tiny.base import tiny_ko_dir
from loraflow.tiny.kobest import tiny_kobest_dir
from tests.fixtures import ATTENTION, free_port, make_adapter

KEY = "router-test-key"
ROUTES = {"tiny": "tiny-v3"}
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """`app` under a real uvicorn (httptools, as in production) on a free port, in a thread."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class Upstream:
    """What the router relies on from vLLM: paths, methods, bodies, headers, query strings, SSE, status codes.
    Records every request it gets; `release` lets a held stream finish."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.url = ""
        self.app = Starlette(routes=[
            Route("/metrics", lambda _r: PlainTextResponse("# TYPE vllm:x counter\nvllm:x 1\n",
                                                           headers={"content-type": METRICS_TYPE})),
            Route("/v1/models", self.models),
            Route("/stream", self.stream, methods=["POST"]),
            Route("/{path:path}", self.echo, methods=METHODS),
        ])

    async def record(self, request: Request) -> dict[str, Any]:
        seen = {"method": request.method, "raw_path": request.scope["raw_path"].decode(),
                "query": request.scope["query_string"].decode(),
                "headers": {k.decode(): v.decode() for k, v in request.headers.raw},
                "body": (await request.body()).decode("latin-1")}
        self.seen.append(seen)
        return seen

    async def echo(self, request: Request) -> Response:
        seen = await self.record(request)
        return JSONResponse(seen, status_code=int(request.query_params.get("status", 200)),
                            headers={"x-upstream": "echo"})

    async def models(self, request: Request) -> Response:
        await self.record(request)
        return JSONResponse({"object": "list", "data": [{"id": "base", "root": "/m"}, {"id": "tiny-v3", "root": "/a"}]})

    async def stream(self, request: Request) -> Response:
        await self.record(request)

        async def events() -> AsyncIterator[bytes]:
            yield b'data: {"n": 1}\n\n'
            while not self.release.is_set():
                await asyncio.sleep(0.01)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", status_code=201)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    started = Upstream()
    with serve(started.app) as started.url:
        yield started
        started.release.set()


@pytest.fixture
def fake(upstream: Upstream) -> Upstream:
    upstream.seen.clear()
    upstream.release.clear()
    return upstream


@contextmanager
def router(upstream_url: str, tmp_path: Path, key: str | None = None) -> Iterator[str]:
    routes_file = tmp_path / "routes.json"
    routes_file.write_text(json.dumps(ROUTES))
    with serve(create_app(upstream_url, key, routes_file)) as url:
        yield url


def raw_request(url: str, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, Any]:
    """http.client sends what httpx refuses to (`Authorization: Bearer `, trailing spaces), as lm-eval does."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    conn.request(method, path, body=body, headers=headers)
    with conn.getresponse() as reply, contextlib.closing(conn):
        return reply.status, json.loads(reply.read())


def inflight(url: str) -> dict[str, int]:
    return httpx.get(f"{url}{ROUTES_PATH}", timeout=10).json()["inflight"]


def test_empty_or_malformed_authorization_is_dropped_without_key(fake: Upstream, tmp_path: Path) -> None:
    # The guarantee: nothing reaches vLLM that h11 would refuse, and `Authorization` without a token is dropped.
    # Whether the server library strips `space ` to `space` first (uvicorn 0.55 / h11 0.16 do) is not ours to pin.
    with router(fake.url, tmp_path) as url:
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
    # Byte-level, below any server's normalization: what an older or other server could hand the router.
    raw = [(b"x-trailing", b"space "), (b"x-tab", b"\tlead"), (b"x-ok", b"fine"), (b"bad name", b"v"),
           (b"authorization", b"Bearer "), (b"connection", b"x-hop"), (b"x-hop", b"1"), (b"x-inner", b"a b")]
    assert forward_headers(raw, keep_auth=False) == [(b"x-ok", b"fine"), (b"x-inner", b"a b")]
    assert forward_headers([(b"authorization", b"Bearer k")], keep_auth=True) == [(b"authorization", b"Bearer k")]


def test_with_a_key_every_path_but_health_needs_it(fake: Upstream, tmp_path: Path) -> None:
    with router(fake.url, tmp_path, key=KEY) as url:
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
    with router(fake.url, tmp_path) as url, httpx.Client(base_url=url, timeout=10) as client:
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"] == METRICS_TYPE
        assert metrics.text == "# TYPE vllm:x counter\nvllm:x 1\n"
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
        data = client.get("/v1/models").json()["data"]  # the router's own: stable names added, `root` = version
        assert {"id": "tiny", "root": "tiny-v3"} in data and {"id": "base", "root": "/m"} in data


def test_model_is_rewritten_for_stable_names_only(fake: Upstream, tmp_path: Path) -> None:
    with router(fake.url, tmp_path) as url, httpx.Client(base_url=url, timeout=10) as client:
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "헌법"}], "temperature": 0.7}
        for path, body in [("/v1/completions", {"model": "tiny", "prompt": [1, 2]}),
                           ("/v1/chat/completions", chat), ("/tokenize", {"model": "tiny", "prompt": "안녕"})]:
            seen = json.loads(client.post(path, json=body).json()["body"].encode("latin-1"))
            assert seen == {**body, "model": "tiny-v3"}, path
        # Names that are not stable go byte for byte (no re-serialisation), as do bodies without a model.
        for raw in (b'{"model":"tiny-v3","prompt":"\\uc548"}', b'{"prompt": 1}', b"not json", b"[1]"):
            seen = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
            assert seen.json()["body"].encode("latin-1") == raw
        form = client.post("/v1/audio/transcriptions", data={"model": "tiny", "language": "ko"},
                           files={"file": ("a.wav", b"RIFF\x00\xff--", "audio/wav")})
        body = form.json()["body"].encode("latin-1")
        assert b'name="model"\r\n\r\ntiny-v3\r\n' in body and b"RIFF\x00\xff--" in body
        urlencoded = client.post("/v1/audio/translations", data={"model": "tiny", "temperature": "0"})
        assert urlencoded.json()["body"] == "model=tiny-v3&temperature=0"


def test_streaming_passes_through_and_inflight_is_counted(fake: Upstream, tmp_path: Path) -> None:
    with router(fake.url, tmp_path) as url, httpx.Client(base_url=url, timeout=10) as client:
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


def test_bad_routes_bodies_are_400_json(fake: Upstream, tmp_path: Path) -> None:
    with router(fake.url, tmp_path) as url, httpx.Client(base_url=url, timeout=10) as client:
        for raw in (b"", b"{", b"[]", b'"x"', b"{}", b'{"routes": []}', b'{"routes": {"a": 1}}',
                    b'{"routes": {"a": ""}}', b'{"routes": null}', b"\xff"):
            reply = client.put(ROUTES_PATH, content=raw)
            assert reply.status_code == 400 and reply.json()["error"]["message"], raw
        assert client.post(ROUTES_PATH, json={}).status_code == 405
        assert client.put(ROUTES_PATH, json={"routes": {"tiny": "tiny-v4"}}).json()["routes"] == {"tiny": "tiny-v4"}
        assert json.loads((tmp_path / "routes.json").read_text()) == {"tiny": "tiny-v4"}
        assert fake.seen == []


def test_upstream_down_is_502_or_503_json(tmp_path: Path) -> None:
    with router(f"http://127.0.0.1:{free_port()}", tmp_path) as url, httpx.Client(base_url=url, timeout=30) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["upstream"] is None
        for method, path in [("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/metrics")]:
            reply = client.request(method, path, json={"model": "tiny"} if method == "POST" else None)
            assert reply.status_code == 502 and "unreachable" in reply.json()["error"]["message"], path
        assert inflight(url) == {}


@pytest.mark.slow
def test_real_vllm_answers_the_same_through_the_router(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's own endpoints and an lm-eval run (local-completions sends `Authorization: Bearer ` when no key is
    set) give the same answers through the router on the stable name as straight from vLLM on the version."""
    import lm_eval  # only here: importing it costs seconds, the fast tests need none of it
    from lm_eval.tasks import TaskManager

    model, key_env = "tiny-ko-routed", "LORAFLOW_TEST_ROUTER_KEY"
    monkeypatch.delenv(key_env, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # so lm-eval sends the empty `Bearer `
    base_dir = tiny_ko_dir()
    adapter = make_adapter(base_dir, tmp_path / "adapter", r=8, targets=ATTENTION, seed=1)
    job = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny-ko.yaml", {
        "registry.model_name": model, "serving.enabled": True, "serving.port": free_port(),
        "serving.vllm_port": free_port(), "serving.api_key_env": key_env, "serving.max_model_len": 512})
    stack = start_stack(job, [adapter])
    try:
        vllm, routed, versioned = stack.endpoint.vllm_url, stack.endpoint.router_url, f"{model}-v1"
        serving = ServingClient(vllm, routed)
        serving.load_adapter(versioned, str(adapter))
        serving.set_routes({model: versioned})
        with httpx.Client(timeout=120) as http:
            assert http.get(f"{routed}/version").json() == http.get(f"{vllm}/version").json()
            prompt = {"prompt": "대한민국 헌법 제1조는 무엇입니까?"}
            direct = http.post(f"{vllm}/tokenize", json={"model": versioned, **prompt}).json()
            assert http.post(f"{routed}/tokenize", json={"model": model, **prompt}).json() == direct
            detok = {"tokens": direct["tokens"]}
            assert (http.post(f"{routed}/detokenize", json={"model": model, **detok}).json()
                    == http.post(f"{vllm}/detokenize", json={"model": versioned, **detok}).json())
            # Values move between two scrapes; the exposition (metric names, types, content type) must not.
            metrics = [http.get(f"{url}/metrics") for url in (routed, vllm)]
            assert {m.status_code for m in metrics} == {200} and len({m.headers["content-type"] for m in metrics}) == 1
            names = [{line for line in m.text.splitlines() if line.startswith("# TYPE")} for m in metrics]
            assert names[0] == names[1] and any("vllm:" in line for line in names[0])

        def copa_acc(base_url: str, name: str) -> float:
            args = {"model": name, "base_url": f"{base_url}/v1/completions", "tokenizer": str(base_dir),
                    "tokenizer_backend": "huggingface", "tokenized_requests": True}
            tasks = TaskManager(include_path=str(tiny_kobest_dir()), include_defaults=False)
            results = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                              tasks=["tiny_kobest_copa"], task_manager=tasks, limit=20)
            return results["results"]["tiny_kobest_copa"]["acc,none"]

        through_router, direct_acc = copa_acc(routed, model), copa_acc(vllm, versioned)
        print(f"tiny_kobest_copa acc: router {through_router}, vLLM {direct_acc}")
        assert through_router == direct_acc
        assert serving.routes()["inflight"] == {}
    finally:
        stack.stop()
