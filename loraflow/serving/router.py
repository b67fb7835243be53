"""The stable-name router: a faithful pass-through in front of vLLM (every path and method vLLM serves) that
rewrites only the `model` field of request bodies from a stable name to the versioned name it points at, so a
champion switch is one atomic table swap (no weights are reloaded under an old name; docs/serving.md).
With an API key, every path but /health needs it (vLLM itself guards only /v1: /invocations, /tokenize, ...).
Run: `python -m loraflow.serving.router --upstream ... --port ...`.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

ROUTES_PATH = "/loraflow/routes"
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]  # HEAD comes with GET
# Per connection, never forwarded (RFC 9110 7.6.1); host and content-length are recomputed for the next hop.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "host", "content-length"}
# The router's uvicorn adds its own; upstream's copies would be duplicates.
RESPONSE_DROP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "date", "server"}
# What h11 (httpx's HTTP/1.1 layer) accepts; anything else raises LocalProtocolError mid-request, i.e. a 500.
_FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")


def error(status: int, message: str, kind: str, code: str | int | None = None) -> JSONResponse:
    """OpenAI's error shape, so OpenAI clients surface the message instead of a parse error."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code or status}},
                        status_code=status)


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


def bearer_token(value: str | None) -> str | None:
    """The token of `Bearer <token>`, None for an absent, empty or other-scheme header (vLLM's parsing)."""
    scheme, _, token = (value or "").strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def forward_headers(raw: list[tuple[bytes, bytes]], keep_auth: bool) -> list[tuple[bytes, bytes]]:
    """Raw (byte-exact) headers minus hop-by-hop ones, those `Connection` names, and any that h11 would refuse;
    `Authorization` only when `keep_auth` (lm-eval sends `Bearer ` with no key set: forwarding it is a 500)."""
    named = {t.strip().lower() for k, v in raw if k.lower() == b"connection" for t in v.decode("latin-1").split(",")}
    drop = HOP_BY_HOP | named | (set() if keep_auth else {"authorization"})
    return [(name, value) for name, value in raw if name.decode("latin-1").lower() not in drop
            and _FIELD_NAME.fullmatch(name) and _FIELD_VALUE.fullmatch(value)]


def rewrite_model(body: bytes, content_type: str, routes: dict[str, str]) -> tuple[bytes, str | None]:
    """(body with a stable `model` replaced by its versioned name, the model name vLLM will see). Bodies that
    name no stable model are returned byte for byte."""
    if not body:
        return body, None
    parsed = Message()
    parsed["content-type"] = content_type or "application/json"
    kind = parsed.get_content_type()
    if kind == "multipart/form-data" and isinstance(boundary := parsed.get_param("boundary"), str):
        return _rewrite_multipart(body, boundary.encode("latin-1"), routes)
    if kind == "application/x-www-form-urlencoded":
        fields = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        model = next((v for k, v in fields if k == "model"), None)
        if model not in routes:
            return body, model
        return urlencode([(k, routes[v] if k == "model" else v) for k, v in fields]).encode(), routes[model]
    if kind == "application/json" or kind.endswith("+json"):
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return body, None  # vLLM answers malformed JSON with its own 400
        if not isinstance(payload, dict) or not isinstance(model := payload.get("model"), str):
            return body, None
        if model not in routes:
            return body, model
        payload["model"] = routes[model]
        return json.dumps(payload, ensure_ascii=False).encode(), routes[model]
    return body, None


def _rewrite_multipart(body: bytes, boundary: bytes, routes: dict[str, str]) -> tuple[bytes, str | None]:
    """Replace the value of the `model` form field in place; file parts stay byte for byte (audio uploads)."""
    parts = body.split(b"--" + boundary)
    for index, part in enumerate(parts[1:-1], start=1):
        head, sep, value = part.partition(b"\r\n\r\n")
        headers = message_from_bytes(head.removeprefix(b"\r\n"))
        if not sep or headers.get_param("name", header="content-disposition") != "model" \
                or headers.get_param("filename", header="content-disposition") is not None:
            continue
        model = value.removesuffix(b"\r\n").decode("utf-8", errors="replace")
        if model not in routes:
            return body, model
        parts[index] = head + sep + routes[model].encode() + b"\r\n"
        return (b"--" + boundary).join(parts), routes[model]
    return body, None


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


def create_app(upstream: str, api_key: str | None, routes_file: Path | None) -> Starlette:
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
        try:
            return await client.send(prepared, stream=stream)
        except httpx.TransportError as exc:
            return error(502, f"upstream vLLM unreachable: {type(exc).__name__}", "upstream_error")

    async def health(_request: Request) -> Response:
        try:
            upstream_status = (await client.get(base.join("/health"), timeout=5)).status_code
        except httpx.HTTPError:
            upstream_status = None
        return JSONResponse({"router": "ok", "upstream": upstream_status},
                            status_code=200 if upstream_status == 200 else 503)

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
        body, target = rewrite_model(await request.body(), request.headers.get("content-type", ""), table.routes)
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
        yield
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
    args = parser.parse_args()
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    app = create_app(args.upstream, key or None, args.routes_file)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
