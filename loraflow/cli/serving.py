"""`loraflow serve | ask`: serve a job's aliases now, take it off, or follow every job (the stack's reconciler);
ask the served champion."""

from __future__ import annotations

import logging
import signal
import threading
from datetime import datetime
from pathlib import Path

from loraflow.cli.common import DEFAULT_CONFIG, AddCommand, config_arg, local_stack
from loraflow.config import load_config


def serve(configs: list[str], stop: bool, follow: bool) -> int:
    """One reconcile pass per job now (starting the endpoint and its base's vLLM if needed), or take the jobs off
    (`--stop`), or run the stack's reconciler (`--follow`: what `loraflow up` starts)."""
    if follow:
        return follow_jobs()
    for config in configs or [DEFAULT_CONFIG]:
        job = load_config(config)
        if stop:
            from loraflow.serving.deploy import stop_job

            print("\n".join(stop_job(job)) or f"{job.registry.model_name}: not served")
            continue
        from loraflow.localstack.serving_pass import serve_pass
        from loraflow.serving.urls import openai_base_url

        report = serve_pass(config)
        if report is None:
            print(f"{job.registry.model_name}: not served")
            continue
        print(f"serving at {openai_base_url(job.serving)}: {job.registry.model_name} on {report.server}, "
              f"routes {report.routes} loaded {report.loaded}")
    return 0


def follow_jobs() -> int:
    """Until SIGTERM: a serving pass (loraflow/localstack/serving_pass.py, recorded as a Prefect event) for each
    alias move of a served job, and for each job whose serving drifted from its registry."""
    from loraflow.localstack.alias_events import follow_alias_events
    from loraflow.localstack.jobs import deployed_jobs
    from loraflow.localstack.serving_pass import serve_pass
    from loraflow.serving.drift import drift
    from loraflow.serving.follow import FollowedJob, Follower
    from loraflow.serving.records import job_records, read_endpoint

    def followed() -> list[FollowedJob]:
        """Every served job while the stack serves (its endpoint recorded): those with a serving record, and the
        deployed jobs with serving on that nothing served yet; never one taken off on purpose, nor one whose config
        file is gone."""
        if read_endpoint() is None:
            return []
        served = {r.model: r for r in job_records()}
        jobs = {model: FollowedJob(model, r.config, r.overrides) for model, r in served.items() if not r.stopped}
        for deployed in deployed_jobs(local_stack()):
            if deployed.serving and deployed.model not in served:
                jobs[deployed.model] = FollowedJob(deployed.model, deployed.config)
        return [job for job in jobs.values() if Path(job.config).is_file()]

    def run_pass(job: FollowedJob, why: str, promoted_at: datetime | None) -> None:
        serve_pass(job.config, job.overrides, start=False, promoted_at=promoted_at, why=why)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    follower = Follower(jobs=followed, run_pass=run_pass, drift=lambda job: drift(load_config(job.config,
                                                                                              job.overrides)))
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    threading.Thread(target=follow_alias_events, args=(follower.notify, stopping), daemon=True,
                     name="alias-events").start()
    follower.run(stopping)
    return 0


def ask(config: str, prompt: str | None, max_tokens: int) -> int:
    from loraflow.serving.ask import DEFAULT_PROMPT
    from loraflow.serving.ask import ask as ask_served

    print("\n".join(ask_served(load_config(config), prompt or DEFAULT_PROMPT, max_tokens)))
    return 0


def register(command: AddCommand) -> None:
    sub = command("serve", serve, "serve jobs' registry aliases now, take them off (--stop), or follow every job "
                  "(--follow, the stack's reconciler)", registry=True)
    sub.add_argument("configs", nargs="*", metavar="CONFIG", help=f"job YAMLs (default {DEFAULT_CONFIG})")
    mode = sub.add_mutually_exclusive_group()
    mode.add_argument("--stop", action="store_true", help="take the jobs off the endpoint and their adapters off "
                      "their servers; a server with no job left stops, the endpoint with the last server")
    mode.add_argument("--follow", action="store_true", help="serve every job of the stack as its aliases move "
                      "(runs until stopped; `loraflow up` starts it)")
    sub = command("ask", ask, "ask the served champion through the openai client")
    config_arg(sub)
    sub.add_argument("prompt", nargs="?", default=None)
    sub.add_argument("--max-tokens", type=int, default=64)
