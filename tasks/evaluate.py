from prefect import task

from loraflow.config.evaluation import EvalConfig
from loraflow.config.lora import QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.evaluation.keys import eval_key
from loraflow.localstack.prefect_api import accelerator
from loraflow.outputs import run_step
from loraflow.results import ChatResult, EvalResult, ParentVersion, TrainResult
from tasks.prefect_glue import step_cache


@task(name="evaluate", **step_cache("evaluate", eval_key))
def evaluate(chat: ChatResult, trained: TrainResult, model: ModelConfig, quant: QuantizationConfig,
             evaluation: EvalConfig, parent: ParentVersion | None = None) -> EvalResult:
    """`parent`: the starting point (training.init_from), measured beside the tuned adapter."""
    key = eval_key(chat, trained, model, quant, evaluation, parent)

    def produce(out):
        from loraflow.evaluation.evaluate import evaluate as measure
        from loraflow.training.device import released_device_memory

        # Base and tuned models are loaded on the device: never beside a training; their memory is handed back.
        with accelerator(), released_device_memory():
            return measure(chat, trained, model, quant, evaluation, out, key, parent)

    return run_step("evaluate", key, EvalResult, produce)
