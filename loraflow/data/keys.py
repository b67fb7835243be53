"""The content keys of the data steps (build_dataset, format_chat): everything their output depends on.

Like every step's key (loraflow/<stage>/keys.py), computed without importing the step's implementation, so a fully
cached run never loads torch, transformers or datasets: implementation modules are hashed as files. Moving
references enter as the commit they were pinned to at flow start (`PinnedData`, `pinned_model`), so a scheduled
run retrains exactly when the data or the base changed.
"""

from __future__ import annotations

from loraflow.base.revision import MODEL_CODE, pinned_model
from loraflow.config.data import DataConfig
from loraflow.config.model import ModelConfig
from loraflow.config.training import TrainingConfig
from loraflow.data.sources import PinnedData, as_pinned
from loraflow.hashing import code_sha, sha_of
from loraflow.results import DatasetResult
from loraflow.templates import template_sha

# File selection, revision resolution and loading shape what the dataset step reads.
DATA_CODE = ("loraflow.data.build_dataset", "loraflow.data.conversation", "loraflow.data.load",
             "loraflow.data.preference", "loraflow.data.sources", "loraflow.hub")


def dataset_key(data: DataConfig | PinnedData) -> str:
    """Local sources by their manifest of file contents, hub sources by their pinned commit (`main` today is not
    `main` next week): the very fingerprints build_dataset loads. Revisions enter as resolved shas, so
    `revision: main` and the sha it points to give the same key."""
    pinned = as_pinned(data)
    return sha_of(pinned.data, [fp.content_key for fp in pinned.fingerprints], code_sha(*DATA_CODE))[:16]


def chat_key(dataset: DatasetResult, model: ModelConfig, training: TrainingConfig) -> str:
    # The tokenizer comes from the base at its resolved commit (embedded/local bases: as configured).
    model = pinned_model(model)
    # The method decides what is tokenized: conversations (sft) or preference pairs (dpo).
    return sha_of(dataset.dataset_sha, model.base, model.revision, template_sha(model.chat_template),
                  training.max_length, training.method,
                  code_sha("loraflow.data.format_chat", "loraflow.data.conversation", *MODEL_CODE))[:16]
