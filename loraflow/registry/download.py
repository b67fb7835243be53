"""A registered version's adapter files on local disk: serving loads them into vLLM, merging folds them into the
base, a DPO job starts from them; and the content hash that names an adapter."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import mlflow.artifacts
from mlflow.entities.model_registry import ModelVersion

from loraflow.hashing import sha_of_files

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def adapter_sha(adapter_dir: Path) -> str:
    """The adapter's identity: its weights and config (the tokenizer saved beside them is the base's)."""
    return sha_of_files([adapter_dir / name for name in ADAPTER_FILES], root=adapter_dir)


def download_version(version: ModelVersion, root: Path, tracking_uri: str) -> Path:
    """The version's adapter directory under `root/v<N>`; downloaded once (versions are immutable)."""
    target = root / f"v{version.version}"
    if (target / "adapter_config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=version.source, dst_path=tmp, tracking_uri=tracking_uri
        )
        if not (Path(local) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"version {version.version}: no adapter_config.json under {version.source}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(local, target)
    return target
