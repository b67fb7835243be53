"""loraflow: from a chat dataset to a served LoRA adapter, one command line.

Each subcommand is a small typed function over the plain functions of the stages (the flows for `run` and
`serve`):

    loraflow up | down | status | demo             the local stack (Prefect server + worker + MLflow server)
    loraflow run configs/tiny-ko.yaml --set training.epochs=1
    loraflow serve configs/tiny-ko.yaml [--stop]   reconcile vLLM with the registry's aliases now
    loraflow promote tiny-ko 3 | rollback tiny-ko 2 | versions tiny-ko
    loraflow plan configs/qwen-ko.yaml [--json]    parameters and memory per mode, offline (--probe: measured here)
    loraflow schema [--output configs/schema.json] the job config's JSON Schema (field help for editors)
    loraflow ask configs/tiny-ko.yaml "질문"        the served champion through the openai client
    loraflow merge configs/qwen-ko.yaml --version 3  merge a version promoted by hand (the flow merges champions)
    loraflow check-gpu                             bitsandbytes' CUDA kernels quantize on this GPU (the image's check)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import yaml

from loraflow import paths
from loraflow.config import ConfigError, load_config
from loraflow.env import configure_environment
from loraflow.errors import LoraflowError

DEFAULT_CONFIG = "configs/tiny-ko.yaml"


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set training.epochs=1` -> {"training.epochs": 1} (values parsed as YAML)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects FIELD=VALUE, got {pair!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def run(config: str, overrides: list[str]) -> int:
    """The finetune flow in this process (Prefect's temporary server unless PREFECT_API_URL or a profile says
    otherwise); leaves vLLM + router running when the config serves (`loraflow down` stops them)."""
    from loraflow.localstack.temporary_server import EarlyPrefectServer

    server = EarlyPrefectServer()  # starts on another core while this one imports
    from flows.finetune import finetune, validated_job
    from loraflow.evaluation.comparison import comparison_table

    parsed = parse_overrides(overrides)
    validated_job(config, parsed)  # fail before the flow starts, with the field path
    with server.serving() as temporary_api:
        if temporary_api:
            print(f"Prefect: temporary server at {temporary_api} (it ends with this command)", file=sys.stderr)
        summary = finetune(config=config, overrides=parsed or None)
    reused = "new" if summary["new_version"] else "unchanged inputs: existing version reused"
    print(f"\nregistered model {summary['model_name']!r} version {summary['version']} ({reused})")
    print(f"MLflow tracking URI: {summary['tracking_uri']}  run: {summary['run_id']}")
    promotion = summary["promotion"]
    print(f"promotion: {promotion['alias'] or 'no alias'} - " + "; ".join(promotion["reasons"]))
    if summary["served_routes"] is not None:
        print(f"serving: {summary['served_routes']} (still running; `loraflow down` stops it)")
    print(comparison_table(summary["metrics"]))
    return 0


def serve(config: str, stop: bool) -> int:
    """One reconcile pass now (starting vLLM + router if needed), or stop the job's servers."""
    job = load_config(config)
    if stop:
        from loraflow.localstack.lifecycle import pause_idle_polling
        from loraflow.serving.records import stop_job_servers

        stopped = stop_job_servers(job.registry.model_name)
        print(f"stopped {stopped}" if stopped else "nothing recorded as running")
        print("\n".join(pause_idle_polling(_stack())))
        return 0
    from flows.serve import serve as serve_flow
    from loraflow.serving.urls import openai_base_url

    report = serve_flow(config=config)
    print(f"serving at {openai_base_url(job.serving)}: routes {report.get('routes')} loaded {report.get('loaded')}")
    return 0


def _stack():
    from loraflow.localstack.stack import Stack

    return Stack.from_env()


def _stack_registry() -> AbstractContextManager[str | None]:
    from loraflow.localstack.lifecycle import stack_registry

    return stack_registry(_stack())


def up(registry: str | None, auth: str | None) -> int:
    from loraflow.localstack.lifecycle import describe
    from loraflow.localstack.lifecycle import up as start
    from loraflow.localstack.postgres import REGISTRY_ENV
    from loraflow.localstack.stack import AUTH_ENV

    # Remembered by `up` for this LORAFLOW_HOME: later commands need not repeat them (docs/registry.md).
    os.environ.update({name: value for name, value in ((REGISTRY_ENV, registry), (AUTH_ENV, auth)) if value})
    stack = _stack()
    for name, seconds in start(stack).items():
        print(f"{name}: ready in {seconds:.1f} s")
    print(describe(stack))
    print("\nIn any shell: prefect deployment run finetune/tiny-ko --watch   (profile 'loraflow' is active)")
    return 0


def down() -> int:
    from loraflow.localstack import profile
    from loraflow.localstack.lifecycle import down as stop

    stack = _stack()
    stopped = stop(stack)
    print(f"stopped {len(stopped)} process(es)" + (f": {stopped}" if stopped else ""))
    print(profile.deactivate(stack))
    return 0


def status() -> int:
    from loraflow.localstack.lifecycle import describe

    print(describe(_stack()))
    return 0


def demo(config: str) -> int:
    from loraflow.localstack.demo import demo as user_path

    code = user_path(_stack())
    return code or ask(config, None, 64)


def promote(model: str, version: str, alias: str, tracking_uri: str | None) -> int:
    """A person's decision: point `alias` (default champion) at a version, whatever the policy said. The registry:
    `--tracking-uri`, else MLFLOW_TRACKING_URI (the running stack's MLflow server: `main`), else the embedded one."""
    from loraflow.registry.client import client_at
    from loraflow.registry.rollback import move_alias

    moved = move_alias(client_at(tracking_uri or paths.default_tracking_uri()), model, version, alias)
    print(f"{moved.model_name}: {moved.alias} v{moved.previous or '-'} -> v{moved.version}")
    return 0


def rollback(model: str, version: str, tracking_uri: str | None) -> int:
    return promote(model, version, "champion", tracking_uri)


def versions(model: str, tracking_uri: str | None) -> int:
    from loraflow.registry.client import client_at
    from loraflow.registry.rollback import describe_versions

    print("\n".join(describe_versions(client_at(tracking_uri or paths.default_tracking_uri()), model)))
    return 0


def plan(config: str, as_json: bool, probe: bool, steps: int, rows: int | None) -> int:
    """Offline; --probe measures a few training steps on this machine instead (loraflow/training/probe.py)."""
    if probe:
        from loraflow.training.probe import format_probe, probe_and_log

        planned, text = probe_and_log(load_config(config), steps, rows), format_probe
    else:
        from loraflow.training.plan import format_plan, plan_job

        planned, text = plan_job(load_config(config)), format_plan
    print(json.dumps(planned.model_dump(mode="json"), indent=2) if as_json else text(planned))
    return 0


def ask(config: str, prompt: str | None, max_tokens: int) -> int:
    from loraflow.serving.ask import DEFAULT_PROMPT
    from loraflow.serving.ask import ask as ask_served

    print("\n".join(ask_served(load_config(config), prompt or DEFAULT_PROMPT, max_tokens)))
    return 0


def schema(output: str | None) -> int:
    from loraflow.config.schema import job_schema_text

    text = job_schema_text()
    if output is None:
        sys.stdout.write(text)
    else:
        with open(output, "w", encoding="utf-8") as file:
            file.write(text)
    return 0


def merge(config: str, version: str) -> int:
    """The flow's merge step for a version the flow did not merge (a challenger a person made champion)."""
    from loraflow.training.merge import merge_version

    job = load_config(config)
    merged = merge_version(job, version, paths.sub("merge-adapters", job.registry.model_name))
    print(f"{job.registry.model_name} v{version}: merged into {merged.merged_dir} ({merged.dtype}, max |logit diff| "
          f"{merged.max_abs_logit_diff:.3g}), attached to the version's run as `merged/`")
    return 0


def check_gpu() -> int:
    from loraflow.training.device import check_bitsandbytes_cuda

    print(f"bitsandbytes NF4 quantize/dequantize on CUDA: relative error {check_bitsandbytes_cuda():.3f}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[5:]))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    def config_arg(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"job YAML (default {DEFAULT_CONFIG})")

    sub = command("run", run, "run the finetune flow for a job config")
    config_arg(sub)
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    sub = command("serve", serve, "make vLLM serve the registry's aliases now (or --stop the job's servers)")
    config_arg(sub)
    sub.add_argument("--stop", action="store_true")
    sub = command("up", up, "start the local stack (Prefect server, worker, MLflow server) and deploy")
    sub.add_argument("--registry", choices=["sqlite", "postgres"], default=None,
                     help="the MLflow server's store (default: what this LORAFLOW_HOME used before, else sqlite)")
    sub.add_argument("--auth", choices=["none", "basic"], default=None,
                     help="basic: MLflow's basic-auth app; aliases move only with EDIT on the model")
    command("down", down, "stop everything the local stack and its flows started")
    command("status", status, "what runs, where, and for which LORAFLOW_HOME")
    config_arg(command("demo", demo, "up, run finetune/tiny-ko through Prefect, then ask the champion"))
    for name, handler, text in (("promote", promote, "point an alias (default champion) at a version"),
                                ("rollback", rollback, "move champion back to a version")):
        sub = command(name, handler, text)
        sub.add_argument("model")
        sub.add_argument("version")
        if name == "promote":
            sub.add_argument("--alias", default="champion", choices=["champion", "challenger"])
        sub.add_argument("--tracking-uri", default=None)
    sub = command("versions", versions, "list a model's versions with aliases and promotion decisions")
    sub.add_argument("model")
    sub.add_argument("--tracking-uri", default=None)
    sub = command("plan", plan, "trainable/total parameters, adapter size and memory per mode, offline")
    config_arg(sub)
    sub.add_argument("--json", dest="as_json", action="store_true")
    sub.add_argument("--probe", action="store_true", help="measure a few worst-case training steps here, log to MLflow")
    sub.add_argument("--steps", type=int, default=5, help="--probe: optimizer steps to measure (default 5)")
    sub.add_argument("--rows", type=int, help="--probe: training rows to project onto (default: the built dataset)")
    sub = command("ask", ask, "ask the served champion through the openai client")
    config_arg(sub)
    sub.add_argument("prompt", nargs="?", default=None)
    sub.add_argument("--max-tokens", type=int, default=64)
    sub = command("merge", merge, "merge a registered version's adapter into its base and attach it to its run")
    config_arg(sub)
    sub.add_argument("--version", required=True, help="the registered model version to merge")
    command("check-gpu", check_gpu, "bitsandbytes' CUDA library loads and NF4-quantizes on this GPU")
    sub = command("schema", schema, "print the job config's JSON Schema (every field with its description)")
    sub.add_argument("--output", default=None, metavar="FILE", help="write it here instead (configs/schema.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    handler = args.pop("handler")
    args.pop("command")
    configure_environment()  # before Prefect is imported: every piece of state under LORAFLOW_HOME
    # Commands that read or write the registry use the local stack's MLflow server while it runs.
    on_registry = handler in (run, serve, merge, promote, rollback, versions) or args.get("probe")
    try:
        with _stack_registry() if on_registry else nullcontext():
            return handler(**args)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    except LoraflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
