"""The stable-name router: an OpenAI-compatible pass-through in front of vLLM that rewrites `model: <stable>`
to the versioned name it points at, so a champion switch is one atomic table swap (no weights are reloaded
under an old name; docs/serving.md).
Run: `python -m loraflow.serving.router --upstream ... --port ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
}
ROUTES_PATH = "/loraflow/routes"


class RouteTable:
    """stable name -> versioned name, persisted so a restarted router serves at once; plus in-flight counts
    per upstream name so the reconciler unloads an old version only after its requests have drained."""

    def __init__(self, file: Path | None):
        self.file = file
        self.routes: dict[str, str] = json.loads(file.read_text()) if file and file.is_file() else {}
        self.inflight: Counter[str] = Counter()

    def replace(self, routes: dict[str, str]) -> None:
        if self.file is not None:
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps(routes, indent=2))
            os.replace(tmp, self.file)
        self.routes = dict(routes)

    def snapshot(self) -> dict[str, Any]:
        return {"routes": self.routes, "inflight": {k: v for k, v in self.inflight.items() if v}}


def create_app(upstream: str, api_key: str | None, routes_file: Path | None) -> Starlette:
    table = RouteTable(routes_file)
    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(None, connect=10))

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        return hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {api_key}")

    def unauthorized() -> JSONResponse:
        return JSONResponse({"error": "Unauthorized"}, status_code=401)

    def forward_headers(request: Request) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}

    async def health(_request: Request) -> Response:
        try:
            upstream_status = (await client.get("/health", timeout=5)).status_code
        except httpx.HTTPError:
            upstream_status = 503
        return Response(status_code=200 if upstream_status == 200 else 503)

    async def routes(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        if request.method == "PUT":
            body = await request.json()
            new_routes = body.get("routes")
            if not isinstance(new_routes, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in new_routes.items()
            ):
                return JSONResponse({"error": 'body must be {"routes": {stable: versioned}}'}, status_code=400)
            table.replace(new_routes)
        return JSONResponse(table.snapshot())

    async def models(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        reply = await client.get("/v1/models", headers=forward_headers(request))
        if reply.status_code != 200:
            return Response(reply.content, status_code=reply.status_code, media_type="application/json")
        listing = reply.json()
        by_id = {entry["id"]: entry for entry in listing["data"]}
        for stable, target in table.routes.items():
            if target in by_id:
                # `root` names the version that answers, so clients can see what the stable name means now.
                listing["data"].append({**by_id[target], "id": stable, "root": target})
        return JSONResponse(listing)

    async def proxy(request: Request) -> Response:
        if not authorized(request):
            return unauthorized()
        body = await request.body()
        target = None
        if request.method == "POST" and body:
            try:
                payload = json.loads(body)
            except json.JSONDecodeError:
                payload = None
            if isinstance(payload, dict) and isinstance(payload.get("model"), str):
                target = table.routes.get(payload["model"], payload["model"])
                payload["model"] = target
                body = json.dumps(payload).encode()
        upstream_request = client.build_request(
            request.method,
            request.url.path,
            params=request.query_params,
            headers=forward_headers(request),
            content=body,
        )
        if target is not None:
            table.inflight[target] += 1
        try:
            reply = await client.send(upstream_request, stream=True)
        except BaseException:
            if target is not None:
                table.inflight[target] -= 1
            raise

        async def finish() -> None:
            await reply.aclose()
            if target is not None:
                table.inflight[target] -= 1

        headers = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(
            _relay(reply), status_code=reply.status_code, headers=headers, background=BackgroundTask(finish)
        )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route(ROUTES_PATH, routes, methods=["GET", "PUT"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/{path:path}", proxy, methods=["GET", "POST", "DELETE"]),
        ],
        lifespan=lifespan,
    )


async def _relay(reply: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in reply.aiter_raw():
            yield chunk
    except asyncio.CancelledError:
        await reply.aclose()
        raise


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
