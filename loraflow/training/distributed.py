"""Training on several processes: `accelerate launch` starts `training.num_processes` workers
(loraflow/training/worker.py) and this process waits for them, logging their output.

Each worker trains with the same function as in-process training (`train.train_here`); rank 0 alone logs to MLflow,
saves the adapter and writes the result, which this process reads back. The inputs travel as JSON in the step's
directory, where the checkpoints are too: a relaunch after a crash resumes from them like in-process training.

On CPU, the workers are started by accelerate's torchrun launcher (`--multi_gpu`: its `--cpu` launcher starts one
process unless an MPI hostfile is given); TrainingArguments' `use_cpu` then makes accelerate join them over gloo.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import psutil
import yaml
from pydantic import BaseModel, ConfigDict

from loraflow.config.lora import LoraSettings, QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.config.training import TrainingConfig, accelerate_config_path
from loraflow.errors import LoraflowError
from loraflow.process import stop_process
from loraflow.results import ChatResult, ParentVersion, TrainResult
from loraflow.training.live_metrics import Tracking
from loraflow.training.models import device_for

log = logging.getLogger(__name__)

WORKER_MODULE = "loraflow.training.worker"
INPUTS_FILE = "worker_inputs.json"
RESULT_FILE = "worker_result.json"
OUTPUT_TAIL_LINES = 40


class WorkerFailed(LoraflowError):
    """A training worker exited with an error; its checkpoints stay in the step's directory for the retry."""


class WorkerInputs(BaseModel):
    """Everything `train_adapter` got, as the workers read it."""

    model_config = ConfigDict(frozen=True)

    chat: ChatResult
    model: ModelConfig
    lora: LoraSettings
    quant: QuantizationConfig
    training: TrainingConfig
    out_dir: str
    key: str
    tracking: Tracking | None = None
    parent: ParentVersion | None = None


def is_distributed(training: TrainingConfig) -> bool:
    """Launched through accelerate: more than one process, or an accelerate config (e.g. FSDP on one GPU with
    parameter offload)."""
    return training.num_processes > 1 or training.accelerate_config is not None


def uses_fsdp(training: TrainingConfig) -> bool:
    if training.accelerate_config is None:
        return False
    settings = yaml.safe_load(accelerate_config_path(training.accelerate_config).read_text()) or {}
    return settings.get("distributed_type") == "FSDP"


def launch_command(training: TrainingConfig, device: str, inputs_file: Path) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(training.num_processes),
               "--num_machines", "1", "--main_process_port", "0"]  # 0: accelerate picks a free port
    if training.accelerate_config is not None:
        command += ["--config_file", str(accelerate_config_path(training.accelerate_config))]
    else:  # plain DDP (torchrun), explicit so that a user's default accelerate config is not applied
        command += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if device == "cpu":  # the machine's cores split between the workers (accelerate defaults to 1 thread each)
        threads = max(1, (os.cpu_count() or 1) // training.num_processes)
        command += ["--num_cpu_threads_per_process", str(threads)]
    return [*command, "-m", WORKER_MODULE, str(inputs_file)]


def launch_workers(inputs: WorkerInputs) -> TrainResult:
    """Run the workers to the end, streaming their output to this process's log; rank 0's result."""
    out_dir = Path(inputs.out_dir)
    inputs_file, result_file = out_dir / INPUTS_FILE, out_dir / RESULT_FILE
    inputs_file.write_text(inputs.model_dump_json(indent=2))
    result_file.unlink(missing_ok=True)  # the result read below is this launch's
    command = launch_command(inputs.training, device_for(inputs.model), inputs_file)
    log.info("training on %d processes: %s", inputs.training.num_processes, " ".join(command))
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    # The launcher stays in this process group, so a cancelled or killed flow run takes it along; its workers (in
    # sessions of their own, torchrun's doing) then exit too (worker.exit_with_launcher).
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          text=True, errors="replace") as launcher:
        try:
            assert launcher.stdout is not None
            for line in launcher.stdout:  # text mode turns tqdm's carriage returns into lines too
                if line := line.rstrip():
                    tail.append(line)
                    log.info("[workers] %s", line)
            returncode = launcher.wait()
        except BaseException:
            stop_process(psutil.Process(launcher.pid))  # an interrupted wait must not leave workers training
            raise
    if returncode != 0 or not result_file.is_file():
        raise WorkerFailed(
            f"training on {inputs.training.num_processes} processes failed (accelerate launch exited with "
            f"{returncode}); {out_dir} is kept, and a rerun resumes from its last checkpoint if one was written. "
            "Last output of the workers:\n" + "\n".join(tail))
    return TrainResult.model_validate_json(result_file.read_text())
