"""The content keys of the training steps (train, merge); computed from files, never by importing the step (see
loraflow/data/keys.py), with the base at its pinned commit."""

from __future__ import annotations

from loraflow.base.revision import MODEL_CODE, pinned_model
from loraflow.config.lora import LoraSettings, QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.config.serving import MergeConfig
from loraflow.config.training import TrainingConfig, accelerate_config_path
from loraflow.hashing import code_sha, sha_of
from loraflow.results import ChatResult, ParentVersion


def train_key(chat: ChatResult, model: ModelConfig, lora: LoraSettings, quant: QuantizationConfig,
              training: TrainingConfig, parent: ParentVersion | None = None) -> str:
    """`training` holds the method (sft, dpo) and `init_from` as written; `parent` what it resolved to at flow start
    (the version and its adapter's content), so an alias that moves later retrains, one that moves mid-run does not
    change this run."""
    code = code_sha("loraflow.training.train", "loraflow.training.arguments", "loraflow.training.dpo",
                    "loraflow.training.distributed", "loraflow.training.worker", *MODEL_CODE)
    # The accelerate config's content, not only its name: editing configs/accelerate/fsdp_qlora.yaml retrains.
    launch = accelerate_config_path(training.accelerate_config).read_text() if training.accelerate_config else None
    return sha_of(chat.key, pinned_model(model), lora, quant, training, parent and parent.identity, code, launch)[:16]


def merge_key(adapter_sha: str, model: ModelConfig, merge: MergeConfig) -> str:
    return sha_of(adapter_sha, pinned_model(model), merge, code_sha("loraflow.training.merge", *MODEL_CODE))[:16]
