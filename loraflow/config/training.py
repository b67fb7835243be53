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
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training split (a fraction is allowed).")
    max_steps: int = Field(default=-1, ge=-1, description="Stop after this many optimizer steps; -1: `epochs` "
                           "decides.")
    learning_rate: float = Field(default=2e-4, gt=0, description="The peak learning rate (after warm-up).")
    lr_scheduler: str = Field(default="cosine", description="A transformers scheduler name (`cosine`, `linear`, "
                              "`constant`, ...).")
    warmup_steps: float = Field(default=0.03, ge=0, description="Warm-up: an int is a number of steps; a float in "
                                "[0, 1) is a fraction of all steps (transformers semantics).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay on the adapter weights.")
    batch_size: int = Field(default=4, gt=0, description="Conversations per device per forward pass.")
    gradient_accumulation_steps: int = Field(default=4, gt=0, description="Forward passes per optimizer step "
                                             "(effective batch = batch_size x this x processes).")
    max_length: int = Field(default=2048, gt=8, description="Tokens per conversation; longer rows are dropped "
                            "(format_chat's token_lengths.png shows the cut).")
    gradient_checkpointing: bool = Field(default=True, description="Recompute activations in the backward pass: "
                                         "less memory, more compute.")
    optim: str = Field(default="adamw_torch", description="A transformers optimizer name (`adamw_torch`, "
                       "`paged_adamw_8bit`, ...).")
    logging_steps: int = Field(default=10, gt=0, description="Log loss and learning rate every this many steps.")
    save_steps: int = Field(default=100, gt=0, description="Save a checkpoint (what a rerun resumes from) every "
                            "this many steps.")
    save_total_limit: int = Field(default=2, gt=0, description="Keep at most this many checkpoints.")
    seed: int = Field(default=42, description="The seed of the adapter's initialization and the data order.")
    # Packing was slower than no packing for tiny models on CPU (measured with TRL 1.16): off unless asked for.
    packing: bool = Field(default=False, description="Pack conversations into full-length rows (TRL's packing).")
    # Each batch is one row of concatenated conversations with per-conversation position_ids (TRL's padding-free
    # collator): no compute on padding. transformers builds the block-diagonal attention mask from position_ids
    # (sdpa/eager) or passes the boundaries to flash-attention kernels, so no conversation sees another
    # (tests/test_train.py checks the loss equals the padded batch's). bench/training.py measures the gain.
    padding_free: bool = Field(default=True, description="Each batch is one row of concatenated conversations "
                               "with per-conversation position_ids: no compute on padding, no cross-attention.")
    # docs/distributed-training.md.
    num_processes: int = Field(default=1, ge=1, description="More than 1: `accelerate launch` starts that many "
                               "workers (DDP over gloo on CPU, NCCL on GPUs, or FSDP per `accelerate_config`); 1 "
                               "trains in this process.")
    accelerate_config: str | None = Field(default=None, description="An accelerate config file in "
                                          "configs/accelerate/ (`ddp.yaml`, `fsdp_qlora.yaml`) or an absolute path.")

    @field_validator("accelerate_config")
    @classmethod
    def _accelerate_config_exists(cls, name: str | None) -> str | None:
        if name is not None and not accelerate_config_path(name).is_file():
            raise ValueError(f"{name!r} is not a file in {ACCELERATE_CONFIGS} (nor an absolute path to one)")
        return name
