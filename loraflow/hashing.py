"""Content hashes: the keys of cross-run caching and the lineage tags in the registry."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def sha_of(*values: Any) -> str:
    """Stable sha256 of JSON-able values (pydantic models included)."""
    payload = json.dumps([_jsonable(v) for v in values], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def sha_of_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha_of_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """Hash of file names (relative to root) and contents, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        name = str(path.relative_to(root)) if root else path.name
        digest.update(name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def code_sha(*module_names: str) -> str:
    """Hash of the source of the modules that implement a step: editing them invalidates its cache. The files are
    read, not imported, so computing a key never loads torch."""
    sources = []
    for name in module_names:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(name)
        sources.append(Path(spec.origin).read_text(encoding="utf-8"))
    return sha_of_text("".join(sources))[:16]
