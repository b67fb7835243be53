"""What the trainers get: PEFT's LoraConfig and the arguments of TRL's SFTConfig / DPOConfig, as plain values a CPU
test asserts for a CUDA config (the configs themselves refuse bf16 on a machine without a GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from transformers import TrainingArguments
from trl import DPOConfig, SFTConfig

from loraflow.config.lora import LoraSettings
from loraflow.config.model import ModelConfig
from loraflow.config.training import TrainingConfig
from loraflow.logs import on_terminal
from loraflow.training.models import device_for, dtype_for


def peft_config(lora: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.peft_targets,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )


def trainer_arguments(training: TrainingConfig, model: ModelConfig, output_dir: Path) -> dict[str, Any]:
    """The transformers TrainingArguments both methods share."""
    device = device_for(model)
    dtype = dtype_for(model.dtype, device)
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        warmup_steps=training.warmup_steps,
        weight_decay=training.weight_decay,
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        gradient_checkpointing=training.gradient_checkpointing,
        # Non-reentrant checkpointing: the reentrant one loses the LoRA gradients of a frozen 4-bit base and breaks
        # under DDP.
        gradient_checkpointing_kwargs={"use_reentrant": False} if training.gradient_checkpointing else None,
        optim=training.optim,
        logging_steps=training.logging_steps,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        seed=training.seed,
        data_seed=training.seed,
        report_to="none",  # the register step logs to MLflow
        use_cpu=device == "cpu",
        # Mixed precision follows the model's dtype on a GPU (bf16 where the GPU has it, fp16 on a T4).
        bf16=device == "cuda" and dtype == torch.bfloat16,
        fp16=device == "cuda" and dtype == torch.float16,
        dataloader_num_workers=0,
        # Under DDP: every LoRA parameter gets a gradient each step, and searching for unused ones costs a graph walk
        # per step (and errors with non-reentrant checkpointing).
        ddp_find_unused_parameters=False,
        disable_tqdm=not on_terminal(),  # elsewhere train.py's ProgressLog writes a line every few percent
    )


def sft_arguments(training: TrainingConfig, model: ModelConfig, output_dir: Path) -> dict[str, Any]:
    """Everything SFTConfig gets."""
    return {
        **trainer_arguments(training, model, output_dir),
        # Rows over max_length were dropped by format_chat; padding-free batches require that TRL leaves them as is.
        "max_length": None if training.padding_free and not training.packing else training.max_length,
        "packing": training.packing,
        "padding_free": training.padding_free,
    }


def dpo_arguments(training: TrainingConfig, model: ModelConfig, output_dir: Path) -> dict[str, Any]:
    """Everything DPOConfig gets. DPOConfig's own defaults differ from TrainingArguments' (learning rate 1e-6,
    gradient checkpointing on, bf16 on): every shared argument is passed, none of those defaults applies."""
    return {
        **trainer_arguments(training, model, output_dir),
        "beta": training.dpo.beta,
        "loss_type": [training.dpo.loss_type],
        # format_chat dropped the pairs over max_length; TRL would cut the others' answers (keep_start).
        "max_length": None,
        # TRL 1.16 pads DPO batches whatever it is told (and warns when asked for padding-free ones).
        "padding_free": False,
        # The reference's log-probs are computed beside the policy's each step (one more no-grad forward of the same
        # model, adapters off or the starting adapter on): nothing to precompute and cache across runs.
        "precompute_ref_log_probs": False,
        "disable_dropout": True,  # TRL's default, explicit: the policy and the reference see the same network
    }


def trainer_config(training: TrainingConfig, model: ModelConfig, output_dir: Path) -> TrainingArguments:
    """The job's method's config: SFTConfig or DPOConfig."""
    if training.method == "dpo":
        return DPOConfig(**dpo_arguments(training, model, output_dir))
    return SFTConfig(**sft_arguments(training, model, output_dir))
