"""loraflow: from a chat dataset to a served LoRA adapter, one command line.

Each subcommand is a small typed function over the plain functions of the stages (the flows for `run` and
`serve`), in the module of its group (loraflow/cli/<group>.py):

    loraflow up | down | status | demo             the local stack (Prefect server + worker + MLflow server)
    loraflow deploy [path/to/job.yaml]             deployments from every job config (after adding a file)
    loraflow run configs/tiny-ko.yaml --set training.epochs=1
    loraflow serve configs/tiny-ko.yaml [--stop]   serve a job's aliases now (or take it off the endpoint)
    loraflow promote tiny-ko 3 | rollback tiny-ko 2 | versions tiny-ko
    loraflow plan configs/qwen-ko.yaml [--json]    parameters and memory per mode, offline (--probe: measured here)
    loraflow schema [--output configs/schema.json] the job config's JSON Schema (field help for editors)
    loraflow ask configs/tiny-ko.yaml "질문"        the served champion through the openai client
    loraflow merge configs/qwen-ko.yaml --version 3  merge a version promoted by hand (the flow merges champions)
    loraflow check-gpu                             bitsandbytes' CUDA kernels quantize on this GPU (the image's check)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from contextlib import nullcontext

from loraflow.cli import data, jobs, registry, serving, stack
from loraflow.cli.common import parse_overrides, stack_registry
from loraflow.config import ConfigError
from loraflow.env import configure_environment
from loraflow.errors import LoraflowError

__all__ = ["build_parser", "main", "parse_overrides"]
GROUPS = (stack, jobs, data, serving, registry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[5:]))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[..., int], help_text: str,
                registry: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler, on_registry=registry)
        return sub

    for group in GROUPS:
        group.register(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    handler = args.pop("handler")
    on_registry = args.pop("on_registry") or args.get("probe")
    args.pop("command")
    configure_environment()  # before Prefect is imported: every piece of state under LORAFLOW_HOME
    try:
        # Commands that read or write the registry use the local stack's MLflow server while it runs.
        with stack_registry() if on_registry else nullcontext():
            return handler(**args)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    except LoraflowError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
