"""Served model names: every registry version is immutable under `<model>-v<version>`; `<model>` is the stable
name that follows the `champion` alias; `<model>-base` is the job's base without adapter. A base server's own name
(`base-<base>-<hash>`) is what vLLM knows the shared base as."""

from __future__ import annotations

import re


def versioned_name(model_name: str, version: str | int) -> str:
    return f"{model_name}-v{version}"


def version_of(model_name: str, served_name: str) -> str | None:
    """The registry version a served name stands for, or None when it is not one of this model's versions."""
    match = re.fullmatch(rf"{re.escape(model_name)}-v(\d+)", served_name)
    return match.group(1) if match else None


def base_name(model_name: str) -> str:
    """The job's name for its base model (the canary compares adapters against it)."""
    return f"{model_name}-base"


def server_name(base: str, key_sha: str) -> str:
    """The id of the vLLM serving `base` with a given set of server settings, also the base's name on it:
    `base-tiny-ko-3fa2c1d0`, `base-qwen2.5-7b-instruct-8a1b2c3d`."""
    tail = base.rstrip("/").split("/")[-1].split(":")[-1]
    return f"base-{re.sub(r'[^a-z0-9.]+', '-', tail.lower()).strip('-.')}-{key_sha[:8]}"
