from prefect import task

from loraflow import evaluation as plain
from loraflow.config.evaluation import EvalConfig
from loraflow.config.lora import QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.results import ChatResult, EvalResult, TrainResult
from loraflow.steps import prefect_cache_key, run_step


@task(name="evaluate", cache_key_fn=prefect_cache_key("evaluate", plain.eval_key), persist_result=True)
def evaluate(chat: ChatResult, trained: TrainResult, model: ModelConfig, quant: QuantizationConfig,
             evaluation: EvalConfig) -> EvalResult:
    key = plain.eval_key(chat, trained, model, quant, evaluation)
    return run_step("evaluate", key, EvalResult,
                    lambda out: plain.evaluate(chat, trained, model, quant, evaluation, out, key))
