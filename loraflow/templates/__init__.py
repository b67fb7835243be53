"""Chat templates shipped with loraflow (Jinja, with `{% generation %}` markers)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from loraflow.hashing import sha_of_text


def load_template(name_or_path: str) -> str:
    """A shipped template by name (`qwen2.5`) or any .jinja file by path."""
    shipped = resources.files(__name__) / f"{name_or_path}.jinja"
    if shipped.is_file():
        return shipped.read_text(encoding="utf-8")
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    names = sorted(p.name.removesuffix(".jinja") for p in resources.files(__name__).iterdir()
                   if p.name.endswith(".jinja"))
    raise FileNotFoundError(f"chat_template {name_or_path!r}: neither a shipped template {names} nor a file")


def template_sha(name_or_path: str) -> str:
    """What the registry records (`template_sha`) and the serving canary checks."""
    return sha_of_text(load_template(name_or_path))
