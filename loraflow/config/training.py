"""Training hyper-parameters: SFT (TRL SFTTrainer) or DPO (TRL DPOTrainer), and the registered version a DPO job
starts from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from loraflow.config.base import Section

# accelerate's own config files (DDP, FSDP-QLoRA) ship with the repo; a job names one by its file name.
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


# A registered version, MLflow's way: `<model>@<alias>` (tiny-ko@champion) or `<model>/<version>` (tiny-ko/3).
VERSION_REFERENCE = r"^(?P<model>[^@/\s]+)(?:@(?P<alias>[A-Za-z][\w-]*)|/(?P<version>[1-9][0-9]*))$"


def accelerate_config_path(name: str) -> Path:
    """`ddp.yaml` -> configs/accelerate/ddp.yaml; an absolute path stays as it is."""
    return ACCELERATE_CONFIGS / name


class DpoSettings(Section):
    """What TRL's DPOTrainer gets besides the shared hyper-parameters (training.method: dpo)."""

    beta: float = Field(default=0.1, gt=0, description="How far the policy may move from the reference: higher "
                        "keeps it closer (TRL's `beta`; the temperature of the implicit reward).")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero", "sigmoid_norm"] = Field(
        default="sigmoid", description="TRL's DPO loss: `sigmoid` (the DPO paper), `ipo`, `hinge`, `robust`, "
        "`apo_zero`, `sigmoid_norm` (length-normalized).")


class TrainingConfig(Section):
    method: Literal["sft", "dpo"] = Field(
        default="sft", description="`sft`: supervised fine-tuning on chat `messages` (TRL SFTTrainer); `dpo`: "
        "preference tuning on prompt/chosen/rejected pairs (TRL DPOTrainer), usually from `init_from`.")
    init_from: str | None = Field(
        default=None, pattern=VERSION_REFERENCE, description="A registered version of the job's registry to start "
        "from, `<model>@<alias>` or `<model>/<version>` (`tiny-ko@champion`), resolved once at flow start: its "
        "adapter is the starting policy and DPO's frozen reference, and `lora` must describe its shape. None: a new "
        "adapter (DPO's reference: the base with adapters off). DPO only.")
    dpo: DpoSettings = Field(default=DpoSettings(), description="DPO's own settings (training.method: dpo).")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training split (a fraction is allowed).")
    max_steps: int = Field(default=-1, ge=-1, description="Stop after this many optimizer steps; -1: `epochs` "
                           "decides.")
    learning_rate: float = Field(default=2e-4, gt=0, description="The peak learning rate (after warm-up).")
    lr_scheduler: str = Field(default="cosine", description="A transformers scheduler name (`cosine`, `linear`, "
                              "`constant`, ...).")
    warmup_steps: float = Field(default=0.03, ge=0, description="Warm-up: an int is a number of steps; a float in "
                                "[0, 1) is a fraction of all steps (transformers semantics).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay on the adapter weights.")
    batch_size: int = Field(default=4, gt=0, description="Conversations (DPO: pairs, two sequences each) per device "
                            "per forward pass.")
    gradient_accumulation_steps: int = Field(default=4, gt=0, description="Forward passes per optimizer step "
                                             "(effective batch = batch_size x this x processes).")
    max_length: int = Field(default=2048, gt=8, description="Tokens per conversation (DPO: prompt + the longer "
                            "answer); longer rows are dropped (format_chat's token_lengths.png shows the cut).")
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
                               "with per-conversation position_ids: no compute on padding, no cross-attention (SFT; "
                               "TRL 1.16's DPO pads every batch).")
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

    @model_validator(mode="after")
    def _method_fits(self) -> TrainingConfig:
        if self.method == "sft" and self.init_from is not None:
            raise ValueError("training.init_from: only a DPO job starts from a registered version (training.method: "
                             "dpo)")
        if self.method == "dpo" and self.packing:
            raise ValueError("training.packing: SFT only (a DPO batch holds whole pairs)")
        return self

    @property
    def padding_free_batches(self) -> bool:
        """Whether batches really are padding-free: TRL 1.16's DPOTrainer pads them whatever it is told."""
        return self.padding_free and self.method == "sft"
