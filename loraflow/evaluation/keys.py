"""The content key of the evaluate step; computed from files, never by importing the step (see
loraflow/data/keys.py), with the base at its pinned commit."""

from __future__ import annotations

from loraflow.base.revision import MODEL_CODE, pinned_model
from loraflow.config.evaluation import EvalConfig
from loraflow.config.lora import QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.hashing import code_sha, sha_of
from loraflow.results import ChatResult, ParentVersion, TrainResult


def eval_key(chat: ChatResult, trained: TrainResult, model: ModelConfig, quant: QuantizationConfig,
             evaluation: EvalConfig, parent: ParentVersion | None = None) -> str:
    """`chat.key` holds the method (pairs are scored by preference too); `parent` is the starting point measured
    beside the tuned adapter."""
    code = code_sha("loraflow.evaluation.evaluate", "loraflow.evaluation.perplexity", "loraflow.evaluation.benchmarks",
                    "loraflow.evaluation.comparison", "loraflow.tiny.kobest",
                    "loraflow.evaluation.heldout", "loraflow.evaluation.labels", "loraflow.evaluation.preference",
                    *MODEL_CODE)
    return sha_of(chat.key, trained.adapter_sha, pinned_model(model), quant, evaluation, parent and parent.identity,
                  code)[:16]
