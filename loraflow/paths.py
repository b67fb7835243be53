"""Where loraflow keeps its state. Everything lives under LORAFLOW_HOME (default ./.loraflow), but for the caches
every clone of a machine shares (`machine_cache`)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LORAFLOW_CACHE_DIR"


def machine_cache() -> Path:
    """LORAFLOW_CACHE_DIR, else $XDG_CACHE_HOME/loraflow, else ~/.cache/loraflow: what is rebuilt identically from
    its key (the embedded base, vLLM's model-inspection and compile caches), so sharing it only saves time."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "loraflow"


def home() -> Path:
    """The state root; read on every call so tests and servers can point it elsewhere."""
    path = Path(os.environ.get("LORAFLOW_HOME", ".loraflow")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sub(*parts: str) -> Path:
    path = home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    return sub("models")


def work_dir() -> Path:
    """Content-addressed step outputs: work/<step>/<key>/."""
    return sub("work")


def mlflow_dir() -> Path:
    return sub("mlflow")


def default_tracking_uri() -> str:
    """Embedded MLflow: SQLite store under LORAFLOW_HOME (any MLFLOW_TRACKING_URI overrides it)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{mlflow_dir() / 'mlflow.db'}"


def default_artifact_root() -> Path:
    return sub("mlflow", "artifacts")
