from pathlib import Path

from prefect import task

from loraflow.config.lora import LoraSettings, QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.config.training import TrainingConfig
from loraflow.keys import train_key
from loraflow.outputs import run_step
from loraflow.results import ChatResult, TrainResult
from tasks.prefect_glue import accelerator, prefect_cache_key


# A retry (or a retried flow run) finds the checkpoints in the step's directory and resumes from the last one.
@task(name="train", cache_key_fn=prefect_cache_key("train", train_key), persist_result=True,
      retries=1, retry_delay_seconds=30)
def train(chat: ChatResult, model: ModelConfig, lora: LoraSettings, quant: QuantizationConfig,
          training: TrainingConfig) -> TrainResult:
    key = train_key(chat, model, lora, quant, training)

    def produce(out: Path) -> TrainResult:
        from loraflow.training.train import train_adapter

        # Only real training holds the accelerator slot: a finished result is returned without waiting for it.
        with accelerator():
            return train_adapter(chat, model, lora, quant, training, out, key)

    return run_step("train", key, TrainResult, produce)
