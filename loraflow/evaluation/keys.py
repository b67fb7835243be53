"""The content key of the evaluate step; computed from files, never by importing the step (see
loraflow/data/keys.py), with the base at its pinned commit."""

from __future__ import annotations

from loraflow.base.revision import MODEL_CODE, pinned_model
from loraflow.config.evaluation import EvalConfig
from loraflow.config.lora import QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.hashing import code_sha, sha_of
from loraflow.results import ChatResult, TrainResult


def eval_key(chat: ChatResult, trained: TrainResult, model: ModelConfig, quant: QuantizationConfig,
             evaluation: EvalConfig) -> str:
    code = code_sha("loraflow.evaluation.evaluate", "loraflow.evaluation.perplexity", "loraflow.evaluation.benchmarks",
                    "loraflow.evaluation.comparison", "loraflow.tiny.kobest",
                    "loraflow.evaluation.heldout", "loraflow.evaluation.labels",
                    *MODEL_CODE)
    return sha_of(chat.key, trained.adapter_sha, pinned_model(model), quant, evaluation, code)[:16]
