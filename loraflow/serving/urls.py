"""The one place that knows the served URLs of a job: vLLM (internal) and the router (what clients use)."""

from __future__ import annotations

from loraflow.config.serving import ServingConfig

VLLM_HOST = "127.0.0.1"  # vLLM is reached only through the router and by the reconciler


def _connect_host(host: str) -> str:
    # A server bound to every interface is reached on loopback from this machine.
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def vllm_url(serving: ServingConfig) -> str:
    return f"http://{VLLM_HOST}:{serving.vllm_port}"


def router_url(serving: ServingConfig) -> str:
    return f"http://{_connect_host(serving.host)}:{serving.port}"


def openai_base_url(serving: ServingConfig) -> str:
    """What an OpenAI client takes as `base_url`."""
    return f"{router_url(serving)}/v1"
