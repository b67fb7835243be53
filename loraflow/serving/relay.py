"""What the endpoint answers with: OpenAI-shaped errors, 503 + Retry-After while a server restarts, and upstream
responses relayed byte for byte (SSE included)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

# The endpoint's uvicorn adds its own; upstream's copies would be duplicates.
RESPONSE_DROP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "date", "server"}
RETRY_AFTER_S = 5  # vLLM restarts in tens of seconds: a client polling every few seconds gets it soon after


def error(status: int, message: str, kind: str, code: str | int | None = None, param: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape, so OpenAI clients surface the message instead of a parse error."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code or status}},
                        status_code=status, headers=headers)


def unavailable(message: str) -> JSONResponse:
    """A server down or restarting: 503 with Retry-After, which clients and load balancers retry (a 502 they do
    not)."""
    return error(503, message, "server_unavailable", "upstream_unavailable",
                 headers={"Retry-After": str(RETRY_AFTER_S)})


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


def merged_metrics(texts: list[str]) -> str:
    """Several vLLMs' Prometheus text as one scrape: their series differ by the `model_name` label; each metric's
    `# HELP`/`# TYPE` lines are kept once."""
    seen: set[str] = set()
    lines = []
    for text in texts:
        for line in text.splitlines():
            if line.startswith("#"):
                if line in seen:
                    continue
                seen.add(line)
            lines.append(line)
    return "\n".join(lines) + "\n"
