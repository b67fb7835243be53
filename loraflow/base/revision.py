"""Which commit of the base a run uses: a hub base's moving `revision` (`main`) resolved to its sha once, by the
pre-flight (tasks/validate.py); keys, loading, serving (vLLM's `--revision`) and lineage then read that one sha.
Embedded and local bases have no hub revision and keep `model.revision`. Light on purpose: no transformers."""

from __future__ import annotations

from pathlib import Path

from loraflow.config.model import ModelConfig
from loraflow.hub import resolve_revision

# The code that loads a base shapes every model-dependent output: each such step's key hashes it.
MODEL_CODE = ("loraflow.base.load", "loraflow.training.models")


def is_hub_model(model: ModelConfig) -> bool:
    """A hub id: neither `embedded:...` nor an existing local directory (what transformers loads first)."""
    return not model.is_embedded and not Path(model.base).expanduser().exists()


def resolve_model_revision(model: ModelConfig) -> str | None:
    """The base's commit sha for a hub base; embedded and local bases keep `model.revision` (they have no hub
    revision). Keys hash this and serving passes it as vLLM's `--revision`."""
    if not is_hub_model(model):
        return model.revision
    return resolve_revision(model.base, model.revision, "model", field="model.revision")


def pinned_model(model: ModelConfig) -> ModelConfig:
    """The model config with its revision resolved (unchanged, the same object, when nothing moves)."""
    revision = resolve_model_revision(model)
    return model if revision == model.revision else model.model_copy(update={"revision": revision})
