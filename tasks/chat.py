from prefect import task

from loraflow import chat as plain
from loraflow.config.model import ModelConfig
from loraflow.config.training import TrainingConfig
from loraflow.results import ChatResult, DatasetResult
from loraflow.steps import prefect_cache_key, run_step


@task(name="format_chat", cache_key_fn=prefect_cache_key("chat", plain.chat_key), persist_result=True)
def format_chat(dataset: DatasetResult, model: ModelConfig, training: TrainingConfig) -> ChatResult:
    key = plain.chat_key(dataset, model, training)
    return run_step("chat", key, ChatResult, lambda out: plain.format_chat(dataset, model, training, out, key))
