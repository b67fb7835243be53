"""HTTP calls of the reconciler and the canary: vLLM's LoRA endpoints, the router's table, completions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from loraflow.serving.router import ROUTES_PATH


class AdapterLoadError(RuntimeError):
    """vLLM refused an adapter (bad files, rank above --max-lora-rank, ...); the message is vLLM's."""


@dataclass(frozen=True)
class ServingClient:
    vllm_url: str
    router_url: str
    api_key: str | None = None
    timeout_s: float = 120

    def _client(self, base_url: str) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=base_url, headers=headers, timeout=self.timeout_s)

    def served_models(self) -> dict[str, str]:
        """Name -> `root` of what vLLM serves: the base (its model path) and every loaded adapter (the directory
        it was loaded from); not the router's stable names."""
        with self._client(self.vllm_url) as http:
            reply = http.get("/v1/models")
            reply.raise_for_status()
            return {entry["id"]: str(entry.get("root") or "") for entry in reply.json()["data"]}

    def load_adapter(self, name: str, path: str) -> None:
        with self._client(self.vllm_url) as http:
            reply = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        if reply.status_code != 200:
            raise AdapterLoadError(f"vLLM refused adapter {name!r} ({reply.status_code}): {reply.text[:500]}")

    def unload_adapter(self, name: str) -> None:
        with self._client(self.vllm_url) as http:
            reply = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
            reply.raise_for_status()

    def routes(self) -> dict[str, Any]:
        """{"routes": {stable: versioned}, "inflight": {versioned: open requests}}"""
        with self._client(self.router_url) as http:
            reply = http.get(ROUTES_PATH)
            reply.raise_for_status()
            return reply.json()

    def set_routes(self, routes: dict[str, str]) -> None:
        with self._client(self.router_url) as http:
            http.put(ROUTES_PATH, json={"routes": routes}).raise_for_status()

    def greedy_chat(self, model: str, prompt: str, max_tokens: int) -> str:
        """Greedy chat completion straight from vLLM (the canary must not depend on the router's table)."""
        with self._client(self.vllm_url) as http:
            reply = http.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                },
            )
            reply.raise_for_status()
            return reply.json()["choices"][0]["message"]["content"]
