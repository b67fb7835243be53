"""SFT hyper-parameters (TRL SFTTrainer)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from loraflow.config.base import Section

# accelerate's own config files (DDP, FSDP-QLoRA) ship with the repo; a job names one by its file name.
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


def accelerate_config_path(name: str) -> Path:
    """`ddp.yaml` -> configs/accelerate/ddp.yaml; an absolute path stays as it is."""
    return ACCELERATE_CONFIGS / name


class TrainingConfig(Section):
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int = Field(default=-1, ge=-1)
    learning_rate: float = Field(default=2e-4, gt=0)
    lr_scheduler: str = "cosine"
    # an int is a number of steps; a float in [0, 1) is a fraction of all steps (transformers semantics)
    warmup_steps: float = Field(default=0.03, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=4, gt=0)
    gradient_accumulation_steps: int = Field(default=4, gt=0)
    max_length: int = Field(default=2048, gt=8)
    gradient_checkpointing: bool = True
    optim: str = "adamw_torch"
    logging_steps: int = Field(default=10, gt=0)
    save_steps: int = Field(default=100, gt=0)
    save_total_limit: int = Field(default=2, gt=0)
    seed: int = 42
    # Packing was slower than no packing for tiny models on CPU (measured with TRL 1.16): off unless asked for.
    packing: bool = False
    # Each batch is one row of concatenated conversations with per-conversation position_ids (TRL's padding-free
    # collator): no compute on padding. transformers builds the block-diagonal attention mask from position_ids
    # (sdpa/eager) or passes the boundaries to flash-attention kernels, so no conversation sees another
    # (tests/test_train.py checks the loss equals the padded batch's). bench/training.py measures the gain.
    padding_free: bool = True
    # More than one process: `accelerate launch` starts that many workers (DDP over gloo on CPU, NCCL on GPUs, or
    # FSDP per `accelerate_config`); docs/distributed-training.md. 1 trains in this process.
    num_processes: int = Field(default=1, ge=1)
    accelerate_config: str | None = None

    @field_validator("accelerate_config")
    @classmethod
    def _accelerate_config_exists(cls, name: str | None) -> str | None:
        if name is not None and not accelerate_config_path(name).is_file():
            raise ValueError(f"{name!r} is not a file in {ACCELERATE_CONFIGS} (nor an absolute path to one)")
        return name
