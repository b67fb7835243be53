"""The content key of each step: everything its output depends on (upstream content hashes, its config sections,
the source of the code that produces it).

Keys are computed without importing a step's implementation, so that a fully cached run never loads torch,
transformers or lm-eval: the implementation modules are hashed as files. Moving references (a hub dataset's or
hub base's `revision: main`) enter as the commit sha they resolve to when the key is computed
(loraflow/data/sources.py), so a scheduled run retrains exactly when the data or the base changed.
"""

from __future__ import annotations

from loraflow.config.data import DataConfig
from loraflow.config.evaluation import EvalConfig
from loraflow.config.lora import LoraSettings, QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.config.serving import MergeConfig
from loraflow.config.training import TrainingConfig, accelerate_config_path
from loraflow.data.sources import SourceFingerprint, pinned_data, pinned_model, source_fingerprint
from loraflow.hashing import code_sha, sha_of
from loraflow.results import ChatResult, DatasetResult, TrainResult
from loraflow.templates import template_sha

# Loading code shapes every model-dependent output.
MODEL_CODE = ("loraflow.bases", "loraflow.training.models")
# File selection and revision resolution shape what the dataset step reads.
DATA_CODE = ("loraflow.data.build_dataset", "loraflow.data.sources")


def dataset_key(data: DataConfig) -> str:
    """Local sources by their manifest of file contents, hub sources by the commit their revision resolves to now
    (`main` today is not `main` next week): the same fingerprints build_dataset loads."""
    return dataset_key_of(data, [source_fingerprint(s, i) for i, s in enumerate(data.sources)])


def dataset_key_of(data: DataConfig, fingerprints: list[SourceFingerprint]) -> str:
    # Revisions enter as resolved shas, so `revision: main` and the sha it points to give the same key.
    return sha_of(pinned_data(data, fingerprints), [fp.content_key for fp in fingerprints], code_sha(*DATA_CODE))[:16]


def chat_key(dataset: DatasetResult, model: ModelConfig, training: TrainingConfig) -> str:
    # The tokenizer comes from the base at its resolved commit (embedded/local bases: as configured).
    model = pinned_model(model)
    return sha_of(dataset.dataset_sha, model.base, model.revision, template_sha(model.chat_template),
                  training.max_length, code_sha("loraflow.data.format_chat", *MODEL_CODE))[:16]


def train_key(chat: ChatResult, model: ModelConfig, lora: LoraSettings, quant: QuantizationConfig,
              training: TrainingConfig) -> str:
    code = code_sha("loraflow.training.train", "loraflow.training.distributed", "loraflow.training.worker", *MODEL_CODE)
    # The accelerate config's content, not only its name: editing configs/accelerate/fsdp_qlora.yaml retrains.
    launch = accelerate_config_path(training.accelerate_config).read_text() if training.accelerate_config else None
    return sha_of(chat.key, pinned_model(model), lora, quant, training, code, launch)[:16]


def eval_key(chat: ChatResult, trained: TrainResult, model: ModelConfig, quant: QuantizationConfig,
             evaluation: EvalConfig) -> str:
    code = code_sha("loraflow.evaluation.evaluate", "loraflow.evaluation.perplexity", "loraflow.evaluation.benchmarks",
                    "loraflow.evaluation.comparison", "loraflow.tiny.kobest",
                    "loraflow.evaluation.heldout", "loraflow.evaluation.labels",
                    *MODEL_CODE)
    return sha_of(chat.key, trained.adapter_sha, pinned_model(model), quant, evaluation, code)[:16]


def merge_key(adapter_sha: str, model: ModelConfig, merge: MergeConfig) -> str:
    return sha_of(adapter_sha, pinned_model(model), merge, code_sha("loraflow.training.merge", *MODEL_CODE))[:16]
