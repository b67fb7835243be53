"""Where built embedded bases live: once per machine in the user's cache, keyed by their recipe, so every clone and
every LORAFLOW_HOME reuses the one build (about two minutes of pretraining on 2 cores), and a copy in each
LORAFLOW_HOME's models/ (a registered version's base path stays valid whatever happens to the cache)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from loraflow import paths

# The repo's own state dir (the Makefile's default LORAFLOW_HOME): test sessions and benches link theirs to it.
SHARED_MODELS = Path(__file__).resolve().parents[2] / ".loraflow" / "models"
COMPLETE = "config.json"  # written by save_pretrained; a directory is only ever renamed into place whole


def _place(staging: Path, target: Path) -> None:
    """Rename a finished directory into place; a concurrent process that got there first wins (same content)."""
    if target.exists() and not (target / COMPLETE).is_file():
        shutil.rmtree(target)  # left by an interrupted older layout: never a whole model
    try:
        staging.rename(target)
    except OSError:
        if not (target / COMPLETE).is_file():
            raise
        shutil.rmtree(staging)


def _staging(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))


def built_model(name: str, build: Callable[[Path], None]) -> Path:
    """LORAFLOW_HOME/models/<name>, copied from the machine's cache; `build` (writing into an empty directory)
    fills the cache first when it has no <name>."""
    target = paths.models_dir() / name
    if (target / COMPLETE).is_file():
        return target
    cached = paths.machine_cache() / "models" / name
    if not (cached / COMPLETE).is_file():
        staging = _staging(cached.parent, name)
        try:
            build(staging)
        except BaseException:
            shutil.rmtree(staging)
            raise
        _place(staging, cached)
    staging = _staging(target.parent, name)
    shutil.copytree(cached, staging, dirs_exist_ok=True)
    _place(staging, target)
    return target


def share_built_models(home: Path) -> None:
    """Every LORAFLOW_HOME a test session or a bench makes uses the repo's models dir, not a copy of its own."""
    SHARED_MODELS.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(SHARED_MODELS, target_is_directory=True)
