"""Read a job YAML, apply overrides, validate; errors name the file and the field path."""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from loraflow.config.job import JobConfig


class ConfigError(ValueError):
    """A config that does not validate. The message lists `field.path: problem` lines."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[leaf] = value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Overrides are `{"training.learning_rate": 1e-4}` (dotted) or nested dicts; nested dicts merge."""
    merged = copy.deepcopy(raw)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            for sub_key, sub_value in _flatten(value, prefix=key).items():
                _set_dotted(merged, sub_key, sub_value)
        else:
            _set_dotted(merged, key, value)
    return merged


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The section a field holds (itself, or the item type of a list of sections); None for a leaf."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def field_description(loc: tuple[int | str, ...]) -> str | None:
    """The description of the leaf field an error's `loc` points at, or None (a section, an unknown key). List
    indexes and pydantic's union-member tags (`list[str]`) in `loc` are not fields and are skipped."""
    section: type[BaseModel] | None = JobConfig
    found = None
    for part in loc:
        if section is not None and isinstance(part, str):
            if part not in section.model_fields:
                return None
            found = section.model_fields[part]
            section = _section_of(found.annotation)
    return found.description if found is not None and section is None else None


def format_validation_error(source: str, error: ValidationError) -> str:
    """One `  field.path: problem (got value)` line per error, followed by what the field means where it has a
    description, so that the message says what the value is for without opening the code."""
    lines = [f"{source}: {error.error_count()} invalid field(s)"]
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        shown = item.get("input")
        got = "" if item["type"] in ("missing",) or isinstance(shown, dict) else f" (got {shown!r})"
        meaning = field_description(item["loc"])
        lines.append(f"  {path}: {message}{got}" + (f" -- {meaning}" if meaning else ""))
    return "\n".join(lines)


def validate_config(raw: dict[str, Any], source: str = "<config>") -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    return validate_config(apply_overrides(read_yaml(path), overrides), source=str(path))
