"""train, method dpo: TRL's DPOTrainer on the preference pairs format_chat tokenized.

The starting policy is the adapter of the version `training.init_from` named (pinned by the pre-flight), loaded
trainable on the base; DPOTrainer then copies it as a frozen adapter named `ref`, the reference. Without one, a new
adapter of `lora`'s shape on the base, whose reference is the base itself (adapters off). Either way only the
adapter is saved: the reference copy stays out of the registered files.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedModel, TrainerCallback
from trl import DPOConfig, DPOTrainer

from loraflow.config.lora import LoraSettings
from loraflow.data.format_chat import PAIR_COLUMNS
from loraflow.results import ParentVersion
from loraflow.training.arguments import peft_config

REFERENCE_ADAPTER = "ref"  # the name DPOTrainer gives the copy of a starting adapter


class PretokenizedDPOTrainer(DPOTrainer):
    """format_chat has tokenized every pair with the job's template and checked each answer ends with <|im_end|>
    (`PAIR_COLUMNS`, the columns DPOTrainer's own tokenization produces): that tokenization is not repeated."""

    def _prepare_dataset(self, dataset: Dataset, processing_class: Any, args: DPOConfig, dataset_name: str) -> Dataset:
        missing = [name for name in PAIR_COLUMNS if name not in dataset.column_names]
        if missing:
            raise ValueError(f"{dataset_name} split: no {missing} columns; DPO trains on format_chat's pairs")
        return dataset


def dpo_trainer(base: PreTrainedModel, args: DPOConfig, train: Dataset, tokenizer: Any, lora: LoraSettings,
                parent: ParentVersion | None, callbacks: list[TrainerCallback]) -> DPOTrainer:
    if parent is None:
        return PretokenizedDPOTrainer(model=base, args=args, train_dataset=train, processing_class=tokenizer,
                                      peft_config=peft_config(lora), callbacks=callbacks)
    policy = PeftModel.from_pretrained(base, parent.adapter_dir, is_trainable=True)
    return PretokenizedDPOTrainer(model=policy, args=args, train_dataset=train, processing_class=tokenizer,
                                  callbacks=callbacks)


def drop_reference(trainer: DPOTrainer) -> None:
    """Before the adapter is saved: PEFT saves every adapter of a model, the reference copy in a `ref/` folder."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel) and REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)


def preference_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged training-batch reward accuracy and margin (TRL's `rewards/accuracies`, `rewards/margins`:
    the share of pairs whose implicit reward prefers `chosen`, and beta x the log-ratio gap)."""
    logged = [entry for entry in history if "rewards/accuracies" in entry]
    if not logged:
        return {}
    return {"reward_accuracy": float(logged[-1]["rewards/accuracies"]),
            "reward_margin": float(logged[-1]["rewards/margins"])}
