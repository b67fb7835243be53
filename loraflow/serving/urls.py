"""The one place that knows where serving answers: the stack's endpoint (what clients use), from its record while
it runs, else from the job's `serving.host`/`serving.port`, else LORAFLOW_SERVING_HOST/PORT (127.0.0.1:8000)."""

from __future__ import annotations

import os

from loraflow.config.serving import ServingConfig
from loraflow.serving.records import read_endpoint

HOST_ENV, PORT_ENV = "LORAFLOW_SERVING_HOST", "LORAFLOW_SERVING_PORT"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def connect_host(host: str) -> str:
    # A server bound to every interface is reached on loopback from this machine.
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def endpoint_address(serving: ServingConfig) -> tuple[str, int]:
    """Where a new endpoint listens: the job's explicit fields, else the stack's environment, else the default."""
    host = serving.host or os.environ.get(HOST_ENV) or DEFAULT_HOST
    port = serving.port or int(os.environ.get(PORT_ENV) or DEFAULT_PORT)
    return host, port


def endpoint_url(host: str, port: int) -> str:
    return f"http://{connect_host(host)}:{port}"


def served_url(serving: ServingConfig) -> str:
    """The endpoint's URL: the running one's (every job shares it), else where the job's would listen."""
    running = read_endpoint()
    return running.url if running is not None else endpoint_url(*endpoint_address(serving))


def openai_base_url(serving: ServingConfig) -> str:
    """What an OpenAI client takes as `base_url`."""
    return f"{served_url(serving)}/v1"
