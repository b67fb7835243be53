import json
from pathlib import Path

from prefect import get_run_logger, task

from loraflow.config.lora import LoraSettings, QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.config.registry import RegistryConfig
from loraflow.config.training import TrainingConfig
from loraflow.localstack.prefect_api import accelerator
from loraflow.outputs import run_step
from loraflow.registry.client import tracking_uri
from loraflow.results import ChatResult, ParentVersion, TrainResult
from loraflow.training.keys import train_key
from loraflow.training.loss_check import loss_warning
from tasks.prefect_glue import retry_transient, step_cache


# A retry (or a retried flow run) finds the checkpoints in the step's directory and resumes from the last one.
@task(name="train", **step_cache("train", train_key),
      retries=1, retry_delay_seconds=30, retry_condition_fn=retry_transient)
def train(chat: ChatResult, model: ModelConfig, lora: LoraSettings, quant: QuantizationConfig,
          training: TrainingConfig, registry: RegistryConfig, job_name: str,
          parent: ParentVersion | None = None) -> TrainResult:
    """`registry` and `job_name` say where the live MLflow run goes; they are not part of the cache key. `parent`:
    the version training.init_from named, as the pre-flight pinned it."""
    key = train_key(chat, model, lora, quant, training, parent)

    def produce(out: Path) -> TrainResult:
        from loraflow.training.device import released_device_memory
        from loraflow.training.live_metrics import Tracking
        from loraflow.training.train import train_adapter

        tracking = Tracking(uri=tracking_uri(registry), experiment=registry.experiment or job_name,
                            run_name=f"{job_name}-{key[:8]}")
        # Only real training holds the accelerator slot: a finished result is returned without waiting for it. The
        # memory is handed back before the slot (evaluate, merge and vLLM follow in this process).
        with accelerator(), released_device_memory():
            return train_adapter(chat, model, lora, quant, training, out, key, tracking, parent)

    trained = run_step("train", key, TrainResult, produce)
    if warning := loss_warning(json.loads(Path(trained.log_history).read_text())):
        get_run_logger().warning(warning)
    return trained
