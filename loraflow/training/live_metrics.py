"""Training shows in MLflow while it runs: the version's MLflow run starts when training starts (its id is kept in
the train step's directory, so a training resumed after a crash continues the same run, and `register` later fills
that run and registers the version from it), each logging step's loss, learning rate, grad norm and tokens/s are
logged as they happen, and MLflow's system metrics (CPU, memory, GPU) are sampled meanwhile. Without a terminal for
a progress bar, the log (Prefect's run logs, a worker's log file) gets a line every few percent of the steps.

transformers' own MLflowCallback is not used: it also logs every TrainingArguments field as a param, and MLflow
params are immutable, so a resumed run whose arguments print differently (a new output path, a retry's changed
batch) would fail on its first step. Only metrics are logged here; `register` logs the config as params once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from transformers import TrainerCallback

from loraflow.logs import PROGRESS_PERCENT
from loraflow.registry.client import client_at, ensure_experiment
from loraflow.training.environment import FROZEN_ARTIFACT, environment_params, frozen_packages

RUN_FILE = "mlflow_run.json"
WORLD_SIZE_TAG = "train.world_size"
SYSTEM_SAMPLING_S = 3  # short trainings still get a few samples; MLflow aggregates nothing over them
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tracking:
    """Where the training's run goes: the job's tracking URI and experiment."""

    uri: str
    experiment: str
    run_name: str


def training_run(tracking: Tracking, out_dir: Path, world_size: int) -> str:
    """The run of the training in `out_dir`: the one it started before a crash, else a new one, which records the
    environment it trains in (params `env.*`, the frozen package list). It carries the number of training processes
    as the tag `train.world_size` (only rank 0 calls this)."""
    file = out_dir / RUN_FILE
    client = client_at(tracking.uri)
    if file.is_file():
        run_id = json.loads(file.read_text())["run_id"]
    else:
        run = client.create_run(ensure_experiment(client, tracking.experiment),
                                tags={"mlflow.runName": tracking.run_name, "loraflow.stage": "training"})
        run_id = run.info.run_id
        client.log_batch(run_id, params=[Param(k, v) for k, v in environment_params().items()])
        client.log_text(run_id, frozen_packages(), FROZEN_ARTIFACT)
        file.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking.uri}))
    client.set_tag(run_id, WORLD_SIZE_TAG, str(world_size))
    return run_id


class LiveMetrics(TrainerCallback):
    """Each `logging_steps` step: `train/<name>` at the optimizer step, plus `train/tokens_per_second` from TRL's
    `num_tokens` (non-padding tokens seen)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client, self.run_id = client_at(uri), run_id
        self.last: tuple[float, float] | None = None  # (time, num_tokens) at the previous log

    def on_log(self, args, state, control, logs=None, **kwargs):
        now = time.time()
        values = {k: float(v) for k, v in (logs or {}).items()
                  if isinstance(v, int | float) and not isinstance(v, bool)}
        if "num_tokens" in values:
            if self.last is not None and now > self.last[0]:
                values["tokens_per_second"] = (values["num_tokens"] - self.last[1]) / (now - self.last[0])
            self.last = (now, values["num_tokens"])
        stamp = int(now * 1000)
        metrics = [Metric(f"train/{name}", value, stamp, state.global_step) for name, value in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)


class ProgressLog(TrainerCallback):
    """A log line each PROGRESS_PERCENT percent of the optimizer steps, with the last logged loss: the progress bar
    where there is no terminal (it replaces transformers' PrinterCallback, a dict printed per logging step)."""

    def __init__(self) -> None:
        self.mark = PROGRESS_PERCENT

    def on_step_end(self, args, state, control, **kwargs):
        percent = state.global_step * 100 // max(state.max_steps, 1)
        if percent >= self.mark and state.is_world_process_zero:
            losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
            loss = f", loss {losses[-1]:.4f}" if losses else ""
            log.info("training: %d%% (step %d/%d%s)", percent, state.global_step, state.max_steps, loss)
        self.mark = max(self.mark, (percent // PROGRESS_PERCENT + 1) * PROGRESS_PERCENT)


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str) -> Iterator[None]:
    """MLflow's own sampler of CPU, memory (and GPU where nvidia-ml-py finds one) for the body's duration."""
    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_SAMPLING_S, resume_logging=True,
                                   tracking_uri=uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
