"""train: QLoRA (or plain LoRA) with TRL's SFTTrainer on the tokenized conversations, or, for `training.method: dpo`,
with TRL's DPOTrainer on the tokenized preference pairs (loraflow/training/dpo.py).

Checkpoints go to the step's own content-addressed directory, so a rerun after a crash with the same inputs
finds them and resumes from the last one instead of starting over.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch
from datasets import load_from_disk
from transformers import PrinterCallback, Trainer, TrainerCallback
from trl import SFTTrainer

from loraflow.base.load import load_tokenizer
from loraflow.config.lora import LoraSettings, QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.config.training import TrainingConfig
from loraflow.outputs import write_json
from loraflow.registry.download import ADAPTER_FILES, adapter_sha
from loraflow.results import ChatResult, ParentVersion, TrainResult
from loraflow.training.arguments import peft_config, trainer_config
from loraflow.training.distributed import WorkerInputs, is_distributed, launch_workers, uses_fsdp
from loraflow.training.dpo import dpo_trainer, drop_reference, preference_metrics
from loraflow.training.live_metrics import LiveMetrics, ProgressLog, Tracking, system_metrics, training_run
from loraflow.training.models import device_for, load_base_model

log = logging.getLogger(__name__)


class StepTimer(TrainerCallback):
    """Counts the optimizer steps and wall time of this process (not of a resumed predecessor)."""

    def __init__(self) -> None:
        self.steps = 0
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint the Trainer finished writing (`trainer_state.json` is written last): a process
    killed while saving leaves a partial directory that must not be resumed from."""
    complete = [d for d in checkpoints.glob("checkpoint-*") if (d / "trainer_state.json").is_file()]
    return max(complete, key=lambda d: int(d.name.rsplit("-", 1)[1]), default=None)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_gpu_peak(device: str) -> None:
    """The peak from here on: loading the base is part of it, a previous step of the same process is not."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_mb(device: str) -> dict[str, float]:
    """The CUDA caching allocator's peaks since reset_gpu_peak: allocated (tensors: what `loraflow plan` estimates)
    and reserved (what nvidia-smi sees, fragmentation included). Empty on CPU."""
    if device != "cuda":
        return {}
    return {"peak_gpu_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "peak_gpu_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}


def train_adapter(chat: ChatResult, model: ModelConfig, lora: LoraSettings, quant: QuantizationConfig,
                  training: TrainingConfig, out_dir: Path, key: str, tracking: Tracking | None = None,
                  parent: ParentVersion | None = None) -> TrainResult:
    """Train (or resume) the adapter in `out_dir`: in this process, or on `training.num_processes` workers that
    `accelerate launch` starts (loraflow/training/distributed.py), each running `train_here`. With `tracking`, the
    MLflow run shows it live (loraflow/training/live_metrics.py) and the result names the run. `parent`: the
    version a DPO job starts from, as the pre-flight pinned it."""
    if is_distributed(training):
        return launch_workers(WorkerInputs(chat=chat, model=model, lora=lora, quant=quant, training=training,
                                           out_dir=str(out_dir), key=key, tracking=tracking, parent=parent))
    result = train_here(chat, model, lora, quant, training, out_dir, key, tracking, parent)
    assert result is not None  # a single process is rank 0
    return result


def method_trainer(training: TrainingConfig, base: Any, args: Any, train: Any, tokenizer: Any, lora: LoraSettings,
                   parent: ParentVersion | None, callbacks: list[TrainerCallback]) -> Trainer:
    """SFTTrainer with a new adapter of `lora`'s shape, or the DPO trainer (loraflow/training/dpo.py)."""
    if training.method == "dpo":
        return dpo_trainer(base, args, train, tokenizer, lora, parent, callbacks)
    return SFTTrainer(model=base, args=args, train_dataset=train, processing_class=tokenizer,
                      peft_config=peft_config(lora), callbacks=callbacks)


def train_here(chat: ChatResult, model: ModelConfig, lora: LoraSettings, quant: QuantizationConfig,
               training: TrainingConfig, out_dir: Path, key: str, tracking: Tracking | None = None,
               parent: ParentVersion | None = None) -> TrainResult | None:
    """The training itself, in this process as one rank of however many there are (WORLD_SIZE, set by
    `accelerate launch`). Rank 0 alone logs to MLflow, saves the adapter and returns the result; the others
    return None."""
    args = trainer_config(training, model, out_dir / "checkpoints")
    main = args.process_index == 0  # reading it sets up the process group under `accelerate launch`
    tokenizer = load_tokenizer(model)
    data = load_from_disk(chat.tokenized_dir)
    reset_gpu_peak(device_for(model))
    base = load_base_model(model, quant, quantized=True, fsdp=uses_fsdp(training),
                           padding_free=training.padding_free_batches)
    resume_from = last_complete_checkpoint(Path(args.output_dir))
    if resume_from and main:
        log.info("resuming training from %s", resume_from)
    timer = StepTimer()
    run_id = training_run(tracking, out_dir, world_size=args.world_size) if tracking and main else None
    trainer = method_trainer(training, base, args, data["train"], tokenizer, lora, parent,
                             [timer, *([LiveMetrics(tracking.uri, run_id)] if tracking and run_id else [])])
    if args.disable_tqdm:  # no terminal: a log line every few percent instead of a dict per logging step
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(ProgressLog())
    with system_metrics(tracking.uri, run_id) if tracking and run_id else contextlib.nullcontext():
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    elapsed = time.perf_counter() - timer.started

    adapter_dir = out_dir / "adapter"
    if training.method == "dpo":
        drop_reference(trainer)
    if trainer.is_fsdp_enabled:  # the adapter is saved whole, not as shards (PEFT's FSDP-QLoRA recipe)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(adapter_dir))  # the adapter and the tokenizer, written by rank 0 only
    if not main:
        return None
    # save_model also pickles the TrainingArguments beside them: not part of the adapter, and its paths would make
    # the adapter's content hash differ between two identical trainings.
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)
    history = trainer.state.log_history
    write_json(out_dir / "log_history.json", history)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    # Every process trains on its own batches: one optimizer step sees world_size of them (DPO: pairs).
    examples_per_step = training.batch_size * training.gradient_accumulation_steps * args.world_size
    tokens_per_step = chat.stats["train_tokens"] / max(1, len(data["train"])) * examples_per_step
    metrics = {
        "train_loss": float(output.training_loss),
        "first_logged_loss": float(losses[0]) if losses else float("nan"),
        "last_logged_loss": float(losses[-1]) if losses else float("nan"),
        "global_steps": float(trainer.state.global_step),
        "steps_this_process": float(timer.steps),
        "resumed_from_step": float(resume_from.name.rsplit("-", 1)[1]) if resume_from else 0.0,
        "world_size": float(args.world_size),
        "train_seconds": elapsed,
        "train_tokens_per_second": timer.steps * tokens_per_step / elapsed if elapsed > 0 else 0.0,
        # Steps/s misleads across set-ups (two GPUs halve the steps at the same it/s): examples/s compares.
        "train_examples_per_second": timer.steps * examples_per_step / elapsed if elapsed > 0 else 0.0,
        "peak_rss_mb": peak_rss_mb(),
        **peak_gpu_mb(device_for(model)),
        "trainable_params": float(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)),
        "adapter_bytes": float(sum((adapter_dir / f).stat().st_size for f in ADAPTER_FILES)),
        **preference_metrics(history),
    }
    write_json(out_dir / "train_metrics.json", metrics)
    log.info("train: %d steps in %.0f s (%.0f tokens/s), logged loss %.3f -> %.3f%s; all figures in %s",
             metrics["global_steps"], elapsed, metrics["train_tokens_per_second"], metrics["first_logged_loss"],
             metrics["last_logged_loss"], f", resumed from step {resume_from.name.rsplit('-', 1)[1]}" if resume_from
             else "", out_dir / "train_metrics.json")
    return TrainResult(key=key, path=str(out_dir), adapter_sha=adapter_sha(adapter_dir), metrics=metrics,
                       run_id=run_id)
