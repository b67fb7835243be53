"""Served model names: every registry version is immutable under `<model>-v<version>`; `<model>` is the stable
name that follows the `champion` alias."""

from __future__ import annotations

import re


def versioned_name(model_name: str, version: str | int) -> str:
    return f"{model_name}-v{version}"


def version_of(model_name: str, served_name: str) -> str | None:
    """The registry version a served name stands for, or None when it is not one of this model's versions."""
    match = re.fullmatch(rf"{re.escape(model_name)}-v(\d+)", served_name)
    return match.group(1) if match else None


def base_name(model_name: str) -> str:
    """The base model's served name: the canary compares adapters against it."""
    return f"{model_name}-base"
