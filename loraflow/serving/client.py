"""HTTP calls of the reconciler and the canary: a base server's LoRA endpoints and completions (straight to its
vLLM), and the endpoint's table for one job."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

ADMIN_PATH = "/loraflow"  # the endpoint's own paths: health, routes, jobs


class AdapterLoadError(RuntimeError):
    """vLLM refused an adapter (bad files, rank above --max-lora-rank, ...); the message is vLLM's."""


def _client(base_url: str, api_key: str | None, timeout_s: float) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s)


@dataclass(frozen=True)
class ServerClient:
    """One base server's vLLM."""

    url: str
    api_key: str | None = None
    timeout_s: float = 120

    def served_models(self) -> dict[str, str]:
        """Name -> `root` of what vLLM serves: the base (its model path) and every loaded adapter (the directory
        it was loaded from)."""
        with _client(self.url, self.api_key, self.timeout_s) as http:
            reply = http.get("/v1/models")
            reply.raise_for_status()
            return {entry["id"]: str(entry.get("root") or "") for entry in reply.json()["data"]}

    def load_adapter(self, name: str, path: str) -> None:
        with _client(self.url, self.api_key, self.timeout_s) as http:
            reply = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        if reply.status_code != 200:
            raise AdapterLoadError(f"vLLM refused adapter {name!r} ({reply.status_code}): {reply.text[:500]}")

    def unload_adapter(self, name: str) -> None:
        with _client(self.url, self.api_key, self.timeout_s) as http:
            http.post("/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()

    def greedy_chat(self, model: str, prompt: str, max_tokens: int) -> str:
        """Greedy chat completion straight from vLLM (the canary must not depend on the endpoint's table)."""
        with _client(self.url, self.api_key, self.timeout_s) as http:
            reply = http.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0})
            reply.raise_for_status()
            return reply.json()["choices"][0]["message"]["content"]


@dataclass(frozen=True)
class EndpointClient:
    """The stack's endpoint, for one job's entry (and the in-flight counts a reconciler drains on)."""

    url: str
    api_key: str | None = None
    timeout_s: float = 30

    def routes(self) -> dict[str, Any]:
        """{"jobs": {model: {server, stable, versions}}, "inflight": {upstream name: open requests}}"""
        with _client(self.url, self.api_key, self.timeout_s) as http:
            reply = http.get(f"{ADMIN_PATH}/routes")
            reply.raise_for_status()
            return reply.json()

    def job(self, model: str) -> dict[str, Any] | None:
        return self.routes()["jobs"].get(model)

    def set_job(self, model: str, server: str, stable: str | None, versions: list[str]) -> None:
        with _client(self.url, self.api_key, self.timeout_s) as http:
            http.put(f"{ADMIN_PATH}/jobs/{model}",
                     json={"server": server, "stable": stable, "versions": sorted(versions)}).raise_for_status()

    def drop_job(self, model: str) -> None:
        with _client(self.url, self.api_key, self.timeout_s) as http:
            http.delete(f"{ADMIN_PATH}/jobs/{model}").raise_for_status()

    def wait_drained(self, name: str, timeout_s: float) -> None:
        """Until no request for the upstream name `name` is open (vLLM fails requests of an unloaded adapter), or
        `timeout_s` passed."""
        deadline = time.monotonic() + timeout_s
        while self.routes()["inflight"].get(name, 0) and time.monotonic() < deadline:
            time.sleep(0.2)
