"""ask: the served model through the `openai` client (the end of `loraflow demo`). Lists /v1/models, then asks the
stable name (the champion) and the versioned name it resolves to."""

from __future__ import annotations

from openai import OpenAI

from loraflow.config.job import JobConfig
from loraflow.errors import LoraflowError
from loraflow.serving.urls import openai_base_url
from loraflow.serving.vllm_server import api_key

DEFAULT_PROMPT = "대한민국 헌법 제1조는 무엇입니까?"


class NotServed(LoraflowError):
    """The stable name is not served (no champion passed its canary yet)."""


def ask(job: JobConfig, prompt: str = DEFAULT_PROMPT, max_tokens: int = 64) -> list[str]:
    """Lines to print: the served names, then each answer as `[asked -> answered by] prompt` + reply."""
    stable = job.registry.model_name
    # vLLM ignores the key when none is configured; the client insists on some value.
    client = OpenAI(base_url=openai_base_url(job.serving), api_key=api_key(job.serving) or "none")
    models = {m.id: m for m in client.models.list().data}
    lines = [f"models: {', '.join(sorted(models))}"]
    if stable not in models:
        raise NotServed(f"{stable!r} is not served: no champion passed its canary yet (`loraflow serve CONFIG`)")
    for name in (stable, models[stable].root):
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0)
        lines.append(f"\n[{name} -> {reply.model}] {prompt}\n{reply.choices[0].message.content}")
    return lines
