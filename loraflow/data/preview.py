"""`loraflow data`: the flow's two data steps as the flow runs them, without Prefect and without training, and the
first rows as the model sees them with the trained tokens marked.

The steps go through their own keys and directories (`run_step`), so a later `loraflow run` of the same job reuses
them, and a preview of a job already run reads what that run built.
"""

from __future__ import annotations

from datasets import load_from_disk

from loraflow.base.load import load_tokenizer
from loraflow.base.revision import pinned_model
from loraflow.config.job import JobConfig
from loraflow.data.build_dataset import build_dataset
from loraflow.data.format_chat import format_chat
from loraflow.data.keys import chat_key, dataset_key
from loraflow.data.sources import pin_data
from loraflow.data.summary import marked_tokens
from loraflow.outputs import run_step
from loraflow.results import ChatResult, DatasetResult


def build_and_format(job: JobConfig) -> tuple[DatasetResult, ChatResult]:
    data, model = pin_data(job.data), pinned_model(job.model)
    data_key = dataset_key(data)
    dataset = run_step("dataset", data_key, DatasetResult, lambda out: build_dataset(data, out, data_key))
    tokens_key = chat_key(dataset, model, job.training)
    chat = run_step("chat", tokens_key, ChatResult,
                    lambda out: format_chat(dataset, model, job.training, out, tokens_key))
    return dataset, chat


def rendered_rows(chat: ChatResult, job: JobConfig, rows: int) -> list[str]:
    """The first `rows` training rows, rendered by the job's tokenizer and template, trained tokens in ⟦ ⟧."""
    tokenizer = load_tokenizer(pinned_model(job.model))
    train = load_from_disk(chat.tokenized_dir)["train"]
    return [marked_tokens(tokenizer, row["input_ids"], row["assistant_masks"])
            for row in train.select(range(min(rows, len(train))))]
