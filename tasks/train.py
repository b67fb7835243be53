from prefect import task

from loraflow import train as plain
from loraflow.config.lora import LoraSettings, QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.config.training import TrainingConfig
from loraflow.results import ChatResult, TrainResult
from loraflow.steps import prefect_cache_key, run_step


@task(name="train", cache_key_fn=prefect_cache_key("train", plain.train_key), persist_result=True)
def train(chat: ChatResult, model: ModelConfig, lora: LoraSettings, quant: QuantizationConfig,
          training: TrainingConfig) -> TrainResult:
    key = plain.train_key(chat, model, lora, quant, training)
    return run_step("train", key, TrainResult,
                    lambda out: plain.train_adapter(chat, model, lora, quant, training, out, key))
