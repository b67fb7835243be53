from prefect import task

from loraflow.config.evaluation import EvalConfig
from loraflow.config.lora import QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.keys import eval_key
from loraflow.results import ChatResult, EvalResult, TrainResult
from loraflow.steps import prefect_cache_key, run_step


@task(name="evaluate", cache_key_fn=prefect_cache_key("evaluate", eval_key), persist_result=True)
def evaluate(chat: ChatResult, trained: TrainResult, model: ModelConfig, quant: QuantizationConfig,
             evaluation: EvalConfig) -> EvalResult:
    key = eval_key(chat, trained, model, quant, evaluation)

    def produce(out):
        from loraflow.evaluation import evaluate as measure

        return measure(chat, trained, model, quant, evaluation, out, key)

    return run_step("evaluate", key, EvalResult, produce)
