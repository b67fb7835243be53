from prefect import task

from loraflow.config.model import ModelConfig
from loraflow.config.training import TrainingConfig
from loraflow.data.keys import chat_key
from loraflow.data.summary import chat_summary, chat_warnings
from loraflow.outputs import run_step
from loraflow.results import ChatResult, DatasetResult
from tasks.prefect_glue import report_step, step_cache


@task(name="format_chat", **step_cache("chat", chat_key))
def format_chat(dataset: DatasetResult, model: ModelConfig, training: TrainingConfig) -> ChatResult:
    key = chat_key(dataset, model, training)

    def produce(out):
        from loraflow.data.format_chat import format_chat as render

        return render(dataset, model, training, out, key)

    chat = run_step("chat", key, ChatResult, produce)
    report_step(chat_summary(chat.stats), chat_warnings(chat.stats), "Rows tokenized, token lengths, trained tokens")
    return chat
