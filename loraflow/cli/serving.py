"""`loraflow serve | ask`: make vLLM follow the registry's aliases now; ask the served champion."""

from __future__ import annotations

from loraflow.cli.common import AddCommand, config_arg, local_stack
from loraflow.config import load_config


def serve(config: str, stop: bool) -> int:
    """One reconcile pass now (starting vLLM + router if needed), or stop the job's servers."""
    job = load_config(config)
    if stop:
        from loraflow.localstack.lifecycle import pause_idle_polling
        from loraflow.serving.records import stop_job_servers

        stopped = stop_job_servers(job.registry.model_name)
        print(f"stopped {stopped}" if stopped else "nothing recorded as running")
        print("\n".join(pause_idle_polling(local_stack())))
        return 0
    from flows.serve import serve as serve_flow
    from loraflow.serving.urls import openai_base_url

    report = serve_flow(config=config)
    print(f"serving at {openai_base_url(job.serving)}: routes {report.get('routes')} loaded {report.get('loaded')}")
    return 0


def ask(config: str, prompt: str | None, max_tokens: int) -> int:
    from loraflow.serving.ask import DEFAULT_PROMPT
    from loraflow.serving.ask import ask as ask_served

    print("\n".join(ask_served(load_config(config), prompt or DEFAULT_PROMPT, max_tokens)))
    return 0


def register(command: AddCommand) -> None:
    sub = command("serve", serve, "make vLLM serve the registry's aliases now (or --stop the job's servers)",
                  registry=True)
    config_arg(sub)
    sub.add_argument("--stop", action="store_true")
    sub = command("ask", ask, "ask the served champion through the openai client")
    config_arg(sub)
    sub.add_argument("prompt", nargs="?", default=None)
    sub.add_argument("--max-tokens", type=int, default=64)
