"""The content key of each step: everything its output depends on (upstream content hashes, its config sections,
the source of the code that produces it).

Keys are computed without importing a step's implementation, so that a fully cached run never loads torch,
transformers or lm-eval: the implementation modules are hashed as files.
"""

from __future__ import annotations

from pathlib import Path

from loraflow.config.data import DataConfig, DataSource
from loraflow.config.evaluation import EvalConfig
from loraflow.config.lora import LoraSettings, QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.config.serving import MergeConfig
from loraflow.config.training import TrainingConfig
from loraflow.data.templates import load_template
from loraflow.hashing import code_sha, sha_of, sha_of_files, sha_of_text
from loraflow.results import ChatResult, DatasetResult, TrainResult

# Loading code shapes every model-dependent output.
MODEL_CODE = ("loraflow.training.models",)


def source_fingerprint(source: DataSource) -> str:
    """Local files by content; hub datasets by id + revision (pin a commit sha for exact reproducibility)."""
    if source.path is not None:
        path = Path(source.path)
        if not path.is_file():
            raise FileNotFoundError(f"data.sources: file not found: {source.path}")
        return sha_of_files([path])
    return sha_of(source.hub_id, source.revision, source.subset, source.split)


def template_sha(model: ModelConfig) -> str:
    return sha_of_text(load_template(model.chat_template))


def dataset_key(data: DataConfig) -> str:
    fingerprints = [source_fingerprint(s) for s in data.sources]
    return sha_of(data, fingerprints, code_sha("loraflow.data.build_dataset"))[:16]


def chat_key(dataset: DatasetResult, model: ModelConfig, training: TrainingConfig) -> str:
    return sha_of(dataset.dataset_sha, model.base, model.revision, template_sha(model), training.max_length,
                  code_sha("loraflow.data.format_chat", *MODEL_CODE))[:16]


def train_key(chat: ChatResult, model: ModelConfig, lora: LoraSettings, quant: QuantizationConfig,
              training: TrainingConfig) -> str:
    return sha_of(chat.key, model, lora, quant, training, code_sha("loraflow.training.train", *MODEL_CODE))[:16]


def eval_key(chat: ChatResult, trained: TrainResult, model: ModelConfig, quant: QuantizationConfig,
             evaluation: EvalConfig) -> str:
    code = code_sha("loraflow.evaluation.evaluate", "loraflow.evaluation.perplexity", "loraflow.evaluation.benchmarks",
                    "loraflow.evaluation.comparison", "loraflow.tiny.kobest",
                    *MODEL_CODE)
    return sha_of(chat.key, trained.adapter_sha, model, quant, evaluation, code)[:16]


def merge_key(adapter_sha: str, model: ModelConfig, merge: MergeConfig) -> str:
    return sha_of(adapter_sha, model, merge, code_sha("loraflow.training.merge", *MODEL_CODE))[:16]
