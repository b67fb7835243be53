"""The stack's one public OpenAI endpoint: every served job, by `model` alone, in front of one vLLM per base.

A faithful pass-through of every path and method vLLM serves; only the `model` field of a request body changes,
from a job's stable name to the versioned name its champion answers with, or from a job's base name to its
server's. The table is one entry per job (serving/table.py), so a promotion of one job is one atomic swap of its
own entry and never touches another's. With an API key, every path but the health checks needs it (vLLM guards
only /v1). Its supervisor (serving/supervisor.py) restarts any base server that dies; meanwhile that server's names
get 503 + Retry-After, never a refused connection.

Run: `python -m loraflow.serving.endpoint --servers-dir DIR --port N ...` (serving/servers.py starts it).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loraflow.serving.client import ADMIN_PATH
from loraflow.serving.names import base_name
from loraflow.serving.relay import RETRY_AFTER_S, RelayResponse, error, merged_metrics, unavailable
from loraflow.serving.rewrite import bearer_token, forward_headers, rewrite_model
from loraflow.serving.supervisor import Supervisor
from loraflow.serving.table import RouteTable, parse_job

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]  # HEAD comes with GET
# OpenAI's endpoints, where `model` is required; vLLM would answer a request without it with its base, silently
# untuned. Its own paths (/tokenize, /pooling, ...) pass as they are.
MODEL_REQUIRED = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses",
                  "/v1/audio/transcriptions", "/v1/audio/translations"}


def create_app(servers_dir: Path, api_key: str | None, routes_file: Path | None,
               supervisor: Supervisor | None = None) -> Starlette:
    table = RouteTable(routes_file)

    def open_requests(server: str) -> int:
        return sum(count for name, count in table.inflight.items() if table.server_of(name) == server)

    supervisor = supervisor or Supervisor(servers_dir, api_key, open_requests)
    # No read timeout (long generations) and no connection cap: vLLM queues requests, the endpoint must not.
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10), limits=httpx.Limits(max_connections=None))
    key = api_key.encode() if api_key else None

    def refused(request: Request) -> Response | None:
        if key is None or request.method == "OPTIONS" or request.url.path in ("/health", f"{ADMIN_PATH}/health"):
            return None
        token = bearer_token(request.headers.get("authorization"))
        if token is not None and hmac.compare_digest(token.encode("latin-1"), key):
            return None
        response = error(401, "Invalid or missing API key (Authorization: Bearer <key>)", "invalid_request_error",
                         "invalid_api_key")
        response.headers["www-authenticate"] = "Bearer"
        return response

    def servers() -> dict[str, str]:
        return supervisor.urls

    def upstream_request(request: Request, server: str, body: bytes) -> httpx.Request:
        base = httpx.URL(servers()[server])
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string", b"")
        url = base.copy_with(raw_path=base.raw_path.rstrip(b"/") + raw_path + (b"?" + query if query else b""))
        valid_auth = bearer_token(request.headers.get("authorization")) is not None
        # httpx.Request, not client.build_request: no client default headers (accept-encoding, user-agent) added.
        return httpx.Request(request.method, url, content=body,
                             headers=forward_headers(request.headers.raw, keep_auth=valid_auth))

    async def forward(prepared: httpx.Request, server: str, stream: bool = True) -> httpx.Response | Response:
        if server in supervisor.restarting:
            # Until the restarted vLLM has its adapters back, a versioned name would be a 404: not a client's error.
            return unavailable(f"base server {server} restarting; retry after {RETRY_AFTER_S} s")
        try:
            return await client.send(prepared, stream=stream)
        except httpx.TransportError as exc:
            # Refused, reset or dropped mid-request: the server is down or restarting, which heals.
            return unavailable(f"base server {server} unreachable ({type(exc).__name__}); retry after "
                               f"{RETRY_AFTER_S} s")

    async def each_server(path: str) -> dict[str, httpx.Response | None]:
        async def one(url: str) -> httpx.Response | None:
            try:
                return await client.get(f"{url}{path}", timeout=5, headers=_auth(api_key))
            except httpx.HTTPError:
                return None
        ids = sorted(servers())
        return dict(zip(ids, await asyncio.gather(*(one(servers()[i]) for i in ids)), strict=True))

    async def health(_request: Request) -> Response:
        answers = {server: (reply.status_code if reply is not None else None)
                   for server, reply in (await each_server("/health")).items()}
        if all(status == 200 for status in answers.values()):
            return JSONResponse({"endpoint": "ok", "servers": answers})
        return JSONResponse({"endpoint": "ok", "servers": answers}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    async def own_health(_request: Request) -> Response:
        return JSONResponse({"endpoint": "ok"})

    async def admin_unknown(request: Request) -> Response:
        # The endpoint's own paths are never passed on to vLLM.
        return error(404, f"no such path {request.url.path} (the endpoint's own: {ADMIN_PATH}/health, "
                     f"{ADMIN_PATH}/routes, {ADMIN_PATH}/jobs/<model>)", "invalid_request_error")

    async def routes(request: Request) -> Response:
        if denied := refused(request):
            return denied
        if request.method not in ("GET", "HEAD"):
            return error(405, f"{request.method} not allowed on {ADMIN_PATH}/routes (GET)", "invalid_request_error")
        return JSONResponse({**table.snapshot(), "servers": {s: {"url": u, "restarting": s in supervisor.restarting}
                                                             for s, u in servers().items()}})

    async def job(request: Request) -> Response:
        if denied := refused(request):
            return denied
        model = request.path_params["model"]
        if request.method not in ("PUT", "DELETE"):
            return error(405, f"{request.method} not allowed on {ADMIN_PATH}/jobs/<model> (PUT, DELETE)",
                         "invalid_request_error")
        try:
            if request.method == "DELETE":
                table.drop_job(model)
                return JSONResponse(table.snapshot())
            entry = parse_job(json.loads(await request.body()))
        except (ValueError, UnicodeDecodeError) as exc:
            return error(400, f"{ADMIN_PATH}/jobs/{model}: {exc}", "invalid_request_error")
        except OSError as exc:
            return error(503, f"could not persist routes: {exc.strerror}", "server_unavailable")
        if entry.server not in supervisor.scan():
            return error(400, f"unknown base server {entry.server!r} (no record under {servers_dir})",
                         "invalid_request_error")
        try:
            table.replace_job(model, entry)
        except OSError as exc:
            return error(503, f"could not persist routes: {exc.strerror}", "server_unavailable")
        return JSONResponse(table.snapshot())

    async def models(request: Request) -> Response:
        if denied := refused(request):
            return denied
        # What answers here: each server's base and the versions in a job's entry (a version draining after a
        # switch is still loaded in vLLM but no longer routed, so not listed).
        routed = set(supervisor.urls) | {name for job in table.jobs.values() for name in job.versions}
        listing: list[dict] = []
        for reply in (await each_server("/v1/models")).values():
            try:
                listing += [e for e in reply.json()["data"] if isinstance(e, dict) and e.get("id") in routed] \
                    if reply else []
            except (ValueError, KeyError, TypeError):
                continue  # a server restarting answers nothing useful; its names come back with it
        by_id = {entry.get("id"): entry for entry in listing}
        for model, entry in table.jobs.items():
            if entry.server in by_id:
                # A job's base under its own name; `root` names the server's base it is.
                listing.append({**by_id[entry.server], "id": base_name(model), "root": entry.server})
            if entry.stable in by_id:
                # `root` names the version that answers, so clients can see what the stable name means now.
                listing.append({**by_id[entry.stable], "id": model, "root": entry.stable})
        return JSONResponse({"object": "list", "data": listing})

    async def metrics(request: Request) -> Response:
        if denied := refused(request):
            return denied
        replies = [reply for reply in (await each_server("/metrics")).values()
                   if reply is not None and reply.status_code == 200]
        # vLLM's own exposition format (Prometheus text), as it names it.
        kind = replies[0].headers.get("content-type", "text/plain") if replies else "text/plain"
        return Response(merged_metrics([reply.text for reply in replies]), headers={"content-type": kind})

    async def proxy(request: Request) -> Response:
        if denied := refused(request):
            return denied
        body, target, missing = rewrite_model(await request.body(), request.headers.get("content-type", ""),
                                              table.renames())
        if missing and request.method == "POST" and request.url.path in MODEL_REQUIRED:
            return error(400, "you must provide a model parameter ('model': a job's stable name or a versioned "
                         "one)", "invalid_request_error", "missing_required_parameter", param="model")
        known = servers()
        if target is not None:
            server = table.server_of(target) or (target if target in known else None)
            if server is None or server not in known:
                return error(404, f"The model `{target}` does not exist (GET /v1/models lists what is served)",
                             "invalid_request_error", "model_not_found", param="model")
        elif len(known) == 1 or (request.method == "GET" and known):
            server = min(known)  # a path of vLLM's own that names no model: the only server, or the first
        else:
            return error(400 if known else 503, "this endpoint fronts several base servers: name a `model`"
                         if known else "no base server runs", "invalid_request_error", param="model")
        if target is not None:
            table.inflight[target] += 1

        def done() -> None:
            if target is not None:
                table.inflight[target] -= 1

        try:
            reply = await forward(upstream_request(request, server, body), server)
        except BaseException:  # cancelled while connecting (client gone): the count must still drop
            done()
            raise
        if isinstance(reply, Response):
            done()
            return reply
        return RelayResponse(reply, done)

    async def http_error(_request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal endpoint error"
        return error(status, str(detail), "invalid_request_error" if status < 500 else "server_error")

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        supervisor.start()
        yield
        supervisor.close()
        await client.aclose()

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route(f"{ADMIN_PATH}/health", own_health, methods=["GET"]),
            Route(f"{ADMIN_PATH}/routes", routes, methods=METHODS),
            Route(f"{ADMIN_PATH}/jobs/{{model}}", job, methods=METHODS),
            Route(f"{ADMIN_PATH}/{{rest:path}}", admin_unknown, methods=METHODS),
            Route("/v1/models", models, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            # Everything else vLLM serves (/v1/..., /tokenize, /version, /invocations, ...), any method.
            Route("/{path:path}", proxy, methods=METHODS),
        ],
        exception_handlers={HTTPException: http_error, Exception: http_error},
        lifespan=lifespan,
    )


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--servers-dir", type=Path, required=True, help="where base servers are recorded")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--routes-file", type=Path, default=None)
    # The key is read from the environment variable named here, never passed on the command line.
    parser.add_argument("--api-key-env", default=None)
    args = parser.parse_args()
    key = (os.environ.get(args.api_key_env) if args.api_key_env else None) or None
    app = create_app(args.servers_dir, key, args.routes_file)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
