"""What the subcommands share: the default job, `--set FIELD=VALUE` parsing, the local stack, the parser helpers."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import yaml

from loraflow.config import ConfigError

if TYPE_CHECKING:
    from loraflow.localstack.stack import Stack

DEFAULT_CONFIG = "configs/tiny-ko.yaml"
# `command(name, handler, help, registry=...)`: adds a subcommand; registry=True runs it against the local stack's
# MLflow server while that runs (loraflow/localstack/lifecycle.py `stack_registry`).
AddCommand = Callable[..., argparse.ArgumentParser]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set training.epochs=1` -> {"training.epochs": 1} (values parsed as YAML)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set expects FIELD=VALUE, got {pair!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def config_arg(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"job YAML (default {DEFAULT_CONFIG})")


def local_stack() -> Stack:
    from loraflow.localstack.stack import Stack

    return Stack.from_env()


def stack_registry() -> AbstractContextManager[str | None]:
    from loraflow.localstack.lifecycle import stack_registry as on_stack_registry

    return on_stack_registry(local_stack())
