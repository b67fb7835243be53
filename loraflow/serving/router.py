"""The stable-name router: a faithful pass-through in front of vLLM (every path and method vLLM serves) that
rewrites only the `model` field of request bodies from a stable name to the versioned name it points at, so a
champion switch is one atomic table swap (no weights are reloaded under an old name; docs/serving.md).
With an API key, every path but /health needs it (vLLM itself guards only /v1: /invocations, /tokenize, ...).
With `--supervise STACK_FILE` it also restarts the recorded vLLM when it dies (serving/supervisor.py); meanwhile
every request gets 503 + Retry-After, never a refused connection.
Run: `python -m loraflow.serving.router --upstream ... --port ...`.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from loraflow.serving.rewrite import HOP_BY_HOP, bearer_token, forward_headers, rewrite_model
from loraflow.serving.supervisor import Supervisor

ROUTES_PATH = "/loraflow/routes"
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]  # HEAD comes with GET
# The router's uvicorn adds its own; upstream's copies would be duplicates.
RESPONSE_DROP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "date", "server"}
# OpenAI's endpoints, where `model` is required; vLLM would answer a request without it with its first model (the
# base), silently untuned. Its own paths (/tokenize, /pooling, ...) pass as they are.
MODEL_REQUIRED = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses",
                  "/v1/audio/transcriptions", "/v1/audio/translations"}
RETRY_AFTER_S = 5  # vLLM restarts in tens of seconds: a client polling every few seconds gets it soon after


def error(status: int, message: str, kind: str, code: str | int | None = None, param: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape, so OpenAI clients surface the message instead of a parse error."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code or status}},
                        status_code=status, headers=headers)


def unavailable(message: str) -> JSONResponse:
    """vLLM down or restarting: 503 with Retry-After, which clients and load balancers retry (a 502 they do not)."""
    return error(503, message, "server_unavailable", "upstream_unavailable",
                 headers={"Retry-After": str(RETRY_AFTER_S)})


class RouteTable:
    """stable name -> versioned name, persisted so a restarted router serves at once; plus in-flight counts
    per upstream name so the reconciler unloads an old version only after its requests have drained."""

    def __init__(self, file: Path | None):
        self.file = file
        self.routes: dict[str, str] = parse_routes(json.loads(file.read_text())) if file and file.is_file() else {}
        self.inflight: Counter[str] = Counter()

    def replace(self, routes: dict[str, str]) -> None:
        if self.file is not None:
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps(routes, indent=2))
            os.replace(tmp, self.file)
        self.routes = dict(routes)

    def snapshot(self) -> dict[str, Any]:
        return {"routes": self.routes, "inflight": {k: v for k, v in self.inflight.items() if v}}


def parse_routes(routes: object) -> dict[str, str]:
    if not isinstance(routes, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                               for k, v in routes.items()):
        raise ValueError('routes must be {"stable name": "versioned name"} with non-empty strings')
    return dict(routes)


class RelayResponse(StreamingResponse):
    """Upstream's status, headers and raw bytes as they arrive (SSE included); `on_close` runs however the
    response ends (completed, client gone, upstream failed), so in-flight counts never leak."""

    def __init__(self, reply: httpx.Response, on_close: Callable[[], None]):
        super().__init__(reply.aiter_raw(), status_code=reply.status_code)
        self.raw_headers = [(k, v) for k, v in reply.headers.raw if k.decode("latin-1").lower() not in RESPONSE_DROP]
        self.reply, self.on_close = reply, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.reply.aclose()
            self.on_close()


def create_app(upstream: str, api_key: str | None, routes_file: Path | None,
               supervisor: Supervisor | None = None) -> Starlette:
    table = RouteTable(routes_file)
    # No read timeout (long generations) and no connection cap: vLLM queues requests, the router must not.
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10), limits=httpx.Limits(max_connections=None))
    base = httpx.URL(upstream)
    key = api_key.encode() if api_key else None

    def refused(request: Request) -> Response | None:
        """vLLM guards only /v1 (its docs warn /invocations etc. stay open); the router is the public port, so
        with a key every path but /health and CORS preflights needs it."""
        if key is None or request.method == "OPTIONS" or request.url.path == "/health":
            return None
        token = bearer_token(request.headers.get("authorization"))
        if token is not None and hmac.compare_digest(token.encode("latin-1"), key):
            return None
        response = error(401, "Invalid or missing API key (Authorization: Bearer <key>)", "invalid_request_error",
                         "invalid_api_key")
        response.headers["www-authenticate"] = "Bearer"
        return response

    def upstream_request(request: Request, body: bytes) -> httpx.Request:
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string", b"")
        url = base.copy_with(raw_path=base.raw_path.rstrip(b"/") + raw_path + (b"?" + query if query else b""))
        valid_auth = bearer_token(request.headers.get("authorization")) is not None
        # httpx.Request, not client.build_request: no client default headers (accept-encoding, user-agent) added.
        return httpx.Request(request.method, url, content=body,
                             headers=forward_headers(request.headers.raw, keep_auth=valid_auth))

    async def forward(prepared: httpx.Request, stream: bool = True) -> httpx.Response | Response:
        if supervisor is not None and supervisor.restarting:
            # Until the restarted vLLM has its adapters back, a versioned name would be a 404: not a client's error.
            return unavailable(f"upstream vLLM restarting; retry after {RETRY_AFTER_S} s")
        try:
            return await client.send(prepared, stream=stream)
        except httpx.TransportError as exc:
            # Refused, reset or dropped mid-request: vLLM is down or restarting, which heals; say when to retry.
            state = "restarting" if supervisor is not None and supervisor.restarting else "unreachable"
            return unavailable(f"upstream vLLM {state} ({type(exc).__name__}); retry after {RETRY_AFTER_S} s")

    async def health(_request: Request) -> Response:
        try:
            upstream_status = (await client.get(base.join("/health"), timeout=5)).status_code
        except httpx.HTTPError:
            upstream_status = None
        if upstream_status == 200:
            return JSONResponse({"router": "ok", "upstream": upstream_status})
        return JSONResponse({"router": "ok", "upstream": upstream_status}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    async def routes(request: Request) -> Response:
        if denied := refused(request):
            return denied
        if request.method == "PUT":
            try:
                new_routes = parse_routes(json.loads(await request.body()).get("routes"))
            except (ValueError, UnicodeDecodeError, AttributeError) as exc:
                return error(400, f'body must be {{"routes": {{stable: versioned}}}}: {exc}', "invalid_request_error")
            try:
                table.replace(new_routes)
            except OSError as exc:
                return error(503, f"could not persist routes: {exc.strerror}", "server_unavailable")
        elif request.method not in ("GET", "HEAD"):
            return error(405, f"{request.method} not allowed on {ROUTES_PATH} (GET, PUT)", "invalid_request_error")
        return JSONResponse(table.snapshot())

    async def models(request: Request) -> Response:
        if denied := refused(request):
            return denied
        reply = await forward(upstream_request(request, b""), stream=False)
        if isinstance(reply, Response):
            return reply
        try:
            listing = reply.json() if reply.status_code == 200 else None
        except ValueError:
            listing = None
        if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
            # httpx decoded the body: content-encoding/length no longer describe it.
            drop = RESPONSE_DROP | HOP_BY_HOP | {"content-encoding"}
            headers = {k: v for k, v in reply.headers.items() if k.lower() not in drop}
            return Response(reply.content, status_code=reply.status_code, headers=headers)
        by_id = {entry.get("id"): entry for entry in listing["data"] if isinstance(entry, dict)}
        for stable, target in table.routes.items():
            if target in by_id:
                # `root` names the version that answers, so clients can see what the stable name means now.
                listing["data"].append({**by_id[target], "id": stable, "root": target})
        return JSONResponse(listing)

    async def proxy(request: Request) -> Response:
        if denied := refused(request):
            return denied
        body, target, missing = rewrite_model(await request.body(), request.headers.get("content-type", ""),
                                              table.routes)
        if missing and request.method == "POST" and request.url.path in MODEL_REQUIRED:
            return error(400, "you must provide a model parameter ('model': the stable name or a versioned one)",
                         "invalid_request_error", "missing_required_parameter", param="model")
        if target is not None:
            table.inflight[target] += 1

        def done() -> None:
            if target is not None:
                table.inflight[target] -= 1

        try:
            reply = await forward(upstream_request(request, body))
        except BaseException:  # cancelled while connecting (client gone): the count must still drop
            done()
            raise
        if isinstance(reply, Response):
            done()
            return reply
        return RelayResponse(reply, done)

    async def http_error(_request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal router error"
        return error(status, str(detail), "invalid_request_error" if status < 500 else "server_error")

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if supervisor is not None:
            supervisor.start()
        yield
        if supervisor is not None:
            supervisor.close()
        await client.aclose()

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route(ROUTES_PATH, routes, methods=METHODS),
            Route("/v1/models", models, methods=["GET"]),
            # Everything else vLLM serves (/v1/..., /tokenize, /metrics, /version, /invocations, ...), any method.
            Route("/{path:path}", proxy, methods=METHODS),
        ],
        exception_handlers={HTTPException: http_error, Exception: http_error},
        lifespan=lifespan,
    )


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True, help="vLLM base URL, e.g. http://127.0.0.1:8001")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--routes-file", type=Path, default=None)
    # The key is read from the environment variable named here, never passed on the command line.
    parser.add_argument("--api-key-env", default=None)
    parser.add_argument("--supervise", type=Path, default=None, help="the stack.json whose vLLM to keep running")
    args = parser.parse_args()
    key = (os.environ.get(args.api_key_env) if args.api_key_env else None) or None
    supervisor = Supervisor(args.supervise, args.upstream, key) if args.supervise else None
    app = create_app(args.upstream, key, args.routes_file, supervisor)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
